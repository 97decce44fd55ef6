//! `usm-policies`: the policy API, the registry and the built-in policies.
//!
//! Policies are why USM exists: a few dozen lines of safe Rust decide, for one program,
//! which frames back a fault ([`AllocPolicy`]), which pages leave memory
//! ([`EvictPolicy`]) and what happens when memory runs out ([`OomPolicy`]). The runtime
//! executes their answers. This crate holds no `unsafe` and touches no kernel interface:
//! a policy sees the world only through the context traits [`Cx`] / [`EvictCx`] the
//! runtime implements on each worker.
//!
//! This crate alone is enough to write a policy: the vocabulary a policy reads and
//! returns ([`Fault`], [`Origin`], [`Event`], [`FrameNo`], [`SwapEntry`], [`Ticket`],
//! [`PAGE_SIZE`]) is re-exported from `usm-types`, a crate of plain types, so a policy
//! crate compiles no io_uring, nix or userfaultfd code (`cargo tree -p usm-policies -e
//! normal` shows it; CI checks it).
//!
//! - [`alloc`], [`evict`], [`oom`]: the three traits and the protocol around each.
//! - [`cx`]: the context, and who owns a frame at each step.
//! - [`decision`]: [`Decision::Map`] / [`Decision::Yield`] / [`Decision::Oom`]; the
//!   single-frame mapping is stored inline, so the fault fast path allocates nothing.
//! - [`hint`]: the USM hint language (`"PRIORITY=HIGH; EVICTION=DENY"`) and [`HintMap`].
//! - [`registry`]: names and parameters (`fhp:64K`), defaults, per-process and per-region
//!   assignments.
//! - [`builtin`]: `first-fit`/`policyOne`, `fhp:SIZE`, `quota:PAGES`, `fifo`, `clock`, `two-list`,
//!   `hints`, `fail`, `evict-harder`, `kill-largest`.
//! - [`guard`]: how the runtime keeps a panicking policy from taking the daemon down.
//! - [`sim`]: a simulated machine that checks every answer — a test harness, not the real
//!   frame pool.
//!
//! # A complete custom policy
//!
//! Map two pages per fault when the next page is vacant and frames are plentiful,
//! otherwise one (24 lines); then register it under a name, assign it to a process, and
//! run it on the simulator:
//!
//! ```
//! use usm_policies::sim::{FaultOutcome, SimMachine};
//! use usm_policies::{AllocPolicy, Cx, Decision, Fault, Mapping, PageMask, Param, Registry};
//! use usm_policies::{page_floor, swap_in_if_swapped};
//!
//! struct Pairs;
//!
//! impl AllocPolicy for Pairs {
//!     fn name(&self) -> &str { "pairs" }
//!
//!     fn alloc(&mut self, fault: &Fault, cx: &mut dyn Cx) -> Decision {
//!         if let Some(d) = swap_in_if_swapped(fault, cx) {
//!             return d; // the page has content (staging or swap): get it back
//!         }
//!         let (pid, addr) = (fault.origin.pid, page_floor(fault.addr));
//!         let mut vacant = PageMask::new();
//!         cx.vacant(pid, addr, 2, &mut vacant); // the next page too?
//!         if vacant.get(1) && cx.free_frames() >= 2 + cx.watermarks().low {
//!             let mut frames = Vec::with_capacity(2);
//!             if cx.take_frames(2, &mut frames) {
//!                 if let Some(m) = Mapping::run(addr, frames) { return Decision::Map(m); }
//!             }
//!         }
//!         match cx.take_frame() { // the allocation-free single-page path
//!             Some(f) => Decision::Map(Mapping::one(addr, f)),
//!             None => Decision::Oom, // the runtime evicts, then asks the OOM policy
//!         }
//!     }
//! }
//!
//! let mut reg = Registry::with_builtins();
//! reg.register_alloc("pairs", Param::None, |_| Ok(Box::new(Pairs)))?;
//! reg.assign_process("myapp", "pairs")?; // the config's `process myapp pairs`
//! let set = reg.for_process("myapp")?.expect("assigned");
//! let mut m = SimMachine::new(64, Default::default(), set.evict, set.oom);
//! m.add_process(7, "myapp", 0x10000..0x20000, set.alloc);
//! assert_eq!(m.fault(7, 0x10000, true), Ok(FaultOutcome::Mapped(2)));
//! assert_eq!(m.fault(7, 0x11000, false), Ok(FaultOutcome::AlreadyPresent));
//! assert_eq!(m.fault(7, 0x1f000, false), Ok(FaultOutcome::Mapped(1))); // region end
//! m.check().expect("frames conserved, none handed out twice");
//! # Ok::<(), usm_policies::PolicyError>(())
//! ```
//!
//! # Run it
//!
//! The simulator above checks a policy's answers; to run it on real programs, register it
//! where the runtime builds its policies:
//!
//! - **Daemon** (`usm run CONFIG`, `usm exec -- PROGRAM`): a binary of five lines is a
//!   complete `usm` that knows your policy — `usm_runtime::cli::main_with(register)`, where
//!   `register` is a `fn(&mut Registry) -> Result<(), PolicyError>` calling
//!   [`Registry::register_alloc`] / [`Registry::register_evict`] /
//!   [`Registry::register_oom`]. Its `run`, `exec` and `check-config` accept the name
//!   wherever a config names a policy (`process myapp pairs`, `evict random`).
//!   `usm-runtime`'s `examples/evict_policy.rs` is one, an eviction policy, with the
//!   commands to build and run it.
//! - **Embedded** (your program is the runtime): give the registry to the builder,
//!   `Runtime::builder().alloc_policy("pairs").build_with_registry(reg)`, or name the
//!   policy per region with `rt.region_with_policy(bytes, "pairs")`.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod builtin;
pub mod cx;
pub mod decision;
pub mod error;
pub mod evict;
pub mod guard;
pub mod hint;
pub mod oom;
pub mod registry;
pub mod sim;

pub use alloc::{AllocPolicy, deliver, swap_in_if_swapped};
pub use cx::{Access, Cx, EvictCx, PageMask, ProcessCounters, Watermarks};
pub use decision::{Decision, Frames, Mapping, page_floor};
pub use error::PolicyError;
pub use evict::{EvictPolicy, MappedPage, Scope, Urgency, VictimRequest, VictimScan};
pub use guard::{PolicyPanic, guarded};
pub use hint::{Eviction, Hint, HintError, HintErrorKind, HintMap, Priority, parse_size};
pub use oom::{OomAction, OomPolicy, OomReason, OomSituation, RunMode};
pub use registry::{Assignment, Param, PolicyKind, PolicySet, Registry, split_spec};
/// The vocabulary crate (plain types), for paths such as `usm_policies::types::event`.
pub use usm_types as types;
pub use usm_types::{DeviceId, Event, Fault, FrameNo, Origin, PAGE_SIZE, SwapEntry, Ticket};
