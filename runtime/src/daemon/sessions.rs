//! Session accounting: how many taggers one user, and one process, may attach, and how
//! many connections may be waiting for their Hello at once.
//!
//! Every session costs the daemon two threads (the userfaultfd reader and the control
//! thread) and a [`PageMap`](super::space::PageMap); an admission in progress costs one
//! thread for up to [`HELLO_TIMEOUT`](usm_proto::server::HELLO_TIMEOUT). Without limits,
//! one process saying Hello 200 times made 419 threads. So:
//!
//! 1. The accept loop reads `SO_PEERCRED` (no data from the peer needed, never blocks)
//!    and checks the [`PeerRule`](usm_proto::server::PeerRule) first.
//! 2. It then asks [`open`] for a [`SessionGuard`] (counted against the peer's uid and
//!    pid) and an [`AdmissionSlot`] (counted against all admissions in progress and the
//!    uid's). Over any limit, the peer gets `Refused(Busy)` naming the limit, at once,
//!    on the accept thread: no thread is started for it.
//! 3. The admission thread holds the slot until the verdict is sent, then drops it.
//!    The session guard lives in the managed process's `Proc` and is dropped with it
//!    (after the process exits or the daemon lets it go); a refused peer drops it when
//!    its admission ends.
//!
//! Fork children of a managed process say Hello with their own pid: each is a session
//! of its own, counted against the same uid (adopted into the space made at its fork,
//! whose `Proc` then holds the guard).

use std::collections::HashMap;
use std::fmt;
use usm_sync::{Arc, Mutex};

/// The limits (see the module docs). `usm run` reads them from the environment
/// (`USM_MAX_SESSIONS_PER_UID`, `USM_MAX_SESSIONS_PER_PROCESS`): they are about the
/// machine's users, not about one config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions (admitted or being admitted) of one uid.
    pub per_uid: usize,
    /// Sessions of one process (pid). A program that `exec`s says Hello again before
    /// its first session has ended, hence more than one.
    pub per_process: usize,
    /// Admissions in progress (threads waiting for a Hello), all users together.
    pub admitting: usize,
    /// Admissions in progress of one uid (so one user cannot starve the others).
    pub admitting_per_uid: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            per_uid: 128,
            per_process: 4,
            admitting: 64,
            admitting_per_uid: 8,
        }
    }
}

impl SessionLimits {
    /// The defaults, with `USM_MAX_SESSIONS_PER_UID` / `USM_MAX_SESSIONS_PER_PROCESS`
    /// applied when set to a number ≥ 1 (anything else is ignored with a warning).
    pub fn from_env() -> SessionLimits {
        let mut l = SessionLimits::default();
        for (var, field) in [
            ("USM_MAX_SESSIONS_PER_UID", &mut l.per_uid),
            ("USM_MAX_SESSIONS_PER_PROCESS", &mut l.per_process),
        ] {
            if let Ok(v) = std::env::var(var) {
                match v.trim().parse::<usize>() {
                    Ok(n) if n >= 1 => *field = n,
                    _ => tracing::warn!("{var}={v:?} is not a number ≥ 1; using {field}"),
                }
            }
        }
        l
    }
}

/// Why a connection was turned away (sent to the peer as the `Refused` text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LimitHit {
    /// The uid has `limit` sessions already.
    Uid { uid: u32, limit: usize },
    /// The process has `limit` sessions already.
    Process { pid: u32, limit: usize },
    /// `limit` admissions are in progress (all users, or this uid's).
    Admissions { limit: usize },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::Uid { uid, limit } => {
                write!(f, "uid {uid} has {limit} sessions already (the limit)")
            }
            LimitHit::Process { pid, limit } => {
                write!(f, "pid {pid} has {limit} sessions already (the limit)")
            }
            LimitHit::Admissions { limit } => {
                write!(
                    f,
                    "{limit} admissions are in progress (the limit); retry later"
                )
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    by_uid: HashMap<u32, usize>,
    by_pid: HashMap<u32, usize>,
    admitting: usize,
    admitting_by_uid: HashMap<u32, usize>,
}

/// The daemon's session table.
#[derive(Debug)]
pub(crate) struct Sessions {
    limits: SessionLimits,
    counts: Mutex<Counts>,
}

/// One session counted against its uid and pid; uncounted on drop.
pub(crate) struct SessionGuard {
    table: Arc<Sessions>,
    uid: u32,
    pid: u32,
}

