//! The kube source: cluster state from the Kubernetes API server.
//!
//! One [`watcher`] per kind (Nodes, Pods, Namespaces, NetworkPolicies, and the
//! Veil kinds `VeilNode`, `VeilClusterConfig`, `VeilIdentity`, `VeilPolicy`,
//! `VeilNodeCertificate` and `VeilKeyRotation`)
//! feeds a store of converted objects. The conversions are the ones the file
//! source uses (`NodeInfo::try_from(&Node)` and friends, in [`super::objects`];
//! `Policy::try_from` for both policy kinds), so both sources agree on what an
//! object means and what is wrong with it.
//!
//! Failure handling follows the file source's rule, applied to the API:
//! - a problem with one object skips that object, but keeps its last good
//!   version if there was one (a bad edit never tears a peer down);
//! - while the API server is unreachable, or a watch has to start over
//!   (410 Gone: the resource version left etcd's compaction window), the last
//!   complete state stays in force. A relist replaces a kind's objects only
//!   once it is complete (`InitDone`), so objects deleted while we were away
//!   disappear then, and never earlier by accident;
//! - errors are retried with backoff (client-go's policy by default: 0.8 s
//!   doubling to 30 s, jittered), so a struggling API server is not hammered
//!   by every node at once.
//!
//! The Veil kinds are read as [`DynamicObject`]s and converted via serde into
//! the typed structs of [`super::objects`], until CRD Rust types exist.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, Patch, PatchParams};
use ::kube::core::{ApiResource, GroupVersionKind};
use ::kube::runtime::utils::Backoff;
use ::kube::runtime::watcher::{self, DefaultBackoff, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::Client;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::objects::{VeilClusterConfig, VeilNode, CLUSTER_CONFIG_NAME};
use super::trust::{CertificateObject, RotationObject};
use super::{
    Announcement, ClusterConfig, ClusterState, Diagnostic, NamespaceInfo, NodeInfo, Object, PodInfo,
};

mod access;
pub mod ctl;
#[cfg(test)]
mod tests;

pub use access::{ApiAccess, API_ACCESS, CTL_ACCESS};

/// `Diagnostic::source` of everything this source reports.
pub const DIAGNOSTIC_SOURCE: &str = "kube";
/// API group of the Veil CRDs.
pub const VEIL_GROUP: &str = "veil.dev";
/// API version (within [`VEIL_GROUP`]) this agent reads and writes.
pub const VEIL_VERSION: &str = "v1alpha1";
/// Server-side apply field manager: owns the fields of `VeilNode`s this agent writes.
pub const FIELD_MANAGER: &str = "veil-agent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build a Kubernetes client (in-cluster service account or kubeconfig): {0}")]
    Client(#[source] ::kube::Error),
    #[error(
        "node name `{}` is not a valid object name (empty or over 253 bytes, or contains `/`)",
        name.escape_debug()
    )]
    InvalidNodeName { name: String },
    #[error("{object}: cannot serialize {what}: {source}")]
    Serialize {
        /// `Kind/name`.
        object: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("VeilNode/{node}: server-side apply failed: {source}")]
    Publish {
        node: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("VeilIdentity/{id}: {op} failed: {source}")]
    Identity {
        id: u32,
        op: &'static str,
        #[source]
        source: ::kube::Error,
    },
    #[error("{object}: status patch failed: {source}")]
    Status {
        /// `Kind/name`.
        object: String,
        #[source]
        source: ::kube::Error,
    },
}

/// How long to wait before retrying after a watch or list error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackoffPolicy {
    /// kube-runtime's [`DefaultBackoff`] (client-go's reflector policy).
    #[default]
    Default,
    /// Doubles from `min` up to `max`, without jitter; reset by any success.
    /// Deterministic, for tests and for operators who need exact timing.
    Exponential { min: Duration, max: Duration },
}

