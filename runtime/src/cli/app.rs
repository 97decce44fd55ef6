//! The `usm` command line: its subcommands and their dispatch ([`main`], [`main_with`]):
//! `usm run` (the InstanceUSM daemon), `usm exec` (tag and run one program under a
//! private daemon), `usm compare`, `usm stat`, `usm mkswap`, `usm demo`, `usm doctor`,
//! `usm check-config`, and `usm completions` / `usm man` (generated from this definition).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usm_runtime::Config;
use usm_runtime::daemon::RegisterPolicies;

use crate::cli;

/// Userspace memory management for Linux.
#[derive(Debug, Parser)]
#[command(name = "usm", version = usm_runtime::daemon::version(), long_about = None)]
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
    /// Run the InstanceUSM daemon with CONFIG until SIGINT/SIGTERM; on the signal it
    /// gives every managed program its memory back, then exits.
    Run {
        /// The config file (USM cfg format).
        config: PathBuf,
    },
    /// Tag and run one program under a private daemon (built-in defaults, or --config);
    /// prints a summary at exit; exits with the program's code.
    Exec(cli::ExecArgs),
    /// Run a program under USM and again under the kernel (a memory cgroup of the same
    /// budget, kernel swap on the same disk), interleaved; print USM/kernel ratios of wall
    /// time, the program's throughput, major faults and peak memory. Undoes every change
    /// at exit, also on Ctrl-C.
    Compare(cli::CompareArgs),
    /// Show a running daemon's managed processes: resident and swapped pages, fault and
    /// swap-in rates, latency percentiles, policy.
    Stat {
        /// The daemon's taggers' socket (default: the system daemon's, else the only
        /// daemon of this user, e.g. a lone `usm exec`).
        #[arg(long, conflicts_with = "pid")]
        socket: Option<PathBuf>,
        /// The daemon serving this program (or this `usm exec`), wherever its socket is;
        /// shows that program's rows.
        #[arg(long)]
        pid: Option<u32>,
        /// Refresh every N seconds (default 1) until interrupted: MiB, per-interval rates
        /// and latency percentiles, the policies in force, ended processes.
        #[arg(long, num_args = 0..=1, default_missing_value = "1")]
        watch: Option<u64>,
        /// Print each snapshot as one JSON line, with its time (and, when watching, the
        /// interval's rates and percentiles).
        #[arg(long)]
        json: bool,
    },
    /// The swap-storm demo on the embedded runtime: memory-hungry and CPU uThreads share
    /// the workers while the pool is a fraction of the data.
    Demo(usm_runtime::demo::DemoArgs),
    /// Format a file or block device as USM swap (creates the file with --size).
    Mkswap {
        /// File or block device.
        path: PathBuf,
        /// Size of a new file (512M, 4G).
        #[arg(long)]
        size: Option<String>,
        /// Overwrite a device or file that holds something else.
        #[arg(long)]
        force: bool,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per subcommand into --dir.
    Man {
        /// Write usm.1, usm-exec.1, ... into this directory instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The `usm` command with the built-in policies: parses `std::env::args`, runs the
/// subcommand, returns its exit status.
pub fn main() -> ExitCode {
    dispatch(None)
}

/// The `usm` command with extra policies: `register` adds them to the registry of every
/// daemon this process starts (`usm run`, `usm exec`) and to the one `usm check-config`
/// checks names against, so a config line or `--policy` may name them.
pub fn main_with(register: RegisterPolicies) -> ExitCode {
    dispatch(Some(register))
}

fn dispatch(register: Option<RegisterPolicies>) -> ExitCode {
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
        Command::CheckConfig { file } => check_config(&file, register),
        Command::Run { config } => cli::run(&config, register),
        Command::Exec(args) => cli::exec(&args, register),
        Command::Compare(args) => cli::compare(&args),
        Command::Stat {
            socket,
            pid,
            watch,
            json,
        } => {
            let target = match (pid, socket) {
                (Some(pid), _) => cli::StatTarget::Pid(pid),
                (None, Some(s)) => cli::StatTarget::Socket(s),
                (None, None) => cli::StatTarget::Default,
            };
            cli::stat(&target, watch, json)
        }
        Command::Mkswap { path, size, force } => cli::mkswap(&path, size.as_deref(), force),
        Command::Demo(args) => usm_runtime::demo::run_cli(&args),
        Command::Completions { shell } => {
            cli::docs::completions(<Cli as clap::CommandFactory>::command(), shell)
        }
        Command::Man { dir } => {
            cli::docs::man(<Cli as clap::CommandFactory>::command(), dir.as_deref())
        }
    }
}

/// `usm check-config FILE`: what `usm run` checks before it serves anyone — the config
/// (syntax, every number against this machine), the policy names, and each swap device's
/// USM header (opened read-only; a block device held by a running daemon is only noted).
/// Prints the config back normalised, or the first error with its line.
fn check_config(file: &Path, register: Option<RegisterPolicies>) -> ExitCode {
    let cfg = match Config::load(file) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("usm: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cli::check_policies(&cfg, register) {
        eprintln!("usm: {}: {e}", file.display());
        return ExitCode::from(2);
    }
    for spec in &cfg.swap {
        let opts = usm_swap::DeviceOptions { read_only: true };
        match usm_swap::SwapDevice::open_with(usm_swap::DeviceId(0), &spec.path, &opts) {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::EBUSY) => eprintln!(
                "usm: {}:{}: note: swap device {} is in use (a running daemon?): {e}",
                file.display(),
                spec.line,
                spec.path.display()
            ),
            Err(e) => {
                eprintln!("usm: {}:{}: swap device: {e}", file.display(), spec.line);
                return ExitCode::from(2);
            }
        }
    }
    print!("{cfg}");
    ExitCode::SUCCESS
}
