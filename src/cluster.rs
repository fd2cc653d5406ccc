//! Cluster state as Veil sees it, independent of where it came from.
//!
//! Sources (`file` today, `kube` later) turn Kubernetes objects into a
//! [`ClusterState`]; the reconciler turns that into the desired datapath state.
//! Everything here is plain data: no I/O.

pub mod file;
pub mod objects;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A WireGuard (X25519) public key, as raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", keymgr::encode_key(&self.0))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&keymgr::encode_key(&self.0))
    }
}

/// A `v1 Node`, reduced to what Veil uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `spec.podCIDRs` (falling back to `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// The first `InternalIP` in `status.addresses`.
    pub internal_ip: Option<IpAddr>,
}

/// A `v1 Pod`, reduced to what Veil uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    /// `status.podIP`: the first of `pod_ips`.
    pub pod_ip: Option<IpAddr>,
    /// `status.podIP` followed by the other `status.podIPs` (dual stack);
    /// empty while the pod has no IP or after it terminated.
    pub pod_ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such pods share the node's address and are not endpoints.
    pub host_network: bool,
}

/// A `v1 Namespace`, reduced to its labels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A node's `VeilNode` announcement: what its peers need to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The node this announcement speaks for (`metadata.name`).
    pub node: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub pod_cidrs: Vec<IpNet>,
    /// Explicit endpoint; when absent, peers use the Node's InternalIP and `listen_port`.
    pub endpoint: Option<SocketAddr>,
}

/// The cluster-wide `VeilClusterConfig` named `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `spec.encryption.enabled`; off when no config object exists.
    pub encryption_enabled: bool,
    /// `spec.encryption.strict`; on unless explicitly disabled.
    pub strict: bool,
    /// `spec.clusterPodCIDRs`: the ranges all pod CIDRs are allocated from
    /// (kube-controller-manager's `--cluster-cidr`). In strict mode, traffic to
    /// an address in them that is neither local nor served by a peer is
    /// dropped — this covers a node whose Node object is gone or not yet seen.
    pub cluster_pod_cidrs: Vec<IpNet>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            encryption_enabled: false,
            strict: true,
            cluster_pod_cidrs: Vec::new(),
        }
    }
}

/// Everything a source knows, keyed for deterministic iteration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Keyed by `(namespace, name)`.
    pub pods: BTreeMap<(String, String), PodInfo>,
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// Keyed by node name.
    pub announcements: BTreeMap<String, Announcement>,
    pub config: ClusterConfig,
    /// Validated `NetworkPolicy` and `VeilPolicy` objects, keyed by
    /// `Kind/namespace/name`.
    pub policies: BTreeMap<String, crate::policy::Policy>,
    /// Where each object came from, by object reference (`Node/n1`,
    /// `Pod/default/web`): a file path for the file source. Lets problems
    /// found later (while reconciling) still name the file to fix.
    pub origins: BTreeMap<String, String>,
}

/// Something wrong with one object from outside: it is skipped, the rest is used.
///
/// `source` names where it came from (a file path, or `kube`), `object` the
/// object (`Node/n1`, `Pod/default/web`), `problem` what the operator must fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub source: String,
    pub object: String,
    pub problem: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.object, self.problem)
    }
}