impl BackoffPolicy {
    fn build(self) -> Box<dyn Backoff> {
        match self {
            BackoffPolicy::Default => Box::new(DefaultBackoff::default()),
            BackoffPolicy::Exponential { min, max } => Box::new(Exponential {
                min,
                max,
                next: min,
            }),
        }
    }
}

struct Exponential {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Iterator for Exponential {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next.min(self.max);
        self.next = delay.saturating_mul(2).min(self.max);
        Some(delay)
    }
}

impl Backoff for Exponential {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What to watch and how.
#[derive(Debug, Clone, Default)]
pub struct KubeSourceConfig {
    pub backoff: BackoffPolicy,
    /// Server-side watch timeout in seconds (`None`: kube's 290 s). The
    /// client also treats a watch silent for this long + 5 s as dead.
    pub watch_timeout: Option<u32>,
}

/// The kinds this source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Node,
    Pod,
    Namespace,
    VeilNode,
    VeilClusterConfig,
    VeilIdentity,
    NetworkPolicy,
    VeilPolicy,
    VeilNodeCertificate,
    VeilKeyRotation,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::VeilNode,
        Kind::VeilClusterConfig,
        Kind::VeilIdentity,
        Kind::NetworkPolicy,
        Kind::VeilPolicy,
        Kind::VeilNodeCertificate,
        Kind::VeilKeyRotation,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::VeilNode => VeilNode::KIND,
            Kind::VeilClusterConfig => VeilClusterConfig::KIND,
            Kind::VeilIdentity => super::identity::VeilIdentity::KIND,
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::VeilPolicy => crate::policy::VeilPolicy::KIND,
            Kind::VeilNodeCertificate => CertificateObject::KIND,
            Kind::VeilKeyRotation => RotationObject::KIND,
        }
    }

    /// `Kind/name`, or `Kind/ns/name` for namespaced kinds, as the file source names objects.
    fn key(self, meta: &ObjectMeta) -> String {
        let name = meta
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("<no name>");
        match self {
            // The namespaced kinds; `default` for a missing namespace, as
            // `PolicyRef` and the file source do.
            Kind::Pod | Kind::NetworkPolicy | Kind::VeilPolicy => {
                let ns = meta
                    .namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default");
                format!("{}/{ns}/{name}", self.name())
            }
            _ => format!("{}/{name}", self.name()),
        }
    }
}

/// What the store knows of one object.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// The object's latest good version (possibly older than what the API holds).
    good: Option<Object>,
    /// Why the latest version was not used, if it was not.
    problem: Option<String>,
}

#[derive(Debug, Default)]
struct KindStore {
    /// Keyed by object reference (`Node/n1`, `Pod/ns/p`).
    entries: BTreeMap<String, Entry>,
    /// The relist in progress: replaces `entries` once complete.
    relist: Option<BTreeMap<String, Entry>>,
    /// The first complete list arrived.
    synced: bool,
    /// The last watch/list error, until the next success.
    error: Option<String>,
}

#[derive(Default)]
struct Inner {
    stores: BTreeMap<Kind, KindStore>,
    subscribers: Vec<mpsc::Sender<()>>,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn with_store<R>(&self, kind: Kind, f: impl FnOnce(&mut KindStore) -> R) -> R {
        let mut inner = self.inner.lock();
        f(inner.stores.entry(kind).or_default())
    }

