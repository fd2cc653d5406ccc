//! Objects and files of the trust model outside the key store: node
//! certificates (`VeilNodeCertificate`; `veilcerts/<node>.yaml` in a cluster
//! dir), key rotation requests (`VeilKeyRotation`; `veilrotations/<node>.yaml`),
//! their CRDs and the checks both sources apply when reading them
//! ([`certificate_of`], [`rotation_of`]), and the per-node record of
//! accepted peer announcements (`accepted.yaml` in the node's key dir).
//!
//! Certificates and rotation requests are public (0644): a certificate is
//! worthless without the node's identity key, and a rotation request can
//! only make a node rotate, never choose its key. The accepted record is
//! the node's own memory against replays (0600, in the private key dir).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::objects::{parse_cidr, VEIL_API_VERSION};
use super::PublicKey;
use crate::reconcile::Accepted;

/// Subdirectory of the cluster dir holding node certificates.
pub const CERT_DIR: &str = "veilcerts";
/// Subdirectory of the cluster dir holding key rotation requests.
pub const ROTATION_DIR: &str = "veilrotations";
/// File in the key dir recording accepted peer announcements.
pub const ACCEPTED_FILE: &str = "accepted.yaml";
/// Files larger than this are not ours.
const MAX_FILE_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error(
        "{path}: no cluster authority key there (create one with `veilctl ca init --out DIR`)"
    )]
    NoAuthority { path: PathBuf },
    #[error("authority key store {path}: {source}")]
    Keys {
        path: PathBuf,
        #[source]
        source: keymgr::Error,
    },
    /// A `VeilNodeCertificate` or `VeilKeyRotation` that cannot be used
    /// (the source names the object).
    #[error("{problem}")]
    Object { problem: String },
    #[error("certifying node {node}: {source}")]
    Certify {
        node: String,
        #[source]
        source: keymgr::TrustError,
    },
}

/// `veil.dev/v1alpha1 VeilNodeCertificate`: the authority's certificate for
/// one node's identity key, named after the node. The file source reads it
/// from `veilcerts/<node>.yaml`, the kube source watches `veilnodecertificates`;
/// both convert it with [`certificate_of`] into `ClusterState::certificates`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateObject {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: CertificateSpec,
}

/// The certificate itself is `certificate` (keymgr's base64 form: the signed
/// bytes and the authority's signature); the other fields repeat what it
/// says for `kubectl get` and are checked against it by [`certificate_of`].
///
/// The CRD (`crds/veilnodecertificates.yaml`) is derived from this type like
/// `VeilNodeSpec`'s: `VeilNodeCertificateCrd` is kube-derive's root,
/// [`CertificateObject`] stays the plain serde type both sources read. The
/// schema only catches shape mistakes; whether a certificate is trusted is
/// decided by each agent against the authority key it was installed with
/// (SECURITY.md), never by the API server.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, CustomResource, JsonSchema,
)]
// kube's derive takes one `printcolumn(name = .., type_ = .., ..)` per column;
// clippy reads the repeated keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilNodeCertificate",
    root = "VeilNodeCertificateCrd",
    shortname = "vcert",
    category = "veil",
    doc = "The cluster authority's certificate for one node's identity key, named after the node; written by `veilctl node approve`.",
    validation = Rule::new(NODE_NAME_RULE).message(NODE_NAME_MESSAGE),
    printcolumn(name = "Identity key", type_ = "string", json_path = ".spec.identityKey"),
    printcolumn(name = "Not after", type_ = "integer", json_path = ".spec.notAfter"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(
    description = "The authority's certificate for the identity key of the node named in metadata.name. Agents verify it against their --authority-public-key; a certificate that does not verify is ignored."
)]
#[schemars(
    extend("x-kubernetes-validations" = [
        {
            "rule": "self.notAfter > self.notBefore",
            "message": "notAfter must be later than notBefore",
        },
    ])
)]
pub struct CertificateSpec {
    /// The node's Ed25519 identity public key, base64 (for readers; the
    /// signed copy is inside `certificate`).
    #[schemars(regex(pattern = "^[A-Za-z0-9+/]{43}=$"))]
    pub identity_key: String,
    /// Validity, seconds since the Unix epoch (UTC), as signed.
    pub not_before: u64,
    pub not_after: u64,
    /// `keymgr::NodeCertificate::to_base64`: the signed bytes and signature.
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^[A-Za-z0-9+/]+={0,2}$"))]
    pub certificate: String,
}

