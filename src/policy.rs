//! Identity-based policy: `networking.k8s.io/v1 NetworkPolicy` and
//! `veil.dev/v1alpha1 VeilPolicy`, validated into one model ([`Policy`]) and
//! compiled ([`compile()`]) into the entries of the BPF policy map.
//!
//! Everything here is pure: objects and identities in, map entries out.
//!
//! # Semantics
//! NetworkPolicy as specified by Kubernetes ("Network Policies" concept page
//! and the `networking/v1` API reference):
//! - a pod is isolated for a direction once any policy that selects it has
//!   that direction in `policyTypes` (default: `Ingress`, plus `Egress` when
//!   `spec.egress` is present); a non-isolated direction allows everything;
//! - the allows of every policy that selects a pod are unioned;
//! - a peer with only `podSelector` means pods of the policy's namespace, only
//!   `namespaceSelector` all pods of the selected namespaces, both in one peer
//!   the intersection; two peers in one rule are a union;
//! - `ipBlock` with `except`; ports with protocol (default TCP), `port`
//!   absent = every port of the protocol, `endPort` for ranges; a rule without
//!   `ports` allows every protocol and port, a rule without `from`/`to` every peer;
//! - named ports are accepted and match nothing: Veil does not see container
//!   port names (the reduced `PodInfo` has none), and matching nothing is the
//!   fail-closed reading of a name that does not resolve.
//!
//! `ipBlock` selects addresses that are not pods of the cluster (as Cilium
//! does): a pod's address always resolves to the pod's identity, so rules
//! about pods are written with selectors.
//!
//! Traffic between a pod and its own node (`host` identity: kubelet probes)
//! is always allowed, as the Kubernetes documentation expects of
//! implementations.
//!
//! `VeilPolicy` has the same selectors and adds `ingressDeny`/`egressDeny`
//! rules, which win over every allow (of any policy) and do not by themselves
//! isolate a pod, and `requireEncryption: true`, which turns the policy's
//! allows into "allowed only if the packet crossed the WireGuard tunnel"; of
//! an encrypted-only allow and a plain allow of the same flow the stricter
//! wins. Verdict precedence: deny > allow-if-encrypted > allow > default.

pub mod compile;
pub mod ranges;
pub mod selector;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

pub use compile::{compile, diff, Compiled, MapDiff, PolicyInput};
pub use selector::Selector;

/// What is wrong with a policy object; the object is always named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{policy}: {problem}; the policy is rejected, the previous set stays in force")]
    Invalid { policy: String, problem: String },
    #[error("trace: {0}")]
    Trace(String),
}

fn invalid(policy: &PolicyRef, problem: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        policy: policy.to_string(),
        problem: problem.into(),
    }
}

/// Traffic direction, seen from the pod a policy selects (its subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// IP protocol numbers (IANA "Assigned Internet Protocol Numbers").
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// `protocol`, ports `lo..=hi` (0..=65535 when `port` is absent).
    Range { proto: u8, lo: u16, hi: u16 },
    /// A named container port: matches nothing (see the module docs).
    Named { proto: u8, name: String },
}

/// Which namespaces a pod peer may live in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceMatch {
    /// The policy's own namespace (a peer without `namespaceSelector`).
    Same(String),
    Selector(Selector),
}

/// One element of `from`/`to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
}

/// One rule: peers x ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `None`: every peer (the field was absent or empty).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortMatch>>,
}

/// The kind of object a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    NetworkPolicy,
    VeilPolicy,
}

/// `Kind/namespace/name`, how diagnostics and traces name a policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::VeilPolicy => "VeilPolicy",
        };
        write!(f, "{kind}/{}/{}", self.namespace, self.name)
    }
}

/// A validated policy of either kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub id: PolicyRef,
    /// Selects pods of `id.namespace`.
    pub subject: Selector,
    /// Indexed by `Direction as usize`: whether the policy isolates its subjects.
    pub isolates: [bool; 2],
    pub allow: [Vec<Rule>; 2],
    pub deny: [Vec<Rule>; 2],
    pub require_encryption: bool,
}

