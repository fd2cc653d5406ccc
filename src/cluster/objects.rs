//! Typed Veil objects (CRDs) as they appear in YAML, and the conversions from
//! Kubernetes objects (k8s-openapi types) into Veil's cluster state.
//!
//! The conversions are shared by every source (the file source today, the
//! kube source later): each validates one object and either yields the
//! reduced form or an [`ObjectError`] saying what is wrong with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Announcement, AnnouncementTrust, ClusterConfig, NamespaceInfo, NodeInfo, NodeKeyStatus,
    PodInfo, PublicKey,
};

/// API group/version of every Veil CRD.
pub const VEIL_API_VERSION: &str = "veil.dev/v1alpha1";
/// The WireGuard port used when a `VeilNode` does not say.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// The only `VeilClusterConfig` that counts.
pub const CLUSTER_CONFIG_NAME: &str = "default";
/// The label the API server puts on every namespace (Kubernetes >= 1.21), so
/// that `namespaceSelector` can pick a namespace by name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What is wrong with one object. The object itself is named by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("metadata.name is missing or empty")]
    MissingName,
    #[error("{field}: `{value}` is not a CIDR: {reason}")]
    InvalidCidr {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{field}: `{value}` is not an IP address: {reason}")]
    InvalidIp {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("spec.keyRotation.interval: `{value}` {reason} (expected a positive duration such as `24h`, `90m`, `1h30m`, `7d`)")]
    InvalidInterval { value: String, reason: String },
    #[error("spec.publicKey: {0} (expected the 44-character base64 form printed by `wg pubkey`)")]
    InvalidPublicKey(#[source] keymgr::Error),
    #[error("spec.listenPort: port 0 cannot be reached")]
    ZeroPort,
    #[error("spec.endpoint: `{value}` is not `ip:port` (IPv6 as `[addr]:port`): {reason}")]
    InvalidEndpoint { value: String, reason: String },
    #[error("spec.endpoint: `{value}` has port 0")]
    EndpointZeroPort { value: String },
    #[error("spec.identityKey: {0} (expected 44 characters of base64)")]
    InvalidIdentityKey(#[source] keymgr::Error),
    #[error("spec.certificate: {0}")]
    InvalidCertificate(#[source] keymgr::TrustError),
    #[error("spec.signature: {0}")]
    InvalidSignature(#[source] keymgr::TrustError),
    #[error("spec.signer: `{0}` is neither `Node` nor `Authority`")]
    InvalidSigner(String),
}

/// `spec` of a `VeilNode`: a node's announcement of how to reach it.
///
/// The CRD (`crds/veilnodes.yaml`, written by `crdgen`) is derived from this
/// type; `VeilNodeCrd` is kube-derive's typed root for it, while [`VeilNode`]
/// stays the plain serde type the sources read. Both share this spec and
/// [`VeilNodeStatus`], so the schema is exactly the fields the agent reads.
/// The schema's rules reject in the API server what [`Announcement::try_from`]
/// would skip later: CIDRs, ports, endpoint and key shapes.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, CustomResource, JsonSchema,
)]
// kube's derive takes one `printcolumn(name = .., type_ = .., ..)` per column;
// clippy reads the repeated keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilNode",
    root = "VeilNodeCrd",
    status = "VeilNodeStatus",
    shortname = "vn",
    category = "veil",
    doc = "A node's signed announcement of its WireGuard key, port, pod CIDRs and endpoint; named after the node and written only by that node's agent.",
    printcolumn(
        name = "Key generation",
        type_ = "integer",
        json_path = ".spec.generation"
    ),
    printcolumn(name = "Pod CIDRs", type_ = "string", json_path = ".spec.podCIDRs"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoint"),
    printcolumn(
        name = "Signer",
        type_ = "string",
        json_path = ".spec.signer",
        priority = 1
    ),
    printcolumn(
        name = "Public key",
        type_ = "string",
        json_path = ".spec.publicKey",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// What `kubectl explain veilnode.spec` shows (the doc above is for Rust readers).
#[schemars(
    description = "A node's announcement of how to reach it: WireGuard public key and port, pod CIDRs, endpoint, signed by the node's certified identity key (or by the authority for an external peer). Unsigned or wrongly signed announcements are ignored by every peer."
)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.notBefore) || !has(self.notAfter) || self.notAfter > self.notBefore",
        "message": "notAfter must be later than notBefore",
    },
]))]
pub struct VeilNodeSpec {
    /// The node's WireGuard public key, base64.
    #[schemars(regex(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub public_key: String,
    /// UDP port of the node's WireGuard engine; 51820 (`DEFAULT_LISTEN_PORT`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub listen_port: Option<u16>,
    /// The pod CIDRs the node asks its peers to accept from it.
    #[serde(rename = "podCIDRs", default)]
    #[schemars(
        length(max = 16),
        inner(length(max = 64)),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self.all(c, isCIDR(c))",
                "message": "every entry must be a CIDR such as 10.244.1.0/24 or fd00:10:244:1::/64",
            },
        ])
    )]
    pub pod_cidrs: Vec<String>,
    /// `ip:port` when the Node's InternalIP is not the address to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        // `ip:port`, IPv6 as `[addr]:port` (what `SocketAddr` parses):
        // the host is what precedes the last `:`, without its brackets.
        // An unbracketed host with a `:` (`fd00::1:51820`) is refused: it
        // is ambiguous, and `SocketAddr` refuses it too.
        extend("x-kubernetes-validations" = [
            {
                "rule": "self.lastIndexOf(':') > 0 && isIP(self.startsWith('[') && self.substring(0, self.lastIndexOf(':')).endsWith(']') ? self.substring(1, self.lastIndexOf(':') - 1) : self.substring(0, self.lastIndexOf(':'))) && (self.startsWith('[') || !self.substring(0, self.lastIndexOf(':')).contains(':'))",
                "message": "must be ip:port with an IP address (IPv6 as [addr]:port)",
            },
            {
                "rule": "self.lastIndexOf(':') < 0 || (self.substring(self.lastIndexOf(':') + 1).matches('^[0-9]{1,5}$') && int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535)",
                "message": "the port after the last ':' must be 1-65535",
            },
        ])
    )]
    pub endpoint: Option<String>,
    /// Generation of `publicKey` (1 for a node's first key, +1 per rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub generation: Option<u64>,
    /// Validity of this announcement, in seconds since the Unix epoch (UTC).
    /// Integers rather than RFC 3339: they are exactly what is signed, so
    /// no parsing or time-zone rule can make two readers disagree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// The node's Ed25519 identity public key, base64. Present alone (no
    /// certificate yet) while the node waits for `veilctl node approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<String>,
    /// The authority's certificate for `identityKey` (keymgr's base64 form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Ed25519 signature over the announcement's canonical bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// `Node` (the certified identity key signed) or `Authority` (an
    /// external WireGuard peer enrolled with `veilctl peer add`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Node", "Authority"]))]
    pub signer: Option<String>,
}

