//! Serving one connection: read, parse every complete command, execute, write the replies
//! (pipelining: all replies to one batch of input go out in one write).
//!
//! The same code serves both modes: in USM mode the stream is a
//! `usm_runtime::embedded::TcpStream` on a uThread (a read, a write or a fault on a
//! swapped-out value parks only this connection), in kernel mode a `std::net::TcpStream` on
//! an OS thread.
//!
//! # Bad input
//! A protocol error or a declared size over the limits gets `-ERR ...` and the connection
//! is closed (the rest of the stream cannot be trusted). A wrong command, a wrong number of
//! arguments or an unsupported option gets `-ERR ...` and the connection goes on. A client
//! that vanishes mid-request ends its connection only.

use std::io::{Read, Write};
use std::time::Instant;
use usm_sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::latency::Latency;
use crate::resp::{Limits, Parsed, Reply, parse};
use crate::store::{Memory, Refused, Store};

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// Replies are written out once this much is queued, even mid-batch.
const FLUSH_AT: usize = 256 << 10;

/// Extra `INFO` text (the USM runtime's counters in USM mode).
pub type InfoFn = Box<dyn Fn() -> String + Send + Sync>;

/// A server: the store, limits and counters shared by every connection.
pub struct Server<M: Memory> {
    store: Store<M>,
    limits: Limits,
    max_request: usize,
    mode: &'static str,
    info: InfoFn,
    started: Instant,
    connections: AtomicUsize,
    connections_total: AtomicU64,
    commands: AtomicU64,
    protocol_errors: AtomicU64,
    latency: Latency,
}

impl<M: Memory> std::fmt::Debug for Server<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