impl CertificateObject {
    pub const KIND: &'static str = "VeilNodeCertificate";

    /// `VeilNodeCertificate/<node>`, as diagnostics and origins name it.
    pub fn object_ref(node: &str) -> String {
        format!("{}/{node}", Self::KIND)
    }

    /// The object that carries `cert`, named after its node.
    pub fn new(cert: &keymgr::NodeCertificate) -> Self {
        Self {
            api_version: VEIL_API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: named(&cert.node),
            spec: CertificateSpec {
                identity_key: keymgr::encode_key(&cert.identity_key),
                not_before: cert.not_before,
                not_after: cert.not_after,
                certificate: cert.to_base64(),
            },
        }
    }
}

/// `veil.dev/v1alpha1 VeilKeyRotation`: asks node `metadata.name` to rotate
/// until its WireGuard key generation is at least `spec.generation`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationObject {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: RotationSpec,
}

/// Written by `veilctl keys rotate`, read by the node's agent. Unsigned on
/// purpose: all it can do is make a node rotate its own key (SECURITY.md).
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, CustomResource, JsonSchema,
)]
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilKeyRotation",
    root = "VeilKeyRotationCrd",
    shortname = "vrot",
    category = "veil",
    doc = "A request that the node named in metadata.name rotate its WireGuard key until its key generation is at least spec.generation; written by `veilctl keys rotate`.",
    validation = Rule::new(NODE_NAME_RULE).message(NODE_NAME_MESSAGE),
    printcolumn(name = "Requested generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(
    description = "The key generation the node must reach: its agent rotates while its generation is lower."
)]
pub struct RotationSpec {
    /// The WireGuard key generation the node must reach (1 is a node's first key).
    #[schemars(range(min = 1))]
    pub generation: u64,
}

impl RotationObject {
    pub const KIND: &'static str = "VeilKeyRotation";

    /// `VeilKeyRotation/<node>`, as diagnostics and origins name it.
    pub fn object_ref(node: &str) -> String {
        format!("{}/{node}", Self::KIND)
    }

    /// The request that node `node` reach `generation`.
    pub fn new(node: &str, generation: u64) -> Self {
        Self {
            api_version: VEIL_API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: named(node),
            spec: RotationSpec { generation },
        }
    }
}

/// CEL: `metadata.name` is a node name as `keymgr::validate_node_name` takes
/// it (Kubernetes node names are DNS subdomains; RFC 1123).
pub const NODE_NAME_RULE: &str = "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
/// What the API server says when [`NODE_NAME_RULE`] refuses a name.
const NODE_NAME_MESSAGE: &str =
    "metadata.name must be the node's name (a DNS subdomain: lowercase letters, digits, '-' and '.')";

/// What an object says, checked: the node it is named after must be a node
/// name, and every reader field must agree with the signed certificate. The
/// signature is not checked here (the sources do not hold the authority
/// key); the agent verifies it before use.
pub fn certificate_of(obj: &CertificateObject) -> Result<keymgr::NodeCertificate, Error> {
    let name = object_name(&obj.metadata)?;
    let cert =
        keymgr::NodeCertificate::from_base64(&obj.spec.certificate).map_err(|e| Error::Object {
            problem: format!("spec.certificate: {e}"),
        })?;
    let mismatch = |field: &str, says: String, signed: String| Error::Object {
        problem: format!("{field} is `{says}` but the signed certificate says `{signed}`"),
    };
    if cert.node != name {
        return Err(mismatch("metadata.name", name.into(), cert.node));
    }
    let signed_key = keymgr::encode_key(&cert.identity_key);
    if obj.spec.identity_key != signed_key {
        return Err(mismatch(
            "spec.identityKey",
            obj.spec.identity_key.clone(),
            signed_key,
        ));
    }
    if obj.spec.not_before != cert.not_before {
        return Err(mismatch(
            "spec.notBefore",
            obj.spec.not_before.to_string(),
            cert.not_before.to_string(),
        ));
    }
    if obj.spec.not_after != cert.not_after {
        return Err(mismatch(
            "spec.notAfter",
            obj.spec.not_after.to_string(),
            cert.not_after.to_string(),
        ));
    }
    Ok(cert)
}

