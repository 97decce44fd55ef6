//! An open-loop load generator for key-value servers (RESP: usm-kv, redis; memcached's
//! text protocol), issue 13 benchmark 3.
//!
//! # Open loop, no coordinated omission
//! Arrivals are a Poisson process at the offered rate: the gap to the next request is
//! drawn from an exponential distribution, *independent of the server*. When a request's
//! scheduled time comes it is queued on the next connection (round robin) at once, even if
//! that connection still waits for earlier replies (pipelining); replies come back in order
//! per connection and each is matched with its request's **scheduled** send time. A server
//! that stalls therefore shows its full queueing delay in the latency, which a closed-loop
//! client (wait for the reply, then send) would hide.
//!
//! Requests still unanswered when the drain period ends are counted as `lost` and recorded
//! with the latency they had reached by then (a lower bound), never dropped silently.
//!
//! # Keys, values, mix
//! Keys `key:NNNNNNNNNNNN` from 0..keys, drawn uniformly or Zipf(s) by rank; ranks are
//! scattered over the key space by a fixed bijection so the hot set is not one contiguous
//! run. GET/SET mix by probability; SETs write `value_size` bytes. [`preload`] first SETs
//! every key once (pipelined, closed loop) so GETs hit.
//!
//! # Threads
//! `threads` generator threads, each owning `connections / threads` non-blocking
//! connections and `rate / threads` of the arrivals, driven by `ppoll` with a timeout up to
//! the next arrival.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;
use serde::Serialize;

/// What can go wrong generating load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Talking to the server failed (connect, send, receive, protocol).
    #[error("load generator: {0}")]
    Workload(String),
}

use LoadError as Error;
type Result<T> = std::result::Result<T, LoadError>;

/// The wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// RESP (usm-kv, redis-server).
    Resp,
    /// memcached's text protocol.
    Memcached,
}

/// How keys are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum KeyDist {
    /// Every key equally likely.
    Uniform,
    /// Zipf with exponent `s` over ranks (rank 1 most popular).
    Zipf(f64),
}

impl std::str::FromStr for KeyDist {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "uniform" {
            return Ok(KeyDist::Uniform);
        }
        match s.strip_prefix("zipf:").map(str::parse::<f64>) {
            Some(Ok(x)) if x > 0.0 => Ok(KeyDist::Zipf(x)),
            _ => Err(format!("key distribution {s:?}: uniform or zipf:S (S > 0)")),
        }
    }
}

/// One load point's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSpec {
    /// Server address.
    pub addr: SocketAddr,
    /// Wire protocol.
    pub protocol: Protocol,
    /// Offered load, requests per second.
    pub rate: f64,
    /// Connections.
    pub connections: usize,
    /// Generator threads.
    pub threads: usize,
    /// Keys.
    pub keys: u64,
    /// Key distribution.
    pub dist: KeyDist,
    /// Value bytes of SETs.
    pub value_size: usize,
    /// Probability of a GET (else SET).
    pub get_ratio: f64,
    /// Arrivals not measured at the start.
    pub warmup: Duration,
    /// Measured arrivals.
    pub duration: Duration,
    /// How long to wait for outstanding replies after the last arrival.
    pub drain: Duration,
    /// Seed of the arrival/key/mix generator.
    pub seed: u64,
    /// Requests for keys of popularity rank below this are "hot" and get their own
    /// percentiles (0: no split). With the hot set sized to fit the budget, hot requests
    /// are the ones that should find their data resident.
    pub hot_ranks: u64,
}

/// The outcome of one load point.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// Offered requests per second.
    pub offered_rps: f64,
    /// Replies received during the measurement window, per second.
    pub achieved_rps: f64,
    /// Requests scheduled in the measurement window.
    pub scheduled: u64,
    /// Of those, answered.
    pub completed: u64,
    /// Of those, unanswered at the end of the drain (recorded with the latency reached).
    pub lost: u64,
    /// Error replies.
    pub errors: u64,
    /// GETs that found no value (or one of the wrong length).
    pub misses: u64,
    /// Latency percentiles from the scheduled send time, microseconds.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Share of measured requests that were hot (`hot_ranks`).
    pub hot_share: f64,
    /// p99 of hot requests, microseconds (0 without a split).
    pub hot_p99_us: f64,
    /// p99 of the other requests, microseconds (0 without a split).
    pub cold_p99_us: f64,
}

