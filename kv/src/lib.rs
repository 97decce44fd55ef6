//! `usm-kv`: a Shenango-style key-value server on the USM embedded runtime, speaking
//! enough of the redis protocol for `redis-cli` and `redis-benchmark`.
//!
//! It is built only on `usm-runtime`'s public API and meant as the example embedders copy:
//!
//! - **One uThread per connection** ([`usm_runtime::embedded::Net`]): accept, read and
//!   write park the uThread; the worker serves other connections meanwhile.
//! - **Index and values in managed regions** ([`store`]): a hash index and a slab allocator
//!   per shard, each shard in its own [`usm_runtime::embedded::Region`]s. With a pool
//!   smaller than the data, pages go to swap and come back on access: a request that
//!   touches a swapped-out value parks its uThread during the swap-in while the worker
//!   serves requests on resident data.
//! - **`--kernel`**: the same server code on OS threads (one per connection) with plain
//!   anonymous memory — the baseline showing what the runtime adds (run it in a memory
//!   cgroup with kernel swap for a comparison at the same budget).
//!
//! Commands: GET, SET [NX|XX], MSET, DEL/UNLINK, MGET, EXISTS, PING, ECHO, INFO, DBSIZE,
//! FLUSHALL/FLUSHDB, DIGEST (alias `DEBUG DIGEST`: an order-independent 128-bit digest of
//! the whole dataset, [`store::item_digest`]), SELECT 0, QUIT; `CONFIG` and `COMMAND` reply
//! with empty arrays so the redis tools start cleanly. Bad input: see [`server`].

// The server's runtime handle is shared as std's `Arc`/`Weak` (`usm_sync` has no `Weak`:
// loom's `Arc` has none); this application has no loom model. Atomics use `usm_sync`.
#![allow(clippy::disallowed_types)]
#![forbid(unsafe_code)]
mod latency;
pub mod pipeline;
pub mod resp;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use usm_runtime::embedded::{Region, Runtime};

use crate::server::Server;
use crate::store::{Plain, Store, StoreConfig};

/// Errors of the key-value server.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A bad option.
    #[error("configuration: {0}")]
    Config(String),
    /// The embedded runtime failed (building it, creating a region).
    #[error(transparent)]
    Runtime(#[from] usm_runtime::embedded::EmbeddedError),
    /// Network set-up failed (USM mode).
    #[error(transparent)]
    Net(#[from] usm_runtime::embedded::NetError),
    /// An OS call failed (kernel mode, signals).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Which memory manager serves the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The USM embedded runtime: uThreads, regions, USM swap.
    Usm,
    /// OS threads and plain memory (the kernel's memory manager).
    Kernel,
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// Listen address (port 0: any free port; the chosen one is printed).
    pub listen: SocketAddr,
    /// USM or kernel.
    pub mode: Mode,
    /// Workers (USM mode).
    pub workers: usize,
    /// Pool bytes (USM mode).
    pub pool: usize,
    /// USM swap file: opened if it exists (formatted with `usm mkswap`), else created with
    /// `swap_size` bytes (USM mode).
    pub swap: Option<PathBuf>,
    /// Size of a swap file created at `swap`.
    pub swap_size: u64,
    /// Store sizes.
    pub store: StoreConfig,
    /// USM policy knobs (USM mode).
    pub usm: UsmKnobs,
    /// USM mode: run each connection's reads on their own uThreads, replies in order
    /// ([`pipeline`]); `false` answers a connection's requests one by one
    /// ([`server::Server::serve`], as kernel mode always does).
    pub concurrent: bool,
}

/// Policy knobs of the USM runtime (see `usm_runtime::embedded::Builder`).
#[derive(Debug, Clone, Default)]
pub struct UsmKnobs {
    /// Eviction policy spec (`two-list`, `clock`, `fifo`, `hints`); the runtime's default
    /// (`two-list`) if `None`.
    pub evict: Option<String>,
    /// Re-fault access sampling for the eviction policy; the runtime's default if `None`.
    pub access_sampling: Option<bool>,
    /// Free-frame watermarks (low, high) in frames; derived from the pool if `None`.
    pub watermarks: Option<(usize, usize)>,
}

/// A running server: its address, and how to stop it.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addr", &self.addr).finish()
    }
}

impl Running {
    /// Stops the server: USM mode shuts the runtime down (every connection's uThread is
    /// dropped, closing its socket, and the listener closes); kernel mode closes the
    /// listener (connection threads end with their clients, or with the process).
    pub fn stop(self) {
        (self.stop)()
    }
}

/// Starts the server in the background (see [`Running`]).
pub fn start(config: &KvConfig) -> Result<Running, KvError> {
    match config.mode {
        Mode::Usm => start_usm(config),
        Mode::Kernel => start_kernel(config),
    }
}

