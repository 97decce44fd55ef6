//! Keeping a panicking policy from taking the daemon down.
//!
//! Policies are user code. The runtime calls each policy method through [`guarded`]: a
//! panic becomes a [`PolicyPanic`] value, the runtime fails the one access that was being
//! served (as an OOM `FailAccess` would), logs the message, drops the panicked instance and
//! builds a fresh one from the [`Registry`](crate::Registry).
//!
//! `guarded` uses `AssertUnwindSafe`: this is sound here because the instance that
//! panicked is never called again, and the runtime's own state touched through the
//! context is kept consistent by the runtime (it reclaims frames a policy took during the
//! failed call from its own taken-frames record). That is why the policy traits do not
//! require `UnwindSafe`: a policy may hold `RefCell`s, `Mutex`es or anything else `Send`.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A policy call that panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy `{policy}` panicked: {message}")]
pub struct PolicyPanic {
    /// The policy's name.
    pub policy: String,
    /// The panic message (`"<non-string panic payload>"` when it was not a string).
    pub message: String,
}

/// Runs `call` (one policy method call), turning a panic into `Err(PolicyPanic)`.
pub fn guarded<R>(policy: &str, call: impl FnOnce() -> R) -> Result<R, PolicyPanic> {
    catch_unwind(AssertUnwindSafe(call)).map_err(|payload| PolicyPanic {
        policy: policy.to_owned(),
        message: message(&*payload),
    })
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_values_pass_through() {
        assert_eq!(guarded("ok", || 5), Ok(5));
        let e = guarded("bad", || -> u32 { panic!("frame {} twice", 3) }).unwrap_err();
        assert_eq!(e.policy, "bad");
        assert_eq!(e.message, "frame 3 twice");
        let e = guarded("bad", || std::panic::panic_any(17u8)).unwrap_err();
        assert_eq!(e.message, "<non-string panic payload>");
    }
}
