//! Serving one connection with its requests executed concurrently, replies in order (USM
//! mode, opt-in: `usm-kv --concurrent`, [`crate::KvConfig::concurrent`]). On a loaded
//! 2-vCPU machine it cost more CPU per request than it saved in waiting (a uThread, a
//! channel slot and a join per GET) and fell behind at 20 000 req/s where the one-by-one
//! server kept up (bench/results/kv.md, run 5), so it is not the default.
//!
//! [`crate::server::Server::serve`] answers a connection's requests one after the other:
//! a GET of a hot key queued behind a GET whose value is in swap waits out that swap-in,
//! and the connection reads nothing meanwhile. Here each connection has two uThreads:
//!
//! - the **reader** (the connection's uThread) reads and parses; each GET, MGET or EXISTS
//!   runs on **its own uThread** (a swap-in parks only that request), PING/ECHO are
//!   answered at once, and every other command (SET, DEL, FLUSHALL, INFO, ...) is a
//!   *barrier*: the reader waits until the reads it started have finished, runs it itself,
//!   and only then starts later requests. So every command sees exactly the effects of
//!   the commands before it on the connection, as when they run one by one.
//! - the **writer** takes the replies in request order from a bounded channel (a reply
//!   still being computed is joined), gathers those already done and sends them in one
//!   write.
//!
//! The channel bounds the requests in flight per connection ([`IN_FLIGHT`]; a full one
//! parks the reader, so a client that never reads stops being read). A protocol error
//! or QUIT queues its reply last and ends the reader; the writer sends everything queued,
//! then the connection closes (both handles dropped). A write error ends the writer;
//! the reader then finds the channel closed and ends.

use std::sync::Arc;

use usm_runtime::embedded::sync::{Condvar, Mutex, Receiver, channel};
use usm_runtime::embedded::{JoinHandle, NetError, TcpStream};

use crate::resp::{Parsed, Reply, parse};
use crate::server::Server;
use crate::store::Memory;

/// Requests queued or running per connection before the reader stops reading.
pub const IN_FLIGHT: usize = 256;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;
/// The writer sends once this much is gathered.
const WRITE_AT: usize = 256 << 10;

/// A reply in request order.
enum Slot {
    /// Already computed (barrier commands, PING, errors).
    Ready(Vec<u8>),
    /// Computed by its own uThread.
    Running(JoinHandle<Vec<u8>>),
}

/// Spawns a uThread that computes one reply.
pub type SpawnReply<'a> =
    &'a dyn Fn(Box<dyn FnOnce() -> Vec<u8> + Send>) -> Option<JoinHandle<Vec<u8>>>;
/// Spawns the writer uThread.
pub type SpawnTask<'a> = &'a dyn Fn(Box<dyn FnOnce() + Send>) -> Option<JoinHandle<()>>;

/// Reads still running on a connection (the barrier waits for zero).
#[derive(Default)]
struct Running {
    count: Mutex<usize>,
    zero: Condvar,
}

