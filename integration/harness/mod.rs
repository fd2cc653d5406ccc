//! The network-namespace test harness (see integration/README.md).
//!
//! Layers, bottom up: [`netns`] (namespaces removed on drop), [`process`] (children
//! killed on drop), [`topology`] (underlay bridge, node and pod namespaces, host-gw
//! routes), [`cluster`] (the YAML cluster directory), [`agent`] / [`wggo`] (the
//! WireGuard speakers), [`capture`] (tcpdump on every underlay port, pcap analysis),
//! [`traffic`] (the `veil-probe` servers and clients) and [`fixture`] (all of it
//! wired together for one test).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod agent;
pub mod capture;
pub mod cluster;
pub mod fixture;
pub mod interrupt;
pub mod netns;
pub mod process;
pub mod topology;
pub mod traffic;
pub mod wggo;

use std::time::{Duration, Instant};

/// Polls `f` every `every` until it returns `Some` or `timeout` passes; the
/// deterministic replacement for a fixed sleep.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