    /// Wakes every subscriber. A full channel already holds a pending
    /// notification, so nothing is lost; closed channels are forgotten.
    fn notify(&self) {
        self.inner
            .lock()
            .subscribers
            .retain(|tx| !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(()))));
    }

    /// Applies one watcher event. Returns whether the visible state may have changed.
    fn apply(&self, kind: Kind, event: Event<(String, Result<Object, String>)>) -> bool {
        self.with_store(kind, |store| {
            // `Init` is the watcher's own bookkeeping; any other event is
            // news from the API server, so the last error is over.
            if !matches!(event, Event::Init) {
                store.error = None;
            }
            match event {
                Event::Init => {
                    store.relist = Some(BTreeMap::new());
                    false
                }
                Event::InitApply((key, converted)) => {
                    let previous = store.entries.get(&key).and_then(|e| e.good.clone());
                    let entry = entry_for(converted, previous);
                    store
                        .relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, entry);
                    false
                }
                Event::InitDone => {
                    store.entries = store.relist.take().unwrap_or_default();
                    store.synced = true;
                    true
                }
                Event::Apply((key, converted)) => {
                    let previous = store.entries.get(&key).and_then(|e| e.good.clone());
                    let entry = entry_for(converted, previous);
                    store.entries.insert(key, entry);
                    true
                }
                Event::Delete((key, _)) => store.entries.remove(&key).is_some(),
            }
        })
    }

    fn error(&self, kind: Kind, error: String) {
        self.with_store(kind, |store| store.error = Some(error));
    }

    fn snapshot(&self) -> (ClusterState, Vec<Diagnostic>) {
        let inner = self.inner.lock();
        let mut state = ClusterState::default();
        let mut diags = Vec::new();
        for kind in Kind::ALL {
            let Some(store) = inner.stores.get(&kind) else {
                diags.push(kind_diag(kind, "initial list not received yet".into()));
                continue;
            };
            if !store.synced {
                diags.push(kind_diag(kind, "initial list not received yet".into()));
            }
            if let Some(error) = &store.error {
                diags.push(kind_diag(
                    kind,
                    format!(
                        "{error}; keeping the {} object(s) last seen, retrying with backoff",
                        store.entries.len()
                    ),
                ));
            }
            for (key, entry) in &store.entries {
                if let Some(problem) = &entry.problem {
                    diags.push(Diagnostic {
                        source: DIAGNOSTIC_SOURCE.into(),
                        object: key.clone(),
                        problem: problem.clone(),
                    });
                }
                let Some(object) = &entry.good else { continue };
                state.insert(object, DIAGNOSTIC_SOURCE);
            }
        }
        (state, diags)
    }

    fn synced(&self) -> bool {
        let inner = self.inner.lock();
        Kind::ALL
            .iter()
            .all(|k| inner.stores.get(k).is_some_and(|s| s.synced))
    }
}

fn entry_for(converted: Result<Object, String>, previous: Option<Object>) -> Entry {
    match converted {
        Ok(object) => Entry {
            good: Some(object),
            problem: None,
        },
        Err(problem) => match previous {
            Some(last) => Entry {
                good: Some(last),
                problem: Some(format!(
                    "{problem}; keeping the last good version of this object"
                )),
            },
            None => Entry {
                good: None,
                problem: Some(format!("{problem}; object skipped")),
            },
        },
    }
}

fn kind_diag(kind: Kind, problem: String) -> Diagnostic {
    Diagnostic {
        source: DIAGNOSTIC_SOURCE.into(),
        object: kind.name().into(),
        problem,
    }
}

/// The `ApiResource` of a cluster-scoped Veil kind.
fn veil_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(VEIL_GROUP, VEIL_VERSION, kind),
        plural,
    )
}

/// `veil.dev/v1alpha1 VeilNode` (cluster-scoped, plural `veilnodes`).
pub fn veil_node_resource() -> ApiResource {
    veil_resource(VeilNode::KIND, "veilnodes")
}

/// `veil.dev/v1alpha1 VeilClusterConfig` (cluster-scoped, plural `veilclusterconfigs`).
pub fn veil_cluster_config_resource() -> ApiResource {
    veil_resource(VeilClusterConfig::KIND, "veilclusterconfigs")
}

/// `veil.dev/v1alpha1 VeilIdentity` (cluster-scoped, plural `veilidentities`).
pub fn veil_identity_resource() -> ApiResource {
    veil_resource(super::identity::VeilIdentity::KIND, "veilidentities")
}

