//! `veil.dev/v1alpha1 VeilIdentity`: one published security identity.
//!
//! Cluster-scoped, named after the number (`metadata.name: "4711"`), with the
//! label set it stands for in `spec`. The name is the allocation: object
//! names are unique in a store, so creating the object with create-if-absent
//! semantics (an `O_EXCL`-like link in the file source, a POST that may fail
//! with 409 in the API) is a compare-and-swap every agent can race on safely.
//! See [`crate::identity::candidate`] for how agents pick the candidate number.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::objects::VEIL_API_VERSION;
use crate::identity::{Identity, IdentityKey};

/// Subdirectory of the cluster dir where agents create identities.
pub const IDENTITY_DIR: &str = "identities";

/// `veil.dev/v1alpha1 VeilIdentity`, cluster-scoped, named after its number.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VeilIdentity {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VeilIdentitySpec,
}

/// The security-relevant labels of an identity: the pod's namespace and labels.
///
/// The CRD (`crds/veilidentities.yaml`, written by `crdgen`) is derived from
/// this type like `VeilNodeSpec`'s: `VeilIdentityCrd` is kube-derive's typed
/// root, [`VeilIdentity`] stays the plain serde type the sources read. The
/// schema refuses in the API server what [`PublishedIdentity::try_from`]
/// would skip later (a name that is no allocatable number, a namespace that
/// is no DNS label), and makes `spec` immutable: the name is the allocation,
/// so a changed label set is a new object, never an edit (an edit would
/// renumber a label set on every node; SECURITY.md, "Identities").
#[derive(
    Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, CustomResource, JsonSchema,
)]
// kube's derive takes one `printcolumn(name = .., type_ = .., ..)` per column;
// clippy reads the repeated keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "veil.dev",
    version = "v1alpha1",
    kind = "VeilIdentity",
    root = "VeilIdentityCrd",
    shortname = "vid",
    category = "veil",
    doc = "One security identity: the number in its name stands for the pod namespace and label set in spec. Created by the agents (first come, first served), never edited.",
    validation = Rule::new("self.metadata.name.matches('^[1-9][0-9]{2,7}$') && int(self.metadata.name) >= 256 && int(self.metadata.name) < 16711680").message("metadata.name must be an identity number, 256-16711679, without leading zeros"),
    validation = Rule::new("self.spec == oldSelf.spec").message("spec is immutable: the name is the allocation; delete and create instead"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".spec.namespace"),
    printcolumn(name = "Labels", type_ = "string", json_path = ".spec.labels"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    description = "The label set the number in metadata.name stands for: the pods' namespace and all their labels. Never changes; a different label set is a different VeilIdentity.",
    transform = crate::crd::veil_identity_spec
)]
pub struct VeilIdentitySpec {
    /// Namespace of the pods with this identity (a DNS label).
    #[serde(default)]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// The pods' labels, all of them: the label set this number stands for.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl VeilIdentity {
    pub const API_VERSION: &'static str = VEIL_API_VERSION;
    pub const KIND: &'static str = "VeilIdentity";

    /// The object that publishes `id` for `key`.
    pub fn new(id: Identity, key: &IdentityKey) -> Self {
        Self {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata: ObjectMeta {
                name: Some(id.0.to_string()),
                ..ObjectMeta::default()
            },
            spec: VeilIdentitySpec {
                namespace: key.namespace.clone(),
                labels: key.labels.clone(),
            },
        }
    }
}

/// A validated `VeilIdentity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedIdentity {
    pub id: Identity,
    pub key: IdentityKey,
}

impl PublishedIdentity {
    /// `VeilIdentity/<number>`, as diagnostics and origins name it.
    pub fn object_ref(id: Identity) -> String {
        format!("{}/{}", VeilIdentity::KIND, id.0)
    }
}

/// What is wrong with a `VeilIdentity`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("metadata.name is missing or empty")]
    MissingName,
    #[error(
        "metadata.name `{0}` is not an identity number (decimal, no leading zeros, {first}..{limit})",
        first = Identity::FIRST_ALLOCATED,
        limit = Identity::FIRST_LOCAL - 1
    )]
    InvalidNumber(String),
    #[error("spec.namespace `{0}` is not a namespace name (a DNS label: 1-63 of a-z, 0-9, `-`)")]
    InvalidNamespace(String),
    #[error("spec.labels: key `{0}` is empty or longer than 317 bytes")]
    InvalidLabelKey(String),
}

/// Parses an object name as an allocatable identity number. Leading zeros are
/// refused so that one number has exactly one object name.
pub fn parse_number(name: &str) -> Option<Identity> {
    if name.is_empty() || name.len() > 10 || (name.len() > 1 && name.starts_with('0')) {
        return None;
    }
    if !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = name.parse().ok()?;
    (Identity::FIRST_ALLOCATED..Identity::FIRST_LOCAL)
        .contains(&n)
        .then_some(Identity(n))
}

fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-')
}

/// Whether `key` can be published (readers would accept the object).
pub fn check_key(key: &IdentityKey) -> Result<(), IdentityError> {
    if !valid_namespace(&key.namespace) {
        return Err(IdentityError::InvalidNamespace(key.namespace.clone()));
    }
    // 253 (prefix) + 1 + 63 (name): Kubernetes' longest qualified label key.
    if let Some(k) = key.labels.keys().find(|k| k.is_empty() || k.len() > 317) {
        return Err(IdentityError::InvalidLabelKey(k.clone()));
    }
    Ok(())
}

impl TryFrom<&VeilIdentity> for PublishedIdentity {
    type Error = IdentityError;

    fn try_from(v: &VeilIdentity) -> Result<Self, IdentityError> {
        let name = v
            .metadata
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or(IdentityError::MissingName)?;
        let id = parse_number(name).ok_or_else(|| IdentityError::InvalidNumber(name.into()))?;
        let key = IdentityKey {
            namespace: v.spec.namespace.clone(),
            labels: v.spec.labels.clone(),
        };
        check_key(&key)?;
        Ok(PublishedIdentity { id, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, pairs: &[(&str, &str)]) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn round_trips_through_yaml() {
        let k = key("prod", &[("app", "web")]);
        let obj = VeilIdentity::new(Identity(4711), &k);
        let text = serde_yaml::to_string(&obj).unwrap();
        assert!(
            text.contains("name: '4711'") || text.contains("name: \"4711\""),
            "{text}"
        );
        let back: VeilIdentity = serde_yaml::from_str(&text).unwrap();
        let p = PublishedIdentity::try_from(&back).unwrap();
        assert_eq!(p.id, Identity(4711));
        assert_eq!(p.key, k);
    }

    #[test]
    fn malformed_objects_are_refused_with_a_reason() {
        let k = key("prod", &[("app", "web")]);
        let with_name = |name: &str| {
            let mut o = VeilIdentity::new(Identity(300), &k);
            o.metadata.name = Some(name.into());
            PublishedIdentity::try_from(&o)
        };
        assert_eq!(with_name(""), Err(IdentityError::MissingName));
        for bad in [
            "web",
            "0300",
            "-1",
            "255",
            "1",
            "16711680",
            "99999999999",
            "3e2",
        ] {
            assert_eq!(
                with_name(bad),
                Err(IdentityError::InvalidNumber(bad.into())),
                "{bad}"
            );
        }
        assert!(with_name("256").is_ok());
        assert!(with_name("16711679").is_ok());

        let mut o = VeilIdentity::new(Identity(300), &key("Prod_1", &[]));
        assert!(matches!(
            PublishedIdentity::try_from(&o),
            Err(IdentityError::InvalidNamespace(_))
        ));
        o.spec.namespace = String::new();
        assert!(matches!(
            PublishedIdentity::try_from(&o),
            Err(IdentityError::InvalidNamespace(_))
        ));
        let o = VeilIdentity::new(Identity(300), &key("prod", &[("", "x")]));
        assert!(matches!(
            PublishedIdentity::try_from(&o),
            Err(IdentityError::InvalidLabelKey(_))
        ));
        // Unknown spec fields are refused: a typo must not silently publish
        // an identity for a different (smaller) label set.
        let err = serde_yaml::from_str::<VeilIdentity>(
            "apiVersion: veil.dev/v1alpha1\nkind: VeilIdentity\nmetadata: {name: '300'}\nspec: {namespace: prod, label: {app: web}}\n",
        );
        assert!(err.is_err());
    }

    /// The file source's create-if-absent, with real files.
    mod file_source {
        use super::*;
        use crate::cluster::file::FileSource;
        use crate::identity::{allocate_missing, candidate, Created, Published};
        use std::collections::BTreeSet;

        #[test]
        fn create_is_exclusive_and_reads_back() {
            let dir = tempfile::tempdir().unwrap();
            let src = FileSource::new(dir.path());
            let web = key("prod", &[("app", "web")]);
            let db = key("prod", &[("app", "db")]);
            assert_eq!(
                src.create_identity(Identity(300), &web).unwrap(),
                Created::Created
            );
            assert_eq!(
                src.create_identity(Identity(300), &web).unwrap(),
                Created::Exists(Some(web.clone()))
            );
            assert_eq!(
                src.create_identity(Identity(300), &db).unwrap(),
                Created::Exists(Some(web.clone())),
                "never overwritten"
            );
            // No temporary files are left behind.
            let names: Vec<_> = std::fs::read_dir(dir.path().join(IDENTITY_DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names, vec!["300.yaml".to_string()]);
            // The source reads it as a published identity.
            let (state, diags) = FileSource::new(dir.path()).load();
            assert!(diags.is_empty(), "{diags:?}");
            assert_eq!(state.identities.get(&Identity(300)), Some(&web));
            assert_eq!(
                state
                    .origins
                    .get("VeilIdentity/300")
                    .map(|s| s.ends_with("identities/300.yaml")),
                Some(true)
            );
            // Garbage collection deletes only what still holds the expected labels.
            assert!(!src.delete_identity(Identity(300), &db).unwrap());
            assert!(src.delete_identity(Identity(300), &web).unwrap());
            assert!(!src.delete_identity(Identity(300), &web).unwrap());
        }

        #[test]
        fn malformed_identity_objects_are_diagnosed_ignored_and_skipped() {
            let dir = tempfile::tempdir().unwrap();
            let ids = dir.path().join(IDENTITY_DIR);
            std::fs::create_dir_all(&ids).unwrap();
            let web = key("prod", &[("app", "web")]);
            let h = candidate(&web, 0);
            // A broken object squats web's first candidate; another names a
            // number outside the allocated range.
            std::fs::write(
                ids.join(format!("{}.yaml", h.0)),
                format!("apiVersion: veil.dev/v1alpha1\nkind: VeilIdentity\nmetadata: {{name: '{}'}}\nspec: {{namespace: 'Bad NS'}}\n", h.0),
            )
            .unwrap();
            std::fs::write(
                ids.join("low.yaml"),
                "apiVersion: veil.dev/v1alpha1\nkind: VeilIdentity\nmetadata: {name: '7'}\nspec: {namespace: prod}\n",
            )
            .unwrap();
            let mut src = FileSource::new(dir.path());
            let (mut state, diags) = src.load();
            assert!(state.identities.is_empty());
            let objects: BTreeSet<_> = diags.iter().map(|d| d.object.as_str()).collect();
            assert!(
                objects.contains(format!("VeilIdentity/{}", h.0).as_str())
                    && objects.contains("VeilIdentity/7"),
                "{diags:?}"
            );
            assert!(
                diags.iter().any(|d| d.problem.contains("spec.namespace")),
                "{diags:?}"
            );
            // Allocation skips the squatted number instead of overwriting it.
            let want: BTreeSet<_> = [web.clone()].into();
            let (done, errors) = allocate_missing(&mut state.identities, &want, &mut src);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(done, vec![(candidate(&web, 1), web.clone())]);
            let text = std::fs::read_to_string(ids.join(format!("{}.yaml", h.0))).unwrap();
            assert!(text.contains("Bad NS"), "left alone");
        }

        #[test]
        fn agents_racing_on_one_dir_converge() {
            // Eight agents (threads, each with its own source and an empty
            // view) allocate the same label sets, including a hash
            // collision, at the same time.
            let dir = tempfile::tempdir().unwrap();
            let (first, second) = colliding();
            let mut want: BTreeSet<IdentityKey> = [first.clone(), second.clone()].into();
            for i in 0..20 {
                want.insert(key("prod", &[("app", &format!("w{i}"))]));
            }
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (path, want, barrier) =
                        (dir.path().to_path_buf(), want.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let mut src = FileSource::new(path);
                        let mut view = BTreeMap::new();
                        barrier.wait();
                        let (done, errors) = allocate_missing(&mut view, &want, &mut src);
                        assert!(errors.is_empty(), "{errors:?}");
                        let mut done: Vec<_> = done.into_iter().map(|(id, k)| (k, id)).collect();
                        done.sort();
                        done
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            // Every agent ended with the same number per label set...
            for r in &results[1..] {
                assert_eq!(r, &results[0]);
            }
            assert_eq!(results[0].len(), want.len());
            // ...which is exactly what is published: one object per label set.
            let (state, diags) = FileSource::new(dir.path()).load();
            assert!(diags.is_empty(), "{diags:?}");
            assert_eq!(state.identities.len(), want.len());
            let published = Published::resolve(&state.identities);
            assert!(published.duplicates.is_empty());
            for (k, id) in &results[0] {
                assert_eq!(published.get(&k.namespace, &k.labels), Some(*id));
            }
            // The colliding pair got the hash and the next number.
            let (a, b) = (
                published.get("default", &first.labels),
                published.get("default", &second.labels),
            );
            let h = candidate(&first, 0);
            assert!(
                (a, b) == (Some(h), Some(Identity(h.0 + 1)))
                    || (a, b) == (Some(Identity(h.0 + 1)), Some(h)),
                "{a:?} {b:?} {h:?}"
            );
        }

        /// Two label sets whose hashes collide (a birthday search).
        fn colliding() -> (IdentityKey, IdentityKey) {
            let mut seen: BTreeMap<Identity, IdentityKey> = BTreeMap::new();
            (0..200_000)
                .find_map(|i| {
                    let k = key("default", &[("app", &format!("a{i}"))]);
                    seen.insert(candidate(&k, 0), k.clone())
                        .map(|prev| (prev, k))
                })
                .expect("a collision within 200k label sets")
        }
    }
}
