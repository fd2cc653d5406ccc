//! `veilctl` against the Kubernetes API, and the `VeilClusterConfig` status
//! every agent keeps current in kube mode.
//!
//! `veilctl status` takes one list of each kind it shows (Nodes, Pods,
//! `VeilNode`s, `VeilClusterConfig`s) and converts the objects with the same
//! conversions the kube source's watchers use, so the table it prints is
//! computed from exactly what an agent would see. `enable`/`disable` change
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
use ::kube::Client;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{
    convert_cluster_config, convert_node, convert_pod, convert_veil_node,
    veil_cluster_config_resource, veil_node_resource, Kind, KubeSource, DIAGNOSTIC_SOURCE,
};
use crate::cluster::objects::{VeilClusterConfig, VeilClusterConfigStatus, CLUSTER_CONFIG_NAME};
use crate::cluster::{ClusterState, Diagnostic, Object};
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

/// One list of every kind `veilctl status` shows, converted as the kube
/// source converts them. Objects that do not convert are skipped and
/// reported as diagnostics, exactly like the agent does; a failing list is
/// an error naming the kind.
pub async fn load_state(client: &Client) -> Result<(ClusterState, Vec<Diagnostic>), Error> {
    let lp = ListParams::default();
    let mut objects: Vec<(String, Result<Object, String>)> = Vec::new();
    let list_err = |kind: &str| {
        let object = format!("{kind} list");
        move |source| Error::Api {
            object,
            op: "list",
            source,
        }
    };
    let nodes = Api::<Node>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("Node"))?;
    for n in &nodes.items {
        objects.push((Kind::Node.key(&n.metadata), convert_node(n)));
    }
    let pods = Api::<Pod>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("Pod"))?;
    for p in &pods.items {
        objects.push((Kind::Pod.key(&p.metadata), convert_pod(p)));
    }
    let veil_nodes = Api::<DynamicObject>::all_with(client.clone(), &veil_node_resource())
        .list(&lp)
        .await
        .map_err(list_err("VeilNode"))?;
    for v in &veil_nodes.items {
        objects.push((Kind::VeilNode.key(&v.metadata), convert_veil_node(v)));
    }
    let configs = Api::<DynamicObject>::all_with(client.clone(), &veil_cluster_config_resource())
        .list(&lp)
        .await
        .map_err(list_err("VeilClusterConfig"))?;
    for c in &configs.items {
        objects.push((
            Kind::VeilClusterConfig.key(&c.metadata),
            convert_cluster_config(c),
        ));
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