/// `veil.dev/v1alpha1 VeilPolicy` (namespaced, plural `veilpolicies`), watched
/// in all namespaces at once.
pub fn veil_policy_resource() -> ApiResource {
    veil_resource(crate::policy::VeilPolicy::KIND, "veilpolicies")
}

/// `veil.dev/v1alpha1 VeilNodeCertificate` (cluster-scoped, plural `veilnodecertificates`).
pub fn veil_certificate_resource() -> ApiResource {
    veil_resource(CertificateObject::KIND, "veilnodecertificates")
}

/// `veil.dev/v1alpha1 VeilKeyRotation` (cluster-scoped, plural `veilkeyrotations`).
pub fn veil_rotation_resource() -> ApiResource {
    veil_resource(RotationObject::KIND, "veilkeyrotations")
}

/// Reads a dynamic object as one of the typed Veil structs. Goes through
/// JSON: `DynamicObject` keeps unknown fields as JSON, exactly what the typed
/// struct was designed to read.
fn typed<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("malformed: {e}"))
}

fn convert_node(node: &Node) -> Result<Object, String> {
    NodeInfo::try_from(node)
        .map(Object::Node)
        .map_err(|e| e.to_string())
}

fn convert_pod(pod: &Pod) -> Result<Object, String> {
    PodInfo::try_from(pod)
        .map(Object::Pod)
        .map_err(|e| e.to_string())
}

fn convert_namespace(ns: &Namespace) -> Result<Object, String> {
    NamespaceInfo::try_from(ns)
        .map(Object::Namespace)
        .map_err(|e| e.to_string())
}

fn convert_veil_node(obj: &DynamicObject) -> Result<Object, String> {
    let vn: VeilNode = typed(obj)?;
    Announcement::try_from(&vn)
        .map(|a| Object::Announcement(Box::new(a)))
        .map_err(|e| e.to_string())
}

fn convert_veil_identity(obj: &DynamicObject) -> Result<Object, String> {
    let v: super::identity::VeilIdentity = typed(obj)?;
    super::identity::PublishedIdentity::try_from(&v)
        .map(Object::Identity)
        .map_err(|e| e.to_string())
}

fn convert_certificate(obj: &DynamicObject) -> Result<Object, String> {
    let c: CertificateObject = typed(obj)?;
    super::trust::certificate_of(&c)
        .map(|c| Object::Certificate(Box::new(c)))
        .map_err(|e| e.to_string())
}

fn convert_rotation(obj: &DynamicObject) -> Result<Object, String> {
    let r: RotationObject = typed(obj)?;
    super::trust::rotation_of(&r)
        .map(Object::Rotation)
        .map_err(|e| e.to_string())
}

fn convert_network_policy(np: &NetworkPolicy) -> Result<Object, String> {
    crate::policy::Policy::try_from(np)
        .map(Object::Policy)
        .map_err(|e| e.to_string())
}

fn convert_veil_policy(obj: &DynamicObject) -> Result<Object, String> {
    let vp: crate::policy::VeilPolicy = typed(obj)?;
    crate::policy::Policy::try_from(&vp)
        .map(Object::Policy)
        .map_err(|e| e.to_string())
}

fn convert_cluster_config(obj: &DynamicObject) -> Result<Object, String> {
    if obj.metadata.name.as_deref() != Some(CLUSTER_CONFIG_NAME) {
        return Err(format!(
            "ignored: only the VeilClusterConfig named `{CLUSTER_CONFIG_NAME}` is used"
        ));
    }
    let config: VeilClusterConfig = typed(obj)?;
    ClusterConfig::try_from(&config.spec)
        .map(Object::Config)
        .map_err(|e| e.to_string())
}

