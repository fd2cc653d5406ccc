//! bpf tests (in progress)
mod harness;