/// `status` of a `VeilNode`: progress information written by the node's
/// agent. Unsigned and never used for routing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VeilNodeStatus {
    /// When the current WireGuard key was first announced (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_since: Option<u64>,
    /// Per peer: the generation of the peer's key this node uses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peer_generations: BTreeMap<String, u64>,
    /// Per peer: the generation of this node's own key that the live session
    /// with the peer was made with.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub session_generations: BTreeMap<String, u64>,
    /// The node's stand on the cluster-wide enable flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<VeilNodeEncryptionStatus>,
}

/// `status.encryption` of a `VeilNode` (see [`crate::cluster::EncryptionStatus`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(
    description = "The node's stand on the cluster-wide enable flag (VeilClusterConfig spec.encryption) and its peers' state."
)]
pub struct VeilNodeEncryptionStatus {
    /// The value of `spec.encryption.enabled` this node acts on.
    #[serde(default)]
    pub enabled: bool,
    /// Its engine is up with every peer configured: it can receive
    /// encrypted traffic from each of them.
    #[serde(default)]
    pub ready: bool,
    /// It delivers plaintext from remote pods; false only once strict mode
    /// has converged. Absent means true: an agent that does not report it
    /// never refused plaintext.
    #[serde(default = "yes")]
    pub accepts_plaintext: bool,
    /// How many peers it sends to encrypted.
    #[serde(default)]
    pub encrypted_peers: u32,
    /// How many peers it sends to in plaintext.
    #[serde(default)]
    pub plaintext_peers: u32,
    /// How many peers it sends nothing to.
    #[serde(default)]
    pub dropped_peers: u32,
}

fn yes() -> bool {
    true
}

impl From<&VeilNodeEncryptionStatus> for crate::cluster::EncryptionStatus {
    fn from(s: &VeilNodeEncryptionStatus) -> Self {
        Self {
            enabled: s.enabled,
            ready: s.ready,
            accepts_plaintext: s.accepts_plaintext,
            encrypted_peers: s.encrypted_peers,
            plaintext_peers: s.plaintext_peers,
            dropped_peers: s.dropped_peers,
        }
    }
}

impl From<&crate::cluster::EncryptionStatus> for VeilNodeEncryptionStatus {
    fn from(s: &crate::cluster::EncryptionStatus) -> Self {
        Self {
            enabled: s.enabled,
            ready: s.ready,
            accepts_plaintext: s.accepts_plaintext,
            encrypted_peers: s.encrypted_peers,
            plaintext_peers: s.plaintext_peers,
            dropped_peers: s.dropped_peers,
        }
    }
}