/// A `VeilKeyRotation`, checked: named after a node, generation at least 1.
pub fn rotation_of(obj: &RotationObject) -> Result<super::RotationRequest, Error> {
    let name = object_name(&obj.metadata)?;
    if obj.spec.generation == 0 {
        return Err(Error::Object {
            problem: "spec.generation must be at least 1".into(),
        });
    }
    Ok(super::RotationRequest {
        node: name.into(),
        generation: obj.spec.generation,
    })
}

fn object_name(meta: &ObjectMeta) -> Result<&str, Error> {
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Object {
            problem: "metadata.name is missing or empty".into(),
        })?;
    keymgr::validate_node_name(name).map_err(|e| Error::Object {
        problem: format!("metadata.name: {e}"),
    })?;
    Ok(name)
}

/// Whether `cert` (this node's `VeilNodeCertificate` from the cluster state,
/// if any) certifies `identity` for `node` and verifies under `authority`
/// now; otherwise why not.
pub fn check_certificate(
    cert: Option<&keymgr::NodeCertificate>,
    node: &str,
    identity: &[u8; 32],
    authority: &[u8; 32],
    now: u64,
) -> Result<keymgr::NodeCertificate, String> {
    let object = CertificateObject::object_ref(node);
    let Some(cert) = cert else {
        return Err(format!("{object} does not exist"));
    };
    if cert.node != node {
        return Err(format!("{object}: certificate is for node `{}`", cert.node));
    }
    if &cert.identity_key != identity {
        return Err(format!(
            "{object}: certificate is for identity key {}, this node's is {}",
            keymgr::encode_key(&cert.identity_key),
            keymgr::encode_key(identity)
        ));
    }
    cert.verify(authority, now, 0)
        .map_err(|e| format!("{object}: {e}"))?;
    Ok(cert.clone())
}

/// Loads the authority key from a `veilctl ca init` directory or the path of
/// its `authority.key`.
pub fn load_authority(path: &Path) -> Result<keymgr::AuthorityKey, Error> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let store = keymgr::KeyStore::new(dir);
    if !path.is_dir() && store.path(keymgr::KeyKind::Authority) != path {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            problem:
                "expected a directory made by `veilctl ca init --out DIR` or its authority.key"
                    .into(),
        });
    }
    store
        .load_authority()
        .map_err(|source| Error::Keys {
            path: dir.to_path_buf(),
            source,
        })?
        .map(|s| s.key)
        .ok_or_else(|| Error::NoAuthority {
            path: dir.to_path_buf(),
        })
}

/// The certificates in a cluster dir.
#[derive(Debug, Clone)]
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    pub fn new(cluster_dir: &Path) -> Self {
        Self {
            dir: cluster_dir.join(CERT_DIR),
        }
    }

    pub fn path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.yaml"))
    }

    /// Reads `veilcerts/<node>.yaml`; `Ok(None)` if there is none.
    pub fn read(&self, node: &str) -> Result<Option<keymgr::NodeCertificate>, Error> {
        let path = self.path(node);
        let Some(text) = read_small(&path)? else {
            return Ok(None);
        };
        let invalid = |problem: String| Error::Invalid {
            path: path.clone(),
            problem,
        };
        let obj: CertificateObject =
            serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if obj.kind != CertificateObject::KIND {
            return Err(invalid(format!(
                "kind is `{}`, expected {}",
                obj.kind,
                CertificateObject::KIND
            )));
        }
        certificate_of(&obj)
            .map(Some)
            .map_err(|e| invalid(e.to_string()))
    }

    /// Issues and writes a certificate for `identity`, valid from now (back-
    /// dated by the clock skew tolerance) for `validity`.
    pub fn approve(
        &self,
        authority: &keymgr::AuthorityKey,
        node: &str,
        identity: [u8; 32],
        now: u64,
        validity: Duration,
    ) -> Result<keymgr::NodeCertificate, Error> {
        let cert = authority
            .certify(node, identity, now, now + validity.as_secs())
            .map_err(|source| Error::Certify {
                node: node.into(),
                source,
            })?;
        self.write(&cert)?;
        Ok(cert)
    }

    pub fn write(&self, cert: &keymgr::NodeCertificate) -> Result<(), Error> {
        let obj = CertificateObject::new(cert);
        let text = to_yaml(&self.path(&cert.node), &obj)?;
        write_atomic(&self.path(&cert.node), text.as_bytes(), 0o644)
    }
}

