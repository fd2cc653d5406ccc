//! The reconciler: a pure function from cluster state to the desired datapath
//! state of one node. Appliers (engine, BPF maps, routes) diff it against
//! what they have.

pub mod enable;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::cluster::objects::VeilNode;
use crate::cluster::{Announcement, ClusterState, Diagnostic, PublicKey};
use crate::identity::{Identity, Published};

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
    /// The cluster's pod ranges: in strict mode, whatever in them is neither
    /// local nor served by a peer is dropped.
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// Keyed by the remote node's name.
    pub peers: BTreeMap<String, PeerSpec>,
    /// Every remote pod CIDR known from Node objects.
    pub remote_cidrs: BTreeMap<IpNet, RemoteCidr>,
    /// Addresses of remote nodes that have a peer: pod traffic to them is
    /// steered into the tunnel too (BPF only: routing host traffic to them
    /// through the tunnel would loop WireGuard's own UDP).
    pub remote_node_ips: BTreeMap<IpAddr, String>,
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
    /// What is now accepted per peer name: pass it back (and persist it) as
    /// [`TrustContext::accepted`] next time.
    pub accepted: BTreeMap<String, Accepted>,
}

/// The trust inputs of a reconcile: who may vouch for keys, the time, and
/// what was accepted before (so that old announcements cannot be replayed).
#[derive(Debug, Clone, Copy)]
pub struct TrustContext<'a> {
    /// The cluster authority's Ed25519 public key (from the install-time file).
    pub authority: [u8; 32],
    /// Seconds since the Unix epoch.
    pub now: u64,
    pub accepted: &'a BTreeMap<String, Accepted>,
}

/// The announcement last accepted for a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub public_key: PublicKey,
    pub generation: u64,
    /// `not_before` of the certificate it came with (0 for an external peer).
    /// Orders re-certifications: a node whose key files were lost starts
    /// again at generation 1 under a newer certificate.
    pub cert_not_before: u64,
    pub listen_port: u16,
    pub endpoint: Option<SocketAddr>,
    /// Authority-signed: an external WireGuard peer.
    pub external: bool,
    /// The announced CIDRs (an external peer's allowed IPs).
    pub allowed_ips: Vec<IpNet>,
}

impl Accepted {
    /// The rollback order: newer certificate first, then higher generation.
    pub fn order(&self) -> (u64, u64) {
        (self.cert_not_before, self.generation)
    }
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

struct Diags<'a> {
    list: Vec<Diagnostic>,
    origins: &'a BTreeMap<String, String>,
}

