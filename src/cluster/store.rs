//! The cluster operations `veilctl` needs, over either store.
//!
//! `veilctl` reads the whole cluster state and writes four kinds of object:
//! node certificates (`node approve`), key rotation requests (`keys
//! rotate`), external peers' announcements (`peer add`) and the cluster
//! config (`enable`/`disable`). [`Store`] is that interface, implemented for
//! a cluster dir (the file source's YAML files) and for the Kubernetes API
//! (one list per kind, server-side apply), so each command is written once
//! and behaves the same on both. The checks a command makes before writing
//! (the node exists, it published an identity, it runs an agent) live here
//! too, on the state [`Store::load`] returns: the same state, converted by
//! the same code, that an agent would see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::FileSource;
use super::trust::{self, CertificateObject, Certificates, RotationObject};
use super::{Announcement, ClusterState, Diagnostic};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster dir {}: not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("{0}")]
    File(#[from] super::file::Error),
    #[error("{0}")]
    Trust(#[from] trust::Error),
    #[error("{0}")]
    Kube(#[from] super::kube::ctl::Error),
    /// The state does not allow the operation; says what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error("node name {node:?}: {source}")]
    InvalidNodeName {
        node: String,
        #[source]
        source: keymgr::TrustError,
    },
    #[error("certifying node {node}: {source}")]
    Certify {
        node: String,
        #[source]
        source: keymgr::TrustError,
    },
}

/// Where the cluster state lives.
#[derive(Clone)]
pub enum Store {
    /// A cluster dir, as the file source reads it.
    File(PathBuf),
    /// The Kubernetes API.
    Kube(::kube::Client),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::File(dir) => f.debug_tuple("File").field(dir).finish(),
            Store::Kube(_) => f.write_str("Kube"),
        }
    }
}

/// What [`Store::request_rotations`] asked of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedRotation {
    pub node: String,
    /// The generation the node announces now.
    pub current: u64,
    /// The generation it was asked to reach.
    pub want: u64,
    /// Where the request was written (file path or `VeilKeyRotation/<node>`).
    pub written_to: String,
}

/// What [`Store::approve_node`] issued.
#[derive(Debug, Clone)]
pub struct Approved {
    pub certificate: keymgr::NodeCertificate,
    /// Where it was written (file path or `VeilNodeCertificate/<node>`).
    pub written_to: String,
}