/// `spec` of a `VeilPolicy`. The rule types are NetworkPolicy's, so the
/// selectors, peers and ports read (and validate) exactly the same.
/// The CRD is derived from this type (`VeilPolicyCrd` is the kube-derive
/// root); `crate::crd::veil_policy_rules` adds the port and CIDR rules.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Default,
    Serialize,
    Deserialize,
    kube::CustomResource,
    schemars::JsonSchema,
)]
// kube's derive takes one `printcolumn(name = .., type_ = .., ..)` per column;
// clippy reads the repeated keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilPolicy",
    root = "VeilPolicyCrd",
    namespaced,
    shortname = "vp",
    category = "veil",
    doc = "NetworkPolicy's selectors and rules plus deny rules and requireEncryption, enforced by Veil in eBPF on the pods of its namespace.",
    printcolumn(
        name = "Encrypted only",
        type_ = "boolean",
        json_path = ".spec.requireEncryption"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(transform = crate::crd::veil_policy_rules)]
#[serde(rename_all = "camelCase")]
pub struct VeilPolicySpec {
    /// The pods of this namespace the policy applies to; empty selects all.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Allows; present (even empty) = the subjects are isolated for ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    /// Allows; present (even empty) = the subjects are isolated for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
    /// Denies: win over every allow; do not isolate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_deny: Vec<NetworkPolicyIngressRule>,
    /// Denies: win over every allow; do not isolate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<NetworkPolicyEgressRule>,
    /// This policy's allow rules admit only traffic carried through
    /// WireGuard (a plaintext packet they would allow is not allowed).
    #[serde(default)]
    pub require_encryption: bool,
}

/// `veil.dev/v1alpha1 VeilPolicy`, namespaced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VeilPolicy {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VeilPolicySpec,
}

impl VeilPolicy {
    pub const API_VERSION: &'static str = crate::cluster::objects::VEIL_API_VERSION;
    pub const KIND: &'static str = "VeilPolicy";
}

fn policy_ref(kind: PolicyKind, meta: &ObjectMeta) -> Result<PolicyRef, PolicyError> {
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let id = PolicyRef {
        kind,
        namespace,
        name,
    };
    if id.name.is_empty() {
        return Err(invalid(&id, "metadata.name is missing or empty"));
    }
    Ok(id)
}

impl TryFrom<&NetworkPolicy> for Policy {
    type Error = PolicyError;

    fn try_from(np: &NetworkPolicy) -> Result<Policy, PolicyError> {
        let id = policy_ref(PolicyKind::NetworkPolicy, &np.metadata)?;
        let spec = np.spec.clone().unwrap_or_default();
        let subject = Selector::parse(
            "spec.podSelector",
            &spec.pod_selector.clone().unwrap_or_default(),
        )
        .map_err(|p| invalid(&id, p))?;
        // policyTypes default (networking/v1 API reference): Ingress always,
        // Egress when the policy has egress rules.
        let mut isolates = [true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())];
        if let Some(types) = &spec.policy_types {
            isolates = [false, false];
            for t in types {
                match t.as_str() {
                    "Ingress" => isolates[0] = true,
                    "Egress" => isolates[1] = true,
                    other => {
                        return Err(invalid(
                            &id,
                            format!("spec.policyTypes: `{other}` is not Ingress or Egress"),
                        ))
                    }
                }
            }
        }
        let ingress = ingress_rules(&id, "spec.ingress", spec.ingress.as_deref())?;
        let egress = egress_rules(&id, "spec.egress", spec.egress.as_deref())?;
        Ok(Policy {
            // Rules of a direction the policy does not isolate are ignored by
            // Kubernetes; keeping them would allow nothing new anyway.
            allow: [
                if isolates[0] { ingress } else { Vec::new() },
                if isolates[1] { egress } else { Vec::new() },
            ],
            id,
            subject,
            isolates,
            deny: [Vec::new(), Vec::new()],
            require_encryption: false,
        })
    }
}

impl TryFrom<&VeilPolicy> for Policy {
    type Error = PolicyError;