/// `status` of the `VeilClusterConfig`: how far the cluster has converged
/// on `spec`, as conditions in the Kubernetes convention (`type`,
/// `status` True/False, `reason`, `message`) plus the counts behind them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VeilClusterConfigStatus {
    #[serde(default)]
    pub conditions: Vec<ClusterCondition>,
}

/// One condition of [`VeilClusterConfigStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(
    description = "One condition of the cluster's convergence on spec, e.g. EncryptionReady, with the node counts behind it."
)]
pub struct ClusterCondition {
    /// The condition's name, e.g. `EncryptionReady`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// How many nodes meet the condition, of how many.
    pub ready_nodes: u32,
    pub total_nodes: u32,
}

/// The `status` a node's agent writes for its [`NodeKeyStatus`]; every
/// source (file, kube) writes it through this one conversion.
impl From<&NodeKeyStatus> for VeilNodeStatus {
    fn from(s: &NodeKeyStatus) -> Self {
        VeilNodeStatus {
            key_since: s.key_since,
            peer_generations: s.peers.clone(),
            encryption: s.encryption.as_ref().map(Into::into),
            session_generations: s.sessions.clone(),
        }
    }
}

/// `veil.dev/v1alpha1 VeilNode`, cluster-scoped, named after the node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VeilNode {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VeilNodeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VeilNodeStatus>,
}

impl VeilNode {
    pub const API_VERSION: &'static str = VEIL_API_VERSION;
    pub const KIND: &'static str = "VeilNode";

    /// `VeilNode/<node>`, as diagnostics and origins name it.
    pub fn object_ref(node: &str) -> String {
        format!("{}/{node}", Self::KIND)
    }

    pub fn new(name: &str, spec: VeilNodeSpec) -> Self {
        Self {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }
}

/// `spec.encryption` of the `VeilClusterConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// Off when absent: enabling encryption is an explicit cluster decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// On when absent: never send remote pod traffic in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `spec` of the `VeilClusterConfig`. Its CRD is derived from this type like
/// [`VeilNodeSpec`]'s (`VeilClusterConfigCrd` is the kube-derive root); the
/// API server admits only the name `default`, the only one the agent reads.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, CustomResource, JsonSchema,
)]
// kube's derive takes one `printcolumn(name = .., type_ = .., ..)` per column;
// clippy reads the repeated keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilClusterConfig",
    root = "VeilClusterConfigCrd",
    status = "VeilClusterConfigStatus",
    shortname = "vcc",
    category = "veil",
    doc = "Cluster-wide Veil settings: the encryption enable flag, strict mode, the cluster pod ranges and key rotation. Only the object named `default` exists.",
    validation = Rule::new("self.metadata.name == 'default'").message("the only VeilClusterConfig is named `default`"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.encryption.enabled"),
    printcolumn(name = "Strict", type_ = "boolean", json_path = ".spec.encryption.strict"),
    // The counts of the EncryptionReady condition (`reconcile::enable`).
    printcolumn(name = "Ready nodes", type_ = "integer", json_path = ".status.conditions[?(@.type==\"EncryptionReady\")].readyNodes"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.conditions[?(@.type==\"EncryptionReady\")].totalNodes"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(
    description = "Cluster-wide settings every agent follows: the encryption enable flag and strict mode, the cluster pod ranges, key rotation."
)]
pub struct VeilClusterConfigSpec {
    #[serde(default)]
    pub encryption: EncryptionSpec,
    /// The cluster's pod address ranges, e.g. `[10.244.0.0/16]`.
    #[serde(
        default,
        rename = "clusterPodCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(
        length(max = 16),
        inner(length(max = 64)),
        extend("x-kubernetes-validations" = [
            {
                "rule": "self.all(c, isCIDR(c))",
                "message": "every entry must be a CIDR such as 10.244.0.0/16",
            },
        ])
    )]
    pub cluster_pod_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<KeyRotationSpec>,
}

/// `spec.keyRotation` of the `VeilClusterConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationSpec {
    /// Rotate each node's WireGuard key when it is older than this, e.g.
    /// `24h`; absent: rotate only on `veilctl keys rotate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The shape [`parse_interval`] accepts (its range checks stay in Rust).
    #[schemars(length(max = 32), regex(pattern = "^([0-9]+[smhd])+$"))]
    pub interval: Option<String>,
}

