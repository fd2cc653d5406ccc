//! Cluster state as Veil sees it, independent of where it came from.
//!
//! Sources (`file` today, `kube` later) turn Kubernetes objects into a
//! [`ClusterState`]; the reconciler turns that into the desired datapath state.
//! Everything here is plain data: no I/O.

pub mod file;
pub mod identity;
pub mod kube;
pub mod objects;
pub mod source;
pub mod store;
pub mod trust;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A WireGuard (X25519) public key, as raw bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Announcement {
    /// The node this announcement speaks for (`metadata.name`).
    pub node: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub pod_cidrs: Vec<IpNet>,
    /// Explicit endpoint; when absent, peers use the Node's InternalIP and `listen_port`.
    pub endpoint: Option<SocketAddr>,
    /// Who vouches for it: signature, certificate, validity (all empty for
    /// an unsigned or pending announcement, which receivers refuse).
    pub trust: AnnouncementTrust,
    /// What the announcing agent reports about its peers (`status`).
    pub status: NodeKeyStatus,
}

/// The signed part of an announcement beyond the routing fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AnnouncementTrust {
    /// Generation of the announced WireGuard key (0: not given).
    pub generation: u64,
    /// Validity of the announcement, seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    /// The node's Ed25519 identity public key. Alone (no certificate, no
    /// signature) it marks a node waiting for `veilctl node approve`.
    pub identity_key: Option<[u8; 32]>,
    pub signer: Option<keymgr::SignerKind>,
    pub certificate: Option<keymgr::NodeCertificate>,
    pub signature: Option<[u8; keymgr::SIGNATURE_LEN]>,
}

/// `status` of a `VeilNode`: which keys the node and its peers use. Not
/// signed: it only feeds progress displays (`veilctl keys status`), never
/// routing decisions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeKeyStatus {
    /// When the node's current WireGuard key was first announced (unix seconds).
    pub key_since: Option<u64>,
    /// Per peer name: the generation of that peer's key this node uses.
    pub peers: BTreeMap<String, u64>,
    /// Per peer name: the generation of this node's own key with which the
    /// live session that carries its traffic to that peer was made (no
    /// entry: no session). During a rotation it shows which peers are still
    /// on the previous generation.
    pub sessions: BTreeMap<String, u64>,
    /// Where this node stands on the cluster-wide enable flag; `None` from
    /// an agent that does not report it.
    pub encryption: Option<EncryptionStatus>,
}

/// A node's report on the enable flag (`status.encryption` of its
/// `VeilNode`). Peers read it to decide, per pair, when to switch between
/// plaintext and encrypted (see [`crate::reconcile::enable`]). Unsigned: it
/// can only make a sender *encrypt* earlier or *keep* encrypting, never
/// start sending plaintext while the flag is on (SECURITY.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncryptionStatus {
    /// The value of `spec.encryption.enabled` this node acts on.
    pub enabled: bool,
    /// Its engine is up with every peer in `peers` configured: it can
    /// receive encrypted traffic from each of them.
    pub ready: bool,
    /// It delivers plaintext from remote pods. Only false once strict mode
    /// has converged (every node sends encrypted to every peer).
    pub accepts_plaintext: bool,
    /// How many peers it sends to encrypted / in plaintext / not at all.
    pub encrypted_peers: u32,
    pub plaintext_peers: u32,
    pub dropped_peers: u32,
}

impl Announcement {
    /// The announcement as keymgr verifies it, if it carries a signature
    /// (and, for a node signer, a certificate).
    pub fn signed(&self) -> Option<keymgr::SignedAnnouncement> {
        let t = &self.trust;
        let signer = match (t.signer?, &t.certificate) {
            (keymgr::SignerKind::Node, Some(cert)) => keymgr::Signer::Node(cert.clone()),
            (keymgr::SignerKind::Node, None) => return None,
            (keymgr::SignerKind::Authority, _) => keymgr::Signer::Authority,
        };
        Some(keymgr::SignedAnnouncement {
            body: self.body(),
            signer,
            signature: t.signature?,
        })
    }

    /// The fields a signature covers.
    pub fn body(&self) -> keymgr::AnnouncementBody {
        keymgr::AnnouncementBody {
            node: self.node.clone(),
            wireguard_key: self.public_key.0,
            generation: self.trust.generation,
            listen_port: self.listen_port,
            pod_cidrs: self.pod_cidrs.clone(),
            endpoint: self.endpoint,
            not_before: self.trust.not_before,
            not_after: self.trust.not_after,
        }
    }

