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
    /// Check this machine: kernel, userfaultfd path and features, io_uring, memlock,
    /// PM-QoS, cgroups — and what is missing for which mode, with advice.
    Doctor {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Parse a config file and print it back normalised, or the error with its line.
    CheckConfig {
        /// The config file (USM cfg format).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor { json } => {
            let report = usm_kmod::probe::ProbeReport::collect();
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("usm: cannot encode the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{report}");
            }
            // Exit status tells scripts whether every mode can run here.
            if report.all_ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
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
