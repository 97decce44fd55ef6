//! Everything `unsafe` in the memory manager: swap I/O straight to and from pool slots and
//! page copies between slots. The rest of the crate is safe.

pub(crate) mod io;
