//! The daemon as an attacker and an unlucky user meet it (issue "harden"): a second user
//! (really created by the test) cannot obtain, read or write anything of a root
//! program's private daemon; a tagged program's hostile agent setup (unsealed ring, a
//! pipe for an eventfd) is refused and hurts nobody else; silent stat clients hold
//! nobody up; a file at the socket path is never deleted; sessions are bounded per
//! process and per user; a name cannot forge a log line; a killed daemon's leftovers go
//! at the next start; root running a set-user-ID-root program is not warned wrongly.
//!
//! Needs root (it creates a user, uses /run/usm, opens userfaultfds): fails otherwise.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use usm_proto::client::{self, Admission, Session};
use usm_proto::{Message, ProtoError, RefusalReason};
use usm_runtime::daemon::{DaemonStat, query_stat, stat_socket_path};

mod common;

use common::daemon::USM;
use common::harden::{KillOnDrop, RemoveOnDrop, ThrowawayUser};
use common::programs::tagger;

/// The name the test process says Hello with (named in every config here).
const NAME: &str = "harden";

fn must_be_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "daemon_harden needs root (userfaultfd, /run/usm, a second user)"
    );
}

fn userfaultfd() -> OwnedFd {
    usm_kmod::RawUserfaultfd::open(usm_kmod::OpenFlags::default())
        .expect("open a userfaultfd")
        .into_fd()
}

