//! The feature probe behind `usm doctor`: what this machine offers USM, and what is
//! missing for which mode.
//!
//! [`ProbeReport::collect`] tries every interface for real (opens userfaultfds both ways,
//! runs `UFFDIO_API`, sets up an io_uring and asks it which opcodes it supports, opens and
//! holds `/dev/cpu_dma_latency`), never assumes from the version number. The report is
//! `serde::Serialize` (for `usm doctor --json`) and `Display` (human-readable, with an
//! advice line for each problem).

use crate::sys::uffd::{available_features, event_fork_permitted};
use crate::uffd::{Features, OpenFlags, OpenPath, RawUserfaultfd};
use std::fmt;
use std::os::unix::fs::MetadataExt;

/// Features the embedded runtime negotiates as required: SIGBUS faults, zero-copy MOVE,
/// POISON for unreadable swap entries, and the free/remap events.
pub const EMBEDDED_FEATURES: Features = Features::SIGBUS
    .union(Features::MOVE)
    .union(Features::POISON)
    .union(Features::EVENT_REMOVE)
    .union(Features::EVENT_UNMAP)
    .union(Features::EVENT_REMAP);

/// Features the daemon negotiates as required: handler mode with fork tracking and
/// thread ids, MOVE, POISON and the free/remap events.
pub const DAEMON_FEATURES: Features = Features::EVENT_FORK
    .union(Features::THREAD_ID)
    .union(Features::MOVE)
    .union(Features::POISON)
    .union(Features::EVENT_REMOVE)
    .union(Features::EVENT_UNMAP)
    .union(Features::EVENT_REMAP);

/// The kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelInfo {
    /// `uname -r`.
    pub release: String,
    /// `uname -m`.
    pub machine: String,
    /// (major, minor) parsed from the release.
    pub version: Option<(u32, u32)>,
}

/// The outcome of trying one thing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    /// It worked.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
}

impl Attempt {
    fn from<T, E: fmt::Display>(r: Result<T, E>) -> Attempt {
        match r {
            Ok(_) => Attempt {
                ok: true,
                error: None,
            },
            Err(e) => Attempt {
                ok: false,
                error: Some(e.to_string()),
            },
        }
    }
}

/// One userfaultfd feature bit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeatureProbe {
    /// `UFFD_FEATURE_*` name without the prefix.
    pub name: &'static str,
    /// Linux version that added it.
    pub since: &'static str,
    /// `UFFDIO_API` reports it.
    pub available: bool,
}

/// userfaultfd access.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UffdProbe {
    /// `/dev/userfaultfd` exists.
    pub dev_exists: bool,
    /// Its mode, octal (`"0600"`), and owner uid:gid.
    pub dev_mode: Option<String>,
    /// Opening it and `USERFAULTFD_IOC_NEW`.
    pub dev_open: Attempt,
    /// `vm.unprivileged_userfaultfd` (0: only privileged processes may use the syscall for
    /// kernel-mode faults; unprivileged need `UFFD_USER_MODE_ONLY`).
    pub unprivileged_sysctl: Option<u32>,
    /// The syscall without `UFFD_USER_MODE_ONLY`.
    pub syscall: Attempt,
    /// The syscall with `UFFD_USER_MODE_ONLY`.
    pub syscall_user_mode_only: Attempt,
    /// The path [`RawUserfaultfd::open`] would use (handler-capable, not user-mode-only).
    pub path: Option<OpenPath>,
    /// Every feature bit and whether the kernel offers it.
    pub features: Vec<FeatureProbe>,
    /// Raw feature mask from `UFFDIO_API`.
    pub feature_bits: u64,
    /// `EVENT_FORK` may be enabled by this process (`CAP_SYS_PTRACE`).
    pub event_fork_permitted: Option<bool>,
    /// Why features could not be read.
    pub api_error: Option<String>,
    /// What an *unprivileged* user (no `CAP_SYS_PTRACE`) can open, from the device's mode
    /// bits and the sysctl: `"handler mode via /dev/userfaultfd"`, `"handler mode via the
    /// syscall"`, or `"user-mode-only via the syscall (embedded SIGBUS mode only)"`.
    pub unprivileged_access: String,
}

/// io_uring.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoUringProbe {
    /// `io_uring_setup` worked.
    pub setup: Attempt,
    /// `IORING_REGISTER_PROBE` worked.
    pub probe: Attempt,
    /// The opcodes USM needs and whether each is supported.
    pub ops: Vec<(String, bool)>,
    /// `/proc/sys/kernel/io_uring_disabled` (0 enabled, 1 restricted, 2 disabled).
    pub disabled_sysctl: Option<u32>,
}