/// Largest accepted rotation interval: far beyond any sensible schedule, and
/// small enough that adding it to a timestamp cannot overflow.
const MAX_INTERVAL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a duration written as one or more `<digits><unit>` parts, units
/// `s`, `m`, `h`, `d` (`24h`, `1h30m`, `3600s`), like Go's
/// `time.ParseDuration` that Kubernetes users know, without fractions.
pub fn parse_interval(value: &str) -> Result<Duration, ObjectError> {
    let bad = |reason: &str| ObjectError::InvalidInterval {
        value: value.into(),
        reason: reason.into(),
    };
    let text = value.trim();
    if text.is_empty() {
        return Err(bad("is empty"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad(&format!("has `{c}`, which is not a digit or a unit"))),
        };
        if digits.is_empty() {
            return Err(bad(&format!("has unit `{c}` without a number before it")));
        }
        let n: u64 = digits.parse().map_err(|_| bad("has a number too large"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| bad("is too long"))?;
    }
    if !digits.is_empty() {
        return Err(bad("ends in a number without a unit"));
    }
    let interval = Duration::from_secs(total);
    if interval.is_zero() {
        return Err(bad("is zero"));
    }
    if interval > MAX_INTERVAL {
        return Err(bad("is longer than 10 years"));
    }
    Ok(interval)
}

/// `veil.dev/v1alpha1 VeilClusterConfig`, cluster-scoped; only `default` counts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VeilClusterConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VeilClusterConfigSpec,
}

impl VeilClusterConfig {
    pub const API_VERSION: &'static str = VEIL_API_VERSION;
    pub const KIND: &'static str = "VeilClusterConfig";

    pub fn new(spec: VeilClusterConfigSpec) -> Self {
        Self {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: ObjectMeta {
                name: Some(CLUSTER_CONFIG_NAME.into()),
                ..ObjectMeta::default()
            },
            spec,
        }
    }
}

impl TryFrom<&VeilClusterConfigSpec> for ClusterConfig {
    type Error = ObjectError;

    fn try_from(spec: &VeilClusterConfigSpec) -> Result<Self, ObjectError> {
        let defaults = ClusterConfig::default();
        let cluster_pod_cidrs = spec
            .cluster_pod_cidrs
            .iter()
            .map(|c| parse_cidr("spec.clusterPodCIDRs", c))
            .collect::<Result<Vec<_>, _>>()?;
        let key_rotation_interval = spec
            .key_rotation
            .as_ref()
            .and_then(|k| k.interval.as_deref())
            .map(parse_interval)
            .transpose()?;
        Ok(ClusterConfig {
            encryption_enabled: spec
                .encryption
                .enabled
                .unwrap_or(defaults.encryption_enabled),
            strict: spec.encryption.strict.unwrap_or(defaults.strict),
            cluster_pod_cidrs,
            key_rotation_interval,
        })
    }
}

fn name_of(meta: &ObjectMeta) -> Result<String, ObjectError> {
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(ObjectError::MissingName),
    }
}

/// Parses a CIDR; host bits are cleared, as the API server's sloppy parser
/// accepts `10.244.1.5/24` for `10.244.1.0/24`.
pub fn parse_cidr(field: &'static str, value: &str) -> Result<IpNet, ObjectError> {
    value
        .trim()
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|e| ObjectError::InvalidCidr {
            field,
            value: value.into(),
            reason: e.to_string(),
        })
}

pub fn parse_ip(field: &'static str, value: &str) -> Result<IpAddr, ObjectError> {
    value
        .trim()
        .parse::<IpAddr>()
        .map_err(|e| ObjectError::InvalidIp {
            field,
            value: value.into(),
            reason: e.to_string(),
        })
}

fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

impl TryFrom<&Node> for NodeInfo {
    type Error = ObjectError;

    fn try_from(node: &Node) -> Result<Self, ObjectError> {
        let name = name_of(&node.metadata)?;
        let spec = node.spec.as_ref();
        // `podCIDRs` (dual stack, 1.16+) supersedes `podCIDR`; when both are
        // set the API server keeps podCIDR == podCIDRs[0].
        let pod_cidrs = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
            Some(list) if !list.is_empty() => list
                .iter()
                .map(|c| parse_cidr("spec.podCIDRs", c))
                .collect::<Result<Vec<_>, _>>()?,
            _ => spec
                .and_then(|s| s.pod_cidr.as_deref())
                .filter(|c| !c.is_empty())
                .map(|c| parse_cidr("spec.podCIDR", c))
                .transpose()?
                .into_iter()
                .collect(),
        };
        let mut pod_cidrs_dedup = Vec::with_capacity(pod_cidrs.len());
        for cidr in pod_cidrs {
            if !pod_cidrs_dedup.contains(&cidr) {
                pod_cidrs_dedup.push(cidr);
            }
        }
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|addrs| addrs.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| parse_ip("status.addresses[InternalIP]", &a.address))
            .transpose()?;
        Ok(NodeInfo {
            name,
            pod_cidrs: pod_cidrs_dedup,
            internal_ip,
        })
    }
}

impl TryFrom<&Pod> for PodInfo {
    type Error = ObjectError;

