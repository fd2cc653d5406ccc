//! The reconciler: a pure function from cluster state to the desired datapath
//! state of one node. Appliers (engine, BPF maps, routes) diff it against
//! what they have.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::cluster::{ClusterState, Diagnostic, PublicKey};
use crate::identity::Identity;

/// One WireGuard peer: a remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// The node's pod CIDRs (cryptokey routing: only these sources are accepted from it).
    pub allowed_ips: Vec<IpNet>,
}

/// A remote pod CIDR and who serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCidr {
    pub node: String,
    /// The peer that serves it, or `None` when the node has not announced a
    /// usable key yet (strict mode drops such traffic instead of sending it in plaintext).
    pub peer: Option<PublicKey>,
}

/// A pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub namespace: String,
    pub name: String,
    pub identity: Identity,
}

/// What this node's datapath should look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub encryption_enabled: bool,
    pub strict: bool,
    /// This node's own pod CIDRs (from its Node object).
    pub local_pod_cidrs: Vec<IpNet>,
    /// Keyed by the remote node's name.
    pub peers: BTreeMap<String, PeerSpec>,
    /// Every remote pod CIDR known from Node objects.
    pub remote_cidrs: BTreeMap<IpNet, RemoteCidr>,
    /// Pods scheduled on this node that have an IP.
    pub local_endpoints: BTreeMap<IpAddr, LocalEndpoint>,
    /// Identity of every remote pod IP (the receive side trusts these because
    /// cryptokey routing authenticated the source address).
    pub ipcache: BTreeMap<IpAddr, Identity>,
}

/// The result of one reconcile: the desired state plus what was skipped and why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub desired: Desired,
    pub diagnostics: Vec<Diagnostic>,
}

/// Computes this node's desired state. Pure: no I/O, no clock.
pub fn desired(_state: &ClusterState, _node: &str) -> Outcome {
    todo!("implemented by the cluster/reconcile work")
}