/// `RLIMIT_MEMLOCK` (bytes; `None` = unlimited).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemlockProbe {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// Memory cgroups (for the kernel-baseline benchmarks).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CgroupProbe {
    /// cgroup v2 is mounted at `/sys/fs/cgroup`.
    pub v2_mounted: bool,
    /// The v2 root lists the `memory` controller.
    pub v2_memory: bool,
    /// A v1 `memory` hierarchy is mounted.
    pub v1_memory: bool,
}

/// Whether one mode of USM can run, and what is missing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeReadiness {
    /// `embedded`, `daemon` or `swap`.
    pub mode: &'static str,
    /// Nothing missing.
    pub ready: bool,
    /// What is missing, one advice line each.
    pub missing: Vec<String>,
}

/// Everything `usm doctor` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeReport {
    /// The kernel.
    pub kernel: KernelInfo,
    /// Effective uid.
    pub euid: u32,
    /// userfaultfd.
    pub userfaultfd: UffdProbe,
    /// io_uring.
    pub io_uring: IoUringProbe,
    /// `RLIMIT_MEMLOCK`.
    pub memlock: MemlockProbe,
    /// `/dev/cpu_dma_latency` opened and a 0 µs request written (held while open).
    pub cpu_dma_latency: Attempt,
    /// Memory cgroups.
    pub cgroup: CgroupProbe,
    /// Per mode.
    pub modes: Vec<ModeReadiness>,
}

fn read_u32(path: &str) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn probe_kernel() -> KernelInfo {
    let uts = nix::sys::utsname::uname();
    let (release, machine) = match &uts {
        Ok(u) => (
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::from("?"), String::from("?")),
    };
    let version = parse_version(&release);
    KernelInfo {
        release,
        machine,
        version,
    }
}

fn probe_uffd() -> UffdProbe {
    let handler = OpenFlags {
        nonblock: true,
        cloexec: true,
        user_mode_only: false,
    };
    let umo = OpenFlags {
        user_mode_only: true,
        ..handler
    };
    let meta = std::fs::metadata("/dev/userfaultfd");
    let dev_mode = meta
        .as_ref()
        .ok()
        .map(|m| format!("{:04o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()));
    let dev_open = Attempt::from(RawUserfaultfd::open_via(OpenPath::DevUserfaultfd, handler));
    let syscall = Attempt::from(RawUserfaultfd::open_via(OpenPath::Syscall, handler));
    let syscall_user_mode_only = Attempt::from(RawUserfaultfd::open_via(OpenPath::Syscall, umo));
    let path = if dev_open.ok {
        Some(OpenPath::DevUserfaultfd)
    } else if syscall.ok {
        Some(OpenPath::Syscall)
    } else {
        None
    };
    let (offered, api_error) = match available_features() {
        Ok(f) => (f, None),
        Err(e) => (Features::empty(), Some(e.to_string())),
    };
    let features = Features::NAMED
        .iter()
        .map(|&(name, f)| FeatureProbe {
            name,
            since: f.since(),
            available: offered.contains(f),
        })
        .collect();
    let unprivileged_sysctl = read_u32("/proc/sys/vm/unprivileged_userfaultfd");
    let dev_world_rw = meta.as_ref().is_ok_and(|m| m.mode() & 0o006 == 0o006);
    let unprivileged_access = if dev_world_rw {
        "handler mode via /dev/userfaultfd".to_string()
    } else if unprivileged_sysctl == Some(1) {
        "handler mode via the syscall (vm.unprivileged_userfaultfd=1)".to_string()
    } else {
        "user-mode-only via the syscall (embedded SIGBUS mode only; /dev/userfaultfd needs a \
         group or ACL grant for more)"
            .to_string()
    };
    UffdProbe {
        dev_exists: meta.is_ok(),
        dev_mode,
        dev_open,
        unprivileged_sysctl,
        unprivileged_access,
        syscall,
        syscall_user_mode_only,
        path,
        features,
        feature_bits: offered.bits(),
        event_fork_permitted: event_fork_permitted().ok(),
        api_error,
    }
}

fn probe_io_uring() -> IoUringProbe {
    use io_uring::opcode;
    let needed: [(&str, u8); 4] = [
        ("READ", opcode::Read::CODE),
        ("WRITE", opcode::Write::CODE),
        ("READ_FIXED", opcode::ReadFixed::CODE),
        ("WRITE_FIXED", opcode::WriteFixed::CODE),
    ];
    let disabled_sysctl = read_u32("/proc/sys/kernel/io_uring_disabled");
    let ring = io_uring::IoUring::new(8);
    let setup = Attempt::from(ring.as_ref().map(drop));
    let (probe, ops) = match &ring {
        Ok(ring) => {
            let mut p = io_uring::Probe::new();
            let r = ring.submitter().register_probe(&mut p);
            let ok = r.is_ok();
            let ops = needed
                .iter()
                .map(|&(n, c)| (n.to_string(), ok && p.is_supported(c)))
                .collect();
            (Attempt::from(r), ops)
        }
        Err(_) => (
            Attempt {
                ok: false,
                error: Some("no ring".into()),
            },
            needed
                .iter()
                .map(|&(n, _)| (n.to_string(), false))
                .collect(),
        ),
    };
    IoUringProbe {
        setup,
        probe,
        ops,
        disabled_sysctl,
    }
}

fn probe_memlock() -> MemlockProbe {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    let lim = |v: u64| (v != RLIM_INFINITY).then_some(v);
    match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, hard)) => MemlockProbe {
            soft: lim(soft),
            hard: lim(hard),
        },
        Err(_) => MemlockProbe {
            soft: Some(0),
            hard: Some(0),
        },
    }
}

