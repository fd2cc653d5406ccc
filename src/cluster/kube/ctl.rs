//! `veilctl` against the Kubernetes API, and the `VeilClusterConfig` status
//! every agent keeps current in kube mode.
//!
//! `veilctl` takes one list of each kind the agents watch and converts the
//! objects with the same conversions the kube source's watchers use, so
//! what it prints and checks is computed from exactly what an agent would
//! see. `node approve`, `keys rotate` and `peer add` write
//! `VeilNodeCertificate`, `VeilKeyRotation` and `VeilNode` objects by
//! server-side apply under [`CTL_FIELD_MANAGER`] (through
//! `cluster::store::Store`, which does the same on a cluster dir). `enable`/`disable` change
//! only `spec.encryption` of `VeilClusterConfig/default`, by server-side apply
//! under their own field manager ([`CTL_FIELD_MANAGER`]), which creates the
//! object when absent and leaves fields other managers own (e.g.
//! `clusterPodCIDRs` written by a Helm chart) alone.
//!
//! The cluster status is written by every agent (see ARCHITECTURE.md, "Who
//! writes VeilClusterConfig.status"): [`conditions`] is a pure function of the
//! state, all agents use the same field manager, and each writes only when its
//! computed value differs from what it last wrote, so agents that agree write
//! identical bytes and a change of state causes one write per agent, not a loop.

use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use ::kube::core::ApiResource;
use ::kube::Client;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{
    convert_certificate, convert_cluster_config, convert_namespace, convert_network_policy,
    convert_node, convert_pod, convert_rotation, convert_veil_identity, convert_veil_node,
    convert_veil_policy, veil_certificate_resource, veil_cluster_config_resource,
    veil_identity_resource, veil_node_resource, veil_policy_resource, veil_rotation_resource, Kind,
    KubeSource, DIAGNOSTIC_SOURCE,
};
use crate::cluster::objects::{
    VeilClusterConfig, VeilClusterConfigStatus, VeilNode, CLUSTER_CONFIG_NAME,
};
use crate::cluster::trust::{CertificateObject, RotationObject};
use crate::cluster::{Announcement, ClusterState, Diagnostic, Object};
use crate::reconcile::enable::conditions;

/// Field manager of `veilctl enable|disable`: owns `spec.encryption` only.
pub const CTL_FIELD_MANAGER: &str = "veilctl";

/// Backoff of the cluster status writer between failed writes.
const STATUS_RETRY_MIN: Duration = Duration::from_millis(500);
const STATUS_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{object}: {op} failed: {source}")]
    Api {
        /// `Kind/name`, or the plural kind for a list.
        object: String,
        op: &'static str,
        #[source]
        source: ::kube::Error,
    },
    #[error("{object}: malformed object from the API server: {problem}")]
    Malformed { object: String, problem: String },
    #[error("{0}")]
    Source(#[from] super::Error),
}

/// `spec.encryption` as `veilctl` left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptionSetting {
    pub enabled: bool,
    pub strict: bool,
}

fn config_ref() -> String {
    format!("{}/{CLUSTER_CONFIG_NAME}", VeilClusterConfig::KIND)
}

/// Sets `spec.encryption` of `VeilClusterConfig/default`, creating the
/// object if absent. `strict: None` keeps the current value (on when never
/// set), as the file mode does; it is written out explicitly so the object
/// says what is in force.
pub async fn set_encryption(
    client: &Client,
    enabled: bool,
    strict: Option<bool>,
) -> Result<EncryptionSetting, Error> {
    let resource = veil_cluster_config_resource();
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let current = api
        .get_opt(CLUSTER_CONFIG_NAME)
        .await
        .map_err(|source| Error::Api {
            object: config_ref(),
            op: "get",
            source,
        })?;
    let current_strict = match &current {
        Some(obj) => {
            typed::<VeilClusterConfig>(obj, &config_ref())?
                .spec
                .encryption
                .strict
        }
        None => None,
    };
    let setting = EncryptionSetting {
        enabled,
        strict: strict.or(current_strict).unwrap_or(true),
    };
    let body = serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": { "name": CLUSTER_CONFIG_NAME },
        "spec": { "encryption": { "enabled": setting.enabled, "strict": setting.strict } },
    });
    // `force`: an operator running veilctl means to override whoever set
    // the flag before (kubectl edit, a Helm value).
    api.patch(
        CLUSTER_CONFIG_NAME,
        &PatchParams::apply(CTL_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Api {
        object: config_ref(),
        op: "server-side apply of spec.encryption",
        source,
    })?;
    Ok(setting)
}