/// Decrements [`Running`] when a read's uThread ends (also by unwinding).
struct RunningGuard(Arc<Running>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock();
        *n -= 1;
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

/// May run concurrently with other reads of its connection.
fn is_read(cmd: &[u8]) -> bool {
    [b"GET".as_slice(), b"MGET", b"EXISTS"]
        .iter()
        .any(|c| cmd.eq_ignore_ascii_case(c))
}

/// Touches no data: answered at once, no barrier.
fn is_stateless(cmd: &[u8]) -> bool {
    cmd.eq_ignore_ascii_case(b"PING") || cmd.eq_ignore_ascii_case(b"ECHO")
}

/// Serves `conn` until the client quits or goes away, or breaks the protocol (module
/// docs). Runs on the connection's uThread; `spawn_reply` and `spawn_task` start uThreads
/// on the same runtime. I/O errors end the connection and are returned.
pub fn serve_concurrent<M: Memory + Sync>(
    server: &Arc<Server<M>>,
    conn: TcpStream,
    spawn_reply: SpawnReply<'_>,
    spawn_task: SpawnTask<'_>,
) -> Result<(), NetError> {
    server.counted(|| serve_inner(server, conn, spawn_reply, spawn_task))
}

fn serve_inner<M: Memory + Sync>(
    server: &Arc<Server<M>>,
    mut conn: TcpStream,
    spawn_reply: SpawnReply<'_>,
    spawn_task: SpawnTask<'_>,
) -> Result<(), NetError> {
    let mut out = conn.try_clone()?;
    let (tx, rx) = channel::<Slot>(IN_FLIGHT);
    let writer = spawn_task(Box::new(move || {
        if let Err(e) = write_replies(&rx, &mut out) {
            tracing::debug!(error = %e, "connection's writer ended");
        }
    }))
    .ok_or(NetError::Closed { op: "spawn" })?;
    let running = Arc::new(Running::default());
    let (limits, max_request) = server.limits();
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    let result = 'conn: loop {
        let mut pos = 0;
        loop {
            match parse(&input[pos..], limits) {
                Parsed::Incomplete => break,
                Parsed::Command { args, used } => {
                    let base = pos;
                    pos += used;
                    if args.is_empty() {
                        continue;
                    }
                    let cmd = &input[base + args[0].start..base + args[0].end];
                    let slot = if is_read(cmd) {
                        // Its own copy of the request: the input buffer moves on.
                        let bytes = input[base..base + used].to_vec();
                        let server = server.clone();
                        *running.count.lock() += 1;
                        let guard = RunningGuard(running.clone());
                        let spawned = spawn_reply(Box::new(move || {
                            let _guard = guard;
                            let argv: Vec<&[u8]> = args.iter().map(|r| &bytes[r.clone()]).collect();
                            let mut reply = Reply::default();
                            server.execute_one(&argv, &mut reply);
                            reply.out
                        }));
                        match spawned {
                            Some(h) => Slot::Running(h),
                            None => break 'conn Ok(()), // shutting down
                        }
                    } else {
                        if !is_stateless(cmd) {
                            let n = running.count.lock();
                            drop(running.zero.wait_while(n, |n| *n > 0));
                        }
                        let argv: Vec<&[u8]> = args
                            .iter()
                            .map(|r| &input[base + r.start..base + r.end])
                            .collect();
                        let mut reply = Reply::default();
                        let quit = server.execute_one(&argv, &mut reply);
                        if quit {
                            let _ = tx.send(Slot::Ready(reply.out));
                            break 'conn Ok(());
                        }
                        Slot::Ready(reply.out)
                    };
                    if tx.send(slot).is_err() {
                        break 'conn Ok(()); // the writer is gone (client vanished)
                    }
                }
                Parsed::Error(msg) => {
                    server.protocol_error();
                    let mut reply = Reply::default();
                    reply.error(&format!("ERR {msg}"));
                    let _ = tx.send(Slot::Ready(reply.out));
                    break 'conn Ok(());
                }
            }
        }
        input.drain(..pos);
        if input.len() > max_request {
            server.protocol_error();
            let mut reply = Reply::default();
            reply.error("ERR Protocol error: request too large");
            let _ = tx.send(Slot::Ready(reply.out));
            break Ok(());
        }
        match conn.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e),
        }
    };
    // Closing the channel lets the writer send what is queued and end.
    drop(tx);
    let _ = writer.join();
    result
}

/// The writer uThread: replies in order, joined when still running, sent in batches.
fn write_replies(rx: &Receiver<Slot>, out: &mut TcpStream) -> Result<(), NetError> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let take = |slot: Slot, buf: &mut Vec<u8>| match slot {
        Slot::Ready(bytes) => buf.extend_from_slice(&bytes),
        Slot::Running(h) => match h.join() {
            Ok(bytes) => buf.extend_from_slice(&bytes),
            // A request's uThread that panicked: the client gets an error in its place.
            Err(e) => buf.extend_from_slice(format!("-ERR internal error: {e}\r\n").as_bytes()),
        },
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(slot) = next.take() {
            // What is gathered goes out before waiting for a reply still being computed.
            if let Slot::Running(h) = &slot
                && !h.is_finished()
                && !buf.is_empty()
            {
                out.write_all(&buf)?;
                buf.clear();
            }
            take(slot, &mut buf);
            if buf.len() >= WRITE_AT {
                out.write_all(&buf)?;
                buf.clear();
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    Ok(())
}