    fn try_from(pod: &Pod) -> Result<Self, ObjectError> {
        let name = name_of(&pod.metadata)?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".into());
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut pod_ips = Vec::new();
        // A pod that has terminated has released its IP (the CNI may already
        // have given it to another pod) even though status still shows it.
        let terminated = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !terminated {
            if let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) {
                if !ip.is_empty() {
                    pod_ips.push(parse_ip("status.podIP", ip)?);
                }
            }
            for entry in status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
            {
                let ip = parse_ip("status.podIPs", &entry.ip)?;
                if !pod_ips.contains(&ip) {
                    pod_ips.push(ip);
                }
            }
        }
        Ok(PodInfo {
            namespace,
            name,
            labels: labels_of(&pod.metadata),
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            pod_ip: pod_ips.first().copied(),
            pod_ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        })
    }
}

impl TryFrom<&Namespace> for NamespaceInfo {
    type Error = ObjectError;

    fn try_from(ns: &Namespace) -> Result<Self, ObjectError> {
        let name = name_of(&ns.metadata)?;
        let mut labels = labels_of(&ns.metadata);
        // Objects read from files (or from old clusters) may lack the label
        // the API server adds automatically; selectors rely on it.
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        Ok(NamespaceInfo { name, labels })
    }
}

impl TryFrom<&VeilNode> for Announcement {
    type Error = ObjectError;

    fn try_from(vn: &VeilNode) -> Result<Self, ObjectError> {
        let node = name_of(&vn.metadata)?;
        let spec = &vn.spec;
        let public_key =
            PublicKey(keymgr::decode_key(&spec.public_key).map_err(ObjectError::InvalidPublicKey)?);
        let listen_port = spec.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
        if listen_port == 0 {
            return Err(ObjectError::ZeroPort);
        }
        let mut pod_cidrs = Vec::with_capacity(spec.pod_cidrs.len());
        for c in &spec.pod_cidrs {
            let cidr = parse_cidr("spec.podCIDRs", c)?;
            if !pod_cidrs.contains(&cidr) {
                pod_cidrs.push(cidr);
            }
        }
        let endpoint =
            spec.endpoint
                .as_deref()
                .filter(|e| !e.trim().is_empty())
                .map(|e| {
                    let addr = e.trim().parse::<SocketAddr>().map_err(|err| {
                        ObjectError::InvalidEndpoint {
                            value: e.into(),
                            reason: err.to_string(),
                        }
                    })?;
                    if addr.port() == 0 {
                        return Err(ObjectError::EndpointZeroPort { value: e.into() });
                    }
                    Ok(addr)
                })
                .transpose()?;
        let identity_key = spec
            .identity_key
            .as_deref()
            .map(|k| keymgr::decode_key(k).map_err(ObjectError::InvalidIdentityKey))
            .transpose()?;
        let certificate = spec
            .certificate
            .as_deref()
            .map(|c| {
                keymgr::NodeCertificate::from_base64(c).map_err(ObjectError::InvalidCertificate)
            })
            .transpose()?;
        let signature = spec
            .signature
            .as_deref()
            .map(|s| keymgr::decode_signature(s).map_err(ObjectError::InvalidSignature))
            .transpose()?;
        let signer = spec
            .signer
            .as_deref()
            .map(|s| match s {
                "Node" => Ok(keymgr::SignerKind::Node),
                "Authority" => Ok(keymgr::SignerKind::Authority),
                other => Err(ObjectError::InvalidSigner(other.into())),
            })
            .transpose()?;
        let status = vn
            .status
            .as_ref()
            .map_or_else(NodeKeyStatus::default, |s| NodeKeyStatus {
                key_since: s.key_since,
                peers: s.peer_generations.clone(),
                encryption: s.encryption.as_ref().map(Into::into),
                sessions: s.session_generations.clone(),
            });
        Ok(Announcement {
            node,
            public_key,
            listen_port,
            pod_cidrs,
            endpoint,
            trust: AnnouncementTrust {
                generation: spec.generation.unwrap_or(0),
                not_before: spec.not_before.unwrap_or(0),
                not_after: spec.not_after.unwrap_or(0),
                identity_key,
                signer,
                certificate,
                signature,
            },
            status,
        })
    }
}