fn typed<T: DeserializeOwned>(obj: &DynamicObject, object: &str) -> Result<T, Error> {
    super::typed(obj).map_err(|problem| Error::Malformed {
        object: object.into(),
        problem,
    })
}

/// One list of every kind the agents watch (`Kind::ALL`, in that order),
/// converted as the kube source converts them, so `veilctl` computes from
/// exactly what an agent would see (`status`, `policy trace`, and the checks
/// before `node approve`, `keys rotate` and `peer add`). Objects that do not
/// convert are skipped and reported as diagnostics, exactly like the agent
/// does; a failing list is an error naming the kind.
pub async fn load_state(client: &Client) -> Result<(ClusterState, Vec<Diagnostic>), Error> {
    let mut objects: Vec<(String, Result<Object, String>)> = Vec::new();
    for kind in Kind::ALL {
        let c = client.clone();
        match kind {
            Kind::Node => list_into(Api::<Node>::all(c), kind, convert_node, &mut objects).await?,
            Kind::Pod => list_into(Api::<Pod>::all(c), kind, convert_pod, &mut objects).await?,
            Kind::Namespace => {
                list_into(
                    Api::<Namespace>::all(c),
                    kind,
                    convert_namespace,
                    &mut objects,
                )
                .await?;
            }
            Kind::NetworkPolicy => {
                list_into(
                    Api::<NetworkPolicy>::all(c),
                    kind,
                    convert_network_policy,
                    &mut objects,
                )
                .await?;
            }
            Kind::VeilNode
            | Kind::VeilClusterConfig
            | Kind::VeilIdentity
            | Kind::VeilPolicy
            | Kind::VeilNodeCertificate
            | Kind::VeilKeyRotation => {
                let (resource, convert): (_, Convert<DynamicObject>) = match kind {
                    Kind::VeilNode => (veil_node_resource(), convert_veil_node),
                    Kind::VeilClusterConfig => {
                        (veil_cluster_config_resource(), convert_cluster_config)
                    }
                    Kind::VeilIdentity => (veil_identity_resource(), convert_veil_identity),
                    Kind::VeilPolicy => (veil_policy_resource(), convert_veil_policy),
                    Kind::VeilNodeCertificate => (veil_certificate_resource(), convert_certificate),
                    _ => (veil_rotation_resource(), convert_rotation),
                };
                list_into(
                    Api::<DynamicObject>::all_with(c, &resource),
                    kind,
                    convert,
                    &mut objects,
                )
                .await?;
            }
        }
    }
    let mut state = ClusterState::default();
    let mut diags = Vec::new();
    for (key, converted) in objects {
        match converted {
            Ok(object) => state.insert(&object, DIAGNOSTIC_SOURCE),
            Err(problem) => diags.push(Diagnostic {
                source: DIAGNOSTIC_SOURCE.into(),
                object: key,
                problem: format!("{problem}; object skipped"),
            }),
        }
    }
    Ok((state, diags))
}

/// A watcher's conversion of one object of `K`.
type Convert<K> = fn(&K) -> Result<Object, String>;

/// One list of `kind`, each object converted and keyed as the watchers do.
async fn list_into<K>(
    api: Api<K>,
    kind: Kind,
    convert: Convert<K>,
    objects: &mut Vec<(String, Result<Object, String>)>,
) -> Result<(), Error>
where
    K: ::kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Api {
            object: format!("{} list", kind.name()),
            op: "list",
            source,
        })?;
    for item in &list.items {
        objects.push((kind.key(item.meta()), convert(item)));
    }
    Ok(())
}