    /// An announcement carrying `signed` (as produced by keymgr).
    pub fn from_signed(signed: &keymgr::SignedAnnouncement) -> Self {
        let b = &signed.body;
        let (certificate, identity_key) = match &signed.signer {
            keymgr::Signer::Node(c) => (Some(c.clone()), Some(c.identity_key)),
            keymgr::Signer::Authority => (None, None),
        };
        Announcement {
            node: b.node.clone(),
            public_key: PublicKey(b.wireguard_key),
            listen_port: b.listen_port,
            pod_cidrs: b.pod_cidrs.clone(),
            endpoint: b.endpoint,
            trust: AnnouncementTrust {
                generation: b.generation,
                not_before: b.not_before,
                not_after: b.not_after,
                identity_key,
                signer: Some(signed.signer.kind()),
                certificate,
                signature: Some(signed.signature),
            },
            status: NodeKeyStatus::default(),
        }
    }
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
    /// `spec.keyRotation.interval`: each agent rotates its WireGuard key when
    /// the current one is older than this; `None` rotates only on request.
    pub key_rotation_interval: Option<std::time::Duration>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            encryption_enabled: false,
            strict: true,
            cluster_pod_cidrs: Vec::new(),
            key_rotation_interval: None,
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
    /// Published `VeilIdentity` objects: number -> label set. Reconcile
    /// resolves them with [`crate::identity::Published::resolve`].
    pub identities: BTreeMap<crate::identity::Identity, crate::identity::IdentityKey>,
    /// Validated `VeilNodeCertificate` objects, keyed by node name. Not
    /// verified: the agent checks each against its authority key before use.
    pub certificates: BTreeMap<String, keymgr::NodeCertificate>,
    /// `VeilKeyRotation` requests: node name -> key generation to reach.
    pub rotation_requests: BTreeMap<String, u64>,
    /// Where each object came from, by object reference (`Node/n1`,
    /// `Pod/default/web`): a file path for the file source. Lets problems
    /// found later (while reconciling) still name the file to fix.
    pub origins: BTreeMap<String, String>,
}

/// One object from a source, already validated and reduced. Both sources
/// produce these, so they agree on what an object is and how it is named.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(NodeInfo),
    Pod(PodInfo),
    Namespace(NamespaceInfo),
    /// Boxed: signatures and certificates make it several times larger than the rest.
    Announcement(Box<Announcement>),
    Config(ClusterConfig),
    Policy(crate::policy::Policy),
    Identity(identity::PublishedIdentity),
    /// A `VeilNodeCertificate` (boxed: signature and key make it large).
    Certificate(Box<keymgr::NodeCertificate>),
    Rotation(RotationRequest),
}

/// A validated `VeilKeyRotation`: node `node` must reach key `generation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationRequest {
    pub node: String,
    pub generation: u64,
}

impl Object {
    /// The object's reference, `Kind/name` or `Kind/ns/name`: the key for
    /// duplicates, last-good versions, origins and diagnostics.
    pub fn key(&self) -> String {
        match self {
            Object::Node(n) => format!("Node/{}", n.name),
            Object::Pod(p) => format!("Pod/{}/{}", p.namespace, p.name),
            Object::Namespace(n) => format!("Namespace/{}", n.name),
            Object::Announcement(a) => objects::VeilNode::object_ref(&a.node),
            Object::Config(_) => format!("VeilClusterConfig/{}", objects::CLUSTER_CONFIG_NAME),
            Object::Policy(p) => p.id.to_string(),
            Object::Identity(i) => identity::PublishedIdentity::object_ref(i.id),
            Object::Certificate(c) => trust::CertificateObject::object_ref(&c.node),
            Object::Rotation(r) => trust::RotationObject::object_ref(&r.node),
        }
    }
}

impl ClusterState {
    /// Adds (or replaces) one object, remembering where it came from.
    pub fn insert(&mut self, object: &Object, origin: &str) {
        self.origins.insert(object.key(), origin.to_string());
        match object {
            Object::Node(n) => {
                self.nodes.insert(n.name.clone(), n.clone());
            }
            Object::Pod(p) => {
                self.pods
                    .insert((p.namespace.clone(), p.name.clone()), p.clone());
            }
            Object::Namespace(n) => {
                self.namespaces.insert(n.name.clone(), n.clone());
            }
            Object::Announcement(a) => {
                self.announcements.insert(a.node.clone(), (**a).clone());
            }
            Object::Config(c) => self.config = c.clone(),
            Object::Policy(p) => {
                self.policies.insert(p.id.to_string(), p.clone());
            }
            Object::Identity(i) => {
                self.identities.insert(i.id, i.key.clone());
            }
            Object::Certificate(c) => {
                self.certificates.insert(c.node.clone(), (**c).clone());
            }
            Object::Rotation(r) => {
                self.rotation_requests.insert(r.node.clone(), r.generation);
            }
        }
    }
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