impl From<&Announcement> for VeilNode {
    fn from(a: &Announcement) -> Self {
        let t = &a.trust;
        let nonzero = |v: u64| (v != 0).then_some(v);
        let mut vn = VeilNode::new(
            &a.node,
            VeilNodeSpec {
                public_key: a.public_key.to_string(),
                listen_port: Some(a.listen_port),
                pod_cidrs: a.pod_cidrs.iter().map(ToString::to_string).collect(),
                endpoint: a.endpoint.map(|e| e.to_string()),
                generation: nonzero(t.generation),
                not_before: nonzero(t.not_before),
                not_after: nonzero(t.not_after),
                identity_key: t.identity_key.as_ref().map(keymgr::encode_key),
                certificate: t
                    .certificate
                    .as_ref()
                    .map(keymgr::NodeCertificate::to_base64),
                signature: t.signature.as_ref().map(keymgr::encode_signature),
                signer: t.signer.map(|k| {
                    match k {
                        keymgr::SignerKind::Node => "Node",
                        keymgr::SignerKind::Authority => "Authority",
                    }
                    .to_string()
                }),
            },
        );
        if a.status != NodeKeyStatus::default() {
            vn.status = Some(VeilNodeStatus::from(&a.status));
        }
        vn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn node_from_kubectl_yaml() {
        let node: Node = yaml(
            r#"
apiVersion: v1
kind: Node
metadata:
  creationTimestamp: "2025-01-01T00:00:00Z"
  labels: {kubernetes.io/hostname: n1}
  name: n1
  resourceVersion: "123"
  uid: 5f1d1f9e-0000-0000-0000-000000000000
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]
status:
  addresses:
  - {address: n1, type: Hostname}
  - {address: 198.18.0.1, type: InternalIP}
  - {address: "fd00::1", type: InternalIP}
  capacity: {cpu: "2", memory: 4Gi}
"#,
        );
        let info = NodeInfo::try_from(&node).unwrap();
        assert_eq!(info.name, "n1");
        assert_eq!(
            info.pod_cidrs,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(info.internal_ip, Some("198.18.0.1".parse().unwrap()));
    }

    #[test]
    fn node_pod_cidr_fallback_and_errors() {
        let node: Node = yaml(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\nspec: {podCIDR: 10.244.2.7/24}\n",
        );
        let info = NodeInfo::try_from(&node).unwrap();
        assert_eq!(
            info.pod_cidrs,
            vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(info.internal_ip, None);

        let bare: Node = yaml("apiVersion: v1\nkind: Node\nmetadata: {name: n3}\n");
        assert!(NodeInfo::try_from(&bare).unwrap().pod_cidrs.is_empty());

        let bad: Node = yaml("apiVersion: v1\nkind: Node\nmetadata: {name: n4}\nspec: {podCIDRs: [10.244.300.0/24]}\n");
        let err = NodeInfo::try_from(&bad).unwrap_err().to_string();
        assert!(
            err.contains("spec.podCIDRs") && err.contains("10.244.300.0/24"),
            "{err}"
        );

        let bad_ip: Node = yaml("apiVersion: v1\nkind: Node\nmetadata: {name: n5}\nstatus: {addresses: [{address: 198.18.0.999, type: InternalIP}]}\n");
        let err = NodeInfo::try_from(&bad_ip).unwrap_err().to_string();
        assert!(err.contains("198.18.0.999"), "{err}");

        let unnamed: Node = yaml("apiVersion: v1\nkind: Node\nmetadata: {}\n");
        assert!(matches!(
            NodeInfo::try_from(&unnamed),
            Err(ObjectError::MissingName)
        ));
    }

    #[test]
    fn pod_fields_defaults_and_terminated() {
        let pod: Pod = yaml(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels: {app: web}
spec:
  nodeName: n1
  containers: [{name: c, image: busybox}]
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00:10:244:1::5"}]
"#,
        );
        let info = PodInfo::try_from(&pod).unwrap();
        assert_eq!(info.namespace, "default");
        assert_eq!(info.name, "web-1");
        assert_eq!(info.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(info.node_name.as_deref(), Some("n1"));
        assert_eq!(info.pod_ip, Some("10.244.1.5".parse().unwrap()));
        assert_eq!(info.pod_ips.len(), 2);
        assert!(!info.host_network);

        let done: Pod = yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: batch}\nspec: {nodeName: n1, hostNetwork: true}\nstatus: {phase: Succeeded, podIP: 10.244.1.6}\n");
        let info = PodInfo::try_from(&done).unwrap();
        assert_eq!(info.namespace, "batch");
        assert!(info.host_network);
        assert_eq!(info.pod_ip, None);
        assert!(info.pod_ips.is_empty());

        let bad: Pod =
            yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: not-an-ip}\n");
        let err = PodInfo::try_from(&bad).unwrap_err().to_string();
        assert!(
            err.contains("status.podIP") && err.contains("not-an-ip"),
            "{err}"
        );
    }

    #[test]
    fn namespace_gets_name_label() {
        let ns: Namespace =
            yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n");
        let info = NamespaceInfo::try_from(&ns).unwrap();
        assert_eq!(info.labels.get("team").map(String::as_str), Some("a"));
        assert_eq!(
            info.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("prod")
        );
    }

    #[test]
    fn veil_node_round_trip_and_validation() {
        let key = keymgr::encode_key(&[9; 32]);
        let vn: VeilNode = yaml(&format!(
            "apiVersion: veil.dev/v1alpha1\nkind: VeilNode\nmetadata: {{name: n1}}\nspec:\n  publicKey: {key}\n  podCIDRs: [10.244.1.0/24]\n"
        ));
        let a = Announcement::try_from(&vn).unwrap();
        assert_eq!(a.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(a.public_key, PublicKey([9; 32]));
        assert_eq!(a.endpoint, None);
        let back = VeilNode::from(&Announcement {
            endpoint: Some("198.18.0.1:51821".parse().unwrap()),
            ..a.clone()
        });
        let text = serde_yaml::to_string(&back).unwrap();
        assert!(text.contains("podCIDRs:"), "{text}");
        assert!(text.contains("publicKey:"), "{text}");
        assert!(text.contains("listenPort: 51820"), "{text}");
        let again: VeilNode = yaml(&text);
        assert_eq!(
            Announcement::try_from(&again).unwrap().endpoint,
            Some("198.18.0.1:51821".parse().unwrap())
        );

        let mut bad = vn.clone();
        bad.spec.public_key = keymgr::encode_key(&[9; 32])[..20].into();
        assert!(matches!(
            Announcement::try_from(&bad),
            Err(ObjectError::InvalidPublicKey(_))
        ));
        let mut bad = vn.clone();
        bad.spec.listen_port = Some(0);
        assert!(matches!(
            Announcement::try_from(&bad),
            Err(ObjectError::ZeroPort)
        ));
        let mut bad = vn.clone();
        bad.spec.endpoint = Some("198.18.0.1".into());
        assert!(matches!(
            Announcement::try_from(&bad),
            Err(ObjectError::InvalidEndpoint { .. })
        ));
        let mut bad = vn.clone();
        bad.spec.endpoint = Some("198.18.0.1:0".into());
        assert!(matches!(
            Announcement::try_from(&bad),
            Err(ObjectError::EndpointZeroPort { .. })
        ));
        let mut bad = vn;
        bad.spec.pod_cidrs = vec!["10.244.1.0/33".into()];
        assert!(matches!(
            Announcement::try_from(&bad),
            Err(ObjectError::InvalidCidr { .. })
        ));
    }

    #[test]
    fn cluster_config_defaults() {
        let cfg: VeilClusterConfig = yaml(
            "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\n",
        );
        assert_eq!(
            ClusterConfig::try_from(&cfg.spec).unwrap(),
            ClusterConfig {
                encryption_enabled: false,
                strict: true,
                cluster_pod_cidrs: vec![],
                ..ClusterConfig::default()
            }
        );
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {encryption: {enabled: true}}\n");
        assert_eq!(
            ClusterConfig::try_from(&cfg.spec).unwrap(),
            ClusterConfig {
                encryption_enabled: true,
                strict: true,
                cluster_pod_cidrs: vec![],
                ..ClusterConfig::default()
            }
        );
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {encryption: {enabled: true, strict: false}}\n");
        assert!(!ClusterConfig::try_from(&cfg.spec).unwrap().strict);
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {clusterPodCIDRs: [10.244.0.0/16, 'fd00:244::/56']}\n");
        assert_eq!(
            ClusterConfig::try_from(&cfg.spec)
                .unwrap()
                .cluster_pod_cidrs,
            vec![
                "10.244.0.0/16".parse::<IpNet>().unwrap(),
                "fd00:244::/56".parse().unwrap()
            ]
        );
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {clusterPodCIDRs: [10.244.0.0/40]}\n");
        let err = ClusterConfig::try_from(&cfg.spec).unwrap_err().to_string();
        assert!(err.contains("spec.clusterPodCIDRs"), "{err}");
    }

    #[test]
    fn key_rotation_interval_is_parsed_and_validated() {
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {keyRotation: {interval: 1h30m}}\n");
        assert_eq!(
            ClusterConfig::try_from(&cfg.spec)
                .unwrap()
                .key_rotation_interval,
            Some(Duration::from_secs(5400))
        );
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {keyRotation: {}}\n");
        assert_eq!(
            ClusterConfig::try_from(&cfg.spec)
                .unwrap()
                .key_rotation_interval,
            None
        );
        let cfg: VeilClusterConfig = yaml("apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {keyRotation: {interval: 24}}\n");
        let err = ClusterConfig::try_from(&cfg.spec).unwrap_err().to_string();
        assert!(err.contains("spec.keyRotation.interval: `24`"), "{err}");
        assert!(err.contains("without a unit"), "{err}");
    }

    #[test]
    fn interval_formats() {
        assert_eq!(parse_interval("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_interval("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(
            parse_interval(" 3600s ").unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_interval("1d2h3m4s").unwrap(),
            Duration::from_secs(93_784)
        );
        for bad in [
            "",
            "0s",
            "0h0m",
            "h",
            "10",
            "1.5h",
            "-1h",
            "1w",
            "99999999999999999999s",
            "4000d",
        ] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pod_as_kubectl_prints_it() {
        let pod: Pod = yaml(
            r#"
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2025-03-01T10:00:00Z"
  generateName: web-7d4b9c-
  labels:
    app: web
    pod-template-hash: 7d4b9c
  name: web-7d4b9c-x2k8p
  namespace: prod
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: web-7d4b9c
    uid: 0b6f2f3e-1111-2222-3333-444455556666
  resourceVersion: "48213"
  uid: 9a0c9d1e-1111-2222-3333-444455556666
spec:
  containers:
  - image: nginx:1.27
    imagePullPolicy: IfNotPresent
    name: nginx
    ports:
    - containerPort: 80
      protocol: TCP
    resources:
      limits: {memory: 128Mi}
      requests: {cpu: 100m, memory: 64Mi}
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
    volumeMounts:
    - mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      name: kube-api-access-abcde
      readOnly: true
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: n2
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccountName: default
  terminationGracePeriodSeconds: 30
  tolerations:
  - effect: NoExecute
    key: node.kubernetes.io/not-ready
    operator: Exists
    tolerationSeconds: 300
  volumes:
  - name: kube-api-access-abcde
    projected:
      defaultMode: 420
      sources:
      - serviceAccountToken: {expirationSeconds: 3607, path: token}
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2025-03-01T10:00:02Z"
    status: "True"
    type: Ready
  containerStatuses:
  - containerID: containerd://abc
    image: docker.io/library/nginx:1.27
    imageID: docker.io/library/nginx@sha256:00
    lastState: {}
    name: nginx
    ready: true
    restartCount: 0
    started: true
    state:
      running: {startedAt: "2025-03-01T10:00:01Z"}
  hostIP: 198.18.0.2
  hostIPs:
  - ip: 198.18.0.2
  phase: Running
  podIP: 10.244.2.17
  podIPs:
  - ip: 10.244.2.17
  qosClass: Burstable
  startTime: "2025-03-01T10:00:00Z"
"#,
        );
        let info = PodInfo::try_from(&pod).unwrap();
        assert_eq!(
            (info.namespace.as_str(), info.name.as_str()),
            ("prod", "web-7d4b9c-x2k8p")
        );
        assert_eq!(info.labels.len(), 2);
        assert_eq!(info.node_name.as_deref(), Some("n2"));
        assert_eq!(info.pod_ips, vec!["10.244.2.17".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn signed_announcement_round_trips_through_yaml() {
        let authority = keymgr::AuthorityKey::from_seed([1; 32]);
        let identity = keymgr::IdentityKey::from_seed([2; 32]);
        let cert = authority
            .certify("n1", identity.public_key(), 1_700_000_000, 1_800_000_000)
            .unwrap();
        let body = keymgr::AnnouncementBody {
            node: "n1".into(),
            wireguard_key: keymgr::WireGuardPrivateKey::from_bytes([3; 32]).public_key(),
            generation: 7,
            listen_port: 51820,
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            endpoint: None,
            not_before: 1_750_000_000,
            not_after: 1_750_086_400,
        };
        let signed = keymgr::SignedAnnouncement::sign_by_node(body, &identity, cert).unwrap();
        let mut ann = Announcement::from_signed(&signed);
        ann.status.key_since = Some(1_750_000_000);
        ann.status.peers.insert("n2".into(), 3);
        ann.status.sessions.insert("n2".into(), 7);
        let text = serde_yaml::to_string(&VeilNode::from(&ann)).unwrap();
        // Readable: every field on its own line, times as plain integers.
        for field in [
            "generation: 7",
            "notBefore: 1750000000",
            "notAfter: 1750086400",
            "identityKey: ",
            "certificate: ",
            "signature: ",
            "signer: Node",
            "keySince: 1750000000",
            "sessionGenerations:",
        ] {
            assert!(text.contains(field), "{field} missing in:\n{text}");
        }
        let back = Announcement::try_from(&yaml::<VeilNode>(&text)).unwrap();
        assert_eq!(back, ann);
        assert_eq!(back.signed(), Some(signed));

        // Pending: an identity key alone.
        let mut pending = ann.clone();
        pending.trust = AnnouncementTrust {
            identity_key: Some(identity.public_key()),
            ..AnnouncementTrust::default()
        };
        let back = Announcement::try_from(&VeilNode::from(&pending)).unwrap();
        assert_eq!(back.signed(), None);
        assert_eq!(back.trust.identity_key, Some(identity.public_key()));
    }

    #[test]
    fn bad_trust_fields_name_the_field() {
        let base = VeilNodeSpec {
            public_key: keymgr::encode_key(&[9; 32]),
            ..VeilNodeSpec::default()
        };
        type Mutate = fn(&mut VeilNodeSpec);
        let cases: [(Mutate, &str); 4] = [
            (
                |s| s.identity_key = Some("short".into()),
                "spec.identityKey",
            ),
            (|s| s.certificate = Some("AAAA".into()), "spec.certificate"),
            (|s| s.signature = Some("!!".into()), "spec.signature"),
            (
                |s| s.signer = Some("Mallory".into()),
                "spec.signer: `Mallory`",
            ),
        ];
        for (mutate, field) in cases {
            let mut spec = base.clone();
            mutate(&mut spec);
            let err = Announcement::try_from(&VeilNode::new("n1", spec))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }
}
