//! datapath tests (in progress)
mod harness;
