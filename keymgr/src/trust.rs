//! Who may announce a WireGuard key for a node, and how receivers check it.
//!
//! # Trust model
//!
//! * **Cluster authority.** One Ed25519 key per cluster ([`AuthorityKey`],
//!   made by `veilctl ca init`). The operator keeps the private half; it is
//!   never written to the cluster store. Agents are given the authority's
//!   *public* key out of band (a file placed at install time, see
//!   [`read_public_key_file`](crate::read_public_key_file)) and never read it
//!   from the cluster store: whoever can write the store (VeilNode objects,
//!   the file source directory) must not be able to replace the trust root.
//! * **Node identity.** Each node generates its own Ed25519 key
//!   ([`IdentityKey`]), stored 0600 on the node by
//!   [`KeyStore`](crate::KeyStore). The private half never leaves the node.
//! * **Node certificate.** The authority signs (node name, identity public
//!   key, not_before, not_after): a [`NodeCertificate`]. `veilctl node approve
//!   NAME` issues it for the identity key the node published while pending;
//!   an opt-in auto-approve (demo only) does the same without a human.
//! * **Signed announcement.** What a `VeilNode` carries: an
//!   [`AnnouncementBody`] (node name, WireGuard public key, key generation,
//!   listen port, pod CIDRs, optional endpoint, validity), the node's
//!   certificate, and the identity key's signature over the body.
//! * **External WireGuard peers** (`veilctl peer add`) have no identity key:
//!   the authority signs their announcement itself ([`Signer::Authority`]).
//!   This is an explicit signer kind, bound into the signed bytes, never a
//!   fallback taken when a node signature fails.
//!
//! A receiver accepts an announcement only if all of these hold
//! ([`SignedAnnouncement::verify`]), each failure being its own
//! [`TrustError`] variant naming the node:
//!
//! 1. the certificate verifies under the authority key, is within its
//!    validity at `now` (± the clock skew tolerance) and names the same node
//!    as the announcement — or the signer is the authority itself;
//! 2. the announcement signature verifies under the certified identity key
//!    (or the authority key) — strict RFC 8032 verification, which also
//!    refuses small-order keys and non-canonical signatures;
//! 3. the announcement is within its own validity at `now` (± skew);
//! 4. its key generation is not lower than the one already accepted for the
//!    node (equal is a re-publication and fine): a replayed old announcement
//!    cannot roll a node back to a retired WireGuard key;
//! 5. its WireGuard key can take part in a handshake (not small-order);
//! 6. for a node-signed announcement, its pod CIDRs are exactly those of the
//!    Node object (as sets, after normalization): the node's identity key
//!    vouches for *which key* the node uses, while the Kubernetes Node object
//!    says *which addresses* it owns, and both must agree before a peer's
//!    AllowedIPs are programmed. No Node object means no acceptance. An
//!    authority-signed (external) peer must not share its name with a Node:
//!    its allowed IPs are vouched for by the authority alone.
//!
//! What stays with the caller: the object carrying the announcement (a
//! `VeilNode`) must be named `body.node`; the accepted generation is tracked
//! per node name, so a replayed announcement from an earlier identity key
//! (still within its certificate's validity) cannot roll the node back; and
//! external peers' allowed IPs must not overlap cluster pod CIDRs (a
//! cluster-wide check this per-announcement function cannot make).
//!
//! # Canonical signed bytes
//!
//! Signatures cover a deterministic encoding, never serde output: a domain
//! tag ending in NUL, then each field in a fixed order, integers big-endian
//! and fixed width, strings length-prefixed (u32), CIDRs normalized
//! (`trunc()`), sorted and deduplicated. Certificates and announcements use
//! different tags, and neither tag is a prefix of the other, so a signature
//! made for one can never verify as the other. An announcement's bytes also
//! carry the signer kind and the signer's public key.
//!
//! Times are seconds since the Unix epoch (UTC).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};
use ipnet::IpNet;

use crate::identity::SIGNATURE_LEN;
use crate::{encode_key, is_usable_public_key, AuthorityKey, IdentityKey, KEY_LEN};

/// Domain tag of a certificate's signed bytes.
pub const CERTIFICATE_DOMAIN: &[u8] = b"veil-node-certificate-v1\0";
/// Domain tag of an announcement's signed bytes.
pub const ANNOUNCEMENT_DOMAIN: &[u8] = b"veil-announcement-v1\0";
/// A reasonable clock skew tolerance between nodes, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 300;
/// Kubernetes object names (DNS subdomains, RFC 1123) are at most this long.
pub const MAX_NODE_NAME_LEN: usize = 253;
/// Bound on the CIDRs one announcement may carry (a node has one or two pod
/// CIDRs; an external peer a handful of allowed IPs).
pub const MAX_CIDRS: usize = 1024;

const SIGNER_NODE: u8 = 1;
const SIGNER_AUTHORITY: u8 = 2;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Why a certificate or announcement was refused. Messages name the node
/// (escaped, since the name comes from outside) and never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("node name `{node}` is not a valid Kubernetes node name: {problem}")]
    InvalidNodeName { node: String, problem: &'static str },
    #[error("{what} for node `{node}`: not_before {not_before} is after not_after {not_after}")]
    InvalidValidity {
        what: &'static str,
        node: String,
        not_before: u64,
        not_after: u64,
    },
    #[error(
        "announcement for node `{node}` carries {count} CIDRs, more than the {MAX_CIDRS} allowed"
    )]
    TooManyCidrs { node: String, count: usize },
    #[error("the configured cluster authority public key is not a valid Ed25519 key")]
    InvalidAuthorityKey,
    #[error(
        "certificate for node `{node}` names an identity key that is not a usable \
         Ed25519 public key (invalid or small-order point)"
    )]
    WeakIdentityKey { node: String },
    #[error(
        "certificate for node `{node}` is not signed by the cluster authority \
         (forged, corrupted, or issued by another cluster's authority)"
    )]
    CertificateSignature { node: String },
    #[error("announcement for node `{node}` carries a certificate issued to node `{certified}`")]
    CertificateNodeMismatch { node: String, certified: String },
    #[error(
        "announcement for node `{node}` is signed by identity key {signing_key}, \
         but its certificate names identity key {certified_key}"
    )]
    IdentityKeyMismatch {
        node: String,
        signing_key: String,
        certified_key: String,
    },
    #[error(
        "certificate for node `{node}` is not valid before {not_before} \
         (now {now}, clock skew tolerance {skew}s)"
    )]
    CertificateNotYetValid {
        node: String,
        not_before: u64,
        now: u64,
        skew: u64,
    },
    #[error(
        "certificate for node `{node}` expired at {not_after} \
         (now {now}, clock skew tolerance {skew}s); approve the node again"
    )]
    CertificateExpired {
        node: String,
        not_after: u64,
        now: u64,
        skew: u64,
    },
    #[error(
        "announcement for node `{node}` is not valid before {not_before} \
         (now {now}, clock skew tolerance {skew}s)"
    )]
    AnnouncementNotYetValid {
        node: String,
        not_before: u64,
        now: u64,
        skew: u64,
    },
    #[error(
        "announcement for node `{node}` expired at {not_after} \
         (now {now}, clock skew tolerance {skew}s)"
    )]
    AnnouncementExpired {
        node: String,
        not_after: u64,
        now: u64,
        skew: u64,
    },
    #[error(
        "announcement for node `{node}` has a bad signature: it does not verify under \
         the {signer} key (tampered, or signed by someone else)"
    )]
    AnnouncementSignature { node: String, signer: SignerKind },
    #[error(
        "announcement for node `{node}` has key generation {generation}, lower than the \
         already accepted generation {accepted}: refusing a rollback to an older key"
    )]
    GenerationRollback {
        node: String,
        generation: u64,
        accepted: u64,
    },
    #[error(
        "announcement for node `{node}` carries a WireGuard public key that cannot take \
         part in a handshake (small-order point)"
    )]
    UnusableWireGuardKey { node: String },
    #[error("announcement for node `{node}` has no Node object to check its pod CIDRs against")]
    NoNodeObject { node: String },
    #[error(
        "announcement for node `{node}` claims pod CIDRs that differ from its Node object: \
         not on the Node [{}], missing [{}]",
        list(.extra),
        list(.missing)
    )]
    PodCidrMismatch {
        node: String,
        extra: Vec<IpNet>,
        missing: Vec<IpNet>,
    },
    #[error(
        "announcement for `{node}` is signed by the cluster authority (an external peer) \
         but a Node object of that name exists; external peers must not share a name \
         with a cluster node"
    )]
    AuthoritySignedClusterNode { node: String },
    #[error("{what} is not valid base64: {source}")]
    Base64 {
        what: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{what} decodes to {len} bytes, expected {expected}")]
    Length {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("malformed certificate: {problem}")]
    MalformedCertificate { problem: String },
}