impl Store {
    /// `cluster dir DIR` or `the Kubernetes API`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::File(dir) => format!("cluster dir {}", dir.display()),
            Store::Kube(_) => "the Kubernetes API".into(),
        }
    }

    /// How often `--wait` loops re-read the state: a directory scan is
    /// cheap, a round of lists against an API server is not.
    pub fn poll_interval(&self) -> Duration {
        match self {
            Store::File(_) => Duration::from_millis(250),
            Store::Kube(_) => Duration::from_secs(1),
        }
    }

    /// The whole state and what is wrong with it, converted exactly as an
    /// agent converts it.
    pub async fn load(&self) -> Result<(ClusterState, Vec<Diagnostic>), Error> {
        match self {
            Store::File(dir) => Ok(FileSource::new(check_dir(dir)?).load()),
            Store::Kube(client) => Ok(super::kube::ctl::load_state(client).await?),
        }
    }

    /// Writes `VeilNodeCertificate/<cert.node>`; returns where.
    pub async fn write_certificate(&self, cert: &keymgr::NodeCertificate) -> Result<String, Error> {
        match self {
            Store::File(dir) => {
                let certs = Certificates::new(check_dir(dir)?);
                certs.write(cert)?;
                Ok(certs.path(&cert.node).display().to_string())
            }
            Store::Kube(client) => {
                super::kube::ctl::apply_certificate(client, cert).await?;
                Ok(CertificateObject::object_ref(&cert.node))
            }
        }
    }

    /// Writes `VeilKeyRotation/<node>` asking for `generation`; returns where.
    pub async fn write_rotation(&self, node: &str, generation: u64) -> Result<String, Error> {
        match self {
            Store::File(dir) => {
                let dir = check_dir(dir)?;
                trust::write_rotation(dir, node, generation)?;
                Ok(trust::rotation_path(dir, node).display().to_string())
            }
            Store::Kube(client) => {
                super::kube::ctl::apply_rotation(client, node, generation).await?;
                Ok(RotationObject::object_ref(node))
            }
        }
    }

    /// Writes the `VeilNode` of `a` (an external peer's announcement); returns where.
    pub async fn write_announcement(&self, a: &Announcement) -> Result<String, Error> {
        match self {
            Store::File(dir) => {
                let source = FileSource::new(check_dir(dir)?);
                source.publish_announcement(a)?;
                Ok(source.announcement_path(&a.node).display().to_string())
            }
            Store::Kube(client) => {
                super::kube::ctl::apply_announcement(client, a).await?;
                Ok(super::objects::VeilNode::object_ref(&a.node))
            }
        }
    }

    /// `veilctl node approve`: certifies the identity key node `name`
    /// published in its (pending) `VeilNode`, signed with `authority`, valid
    /// from now for `validity`, and writes the certificate. Refused for a
    /// name without a Node object (nothing to certify) or without an
    /// identity key (an external peer).
    pub async fn approve_node(
        &self,
        authority: &keymgr::AuthorityKey,
        name: &str,
        validity: Duration,
    ) -> Result<Approved, Error> {
        keymgr::validate_node_name(name).map_err(|source| Error::Certify {
            node: name.into(),
            source,
        })?;
        let (state, _) = self.load().await?;
        let object = super::objects::VeilNode::object_ref(name);
        let origin = state.origins.get(&object).cloned();
        let ann = state.announcements.get(name).ok_or_else(|| {
            Error::Refused(format!(
                "no readable {object} in {}; start the node's agent first",
                self.describe()
            ))
        })?;
        let identity = ann.trust.identity_key.ok_or_else(|| {
            Error::Refused(format!(
                "{}: {object} carries no spec.identityKey (an external peer, or an agent too old to have one)",
                origin.unwrap_or_else(|| self.describe())
            ))
        })?;
        if !state.nodes.contains_key(name) {
            return Err(Error::Refused(format!(
                "no Node object named {name}: refusing to certify an identity for a node that does not exist"
            )));
        }
        let now = keymgr::unix_now();
        let certificate = authority
            .certify(name, identity, now, now.saturating_add(validity.as_secs()))
            .map_err(|source| Error::Certify {
                node: name.into(),
                source,
            })?;
        let written_to = self.write_certificate(&certificate).await?;
        Ok(Approved {
            certificate,
            written_to,
        })
    }

    /// `veilctl keys rotate`: asks each of `nodes` (every Veil node when
    /// `None`) to reach one generation above both what it announces and
    /// what was requested before, and writes the requests.
    pub async fn request_rotations(
        &self,
        nodes: Option<&[String]>,
    ) -> Result<Vec<RequestedRotation>, Error> {
        let (state, _) = self.load().await?;
        let targets: Vec<String> = match nodes {
            Some(n) => n.to_vec(),
            None => veil_nodes(&state),
        };
        if targets.is_empty() {
            return Err(Error::Refused(
                "no Veil nodes have announced themselves; nothing to rotate".into(),
            ));
        }
        // Every target is checked before the first request is written.
        let mut plan = Vec::new();
        for t in &targets {
            keymgr::validate_node_name(t).map_err(|source| Error::InvalidNodeName {
                node: t.clone(),
                source,
            })?;
            let current = state
                .announcements
                .get(t)
                .filter(|a| {
                    state.nodes.contains_key(t)
                        && a.trust.signer != Some(keymgr::SignerKind::Authority)
                })
                .ok_or_else(|| {
                    Error::Refused(format!("{t} is not a Veil node with an announcement"))
                })?
                .trust
                .generation;
            let requested = state.rotation_requests.get(t).copied().unwrap_or(0);
            // Both come from the store: a hostile u64::MAX must not overflow.
            let want = current.max(requested).checked_add(1).ok_or_else(|| {
                Error::Refused(format!(
                    "{t}: key generation {} cannot be raised",
                    current.max(requested)
                ))
            })?;
            plan.push((t.clone(), current, want));
        }
        let mut done = Vec::new();
        for (node, current, want) in plan {
            let written_to = self.write_rotation(&node, want).await?;
            done.push(RequestedRotation {
                node,
                current,
                want,
                written_to,
            });
        }
        Ok(done)
    }
}

