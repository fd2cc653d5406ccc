//! Veil: transparent WireGuard encryption and identity-based policy for
//! Kubernetes pods, steered by eBPF, with no proxy.
//!
//! The crate is split by concern (see ARCHITECTURE.md):
//! - [`cluster`]: cluster state and its sources (the file source today);
//! - [`reconcile`] and [`identity`]: the pure core, cluster state -> desired datapath state;
//! - [`wireguard`]: the userspace WireGuard engine on `boringtun::noise`;
//! - [`datapath`]: the eBPF programs and their maps (aya);
//! - [`netlink`]: routes, rules and link lookups;
//! - [`policy`]: NetworkPolicy and VeilPolicy, compiled into BPF policy map entries;
//! - [`agent`]: the runtime that wires sources, reconciler and appliers together.

pub mod agent;
pub mod cluster;
pub mod crd;
pub mod datapath;
pub mod identity;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod reconcile;
pub mod wireguard;