fn probe_dma_latency() -> Attempt {
    use std::io::Write;
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .and_then(|mut f| f.write_all(&0i32.to_ne_bytes()).map(|()| f));
    // The request holds while the file is open; it is released when `r` drops here.
    Attempt::from(r)
}

fn probe_cgroup() -> CgroupProbe {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let v2_mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/cgroup" && f[2] == "cgroup2"
    });
    let v2_memory = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map(|s| s.split_whitespace().any(|c| c == "memory"))
        .unwrap_or(false);
    let v1_memory = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory")
    });
    CgroupProbe {
        v2_mounted,
        v2_memory,
        v1_memory,
    }
}

fn missing_features(u: &UffdProbe, needed: Features, mode: &str) -> Vec<String> {
    let offered = Features::from_bits_retain(u.feature_bits);
    needed
        .difference(offered)
        .bits_iter()
        .map(|f| {
            format!(
                "userfaultfd feature {} is missing (Linux {}+ is needed for the {mode} mode)",
                f.describe_bit(),
                f.since()
            )
        })
        .collect()
}

impl ProbeReport {
    /// Probes this machine (takes a few milliseconds).
    pub fn collect() -> ProbeReport {
        let kernel = probe_kernel();
        let euid = nix::unistd::geteuid().as_raw();
        let userfaultfd = probe_uffd();
        let io_uring = probe_io_uring();
        let memlock = probe_memlock();
        let cpu_dma_latency = probe_dma_latency();
        let cgroup = probe_cgroup();

        let mut embedded = Vec::new();
        if !userfaultfd.dev_open.ok
            && !userfaultfd.syscall_user_mode_only.ok
            && !userfaultfd.syscall.ok
        {
            embedded.push(
                "no userfaultfd can be opened: make /dev/userfaultfd accessible (chmod/ACL) or \
                 allow the syscall"
                    .to_string(),
            );
        }
        embedded.extend(missing_features(
            &userfaultfd,
            EMBEDDED_FEATURES,
            "embedded",
        ));

        let mut daemon = Vec::new();
        if userfaultfd.path.is_none() {
            daemon.push(
                "no handler-mode userfaultfd (without USER_MODE_ONLY): run as root, grant access \
                 to /dev/userfaultfd, or set vm.unprivileged_userfaultfd=1"
                    .to_string(),
            );
        }
        daemon.extend(missing_features(&userfaultfd, DAEMON_FEATURES, "daemon"));
        if userfaultfd.event_fork_permitted == Some(false) {
            daemon.push("EVENT_FORK is not permitted: the daemon needs CAP_SYS_PTRACE".to_string());
        }

        let mut swap = Vec::new();
        if !io_uring.setup.ok {
            swap.push(format!(
                "io_uring_setup failed ({}): check kernel.io_uring_disabled",
                io_uring.setup.error.as_deref().unwrap_or("?")
            ));
        }
        for (op, ok) in &io_uring.ops {
            if !ok && io_uring.setup.ok {
                swap.push(format!("io_uring opcode {op} is not supported"));
            }
        }
        let modes = vec![
            ModeReadiness {
                mode: "embedded",
                ready: embedded.is_empty(),
                missing: embedded,
            },
            ModeReadiness {
                mode: "daemon",
                ready: daemon.is_empty(),
                missing: daemon,
            },
            ModeReadiness {
                mode: "swap",
                ready: swap.is_empty(),
                missing: swap,
            },
        ];
        ProbeReport {
            kernel,
            euid,
            userfaultfd,
            io_uring,
            memlock,
            cpu_dma_latency,
            cgroup,
            modes,
        }
    }