/// Which key signed an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignerKind {
    /// The node's certified identity key.
    Node,
    /// The cluster authority key (external peers).
    Authority,
}

impl fmt::Display for SignerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignerKind::Node => "certified node identity",
            SignerKind::Authority => "cluster authority",
        })
    }
}

/// The authority's statement "node `node` owns identity key `identity_key`
/// from `not_before` to `not_after`".
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    pub node: String,
    pub identity_key: [u8; KEY_LEN],
    pub not_before: u64,
    pub not_after: u64,
    pub signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for NodeCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCertificate")
            .field("node", &self.node)
            .field("identity_key", &encode_key(&self.identity_key))
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("signature", &encode_signature(&self.signature))
            .finish()
    }
}

impl AuthorityKey {
    /// Certifies that `node` owns `identity_key` during [not_before, not_after].
    pub fn certify(
        &self,
        node: &str,
        identity_key: [u8; KEY_LEN],
        not_before: u64,
        not_after: u64,
    ) -> Result<NodeCertificate, TrustError> {
        validate_node_name(node)?;
        check_window("certificate", node, not_before, not_after)?;
        parse_identity_key(node, &identity_key)?;
        let message = certificate_bytes(node, &identity_key, not_before, not_after);
        Ok(NodeCertificate {
            node: node.to_string(),
            identity_key,
            not_before,
            not_after,
            signature: self.sign(&message),
        })
    }
}

impl NodeCertificate {
    /// Checks the authority's signature and the validity window at `now`
    /// (with `skew` seconds of tolerance either side). The caller checks that
    /// the certificate names the node it expects.
    pub fn verify(&self, authority: &[u8; KEY_LEN], now: u64, skew: u64) -> Result<(), TrustError> {
        let authority = parse_authority_key(authority)?;
        validate_node_name(&self.node)?;
        check_window("certificate", &self.node, self.not_before, self.not_after)?;
        let message = certificate_bytes(
            &self.node,
            &self.identity_key,
            self.not_before,
            self.not_after,
        );
        authority
            .verify_strict(&message, &Signature::from_bytes(&self.signature))
            .map_err(|_| TrustError::CertificateSignature {
                node: shown(&self.node),
            })?;
        parse_identity_key(&self.node, &self.identity_key)?;
        if now.saturating_add(skew) < self.not_before {
            return Err(TrustError::CertificateNotYetValid {
                node: shown(&self.node),
                not_before: self.not_before,
                now,
                skew,
            });
        }
        if now > self.not_after.saturating_add(skew) {
            return Err(TrustError::CertificateExpired {
                node: shown(&self.node),
                not_after: self.not_after,
                now,
                skew,
            });
        }
        Ok(())
    }

    /// One base64 string (signed bytes followed by the signature), for YAML
    /// fields and `veilctl node approve` output.
    pub fn to_base64(&self) -> String {
        let mut blob = certificate_bytes(
            &self.node,
            &self.identity_key,
            self.not_before,
            self.not_after,
        );
        blob.extend_from_slice(&self.signature);
        base64::engine::general_purpose::STANDARD.encode(blob)
    }

    /// Parses [`to_base64`](Self::to_base64) output. Only the structure is
    /// checked here; [`verify`](Self::verify) decides whether to trust it.
    pub fn from_base64(text: &str) -> Result<Self, TrustError> {
        let blob = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|source| TrustError::Base64 {
                what: "certificate",
                source,
            })?;
        parse_certificate(&blob).map_err(|problem| TrustError::MalformedCertificate { problem })
    }
}

/// What a node (or the authority, for an external peer) announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncementBody {
    pub node: String,
    pub wireguard_key: [u8; KEY_LEN],
    /// The WireGuard key's generation ([`StoredKey::generation`](crate::StoredKey)).
    pub generation: u64,
    pub listen_port: u16,
    pub pod_cidrs: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub not_before: u64,
    pub not_after: u64,
}

/// Who signed an announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// The node's identity key, certified by the authority.
    Node(NodeCertificate),
    /// The authority itself: an external WireGuard peer.
    Authority,
}

impl Signer {
    pub fn kind(&self) -> SignerKind {
        match self {
            Signer::Node(_) => SignerKind::Node,
            Signer::Authority => SignerKind::Authority,
        }
    }
}

/// An announcement with its signer and signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedAnnouncement {
    pub body: AnnouncementBody,
    pub signer: Signer,
    pub signature: [u8; SIGNATURE_LEN],
}

impl fmt::Debug for SignedAnnouncement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedAnnouncement")
            .field("body", &self.body)
            .field("signer", &self.signer)
            .field("signature", &encode_signature(&self.signature))
            .finish()
    }
}

/// What a receiver checks an announcement against.
#[derive(Debug, Clone, Copy)]
pub struct VerifyContext<'a> {
    /// The cluster authority's public key, from the file given at install time.
    pub authority: [u8; KEY_LEN],
    /// Seconds since the Unix epoch ([`unix_now`]).
    pub now: u64,
    /// Clock skew tolerance in seconds ([`DEFAULT_CLOCK_SKEW_SECS`]).
    pub skew: u64,
    /// The highest generation already accepted for this node, if any.
    pub accepted_generation: Option<u64>,
    /// `spec.podCIDRs` of the Node object of the same name; `None` when there
    /// is no such Node (fatal for a node-signed announcement, required for an
    /// authority-signed one).
    pub node_pod_cidrs: Option<&'a [IpNet]>,
}

