//! Everything `unsafe` in the runtime: the SIGBUS fault handler and its lock-free tables,
//! futex waits, region mappings and raw page copies. The rest of the crate is safe.

pub(crate) mod baseline;
pub(crate) mod install;
pub(crate) mod net;
pub(crate) mod remote;
pub(crate) mod sigbus;
pub(crate) mod spawn;
pub(crate) mod view;