fn start_usm(config: &KvConfig) -> Result<Running, KvError> {
    let mut builder = Runtime::builder()
        .workers(config.workers)
        .pool_frames(config.pool.div_ceil(4096));
    if let Some(evict) = &config.usm.evict {
        builder = builder.evict_policy(evict);
    }
    if let Some(on) = config.usm.access_sampling {
        builder = builder.access_sampling(on);
    }
    if let Some((low, high)) = config.usm.watermarks {
        builder = builder.watermarks(low, high);
    }
    if let Some(path) = &config.swap {
        builder = if path.exists() {
            builder.swap_device(path)
        } else {
            builder.create_swap_file(path, config.swap_size)
        };
    }
    let rt = Arc::new(builder.build()?);
    let weak: Weak<Runtime> = Arc::downgrade(&rt);
    let factory_rt = weak.clone();
    let store: Store<Region> = Store::new(
        config.store,
        Box::new(move |bytes| {
            let rt = factory_rt
                .upgrade()
                .ok_or(KvError::Config("the runtime is shut down".into()))?;
            Ok(rt.region(bytes)?)
        }),
    )?;
    let info_rt = weak.clone();
    let server = Arc::new(Server::new(
        store,
        "usm",
        Box::new(move || match info_rt.upgrade() {
            Some(rt) => {
                let s = rt.stats();
                format!(
                    "# USM\r\npool_frames:{}\r\nfaults:{}\r\nswap_ins:{}\r\nevicted:{}\r\nswap_slots_used:{}\r\n\
                     memory_waits:{}\r\nsamples_taken:{}\r\nsample_refaults:{}\r\n\
                     swap_in_p50_us:{:.1}\r\nswap_in_p99_us:{:.1}\r\nfast_map_p99_us:{:.1}\r\n\
                     pool_free:{}\r\npool_staging:{}\r\nio_in_flight:{}\r\nworker_parks:{:?}\r\n",
                    s.pool.total,
                    s.mm.faults,
                    s.mm.swap_ins,
                    s.mm.evicted,
                    s.swap_slots_used,
                    s.mm.memory_waits,
                    s.mm.samples_taken,
                    s.mm.sample_refaults,
                    s.mm.swap_in.p50_ns as f64 / 1e3,
                    s.mm.swap_in.p99_ns as f64 / 1e3,
                    s.mm.fast_map.p99_ns as f64 / 1e3,
                    s.pool.free,
                    s.pool.staging,
                    s.io_in_flight,
                    s.sched.iter().map(|c| c.worker_parks).collect::<Vec<_>>(),
                )
            }
            None => String::new(),
        }),
    ));
    let listener = rt.net().bind(config.listen)?;
    let addr = listener.local_addr()?;
    let handle = rt.handle()?;
    let concurrent = config.concurrent;
    rt.spawn(move || {
        loop {
            match listener.accept() {
                Ok(mut conn) => {
                    let _ = conn.set_nodelay(true);
                    let server = server.clone();
                    let spawner = handle.clone();
                    let spawned = handle.spawn(move || {
                        let r = if concurrent {
                            pipeline::serve_concurrent(
                                &server,
                                conn,
                                &|f| spawner.spawn(f).ok(),
                                &|f| spawner.spawn(f).ok(),
                            )
                            .map_err(std::io::Error::from)
                        } else {
                            server.serve(&mut conn)
                        };
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                    if spawned.is_err() {
                        break; // shutting down
                    }
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "accept");
                    usm_runtime::embedded::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; no more connections");
                    break;
                }
            }
        }
    })?;
    Ok(Running {
        addr,
        stop: Box::new(move || {
            // The store's factory and INFO hold only weak references: this is the last
            // strong one unless a FLUSHALL is creating regions this instant.
            let mut rt = rt;
            for _ in 0..1000 {
                match Arc::try_unwrap(rt) {
                    Ok(rt) => {
                        rt.shutdown(Duration::from_secs(1));
                        return;
                    }
                    Err(again) => {
                        rt = again;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }),
    })
}

fn start_kernel(config: &KvConfig) -> Result<Running, KvError> {
    let store: Store<Plain> = Store::new(config.store, Box::new(|bytes| Ok(Plain::new(bytes))))?;
    let server = Arc::new(Server::new(store, "kernel", Box::new(String::new)));
    let listener = std::net::TcpListener::bind(config.listen).map_err(|source| KvError::Io {
        what: "bind",
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| KvError::Io {
        what: "getsockname",
        source,
    })?;
    let stopping = Arc::new(usm_sync::atomic::AtomicBool::new(false));
    let stop_flag = stopping.clone();
    let acceptor = std::thread::Builder::new()
        .name("usm-kv-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop_flag.load(usm_sync::atomic::Ordering::Acquire) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let server = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("usm-kv-conn".into())
                    .stack_size(256 << 10)
                    .spawn(move || {
                        if let Err(e) = server.serve(&mut conn) {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no thread for a connection; closing it");
                }
            }
        })
        .map_err(|source| KvError::Io {
            what: "spawn the acceptor",
            source,
        })?;
    Ok(Running {
        addr,
        stop: Box::new(move || {
            stopping.store(true, usm_sync::atomic::Ordering::Release);
            // Wake the acceptor with a connection of our own.
            let _ = std::net::TcpStream::connect(addr);
            let _ = acceptor.join();
        }),
    })
}

/// Parses `"64M"`, `"1G"`, `"4096"`, `"512K"` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 4096, 64M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
    }
}