/// A small USM swap file (so no daemon writes a 256 MiB private one).
fn mkswap(dir: &Path) -> PathBuf {
    let p = dir.join("swap.img");
    let out = Command::new(USM)
        .args(["mkswap", "--size", "16M"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

/// Waits for `child` up to `limit`; kills it and returns `None` if it is still running.
fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `usm run` daemon in a directory of its own, its stderr in `usm.log`.
struct Run {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Run {
    fn start(body: &str, env: &[(&str, String)]) -> Run {
        Self::start_opts(body, env, false)
    }

    /// `umask0`: start it under `umask 000` (socket modes must not follow it).
    fn start_opts(body: &str, env: &[(&str, String)], umask0: bool) -> Run {
        must_be_root();
        let dir = tempfile::tempdir().unwrap();
        let swap = mkswap(dir.path());
        let socket = dir.path().join("usm.sock");
        let cfg = dir.path().join("usm.cfg");
        std::fs::write(
            &cfg,
            format!(
                "{body}\nswap {}\nsocket {}\n",
                swap.display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("usm.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(if umask0 {
                r#"umask 000; exec "$0" run "$1""#
            } else {
                r#"exec "$0" run "$1""#
            })
            .arg(USM)
            .arg(&cfg)
            .env("USM_SWAP_DIR", dir.path())
            .stderr(File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let run = Run {
            child,
            dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while query_stat(&run.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                run.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run
    }

    fn stat(&self) -> DaemonStat {
        query_stat(&self.socket).expect("the daemon answers usm stat")
    }

    fn wait_stat(&self, what: &str, f: impl Fn(&DaemonStat) -> bool) -> DaemonStat {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stat();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status (None: still running after `limit`, killed) and the log.
    fn stop_within(mut self, limit: Duration) -> (Option<ExitStatus>, String) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let st = wait_until(&mut self.child, limit);
        (st, self.log())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A session of this process with the daemon at `socket`: the verdict, the session,
/// and the userfaultfd handed over (kept open as long as the session).
fn hello(socket: &Path, name: &str) -> (Result<Admission, ProtoError>, Session, OwnedFd) {
    let uffd = userfaultfd();
    let session = client::connect(socket).expect("connect to the daemon");
    let verdict = session.hello(std::process::id(), name, uffd.as_fd());
    (verdict, session, uffd)
}

// ---------------------------------------------------------------------------------------
// 1. Another user against a root program's private daemon (`usm exec`).

/// What the second user tries against the socket at argv[1]; one `op:result` line each.
const PROBE: &str = r#"
import errno, os, socket, sys
path = sys.argv[1]
def r(name, f):
    try:
        f()
        print(name + ":ok")
    except OSError as e:
        print(name + ":" + errno.errorcode.get(e.errno, str(e.errno)))
def conn(p, kind):
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(2)
    s.connect(p)
r("connect", lambda: conn(path, socket.SOCK_SEQPACKET))
r("connect_stat", lambda: conn(path + ".stat", socket.SOCK_STREAM))
r("list", lambda: os.listdir(os.path.dirname(path)))
r("unlink", lambda: os.unlink(path))
r("rename", lambda: os.rename(path, path + ".mine"))
r("create", lambda: open(os.path.join(os.path.dirname(path), "planted"), "w"))
"#;

/// Runs `usm exec` on a program that prints its socket and waits, after letting the
/// attacker prepare `prepare` (given usm's pid, which `exec` keeps). Returns the
/// socket path the program was given, the child and its pid.
fn gated_exec(
    xdg: Option<&Path>,
    swap_dir: &Path,
    prepare: impl FnOnce(u32),
) -> (PathBuf, Child, u32) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            r#"read _ && exec "$0" exec --report json --swap-size 16M -- /bin/sh -c 'echo "SOCK=$USM_SOCKET"; sleep 3'"#,
        )
        .arg(USM)
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", swap_dir)
        .env("TMPDIR", "/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match xdg {
        Some(x) => cmd.env("XDG_RUNTIME_DIR", x),
        None => cmd.env_remove("XDG_RUNTIME_DIR"),
    };
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    prepare(pid);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(sock) = line.trim().strip_prefix("SOCK=") else {
        let _ = child.kill();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("usm exec did not run the program: {line:?} {err}");
    };
    (PathBuf::from(sock), child, pid)
}

fn probe_lines(atk: &ThrowawayUser, sock: &Path) -> Vec<String> {
    let out = atk.python(PROBE, &[sock.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "probe failed to run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn finish_exec(mut child: Child) -> serde_json::Value {
    let st = wait_until(&mut child, Duration::from_secs(30)).expect("usm exec ends");
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(st.success(), "usm exec failed: {st:?} {err}");
    let json = err
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report: {err}"));
    serde_json::from_str(json).unwrap()
}

#[test]
fn a_second_user_cannot_take_over_a_root_programs_private_daemon() {
    must_be_root();
    let atk = ThrowawayUser::create("atk");
    let swap_dir = tempfile::tempdir().unwrap();
    // The attacker's own runtime directory, which an unlucky root might inherit.
    let atk_xdg = PathBuf::from(format!("/tmp/usmh-xdg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&atk_xdg);
    let _clean = RemoveOnDrop(atk_xdg.clone());
    assert!(
        atk.command("mkdir")
            .args(["-m", "0700"])
            .arg(&atk_xdg)
            .status()
            .unwrap()
            .success()
    );
    for xdg in [None, Some(atk_xdg.as_path())] {
        let mut planted = Vec::new();
        let mut planted_tmp = None;
        let (sock, child, pid) = gated_exec(xdg, swap_dir.path(), |pid| {
            // The attacker guesses the directory names usm exec would use.
            for base in [Path::new("/tmp"), atk_xdg.as_path()] {
                let d = base.join(format!("usm-exec-{pid}"));
                let ok = atk
                    .command("mkdir")
                    .args(["-m", "0777"])
                    .arg(&d)
                    .status()
                    .unwrap();
                assert!(ok.success());
                if base == Path::new("/tmp") {
                    planted_tmp = Some(RemoveOnDrop(d.clone()));
                }
                planted.push(d);
            }
            // It cannot plant anything where root's private directory goes.
            let _ = std::fs::create_dir_all("/run/usm");
            let st = atk
                .command("mkdir")
                .arg(format!("/run/usm/usm-exec-{pid}"))
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(
                !st.success(),
                "the second user created a directory in /run/usm"
            );
        });
        let dir = sock.parent().unwrap().to_path_buf();
        assert_eq!(
            dir,
            Path::new("/run/usm").join(format!("usm-exec-{pid}")),
            "root's private daemon lives under /run/usm (xdg {xdg:?})"
        );
        let dm = std::fs::symlink_metadata(&dir).unwrap();
        assert!(dm.is_dir() && dm.uid() == 0, "{dm:?}");
        assert_eq!(dm.mode() & 0o7777, 0o700, "private directory mode");
        let sm = std::fs::symlink_metadata(&sock).unwrap();
        assert!(sm.file_type().is_socket());
        assert_eq!(sm.mode() & 0o777, 0o600, "socket mode");
        for d in &planted {
            assert_eq!(
                std::fs::read_dir(d).unwrap().count(),
                0,
                "usm exec used the directory the attacker prepared: {}",
                d.display()
            );
        }
        // While the program runs: the attacker can neither connect, nor list, nor swap.
        let lines = probe_lines(&atk, &sock);
        for op in [
            "connect",
            "connect_stat",
            "list",
            "unlink",
            "rename",
            "create",
        ] {
            let want = format!("{op}:EACCES");
            assert!(lines.contains(&want), "{op}: {lines:?}");
        }
        let report = finish_exec(child);
        drop(planted_tmp);
        assert_eq!(report["managed"], true, "{report}");
        assert!(!dir.exists(), "the private directory is removed at exit");
    }
}

/// The second user's tagger-side view of a socket: connect, wait for a message.
const KNOCK: &str = r#"
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(3)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:" + errno.errorcode.get(e.errno, str(e.errno)))
    sys.exit(0)
try:
    data = s.recv(4096)
    print("got:" + data.decode("utf-8", "replace").replace("\n", " "))
except socket.timeout:
    print("got:nothing")
"#;

#[test]
fn a_system_daemon_checks_peer_credentials_and_sets_socket_modes_itself() {
    must_be_root();
    let atk = ThrowawayUser::create("peer");
    let body = format!("memory 256\nworkers 1\nprocess {NAME} first-fit");
    // Default rule (same uid + root): the socket is 0600 even under umask 000.
    let own = Run::start_opts(&body, &[], true);
    std::fs::set_permissions(own.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&own.socket), 0o600, "taggers' socket");
    assert_eq!(mode(&stat_socket_path(&own.socket)), 0o600, "stat socket");
    let out = atk.python(KNOCK, &[own.socket.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "connect:EACCES"
    );

    // A daemon that admits some other user: the socket must be connectable (0666) and
    // SO_PEERCRED turns this user away before reading anything.
    let other = (atk.uid + 1).to_string();
    let open = Run::start_opts(&body, &[("USM_ALLOW_UIDS", other)], true);
    std::fs::set_permissions(open.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(mode(&open.socket), 0o666);
    assert_eq!(mode(&stat_socket_path(&open.socket)), 0o600);
    let out = atk.python(KNOCK, &[open.socket.to_str().unwrap()]);
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        got.contains(&format!("uid {} may not attach", atk.uid)),
        "the second user was not refused at once: {got:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    open.wait_stat("the refusal counted", |s| s.refused >= 1);
    // Root's own programs are still served.
    let (verdict, _s, _u) = hello(&open.socket, NAME);
    verdict.expect("root is admitted");
}

/// The second user's fake daemon: listens, counts descriptors handed to it.
const FAKE_DAEMON: &str = r#"
import array, os, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
print("ready", flush=True)
s.settimeout(0.2)
fds = 0
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.settimeout(2)
    try:
        msg, anc, _, _ = c.recvmsg(4096, socket.CMSG_SPACE(16))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += len(data) // 4
    except OSError:
        pass
print("fds=%d" % fds, flush=True)
"#;

#[test]
fn a_root_program_never_hands_its_memory_to_another_users_socket() {
    must_be_root();
    let atk = ThrowawayUser::create("fake");
    let dir = PathBuf::from(format!("/tmp/usmh-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let _clean = RemoveOnDrop(dir.clone());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let fake = dir.join("usm.sock");
    let mut listener = KillOnDrop(
        atk.command("/usr/bin/python3")
            .arg("-c")
            .arg(FAKE_DAEMON)
            .arg(&fake)
            .arg("4")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(listener.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // The protocol client refuses the listener's uid.
    match client::connect(&fake) {
        Err(ProtoError::UntrustedDaemon {
            daemon_uid,
            own_uid,
        }) => {
            assert_eq!((daemon_uid, own_uid), (atk.uid, 0));
        }
        other => panic!("connected to another user's socket: {other:?}"),
    }
    // A real tagged root program pointed at it runs, unmanaged, and hands nothing over.
    let st = Command::new("/bin/sh")
        .args(["-c", "exit 0"])
        .env("LD_PRELOAD", tagger())
        .env(usm_proto::SOCKET_ENV, &fake)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = listener.0.wait();
    assert_eq!(rest.trim(), "fds=0", "the fake daemon received descriptors");
}

// ---------------------------------------------------------------------------------------
// 2. A tagged program's hostile agent setup.

/// Waits for the daemon's `StartAgent` on `session`.
fn start_agent(session: &Session) -> (u32, u32) {
    let ch = session.channel();
    ch.set_recv_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match ch.recv().expect("StartAgent from the daemon") {
            Message::StartAgent {
                staging_pages,
                ring_entries,
            } => return (staging_pages, ring_entries),
            _ => continue,
        }
    }
}

/// A memfd that looks like a ring (magic and entries in place) but carries no seal.
fn unsealed_ring(entries: u32) -> OwnedFd {
    let fd =
        nix::sys::memfd::memfd_create(c"hostile-ring", nix::sys::memfd::MFdFlags::empty()).unwrap();
    let len = usm_proto::agent::ring_len(entries);
    nix::unistd::ftruncate(&fd, len as i64).unwrap();
    let f = File::from(fd.try_clone().unwrap());
    f.write_all_at(b"USMRING1", 256).unwrap();
    f.write_all_at(&u64::from(entries).to_le_bytes(), 264)
        .unwrap();
    fd
}

fn send_ready(session: &Session, staging: u32, entries: u32, fds: &[OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    session
        .channel()
        .send_with_fds(
            &Message::AgentReady {
                staging_start: 0x7f00_0000_0000,
                staging_pages: staging,
                ring_entries: entries,
            },
            &borrowed,
        )
        .unwrap();
}

#[test]
fn an_unsealed_ring_or_a_pipe_as_kick_fd_is_refused_and_the_daemon_survives() {
    let d = Run::start(
        &format!("memory 256\nworkers 1\nprocess {NAME} first-fit"),
        &[],
    );
    let me = std::process::id();
    // (a) An unsealed ring, truncated right after it was handed over.
    let (verdict, s1, _u1) = hello(&d.socket, NAME);
    verdict.expect("admitted");
    let (staging, entries) = start_agent(&s1);
    let honest = usm_proto::agent::AgentServer::create(entries, staging).unwrap();
    let eventfds: Vec<OwnedFd> = honest.fds_for_daemon()[1..]
        .iter()
        .map(|f| f.try_clone_to_owned().unwrap())
        .collect();
    let ring = unsealed_ring(entries);
    let fds = vec![
        ring.try_clone().unwrap(),
        eventfds[0].try_clone().unwrap(),
        eventfds[1].try_clone().unwrap(),
    ];
    send_ready(&s1, staging, entries, &fds);
    let s = d.wait_stat("the unsealed ring refused", |s| s.bad_messages >= 1);
    nix::unistd::ftruncate(&ring, 0).unwrap();
    assert!(
        s.processes.iter().filter(|p| p.pid == me).all(|p| !p.agent),
        "an unsealed ring was accepted: {s:?}"
    );

    // (b) A sealed ring, but a pipe for the kick eventfd (a full pipe blocks a writer).
    let (verdict, s2, _u2) = hello(&d.socket, NAME);
    verdict.expect("admitted");
    let (staging, entries) = start_agent(&s2);
    let honest = usm_proto::agent::AgentServer::create(entries, staging).unwrap();
    let mut fds: Vec<OwnedFd> = honest
        .fds_for_daemon()
        .iter()
        .map(|f| f.try_clone_to_owned().unwrap())
        .collect();
    let (_r, w) = nix::unistd::pipe().unwrap();
    fds[1] = w;
    send_ready(&s2, staging, entries, &fds);
    let s = d.wait_stat("the pipe refused", |s| s.bad_messages >= 2);
    assert!(
        s.processes.iter().filter(|p| p.pid == me).all(|p| !p.agent),
        "a pipe was accepted as the kick eventfd: {s:?}"
    );

    // The daemon is alive and serves new sessions; an honest ring is still accepted.
    let (verdict, s3, _u3) = hello(&d.socket, NAME);
    verdict.expect("admitted after the hostile setups");
    let (staging, entries) = start_agent(&s3);
    let honest = usm_proto::agent::AgentServer::create(entries, staging).unwrap();
    let fds: Vec<OwnedFd> = honest
        .fds_for_daemon()
        .iter()
        .map(|f| f.try_clone_to_owned().unwrap())
        .collect();
    send_ready(&s3, staging, entries, &fds);
    d.wait_stat("the honest agent", |s| {
        s.processes.iter().any(|p| p.pid == me && p.agent)
    });
    let (st, log) = d.stop_within(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{st:?}: {log}");
}

// ---------------------------------------------------------------------------------------
// 3. Stat clients.

#[test]
fn silent_stat_clients_hold_up_neither_other_clients_nor_shutdown() {
    let d = Run::start("memory 256\nworkers 1", &[]);
    let stat = stat_socket_path(&d.socket);
    // Connect and say nothing.
    let mut silent: Vec<UnixStream> = (0..6)
        .map(|_| UnixStream::connect(&stat).unwrap())
        .collect();
    // Ask, and never read the answer.
    for _ in 0..2 {
        let mut s = UnixStream::connect(&stat).unwrap();
        s.write_all(b"stat\n").unwrap();
        silent.push(s);
    }
    let t0 = Instant::now();
    let s = query_stat(&d.socket).expect("another client is served");
    let waited = t0.elapsed();
    assert!(s.pool_pages == 256);
    assert!(
        waited < Duration::from_millis(1900),
        "the stat answer waited {waited:?} behind silent clients"
    );
    let t0 = Instant::now();
    let (st, log) = d.stop_within(Duration::from_secs(5));
    assert!(
        st.is_some_and(|s| s.success()),
        "shutdown waited on silent stat clients ({:?}): {log}",
        t0.elapsed()
    );
    drop(silent);
}

#[test]
fn silent_metrics_scrapers_hold_up_neither_other_scrapers_nor_shutdown() {
    let d = Run::start("memory 256\nworkers 1\nmetrics 127.0.0.1:0", &[]);
    let addr = d
        .log()
        .lines()
        .find_map(|l| {
            l.split("metrics on http://")
                .nth(1)
                .and_then(|r| r.split_once("/metrics"))
                .map(|(a, _)| a.to_owned())
        })
        .unwrap_or_else(|| panic!("no metrics address in the log: {}", d.log()));
    let silent: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let t0 = Instant::now();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    let waited = t0.elapsed();
    assert!(body.contains("usm_pool_pages 256"), "{body}");
    assert!(
        waited < Duration::from_millis(1900),
        "the scrape waited {waited:?} behind silent scrapers"
    );
    let (st, log) = d.stop_within(Duration::from_secs(5));
    assert!(st.is_some_and(|s| s.success()), "shutdown waited: {log}");
    drop(silent);
}

// ---------------------------------------------------------------------------------------
// 4. The socket path.

/// A config `dir/NAME.cfg` for a small daemon on `socket` (its swap file in `dir`).
fn socket_config(dir: &Path, socket: &Path, name: &str) -> PathBuf {
    let swap = mkswap(dir);
    let cfg = dir.join(format!("{name}.cfg"));
    std::fs::write(
        &cfg,
        format!(
            "memory 64\nworkers 1\nswap {}\nsocket {}\n",
            swap.display(),
            socket.display()
        ),
    )
    .unwrap();
    cfg
}

/// `usm run` with `socket PATH` where something already is; must fail fast.
fn run_expecting_failure(dir: &Path, socket: &Path) -> String {
    let cfg = socket_config(dir, socket, "fail");
    let mut child = Command::new(USM)
        .arg("run")
        .arg(&cfg)
        .env("USM_SWAP_DIR", dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_until(&mut child, Duration::from_secs(15));
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let _ = std::fs::remove_file(dir.join("swap.img"));
    assert!(
        st.is_some_and(|s| !s.success()),
        "the daemon started over {}: {err}",
        socket.display()
    );
    err
}

#[test]
fn nothing_at_the_socket_path_is_deleted_unless_it_is_our_stale_socket() {
    must_be_root();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("usm.sock");
    // A regular file at PATH.
    std::fs::write(&sock, b"precious").unwrap();
    let err = run_expecting_failure(dir.path(), &sock);
    assert!(
        err.contains(sock.to_str().unwrap()) && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    std::fs::remove_file(&sock).unwrap();
    // A regular file at PATH.stat: PATH is not left bound either.
    let stat = stat_socket_path(&sock);
    std::fs::write(&stat, b"precious too").unwrap();
    let err = run_expecting_failure(dir.path(), &sock);
    assert!(
        err.contains(stat.to_str().unwrap()) && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read(&stat).unwrap(), b"precious too");
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "PATH left behind"
    );
    std::fs::remove_file(&stat).unwrap();
    // A symbolic link at PATH: neither followed nor removed.
    let target = dir.path().join("target.txt");
    std::fs::write(&target, b"linked").unwrap();
    std::os::unix::fs::symlink(&target, &sock).unwrap();
    let err = run_expecting_failure(dir.path(), &sock);
    assert!(err.contains("symbolic link"), "{err}");
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"linked");
    std::fs::remove_file(&sock).unwrap();

    // Our own stale socket (a dead daemon's: nobody answers) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    drop(UnixListener::bind(&stat).unwrap());
    assert!(std::fs::symlink_metadata(&sock).is_ok());
    let d = run_at(dir.path(), &sock);
    query_stat(&sock).expect("the daemon replaced its stale sockets");
    // At shutdown, a file someone put at PATH meanwhile is left alone.
    std::fs::rename(&sock, dir.path().join("moved.sock")).unwrap();
    std::fs::write(&sock, b"not the daemon's").unwrap();
    let (st, log) = d.stop_within(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{log}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not the daemon's");
    assert!(
        std::fs::symlink_metadata(&stat).is_err(),
        "the daemon's own stat socket is removed"
    );
}

/// A daemon on `socket` in `dir` (which the caller keeps).
fn run_at(dir: &Path, socket: &Path) -> Run {
    let cfg = socket_config(dir, socket, "ok");
    let log = dir.join("ok.log");
    let child = Command::new(USM)
        .arg("run")
        .arg(&cfg)
        .env("USM_SWAP_DIR", dir)
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let run = Run {
        child,
        dir: tempfile::tempdir().unwrap(),
        socket: socket.to_path_buf(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while query_stat(socket).is_err() {
        assert!(Instant::now() < deadline, "no daemon: {}", run.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    run
}

// ---------------------------------------------------------------------------------------
// 5. Session limits.

fn refusal_text(v: Result<Admission, ProtoError>) -> Option<(RefusalReason, String)> {
    match v {
        Err(ProtoError::Refused { reason, text }) => Some((reason, text)),
        Ok(_) => None,
        Err(e) => panic!("neither admitted nor refused: {e}"),
    }
}

/// Opens argv[2] connections to the socket argv[1] and says nothing; on a line on
/// stdin, prints how many were answered (refused) meanwhile.
const SILENT_PEERS: &str = r#"
import socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
told = 0
for s in socks:
    s.setblocking(False)
    try:
        if len(s.recv(4096)) > 0:
            told += 1
    except BlockingIOError:
        pass
print(told, flush=True)
"#;

#[test]
fn sessions_are_bounded_per_process_and_admissions_never_pile_up_threads() {
    let d = Run::start(
        &format!("memory 256\nworkers 1\nprocess {NAME} first-fit"),
        &[],
    );
    let before = d.threads();
    // 200 Hellos from one process (the issue saw 419 daemon threads).
    let mut kept = Vec::new();
    let (mut acked, mut busy) = (0, 0);
    for _ in 0..200 {
        let (verdict, s, u) = hello(&d.socket, NAME);
        match refusal_text(verdict) {
            None => acked += 1,
            Some((RefusalReason::Busy, text)) => {
                assert!(
                    text.contains(&format!("pid {}", std::process::id())),
                    "{text}"
                );
                busy += 1;
            }
            Some(other) => panic!("unexpected refusal {other:?}"),
        }
        kept.push((s, u));
    }
    assert_eq!((acked, busy), (4, 196), "per-process limit (default 4)");
    let grown = d.threads().saturating_sub(before);
    assert!(
        grown <= 4 * 2 + 4,
        "{grown} new daemon threads for 4 sessions"
    );

    drop(kept);
    drop(d);

    // 100 connections that never say Hello (a daemon allowing 1000 sessions per
    // process): admissions are bounded too — 8 per uid wait for their Hello, the rest
    // are told at once.
    let d = Run::start(
        &format!("memory 256\nworkers 1\nprocess {NAME} first-fit"),
        &[("USM_MAX_SESSIONS_PER_PROCESS", "1000".to_owned())],
    );
    let before = d.threads();
    let mut silent = KillOnDrop(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(SILENT_PEERS)
            .arg(&d.socket)
            .arg("100")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(silent.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    std::thread::sleep(Duration::from_millis(500));
    let grown = d.threads().saturating_sub(before);
    silent
        .0
        .stdin
        .take()
        .unwrap()
        .write_all(b"count\n")
        .unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let turned_away: usize = line.trim().parse().unwrap();
    assert!(
        grown <= 8 + 2,
        "{grown} admission threads for 100 silent peers"
    );
    assert_eq!(
        turned_away, 92,
        "all but 8 are told at once they are over the limit"
    );
}

#[test]
fn sessions_are_bounded_per_user_and_released_when_the_program_exits() {
    let d = Run::start(
        &format!("memory 256\nworkers 1\nprocess {NAME} first-fit\nprocess sleep first-fit"),
        &[("USM_MAX_SESSIONS_PER_UID", "1".to_owned())],
    );
    let mut prog = Command::new("sleep")
        .arg("2")
        .env("LD_PRELOAD", tagger())
        .env(usm_proto::SOCKET_ENV, &d.socket)
        .spawn()
        .unwrap();
    d.wait_stat("sleep managed", |s| {
        s.processes.iter().any(|p| p.name == "sleep")
    });
    let (verdict, _s, _u) = hello(&d.socket, NAME);
    let (reason, text) = refusal_text(verdict).expect("the uid is at its limit");
    assert_eq!(reason, RefusalReason::Busy);
    assert!(text.contains("uid 0 has 1 sessions"), "{text}");
    assert!(prog.wait().unwrap().success());
    d.wait_stat("sleep gone", |s| s.processes.is_empty());
    // Its session was given back with the process.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (verdict, _s, _u) = hello(&d.socket, NAME);
        match refusal_text(verdict) {
            None => break,
            Some(r) => assert!(Instant::now() < deadline, "never released: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// 6. Names, leftovers, the set-user-ID warning.

#[test]
fn a_newline_in_a_program_name_cannot_forge_a_log_line() {
    let d = Run::start(
        &format!("memory 256\nworkers 1\nprocess {NAME} first-fit"),
        &[],
    );
    let forged = "x\nFORGED usm daemon: pid 1 (sshd): managed by policy first-fit";
    let (verdict, _s, _u) = hello(&d.socket, forged);
    let (reason, _) = refusal_text(verdict).expect("an unknown name is refused");
    assert_eq!(reason, RefusalReason::NotConfigured);
    let (st, log) = d.stop_within(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged line in the log:\n{log}"
    );
    assert!(log.contains("x?FORGED usm daemon"), "{log}");
}

#[test]
fn a_killed_private_daemons_swap_file_and_sockets_go_at_the_next_start() {
    must_be_root();
    let swap_dir = tempfile::tempdir().unwrap();
    let exec = |cmd: &str| {
        Command::new(USM)
            .args(["exec", "--swap-size", "16M", "--", "/bin/sh", "-c", cmd])
            .env("USM_TAGGER", tagger())
            .env("USM_SWAP_DIR", swap_dir.path())
            .env_remove("XDG_RUNTIME_DIR")
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // The program kills usm exec (its parent) with SIGKILL: nothing is cleaned up.
    let mut killed = exec("kill -9 $PPID; sleep 0.3");
    let pid = killed.id();
    let st = wait_until(&mut killed, Duration::from_secs(30)).expect("usm exec ends");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    let leftover_swap = || {
        std::fs::read_dir(swap_dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("usm-swap-{pid}"))
            })
            .count()
    };
    let sock_dir = Path::new("/run/usm").join(format!("usm-exec-{pid}"));
    assert_eq!(leftover_swap(), 1, "the killed daemon's swap file");
    assert!(
        sock_dir.join("usm.sock").exists(),
        "the killed daemon's socket"
    );
    // The next private daemon finds and removes them (their owner pid is dead).
    let mut next = exec("exit 0");
    let st = wait_until(&mut next, Duration::from_secs(30)).expect("usm exec ends");
    assert!(st.success());
    assert_eq!(leftover_swap(), 0, "swap file left behind");
    assert!(!sock_dir.exists(), "socket directory left behind");
}

#[test]
fn root_running_a_set_user_id_root_program_is_not_warned_wrongly() {
    must_be_root();
    let dir = tempfile::tempdir().unwrap();
    // A program that lives a moment: `usm exec` reports a program that exits within
    // microseconds of its Ack as unmanaged (the daemon adds it to its list after the Ack).
    let prog = dir.path().join("suid-sleep");
    std::fs::copy("/bin/sleep", &prog).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let out = Command::new(USM)
        .args(["exec", "--report", "json", "--swap-size", "16M", "--"])
        .arg(&prog)
        .arg("0.2")
        .env("USM_TAGGER", tagger())
        .env("USM_SWAP_DIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("set-user-ID"), "a wrong warning: {err}");
    let json = err.lines().find(|l| l.starts_with('{')).expect("report");
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(report["managed"], true, "LD_PRELOAD did reach it: {err}");
}