impl SignedAnnouncement {
    /// Signs `body` with the node's identity key; `certificate` must be the
    /// authority's certificate for that key and node. The pod CIDRs are
    /// stored normalized (truncated, sorted, deduplicated).
    pub fn sign_by_node(
        mut body: AnnouncementBody,
        identity: &IdentityKey,
        certificate: NodeCertificate,
    ) -> Result<Self, TrustError> {
        validate_body(&body)?;
        if certificate.node != body.node {
            return Err(TrustError::CertificateNodeMismatch {
                node: shown(&body.node),
                certified: shown(&certificate.node),
            });
        }
        if certificate.identity_key != identity.public_key() {
            return Err(TrustError::IdentityKeyMismatch {
                node: shown(&body.node),
                signing_key: encode_key(&identity.public_key()),
                certified_key: encode_key(&certificate.identity_key),
            });
        }
        body.pod_cidrs = normalize_cidrs(&body.pod_cidrs);
        let message = announcement_bytes(&body, SignerKind::Node, &certificate.identity_key);
        Ok(Self {
            signature: identity.sign(&message),
            body,
            signer: Signer::Node(certificate),
        })
    }

    /// Signs an external peer's `body` with the authority key. The CIDRs
    /// (the peer's allowed IPs) are stored normalized.
    pub fn sign_by_authority(
        mut body: AnnouncementBody,
        authority: &AuthorityKey,
    ) -> Result<Self, TrustError> {
        validate_body(&body)?;
        body.pod_cidrs = normalize_cidrs(&body.pod_cidrs);
        let message = announcement_bytes(&body, SignerKind::Authority, &authority.public_key());
        Ok(Self {
            signature: authority.sign(&message),
            body,
            signer: Signer::Authority,
        })
    }

    /// Applies every acceptance rule of the trust model (see the module
    /// documentation), in that order: authenticity first, then content.
    pub fn verify(&self, ctx: &VerifyContext<'_>) -> Result<(), TrustError> {
        let body = &self.body;
        validate_body(body)?;
        let node = || shown(&body.node);
        let authority = parse_authority_key(&ctx.authority)?;
        let (kind, signer_key) = match &self.signer {
            Signer::Node(cert) => {
                cert.verify(&ctx.authority, ctx.now, ctx.skew)?;
                if cert.node != body.node {
                    return Err(TrustError::CertificateNodeMismatch {
                        node: node(),
                        certified: shown(&cert.node),
                    });
                }
                (
                    SignerKind::Node,
                    parse_identity_key(&cert.node, &cert.identity_key)?,
                )
            }
            Signer::Authority => (SignerKind::Authority, authority),
        };
        let message = announcement_bytes(body, kind, signer_key.as_bytes());
        signer_key
            .verify_strict(&message, &Signature::from_bytes(&self.signature))
            .map_err(|_| TrustError::AnnouncementSignature {
                node: node(),
                signer: kind,
            })?;

        if ctx.now.saturating_add(ctx.skew) < body.not_before {
            return Err(TrustError::AnnouncementNotYetValid {
                node: node(),
                not_before: body.not_before,
                now: ctx.now,
                skew: ctx.skew,
            });
        }
        if ctx.now > body.not_after.saturating_add(ctx.skew) {
            return Err(TrustError::AnnouncementExpired {
                node: node(),
                not_after: body.not_after,
                now: ctx.now,
                skew: ctx.skew,
            });
        }
        if let Some(accepted) = ctx.accepted_generation {
            if body.generation < accepted {
                return Err(TrustError::GenerationRollback {
                    node: node(),
                    generation: body.generation,
                    accepted,
                });
            }
        }
        match (kind, ctx.node_pod_cidrs) {
            (SignerKind::Node, None) => Err(TrustError::NoNodeObject { node: node() }),
            (SignerKind::Node, Some(node_cidrs)) => {
                let announced: BTreeSet<IpNet> =
                    normalize_cidrs(&body.pod_cidrs).into_iter().collect();
                let owned: BTreeSet<IpNet> = normalize_cidrs(node_cidrs).into_iter().collect();
                if announced == owned {
                    Ok(())
                } else {
                    Err(TrustError::PodCidrMismatch {
                        node: node(),
                        extra: announced.difference(&owned).copied().collect(),
                        missing: owned.difference(&announced).copied().collect(),
                    })
                }
            }
            (SignerKind::Authority, Some(_)) => {
                Err(TrustError::AuthoritySignedClusterNode { node: node() })
            }
            (SignerKind::Authority, None) => Ok(()),
        }
    }
}

/// CIDRs as signed and compared: host bits cleared, sorted, deduplicated.
pub fn normalize_cidrs(cidrs: &[IpNet]) -> Vec<IpNet> {
    cidrs
        .iter()
        .map(IpNet::trunc)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Seconds since the Unix epoch; 0 if the clock is set before 1970 (which
/// makes every certificate look not-yet-valid rather than valid).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Standard base64 of a signature, for YAML fields.
pub fn encode_signature(signature: &[u8; SIGNATURE_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(signature)
}

/// Parses [`encode_signature`] output.
pub fn decode_signature(text: &str) -> Result<[u8; SIGNATURE_LEN], TrustError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|source| TrustError::Base64 {
            what: "signature",
            source,
        })?;
    bytes.as_slice().try_into().map_err(|_| TrustError::Length {
        what: "signature",
        len: bytes.len(),
        expected: SIGNATURE_LEN,
    })
}

/// Kubernetes Node names are DNS subdomains (RFC 1123): lowercase
/// alphanumerics, `-` and `.`, each dot-separated label starting and ending
/// with an alphanumeric, 253 bytes at most. Anything else cannot be a Node,
/// and refusing it early keeps odd bytes out of logs and file names.
pub fn validate_node_name(node: &str) -> Result<(), TrustError> {
    let problem = if node.is_empty() {
        Some("empty")
    } else if node.len() > MAX_NODE_NAME_LEN {
        Some("longer than 253 bytes")
    } else if !node
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("only lowercase letters, digits, `-` and `.` are allowed")
    } else if node.split('.').any(|label| {
        label.is_empty() || label.starts_with('-') || label.ends_with('-') || label.len() > 63
    }) {
        Some("each `.`-separated label must be 1-63 characters, not starting or ending with `-`")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(TrustError::InvalidNodeName {
            node: shown(node),
            problem,
        }),
        None => Ok(()),
    }
}

fn validate_body(body: &AnnouncementBody) -> Result<(), TrustError> {
    validate_node_name(&body.node)?;
    check_window("announcement", &body.node, body.not_before, body.not_after)?;
    if body.pod_cidrs.len() > MAX_CIDRS {
        return Err(TrustError::TooManyCidrs {
            node: shown(&body.node),
            count: body.pod_cidrs.len(),
        });
    }
    if !is_usable_public_key(&body.wireguard_key) {
        return Err(TrustError::UnusableWireGuardKey {
            node: shown(&body.node),
        });
    }
    Ok(())
}

