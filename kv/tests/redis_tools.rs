//! `usm-kv` driven by the real `redis-cli` and `redis-benchmark` (Debian `redis-tools`) on
//! loopback, in USM mode (small pool, USM swap file on ext4) and in `--kernel` mode: the
//! commands, a dataset larger than the pool with every value verified, bad input, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use usm_kv::store::item_digest;

struct Kv {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Kv {
    /// Starts `usm-kv --port 0 ARGS` (USM mode gets a swap file in a fresh directory
    /// under /var/tmp unless `kernel`) and waits for its "listening" line.
    fn start(kernel: bool, args: &[&str]) -> Kv {
        let dir = tempfile::Builder::new()
            .prefix("usm-kv-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_usm-kv"));
        cmd.args(["--port", "0"]).args(args);
        if kernel {
            cmd.arg("--kernel");
        } else {
            let swap = dir.path().join("swap0");
            cmd.arg("--swap").arg(&swap).args(["--swap-size", "256M"]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("usm-kv starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("usm-kv prints its address");
        let port = line
            .split_whitespace()
            .find_map(|w| w.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Kv {
            child,
            port,
            _dir: dir,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs (Debian redis-tools)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    /// Feeds RESP `commands` through `redis-cli --pipe`; returns its summary line.
    fn pipe(&self, commands: &[u8]) -> String {
        let mut child = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--pipe"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = commands.to_vec();
        let writer = std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "redis-cli --pipe: {text}");
        text
    }

    fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit status (within 20 s).
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("usm-kv did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn value_of(key: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((key * 31 + i * 7 + (i >> 9)) % 26) as u8)
        .collect()
}

#[test]
fn redis_cli_commands_work_in_both_modes() {
    for kernel in [false, true] {
        let kv = Kv::start(kernel, &["--pool", "8M"]);
        assert_eq!(kv.cli(&["PING"]), "PONG");
        assert_eq!(kv.cli(&["PING", "hello"]), "hello");
        assert_eq!(kv.cli(&["SET", "a", "1"]), "OK");
        assert_eq!(kv.cli(&["SET", "b", "two words"]), "OK");
        assert_eq!(kv.cli(&["SET", "a", "x", "NX"]), "");
        assert_eq!(kv.cli(&["SET", "c", "3", "XX"]), "");
        assert_eq!(kv.cli(&["GET", "b"]), "two words");
        assert_eq!(kv.cli(&["GET", "nope"]), "");
        assert_eq!(kv.cli(&["MGET", "a", "nope", "b"]), "1\n\ntwo words");
        assert_eq!(kv.cli(&["EXISTS", "a", "b", "nope"]), "2");
        assert_eq!(kv.cli(&["DBSIZE"]), "2");
        let want = item_digest(b"a", b"1").wrapping_add(item_digest(b"b", b"two words"));
        assert_eq!(kv.cli(&["DIGEST"]), format!("{want:032x}"));
        assert_eq!(kv.cli(&["DEBUG", "DIGEST"]), format!("{want:032x}"));
        assert_eq!(kv.cli(&["DEL", "a", "nope"]), "1");
        assert_eq!(kv.cli(&["EXISTS", "a"]), "0");
        let info = kv.cli(&["INFO"]);
        assert!(info.contains("db0:keys=1"), "{info}");
        let mode = if kernel { "kernel" } else { "usm" };
        assert!(info.contains(&format!("usm_kv_mode:{mode}")), "{info}");
        assert!(kv.cli(&["GET"]).contains("wrong number of arguments"));
        assert!(kv.cli(&["HSET", "h", "f", "v"]).contains("unknown command"));
        assert_eq!(kv.cli(&["FLUSHALL"]), "OK");
        assert_eq!(kv.cli(&["DBSIZE"]), "0");
        assert_eq!(kv.cli(&["DIGEST"]), format!("{:032x}", 0));
    }
}

/// `field:value` of an `INFO` text.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
}

#[test]
fn latencystats_read_as_redis_7_writes_them_and_config_resetstat_clears_them() {
    for kernel in [false, true] {
        let kv = Kv::start(kernel, &["--pool", "8M"]);
        assert_eq!(kv.cli(&["SET", "k", "v"]), "OK");
        for _ in 0..3 {
            assert_eq!(kv.cli(&["GET", "k"]), "v");
        }
        let info = kv.cli(&["INFO"]);
        assert!(info.contains("# Latencystats"), "{info}");
        for cmd in ["get", "set"] {
            let line = info_field(&info, &format!("latency_percentiles_usec_{cmd}"))
                .unwrap_or_else(|| panic!("no {cmd} latency in {info}"));
            let q: Vec<f64> = line
                .split(',')
                .zip(["p50=", "p99=", "p99.9="])
                .map(|(kv, key)| {
                    kv.strip_prefix(key)
                        .unwrap_or_else(|| panic!("{key} in {line}"))
                        .parse()
                        .unwrap()
                })
                .collect();
            assert_eq!(q.len(), 3, "{line}");
            assert!(q[0] > 0.0 && q[0] <= q[1] && q[1] <= q[2], "{line}");
        }
        assert!(
            info_field(&info, "latency_percentiles_usec_del").is_none(),
            "no DEL ran: {info}"
        );
        assert_eq!(kv.cli(&["CONFIG", "RESETSTAT"]), "OK");
        let info = kv.cli(&["INFO"]);
        assert!(
            info_field(&info, "latency_percentiles_usec_get").is_none(),
            "{info}"
        );
        let commands: u64 = info_field(&info, "total_commands_processed")
            .unwrap()
            .parse()
            .unwrap();
        assert!(commands <= 1, "counted since the reset: {commands}");
        assert_eq!(kv.cli(&["GET", "k"]), "v", "the data survives a RESETSTAT");
        assert!(
            info_field(&kv.cli(&["INFO"]), "latency_percentiles_usec_get").is_some(),
            "recording goes on after a reset"
        );
    }
}

#[test]
fn redis_benchmark_runs_unmodified_in_both_modes() {
    for kernel in [false, true] {
        let kv = Kv::start(kernel, &["--pool", "16M"]);
        let out = Command::new("redis-benchmark")
            .args(["-p", &kv.port.to_string()])
            .args([
                "-t",
                "ping,set,get,mset",
                "-n",
                "2000",
                "-c",
                "8",
                "-r",
                "1000",
                "-d",
                "64",
                "-q",
            ])
            .output()
            .expect("redis-benchmark runs (Debian redis-tools)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "MSET (10 keys)"] {
            assert!(
                text.lines()
                    .any(|l| l.contains(&format!("{test}: ")) && l.contains("requests per second")),
                "no result for {test}: {text}"
            );
        }
        assert!(!text.contains("ERR"), "{text}");
        assert!(!text.contains("WARNING"), "{text}");
        let keys: usize = kv.cli(&["DBSIZE"]).parse().unwrap();
        assert!(
            (1..=1000).contains(&keys),
            "{keys} keys after SET/MSET with -r 1000"
        );
        // Every value redis-benchmark wrote is its 64-byte filler.
        let one = kv.cli(&["GET", "key:__rand_int__"]);
        assert!(one.is_empty() || one.len() == 64, "{one:?}");
    }
}

#[test]
fn data_four_times_the_pool_comes_back_intact() {
    let mut kv = Kv::start(false, &["--pool", "4M", "--workers", "2"]);
    let keys = 4000;
    let len = 4000; // ~16 MB of values: 4x the pool
    let mut load = Vec::new();
    let mut want = 0u128;
    for k in 0..keys {
        let key = format!("item:{k:06}");
        let value = value_of(k, len);
        want = want.wrapping_add(item_digest(key.as_bytes(), &value));
        load.extend(resp_command(&[b"SET", key.as_bytes(), &value]));
    }
    let summary = kv.pipe(&load);
    assert!(
        summary.contains(&format!("errors: 0, replies: {keys}")),
        "{summary}"
    );
    assert_eq!(kv.cli(&["DBSIZE"]), keys.to_string());
    // The whole dataset, read back by the server.
    assert_eq!(kv.cli(&["DIGEST"]), format!("{want:032x}"));
    // Every value, read back by a client, in an order unrelated to insertion.
    let mut s = kv.raw();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for k in (0..keys).map(|i| (i * 2654435761usize) % keys) {
        let key = format!("item:{k:06}");
        s.write_all(&resp_command(&[b"GET", key.as_bytes()]))
            .unwrap();
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        assert_eq!(header, format!("${len}\r\n"), "{key}");
        let mut body = vec![0u8; len + 2];
        reader.read_exact(&mut body).unwrap();
        assert!(
            body[..len] == value_of(k, len)[..],
            "value of {key} differs"
        );
    }
    // A few through redis-cli too.
    for k in [0, 1234, keys - 1] {
        let got = kv.cli(&["GET", &format!("item:{k:06}")]);
        assert_eq!(got.as_bytes(), &value_of(k, len)[..]);
    }
    let info = kv.cli(&["INFO"]);
    let counter = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in {info}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(counter("evicted") > 1000, "pages went to swap: {info}");
    assert!(
        counter("swap_ins") > 1000,
        "pages came back from swap: {info}"
    );
    assert!(kv.stop().success());
}

#[test]
fn bad_input_never_takes_the_server_down() {
    for kernel in [false, true] {
        let mut kv = Kv::start(kernel, &["--pool", "8M", "--max-value", "64K"]);
        let expect_error_then_close = |input: &[u8], what: &str| {
            let mut s = kv.raw();
            s.write_all(input).unwrap();
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply); // ends: the server closed the connection
            let text = String::from_utf8_lossy(&reply);
            assert!(text.starts_with("-ERR"), "{what}: {text:?}");
        };
        expect_error_then_close(b"*2\r\n$3\r\nGET\r\n:12\r\n", "not a bulk string");
        expect_error_then_close(b"*x\r\n", "bad multibulk length");
        expect_error_then_close(b"*1\r\n$-7\r\n", "negative bulk length");
        expect_error_then_close(
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999\r\n",
            "oversized value",
        );
        expect_error_then_close(b"*1\r\n$4\r\nPINGxx", "bulk without CRLF");
        expect_error_then_close(&[b'A'; 70 << 10], "inline line too long");
        // Clients that vanish mid-request.
        for partial in [
            &b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$60000\r\nabc"[..],
            b"*2\r\n$3\r\nGE",
            b"*1",
        ] {
            let mut s = kv.raw();
            s.write_all(partial).unwrap();
            drop(s);
        }
        // A client that resets while its large reply is being written.
        assert_eq!(kv.cli(&["SET", "big", &"v".repeat(60_000)]), "OK");
        {
            let mut s = kv.raw();
            let mut burst = Vec::new();
            for _ in 0..200 {
                burst.extend(resp_command(&[b"GET", b"big"]));
            }
            s.write_all(&burst).unwrap();
            let mut some = [0u8; 1000];
            s.read_exact(&mut some).unwrap();
            drop(s);
        }
        // Binary noise.
        {
            let mut s = kv.raw();
            let noise: Vec<u8> = (0..5000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            let _ = s.write_all(&noise);
        }
        // Errors that keep the connection: the next command on it is served.
        {
            let mut s = kv.raw();
            s.write_all(b"*1\r\n$5\r\nBOGUS\r\n*1\r\n$3\r\nGET\r\n*1\r\n$4\r\nPING\r\n")
                .unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            for want in ["-ERR unknown command", "-ERR wrong number", "+PONG"] {
                line.clear();
                r.read_line(&mut line).unwrap();
                assert!(line.starts_with(want), "{want}: {line:?}");
            }
        }
        assert!(kv.alive(), "the server died on bad input");
        assert_eq!(kv.cli(&["PING"]), "PONG");
        assert_eq!(kv.cli(&["GET", "big"]).len(), 60_000);
        assert!(kv.stop().success());
    }
}

#[test]
fn sigterm_closes_connections_and_exits_zero() {
    for kernel in [false, true] {
        let mut kv = Kv::start(kernel, &["--pool", "8M"]);
        let mut idle = kv.raw();
        idle.write_all(&resp_command(&[b"PING"])).unwrap();
        let mut pong = [0u8; 7];
        idle.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        let status = kv.stop();
        assert!(status.success(), "{status:?}");
        let mut rest = Vec::new();
        match idle.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        assert!(TcpStream::connect(("127.0.0.1", kv.port)).is_err());
    }
}

/// One connection pipelines thousands of GET/SET/DEL/EXISTS on a few keys in one burst,
/// with values larger than the pool so GETs fault: every reply must be the one running
/// the commands one by one gives (USM's `--concurrent` reads must not reorder replies, nor
/// let a GET see a SET sent after it or miss one sent before it). Also the default (one by one) and
/// kernel mode.
#[test]
fn pipelined_requests_keep_their_order_and_effects() {
    for (kernel, extra) in [(false, None), (false, Some("--concurrent")), (true, None)] {
        let mut args = vec!["--pool", "4M"];
        args.extend(extra);
        let kv = Kv::start(kernel, &args);
        // 64 filler keys x 64 KiB = 4 MiB: with the test keys, more than the pool.
        let mut load = Vec::new();
        for k in 0..64usize {
            let key = format!("fill:{k}");
            load.extend(resp_command(&[
                b"SET",
                key.as_bytes(),
                &value_of(k, 64 << 10),
            ]));
        }
        let mut model: std::collections::HashMap<String, Vec<u8>> = Default::default();
        let mut want = Vec::new();
        let mut x = 12345u64;
        for i in 0..3000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("k{}", x % 5);
            match x % 7 {
                0 | 1 => {
                    let v = value_of(i, 1000 + (x % 60000) as usize);
                    load.extend(resp_command(&[b"SET", key.as_bytes(), &v]));
                    want.extend_from_slice(b"+OK\r\n");
                    model.insert(key, v);
                }
                2 => {
                    load.extend(resp_command(&[b"DEL", key.as_bytes()]));
                    let n = u8::from(model.remove(&key).is_some());
                    want.extend_from_slice(format!(":{n}\r\n").as_bytes());
                }
                3 => {
                    load.extend(resp_command(&[b"EXISTS", key.as_bytes()]));
                    let n = u8::from(model.contains_key(&key));
                    want.extend_from_slice(format!(":{n}\r\n").as_bytes());
                }
                4 => {
                    // A filler key: likely in swap by now.
                    let k = (x >> 8) as usize % 64;
                    let key = format!("fill:{k}");
                    load.extend(resp_command(&[b"GET", key.as_bytes()]));
                    want.extend_from_slice(format!("${}\r\n", 64 << 10).as_bytes());
                    want.extend_from_slice(&value_of(k, 64 << 10));
                    want.extend_from_slice(b"\r\n");
                }
                _ => {
                    load.extend(resp_command(&[b"GET", key.as_bytes()]));
                    match model.get(&key) {
                        Some(v) => {
                            want.extend_from_slice(format!("${}\r\n", v.len()).as_bytes());
                            want.extend_from_slice(v);
                            want.extend_from_slice(b"\r\n");
                        }
                        None => want.extend_from_slice(b"$-1\r\n"),
                    }
                }
            }
        }
        let fill_replies = 64 * b"+OK\r\n".len();
        let mut s = kv.raw();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&load).unwrap());
        let mut got = vec![0u8; fill_replies + want.len()];
        s.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got[..fill_replies].iter().eq(b"+OK\r\n".repeat(64).iter()));
        let got = &got[fill_replies..];
        if got != want.as_slice() {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "kernel {kernel} {extra:?}: replies differ at byte {at}: got {:?}, want {:?}",
                String::from_utf8_lossy(&got[at.saturating_sub(40)..(at + 40).min(got.len())]),
                String::from_utf8_lossy(&want[at.saturating_sub(40)..(at + 40).min(want.len())])
            );
        }
        // Nothing more was sent.
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut one = [0u8; 1];
        assert!(s.read(&mut one).is_err(), "an extra reply byte");
    }
}