/// The cluster state as the API server has it, kept current by watchers.
///
/// Watchers run as tokio tasks from [`KubeSource::start`] until the source
/// is dropped.
pub struct KubeSource {
    client: Client,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("synced", &self.synced())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// Connects with the in-cluster service account, or the kubeconfig
    /// (`$KUBECONFIG`, `~/.kube/config`) outside a cluster, and starts watching.
    pub async fn connect(config: KubeSourceConfig) -> Result<Self, Error> {
        let client = Client::try_default().await.map_err(Error::Client)?;
        Ok(Self::start(client, config))
    }

    /// Starts one watcher per kind on `client`. Must be called inside a tokio runtime.
    pub fn start(client: Client, config: KubeSourceConfig) -> Self {
        let shared = Arc::new(Shared::default());
        let mut wc = watcher::Config::default();
        if let Some(timeout) = config.watch_timeout {
            wc = wc.timeout(timeout);
        }
        let backoff = config.backoff;
        let tasks = vec![
            spawn_watcher(
                Api::<Node>::all(client.clone()),
                Kind::Node,
                &wc,
                backoff,
                &shared,
                convert_node,
            ),
            spawn_watcher(
                Api::<Pod>::all(client.clone()),
                Kind::Pod,
                &wc,
                backoff,
                &shared,
                convert_pod,
            ),
            spawn_watcher(
                Api::<Namespace>::all(client.clone()),
                Kind::Namespace,
                &wc,
                backoff,
                &shared,
                convert_namespace,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_node_resource()),
                Kind::VeilNode,
                &wc,
                backoff,
                &shared,
                convert_veil_node,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_cluster_config_resource()),
                Kind::VeilClusterConfig,
                &wc,
                backoff,
                &shared,
                convert_cluster_config,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_identity_resource()),
                Kind::VeilIdentity,
                &wc,
                backoff,
                &shared,
                convert_veil_identity,
            ),
            spawn_watcher(
                Api::<NetworkPolicy>::all(client.clone()),
                Kind::NetworkPolicy,
                &wc,
                backoff,
                &shared,
                convert_network_policy,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_policy_resource()),
                Kind::VeilPolicy,
                &wc,
                backoff,
                &shared,
                convert_veil_policy,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_certificate_resource()),
                Kind::VeilNodeCertificate,
                &wc,
                backoff,
                &shared,
                convert_certificate,
            ),
            spawn_watcher(
                Api::<DynamicObject>::all_with(client.clone(), &veil_rotation_resource()),
                Kind::VeilKeyRotation,
                &wc,
                backoff,
                &shared,
                convert_rotation,
            ),
        ];
        Self {
            client,
            shared,
            tasks,
        }
    }

    /// The current state plus diagnostics for every object skipped (or kept
    /// at its last good version), every kind not listed yet, and every
    /// watch currently failing. Cheap: no API call.
    pub fn state(&self) -> (ClusterState, Vec<Diagnostic>) {
        self.shared.snapshot()
    }

    /// Same as [`Self::state`]; named like `FileSource::load` so the agent
    /// loop can treat both sources alike.
    pub fn load(&mut self) -> (ClusterState, Vec<Diagnostic>) {
        self.state()
    }

    /// Whether every kind has completed its first list. Until then the state
    /// is partial: an agent must not remove peers because of it.
    pub fn synced(&self) -> bool {
        self.shared.synced()
    }

    /// A receiver that gets a `()` whenever the state may have changed
    /// (coalesced: at most one pending). Like `FileSource::watch`; several
    /// receivers may exist.
    pub fn watch(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        self.shared.inner.lock().subscribers.push(tx);
        rx
    }

    /// Publishes this node's `VeilNode` by server-side apply (creates it or
    /// updates the fields this agent owns; `force` takes them over from
    /// another manager, e.g. a `kubectl apply` by hand).
    pub async fn publish_announcement(&self, a: &Announcement) -> Result<(), Error> {
        check_name(&a.node)?;
        let body = serde_json::to_value(VeilNode::from(a)).map_err(|source| Error::Serialize {
            object: VeilNode::object_ref(&a.node),
            what: "announcement",
            source,
        })?;
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &veil_node_resource());
        api.patch(
            &a.node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Publish {
            node: a.node.clone(),
            source,
        })?;
        Ok(())
    }

    /// Sets `status` of node `node`'s `VeilNode` by server-side apply on the
    /// status subresource (the CRD must enable it). Only the fields in
    /// `status` are claimed; other managers' status fields are left alone.
    pub async fn patch_node_status<S: Serialize>(
        &self,
        node: &str,
        status: &S,
    ) -> Result<(), Error> {
        check_name(node)?;
        self.apply_status(&veil_node_resource(), node, status).await
    }

    /// Sets `status` of the `VeilClusterConfig` named `default` (progress of
    /// enabling: how many nodes are ready), like [`Self::patch_node_status`].
    /// Every writer uses [`FIELD_MANAGER`]: whoever writes must compute the
    /// same values from the same state, or elect one writer.
    pub async fn patch_cluster_config_status<S: Serialize>(&self, status: &S) -> Result<(), Error> {
        self.apply_status(&veil_cluster_config_resource(), CLUSTER_CONFIG_NAME, status)
            .await
    }

    async fn apply_status<S: Serialize>(
        &self,
        resource: &ApiResource,
        name: &str,
        status: &S,
    ) -> Result<(), Error> {
        let object = format!("{}/{name}", resource.kind);
        let status = serde_json::to_value(status).map_err(|source| Error::Serialize {
            object: object.clone(),
            what: "status",
            source,
        })?;
        let body = serde_json::json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": { "name": name },
            "status": status,
        });
        let api = Api::<DynamicObject>::all_with(self.client.clone(), resource);
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Status { object, source })?;
        Ok(())
    }
}