/// Path of node `node`'s rotation request.
pub fn rotation_path(cluster_dir: &Path, node: &str) -> PathBuf {
    cluster_dir.join(ROTATION_DIR).join(format!("{node}.yaml"))
}

/// Writes `veilrotations/<node>.yaml`: node `node` must reach `generation`.
pub fn write_rotation(cluster_dir: &Path, node: &str, generation: u64) -> Result<(), Error> {
    let path = rotation_path(cluster_dir, node);
    let obj = RotationObject::new(node, generation);
    let text = to_yaml(&path, &obj)?;
    write_atomic(&path, text.as_bytes(), 0o644)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcceptedRecord {
    public_key: String,
    generation: u64,
    cert_not_before: u64,
    listen_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default)]
    external: bool,
    #[serde(default)]
    allowed_ips: Vec<String>,
}

/// Reads the accepted record from the key dir (empty if there is none).
/// A corrupt file is an error: silently forgetting it would re-open replays.
pub fn load_accepted(key_dir: &Path) -> Result<BTreeMap<String, Accepted>, Error> {
    let path = key_dir.join(ACCEPTED_FILE);
    let Some(text) = read_small(&path)? else {
        return Ok(BTreeMap::new());
    };
    let invalid = |problem: String| Error::Invalid {
        path: path.clone(),
        problem,
    };
    let records: BTreeMap<String, AcceptedRecord> =
        serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, r) in records {
        let key = keymgr::decode_key(&r.public_key)
            .map_err(|e| invalid(format!("{name}: publicKey: {e}")))?;
        let endpoint = r
            .endpoint
            .as_deref()
            .map(|e| {
                e.parse()
                    .map_err(|err| invalid(format!("{name}: endpoint: {err}")))
            })
            .transpose()?;
        let allowed_ips = r
            .allowed_ips
            .iter()
            .map(|c| parse_cidr("allowedIPs", c).map_err(|e| invalid(format!("{name}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(
            name,
            Accepted {
                public_key: PublicKey(key),
                generation: r.generation,
                cert_not_before: r.cert_not_before,
                listen_port: r.listen_port,
                endpoint,
                external: r.external,
                allowed_ips,
            },
        );
    }
    Ok(out)
}

/// Writes the accepted record atomically, 0600.
pub fn store_accepted(key_dir: &Path, accepted: &BTreeMap<String, Accepted>) -> Result<(), Error> {
    let path = key_dir.join(ACCEPTED_FILE);
    let records: BTreeMap<&String, AcceptedRecord> = accepted
        .iter()
        .map(|(n, a)| {
            (
                n,
                AcceptedRecord {
                    public_key: a.public_key.to_string(),
                    generation: a.generation,
                    cert_not_before: a.cert_not_before,
                    listen_port: a.listen_port,
                    endpoint: a.endpoint.map(|e| e.to_string()),
                    external: a.external,
                    allowed_ips: a.allowed_ips.iter().map(ToString::to_string).collect(),
                },
            )
        })
        .collect();
    let text = to_yaml(&path, &records)?;
    write_atomic(&path, text.as_bytes(), 0o600)
}

fn named(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}

fn to_yaml<T: Serialize>(path: &Path, value: &T) -> Result<String, Error> {
    serde_yaml::to_string(value).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        problem: format!("cannot serialize: {e}"),
    })
}

fn read_small(path: &Path) -> Result<Option<String>, Error> {
    let io = |op, source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    match fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_LEN => Err(Error::Invalid {
            path: path.to_path_buf(),
            problem: format!("{} bytes, more than the {MAX_FILE_LEN} allowed", m.len()),
        }),
        Ok(_) => fs::read_to_string(path)
            .map(Some)
            .map_err(|e| io("read", e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("stat", e)),
    }
}

