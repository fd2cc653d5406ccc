//! The reconciler: a pure function from cluster state to the desired datapath
//! state of one node. Appliers (engine, BPF maps, routes) diff it against
//! what they have.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::cluster::{ClusterState, Diagnostic, PublicKey};
use crate::identity::{identity_for, Identity};

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

/// `Diagnostic::source` of problems found while reconciling: they concern
/// the combination of objects, not one file.
pub const DIAGNOSTIC_SOURCE: &str = "reconcile";

/// Whether two prefixes share any address (one contains the other).
/// Prefixes of different families never overlap.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

fn list(cidrs: &[IpNet]) -> String {
    if cidrs.is_empty() {
        return "none".into();
    }
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

struct Diags(Vec<Diagnostic>);

impl Diags {
    fn push(&mut self, object: String, problem: String) {
        self.0.push(Diagnostic {
            source: DIAGNOSTIC_SOURCE.into(),
            object,
            problem,
        });
    }
}

/// Computes this node's desired state. Pure: no I/O, no clock; the same
/// input always gives the same output (every collection is ordered).
///
/// Conflicts are resolved deterministically so that every node decides the
/// same way: of two overlapping pod CIDRs the node whose name sorts first
/// keeps it; of two pods with the same IP the one whose `(namespace, name)`
/// sorts first keeps it.
pub fn desired(state: &ClusterState, node: &str) -> Outcome {
    let mut diags = Diags(Vec::new());
    let mut d = Desired {
        encryption_enabled: state.config.encryption_enabled,
        strict: state.config.strict,
        ..Desired::default()
    };
    match state.nodes.get(node) {
        Some(own) => d.local_pod_cidrs = own.pod_cidrs.clone(),
        None => diags.push(
            format!("Node/{node}"),
            "this node has no Node object: no local pod CIDRs, so no local endpoints".into(),
        ),
    }

    let surviving = remote_cidrs(state, node, &mut d, &mut diags);
    peers(state, node, &surviving, &mut d, &mut diags);
    endpoints(state, node, &surviving, &mut d, &mut diags);

    Outcome {
        desired: d,
        diagnostics: diags.0,
    }
}

/// Fills `remote_cidrs` (all with `peer: None`) and returns, per remote
/// node, the CIDRs that survived the overlap checks.
fn remote_cidrs<'s>(
    state: &'s ClusterState,
    node: &str,
    d: &mut Desired,
    diags: &mut Diags,
) -> BTreeMap<&'s str, Vec<IpNet>> {
    let mut accepted: Vec<(IpNet, &str)> = Vec::new();
    let mut surviving: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
    // BTreeMap iteration is by node name: the first name wins a conflict.
    for (name, info) in &state.nodes {
        if name == node {
            continue;
        }
        for cidr in &info.pod_cidrs {
            // Traffic to our own pods must never be sent to another node.
            if let Some(own) = d.local_pod_cidrs.iter().find(|own| overlaps(own, cidr)) {
                diags.push(
                    format!("Node/{name}"),
                    format!(
                        "pod CIDR {cidr} of Node/{name} overlaps {own} of this node (Node/{node}); skipped"
                    ),
                );
                continue;
            }
            if let Some((other, owner)) = accepted
                .iter()
                .find(|(other, owner)| *owner != name.as_str() && overlaps(other, cidr))
            {
                diags.push(
                    format!("Node/{name}"),
                    format!(
                        "pod CIDR {cidr} of Node/{name} overlaps {other} of Node/{owner}; skipped"
                    ),
                );
                continue;
            }
            accepted.push((*cidr, name));
            surviving.entry(name.as_str()).or_default().push(*cidr);
            d.remote_cidrs.insert(
                *cidr,
                RemoteCidr {
                    node: name.clone(),
                    peer: None,
                },
            );
        }
    }
    surviving
}