/// One admission in progress; uncounted on drop.
#[derive(Debug)]
pub(crate) struct AdmissionSlot {
    table: Arc<Sessions>,
    uid: u32,
}

fn dec(map: &mut HashMap<u32, usize>, key: u32) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Sessions {
    pub(crate) fn new(limits: SessionLimits) -> Arc<Sessions> {
        Arc::new(Sessions {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> usm_sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions of `uid` now (admitted or being admitted).
    #[cfg(test)]
    fn of_uid(&self, uid: u32) -> usize {
        self.lock().by_uid.get(&uid).copied().unwrap_or(0)
    }
}

/// Counts a new connection from `uid`/`pid`: a session and an admission slot, or the
/// limit it hits (nothing counted then).
pub(crate) fn open(
    table: &Arc<Sessions>,
    uid: u32,
    pid: u32,
) -> Result<(SessionGuard, AdmissionSlot), LimitHit> {
    let l = table.limits;
    let mut c = table.lock();
    let of_uid = c.by_uid.get(&uid).copied().unwrap_or(0);
    if of_uid >= l.per_uid {
        return Err(LimitHit::Uid {
            uid,
            limit: l.per_uid,
        });
    }
    if c.by_pid.get(&pid).copied().unwrap_or(0) >= l.per_process {
        return Err(LimitHit::Process {
            pid,
            limit: l.per_process,
        });
    }
    if c.admitting >= l.admitting {
        return Err(LimitHit::Admissions { limit: l.admitting });
    }
    if c.admitting_by_uid.get(&uid).copied().unwrap_or(0) >= l.admitting_per_uid {
        return Err(LimitHit::Admissions {
            limit: l.admitting_per_uid,
        });
    }
    *c.by_uid.entry(uid).or_default() += 1;
    *c.by_pid.entry(pid).or_default() += 1;
    c.admitting += 1;
    *c.admitting_by_uid.entry(uid).or_default() += 1;
    drop(c);
    Ok((
        SessionGuard {
            table: table.clone(),
            uid,
            pid,
        },
        AdmissionSlot {
            table: table.clone(),
            uid,
        },
    ))
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut c = self.table.lock();
        dec(&mut c.by_uid, self.uid);
        dec(&mut c.by_pid, self.pid);
    }
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        let mut c = self.table.lock();
        c.admitting = c.admitting.saturating_sub(1);
        dec(&mut c.admitting_by_uid, self.uid);
    }
}

impl fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionGuard(uid {}, pid {})", self.uid, self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            per_uid: 3,
            per_process: 2,
            admitting: 4,
            admitting_per_uid: 2,
        }
    }

    #[test]
    fn limits_per_process_uid_and_admission() {
        let t = Sessions::new(limits());
        let (s1, a1) = open(&t, 1000, 10).unwrap();
        let (s2, a2) = open(&t, 1000, 10).unwrap();
        // Two admissions of uid 1000 in progress: the third waits for one to end.
        assert_eq!(
            open(&t, 1000, 11).unwrap_err(),
            LimitHit::Admissions { limit: 2 }
        );
        drop((a1, a2));
        assert_eq!(
            open(&t, 1000, 10).unwrap_err(),
            LimitHit::Process { pid: 10, limit: 2 }
        );
        let (s3, a3) = open(&t, 1000, 11).unwrap();
        drop(a3);
        assert_eq!(
            open(&t, 1000, 12).unwrap_err(),
            LimitHit::Uid {
                uid: 1000,
                limit: 3
            }
        );
        // Another user is not affected.
        let other = open(&t, 1001, 20).unwrap();
        assert_eq!(t.of_uid(1000), 3);
        drop((s1, s2, s3, other));
        assert_eq!(t.of_uid(1000), 0);
        assert!(t.lock().by_pid.is_empty() && t.lock().admitting == 0);
        assert!(open(&t, 1000, 10).is_ok());
    }

    #[test]
    fn admissions_are_bounded_across_users() {
        let t = Sessions::new(limits());
        let held: Vec<_> = (0..4).map(|u| open(&t, u, 100 + u).unwrap()).collect();
        assert_eq!(
            open(&t, 9, 109).unwrap_err(),
            LimitHit::Admissions { limit: 4 }
        );
        drop(held);
        assert!(open(&t, 9, 109).is_ok());
    }
}