/// Temp file in the same directory (leading dot: the cluster dir scanner
/// skips it), fsync, rename(2) over the target: readers see old or new.
fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |p: &Path, op, source| Error::Io {
        path: p.to_path_buf(),
        op,
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io(dir, "create directory", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io(&tmp, "create", e))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io(&tmp, "chmod", e))?;
        f.write_all(content).map_err(|e| io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| io(&tmp, "fsync", e))?;
        fs::rename(&tmp, path).map_err(|e| io(path, "rename", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_round_trip_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = BTreeMap::new();
        m.insert(
            "n2".to_string(),
            Accepted {
                public_key: PublicKey([7; 32]),
                generation: 3,
                cert_not_before: 1_700_000_000,
                listen_port: 51820,
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                external: false,
                allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
            },
        );
        store_accepted(dir.path(), &m).unwrap();
        assert_eq!(load_accepted(dir.path()).unwrap(), m);
        let mode = fs::metadata(dir.path().join(ACCEPTED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.path().join(ACCEPTED_FILE), "n2: {publicKey: nope}").unwrap();
        let err = load_accepted(dir.path()).unwrap_err().to_string();
        assert!(err.contains(ACCEPTED_FILE), "{err}");
    }

    #[test]
    fn certificate_round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let authority = keymgr::AuthorityKey::from_seed([1; 32]);
        let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
        let certs = Certificates::new(dir.path());
        let now = 1_700_000_000;
        assert!(certs.read("n1").unwrap().is_none());
        let cert = certs
            .approve(&authority, "n1", identity, now, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(certs.read("n1").unwrap(), Some(cert.clone()));
        let ak = authority.public_key();
        let ok = |c: Option<&keymgr::NodeCertificate>, id: &[u8; 32], ak: &[u8; 32], t: u64| {
            check_certificate(c, "n1", id, ak, t)
        };
        assert_eq!(ok(Some(&cert), &identity, &ak, now + 1).unwrap(), cert);
        assert!(ok(None, &identity, &ak, now)
            .unwrap_err()
            .contains("VeilNodeCertificate/n1 does not exist"));
        let other = keymgr::IdentityKey::from_seed([3; 32]).public_key();
        assert!(ok(Some(&cert), &other, &ak, now)
            .unwrap_err()
            .contains("this node's is"));
        assert!(ok(Some(&cert), &identity, &ak, now + 7200)
            .unwrap_err()
            .contains("expired"));
        let wrong = keymgr::AuthorityKey::from_seed([9; 32]).public_key();
        assert!(ok(Some(&cert), &identity, &wrong, now).is_err());
        assert!(check_certificate(Some(&cert), "n2", &identity, &ak, now)
            .unwrap_err()
            .contains("certificate is for node `n1`"));
    }

    #[test]
    fn certificate_objects_must_agree_with_the_signed_certificate() {
        let authority = keymgr::AuthorityKey::from_seed([1; 32]);
        let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
        let cert = authority.certify("n1", identity, 1000, 2000).unwrap();
        let obj = CertificateObject::new(&cert);
        assert_eq!(certificate_of(&obj).unwrap(), cert);
        type Mutate = fn(&mut CertificateObject);
        let cases: [(Mutate, &str); 6] = [
            (
                |o| o.metadata.name = Some("n2".into()),
                "metadata.name is `n2` but the signed certificate says `n1`",
            ),
            (|o| o.metadata.name = None, "metadata.name is missing"),
            (|o| o.metadata.name = Some("N_1".into()), "metadata.name: "),
            (
                |o| o.spec.identity_key = keymgr::encode_key(&[7; 32]),
                "spec.identityKey is",
            ),
            (|o| o.spec.not_after = 3000, "spec.notAfter is `3000`"),
            (
                |o| o.spec.certificate = "bm90IGEgY2VydA==".into(),
                "spec.certificate: ",
            ),
        ];
        for (mutate, want) in cases {
            let mut o = obj.clone();
            mutate(&mut o);
            let err = certificate_of(&o).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn rotation_requests() {
        let dir = tempfile::tempdir().unwrap();
        write_rotation(dir.path(), "n1", 4).unwrap();
        let text = fs::read_to_string(rotation_path(dir.path(), "n1")).unwrap();
        let obj: RotationObject = serde_yaml::from_str(&text).unwrap();
        assert_eq!(obj.kind, RotationObject::KIND);
        let r = rotation_of(&obj).unwrap();
        assert_eq!((r.node.as_str(), r.generation), ("n1", 4));
        let zero = RotationObject::new("n1", 0);
        assert!(rotation_of(&zero)
            .unwrap_err()
            .to_string()
            .contains("spec.generation must be at least 1"));
        assert!(rotation_of(&RotationObject::new("-bad", 3)).is_err());
    }
}