/// Server-side apply of a whole object under [`CTL_FIELD_MANAGER`],
/// creating it when absent. `force`: the operator running veilctl means
/// this content, whoever wrote the fields before.
async fn apply_object(
    client: &Client,
    resource: &ApiResource,
    name: &str,
    body: &serde_json::Value,
) -> Result<(), Error> {
    let api = Api::<DynamicObject>::all_with(client.clone(), resource);
    api.patch(
        name,
        &PatchParams::apply(CTL_FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| Error::Api {
        object: format!("{}/{name}", resource.kind),
        op: "server-side apply",
        source,
    })?;
    Ok(())
}

fn to_json<T: serde::Serialize>(object: String, value: &T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(value).map_err(|e| Error::Malformed {
        object,
        problem: format!("cannot serialize: {e}"),
    })
}

/// Applies `VeilNodeCertificate/<node>` carrying `cert` (`veilctl node approve`).
pub async fn apply_certificate(
    client: &Client,
    cert: &keymgr::NodeCertificate,
) -> Result<(), Error> {
    let object = CertificateObject::new(cert);
    let body = to_json(CertificateObject::object_ref(&cert.node), &object)?;
    apply_object(client, &veil_certificate_resource(), &cert.node, &body).await
}

/// Applies `VeilKeyRotation/<node>` asking for `generation` (`veilctl keys rotate`).
pub async fn apply_rotation(client: &Client, node: &str, generation: u64) -> Result<(), Error> {
    let object = RotationObject::new(node, generation);
    let body = to_json(RotationObject::object_ref(node), &object)?;
    apply_object(client, &veil_rotation_resource(), node, &body).await
}

/// Applies the `VeilNode` of `a` (`veilctl peer add`: an external peer's
/// announcement, signed by the authority). Its spec only: an external peer
/// reports no status.
pub async fn apply_announcement(client: &Client, a: &Announcement) -> Result<(), Error> {
    let object = VeilNode::object_ref(&a.node);
    let mut body = to_json(object, &VeilNode::from(a))?;
    if let Some(map) = body.as_object_mut() {
        map.remove("status");
    }
    apply_object(client, &veil_node_resource(), &a.node, &body).await
}

/// Whether `state` holds a `VeilClusterConfig/default` (the status
/// subresource of an absent object cannot be written).
fn has_config(state: &ClusterState) -> bool {
    state.origins.contains_key(&config_ref())
}

/// Keeps `VeilClusterConfig.status` equal to [`conditions`] of the latest
/// state, from a background task so an unreachable API server never stalls
/// the agent loop (the same reason announcements are published in the
/// background).
pub struct ClusterStatusWriter {
    wanted: watch::Sender<Option<VeilClusterConfigStatus>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ClusterStatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStatusWriter")
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterStatusWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClusterStatusWriter {
    /// Starts the writer on `source`. Must be called inside a tokio runtime.
    pub fn start(source: Arc<KubeSource>) -> Self {
        let (wanted, rx) = watch::channel(None);
        let task = tokio::spawn(status_loop(source, rx));
        Self { wanted, task }
    }

    /// Queues the conditions of `state` (a synced state only: a partial one
    /// would report wrong counts). Returns at once; the latest value wins.
    pub fn update(&self, state: &ClusterState) {
        if !has_config(state) {
            return;
        }
        let status = conditions(state);
        self.wanted.send_if_modified(|current| {
            if current.as_ref() == Some(&status) {
                false
            } else {
                *current = Some(status);
                true
            }
        });
    }
}

async fn status_loop(
    source: Arc<KubeSource>,
    mut rx: watch::Receiver<Option<VeilClusterConfigStatus>>,
) {
    let mut written: Option<VeilClusterConfigStatus> = None;
    let mut retry = STATUS_RETRY_MIN;
    loop {
        let current = rx.borrow_and_update().clone();
        let pending = current.filter(|s| written.as_ref() != Some(s));
        let Some(status) = pending else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        match source.patch_cluster_config_status(&status).await {
            Ok(()) => {
                debug!("VeilClusterConfig status applied");
                written = Some(status);
                retry = STATUS_RETRY_MIN;
            }
            Err(e) => {
                warn!(
                    "writing the cluster status: {e}; retrying in {}ms",
                    retry.as_millis()
                );
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        retry = STATUS_RETRY_MIN;
                    }
                    _ = tokio::time::sleep(retry) => {
                        retry = (retry * 2).min(STATUS_RETRY_MAX);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