/// xorshift64* — small, fast, good enough for arrivals and key draws.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// Draws key ids (see the module docs).
#[derive(Debug, Clone)]
pub struct KeyPicker {
    keys: u64,
    cdf: Option<Vec<f64>>,
    mult: u64,
}

impl KeyPicker {
    /// A picker over `keys` keys.
    pub fn new(keys: u64, dist: KeyDist) -> KeyPicker {
        let cdf = match dist {
            KeyDist::Uniform => None,
            KeyDist::Zipf(s) => {
                let mut acc = 0.0;
                let mut v: Vec<f64> = (1..=keys)
                    .map(|r| {
                        acc += 1.0 / (r as f64).powf(s);
                        acc
                    })
                    .collect();
                for x in &mut v {
                    *x /= acc;
                }
                Some(v)
            }
        };
        // An odd multiplier coprime with `keys` scatters ranks over ids bijectively.
        let mut mult = 0x9E37_79B9u64 | 1;
        while gcd(mult, keys) != 1 {
            mult += 2;
        }
        KeyPicker { keys, cdf, mult }
    }

    /// A key id and its popularity rank (0 = most popular).
    fn pick(&self, rng: &mut Rng) -> (u64, u64) {
        let rank = match &self.cdf {
            None => rng.next_u64() % self.keys,
            Some(cdf) => {
                let u = rng.unit();
                (cdf.partition_point(|&c| c < u) as u64).min(self.keys - 1)
            }
        };
        (
            ((rank as u128 * self.mult as u128) % self.keys as u128) as u64,
            rank,
        )
    }