fn check_window(
    what: &'static str,
    node: &str,
    not_before: u64,
    not_after: u64,
) -> Result<(), TrustError> {
    if not_before > not_after {
        return Err(TrustError::InvalidValidity {
            what,
            node: shown(node),
            not_before,
            not_after,
        });
    }
    Ok(())
}

fn parse_authority_key(key: &[u8; KEY_LEN]) -> Result<VerifyingKey, TrustError> {
    match VerifyingKey::from_bytes(key) {
        Ok(key) if !key.is_weak() => Ok(key),
        _ => Err(TrustError::InvalidAuthorityKey),
    }
}

fn parse_identity_key(node: &str, key: &[u8; KEY_LEN]) -> Result<VerifyingKey, TrustError> {
    match VerifyingKey::from_bytes(key) {
        Ok(key) if !key.is_weak() => Ok(key),
        _ => Err(TrustError::WeakIdentityKey { node: shown(node) }),
    }
}

/// A node name fit for an error message: escaped, and cut short if huge.
fn shown(node: &str) -> String {
    const MAX_SHOWN: usize = 300;
    let mut out: String = node
        .chars()
        .take(MAX_SHOWN)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if node.chars().count() > MAX_SHOWN {
        out.push('…');
    }
    out
}

fn list(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Append-only builder of canonical signed bytes.
struct Canonical(Vec<u8>);

impl Canonical {
    fn new(domain: &[u8]) -> Self {
        Self(domain.to_vec())
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn fixed(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Length-prefixed bytes. Callers bound the length (node names: 253),
    /// so the saturation never happens; it only keeps this total.
    fn bytes(&mut self, bytes: &[u8]) {
        self.u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        self.fixed(bytes);
    }

    fn ip(&mut self, addr: IpAddr) {
        match addr {
            IpAddr::V4(a) => {
                self.u8(FAMILY_V4);
                self.fixed(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(FAMILY_V6);
                self.fixed(&a.octets());
            }
        }
    }
}

fn certificate_bytes(
    node: &str,
    identity_key: &[u8; KEY_LEN],
    not_before: u64,
    not_after: u64,
) -> Vec<u8> {
    let mut c = Canonical::new(CERTIFICATE_DOMAIN);
    c.bytes(node.as_bytes());
    c.fixed(identity_key);
    c.u64(not_before);
    c.u64(not_after);
    c.0
}

/// The bytes an announcement signature covers. Every field of the body is
/// included (the endpoint's IPv6 flow label and scope too), except that the
/// CIDRs are covered as a normalized set.
fn announcement_bytes(
    body: &AnnouncementBody,
    signer: SignerKind,
    signer_key: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut c = Canonical::new(ANNOUNCEMENT_DOMAIN);
    c.u8(match signer {
        SignerKind::Node => SIGNER_NODE,
        SignerKind::Authority => SIGNER_AUTHORITY,
    });
    c.fixed(signer_key);
    c.bytes(body.node.as_bytes());
    c.fixed(&body.wireguard_key);
    c.u64(body.generation);
    c.u16(body.listen_port);
    let cidrs = normalize_cidrs(&body.pod_cidrs);
    // validate_body bounds the count by MAX_CIDRS before any signing or checking.
    c.u32(u32::try_from(cidrs.len()).unwrap_or(u32::MAX));
    for cidr in cidrs {
        c.ip(cidr.addr());
        c.u8(cidr.prefix_len());
    }
    match body.endpoint {
        None => c.u8(0),
        Some(SocketAddr::V4(sa)) => {
            c.u8(1);
            c.ip(IpAddr::V4(*sa.ip()));
            c.u16(sa.port());
        }
        Some(SocketAddr::V6(sa)) => {
            c.u8(1);
            c.ip(IpAddr::V6(*sa.ip()));
            c.u16(sa.port());
            c.u32(sa.flowinfo());
            c.u32(sa.scope_id());
        }
    }
    c.u64(body.not_before);
    c.u64(body.not_after);
    c.0
}

/// Parses `certificate_bytes(..) || signature`, exactly: no trailing bytes.
fn parse_certificate(blob: &[u8]) -> Result<NodeCertificate, String> {
    let mut r = Reader(blob);
    if r.take(CERTIFICATE_DOMAIN.len())? != CERTIFICATE_DOMAIN {
        return Err("not a Veil node certificate (wrong domain tag)".into());
    }
    let len = u32::from_be_bytes(r.array()?) as usize;
    if len > MAX_NODE_NAME_LEN {
        return Err(format!(
            "node name length {len} exceeds {MAX_NODE_NAME_LEN}"
        ));
    }
    let node = std::str::from_utf8(r.take(len)?)
        .map_err(|_| "node name is not UTF-8".to_string())?
        .to_string();
    let identity_key: [u8; KEY_LEN] = r.array()?;
    let not_before = u64::from_be_bytes(r.array()?);
    let not_after = u64::from_be_bytes(r.array()?);
    let signature: [u8; SIGNATURE_LEN] = r.array()?;
    if !r.0.is_empty() {
        return Err(format!("{} unexpected trailing bytes", r.0.len()));
    }
    Ok(NodeCertificate {
        node,
        identity_key,
        not_before,
        not_after,
        signature,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: needed {n} more bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV6};

    const NOW: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;
    const SKEW: u64 = 300;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    struct Cluster {
        ca: AuthorityKey,
        id: IdentityKey,
        cert: NodeCertificate,
        node_cidrs: Vec<IpNet>,
    }

    fn cluster(node: &str) -> Cluster {
        let ca = AuthorityKey::generate();
        let id = IdentityKey::generate();
        let cert = ca
            .certify(node, id.public_key(), NOW - DAY, NOW + 30 * DAY)
            .unwrap();
        Cluster {
            ca,
            id,
            cert,
            node_cidrs: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
        }
    }

    fn body(node: &str) -> AnnouncementBody {
        AnnouncementBody {
            node: node.into(),
            wireguard_key: crate::WireGuardPrivateKey::generate().public_key(),
            generation: 3,
            listen_port: 51820,
            pod_cidrs: vec![net("fd00:10:244:1::/64"), net("10.244.1.0/24")],
            endpoint: Some("198.18.0.1:51820".parse().unwrap()),
            not_before: NOW - 60,
            not_after: NOW + DAY,
        }
    }

    fn ctx<'a>(c: &Cluster, cidrs: Option<&'a [IpNet]>) -> VerifyContext<'a> {
        VerifyContext {
            authority: c.ca.public_key(),
            now: NOW,
            skew: SKEW,
            accepted_generation: Some(3),
            node_pod_cidrs: cidrs,
        }
    }

    fn signed(c: &Cluster) -> SignedAnnouncement {
        SignedAnnouncement::sign_by_node(body("n1"), &c.id, c.cert.clone()).unwrap()
    }

    #[test]
    fn node_signed_round_trip() {
        let c = cluster("n1");
        let ann = signed(&c);
        ann.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap();
        // Stored normalized: sorted (IPv4 before IPv6).
        assert_eq!(ann.body.pod_cidrs, c.node_cidrs);
        // No generation accepted yet, an equal one (re-publication), a newer one.
        for accepted in [None, Some(3), Some(1), Some(0)] {
            let mut cx = ctx(&c, Some(&c.node_cidrs));
            cx.accepted_generation = accepted;
            ann.verify(&cx).unwrap();
        }
        // The certificate survives its text form.
        let text = c.cert.to_base64();
        assert_eq!(NodeCertificate::from_base64(&text).unwrap(), c.cert);
        assert_eq!(
            NodeCertificate::from_base64(&format!(" {text}\n")).unwrap(),
            c.cert
        );
        c.cert.verify(&c.ca.public_key(), NOW, 0).unwrap();
        // So does the signature.
        assert_eq!(
            decode_signature(&encode_signature(&ann.signature)).unwrap(),
            ann.signature
        );
    }

    #[test]
    fn signing_is_deterministic_over_normalized_cidrs() {
        let c = cluster("n1");
        let a = signed(&c);
        let mut messy = body("n1");
        messy.wireguard_key = a.body.wireguard_key;
        messy.pod_cidrs = vec![
            net("fd00:10:244:1::5/64"),
            net("10.244.1.7/24"),
            net("10.244.1.0/24"),
        ];
        let b = SignedAnnouncement::sign_by_node(messy, &c.id, c.cert.clone()).unwrap();
        // Ed25519 signatures are deterministic (RFC 8032 section 5.1.6), so
        // equal signatures mean equal signed bytes.
        assert_eq!(a.signature, b.signature);
        assert_eq!(a.body, b.body);
        // A body whose CIDRs are listed differently still verifies: the
        // signature covers the normalized set.
        let mut reordered = a.clone();
        reordered.body.pod_cidrs.reverse();
        reordered.body.pod_cidrs.push(net("10.244.1.9/24"));
        reordered.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap();
    }

    #[test]
    fn tampered_body_or_signature_rejected() {
        let c = cluster("n1");
        let ann = signed(&c);
        let mut cases: Vec<(&str, SignedAnnouncement)> = Vec::new();
        let mut t = ann.clone();
        t.body.wireguard_key = crate::WireGuardPrivateKey::generate().public_key();
        cases.push(("wireguard_key", t));
        let mut t = ann.clone();
        t.body.generation ^= 1 << 40;
        cases.push(("generation", t));
        let mut t = ann.clone();
        t.body.listen_port ^= 1;
        cases.push(("listen_port", t));
        let mut t = ann.clone();
        t.body.pod_cidrs[0] = net("10.244.2.0/24");
        cases.push(("pod_cidrs", t));
        let mut t = ann.clone();
        t.body.pod_cidrs.pop();
        cases.push(("pod_cidrs removed", t));
        let mut t = ann.clone();
        t.body.endpoint = Some("198.18.0.66:51820".parse().unwrap());
        cases.push(("endpoint", t));
        let mut t = ann.clone();
        t.body.endpoint = None;
        cases.push(("endpoint removed", t));
        let mut t = ann.clone();
        t.body.not_before ^= 1;
        cases.push(("not_before", t));
        let mut t = ann.clone();
        t.body.not_after ^= 1 << 20;
        cases.push(("not_after", t));
        for bit in [0, 7, 100, 511] {
            let mut t = ann.clone();
            t.signature[bit / 8] ^= 1 << (bit % 8);
            cases.push(("signature", t));
        }
        for (what, t) in cases {
            let err = t.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err();
            assert!(
                matches!(
                    &err,
                    TrustError::AnnouncementSignature { node, signer: SignerKind::Node } if node == "n1"
                ),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains("`n1`"), "{err}");
        }
    }

    #[test]
    fn tampered_certificate_rejected() {
        let c = cluster("n1");
        let ann = signed(&c);
        let tamper = |f: &dyn Fn(&mut NodeCertificate)| {
            let mut t = ann.clone();
            let Signer::Node(cert) = &mut t.signer else {
                unreachable!()
            };
            f(cert);
            t
        };
        let cases = [
            tamper(&|cert| cert.signature[5] ^= 0x10),
            tamper(&|cert| cert.not_after += 1),
            tamper(&|cert| cert.not_before -= 1),
        ];
        for t in cases {
            let err = t.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err();
            assert!(
                matches!(&err, TrustError::CertificateSignature { node } if node == "n1"),
                "{err:?}"
            );
        }
        // Swapping in an attacker's identity key and re-signing the
        // announcement with it does not help: the certificate no longer verifies.
        let attacker = IdentityKey::generate();
        let mut cert = c.cert.clone();
        cert.identity_key = attacker.public_key();
        let message = announcement_bytes(&ann.body, SignerKind::Node, &cert.identity_key);
        let forged = SignedAnnouncement {
            body: ann.body.clone(),
            signature: attacker.sign(&message),
            signer: Signer::Node(cert),
        };
        assert!(matches!(
            forged.verify(&ctx(&c, Some(&c.node_cidrs))),
            Err(TrustError::CertificateSignature { .. })
        ));
    }

    #[test]
    fn self_certified_node_rejected() {
        let c = cluster("n1");
        // The attacker can write the store, so it makes its own "authority",
        // certifies its own identity key for n1 and signs a valid-looking
        // announcement. Receivers verify against the installed authority key.
        let rogue_ca = AuthorityKey::generate();
        let rogue_id = IdentityKey::generate();
        let rogue_cert = rogue_ca
            .certify("n1", rogue_id.public_key(), NOW - DAY, NOW + DAY)
            .unwrap();
        let ann = SignedAnnouncement::sign_by_node(body("n1"), &rogue_id, rogue_cert).unwrap();
        let err = ann.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err();
        assert!(
            matches!(&err, TrustError::CertificateSignature { node } if node == "n1"),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .contains("not signed by the cluster authority"));
        // The same with a certificate signed by the node's own identity key.
        let self_ca = AuthorityKey::from_seed(*rogue_id.to_seed());
        let self_cert = self_ca
            .certify("n1", rogue_id.public_key(), NOW - DAY, NOW + DAY)
            .unwrap();
        let ann = SignedAnnouncement::sign_by_node(body("n1"), &rogue_id, self_cert).unwrap();
        assert!(matches!(
            ann.verify(&ctx(&c, Some(&c.node_cidrs))),
            Err(TrustError::CertificateSignature { .. })
        ));
    }

    #[test]
    fn certificate_for_another_node_rejected() {
        let c = cluster("n1");
        // n2 is a real, approved node, and tries to speak for n1.
        let n2 = IdentityKey::generate();
        let n2_cert =
            c.ca.certify("n2", n2.public_key(), NOW - DAY, NOW + DAY)
                .unwrap();
        let message = announcement_bytes(&body("n1"), SignerKind::Node, &n2.public_key());
        let ann = SignedAnnouncement {
            body: body("n1"),
            signature: n2.sign(&message),
            signer: Signer::Node(n2_cert.clone()),
        };
        let err = ann.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err();
        assert!(
            matches!(&err, TrustError::CertificateNodeMismatch { node, certified } if node == "n1" && certified == "n2"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "announcement for node `n1` carries a certificate issued to node `n2`"
        );
        // And the signing helper refuses to produce such a thing.
        assert!(matches!(
            SignedAnnouncement::sign_by_node(body("n1"), &n2, n2_cert),
            Err(TrustError::CertificateNodeMismatch { .. })
        ));
        // Signing with a key other than the certified one is refused too.
        let err =
            SignedAnnouncement::sign_by_node(body("n1"), &IdentityKey::generate(), c.cert.clone())
                .unwrap_err();
        assert!(
            matches!(err, TrustError::IdentityKeyMismatch { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn generation_rollback_rejected() {
        let c = cluster("n1");
        let ann = signed(&c);
        let mut cx = ctx(&c, Some(&c.node_cidrs));
        cx.accepted_generation = Some(4);
        let err = ann.verify(&cx).unwrap_err();
        assert!(
            matches!(
                &err,
                TrustError::GenerationRollback { node, generation: 3, accepted: 4 } if node == "n1"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("rollback"), "{err}");
        cx.accepted_generation = Some(u64::MAX);
        assert!(matches!(
            ann.verify(&cx),
            Err(TrustError::GenerationRollback { .. })
        ));
    }

    #[test]
    fn certificate_validity_with_skew() {
        let c = cluster("n1");
        let ann = signed(&c);
        let (nb, na) = (c.cert.not_before, c.cert.not_after);
        // The announcement window is wide here so only the certificate's matters.
        let wide = |now: u64| {
            let mut b = ann.body.clone();
            b.not_before = 0;
            b.not_after = u64::MAX;
            let a = SignedAnnouncement::sign_by_node(b, &c.id, c.cert.clone()).unwrap();
            let mut cx = ctx(&c, Some(&c.node_cidrs));
            cx.now = now;
            a.verify(&cx)
        };
        wide(na + SKEW).unwrap();
        wide(nb - SKEW).unwrap();
        let err = wide(na + SKEW + 1).unwrap_err();
        assert!(
            matches!(&err, TrustError::CertificateExpired { node, not_after, .. } if node == "n1" && *not_after == na),
            "{err:?}"
        );
        assert!(err.to_string().contains("approve the node again"), "{err}");
        let err = wide(nb - SKEW - 1).unwrap_err();
        assert!(
            matches!(&err, TrustError::CertificateNotYetValid { node, not_before, .. } if node == "n1" && *not_before == nb),
            "{err:?}"
        );
        // NodeCertificate::verify on its own, with zero skew.
        assert!(matches!(
            c.cert.verify(&c.ca.public_key(), na + 1, 0),
            Err(TrustError::CertificateExpired { .. })
        ));
        assert!(matches!(
            c.cert.verify(&c.ca.public_key(), nb - 1, 0),
            Err(TrustError::CertificateNotYetValid { .. })
        ));
        c.cert.verify(&c.ca.public_key(), na, 0).unwrap();
        c.cert.verify(&c.ca.public_key(), nb, 0).unwrap();
        // A window near the end of time does not overflow.
        let far =
            c.ca.certify("n1", c.id.public_key(), u64::MAX - 1, u64::MAX)
                .unwrap();
        far.verify(&c.ca.public_key(), u64::MAX, u64::MAX).unwrap();
        assert!(matches!(
            far.verify(&c.ca.public_key(), 0, 5),
            Err(TrustError::CertificateNotYetValid { .. })
        ));
    }

    #[test]
    fn announcement_validity_with_skew() {
        let c = cluster("n1");
        let ann = signed(&c);
        let at = |now: u64| {
            let mut cx = ctx(&c, Some(&c.node_cidrs));
            cx.now = now;
            ann.verify(&cx)
        };
        at(ann.body.not_after + SKEW).unwrap();
        at(ann.body.not_before - SKEW).unwrap();
        let err = at(ann.body.not_after + SKEW + 1).unwrap_err();
        assert!(
            matches!(&err, TrustError::AnnouncementExpired { node, .. } if node == "n1"),
            "{err:?}"
        );
        let err = at(ann.body.not_before - SKEW - 1).unwrap_err();
        assert!(
            matches!(&err, TrustError::AnnouncementNotYetValid { node, .. } if node == "n1"),
            "{err:?}"
        );
        // An inverted window is malformed, before and after signing.
        let mut inverted = body("n1");
        inverted.not_before = inverted.not_after + 1;
        let err =
            SignedAnnouncement::sign_by_node(inverted.clone(), &c.id, c.cert.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::InvalidValidity {
                    what: "announcement",
                    ..
                }
            ),
            "{err:?}"
        );
        let mut t = ann.clone();
        t.body = inverted;
        assert!(matches!(
            t.verify(&ctx(&c, Some(&c.node_cidrs))),
            Err(TrustError::InvalidValidity { .. })
        ));
        assert!(matches!(
            c.ca.certify("n1", c.id.public_key(), 10, 9),
            Err(TrustError::InvalidValidity {
                what: "certificate",
                ..
            })
        ));
    }

    #[test]
    fn pod_cidrs_must_match_node_object() {
        let c = cluster("n1");
        let ann = signed(&c);
        let check = |node: &[IpNet]| ann.verify(&ctx(&c, Some(node)));
        // Extra: the announcement claims a CIDR the Node does not have.
        let err = check(&[net("10.244.1.0/24")]).unwrap_err();
        match &err {
            TrustError::PodCidrMismatch {
                node,
                extra,
                missing,
            } => {
                assert_eq!(node, "n1");
                assert_eq!(extra, &[net("fd00:10:244:1::/64")]);
                assert!(missing.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("fd00:10:244:1::/64"), "{err}");
        // Missing: the Node has a CIDR the announcement lacks.
        let mut node = c.node_cidrs.clone();
        node.push(net("10.244.99.0/24"));
        let err = check(&node).unwrap_err();
        assert!(
            matches!(&err, TrustError::PodCidrMismatch { extra, missing, .. }
                if extra.is_empty() && missing == &[net("10.244.99.0/24")]),
            "{err:?}"
        );
        // Different: same count, other network.
        let err = check(&[net("10.244.2.0/24"), net("fd00:10:244:1::/64")]).unwrap_err();
        assert!(
            matches!(&err, TrustError::PodCidrMismatch { extra, missing, .. }
                if extra == &[net("10.244.1.0/24")] && missing == &[net("10.244.2.0/24")]),
            "{err:?}"
        );
        // A wider prefix is a different network, not a match.
        assert!(check(&[net("10.244.0.0/16"), net("fd00:10:244:1::/64")]).is_err());
        // Set equality after normalization: order, duplicates, host bits.
        check(&[
            net("fd00:10:244:1::1/64"),
            net("10.244.1.200/24"),
            net("10.244.1.0/24"),
        ])
        .unwrap();
        // No Node object.
        let err = ann.verify(&ctx(&c, None)).unwrap_err();
        assert!(
            matches!(&err, TrustError::NoNodeObject { node } if node == "n1"),
            "{err:?}"
        );
        assert!(err.to_string().contains("no Node object"), "{err}");
    }

    fn external(c: &Cluster) -> SignedAnnouncement {
        let mut b = body("office-gw");
        b.pod_cidrs = vec![net("192.168.50.0/24")];
        b.endpoint = Some(SocketAddr::from((Ipv4Addr::new(198, 18, 9, 9), 51820)));
        SignedAnnouncement::sign_by_authority(b, &c.ca).unwrap()
    }

    #[test]
    fn authority_signed_external_peer() {
        let c = cluster("n1");
        let ann = external(&c);
        assert_eq!(ann.signer, Signer::Authority);
        assert_eq!(ann.signer.kind(), SignerKind::Authority);
        ann.verify(&ctx(&c, None)).unwrap();
        // A Node of the same name: the external peer may not shadow it.
        let err = ann
            .verify(&ctx(&c, Some(&[net("192.168.50.0/24")])))
            .unwrap_err();
        assert!(
            matches!(&err, TrustError::AuthoritySignedClusterNode { node } if node == "office-gw"),
            "{err:?}"
        );
        // Tampering is caught, and names the authority as the signer.
        let mut t = ann.clone();
        t.body.pod_cidrs.push(net("10.244.0.0/16"));
        let err = t.verify(&ctx(&c, None)).unwrap_err();
        assert!(
            matches!(
                &err,
                TrustError::AnnouncementSignature {
                    signer: SignerKind::Authority,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("cluster authority"), "{err}");
        // Another cluster's authority.
        let other = cluster("n1");
        assert!(matches!(
            ann.verify(&ctx(&other, None)),
            Err(TrustError::AnnouncementSignature { .. })
        ));
        // Generation and validity rules apply to external peers as well.
        let mut cx = ctx(&c, None);
        cx.accepted_generation = Some(9);
        assert!(matches!(
            ann.verify(&cx),
            Err(TrustError::GenerationRollback { .. })
        ));
        let mut cx = ctx(&c, None);
        cx.now = ann.body.not_after + SKEW + 1;
        assert!(matches!(
            ann.verify(&cx),
            Err(TrustError::AnnouncementExpired { .. })
        ));
    }

    #[test]
    fn node_signature_claiming_authority_rejected() {
        let c = cluster("n1");
        let node_signed = signed(&c);
        // Relabel a genuine node-signed announcement as authority-signed.
        let mut relabelled = node_signed.clone();
        relabelled.signer = Signer::Authority;
        let err = relabelled.verify(&ctx(&c, None)).unwrap_err();
        assert!(
            matches!(&err, TrustError::AnnouncementSignature { node, signer: SignerKind::Authority } if node == "n1"),
            "{err:?}"
        );
        // A node signing authority-kind bytes with its own identity key.
        let message =
            announcement_bytes(&node_signed.body, SignerKind::Authority, &c.id.public_key());
        let claimed = SignedAnnouncement {
            body: node_signed.body.clone(),
            signer: Signer::Authority,
            signature: c.id.sign(&message),
        };
        assert!(matches!(
            claimed.verify(&ctx(&c, None)),
            Err(TrustError::AnnouncementSignature {
                signer: SignerKind::Authority,
                ..
            })
        ));
        // And the other way: an authority-signed announcement dressed up with
        // a node certificate does not verify either (the signer kind is signed).
        let ext = external(&c);
        let n =
            c.ca.certify("office-gw", c.id.public_key(), NOW - DAY, NOW + DAY)
                .unwrap();
        let mut dressed = ext.clone();
        dressed.signer = Signer::Node(n);
        assert!(matches!(
            dressed.verify(&ctx(&c, Some(&[net("192.168.50.0/24")]))),
            Err(TrustError::AnnouncementSignature {
                signer: SignerKind::Node,
                ..
            })
        ));
    }

    #[test]
    fn domain_separation() {
        assert!(!CERTIFICATE_DOMAIN.starts_with(ANNOUNCEMENT_DOMAIN));
        assert!(!ANNOUNCEMENT_DOMAIN.starts_with(CERTIFICATE_DOMAIN));
        let c = cluster("n1");
        // The authority's signature over a certificate, presented as its
        // signature over an announcement (an external-peer forgery attempt).
        let ann = external(&c);
        let cert =
            c.ca.certify("office-gw", c.id.public_key(), NOW - DAY, NOW + DAY)
                .unwrap();
        let mut replay = ann.clone();
        replay.signature = cert.signature;
        assert!(matches!(
            replay.verify(&ctx(&c, None)),
            Err(TrustError::AnnouncementSignature { .. })
        ));
        // An authority signature over an announcement, presented as a certificate.
        let mut fake = cert.clone();
        fake.signature = ann.signature;
        assert!(matches!(
            fake.verify(&c.ca.public_key(), NOW, SKEW),
            Err(TrustError::CertificateSignature { .. })
        ));
        // The signed bytes themselves: the certificate's bytes do not verify
        // as an announcement with any signer, since tags differ at byte 5.
        let cert_bytes = certificate_bytes("n1", &c.id.public_key(), 1, 2);
        let ann_bytes = announcement_bytes(&ann.body, SignerKind::Authority, &c.ca.public_key());
        assert_ne!(
            cert_bytes[..CERTIFICATE_DOMAIN.len()],
            ann_bytes[..CERTIFICATE_DOMAIN.len()]
        );
        let sig = c.ca.sign(&cert_bytes);
        let vk = VerifyingKey::from_bytes(&c.ca.public_key()).unwrap();
        vk.verify_strict(&cert_bytes, &Signature::from_bytes(&sig))
            .unwrap();
        assert!(vk
            .verify_strict(&ann_bytes, &Signature::from_bytes(&sig))
            .is_err());
    }

    #[test]
    fn ipv6_endpoint_fully_covered() {
        let c = cluster("n1");
        let mut b = body("n1");
        b.endpoint = Some(SocketAddr::V6(SocketAddrV6::new(
            "2001:db8::1".parse().unwrap(),
            51820,
            7,
            3,
        )));
        let ann = SignedAnnouncement::sign_by_node(b, &c.id, c.cert.clone()).unwrap();
        ann.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap();
        for change in [
            SocketAddrV6::new("2001:db8::1".parse().unwrap(), 51820, 7, 4),
            SocketAddrV6::new("2001:db8::1".parse().unwrap(), 51820, 8, 3),
            SocketAddrV6::new("2001:db8::1".parse().unwrap(), 51821, 7, 3),
            SocketAddrV6::new("2001:db8::2".parse().unwrap(), 51820, 7, 3),
        ] {
            let mut t = ann.clone();
            t.body.endpoint = Some(SocketAddr::V6(change));
            assert!(t.verify(&ctx(&c, Some(&c.node_cidrs))).is_err(), "{change}");
        }
        // An IPv4-mapped IPv6 address is not the same endpoint as the IPv4 one.
        let mut v4 = body("n1");
        v4.endpoint = Some("198.18.0.1:51820".parse().unwrap());
        let ann = SignedAnnouncement::sign_by_node(v4, &c.id, c.cert.clone()).unwrap();
        let mut t = ann.clone();
        t.body.endpoint = Some("[::ffff:198.18.0.1]:51820".parse().unwrap());
        assert!(t.verify(&ctx(&c, Some(&c.node_cidrs))).is_err());
    }

    #[test]
    fn unusable_keys_rejected() {
        let c = cluster("n1");
        let mut b = body("n1");
        b.wireguard_key = [0; 32];
        let err = SignedAnnouncement::sign_by_node(b.clone(), &c.id, c.cert.clone()).unwrap_err();
        assert!(
            matches!(&err, TrustError::UnusableWireGuardKey { node } if node == "n1"),
            "{err:?}"
        );
        // Even when correctly signed (bypassing the helper's check).
        let message = announcement_bytes(&b, SignerKind::Node, &c.id.public_key());
        let ann = SignedAnnouncement {
            body: b,
            signature: c.id.sign(&message),
            signer: Signer::Node(c.cert.clone()),
        };
        assert!(matches!(
            ann.verify(&ctx(&c, Some(&c.node_cidrs))),
            Err(TrustError::UnusableWireGuardKey { .. })
        ));
        // A small-order identity key (the Edwards identity point, y = 1)
        // cannot be certified or verified.
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        assert!(matches!(
            c.ca.certify("n1", identity_point, 0, 1),
            Err(TrustError::WeakIdentityKey { .. })
        ));
        // An authority key that is not a valid point is a configuration error.
        let mut cx = ctx(&c, Some(&c.node_cidrs));
        cx.authority = identity_point;
        assert!(matches!(
            signed(&c).verify(&cx),
            Err(TrustError::InvalidAuthorityKey)
        ));
        // Too many CIDRs.
        let mut b = body("n1");
        b.pod_cidrs = (0..=MAX_CIDRS as u32)
            .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(i << 8)), 24).unwrap())
            .collect();
        assert!(matches!(
            SignedAnnouncement::sign_by_authority(b, &c.ca),
            Err(TrustError::TooManyCidrs { .. })
        ));
    }

    #[test]
    fn node_names_validated() {
        for good in ["n1", "node-1.example.com", "a", &"a".repeat(63)] {
            validate_node_name(good).unwrap();
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert_eq!(long.len(), 254);
        for bad in [
            "",
            "N1",
            "n_1",
            "-n1",
            "n1-",
            "a..b",
            ".n1",
            "n1/../x",
            "n1\n",
            "nœud",
            &"a".repeat(64),
            &long,
        ] {
            let err = validate_node_name(bad).unwrap_err();
            assert!(matches!(err, TrustError::InvalidNodeName { .. }), "{bad:?}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let c = cluster("n1");
        assert!(matches!(
            c.ca.certify("Bad Name", c.id.public_key(), 0, 1),
            Err(TrustError::InvalidNodeName { .. })
        ));
        // A verified-looking announcement for a bad name is refused up front.
        let mut ann = signed(&c);
        ann.body.node = "n1\u{1b}[31m".into();
        let err = ann.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err();
        assert!(matches!(err, TrustError::InvalidNodeName { .. }), "{err:?}");
        assert!(!err.to_string().contains('\u{1b}'), "{err}");
    }

    #[test]
    fn certificate_text_form_is_strict_and_never_panics() {
        let c = cluster("n1");
        let blob = base64::engine::general_purpose::STANDARD
            .decode(c.cert.to_base64())
            .unwrap();
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        // Every truncation is an error, not a panic.
        for len in 0..blob.len() {
            let err = NodeCertificate::from_base64(&encode(&blob[..len])).unwrap_err();
            assert!(
                matches!(err, TrustError::MalformedCertificate { .. }),
                "{len}: {err:?}"
            );
        }
        let mut long = blob.clone();
        long.push(0);
        let err = NodeCertificate::from_base64(&encode(&long)).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
        // Wrong domain: an announcement-tagged blob.
        let mut wrong = blob.clone();
        wrong[..ANNOUNCEMENT_DOMAIN.len()].copy_from_slice(ANNOUNCEMENT_DOMAIN);
        let err = NodeCertificate::from_base64(&encode(&wrong)).unwrap_err();
        assert!(err.to_string().contains("domain"), "{err}");
        // A huge claimed name length.
        let mut huge = CERTIFICATE_DOMAIN.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(NodeCertificate::from_base64(&encode(&huge)).is_err());
        // Non-UTF-8 name.
        let mut bad_utf8 = CERTIFICATE_DOMAIN.to_vec();
        bad_utf8.extend_from_slice(&2u32.to_be_bytes());
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        bad_utf8.extend_from_slice(&[0; 32 + 16 + 64]);
        let err = NodeCertificate::from_base64(&encode(&bad_utf8)).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        // Not base64.
        assert!(matches!(
            NodeCertificate::from_base64("not base64!"),
            Err(TrustError::Base64 {
                what: "certificate",
                ..
            })
        ));
        // Pseudo-random garbage of many lengths (xorshift, deterministic).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = NodeCertificate::from_base64(&encode(&bytes));
            let mut tagged = CERTIFICATE_DOMAIN.to_vec();
            tagged.extend_from_slice(&bytes);
            let _ = NodeCertificate::from_base64(&encode(&tagged));
        }
        // A parsed but modified certificate still has to verify.
        let mut modified = blob.clone();
        let last = modified.len() - 1;
        modified[last] ^= 1;
        let parsed = NodeCertificate::from_base64(&encode(&modified)).unwrap();
        assert!(matches!(
            parsed.verify(&c.ca.public_key(), NOW, SKEW),
            Err(TrustError::CertificateSignature { .. })
        ));
    }

    #[test]
    fn signature_text_errors() {
        assert!(matches!(
            decode_signature("!!"),
            Err(TrustError::Base64 {
                what: "signature",
                ..
            })
        ));
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 63]);
        let err = decode_signature(&short).unwrap_err();
        assert!(
            matches!(
                err,
                TrustError::Length {
                    what: "signature",
                    len: 63,
                    expected: 64
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn secrets_never_shown() {
        let c = cluster("n1");
        let ann = signed(&c);
        let id_seed = encode_key(&c.id.to_seed());
        let ca_seed = encode_key(&c.ca.to_seed());
        let mut texts = vec![format!(
            "{ann:?} {ann:#?} {:?} {:?} {:?}",
            c.cert, c.id, c.ca
        )];
        let mut cx = ctx(&c, Some(&[]));
        cx.accepted_generation = Some(99);
        let mut t = ann.clone();
        t.signature[0] ^= 1;
        for err in [
            ann.verify(&cx).unwrap_err(),
            t.verify(&ctx(&c, Some(&c.node_cidrs))).unwrap_err(),
            ann.verify(&ctx(&c, Some(&[]))).unwrap_err(),
            SignedAnnouncement::sign_by_node(body("n1"), &IdentityKey::generate(), c.cert.clone())
                .unwrap_err(),
        ] {
            texts.push(format!("{err} {err:?}"));
        }
        for text in texts {
            assert!(!text.contains(&id_seed), "{text}");
            assert!(!text.contains(&ca_seed), "{text}");
        }
    }

    #[test]
    fn unix_now_is_recent() {
        // 2023-11-14 (1.7e9): any machine running this is later.
        assert!(unix_now() > 1_700_000_000);
    }
}
