//! Test harness: starts controllers and workers on loopback.