/// Fills `peers` and sets `peer` on the remote CIDRs each peer serves.
fn peers(
    state: &ClusterState,
    node: &str,
    surviving: &BTreeMap<&str, Vec<IpNet>>,
    d: &mut Desired,
    diags: &mut Diags,
) {
    let mut by_key: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for (name, ann) in &state.announcements {
        if !state.nodes.contains_key(name) {
            diags.push(
                format!("VeilNode/{name}"),
                format!("announcement for unknown node {name} (no Node object); ignored"),
            );
            continue;
        }
        by_key.entry(ann.public_key).or_default().push(name);
    }
    for (key, names) in &by_key {
        if names.len() > 1 {
            for name in names {
                diags.push(
                    format!("VeilNode/{name}"),
                    format!(
                        "public key {key} is announced by {} nodes ({}); none of them gets a peer until each has its own key",
                        names.len(),
                        names.join(", ")
                    ),
                );
            }
        }
    }

    for (name, info) in &state.nodes {
        if name == node {
            continue;
        }
        let object = format!("VeilNode/{name}");
        let Some(ann) = state.announcements.get(name) else {
            if d.encryption_enabled {
                diags.push(
                    format!("Node/{name}"),
                    format!("no VeilNode announcement for {name} yet: no peer, its pod CIDRs have no encrypted path"),
                );
            }
            continue;
        };
        if by_key.get(&ann.public_key).is_some_and(|n| n.len() > 1) {
            continue; // diagnosed above
        }
        if !keymgr::is_usable_public_key(&ann.public_key.0) {
            diags.push(
                object,
                format!(
                    "public key {} is a small-order point (all handshakes would share a zero secret); no peer",
                    ann.public_key
                ),
            );
            continue;
        }
        let endpoint = match (ann.endpoint, info.internal_ip) {
            (Some(endpoint), _) => endpoint,
            (None, Some(ip)) => SocketAddr::new(ip, ann.listen_port),
            (None, None) => {
                diags.push(
                    object,
                    format!("no endpoint: spec.endpoint is unset and Node/{name} has no InternalIP; no peer"),
                );
                continue;
            }
        };
        let usable = surviving
            .get(name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut allowed_ips = Vec::new();
        for cidr in &ann.pod_cidrs {
            if !info.pod_cidrs.contains(cidr) {
                diags.push(
                    object.clone(),
                    format!(
                        "claims pod CIDR {cidr}, which Node/{name} does not have ({}); not allowed",
                        list(&info.pod_cidrs)
                    ),
                );
            } else if usable.contains(cidr) {
                allowed_ips.push(*cidr);
            }
            // else: the Node's CIDR lost an overlap, diagnosed already.
        }
        for cidr in &allowed_ips {
            if let Some(remote) = d.remote_cidrs.get_mut(cidr) {
                remote.peer = Some(ann.public_key);
            }
        }
        d.peers.insert(
            name.clone(),
            PeerSpec {
                node: name.clone(),
                public_key: ann.public_key,
                endpoint,
                allowed_ips,
            },
        );
    }
}

/// Fills `local_endpoints` and `ipcache` from the pods.
fn endpoints(
    state: &ClusterState,
    node: &str,
    surviving: &BTreeMap<&str, Vec<IpNet>>,
    d: &mut Desired,
    diags: &mut Diags,
) {
    let mut owner_of_ip: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut identities: BTreeMap<Identity, (&str, &BTreeMap<String, String>)> = BTreeMap::new();
    for ((namespace, name), pod) in &state.pods {
        let object = format!("Pod/{namespace}/{name}");
        if pod.host_network {
            continue; // shares the node's address: not an endpoint
        }
        // `pod_ips` is authoritative; `pod_ip` alone covers hand-built states.
        let ips: Vec<IpAddr> = if pod.pod_ips.is_empty() {
            pod.pod_ip.into_iter().collect()
        } else {
            pod.pod_ips.clone()
        };
        if ips.is_empty() {
            continue; // not running yet (or terminated): nothing to route
        }
        let Some(pod_node) = pod.node_name.as_deref() else {
            diags.push(object, "has an IP but no spec.nodeName; skipped".into());
            continue;
        };
        if !state.nodes.contains_key(pod_node) {
            diags.push(
                object,
                format!("scheduled on node {pod_node}, which has no Node object; skipped"),
            );
            continue;
        }
        let identity = identity_for(namespace, &pod.labels);
        match identities.get(&identity) {
            Some((ns, labels)) if (*ns, *labels) != (namespace.as_str(), &pod.labels) => {
                diags.push(
                    object.clone(),
                    format!(
                        "identity {identity} collides with the one of namespace {ns} labels {labels:?}; policy cannot tell these pods apart"
                    ),
                );
            }
            Some(_) => {}
            None => {
                identities.insert(identity, (namespace, &pod.labels));
            }
        }
        let local = pod_node == node;
        let cidrs: &[IpNet] = if local {
            &d.local_pod_cidrs
        } else {
            surviving.get(pod_node).map(Vec::as_slice).unwrap_or(&[])
        };
        for ip in ips {
            if !cidrs.iter().any(|c| c.contains(&ip)) {
                diags.push(
                    object.clone(),
                    format!(
                        "IP {ip} is outside the usable pod CIDRs of Node/{pod_node} ({}); skipped",
                        list(cidrs)
                    ),
                );
                continue;
            }
            if let Some(first) = owner_of_ip.get(&ip) {
                diags.push(
                    object.clone(),
                    format!("IP {ip} is already used by {first}; skipped"),
                );
                continue;
            }
            owner_of_ip.insert(ip, object.clone());
            if local {
                d.local_endpoints.insert(
                    ip,
                    LocalEndpoint {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        identity,
                    },
                );
            } else {
                d.ipcache.insert(ip, identity);
            }
        }
    }
}