    fn try_from(vp: &VeilPolicy) -> Result<Policy, PolicyError> {
        let id = policy_ref(PolicyKind::VeilPolicy, &vp.metadata)?;
        let s = &vp.spec;
        let subject =
            Selector::parse("spec.podSelector", &s.pod_selector).map_err(|p| invalid(&id, p))?;
        Ok(Policy {
            isolates: [s.ingress.is_some(), s.egress.is_some()],
            allow: [
                ingress_rules(&id, "spec.ingress", s.ingress.as_deref())?,
                egress_rules(&id, "spec.egress", s.egress.as_deref())?,
            ],
            deny: [
                ingress_rules(&id, "spec.ingressDeny", Some(&s.ingress_deny))?,
                egress_rules(&id, "spec.egressDeny", Some(&s.egress_deny))?,
            ],
            require_encryption: s.require_encryption,
            id,
            subject,
        })
    }
}

fn ingress_rules(
    id: &PolicyRef,
    field: &str,
    rules: Option<&[NetworkPolicyIngressRule]>,
) -> Result<Vec<Rule>, PolicyError> {
    each_rule(id, field, "from", rules, |r| {
        (r.from.as_deref(), r.ports.as_deref())
    })
}

fn egress_rules(
    id: &PolicyRef,
    field: &str,
    rules: Option<&[NetworkPolicyEgressRule]>,
) -> Result<Vec<Rule>, PolicyError> {
    each_rule(id, field, "to", rules, |r| {
        (r.to.as_deref(), r.ports.as_deref())
    })
}

/// Converts `field[i]` for every rule of one direction; `parts` picks the
/// peers list (`from` or `to`) and the ports of a rule.
fn each_rule<R>(
    id: &PolicyRef,
    field: &str,
    peers_field: &str,
    rules: Option<&[R]>,
    parts: impl Fn(&R) -> (Option<&[NetworkPolicyPeer]>, Option<&[NetworkPolicyPort]>),
) -> Result<Vec<Rule>, PolicyError> {
    rules
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (peers, ports) = parts(r);
            rule(id, &format!("{field}[{i}]"), peers_field, peers, ports)
        })
        .collect()
}

