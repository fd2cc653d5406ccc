//! The network-namespace test harness (see integration/README.md).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod netns;
