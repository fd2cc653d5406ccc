//! Files of the trust model outside the key store: node certificates in the
//! cluster dir (`veilcerts/<node>.yaml`), key rotation requests
//! (`veilrotations/<node>.yaml`), and the per-node record of accepted peer
//! announcements (`accepted.yaml` in the node's key dir).
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
    #[error("certifying node {node}: {source}")]
    Certify {
        node: String,
        #[source]
        source: keymgr::TrustError,
    },
}

/// `veil.dev/v1alpha1 VeilNodeCertificate`: the authority's certificate for
/// one node's identity key. The file source ignores this kind.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateObject {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: CertificateSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    /// For readers; the signed copy is inside `certificate`.
    pub identity_key: String,
    pub not_before: u64,
    pub not_after: u64,
    /// `keymgr::NodeCertificate::to_base64`.
    pub certificate: String,
}

impl CertificateObject {
    pub const KIND: &'static str = "VeilNodeCertificate";
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

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    pub generation: u64,
}

impl RotationObject {
    pub const KIND: &'static str = "VeilKeyRotation";
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
        let obj: CertificateObject = serde_yaml::from_str(&text).map_err(|e| Error::Invalid {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        if obj.kind != CertificateObject::KIND {
            return Err(Error::Invalid {
                path,
                problem: format!(
                    "kind is `{}`, expected {}",
                    obj.kind,
                    CertificateObject::KIND
                ),
            });
        }
        keymgr::NodeCertificate::from_base64(&obj.spec.certificate)
            .map(Some)
            .map_err(|e| Error::Invalid {
                path,
                problem: format!("spec.certificate: {e}"),
            })
    }

    /// The stored certificate if it certifies `identity` for `node` and
    /// verifies under `authority` now; otherwise why not.
    pub fn valid_for(
        &self,
        node: &str,
        identity: &[u8; 32],
        authority: &[u8; 32],
        now: u64,
    ) -> Result<keymgr::NodeCertificate, String> {
        let path = self.path(node);
        let cert = match self.read(node) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(format!("{} does not exist", path.display())),
            Err(e) => return Err(e.to_string()),
        };
        if cert.node != node {
            return Err(format!(
                "{}: certificate is for node `{}`",
                path.display(),
                cert.node
            ));
        }
        if &cert.identity_key != identity {
            return Err(format!(
                "{}: certificate is for identity key {}, this node's is {}",
                path.display(),
                keymgr::encode_key(&cert.identity_key),
                keymgr::encode_key(identity)
            ));
        }
        cert.verify(authority, now, 0)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cert)
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
        let obj = CertificateObject {
            api_version: VEIL_API_VERSION.into(),
            kind: CertificateObject::KIND.into(),
            metadata: named(&cert.node),
            spec: CertificateSpec {
                identity_key: keymgr::encode_key(&cert.identity_key),
                not_before: cert.not_before,
                not_after: cert.not_after,
                certificate: cert.to_base64(),
            },
        };
        let text = to_yaml(&self.path(&cert.node), &obj)?;
        write_atomic(&self.path(&cert.node), text.as_bytes(), 0o644)
    }
}

/// Path of node `node`'s rotation request.
pub fn rotation_path(cluster_dir: &Path, node: &str) -> PathBuf {
    cluster_dir.join(ROTATION_DIR).join(format!("{node}.yaml"))
}

/// The requested generation for `node`, if a request exists.
pub fn read_rotation(cluster_dir: &Path, node: &str) -> Result<Option<u64>, Error> {
    let path = rotation_path(cluster_dir, node);
    let Some(text) = read_small(&path)? else {
        return Ok(None);
    };
    let obj: RotationObject = serde_yaml::from_str(&text).map_err(|e| Error::Invalid {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    Ok(Some(obj.spec.generation))
}

pub fn write_rotation(cluster_dir: &Path, node: &str, generation: u64) -> Result<(), Error> {
    let path = rotation_path(cluster_dir, node);
    let obj = RotationObject {
        api_version: VEIL_API_VERSION.into(),
        kind: RotationObject::KIND.into(),
        metadata: named(node),
        spec: RotationSpec { generation },
    };
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
        assert_eq!(
            certs.valid_for("n1", &identity, &ak, now + 1).unwrap(),
            cert
        );
        let other = keymgr::IdentityKey::from_seed([3; 32]).public_key();
        assert!(certs
            .valid_for("n1", &other, &ak, now)
            .unwrap_err()
            .contains("this node's is"));
        assert!(certs
            .valid_for("n1", &identity, &ak, now + 7200)
            .unwrap_err()
            .contains("expired"));
        let wrong = keymgr::AuthorityKey::from_seed([9; 32]).public_key();
        assert!(certs.valid_for("n1", &identity, &wrong, now).is_err());
    }

    #[test]
    fn rotation_requests() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_rotation(dir.path(), "n1").unwrap(), None);
        write_rotation(dir.path(), "n1", 4).unwrap();
        assert_eq!(read_rotation(dir.path(), "n1").unwrap(), Some(4));
        fs::write(rotation_path(dir.path(), "n1"), "spec: [").unwrap();
        assert!(read_rotation(dir.path(), "n1").is_err());
    }
}