    /// The id of the key of popularity rank `rank` (0 = most popular).
    pub fn id_of_rank(&self, rank: u64) -> u64 {
        ((rank as u128 * self.mult as u128) % self.keys as u128) as u64
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The key of id `id`.
pub fn key_name(id: u64) -> String {
    format!("key:{id:012}")
}

/// The value stored under key `id` (its first bytes name the key, so a misplaced value
/// would be noticed by a content check).
pub fn value_for(id: u64, size: usize) -> Vec<u8> {
    let mut v = format!("{id:016}").into_bytes();
    v.resize(size.max(16), b'v');
    v.truncate(size);
    v
}

fn encode_get(p: Protocol, key: &str, out: &mut Vec<u8>) {
    match p {
        Protocol::Resp => out.extend_from_slice(
            format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes(),
        ),
        Protocol::Memcached => out.extend_from_slice(format!("get {key}\r\n").as_bytes()),
    }
}

fn encode_set(p: Protocol, key: &str, value: &[u8], out: &mut Vec<u8>) {
    match p {
        Protocol::Resp => out.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                value.len()
            )
            .as_bytes(),
        ),
        Protocol::Memcached => {
            out.extend_from_slice(format!("set {key} 0 0 {}\r\n", value.len()).as_bytes())
        }
    }
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One parsed reply.
#[derive(Debug, PartialEq, Eq)]
enum ReplyKind {
    Ok,
    Value(usize),
    Miss,
    Error,
}

fn line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Parses one reply at the start of `buf`: `(kind, bytes used)`, or `None` if incomplete.
fn parse_reply(p: Protocol, buf: &[u8]) -> Option<(ReplyKind, usize)> {
    let eol = line(buf)?;
    let head = &buf[..eol];
    match p {
        Protocol::Resp => match head.first()? {
            b'+' | b':' => Some((ReplyKind::Ok, eol + 2)),
            b'-' => Some((ReplyKind::Error, eol + 2)),
            b'$' => {
                let n: i64 = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
                if n < 0 {
                    return Some((ReplyKind::Miss, eol + 2));
                }
                let end = eol + 2 + n as usize + 2;
                (buf.len() >= end).then_some((ReplyKind::Value(n as usize), end))
            }
            _ => Some((ReplyKind::Error, eol + 2)),
        },
        Protocol::Memcached => {
            if head == b"STORED" {
                Some((ReplyKind::Ok, eol + 2))
            } else if head == b"END" {
                Some((ReplyKind::Miss, eol + 2))
            } else if let Some(rest) = head.strip_prefix(b"VALUE ") {
                let n: usize = std::str::from_utf8(rest)
                    .ok()?
                    .split(' ')
                    .nth(2)?
                    .parse()
                    .ok()?;
                let end = eol + 2 + n + 2 + 5; // data CRLF "END\r\n"
                (buf.len() >= end).then_some((ReplyKind::Value(n), end))
            } else {
                Some((ReplyKind::Error, eol + 2))
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    out_pos: usize,
    input: Vec<u8>,
    in_pos: usize,
    /// Requests sent and not answered yet, oldest first: scheduled time, GET, hot.
    inflight: VecDeque<(Instant, bool, bool)>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .map_err(|e| Error::Workload(format!("connect {addr}: {e}")))?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_nonblocking(true))
            .map_err(|e| Error::Workload(format!("socket options: {e}")))?;
        Ok(Conn {
            stream,
            out: Vec::new(),
            out_pos: 0,
            input: Vec::with_capacity(64 << 10),
            in_pos: 0,
            inflight: VecDeque::new(),
        })
    }

    fn flush(&mut self) -> Result<()> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(Error::Workload("server closed the connection".into())),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Workload(format!("send: {e}"))),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Reads what is there; `Ok(false)` at end of stream.
    fn fill(&mut self) -> Result<bool> {
        if self.in_pos > 0 && self.in_pos == self.input.len() {
            self.input.clear();
            self.in_pos = 0;
        } else if self.in_pos > (1 << 20) {
            self.input.drain(..self.in_pos);
            self.in_pos = 0;
        }
        let mut chunk = [0u8; 64 << 10];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Workload(format!("recv: {e}"))),
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    scheduled: u64,
    completed: u64,
    completed_in_window: u64,
    lost: u64,
    errors: u64,
    misses: u64,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 100 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

type Histograms = (Histogram<u64>, Histogram<u64>, Histogram<u64>);

fn generator(
    spec: &LoadSpec,
    index: usize,
    start: Instant,
    picker: &KeyPicker,
) -> Result<(Histograms, Tally)> {
    let conns_here =
        spec.connections / spec.threads + usize::from(index < spec.connections % spec.threads);
    let mut conns = (0..conns_here.max(1))
        .map(|_| Conn::open(spec.addr))
        .collect::<Result<Vec<_>>>()?;
    let rate = spec.rate / spec.threads as f64;
    let mut rng = Rng::new(spec.seed ^ (index as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let window_start = start + spec.warmup;
    let window_end = window_start + spec.duration;
    let drain_end = window_end + spec.drain;
    let mut hist = new_histogram();
    let mut hot_hist = new_histogram();
    let mut cold_hist = new_histogram();
    let mut tally = Tally::default();
    let mut next = start + Duration::from_secs_f64(-rng.unit().ln() / rate);
    let mut rr = 0usize;
    let value = value_for(0, spec.value_size);
    let mut fds_events = Vec::with_capacity(conns.len());
    loop {
        let now = Instant::now();
        // Issue every request whose time has come.
        while next <= now && next < window_end {
            let n = conns.len();
            let c = &mut conns[rr % n];
            rr += 1;
            let (id, rank) = picker.pick(&mut rng);
            let key = key_name(id);
            let get = rng.unit() <= spec.get_ratio;
            if get {
                encode_get(spec.protocol, &key, &mut c.out);
            } else {
                encode_set(spec.protocol, &key, &value, &mut c.out);
            }
            c.inflight.push_back((next, get, rank < spec.hot_ranks));
            if next >= window_start {
                tally.scheduled += 1;
            }
            next += Duration::from_secs_f64(-rng.unit().ln() / rate);
        }
        for c in conns.iter_mut() {
            if !c.out.is_empty() {
                c.flush()?;
            }
        }
        let pending: usize = conns.iter().map(|c| c.inflight.len()).sum();
        if now >= window_end && (pending == 0 || now >= drain_end) {
            break;
        }
        // Wait for replies, or the next arrival.
        let until = if next < window_end { next } else { drain_end };
        let wait = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(5));
        fds_events.clear();
        fds_events.extend(conns.iter().map(|c| {
            let mut ev = PollFlags::POLLIN;
            if !c.out.is_empty() {
                ev |= PollFlags::POLLOUT;
            }
            ev
        }));
        let mut fds: Vec<PollFd<'_>> = conns
            .iter()
            .zip(&fds_events)
            .map(|(c, ev)| PollFd::new(c.stream.as_fd(), *ev))
            .collect();
        match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(Error::Workload(format!("ppoll: {e}"))),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let now = Instant::now();
        for (c, ready) in conns.iter_mut().zip(ready) {
            if !ready {
                continue;
            }
            if !c.out.is_empty() {
                c.flush()?;
            }
            let open = c.fill()?;
            while let Some((kind, used)) = parse_reply(spec.protocol, &c.input[c.in_pos..]) {
                c.in_pos += used;
                let Some((scheduled, get, hot)) = c.inflight.pop_front() else {
                    return Err(Error::Workload("a reply to no request".into()));
                };
                match kind {
                    ReplyKind::Error => tally.errors += 1,
                    ReplyKind::Miss if get => tally.misses += 1,
                    ReplyKind::Value(n) if n != spec.value_size => tally.misses += 1,
                    _ => {}
                }
                if scheduled >= window_start && scheduled < window_end {
                    tally.completed += 1;
                    let ns = now.saturating_duration_since(scheduled).as_nanos() as u64;
                    let _ = hist.record(ns.max(1_000));
                    if spec.hot_ranks > 0 {
                        let h = if hot { &mut hot_hist } else { &mut cold_hist };
                        let _ = h.record(ns.max(1_000));
                    }
                }
                if now >= window_start && now < window_end {
                    tally.completed_in_window += 1;
                }
            }
            if !open {
                return Err(Error::Workload("server closed a connection".into()));
            }
        }
    }
    // Whatever is left never came back within the drain.
    let end = Instant::now();
    for c in &conns {
        for &(scheduled, _, hot) in &c.inflight {
            if scheduled >= window_start && scheduled < window_end {
                tally.lost += 1;
                let ns = end.saturating_duration_since(scheduled).as_nanos() as u64;
                let _ = hist.record(ns);
                if spec.hot_ranks > 0 {
                    let h = if hot { &mut hot_hist } else { &mut cold_hist };
                    let _ = h.record(ns);
                }
            }
        }
    }
    Ok(((hist, hot_hist, cold_hist), tally))
}

/// Runs one load point (see the module docs).
pub fn run(spec: &LoadSpec) -> Result<LoadResult> {
    if spec.rate <= 0.0 || spec.connections == 0 || spec.threads == 0 || spec.keys == 0 {
        return Err(Error::Workload(
            "rate, connections, threads and keys must be positive".into(),
        ));
    }
    let picker = KeyPicker::new(spec.keys, spec.dist);
    let start = Instant::now() + Duration::from_millis(50);
    let results: Vec<Result<(Histograms, Tally)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..spec.threads)
            .map(|i| {
                let picker = &picker;
                s.spawn(move || generator(spec, i, start, picker))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Workload("generator panicked".into())))
            })
            .collect()
    });
    let mut hist = new_histogram();
    let mut hot = new_histogram();
    let mut cold = new_histogram();
    let mut t = Tally::default();
    for r in results {
        let ((h, hh, ch), x) = r?;
        let _ = hist.add(&h);
        let _ = hot.add(&hh);
        let _ = cold.add(&ch);
        t.scheduled += x.scheduled;
        t.completed += x.completed;
        t.completed_in_window += x.completed_in_window;
        t.lost += x.lost;
        t.errors += x.errors;
        t.misses += x.misses;
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadResult {
        offered_rps: spec.rate,
        achieved_rps: t.completed_in_window as f64 / spec.duration.as_secs_f64(),
        scheduled: t.scheduled,
        completed: t.completed,
        lost: t.lost,
        errors: t.errors,
        misses: t.misses,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1000.0,
        mean_us: hist.mean() / 1000.0,
        hot_share: if !hist.is_empty() {
            hot.len() as f64 / hist.len() as f64
        } else {
            0.0
        },
        hot_p99_us: hot.value_at_quantile(0.99) as f64 / 1000.0,
        cold_p99_us: cold.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// SETs every key once (closed loop, `depth` requests in flight per connection over
/// `connections` connections). Returns the number of error replies.
pub fn preload(
    addr: SocketAddr,
    protocol: Protocol,
    keys: u64,
    value_size: usize,
    connections: usize,
) -> Result<u64> {
    let connections = connections.max(1) as u64;
    let errors: Vec<Result<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..connections)
            .map(|c| {
                s.spawn(move || -> Result<u64> {
                    let mut stream = TcpStream::connect(addr)
                        .map_err(|e| Error::Workload(format!("connect {addr}: {e}")))?;
                    let _ = stream.set_nodelay(true);
                    let mut errors = 0;
                    let mut input = Vec::new();
                    let mut chunk = vec![0u8; 64 << 10];
                    let ids: Vec<u64> = (c..keys).step_by(connections as usize).collect();
                    for batch in ids.chunks(64) {
                        let mut out = Vec::new();
                        for &id in batch {
                            encode_set(
                                protocol,
                                &key_name(id),
                                &value_for(id, value_size),
                                &mut out,
                            );
                        }
                        stream
                            .write_all(&out)
                            .map_err(|e| Error::Workload(format!("preload send: {e}")))?;
                        let mut got = 0;
                        let mut pos = 0;
                        while got < batch.len() {
                            if let Some((kind, used)) = parse_reply(protocol, &input[pos..]) {
                                pos += used;
                                got += 1;
                                if kind != ReplyKind::Ok {
                                    errors += 1;
                                }
                                continue;
                            }
                            let n = stream
                                .read(&mut chunk)
                                .map_err(|e| Error::Workload(format!("preload recv: {e}")))?;
                            if n == 0 {
                                return Err(Error::Workload("server closed during preload".into()));
                            }
                            input.extend_from_slice(&chunk[..n]);
                        }
                        input.drain(..pos);
                    }
                    Ok(errors)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Workload("preload panicked".into())))
            })
            .collect()
    });
    errors.into_iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_incrementally() {
        let r = b"$5\r\nhello\r\n";
        for cut in 0..r.len() {
            assert_eq!(parse_reply(Protocol::Resp, &r[..cut]), None, "{cut}");
        }
        assert_eq!(
            parse_reply(Protocol::Resp, r),
            Some((ReplyKind::Value(5), r.len()))
        );
        assert_eq!(
            parse_reply(Protocol::Resp, b"$-1\r\n"),
            Some((ReplyKind::Miss, 5))
        );
        assert_eq!(
            parse_reply(Protocol::Resp, b"-ERR x\r\n"),
            Some((ReplyKind::Error, 8))
        );
        let m = b"VALUE key:1 0 3\r\nabc\r\nEND\r\n";
        assert_eq!(parse_reply(Protocol::Memcached, &m[..m.len() - 1]), None);
        assert_eq!(
            parse_reply(Protocol::Memcached, m),
            Some((ReplyKind::Value(3), m.len()))
        );
        assert_eq!(
            parse_reply(Protocol::Memcached, b"STORED\r\n"),
            Some((ReplyKind::Ok, 8))
        );
    }

    #[test]
    fn zipf_is_skewed_and_ids_stay_in_range() {
        let p = KeyPicker::new(1000, KeyDist::Zipf(0.99));
        let mut rng = Rng::new(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[p.pick(&mut rng).0 as usize] += 1;
        }
        let hot = counts[p.id_of_rank(0) as usize];
        let cold = counts[p.id_of_rank(999) as usize];
        assert!(hot > 50 * cold.max(1), "rank 0: {hot}, rank 999: {cold}");
        let u = KeyPicker::new(1000, KeyDist::Uniform);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            seen.insert(u.pick(&mut rng).0);
        }
        assert!(seen.len() > 990 && seen.iter().all(|&k| k < 1000));
    }
}