/// Nodes that run Veil agents: node-signed (or pending) announcements of
/// names that have a Node object.
pub fn veil_nodes(state: &ClusterState) -> Vec<String> {
    state
        .announcements
        .iter()
        .filter(|(n, a)| {
            state.nodes.contains_key(*n) && a.trust.signer != Some(keymgr::SignerKind::Authority)
        })
        .map(|(n, _)| n.clone())
        .collect()
}

fn check_dir(dir: &Path) -> Result<&Path, Error> {
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::NotADirectory {
            dir: dir.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster dir with node `n1` (Node + pending VeilNode) and an
    /// external peer `ext` (no Node).
    fn dir_with_pending_node(identity: [u8; 32]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("nodes.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n",
        )
        .unwrap();
        let source = FileSource::new(tmp.path());
        let mut pending = Announcement {
            node: "n1".into(),
            public_key: crate::cluster::PublicKey([5; 32]),
            listen_port: 51820,
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            ..Announcement::default()
        };
        pending.trust.identity_key = Some(identity);
        pending.trust.generation = 2;
        source.publish_announcement(&pending).unwrap();
        let mut ext = pending.clone();
        ext.node = "ext".into();
        ext.trust.identity_key = None;
        source.publish_announcement(&ext).unwrap();
        tmp
    }

    #[tokio::test]
    async fn file_store_approves_and_requests_rotations() {
        let authority = keymgr::AuthorityKey::from_seed([1; 32]);
        let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
        let tmp = dir_with_pending_node(identity);
        let store = Store::File(tmp.path().to_path_buf());

        let approved = store
            .approve_node(&authority, "n1", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(approved.certificate.identity_key, identity);
        assert_eq!(
            approved.written_to,
            Certificates::new(tmp.path())
                .path("n1")
                .display()
                .to_string()
        );
        approved
            .certificate
            .verify(&authority.public_key(), keymgr::unix_now(), 0)
            .unwrap();
        let (state, diags) = store.load().await.unwrap();
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(state.certificates.get("n1"), Some(&approved.certificate));

        let e = store
            .approve_node(&authority, "ext", Duration::from_secs(60))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("carries no spec.identityKey"), "{e}");
        let e = store
            .approve_node(&authority, "n9", Duration::from_secs(60))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no readable VeilNode/n9"), "{e}");

        // Generation 2 announced: ask for 3; asked again before it rotated: 4.
        let r = store.request_rotations(None).await.unwrap();
        assert_eq!(
            (r.len(), r[0].node.as_str(), r[0].current, r[0].want),
            (1, "n1", 2, 3)
        );
        let r = store
            .request_rotations(Some(&["n1".to_string()]))
            .await
            .unwrap();
        assert_eq!(r[0].want, 4);
        assert_eq!(store.load().await.unwrap().0.rotation_requests["n1"], 4);
        let e = store
            .request_rotations(Some(&["ext".to_string()]))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("ext is not a Veil node"), "{e}");
        let e = store
            .request_rotations(Some(&["Bad/Name".to_string()]))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("node name \"Bad/Name\": "), "{e}");

        // A request already at the top of the range is refused, not overflowed.
        trust::write_rotation(tmp.path(), "n1", u64::MAX).unwrap();
        let e = store
            .request_rotations(Some(&["n1".to_string()]))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be raised"), "{e}");

        let missing = Store::File(tmp.path().join("nope"));
        assert!(matches!(
            missing.load().await,
            Err(Error::NotADirectory { .. })
        ));
    }
}