fn rule(
    id: &PolicyRef,
    field: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, PolicyError> {
    // An empty list means the same as an absent one (API reference:
    // "If this field is empty or missing, this rule matches all ...").
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| peer(id, &format!("{field}.{peers_field}[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| port(id, &format!("{field}.ports[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn peer(id: &PolicyRef, field: &str, p: &NetworkPolicyPeer) -> Result<Peer, PolicyError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(b), None, None) => ip_block(id, &format!("{field}.ipBlock"), b),
        (Some(_), _, _) => Err(invalid(
            id,
            format!("{field}: ipBlock cannot be combined with podSelector or namespaceSelector"),
        )),
        (None, None, None) => Err(invalid(
            id,
            format!("{field}: a peer needs podSelector, namespaceSelector or ipBlock"),
        )),
        (None, pods, namespaces) => {
            let pods = match pods {
                Some(s) => Selector::parse(&format!("{field}.podSelector"), s)
                    .map_err(|e| invalid(id, e))?,
                None => Selector::default(),
            };
            let namespaces = match namespaces {
                Some(s) => NamespaceMatch::Selector(
                    Selector::parse(&format!("{field}.namespaceSelector"), s)
                        .map_err(|e| invalid(id, e))?,
                ),
                None => NamespaceMatch::Same(id.namespace.clone()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn parse_net(id: &PolicyRef, field: &str, s: &str) -> Result<IpNet, PolicyError> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|e| invalid(id, format!("{field}: `{s}` is not a CIDR: {e}")))
}

fn ip_block(id: &PolicyRef, field: &str, b: &IPBlock) -> Result<Peer, PolicyError> {
    let cidr = parse_net(id, &format!("{field}.cidr"), &b.cidr)?;
    let mut except = BTreeSet::new();
    for (i, e) in b.except.iter().flatten().enumerate() {
        let place = format!("{field}.except[{i}]");
        let net = parse_net(id, &place, e)?;
        // The API server requires except entries strictly inside cidr.
        if !cidr.contains(&net) || net == cidr {
            return Err(invalid(
                id,
                format!("{place}: {net} is not strictly inside cidr {cidr}"),
            ));
        }
        except.insert(net);
    }
    Ok(Peer::IpBlock {
        cidr,
        except: except.into_iter().collect(),
    })
}

fn port(id: &PolicyRef, field: &str, p: &NetworkPolicyPort) -> Result<PortMatch, PolicyError> {
    let proto = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        other => {
            return Err(invalid(
                id,
                format!("{field}.protocol: `{other}` is not TCP, UDP or SCTP"),
            ))
        }
    };
    let check = |n: i32, what: &str| -> Result<u16, PolicyError> {
        u16::try_from(n)
            .ok()
            .filter(|&v| v != 0)
            .ok_or_else(|| invalid(id, format!("{field}.{what}: {n} is not a port (1-65535)")))
    };
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::Range {
            proto,
            lo: 0,
            hi: u16::MAX,
        }),
        (None, Some(_)) => Err(invalid(id, format!("{field}.endPort requires port"))),
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(invalid(
                    id,
                    format!("{field}.endPort cannot be used with the named port `{name}`"),
                ));
            }
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && name.bytes().any(|b| b.is_ascii_lowercase());
            if !ok {
                return Err(invalid(
                    id,
                    format!("{field}.port: `{name}` is neither a number nor a valid port name (IANA_SVC_NAME)"),
                ));
            }
            Ok(PortMatch::Named {
                proto,
                name: name.clone(),
            })
        }
        (Some(IntOrString::Int(n)), end) => {
            let lo = check(*n, "port")?;
            let hi = match end {
                None => lo,
                Some(e) => {
                    let hi = check(e, "endPort")?;
                    if hi < lo {
                        return Err(invalid(
                            id,
                            format!("{field}.endPort: {hi} is below port {lo}"),
                        ));
                    }
                    hi
                }
            };
            Ok(PortMatch::Range { proto, lo, hi })
        }
    }
}

/// The identities of the pods in `state` (host-network pods share their
/// node's address and are not endpoints), as the reconciler numbers them:
/// from the published `VeilIdentity` set. Label sets without a published
/// identity are left out: their pods are `init` (see [`pending_of`]).
pub fn identities_of(
    state: &crate::cluster::ClusterState,
) -> std::collections::BTreeMap<crate::identity::Identity, compile::IdentityKey> {
    let published = crate::identity::Published::resolve(&state.identities);
    crate::identity::wanted(state)
        .into_iter()
        .filter_map(|key| {
            published
                .get(&key.namespace, &key.labels)
                .map(|id| (id, key))
        })
        .collect()
}

/// The label sets of pods whose identity is not published yet (`init`).
pub fn pending_of(
    state: &crate::cluster::ClusterState,
) -> std::collections::BTreeSet<compile::IdentityKey> {
    let published = crate::identity::Published::resolve(&state.identities);
    crate::identity::wanted(state)
        .into_iter()
        .filter(|key| published.get(&key.namespace, &key.labels).is_none())
        .collect()
}

/// Fail closed for pods without a published identity: they all share
/// `init`, so `init` is isolated in a direction if any policy would isolate
/// one of them there, and then only its own node is allowed (no rule can
/// name `init` as a subject). Pods no policy would isolate keep passing.
pub fn add_init_policy(
    compiled: &mut Compiled,
    pending: &std::collections::BTreeSet<compile::IdentityKey>,
    policies: &[Policy],
) {
    use crate::identity::Identity;
    for d in Direction::BOTH {
        let isolated = pending.iter().any(|k| {
            policies.iter().any(|p| {
                p.isolates[d as usize]
                    && p.id.namespace == k.namespace
                    && p.subject.matches(&k.labels)
            })
        });
        if !isolated {
            continue;
        }
        compiled.isolated.insert((Identity::INIT, d));
        let all = ranges::Block { start: 0, len: 0 };
        compiled.entries.insert(
            compile::EntryKey {
                subject: Identity::INIT,
                peer: compile::PEER_ANY,
                direction: d,
                block: all,
            },
            compile::EntryValue {
                verdict: compile::Verdict::Deny,
                rule: compile::RuleId::DEFAULT_DENY,
            },
        );
        compiled.entries.insert(
            compile::EntryKey {
                subject: Identity::INIT,
                peer: Identity::HOST.0,
                direction: d,
                block: all,
            },
            compile::EntryValue {
                verdict: compile::Verdict::Allow,
                rule: compile::RuleId::HOST,
            },
        );
    }
}

