//! The wire protocol between tagged programs and the USM daemon.