impl Diags<'_> {
    /// Names the object's own source (its file) when the state knows it, so
    /// the operator learns where to fix it.
    fn push(&mut self, object: String, problem: String) {
        let source = self
            .origins
            .get(&object)
            .cloned()
            .unwrap_or_else(|| DIAGNOSTIC_SOURCE.into());
        self.list.push(Diagnostic {
            source,
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
///
/// Only announcements that verify under `trust` give peers (see
/// `keymgr::trust` for the rules, plus the rollback order of [`Accepted`]).
pub fn desired(state: &ClusterState, node: &str, trust: &TrustContext<'_>) -> Outcome {
    let mut diags = Diags {
        list: Vec::new(),
        origins: &state.origins,
    };
    let mut d = Desired {
        encryption_enabled: state.config.encryption_enabled,
        strict: state.config.strict,
        cluster_pod_cidrs: state.config.cluster_pod_cidrs.clone(),
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
    let mut accepted = BTreeMap::new();
    peers(
        state,
        node,
        &surviving,
        trust,
        &mut accepted,
        &mut d,
        &mut diags,
    );
    endpoints(state, node, &surviving, &mut d, &mut diags);

    Outcome {
        desired: d,
        diagnostics: diags.list,
        accepted,
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
    trust: &TrustContext<'_>,
    accepted_out: &mut BTreeMap<String, Accepted>,
    d: &mut Desired,
    diags: &mut Diags,
) {
    // Decide per announcement which key (if any) we trust for that name.
    for (name, ann) in &state.announcements {
        if name == node {
            continue;
        }
        let object = VeilNode::object_ref(name);
        match verify_announcement(state, name, ann, trust) {
            Ok(a) => {
                accepted_out.insert(name.clone(), a);
            }
            Err(reason) => {
                let fallback = match trust.accepted.get(name) {
                    Some(prev) => {
                        accepted_out.insert(name.clone(), prev.clone());
                        format!(
                            "keeping the previously accepted key {} (generation {})",
                            prev.public_key, prev.generation
                        )
                    }
                    None => "no peer".into(),
                };
                diags.push(object, format!("rejected: {reason}; {fallback}"));
            }
        }
    }
    let mut by_key: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    // Our own key counts too: a peer claiming it must not get a peer entry.
    if let Some((name, own)) = state.announcements.get_key_value(node) {
        by_key.entry(own.public_key).or_default().push(name);
    }
    for (name, a) in accepted_out.iter() {
        by_key.entry(a.public_key).or_default().push(name);
    }
    for (key, names) in &by_key {
        if names.len() > 1 {
            for name in names {
                diags.push(
                    VeilNode::object_ref(name),
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
        let object = VeilNode::object_ref(name);
        let Some(acc) = accepted_out.get(name) else {
            if d.encryption_enabled && !state.announcements.contains_key(name) {
                diags.push(
                    format!("Node/{name}"),
                    format!("no VeilNode announcement for {name} yet: no peer, its pod CIDRs have no encrypted path"),
                );
            }
            continue;
        };
        if by_key.get(&acc.public_key).is_some_and(|n| n.len() > 1) {
            continue; // diagnosed above
        }
        let endpoint = match (acc.endpoint, info.internal_ip) {
            (Some(endpoint), _) => endpoint,
            (None, Some(ip)) => SocketAddr::new(ip, acc.listen_port),
            (None, None) => {
                diags.push(
                    object,
                    format!("no endpoint: spec.endpoint is unset and Node/{name} has no InternalIP; no peer"),
                );
                continue;
            }
        };
        // The signature bound the key to exactly the Node's CIDRs; of those,
        // only the ones that survived the overlap checks are routed to it.
        let allowed_ips: Vec<IpNet> = surviving
            .get(name.as_str())
            .map(|v| v.to_vec())
            .unwrap_or_default();
        for cidr in &allowed_ips {
            if let Some(remote) = d.remote_cidrs.get_mut(cidr) {
                remote.peer = Some(acc.public_key);
            }
        }
        // The node's own address too: in strict mode a node's replies to our
        // pods (a pod talking to its kubelet, a NodePort) reach it through the
        // tunnel with that source, and cryptokey routing must accept them as
        // the node's. Not if it lies in a pod range, which would let the node
        // speak for a pod address.
        let mut allowed_ips = allowed_ips;
        if let Some(ip) = info.internal_ip {
            let in_pod_range = d
                .remote_cidrs
                .keys()
                .chain(&d.local_pod_cidrs)
                .chain(&d.cluster_pod_cidrs)
                .any(|c| c.contains(&ip));
            if in_pod_range {
                diags.push(
                    format!("Node/{name}"),
                    format!("InternalIP {ip} lies inside a pod CIDR; not accepted as the node's tunnel source"),
                );
            } else {
                allowed_ips.push(IpNet::from(ip));
                d.ipcache.insert(ip, Identity::REMOTE_NODE);
                d.remote_node_ips.insert(ip, name.clone());
            }
        }
        d.peers.insert(
            name.clone(),
            PeerSpec {
                node: name.clone(),
                public_key: acc.public_key,
                endpoint,
                allowed_ips,
            },
        );
    }

    // External WireGuard peers: authority-signed, no Node object.
    let mut taken: Vec<(IpNet, String)> = Vec::new();
    for (name, acc) in accepted_out.iter() {
        if !acc.external
            || state.nodes.contains_key(name)
            || name == node
            || !state.announcements.contains_key(name)
        {
            continue;
        }
        let object = VeilNode::object_ref(name);
        if by_key.get(&acc.public_key).is_some_and(|n| n.len() > 1) {
            continue;
        }
        let Some(endpoint) = acc.endpoint else {
            diags.push(
                object,
                "external peer without spec.endpoint (it has no Node InternalIP to fall back on); no peer".into(),
            );
            continue;
        };
        let mut allowed_ips = Vec::new();
        for cidr in &acc.allowed_ips {
            let clash = state
                .nodes
                .values()
                .flat_map(|n| {
                    n.pod_cidrs
                        .iter()
                        .map(move |c| (c, format!("Node/{}", n.name)))
                })
                .chain(
                    d.local_pod_cidrs
                        .iter()
                        .map(|c| (c, format!("Node/{node}"))),
                )
                .chain(taken.iter().map(|(c, n)| (c, VeilNode::object_ref(n))))
                .find(|(c, _)| overlaps(c, cidr));
            if let Some((c, owner)) = clash {
                diags.push(
                    object.clone(),
                    format!(
                        "external peer's allowed IP {cidr} overlaps {c} of {owner}; not allowed"
                    ),
                );
                continue;
            }
            taken.push((*cidr, name.clone()));
            allowed_ips.push(*cidr);
            d.remote_cidrs.insert(
                *cidr,
                RemoteCidr {
                    node: name.clone(),
                    peer: Some(acc.public_key),
                },
            );
        }
        d.peers.insert(
            name.clone(),
            PeerSpec {
                node: name.clone(),
                public_key: acc.public_key,
                endpoint,
                allowed_ips,
            },
        );
    }
    // A withdrawn announcement withdraws the peer (strict mode then drops
    // its traffic), but its record stays, so a replay of an older
    // announcement is still refused as long as the node exists.
    for (name, prev) in trust.accepted {
        if name != node
            && !state.announcements.contains_key(name)
            && (state.nodes.contains_key(name) || prev.external)
        {
            accepted_out
                .entry(name.clone())
                .or_insert_with(|| prev.clone());
        }
    }
}

/// Applies the trust model to one announcement; the reason on refusal.
pub fn verify_announcement(
    state: &ClusterState,
    name: &str,
    ann: &Announcement,
    trust: &TrustContext<'_>,
) -> Result<Accepted, String> {
    let Some(signed) = ann.signed() else {
        return Err(match ann.trust.identity_key {
            Some(id) if ann.trust.signature.is_none() => format!(
                "not signed yet: node identity {} is pending approval (`veilctl node approve {name}`)",
                keymgr::encode_key(&id)
            ),
            _ => "not signed (spec.signature, spec.signer and, for a node, spec.certificate are required)".into(),
        });
    };
    signed
        .verify(&keymgr::VerifyContext {
            authority: trust.authority,
            now: trust.now,
            skew: keymgr::DEFAULT_CLOCK_SKEW_SECS,
            // The rollback rule below is stricter than keymgr's (it also
            // orders by certificate), so keymgr's is not used.
            accepted_generation: None,
            node_pod_cidrs: state.nodes.get(name).map(|n| n.pod_cidrs.as_slice()),
        })
        .map_err(|e| e.to_string())?;
    let (cert_not_before, external) = match &signed.signer {
        keymgr::Signer::Node(cert) => (cert.not_before, false),
        keymgr::Signer::Authority => (0, true),
    };
    let candidate = Accepted {
        public_key: ann.public_key,
        generation: signed.body.generation,
        cert_not_before,
        listen_port: ann.listen_port,
        endpoint: ann.endpoint,
        external,
        allowed_ips: keymgr::normalize_cidrs(&ann.pod_cidrs),
    };
    if let Some(prev) = trust.accepted.get(name) {
        let (new, old) = (candidate.order(), prev.order());
        if new < old {
            return Err(format!(
                "rollback: (certificate not_before {}, generation {}) is older than the accepted \
                 (certificate not_before {}, generation {}); a replayed announcement cannot bring back a retired key",
                new.0, new.1, old.0, old.1
            ));
        }
        if new == old && prev.public_key != candidate.public_key {
            return Err(format!(
                "generation {} with certificate not_before {} was already accepted with key {}; \
                 a different key needs a higher generation",
                new.1, new.0, prev.public_key
            ));
        }
    }
    Ok(candidate)
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
    // Identities come only from the published set: a pod whose label set
    // has none yet is `init` (see `Identity::INIT`) until its agent publishes one.
    let published = Published::resolve(&state.identities);
    for (dup, winner) in &published.duplicates {
        diags.push(
            crate::cluster::identity::PublishedIdentity::object_ref(*dup),
            format!("names the same label set as VeilIdentity/{}, which wins (lowest number); unused until garbage collected", winner.0),
        );
    }
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
        let identity = published.of(namespace, &pod.labels);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Announcement, ClusterConfig, NodeInfo, PodInfo};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A usable public key (a real X25519 public key), distinct per seed.
    fn key(seed: u8) -> PublicKey {
        PublicKey(keymgr::WireGuardPrivateKey::from_bytes([seed; 32]).public_key())
    }

    fn add_node(state: &mut ClusterState, name: &str, cidrs: &[&str], internal: Option<&str>) {
        state.nodes.insert(
            name.into(),
            NodeInfo {
                name: name.into(),
                pod_cidrs: cidrs.iter().map(|c| net(c)).collect(),
                internal_ip: internal.map(ip),
            },
        );
    }

    const NOW: u64 = 1_750_000_000;

    fn authority() -> keymgr::AuthorityKey {
        keymgr::AuthorityKey::from_seed([0xA0; 32])
    }

    fn identity(name: &str) -> keymgr::IdentityKey {
        let mut seed = [0x11; 32];
        for (i, b) in name.bytes().enumerate() {
            seed[i % 32] ^= b;
        }
        keymgr::IdentityKey::from_seed(seed)
    }

    fn cert_from(
        by: &keymgr::AuthorityKey,
        name: &str,
        not_before: u64,
    ) -> keymgr::NodeCertificate {
        by.certify(name, identity(name).public_key(), not_before, NOW + 100_000)
            .unwrap()
    }

    /// Signs `a` as node `a.node` would, with a certificate issued at `cert_nb`.
    fn sign_with(a: &Announcement, cert: keymgr::NodeCertificate) -> Announcement {
        let mut body = a.body();
        body.generation = body.generation.max(1);
        body.not_before = NOW - 10;
        body.not_after = NOW + 1000;
        let signed =
            keymgr::SignedAnnouncement::sign_by_node(body, &identity(&a.node), cert).unwrap();
        Announcement::from_signed(&signed)
    }

    fn sign(a: &Announcement) -> Announcement {
        sign_with(a, cert_from(&authority(), &a.node, NOW - 1000))
    }

    /// Re-signs `name`'s announcement after a test changed it.
    fn resign(state: &mut ClusterState, name: &str) {
        let a = sign(&state.announcements[name]);
        state.announcements.insert(name.into(), a);
    }

    fn announce(state: &mut ClusterState, name: &str, seed: u8, cidrs: &[&str]) {
        let a = Announcement {
            node: name.into(),
            public_key: key(seed),
            listen_port: 51820,
            pod_cidrs: cidrs.iter().map(|c| net(c)).collect(),
            endpoint: None,
            ..Announcement::default()
        };
        state.announcements.insert(name.into(), sign(&a));
    }

    fn with_accepted(
        state: &ClusterState,
        node: &str,
        accepted: &BTreeMap<String, Accepted>,
    ) -> Outcome {
        super::desired(
            state,
            node,
            &TrustContext {
                authority: authority().public_key(),
                now: NOW,
                accepted,
            },
        )
    }

    fn desired(state: &ClusterState, node: &str) -> Outcome {
        with_accepted(state, node, &BTreeMap::new())
    }

    fn add_pod(state: &mut ClusterState, ns: &str, name: &str, node: &str, ip_s: &str, app: &str) {
        let ip_a = ip(ip_s);
        state.pods.insert(
            (ns.into(), name.into()),
            PodInfo {
                namespace: ns.into(),
                name: name.into(),
                labels: [("app".to_string(), app.to_string())].into(),
                node_name: Some(node.into()),
                pod_ip: Some(ip_a),
                pod_ips: vec![ip_a],
                host_network: false,
            },
        );
    }

    /// a, b, c with one pod each; b announces itself, c via an explicit endpoint.
    fn three_nodes() -> ClusterState {
        let mut s = ClusterState {
            config: ClusterConfig {
                encryption_enabled: true,
                strict: true,
                cluster_pod_cidrs: vec![],
                ..ClusterConfig::default()
            },
            ..ClusterState::default()
        };
        add_node(&mut s, "a", &["10.244.1.0/24"], Some("198.18.0.1"));
        add_node(
            &mut s,
            "b",
            &["10.244.2.0/24", "fd00:10:244:2::/64"],
            Some("198.18.0.2"),
        );
        add_node(&mut s, "c", &["10.244.3.0/24"], Some("198.18.0.3"));
        announce(&mut s, "a", 1, &["10.244.1.0/24"]);
        announce(&mut s, "b", 2, &["10.244.2.0/24", "fd00:10:244:2::/64"]);
        announce(&mut s, "c", 3, &["10.244.3.0/24"]);
        s.announcements.get_mut("c").unwrap().endpoint = Some("198.19.0.3:51999".parse().unwrap());
        resign(&mut s, "c");
        add_pod(&mut s, "default", "pa", "a", "10.244.1.10", "web");
        add_pod(&mut s, "default", "pb", "b", "10.244.2.10", "web");
        add_pod(&mut s, "prod", "pc", "c", "10.244.3.10", "db");
        publish_identities(&mut s);
        s
    }

    /// What the agents do before reconciling: publish an identity for every
    /// label set that has none.
    fn publish_identities(s: &mut ClusterState) {
        let wanted = crate::identity::wanted(s);
        let mut store = crate::identity::MemoryStore(s.identities.clone());
        let (_, errors) = crate::identity::allocate_missing(&mut s.identities, &wanted, &mut store);
        assert!(errors.is_empty(), "{errors:?}");
    }

    fn only_problems(out: &Outcome) -> Vec<String> {
        out.diagnostics
            .iter()
            .map(|d| format!("{}: {}", d.object, d.problem))
            .collect()
    }

    #[test]
    fn a_node_address_inside_a_pod_range_is_not_allowed() {
        let mut s = three_nodes();
        s.nodes.get_mut("c").unwrap().internal_ip = Some(ip("10.244.2.77"));
        let out = desired(&s, "a");
        assert_eq!(
            out.desired.peers["c"].allowed_ips,
            vec![net("10.244.3.0/24")]
        );
        assert!(!out.desired.ipcache.contains_key(&ip("10.244.2.77")));
        assert!(out
            .diagnostics
            .iter()
            .any(|d| d.object == "Node/c" && d.problem.contains("inside a pod CIDR")));
    }

    #[test]
    fn three_node_cluster() {
        let s = three_nodes();
        let out = desired(&s, "a");
        assert!(out.diagnostics.is_empty(), "{:#?}", out.diagnostics);
        let d = &out.desired;
        assert!(d.encryption_enabled && d.strict);
        assert_eq!(d.local_pod_cidrs, vec![net("10.244.1.0/24")]);

        assert_eq!(d.peers.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        assert_eq!(
            d.peers["b"],
            PeerSpec {
                node: "b".into(),
                public_key: key(2),
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                // Its pod CIDRs, and its own address for its replies to our pods.
                allowed_ips: vec![
                    net("10.244.2.0/24"),
                    net("fd00:10:244:2::/64"),
                    net("198.18.0.2/32")
                ],
            }
        );
        assert_eq!(d.peers["c"].endpoint, "198.19.0.3:51999".parse().unwrap());
        assert_eq!(
            d.peers["c"].allowed_ips,
            vec![net("10.244.3.0/24"), net("198.18.0.3/32")]
        );

        assert_eq!(d.remote_cidrs.len(), 3);
        assert_eq!(
            d.remote_cidrs[&net("fd00:10:244:2::/64")],
            RemoteCidr {
                node: "b".into(),
                peer: Some(key(2))
            }
        );
        assert_eq!(d.remote_cidrs[&net("10.244.3.0/24")].peer, Some(key(3)));
        assert!(!d.remote_cidrs.contains_key(&net("10.244.1.0/24")));

        assert_eq!(d.local_endpoints.len(), 1);
        let pa = &d.local_endpoints[&ip("10.244.1.10")];
        assert_eq!((pa.namespace.as_str(), pa.name.as_str()), ("default", "pa"));
        assert_eq!(
            d.ipcache.keys().copied().collect::<Vec<_>>(),
            vec![
                ip("10.244.2.10"),
                ip("10.244.3.10"),
                ip("198.18.0.2"),
                ip("198.18.0.3")
            ]
        );
        assert_eq!(d.ipcache[&ip("198.18.0.2")], Identity::REMOTE_NODE);
        assert_eq!(
            d.remote_node_ips.keys().copied().collect::<Vec<_>>(),
            vec![ip("198.18.0.2"), ip("198.18.0.3")]
        );
        // Same namespace and labels: same identity, wherever the pod runs.
        assert_eq!(d.ipcache[&ip("10.244.2.10")], pa.identity);
        assert_ne!(d.ipcache[&ip("10.244.3.10")], pa.identity);
    }

    #[test]
    fn identities_agree_across_nodes() {
        let s = three_nodes();
        let on_a = desired(&s, "a").desired;
        let on_b = desired(&s, "b").desired;
        let on_c = desired(&s, "c").desired;
        // Node b's local view of pb equals what a and c cache for pb's IP.
        let pb = on_b.local_endpoints[&ip("10.244.2.10")].identity;
        assert_eq!(on_a.ipcache[&ip("10.244.2.10")], pb);
        assert_eq!(on_c.ipcache[&ip("10.244.2.10")], pb);
        // Each node peers with the two others, never with itself.
        assert_eq!(on_b.peers.keys().collect::<Vec<_>>(), vec!["a", "c"]);
        assert_eq!(on_c.peers.keys().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn deterministic() {
        let s = three_nodes();
        assert_eq!(desired(&s, "a"), desired(&s, "a"));
        // Built in a different insertion order: same result.
        let mut t = ClusterState {
            config: s.config.clone(),
            identities: s.identities.clone(),
            ..ClusterState::default()
        };
        for (k, v) in s.nodes.iter().rev() {
            t.nodes.insert(k.clone(), v.clone());
        }
        for (k, v) in s.pods.iter().rev() {
            t.pods.insert(k.clone(), v.clone());
        }
        for (k, v) in s.announcements.iter().rev() {
            t.announcements.insert(k.clone(), v.clone());
        }
        assert_eq!(desired(&t, "a"), desired(&s, "a"));
    }

    #[test]
    fn config_is_passed_through() {
        let mut s = three_nodes();
        s.config = ClusterConfig {
            encryption_enabled: false,
            strict: false,
            cluster_pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..ClusterConfig::default()
        };
        let d = desired(&s, "a").desired;
        assert!(!d.encryption_enabled && !d.strict);
        assert_eq!(d.cluster_pod_cidrs, s.config.cluster_pod_cidrs);
    }

    #[test]
    fn missing_announcement_gives_no_peer() {
        let mut s = three_nodes();
        s.announcements.remove("c");
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("c"));
        assert_eq!(
            out.desired.remote_cidrs[&net("10.244.3.0/24")],
            RemoteCidr {
                node: "c".into(),
                peer: None
            }
        );
        // Its pods are still known (identity of traffic that may arrive later).
        assert!(out.desired.ipcache.contains_key(&ip("10.244.3.10")));
        assert_eq!(out.diagnostics.len(), 1, "{:#?}", out.diagnostics);
        assert_eq!(out.diagnostics[0].object, "Node/c");
    }

    #[test]
    fn overlapping_cidrs_first_name_wins() {
        let mut s = three_nodes();
        // c also claims part of b's range; b sorts first and keeps it.
        s.nodes
            .get_mut("c")
            .unwrap()
            .pod_cidrs
            .push(net("10.244.2.0/25"));
        // an IPv6 overlap the other way round: c's /64 inside b's /56.
        s.nodes
            .get_mut("b")
            .unwrap()
            .pod_cidrs
            .push(net("fd00:20::/56"));
        s.nodes
            .get_mut("c")
            .unwrap()
            .pod_cidrs
            .push(net("fd00:20:0:1::/64"));
        // The nodes announce what their Node objects say.
        for n in ["b", "c"] {
            s.announcements.get_mut(n).unwrap().pod_cidrs = s.nodes[n].pod_cidrs.clone();
            resign(&mut s, n);
        }
        // d claims exactly c's CIDR.
        add_node(&mut s, "d", &["10.244.3.0/24"], Some("198.18.0.4"));
        let out = desired(&s, "a");
        let problems = only_problems(&out);
        assert!(problems.contains(&"Node/c: pod CIDR 10.244.2.0/25 of Node/c overlaps 10.244.2.0/24 of Node/b; skipped".to_string()), "{problems:#?}");
        assert!(problems.contains(&"Node/c: pod CIDR fd00:20:0:1::/64 of Node/c overlaps fd00:20::/56 of Node/b; skipped".to_string()), "{problems:#?}");
        assert!(problems.contains(&"Node/d: pod CIDR 10.244.3.0/24 of Node/d overlaps 10.244.3.0/24 of Node/c; skipped".to_string()), "{problems:#?}");
        let d = &out.desired;
        assert_eq!(d.remote_cidrs[&net("10.244.2.0/24")].node, "b");
        assert_eq!(d.remote_cidrs[&net("10.244.3.0/24")].node, "c");
        assert!(!d.remote_cidrs.contains_key(&net("10.244.2.0/25")));
        assert!(!d.remote_cidrs.contains_key(&net("fd00:20:0:1::/64")));
        // d has no surviving CIDR and no announcement: no peer, nothing routed to it.
        assert!(!d.peers.contains_key("d"));
        assert!(d.remote_cidrs.values().all(|r| r.node != "d"));
        // c's lost CIDRs are not in its AllowedIPs; b's kept ones are in b's.
        assert_eq!(d.remote_cidrs[&net("fd00:20::/56")].peer, Some(key(2)));
        assert_eq!(
            d.peers["c"].allowed_ips,
            vec![net("10.244.3.0/24"), net("198.18.0.3/32")],
            "{:#?}",
            d.peers
        );
        // v4 and v6 never overlap each other.
        assert!(!overlaps(&net("0.0.0.0/0"), &net("::/0")));
    }

    #[test]
    fn remote_claim_on_own_cidr_is_skipped() {
        let mut s = three_nodes();
        // b (sorts after a) and a node sorting before a both claim a's space.
        s.nodes
            .get_mut("b")
            .unwrap()
            .pod_cidrs
            .push(net("10.244.0.0/16"));
        add_node(&mut s, "0first", &["10.244.1.128/25"], Some("198.18.0.9"));
        let out = desired(&s, "a");
        let problems = only_problems(&out);
        assert!(problems.contains(&"Node/b: pod CIDR 10.244.0.0/16 of Node/b overlaps 10.244.1.0/24 of this node (Node/a); skipped".to_string()), "{problems:#?}");
        assert!(problems.contains(&"Node/0first: pod CIDR 10.244.1.128/25 of Node/0first overlaps 10.244.1.0/24 of this node (Node/a); skipped".to_string()), "{problems:#?}");
        assert!(out
            .desired
            .remote_cidrs
            .keys()
            .all(|c| !overlaps(c, &net("10.244.1.0/24"))));
        assert_eq!(out.desired.local_endpoints.len(), 1);
    }

    #[test]
    fn announcement_cidrs_must_be_the_nodes() {
        let mut s = three_nodes();
        s.announcements
            .get_mut("c")
            .unwrap()
            .pod_cidrs
            .push(net("10.244.1.0/24")); // a's range: hijack attempt
        resign(&mut s, "c");
        s.announcements.get_mut("b").unwrap().pod_cidrs = vec![net("10.244.2.0/24")];
        resign(&mut s, "b");
        let out = desired(&s, "a");
        let d = &out.desired;
        // The whole announcement is refused, not just the extra CIDR.
        assert!(d.peers.is_empty(), "{:#?}", d.peers);
        assert_eq!(d.remote_cidrs[&net("10.244.3.0/24")].peer, None);
        assert_eq!(d.remote_cidrs[&net("fd00:10:244:2::/64")].peer, None);
        let problems = only_problems(&out);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].starts_with(
                "VeilNode/b: rejected: announcement for node `b` claims pod CIDRs that differ"
            ),
            "{problems:#?}"
        );
        assert!(
            problems[1].contains("not on the Node [10.244.1.0/24]"),
            "{problems:#?}"
        );
        assert!(problems[1].ends_with("; no peer"), "{problems:#?}");
    }

    #[test]
    fn unknown_duplicate_and_unusable_announcements() {
        let mut s = three_nodes();
        announce(&mut s, "ghost", 9, &["10.244.9.0/24"]);
        // c reuses b's key: neither gets a peer.
        s.announcements.get_mut("c").unwrap().public_key = key(2);
        resign(&mut s, "c");
        let out = desired(&s, "a");
        assert!(out.desired.peers.is_empty(), "{:#?}", out.desired.peers);
        assert_eq!(out.desired.remote_cidrs[&net("10.244.2.0/24")].peer, None);
        let problems = only_problems(&out);
        assert!(
            problems.iter().any(|p| p.starts_with(
                "VeilNode/ghost: rejected: announcement for node `ghost` has no Node object"
            )),
            "{problems:#?}"
        );
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.contains("is announced by 2 nodes (b, c)"))
                .count(),
            2,
            "{problems:#?}"
        );

        // Another node announcing this node's own key is refused too.
        let mut s = three_nodes();
        s.announcements.get_mut("b").unwrap().public_key = key(1);
        resign(&mut s, "b");
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("b"));
        assert!(out.desired.peers.contains_key("c"));

        // A small-order key (changed after signing: signers refuse it).
        let mut s = three_nodes();
        s.announcements.get_mut("b").unwrap().public_key = PublicKey([0; 32]);
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("b"));
        assert!(
            only_problems(&out)[0].starts_with("VeilNode/b: rejected"),
            "{:#?}",
            out.diagnostics
        );
    }

    fn problem_of(out: &Outcome, object: &str) -> String {
        out.diagnostics
            .iter()
            .filter(|d| d.object == object)
            .map(|d| d.problem.clone())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    #[test]
    fn forged_announcement_is_rejected() {
        // Someone with write access to the store, but neither b's identity
        // key nor the authority key, announces their own key for b.
        let mut s = three_nodes();
        let forger = keymgr::AuthorityKey::from_seed([0x66; 32]);
        let mut forged = s.announcements["b"].clone();
        forged.public_key = key(66);
        s.announcements.insert(
            "b".into(),
            sign_with(&forged, cert_from(&forger, "b", NOW - 10)),
        );
        s.origins
            .insert("VeilNode/b".into(), "/cluster/veilnodes/b.yaml".into());
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("b"));
        assert_eq!(out.desired.remote_cidrs[&net("10.244.2.0/24")].peer, None);
        let d = out
            .diagnostics
            .iter()
            .find(|d| d.object == "VeilNode/b")
            .unwrap();
        assert_eq!(d.source, "/cluster/veilnodes/b.yaml");
        assert!(
            d.problem.contains("not signed by the cluster authority"),
            "{d}"
        );
        assert!(!out.accepted.contains_key("b"));

        // With b's real key accepted before, traffic keeps going to it.
        let good = desired(&three_nodes(), "a").accepted;
        let out = with_accepted(&s, "a", &good);
        assert_eq!(out.desired.peers["b"].public_key, key(2));
        assert_eq!(
            out.desired.remote_cidrs[&net("10.244.2.0/24")].peer,
            Some(key(2))
        );
        assert!(problem_of(&out, "VeilNode/b").contains("keeping the previously accepted key"));
        assert_eq!(out.accepted["b"], good["b"]);

        // A signature copied from the real announcement does not cover a new key.
        let mut s = three_nodes();
        s.announcements.get_mut("b").unwrap().public_key = key(66);
        let out = desired(&s, "a");
        assert!(problem_of(&out, "VeilNode/b").contains("bad signature"));
    }

    #[test]
    fn unsigned_and_pending_are_rejected() {
        let mut s = three_nodes();
        let b = s.announcements.get_mut("b").unwrap();
        b.trust = Default::default();
        b.trust.identity_key = Some(identity("b").public_key());
        let c = s.announcements.get_mut("c").unwrap();
        c.trust = Default::default();
        let out = desired(&s, "a");
        assert!(out.desired.peers.is_empty());
        assert!(
            problem_of(&out, "VeilNode/b").contains("pending approval (`veilctl node approve b`)")
        );
        assert!(problem_of(&out, "VeilNode/c").contains("not signed"));
    }

    #[test]
    fn generation_rollback_and_recertification() {
        let mut s = three_nodes();
        let b = s.announcements["b"].clone();
        let at = |gen: u64, seed: u8, cert_nb: u64| {
            let mut a = b.clone();
            a.trust.generation = gen;
            a.public_key = key(seed);
            sign_with(&a, cert_from(&authority(), "b", cert_nb))
        };
        // Accept generation 3.
        s.announcements.insert("b".into(), at(3, 30, NOW - 1000));
        let acc = desired(&s, "a").accepted;
        assert_eq!(acc["b"].generation, 3);
        // Same generation again (a re-publication): fine.
        let out = with_accepted(&s, "a", &acc);
        assert!(
            problem_of(&out, "VeilNode/b").is_empty(),
            "{:#?}",
            out.diagnostics
        );
        // A replay of generation 2: refused, generation 3's key stays.
        s.announcements.insert("b".into(), at(2, 20, NOW - 1000));
        let out = with_accepted(&s, "a", &acc);
        assert!(
            problem_of(&out, "VeilNode/b").contains("rollback"),
            "{:#?}",
            out.diagnostics
        );
        assert_eq!(out.desired.peers["b"].public_key, key(30));
        assert_eq!(out.accepted["b"].generation, 3);
        // Generation 3 with another key: refused.
        s.announcements.insert("b".into(), at(3, 31, NOW - 1000));
        let out = with_accepted(&s, "a", &acc);
        assert!(problem_of(&out, "VeilNode/b").contains("needs a higher generation"));
        assert_eq!(out.desired.peers["b"].public_key, key(30));
        // Generation 4: accepted.
        s.announcements.insert("b".into(), at(4, 40, NOW - 1000));
        let out = with_accepted(&s, "a", &acc);
        assert_eq!(out.desired.peers["b"].public_key, key(40));
        assert_eq!(out.accepted["b"].generation, 4);
        // Key files lost, node re-certified: generation 1 under a newer certificate.
        s.announcements.insert("b".into(), at(1, 10, NOW - 500));
        let recert = with_accepted(&s, "a", &out.accepted);
        assert!(
            problem_of(&recert, "VeilNode/b").is_empty(),
            "{:#?}",
            recert.diagnostics
        );
        assert_eq!(recert.desired.peers["b"].public_key, key(10));
        assert_eq!(recert.accepted["b"].order(), (NOW - 500, 1));
        // ...after which the old certificate's generation 4 is a replay.
        s.announcements.insert("b".into(), at(4, 40, NOW - 1000));
        let replay = with_accepted(&s, "a", &recert.accepted);
        assert!(problem_of(&replay, "VeilNode/b").contains("rollback"));
        assert_eq!(replay.desired.peers["b"].public_key, key(10));
    }

    #[test]
    fn expired_announcement_and_certificate() {
        let mut s = three_nodes();
        let mut b = s.announcements["b"].body();
        b.not_before = NOW - 10_000;
        b.not_after = NOW - keymgr::DEFAULT_CLOCK_SKEW_SECS - 1;
        let signed = keymgr::SignedAnnouncement::sign_by_node(
            b,
            &identity("b"),
            cert_from(&authority(), "b", NOW - 20_000),
        )
        .unwrap();
        s.announcements
            .insert("b".into(), Announcement::from_signed(&signed));
        let c = authority()
            .certify("c", identity("c").public_key(), NOW - 20_000, NOW - 10_000)
            .unwrap();
        let a = sign_with(&s.announcements["c"].clone(), c);
        s.announcements.insert("c".into(), a);
        let out = desired(&s, "a");
        assert!(out.desired.peers.is_empty());
        assert!(problem_of(&out, "VeilNode/b").contains("announcement for node `b` expired"));
        assert!(problem_of(&out, "VeilNode/c").contains("certificate for node `c` expired"));
    }

    #[test]
    fn withdrawn_announcement_keeps_only_the_record() {
        let s = three_nodes();
        let acc = desired(&s, "a").accepted;
        let mut t = s.clone();
        t.announcements.remove("b");
        let out = with_accepted(&t, "a", &acc);
        assert!(!out.desired.peers.contains_key("b"));
        assert_eq!(out.desired.remote_cidrs[&net("10.244.2.0/24")].peer, None);
        assert_eq!(out.accepted["b"], acc["b"]);
        // A node that left the cluster is forgotten.
        t.nodes.remove("b");
        let out = with_accepted(&t, "a", &acc);
        assert!(!out.desired.peers.contains_key("b"));
        assert!(!out.accepted.contains_key("b"));
    }

    fn external(name: &str, seed: u8, cidrs: &[&str], endpoint: Option<&str>) -> Announcement {
        let body = keymgr::AnnouncementBody {
            node: name.into(),
            wireguard_key: key(seed).0,
            generation: 1,
            listen_port: 51820,
            pod_cidrs: cidrs.iter().map(|c| net(c)).collect(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            not_before: NOW - 10,
            not_after: NOW + 1000,
        };
        Announcement::from_signed(
            &keymgr::SignedAnnouncement::sign_by_authority(body, &authority()).unwrap(),
        )
    }

    #[test]
    fn external_peers() {
        let mut s = three_nodes();
        s.announcements.insert(
            "ext".into(),
            external("ext", 50, &["10.244.50.0/24"], Some("198.18.0.50:51820")),
        );
        // Claims b's pod CIDR: refused (the authority cannot hand out a node's addresses).
        s.announcements.insert(
            "ext-bad".into(),
            external("ext-bad", 51, &["10.244.2.0/25"], Some("198.18.0.51:51820")),
        );
        // No endpoint: nothing to reach.
        s.announcements.insert(
            "ext-noep".into(),
            external("ext-noep", 52, &["10.244.52.0/24"], None),
        );
        let out = desired(&s, "a");
        let p = &out.desired.peers["ext"];
        assert_eq!(p.allowed_ips, vec![net("10.244.50.0/24")]);
        assert_eq!(p.endpoint, "198.18.0.50:51820".parse().unwrap());
        assert_eq!(
            out.desired.remote_cidrs[&net("10.244.50.0/24")].peer,
            Some(key(50))
        );
        assert!(out.desired.peers["ext-bad"].allowed_ips.is_empty());
        assert!(problem_of(&out, "VeilNode/ext-bad").contains("overlaps 10.244.2.0/24 of Node/b"));
        assert!(!out.desired.peers.contains_key("ext-noep"));
        assert!(problem_of(&out, "VeilNode/ext-noep").contains("without spec.endpoint"));
        assert_eq!(out.desired.peers["b"].public_key, key(2));

        // An authority-signed announcement for a cluster node's name is refused.
        let mut s = three_nodes();
        s.announcements.insert(
            "b".into(),
            external("b", 53, &["10.244.2.0/24"], Some("198.18.0.53:51820")),
        );
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("b"));
        assert!(problem_of(&out, "VeilNode/b").contains("must not share a name"));
    }

    #[test]
    fn endpoint_needs_internal_ip_or_explicit() {
        let mut s = three_nodes();
        s.nodes.get_mut("b").unwrap().internal_ip = None;
        s.nodes.get_mut("c").unwrap().internal_ip = None; // c has an explicit endpoint
        let out = desired(&s, "a");
        assert!(!out.desired.peers.contains_key("b"));
        assert_eq!(
            out.desired.peers["c"].endpoint,
            "198.19.0.3:51999".parse().unwrap()
        );
        assert_eq!(out.desired.remote_cidrs[&net("10.244.2.0/24")].peer, None);
        let problems = only_problems(&out);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("VeilNode/b: no endpoint"),
            "{problems:#?}"
        );
    }

    #[test]
    fn pod_problems() {
        let mut s = three_nodes();
        add_pod(&mut s, "default", "lost", "nowhere", "10.244.7.1", "x");
        add_pod(&mut s, "default", "pb-dup", "b", "10.244.2.10", "web"); // sorts after pb
        add_pod(&mut s, "default", "astray", "a", "10.244.2.77", "x"); // local, outside a's CIDR
        add_pod(&mut s, "default", "remote-astray", "c", "10.244.1.77", "x");
        let mut host = s.pods[&("default".to_string(), "pa".to_string())].clone();
        host.name = "host".into();
        host.host_network = true;
        host.pod_ip = Some(ip("198.18.0.1"));
        host.pod_ips = vec![ip("198.18.0.1")];
        s.pods.insert(("default".into(), "host".into()), host);
        let mut pending = s.pods[&("default".to_string(), "pa".to_string())].clone();
        pending.name = "pending".into();
        pending.pod_ip = None;
        pending.pod_ips = vec![];
        s.pods.insert(("default".into(), "pending".into()), pending);

        let out = desired(&s, "a");
        let problems = only_problems(&out);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems.contains(
                &"Pod/default/lost: scheduled on node nowhere, which has no Node object; skipped"
                    .to_string()
            ),
            "{problems:#?}"
        );
        assert!(
            problems.contains(
                &"Pod/default/pb-dup: IP 10.244.2.10 is already used by Pod/default/pb; skipped"
                    .to_string()
            ),
            "{problems:#?}"
        );
        assert!(problems.iter().any(|p| p.starts_with("Pod/default/astray: IP 10.244.2.77 is outside the usable pod CIDRs of Node/a (10.244.1.0/24)")), "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("Pod/default/remote-astray: IP 10.244.1.77 is outside")),
            "{problems:#?}"
        );
        let d = &out.desired;
        assert_eq!(
            d.local_endpoints.keys().copied().collect::<Vec<_>>(),
            vec![ip("10.244.1.10")]
        );
        let pods = d.ipcache.values().filter(|i| **i != Identity::REMOTE_NODE);
        assert_eq!(pods.count(), 2);
        // Our own address is not a remote node.
        assert!(!d.ipcache.contains_key(&ip("198.18.0.1")));
    }

    #[test]
    fn remote_pods_in_lost_cidrs_are_not_cached() {
        let mut s = three_nodes();
        add_node(&mut s, "d", &["10.244.3.0/24"], Some("198.18.0.4"));
        add_pod(&mut s, "default", "pd", "d", "10.244.3.20", "x");
        let out = desired(&s, "a");
        assert!(!out.desired.ipcache.contains_key(&ip("10.244.3.20")));
        assert!(only_problems(&out).iter().any(|p| p.starts_with(
            "Pod/default/pd: IP 10.244.3.20 is outside the usable pod CIDRs of Node/d (none)"
        )));
    }

    #[test]
    fn dual_stack_pod() {
        let mut s = three_nodes();
        let pb = s
            .pods
            .get_mut(&("default".to_string(), "pb".to_string()))
            .unwrap();
        pb.pod_ips.push(ip("fd00:10:244:2::10"));
        let on_a = desired(&s, "a").desired;
        assert_eq!(
            on_a.ipcache[&ip("fd00:10:244:2::10")],
            on_a.ipcache[&ip("10.244.2.10")]
        );
        let on_b = desired(&s, "b").desired;
        assert_eq!(on_b.local_endpoints.len(), 2);
    }

    #[test]
    fn missing_own_node() {
        let s = three_nodes();
        let out = desired(&s, "zz");
        assert!(out.desired.local_pod_cidrs.is_empty());
        assert!(out.desired.local_endpoints.is_empty());
        assert_eq!(out.desired.peers.len(), 3);
        assert_eq!(out.diagnostics.len(), 1);
        assert_eq!(out.diagnostics[0].object, "Node/zz");
    }

    #[test]
    fn identities_come_from_the_published_set_only() {
        let mut s = three_nodes();
        // A label set nobody published yet: `init` on every node, never a local hash.
        add_pod(&mut s, "default", "new", "b", "10.244.2.11", "fresh");
        let on_a = desired(&s, "a");
        assert!(
            only_problems(&on_a).is_empty(),
            "{:?}",
            only_problems(&on_a)
        );
        assert_eq!(on_a.desired.ipcache[&ip("10.244.2.11")], Identity::INIT);
        let on_b = desired(&s, "b").desired;
        assert_eq!(
            on_b.local_endpoints[&ip("10.244.2.11")].identity,
            Identity::INIT
        );
        // Published under any number (not its hash): that number, everywhere.
        let key = crate::identity::IdentityKey {
            namespace: "default".into(),
            labels: [("app".to_string(), "fresh".to_string())].into(),
        };
        s.identities.insert(Identity(777), key.clone());
        assert_eq!(
            desired(&s, "a").desired.ipcache[&ip("10.244.2.11")],
            Identity(777)
        );
        assert_eq!(
            desired(&s, "b").desired.local_endpoints[&ip("10.244.2.11")].identity,
            Identity(777)
        );
        // A second object for the same label set: the lowest number wins on
        // every node, and the loser is reported.
        s.identities.insert(Identity(700), key);
        let out = desired(&s, "a");
        assert_eq!(out.desired.ipcache[&ip("10.244.2.11")], Identity(700));
        assert_eq!(
            only_problems(&out),
            vec!["VeilIdentity/777: names the same label set as VeilIdentity/700, which wins (lowest number); unused until garbage collected".to_string()]
        );
    }

    #[test]
    fn colliding_hashes_get_distinct_published_identities() {
        // ~16.7M values: 20000 label sets give ~12 expected collisions (birthday
        // bound); the inputs are fixed, so which pair collides is deterministic.
        let mut seen = BTreeMap::new();
        let (first, second) = (0..20_000)
            .find_map(|i| {
                let app = format!("app{i}");
                let id = crate::identity::identity_for(
                    "default",
                    &[("app".to_string(), app.clone())].into(),
                );
                seen.insert(id, app.clone()).map(|earlier| (earlier, app))
            })
            .expect("no collision among 20000 label sets");
        let mut s = three_nodes();
        add_pod(&mut s, "default", "x1", "b", "10.244.2.11", &first);
        add_pod(&mut s, "default", "x2", "b", "10.244.2.12", &second);
        publish_identities(&mut s);
        let out = desired(&s, "a");
        assert!(only_problems(&out).is_empty(), "{:?}", only_problems(&out));
        let ipcache = &out.desired.ipcache;
        assert_ne!(ipcache[&ip("10.244.2.11")], ipcache[&ip("10.244.2.12")]);
        assert_eq!(
            ipcache[&ip("10.244.2.12")]
                .0
                .abs_diff(ipcache[&ip("10.244.2.11")].0),
            1,
            "the later one probed the next number"
        );
    }
}