/// Compiles the policies of `state` (each already validated by its source;
/// an invalid edit keeps the last good version there).
pub fn compile_state(state: &crate::cluster::ClusterState) -> Compiled {
    let identities = identities_of(state);
    let namespaces: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
        state
            .namespaces
            .iter()
            .map(|(n, info)| (n.clone(), info.labels.clone()))
            .collect();
    let policies: Vec<Policy> = state.policies.values().cloned().collect();
    let mut compiled = compile(&PolicyInput {
        identities: &identities,
        namespaces: &namespaces,
        policies: &policies,
    });
    add_init_policy(&mut compiled, &pending_of(state), &policies);
    compiled
}

/// Parses `80/tcp`, `53/udp`, `9/sctp` or `80` (TCP).
pub fn parse_port_spec(spec: &str) -> Result<(u8, u16), PolicyError> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "sctp" => PROTO_SCTP,
        other => {
            return Err(PolicyError::Trace(format!(
                "`{other}` in `{spec}` is not tcp, udp or sctp"
            )))
        }
    };
    let port = port
        .parse::<u16>()
        .map_err(|e| PolicyError::Trace(format!("`{port}` in `{spec}` is not a port: {e}")))?;
    Ok((proto, port))
}

/// `veilctl policy trace`: the verdict for a new connection from one pod
/// (`namespace/name`) to another, each direction with the rule that decided.
/// The path is the tunnel when the pods run on different nodes and
/// encryption is enabled, plaintext otherwise (which `requireEncryption`
/// refuses). Returns whether the flow is allowed, and the report.
pub fn trace_pods(
    state: &crate::cluster::ClusterState,
    from: &str,
    to: &str,
    port_spec: &str,
) -> Result<(bool, String), PolicyError> {
    use std::fmt::Write as _;
    let (proto, port) = parse_port_spec(port_spec)?;
    let pod = |r: &str| -> Result<&crate::cluster::PodInfo, PolicyError> {
        let (ns, name) = r
            .split_once('/')
            .ok_or_else(|| PolicyError::Trace(format!("`{r}` is not NAMESPACE/POD")))?;
        state
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .ok_or_else(|| PolicyError::Trace(format!("no pod {ns}/{name} in the cluster state")))
    };
    let (a, b) = (pod(from)?, pod(to)?);
    let compiled = compile_state(state);
    let published = crate::identity::Published::resolve(&state.identities);
    let ida = published.of(&a.namespace, &a.labels);
    let idb = published.of(&b.namespace, &b.labels);
    let tunnel = state.config.encryption_enabled && a.node_name != b.node_name;
    let t = compile::trace(&compiled, ida, idb, proto, port, tunnel);
    let show = |d: &compile::Decision| -> String {
        let what = match (d.allowed, d.verdict) {
            (true, _) => "allow",
            (false, Some(compile::Verdict::AllowEncrypted)) => {
                "deny (allowed only over the tunnel)"
            }
            (false, _) => "deny",
        };
        format!("{what}: {}", compiled.describe(d.rule))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "from {from} (identity {ida}) to {to} (identity {idb}), {port_spec}, path: {}",
        if tunnel {
            "WireGuard tunnel"
        } else {
            "plaintext (same node or encryption off)"
        }
    );
    let _ = writeln!(out, "  egress of {from}:  {}", show(&t.egress));
    let _ = writeln!(out, "  ingress of {to}: {}", show(&t.ingress));
    let _ = writeln!(
        out,
        "verdict: {}",
        if t.allowed() { "ALLOW" } else { "DENY" }
    );
    Ok((t.allowed(), out))
}