    /// Every mode is ready.
    pub fn all_ready(&self) -> bool {
        self.modes.iter().all(|m| m.ready)
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn attempt(a: &Attempt) -> String {
    match &a.error {
        None if a.ok => "ok".into(),
        Some(e) => format!("failed: {e}"),
        None => "failed".into(),
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.kernel;
        writeln!(
            f,
            "kernel            {} ({}), euid {}",
            k.release, k.machine, self.euid
        )?;
        let u = &self.userfaultfd;
        writeln!(f, "userfaultfd")?;
        writeln!(
            f,
            "  /dev/userfaultfd  {} {}",
            if u.dev_exists { "present" } else { "absent" },
            u.dev_mode.as_deref().unwrap_or("")
        )?;
        writeln!(f, "    open            {}", attempt(&u.dev_open))?;
        writeln!(
            f,
            "  syscall           {} (user-mode-only: {})",
            attempt(&u.syscall),
            attempt(&u.syscall_user_mode_only)
        )?;
        match u.unprivileged_sysctl {
            Some(v) => writeln!(f, "  vm.unprivileged_userfaultfd = {v}")?,
            None => writeln!(f, "  vm.unprivileged_userfaultfd: not readable")?,
        }
        writeln!(f, "  unprivileged users: {}", u.unprivileged_access)?;
        writeln!(
            f,
            "  handler path      {}",
            u.path.map_or_else(|| "none".to_string(), |p| p.to_string())
        )?;
        if let Some(e) = &u.api_error {
            writeln!(f, "  UFFDIO_API        failed: {e}")?;
        }
        for feat in &u.features {
            writeln!(
                f,
                "  {:<20} {:<4} (Linux {})",
                feat.name,
                if feat.available { "yes" } else { "NO" },
                feat.since
            )?;
        }
        if let Some(p) = u.event_fork_permitted {
            writeln!(f, "  EVENT_FORK permitted: {}", yes(p))?;
        }
        let io = &self.io_uring;
        writeln!(
            f,
            "io_uring          setup {}, probe {}",
            attempt(&io.setup),
            attempt(&io.probe)
        )?;
        for (op, ok) in &io.ops {
            writeln!(f, "  {op:<20} {}", yes(*ok))?;
        }
        let lim =
            |v: Option<u64>| v.map_or("unlimited".to_string(), |b| format!("{} KiB", b / 1024));
        writeln!(
            f,
            "RLIMIT_MEMLOCK    soft {}, hard {}",
            lim(self.memlock.soft),
            lim(self.memlock.hard)
        )?;
        writeln!(f, "cpu_dma_latency   {}", attempt(&self.cpu_dma_latency))?;
        let c = &self.cgroup;
        writeln!(
            f,
            "cgroup            v2 {} (memory controller {}), v1 memory {}",
            yes(c.v2_mounted),
            yes(c.v2_memory),
            yes(c.v1_memory)
        )?;
        for m in &self.modes {
            writeln!(
                f,
                "mode {:<9}    {}",
                m.mode,
                if m.ready { "ready" } else { "NOT ready" }
            )?;
            for line in &m.missing {
                writeln!(f, "  advice: {line}")?;
            }
        }
        if self.euid != 0 && self.memlock.soft.is_some_and(|s| s < 64 << 20) {
            writeln!(
                f,
                "advice: RLIMIT_MEMLOCK is small; a locked pool (LockMode::OnFault) needs it \
                 raised (ulimit -l) or CAP_IPC_LOCK"
            )?;
        }
        if !self.cpu_dma_latency.ok {
            writeln!(
                f,
                "advice: /dev/cpu_dma_latency cannot be held: benchmarks cannot pin PM-QoS \
                 (run as root)"
            )?;
        }
        if !c.v2_memory && !c.v1_memory {
            writeln!(
                f,
                "advice: no memory cgroup: the kernel-baseline benchmarks cannot limit memory"
            )?;
        }
        Ok(())
    }
}