/// Identity allocation through the API server (see `crate::identity`).
impl KubeSource {
    /// Creates `VeilIdentity/<id>` for `key` unless it exists: a POST, which
    /// the API server refuses with 409 AlreadyExists when the name is taken
    /// (object names are unique, so this is the compare-and-swap). On 409 the
    /// existing object is read back: the same label set means another agent
    /// won the race for the same allocation.
    pub async fn create_identity(
        &self,
        id: crate::identity::Identity,
        key: &crate::identity::IdentityKey,
    ) -> Result<crate::identity::Created, Error> {
        let object = super::identity::VeilIdentity::new(id, key);
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &veil_identity_resource());
        let body: DynamicObject = serde_json::to_value(&object)
            .and_then(serde_json::from_value)
            .map_err(|source| Error::Serialize {
                object: super::identity::PublishedIdentity::object_ref(id),
                what: "identity",
                source,
            })?;
        match api.create(&::kube::api::PostParams::default(), &body).await {
            Ok(_) => Ok(crate::identity::Created::Created),
            Err(::kube::Error::Api(status)) if status.code == 409 => {
                let existing = self.read_identity(&api, id).await?;
                Ok(crate::identity::Created::Exists(
                    existing.map(|(key, _)| key),
                ))
            }
            Err(source) => Err(Error::Identity {
                id: id.0,
                op: "create",
                source,
            }),
        }
    }

    /// The label set and (uid, resourceVersion) of `VeilIdentity/<id>`, or
    /// `None` if it does not exist or is malformed.
    async fn read_identity(
        &self,
        api: &Api<DynamicObject>,
        id: crate::identity::Identity,
    ) -> Result<Option<(crate::identity::IdentityKey, ::kube::api::Preconditions)>, Error> {
        let obj = api
            .get_opt(&id.0.to_string())
            .await
            .map_err(|source| Error::Identity {
                id: id.0,
                op: "get",
                source,
            })?;
        Ok(obj.and_then(|o| {
            let pre = ::kube::api::Preconditions {
                uid: o.metadata.uid.clone(),
                resource_version: o.metadata.resource_version.clone(),
            };
            match convert_veil_identity(&o) {
                Ok(Object::Identity(p)) if p.id == id => Some((p.key, pre)),
                _ => None,
            }
        }))
    }

    /// Publishes an identity for every key of `wanted` without one, like
    /// `crate::identity::allocate_missing` over this API server.
    pub async fn allocate_identities(
        &self,
        published: &mut BTreeMap<crate::identity::Identity, crate::identity::IdentityKey>,
        wanted: &std::collections::BTreeSet<crate::identity::IdentityKey>,
    ) -> (
        Vec<(crate::identity::Identity, crate::identity::IdentityKey)>,
        Vec<crate::identity::Error>,
    ) {
        use crate::identity::{next_candidate, record, Next};
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for key in crate::identity::missing(published, wanted, &mut errors) {
            let mut attempt = 0;
            loop {
                match next_candidate(published, &key, &mut attempt) {
                    Next::Have(id) => {
                        done.push((id, key));
                        break;
                    }
                    Next::Exhausted(e) => {
                        errors.push(e);
                        break;
                    }
                    Next::Create(id) => match self.create_identity(id, &key).await {
                        Ok(outcome) => {
                            if record(published, id, &key, outcome) {
                                done.push((id, key));
                                break;
                            }
                        }
                        Err(e) => {
                            errors.push(crate::identity::Error::Store {
                                key,
                                id,
                                problem: e.to_string(),
                            });
                            break;
                        }
                    },
                }
            }
        }
        (done, errors)
    }

    /// Garbage collection: deletes `VeilIdentity/<id>` if it still holds
    /// `key`, with the uid and resourceVersion just read as preconditions,
    /// so an object replaced or edited in between is never deleted (the API
    /// server answers 409). Returns whether it deleted.
    pub async fn delete_identity(
        &self,
        id: crate::identity::Identity,
        key: &crate::identity::IdentityKey,
    ) -> Result<bool, Error> {
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &veil_identity_resource());
        let Some((current, pre)) = self.read_identity(&api, id).await? else {
            return Ok(false);
        };
        if current != *key {
            return Ok(false);
        }
        let params = ::kube::api::DeleteParams {
            preconditions: Some(pre),
            ..::kube::api::DeleteParams::default()
        };
        match api.delete(&id.0.to_string(), &params).await {
            Ok(_) => Ok(true),
            Err(::kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                Ok(false)
            }
            Err(source) => Err(Error::Identity {
                id: id.0,
                op: "delete",
                source,
            }),
        }
    }
}

