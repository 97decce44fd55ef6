//! InstanceUSM, the daemon (being written).
