//! Driving a real redis-server from the tests: `redis-cli` calls, a free port, a server
//! command line with the test's RDB directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `redis-cli -p PORT ARGS...`, its trimmed output.
pub(crate) fn redis_cmd(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the redis at `port` answered PING within `limit`.
pub(crate) fn wait_for_ping(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while redis_cmd(port, &["PING"]) != "PONG" {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// `INFO persistence` field `key` of the redis at `port`.
pub(crate) fn redis_info(port: u16, key: &str) -> Option<String> {
    let info = redis_cmd(port, &["INFO", "persistence"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
}

/// A redis-server on loopback `port`, no persistence but `BGSAVE` to `dir/rdb`, with
/// `DEBUG` enabled (for `POPULATE` and `DIGEST`).
pub(crate) fn redis_server(dir: &Path, port: u16, rdb: &str) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args([
            "--enable-debug-command",
            "yes",
            "--dbfilename",
            rdb,
            "--dir",
        ])
        .arg(dir);
    cmd
}

/// [`redis_server`] started plainly (no USM), its output discarded.
pub(crate) fn plain_redis(dir: &Path, port: u16, rdb: &str) -> Child {
    redis_server(dir, port, rdb)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
