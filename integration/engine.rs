//! engine tests (in progress)
mod harness;
