//! Test support: find the built cdylibs, compile C programs, and play the daemon with
//! `usm_proto::server` plus a real userfaultfd fault server.
#![allow(dead_code, unreachable_pub)]

pub mod sys;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;
use usm_sync::atomic::{AtomicBool, AtomicU64, Ordering};
use usm_sync::{Arc, Mutex};

use usm_proto::server::{self, Listener, TaggedPeer};
use usm_proto::{Channel, Message};

use sys::*;

/// `target/<profile>` of this test executable (`target/<profile>/deps/<test>-hash`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds `package` with the same cargo, target dir and profile as this test, so the
/// cdylib is fresh (cargo does not hand a cdylib to integration tests by itself).
fn cargo_build(packages: &[&str]) {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap();
    let key = packages.join(",");
    if built.contains(&key) {
        return;
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().unwrap();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--quiet");
    for p in packages {
        cmd.args(["-p", p]);
    }
    if profile == "release" {
        cmd.arg("--release");
    } else if profile != "debug" {
        cmd.args(["--profile", &profile]);
    }
    cmd.env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = cmd.status().expect("run cargo build for the cdylibs");
    assert!(status.success(), "cargo build {packages:?} failed");
    built.push(key);
}

/// The freshly built `libusm_tagger.so`.
pub fn tagger_so() -> PathBuf {
    cargo_build(&["usm-tagger", "usm-capi"]);
    let so = profile_dir().join("libusm_tagger.so");
    assert!(so.exists(), "{} missing after cargo build", so.display());
    so
}

/// The freshly built `libusm.so`.
pub fn libusm_so() -> PathBuf {
    cargo_build(&["usm-tagger", "usm-capi"]);
    let so = profile_dir().join("libusm.so");
    assert!(so.exists(), "{} missing after cargo build", so.display());
    so
}

/// Compiles `tests/programs/<name>.c` into `dir`.
pub fn compile(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let status = Command::new("gcc")
        .args(["-O1", "-g", "-Wall", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .args(extra)
        .arg("-ldl")
        .status()
        .expect("gcc must be installed to build the test programs");
    assert!(status.success(), "gcc failed on {}", src.display());
    out
}

/// Counters of the test daemon's fault server.
#[derive(Default, Debug)]
pub struct FaultStats {
    pub faults: AtomicU64,
    pub copies: AtomicU64,
    pub zeropages: AtomicU64,
    pub forks: AtomicU64,
    pub remaps: AtomicU64,
    pub removes: AtomicU64,
    pub unmaps: AtomicU64,
    /// Faults served from `FaultServer::swapped` (swap-ins).
    pub swapins: AtomicU64,
}

/// One reader per userfaultfd, serving missing faults with COPY (writes) or ZEROPAGE
/// (reads), following FORK events to the child's new userfaultfd.
pub struct FaultServer {
    stop: Arc<AtomicBool>,
    pub stats: Arc<FaultStats>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Page contents "in swap": a fault on such a page is served with its content.
    pub swapped: Arc<Mutex<HashMap<u64, Box<SourcePage>>>>,
}

impl FaultServer {
    pub fn start(uffd: OwnedFd) -> FaultServer {
        let server = FaultServer {
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(FaultStats::default()),
            threads: Arc::new(Mutex::new(Vec::new())),
            swapped: Arc::new(Mutex::new(HashMap::new())),
        };
        server.spawn(uffd);
        server
    }

    fn spawn(&self, uffd: OwnedFd) {
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let threads = self.threads.clone();
        let me = FaultServer {
            stop: stop.clone(),
            stats: stats.clone(),
            threads: threads.clone(),
            swapped: self.swapped.clone(),
        };
        let handle = std::thread::spawn(move || me.serve(uffd));
        threads.lock().unwrap().push(handle);
    }

    fn serve(&self, uffd: OwnedFd) {
        let zero = Box::new(SourcePage([0; 4096]));
        let mut retry: Vec<(u64, bool)> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            if !poll_readable(uffd.as_fd(), 20) && retry.is_empty() {
                continue;
            }
            let mut work = std::mem::take(&mut retry);
            for msg in read_msgs(uffd.as_fd()) {
                match msg.event {
                    UFFD_EVENT_PAGEFAULT => {
                        self.stats.faults.fetch_add(1, Ordering::Relaxed);
                        let write = msg.arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0;
                        work.push((msg.arg[1] & !(PAGE - 1), write));
                    }
                    UFFD_EVENT_FORK => {
                        self.stats.forks.fetch_add(1, Ordering::Relaxed);
                        self.spawn(own_fork_fd(msg.arg[0] & 0xffff_ffff));
                    }
                    UFFD_EVENT_REMAP => {
                        self.stats.remaps.fetch_add(1, Ordering::Relaxed);
                    }
                    UFFD_EVENT_REMOVE => {
                        self.stats.removes.fetch_add(1, Ordering::Relaxed);
                    }
                    UFFD_EVENT_UNMAP => {
                        self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected userfaultfd event {other:#x}"),
                }
            }
            for (page, write) in work {
                let from_swap = self.swapped.lock().unwrap().remove(&page);
                let res = if let Some(content) = from_swap {
                    let res = copy_page(uffd.as_fd(), page, &content);
                    match res {
                        Ok(()) => {
                            self.stats.swapins.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            self.swapped.lock().unwrap().insert(page, content);
                        }
                    }
                    res
                } else if write {
                    copy_page(uffd.as_fd(), page, &zero).inspect(|_| {
                        self.stats.copies.fetch_add(1, Ordering::Relaxed);
                    })
                } else {
                    zero_page(uffd.as_fd(), page).inspect(|_| {
                        self.stats.zeropages.fetch_add(1, Ordering::Relaxed);
                    })
                };
                match res {
                    Ok(()) => {}
                    Err(libc::EEXIST) => wake(uffd.as_fd(), page),
                    // The mm is changing (fork/mremap/munmap in flight): read its event,
                    // then retry.
                    Err(libc::EAGAIN) => retry.push((page, write)),
                    // The range or the process is gone: nothing waits any more.
                    Err(libc::ENOENT | libc::ESRCH | libc::EFAULT) => {}
                    Err(e) => panic!("resolving fault at {page:#x}: errno {e}"),
                }
            }
        }
    }

    /// Stops every reader and closes every userfaultfd it held.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        loop {
            let handle = self.threads.lock().unwrap().pop();
            match handle {
                Some(h) => h.join().unwrap(),
                None => break,
            }
        }
    }
}

/// A daemon played by the test: socket in a temp dir.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub listener: Arc<Listener>,
}

/// One tagged program as the test daemon sees it.
pub struct Served {
    pub pid: u32,
    pub name: String,
    pub faults: FaultServer,
    /// For sending to the tagger (the reader thread has its own handle).
    pub stream: Channel,
    /// Messages from the tagger, in order, with their descriptors.
    pub inbox: Receiver<(Message, Vec<OwnedFd>)>,
    reader: Option<JoinHandle<()>>,
    /// Later taggers (forked children attaching on their own), served the same way.
    pub children: Arc<Mutex<Vec<Served>>>,
    acceptor_stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

pub const DAEMON_FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_MOVE;

impl TestDaemon {
    pub fn new() -> TestDaemon {
        let dir = tempfile::tempdir().unwrap();
        let listener = Listener::bind(&dir.path().join("usm.sock")).unwrap();
        listener
            .set_accept_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        TestDaemon {
            dir,
            listener: Arc::new(listener),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("usm.sock")
    }

    /// Accepts one tagger without answering it.
    pub fn accept(&self) -> TaggedPeer {
        server::accept(&self.listener).expect("a tagged program connects and says Hello")
    }

    /// Accepts one tagger, negotiates its userfaultfd as the daemon does, acks it and
    /// serves its faults; later taggers (forked children) are accepted and served in the
    /// background and listed in `Served::children`.
    pub fn accept_and_serve(&self) -> Served {
        let mut served = serve_peer(self.accept());
        self.listener
            .set_accept_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let listener = self.listener.clone();
        let stop = served.acceptor_stop.clone();
        let children = served.children.clone();
        served.acceptor = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match server::accept(&listener) {
                    // A child may be gone already (it exited before we got to it).
                    Ok(peer) => {
                        if let Some(child) = try_serve_peer(peer) {
                            children.lock().unwrap().push(child);
                        }
                    }
                    Err(e) if e.is_retryable() || e.is_peer_fault() => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }));
        served
    }
}

fn serve_peer(peer: TaggedPeer) -> Served {
    try_serve_peer(peer).expect("UFFDIO_API and Ack for the tagger")
}

fn try_serve_peer(peer: TaggedPeer) -> Option<Served> {
    let features = uffdio_api(peer.uffd.as_fd(), DAEMON_FEATURES).ok()?;
    assert_eq!(features & DAEMON_FEATURES, DAEMON_FEATURES);
    peer.ack(features, "test-policy").ok()?;
    let TaggedPeer {
        pid,
        name,
        uffd,
        stream,
        ..
    } = peer;
    let faults = FaultServer::start(uffd);
    let reader_stream = stream.try_clone().unwrap();
    let (tx, inbox): (Sender<(Message, Vec<OwnedFd>)>, _) = channel();
    let reader = std::thread::spawn(move || {
        while let Ok(msg) = reader_stream.recv_with_fds() {
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    Some(Served {
        pid,
        name,
        faults,
        stream,
        inbox,
        reader: Some(reader),
        children: Arc::new(Mutex::new(Vec::new())),
        acceptor_stop: Arc::new(AtomicBool::new(false)),
        acceptor: None,
    })
}

impl Served {
    /// Tells the tagger how many of its pages the daemon holds.
    pub fn send_swap_state(&self, pages: u64) {
        self.stream
            .send(&Message::SwapState {
                swapped_pages: pages,
            })
            .unwrap();
    }

    /// The daemon stops reading its userfaultfds (they stay open): faults and events pile up.
    pub fn stop_serving(&self) {
        self.faults.stop.store(true, Ordering::Release);
        for child in self.children.lock().unwrap().iter() {
            child.stop_serving();
        }
    }

    /// The daemon dies: it stops accepting, then for this tagger and every child: fault
    /// readers stop, userfaultfd copies close, then the socket.
    pub fn die(mut self) {
        self.stop_accepting();
        let children = std::mem::take(&mut *self.children.lock().unwrap());
        for child in children {
            child.die();
        }
        self.faults.stop();
        self.stream.shutdown();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
    }

    fn stop_accepting(&mut self) {
        self.acceptor_stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
    }

    /// Waits for a message matching `want`, skipping others (range notices).
    pub fn wait_for(&self, what: &str, want: impl Fn(&Message) -> bool) -> Message {
        self.wait_for_with_fds(what, want).0
    }

    /// As `wait_for`, with the message's descriptors.
    pub fn wait_for_with_fds(
        &self,
        what: &str,
        want: impl Fn(&Message) -> bool,
    ) -> (Message, Vec<OwnedFd>) {
        loop {
            let (msg, fds) = self
                .inbox
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no {what} from the tagger"));
            if want(&msg) {
                return (msg, fds);
            }
        }
    }

    /// Asks the tagger to start its eviction agent and returns a client of its ring;
    /// panics if the tagger answers `AgentUnavailable`.
    pub fn start_agent(
        &self,
        staging_pages: u32,
        ring_entries: u32,
    ) -> usm_proto::agent::AgentClient {
        self.stream
            .send(&Message::StartAgent {
                staging_pages,
                ring_entries,
            })
            .unwrap();
        let (ready, fds) = self.wait_for_with_fds("AgentReady", |m| {
            matches!(
                m,
                Message::AgentReady { .. } | Message::AgentUnavailable { .. }
            )
        });
        let Message::AgentReady {
            staging_start,
            staging_pages,
            ring_entries,
        } = ready
        else {
            panic!("agent unavailable: {ready:?}")
        };
        usm_proto::agent::AgentClient::from_ready(staging_start, staging_pages, ring_entries, fds)
            .unwrap()
    }

    /// Every message received so far.
    pub fn drain(&self) -> Vec<Message> {
        self.inbox.try_iter().map(|(m, _)| m).collect()
    }
}

/// A child process with piped stdio.
pub struct Program {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: BufReader<ChildStdout>,
}

impl Program {
    pub fn spawn(bin: &Path, args: &[&str], tagger: &Path, socket: &Path) -> Program {
        let mut child = Command::new(bin)
            .args(args)
            .env("LD_PRELOAD", tagger)
            .env("USM_SOCKET", socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Program {
            child,
            stdin,
            stdout,
        }
    }

    /// Reads stdout lines until one equals `marker`; returns the lines before it.
    pub fn read_until(&mut self, marker: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "program ended before printing {marker}; got {lines:?}"
            );
            let line = line.trim_end().to_owned();
            if line == marker {
                return lines;
            }
            lines.push(line);
        }
    }

    pub fn resume(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the program to end *on its own* while its stdin stays open (it blocks
    /// reading it); after `timeout` it gets SIGTERM, which the caller's assertions see.
    pub fn wait_without_resuming(
        mut self,
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, String) {
        let pid = self.child.id() as libc::pid_t;
        let (tx, rx) = channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(timeout).is_err() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
            }
        });
        let stdin = self.stdin.take();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut out).unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let status = self.child.wait().unwrap();
        let _ = tx.send(());
        watchdog.join().unwrap();
        drop(stdin);
        (status, out, err)
    }

    /// Waits for exit; returns (status, rest of stdout, stderr).
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        drop(self.stdin.take());
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut out).unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let status = self.child.wait().unwrap();
        (status, out, err)
    }
}

/// Parses a `COVERAGE <when> managed=.. anon=.. ...` line.
pub fn parse_coverage(line: &str) -> Option<(u64, u64, u64)> {
    let mut managed = None;
    let mut anon = None;
    let mut mode = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("managed=") {
            managed = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("anon=") {
            anon = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("mode=") {
            mode = v.parse().ok();
        }
    }
    Some((managed?, anon?, mode?))
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop_accepting();
        self.children.lock().unwrap().clear();
        self.faults.stop();
    }
}
