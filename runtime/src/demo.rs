//! The swap-storm demo run by the README's main command (being written).

/// Options of `usm demo`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DemoArgs {}