/// Object names end up in a URL path: refuse what cannot be one name.
fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 253 || name.contains('/') || name == "." || name == ".." {
        return Err(Error::InvalidNodeName { name: name.into() });
    }
    Ok(())
}

fn spawn_watcher<K>(
    api: Api<K>,
    kind: Kind,
    wc: &watcher::Config,
    backoff: BackoffPolicy,
    shared: &Arc<Shared>,
    convert: fn(&K) -> Result<Object, String>,
) -> JoinHandle<()>
where
    K: ::kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let shared = Arc::clone(shared);
    let stream = watcher::watcher(api, wc.clone()).backoff(backoff.build());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    let reduce = |obj: K| (kind.key(obj.meta()), convert(&obj));
                    let event = match event {
                        Event::Init => Event::Init,
                        Event::InitApply(obj) => Event::InitApply(reduce(obj)),
                        Event::InitDone => Event::InitDone,
                        Event::Apply(obj) => Event::Apply(reduce(obj)),
                        Event::Delete(obj) => Event::Delete(reduce(obj)),
                    };
                    if shared.apply(kind, event) {
                        shared.notify();
                    }
                }
                Err(e) => {
                    tracing::warn!(kind = kind.name(), error = %e, "kube watch failed; retrying with backoff");
                    shared.error(kind, format!("watch failed: {e}"));
                    shared.notify();
                }
            }
        }
        // The backoff never gives up, so the stream only ends if the
        // runtime shuts down.
        tracing::debug!(kind = kind.name(), "kube watcher ended");
    })
}
