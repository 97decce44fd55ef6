//! The `usm` command: `usm doctor`, `usm check-config`, and (as they land) the daemon,
//! `usm exec`, `usm stat` and the demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usm_runtime::Config;

/// Userspace memory management for Linux.
#[derive(Debug, Parser)]
#[command(name = "usm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse a config file and print it back normalised, or the error with its line.
    CheckConfig {
        /// The config file (USM cfg format).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                print!("{cfg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("usm: {e}");
                ExitCode::from(2)
            }
        },
    }
}
