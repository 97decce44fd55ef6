//! The memory-manager core shared by the embedded runtime and the daemon (being written).
