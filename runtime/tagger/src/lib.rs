//! `libusm_tagger.so`: the `LD_PRELOAD` library that attaches a program to a USM daemon.
