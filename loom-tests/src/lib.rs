//! Loom models of USM's concurrent parts. The tests live in `tests/` and only do
//! anything under `RUSTFLAGS="--cfg loom"`; see `.ci/run`.

#![deny(unsafe_code)]
