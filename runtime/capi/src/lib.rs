//! `libusm.so`: the C API (`usm_hint`) for tagged programs.
