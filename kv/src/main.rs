//! `usm-kv`: the key-value server's command line (see the library docs).
//!
//! Prints `usm-kv listening on ADDR (mode MODE)` on stdout once it accepts connections;
//! SIGINT or SIGTERM stops it cleanly (connections closed) with exit status 0.

#![forbid(unsafe_code)]
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use usm_kv::store::StoreConfig;
use usm_kv::{KvConfig, Mode, parse_size};

/// A key-value server on USM's embedded runtime, speaking RESP (redis-cli and
/// redis-benchmark work unmodified).
#[derive(Debug, Parser)]
#[command(name = "usm-kv", version)]
struct Args {
    /// TCP port (0: any free port).
    #[arg(long, default_value_t = 6379)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// USM frame pool size (the memory budget), e.g. 256M.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pool: u64,
    /// USM swap file: used if it exists (formatted by `usm mkswap`), else created with
    /// --swap-size bytes. Put it on a disk (ext4), not tmpfs.
    #[arg(long)]
    swap: Option<PathBuf>,
    /// Size of a swap file created at --swap.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    swap_size: u64,
    /// Run on OS threads with plain memory (the kernel's memory manager) instead of USM.
    #[arg(long)]
    kernel: bool,
    /// USM workers (cores).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Keys the index holds [default: 4M; without --swap, what fits an eighth of the pool].
    #[arg(long)]
    max_keys: Option<usize>,
    /// Bytes of item data [default: 1G; without --swap, 5/8 of the pool].
    #[arg(long, value_parser = parse_size)]
    max_data: Option<u64>,
    /// Largest value accepted.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    max_value: u64,
    /// USM eviction policy (two-list, clock, fifo, hints) [default: the runtime's, two-list].
    #[arg(long)]
    evict: Option<String>,
    /// USM re-fault access sampling for the eviction policy: on or off [default: on].
    #[arg(long)]
    access_sampling: Option<Switch>,
    /// USM free-frame watermarks LOW,HIGH in frames [default: derived from the pool].
    #[arg(long, value_parser = parse_pair)]
    watermarks: Option<(usize, usize)>,
    /// USM mode: run each connection's reads on their own uThreads, replies in order
    /// (default: one by one; concurrent measured slower on a loaded 2-vCPU machine, see
    /// bench/results/kv.md).
    #[arg(long)]
    concurrent: bool,
    /// Shards (a power of two).
    #[arg(long, default_value_t = 32)]
    shards: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?}: expected LOW,HIGH"))?;
    let n = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|_| format!("{x:?} is not a number"))
    };
    let (low, high) = (n(a)?, n(b)?);
    if low >= high {
        return Err(format!("watermarks {low},{high}: LOW must be below HIGH"));
    }
    Ok((low, high))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("usm-kv: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mode = if args.kernel { Mode::Kernel } else { Mode::Usm };
    // Without swap, USM's pool is all the memory there is: keep the store inside it.
    let pool_only = mode == Mode::Usm && args.swap.is_none();
    let store = StoreConfig {
        shards: args.shards,
        max_keys: args.max_keys.unwrap_or(if pool_only {
            (args.pool as usize / 8 / 32).max(1024)
        } else {
            4 << 20
        }),
        max_data: args.max_data.map(|d| d as usize).unwrap_or(if pool_only {
            args.pool as usize * 5 / 8
        } else {
            1 << 30
        }),
        max_value: args.max_value as usize,
        max_key: 64 << 10,
    };
    let config = KvConfig {
        listen: SocketAddr::new(args.bind, args.port),
        mode,
        workers: args.workers,
        pool: args.pool as usize,
        swap: args.swap,
        swap_size: args.swap_size,
        store,
        usm: usm_kv::UsmKnobs {
            evict: args.evict,
            access_sampling: args.access_sampling.map(|s| matches!(s, Switch::On)),
            watermarks: args.watermarks,
        },
        concurrent: args.concurrent,
    };
    // Block the stop signals before any thread exists (they inherit the mask), so only
    // the `wait` below receives them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()?;
    let running = usm_kv::start(&config)?;
    let mode_name = match mode {
        Mode::Usm => "usm",
        Mode::Kernel => "kernel",
    };
    println!("usm-kv listening on {} (mode {mode_name})", running.addr);
    std::io::stdout().flush()?;
    let sig = stop.wait()?;
    eprintln!("usm-kv: {sig}, stopping");
    running.stop();
    Ok(())
}