enum Flow {
    Go,
    Quit,
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

impl<M: Memory> Server<M> {
    /// A server over `store`; `mode` is reported by `INFO`, `info` appends to it.
    pub fn new(store: Store<M>, mode: &'static str, info: InfoFn) -> Server<M> {
        let c = *store.config();
        let limits = Limits {
            max_bulk: c.max_value.max(c.max_key),
            ..Limits::default()
        };
        Server {
            store,
            limits,
            max_request: 4 * limits.max_bulk + (1 << 20),
            mode,
            info,
            started: Instant::now(),
            connections: AtomicUsize::new(0),
            connections_total: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            latency: Latency::new(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store<M> {
        &self.store
    }

    /// Counts a connection for `INFO` while `f` serves it.
    pub(crate) fn counted<T>(&self, f: impl FnOnce() -> T) -> T {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        let r = f();
        self.connections.fetch_sub(1, Ordering::Relaxed);
        r
    }

    /// The parser's limits and the largest request kept in memory.
    pub(crate) fn limits(&self) -> (&Limits, usize) {
        (&self.limits, self.max_request)
    }

    /// Counts a protocol error for `INFO`.
    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Executes one command into `reply`; `true` when the client asked to quit.
    pub(crate) fn execute_one(&self, args: &[&[u8]], reply: &mut Reply) -> bool {
        self.commands.fetch_add(1, Ordering::Relaxed);
        matches!(self.execute(args, reply), Flow::Quit)
    }

    /// Serves `stream` until the client quits or goes away, or breaks the protocol. I/O
    /// errors end the connection and are returned (the caller only logs them).
    pub fn serve<S: Read + Write>(&self, stream: &mut S) -> std::io::Result<()> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        let r = self.serve_inner(stream);
        self.connections.fetch_sub(1, Ordering::Relaxed);
        r
    }

    fn serve_inner<S: Read + Write>(&self, stream: &mut S) -> std::io::Result<()> {
        let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut reply = Reply::default();
        loop {
            let mut pos = 0;
            let mut quit = false;
            loop {
                match parse(&input[pos..], &self.limits) {
                    Parsed::Incomplete => break,
                    Parsed::Command { args, used } => {
                        let base = pos;
                        pos += used;
                        if args.is_empty() {
                            continue;
                        }
                        let args: Vec<&[u8]> = args
                            .into_iter()
                            .map(|r| &input[base + r.start..base + r.end])
                            .collect();
                        self.commands.fetch_add(1, Ordering::Relaxed);
                        if let Flow::Quit = self.execute(&args, &mut reply) {
                            quit = true;
                            break;
                        }
                        if reply.out.len() >= FLUSH_AT {
                            stream.write_all(&reply.out)?;
                            reply.out.clear();
                        }
                    }
                    Parsed::Error(msg) => {
                        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        reply.error(&format!("ERR {msg}"));
                        stream.write_all(&reply.out)?;
                        return Ok(());
                    }
                }
            }
            input.drain(..pos);
            if !reply.out.is_empty() {
                stream.write_all(&reply.out)?;
                reply.out.clear();
            }
            if quit {
                return Ok(());
            }
            if input.len() > self.max_request {
                self.protocol_errors.fetch_add(1, Ordering::Relaxed);
                reply.error("ERR Protocol error: request too large");
                stream.write_all(&reply.out)?;
                return Ok(());
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            input.extend_from_slice(&chunk[..n]);
        }
    }

    fn refused(reply: &mut Reply, r: Refused) {
        match r {
            Refused::TooLarge => reply.error("ERR key or value too large"),
            Refused::OutOfMemory => reply.error("OOM data memory of this shard is full"),
            Refused::IndexFull => reply.error("OOM index of this shard is full"),
        }
    }

    /// Executes one command, timing the data commands for `INFO` ([`crate::latency`]).
    fn execute(&self, args: &[&[u8]], reply: &mut Reply) -> Flow {
        let Some(slot) = Latency::slot(args[0]) else {
            return self.dispatch(args, reply);
        };
        let started = Instant::now();
        let flow = self.dispatch(args, reply);
        self.latency.record(slot, started.elapsed());
        flow
    }

    fn dispatch(&self, args: &[&[u8]], reply: &mut Reply) -> Flow {
        let cmd = args[0];
        let arity = |ok: bool, reply: &mut Reply| {
            if !ok {
                reply.error(&format!(
                    "ERR wrong number of arguments for '{}' command",
                    String::from_utf8_lossy(cmd).to_lowercase()
                ));
            }
            ok
        };
        if eq(cmd, "GET") {
            if arity(args.len() == 2, reply)
                && !self.store.get_into(args[1], &mut |v| reply.bulk(v))
            {
                reply.nil();
            }
        } else if eq(cmd, "SET") {
            if arity(args.len() >= 3, reply) {
                let mut only = None;
                for opt in &args[3..] {
                    if eq(opt, "NX") {
                        only = Some(true);
                    } else if eq(opt, "XX") {
                        only = Some(false);
                    } else {
                        reply.error("ERR syntax error (usm-kv supports SET key value [NX|XX])");
                        return Flow::Go;
                    }
                }
                match self.store.set(args[1], args[2], only) {
                    Ok(true) => reply.simple("OK"),
                    Ok(false) => reply.nil(),
                    Err(r) => Self::refused(reply, r),
                }
            }
        } else if eq(cmd, "MSET") {
            if arity(args.len() >= 3 && args.len() % 2 == 1, reply) {
                for pair in args[1..].chunks(2) {
                    if let Err(r) = self.store.set(pair[0], pair[1], None) {
                        Self::refused(reply, r);
                        return Flow::Go;
                    }
                }
                reply.simple("OK");
            }
        } else if eq(cmd, "DEL") || eq(cmd, "UNLINK") {
            if arity(args.len() >= 2, reply) {
                let n = args[1..].iter().filter(|k| self.store.del(k)).count();
                reply.int(n as i64);
            }
        } else if eq(cmd, "MGET") {
            if arity(args.len() >= 2, reply) {
                reply.array(args.len() - 1);
                for k in &args[1..] {
                    if !self.store.get_into(k, &mut |v| reply.bulk(v)) {
                        reply.nil();
                    }
                }
            }
        } else if eq(cmd, "EXISTS") {
            if arity(args.len() >= 2, reply) {
                let n = args[1..].iter().filter(|k| self.store.exists(k)).count();
                reply.int(n as i64);
            }
        } else if eq(cmd, "PING") {
            match args.len() {
                1 => reply.simple("PONG"),
                2 => reply.bulk(args[1]),
                _ => {
                    arity(false, reply);
                }
            }
        } else if eq(cmd, "ECHO") {
            if arity(args.len() == 2, reply) {
                reply.bulk(args[1]);
            }
        } else if eq(cmd, "DBSIZE") {
            if arity(args.len() == 1, reply) {
                reply.int(self.store.len() as i64);
            }
        } else if eq(cmd, "FLUSHALL") || eq(cmd, "FLUSHDB") {
            match self.store.flush() {
                Ok(()) => reply.simple("OK"),
                Err(e) => reply.error(&format!("ERR flush failed: {e}")),
            }
        } else if eq(cmd, "DIGEST")
            || (eq(cmd, "DEBUG") && args.len() == 2 && eq(args[1], "DIGEST"))
        {
            reply.bulk(format!("{:032x}", self.store.digest()).as_bytes());
        } else if eq(cmd, "INFO") {
            reply.bulk(self.info_text().as_bytes());
        } else if eq(cmd, "SELECT") {
            if arity(args.len() == 2, reply) {
                if args[1] == b"0" {
                    reply.simple("OK");
                } else {
                    reply.error("ERR DB index is out of range");
                }
            }
        } else if eq(cmd, "CONFIG") {
            // redis-benchmark asks `CONFIG GET save` and `CONFIG GET appendonly`.
            if args.len() == 2 && eq(args[1], "RESETSTAT") {
                self.reset_stats();
                reply.simple("OK");
            } else if args.len() == 3
                && eq(args[1], "GET")
                && (eq(args[2], "save") || eq(args[2], "appendonly"))
            {
                reply.array(2);
                reply.bulk(args[2]);
                reply.bulk(if eq(args[2], "save") { b"" } else { b"no" });
            } else {
                reply.array(0);
            }
        } else if eq(cmd, "COMMAND") {
            // redis-cli asks COMMAND DOCS for hints; none.
            reply.array(0);
        } else if eq(cmd, "CLIENT") {
            reply.simple("OK");
        } else if eq(cmd, "QUIT") {
            reply.simple("OK");
            return Flow::Quit;
        } else {
            reply.error(&format!(
                "ERR unknown command '{}'",
                String::from_utf8_lossy(&cmd[..cmd.len().min(64)])
            ));
        }
        Flow::Go
    }

    /// `CONFIG RESETSTAT`: clears what redis clears — commands and connections counted,
    /// protocol errors, command latencies (not the USM runtime's counters).
    fn reset_stats(&self) {
        self.connections_total.store(0, Ordering::Relaxed);
        self.commands.store(0, Ordering::Relaxed);
        self.protocol_errors.store(0, Ordering::Relaxed);
        self.latency.reset();
    }

    fn info_text(&self) -> String {
        let s = self.store.stats();
        let mut t = String::new();
        t.push_str("# Server\r\nredis_version:7.0.0\r\n");
        t.push_str(&format!("usm_kv_version:{}\r\n", env!("CARGO_PKG_VERSION")));
        t.push_str(&format!("usm_kv_mode:{}\r\n", self.mode));
        t.push_str(&format!("process_id:{}\r\n", std::process::id()));
        t.push_str(&format!(
            "uptime_in_seconds:{}\r\n",
            self.started.elapsed().as_secs()
        ));
        t.push_str("\r\n# Clients\r\n");
        t.push_str(&format!(
            "connected_clients:{}\r\n",
            self.connections.load(Ordering::Relaxed)
        ));
        t.push_str("\r\n# Memory\r\n");
        t.push_str(&format!("used_memory:{}\r\n", s.bytes_used));
        t.push_str(&format!("slab_bytes_carved:{}\r\n", s.bytes_carved));
        t.push_str("\r\n# Stats\r\n");
        t.push_str(&format!(
            "total_connections_received:{}\r\n",
            self.connections_total.load(Ordering::Relaxed)
        ));
        t.push_str(&format!(
            "total_commands_processed:{}\r\n",
            self.commands.load(Ordering::Relaxed)
        ));
        t.push_str(&format!(
            "protocol_errors:{}\r\n",
            self.protocol_errors.load(Ordering::Relaxed)
        ));
        t.push_str("\r\n");
        t.push_str(&self.latency.info());
        let extra = (self.info)();
        if !extra.is_empty() {
            t.push_str("\r\n");
            t.push_str(&extra);
        }
        t.push_str("\r\n# Keyspace\r\n");
        if s.keys > 0 {
            t.push_str(&format!("db0:keys={},expires=0,avg_ttl=0\r\n", s.keys));
        }
        t
    }
}
