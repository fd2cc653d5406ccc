//! One API over both cluster sources, for the agent loop.
//!
//! The agent does the same four things whichever source it runs on: read the
//! state, wait for a change, publish this node's announcement, and know
//! whether the state is complete. [`Source`] is that API; the reconciler
//! never learns which source it is fed by.
//!
//! Completeness matters: a kube source that has not finished its first list
//! of every kind reports a partial state (no nodes, no announcements), and
//! programming the datapath from it would tear down every peer. The agent
//! therefore reconciles only when [`Source::synced`] holds. The file source
//! is complete by construction (a directory scan sees everything), so it is
//! always synced.
//!
//! Publishing differs in one way the agent must not care about: the file
//! source writes synchronously, the API server answers over the network.
//! [`Source::publish_announcement`] therefore never blocks on the network:
//! the kube source hands the announcement to a background publisher that
//! keeps only the latest one, applies it (spec, then status subresource),
//! and retries with backoff until it succeeds or a newer one replaces it.
//! Success shows up as the `VeilNode` coming back through the watch; the
//! agent republishes while the watched object differs, so a lost write is
//! repaired on a later pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::file::FileSource;
use super::kube::{KubeSource, KubeSourceConfig};
use super::objects::VeilNodeStatus;
use super::{Announcement, ClusterState, Diagnostic};
use crate::identity::{Identity, IdentityKey};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("file source {dir}: {source}")]
    File {
        dir: PathBuf,
        #[source]
        source: super::file::Error,
    },
    #[error("kubeconfig {path}: {problem}")]
    Kubeconfig { path: PathBuf, problem: String },
    #[error("{0}")]
    Kube(#[from] super::kube::Error),
}

/// Which source the agent reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of YAML objects (`--cluster-dir`).
    File { dir: PathBuf },
    /// The Kubernetes API: the given kubeconfig, or else in-cluster config
    /// (service account) and `$KUBECONFIG` / `~/.kube/config`, as kubectl.
    Kube { kubeconfig: Option<PathBuf> },
}

impl SourceConfig {
    /// `file` or `kube`, for logs and `/healthz`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::File { .. } => "file",
            SourceConfig::Kube { .. } => "kube",
        }
    }
}

/// Backoff of the kube publisher between failed applies.
const PUBLISH_RETRY_MIN: Duration = Duration::from_millis(500);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);

/// The cluster source the agent runs on.
pub enum Source {
    File {
        source: FileSource,
        /// Keeps the inotify watch alive.
        _watcher: notify::RecommendedWatcher,
        changes: mpsc::Receiver<()>,
    },
    Kube {
        source: Arc<KubeSource>,
        changes: mpsc::Receiver<()>,
        /// Latest announcement to publish; the publisher task reads it.
        publish: watch::Sender<Option<Announcement>>,
        publisher: JoinHandle<()>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("kind", &self.kind())
            .field("synced", &self.synced())
            .finish_non_exhaustive()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Kube { publisher, .. } = self {
            publisher.abort();
        }
    }
}

impl Source {
    /// Opens the configured source. For kube this only builds the client
    /// and starts the watchers: an unreachable API server is not an error
    /// here (the source stays unsynced and retries with backoff).
    pub async fn open(config: &SourceConfig) -> Result<Self, Error> {
        match config {
            SourceConfig::File { dir } => Self::file(dir),
            SourceConfig::Kube { kubeconfig } => {
                let client = kube_client(kubeconfig.as_deref()).await?;
                Ok(Self::kube(client, KubeSourceConfig::default()))
            }
        }
    }

    /// The file source on `dir`, watched for changes.
    pub fn file(dir: &Path) -> Result<Self, Error> {
        let source = FileSource::new(dir.to_path_buf());
        let (watcher, changes) = source.watch().map_err(|source| Error::File {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Source::File {
            source,
            _watcher: watcher,
            changes,
        })
    }

    /// The kube source on `client`. Must be called inside a tokio runtime.
    pub fn kube(client: ::kube::Client, config: KubeSourceConfig) -> Self {
        let source = Arc::new(KubeSource::start(client, config));
        let changes = source.watch();
        let (publish, rx) = watch::channel(None);
        let publisher = tokio::spawn(publish_loop(Arc::clone(&source), rx));
        Source::Kube {
            source,
            changes,
            publish,
            publisher,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Source::File { .. } => "file",
            Source::Kube { .. } => "kube",
        }
    }

    /// The current state and what is wrong with it; cheap for kube (no API call).
    pub fn load(&mut self) -> (ClusterState, Vec<Diagnostic>) {
        match self {
            Source::File { source, .. } => source.load(),
            Source::Kube { source, .. } => source.state(),
        }
    }

    /// Whether the state is complete enough to program the datapath from.
    /// Once true it stays true: later API outages keep the last good state.
    pub fn synced(&self) -> bool {
        match self {
            Source::File { .. } => true,
            Source::Kube { source, .. } => source.synced(),
        }
    }

    /// Resolves when the state may have changed; then drains further pending
    /// notifications so a burst makes one pass. Never resolves if the change
    /// stream ended (the agent still resyncs periodically).
    pub async fn changed(&mut self) {
        let changes = match self {
            Source::File { changes, .. } | Source::Kube { changes, .. } => changes,
        };
        if changes.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        while changes.try_recv().is_ok() {}
    }

    /// The kube source behind this source, for writers that only exist in
    /// kube mode (the cluster status).
    pub fn kube_source(&self) -> Option<Arc<KubeSource>> {
        match self {
            Source::File { .. } => None,
            Source::Kube { source, .. } => Some(Arc::clone(source)),
        }
    }

    /// Publishes an identity for every label set in `wanted` that has none
    /// yet (create-if-absent, see `crate::identity`), updating `published`.
    /// Only call on a synced source: an unsynced kube source does not know
    /// the published set and would probe needlessly.
    pub async fn allocate_identities(
        &mut self,
        published: &mut BTreeMap<Identity, IdentityKey>,
        wanted: &BTreeSet<IdentityKey>,
    ) -> (Vec<(Identity, IdentityKey)>, Vec<crate::identity::Error>) {
        match self {
            Source::File { source, .. } => {
                crate::identity::allocate_missing(published, wanted, source)
            }
            Source::Kube { source, .. } => source.allocate_identities(published, wanted).await,
        }
    }

    /// Deletes identity `id` if it still holds `key`; `Ok(false)` when it
    /// changed or went away meanwhile (the next load shows what it holds).
    pub async fn delete_identity(&self, id: Identity, key: &IdentityKey) -> Result<bool, Error> {
        match self {
            Source::File { source, .. } => {
                source.delete_identity(id, key).map_err(|e| Error::File {
                    dir: source.dir().to_path_buf(),
                    source: e,
                })
            }
            Source::Kube { source, .. } => Ok(source.delete_identity(id, key).await?),
        }
    }

    /// Publishes this node's announcement. The file source writes it now;
    /// the kube source queues it for the background publisher (the latest
    /// one wins) and returns at once, see the module docs.
    pub fn publish_announcement(&self, a: &Announcement) -> Result<(), Error> {
        match self {
            Source::File { source, .. } => {
                source
                    .publish_announcement(a)
                    .map_err(|source_err| Error::File {
                        dir: source.dir().to_path_buf(),
                        source: source_err,
                    })
            }
            Source::Kube { publish, .. } => {
                publish.send_if_modified(|current| {
                    if current.as_ref() == Some(a) {
                        false
                    } else {
                        *current = Some(a.clone());
                        true
                    }
                });
                Ok(())
            }
        }
    }
}

/// A client for `kubeconfig`, or the default chain (in-cluster service
/// account, then `$KUBECONFIG` / `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<::kube::Client, Error> {
    use ::kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let Some(path) = kubeconfig else {
        return ::kube::Client::try_default()
            .await
            .map_err(|e| Error::Kube(super::kube::Error::Client(e)));
    };
    let problem = |e: &dyn std::fmt::Display| Error::Kubeconfig {
        path: path.to_path_buf(),
        problem: e.to_string(),
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| problem(&e))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| problem(&e))?;
    ::kube::Client::try_from(config).map_err(|e| problem(&e))
}

/// Applies the latest queued announcement: the object by server-side apply,
/// then its status through the status subresource (the main resource ignores
/// `status` once the CRD enables the subresource). Retries with doubling
/// backoff; a newer announcement replaces a failing one at once.
async fn publish_loop(source: Arc<KubeSource>, mut rx: watch::Receiver<Option<Announcement>>) {
    let mut retry = PUBLISH_RETRY_MIN;
    loop {
        // Cloned out first: the borrow must not live across an await.
        let current = rx.borrow_and_update().clone();
        let Some(a) = current else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let result = match source.publish_announcement(&a).await {
            Ok(()) => {
                source
                    .patch_node_status(&a.node, &VeilNodeStatus::from(&a.status))
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                debug!(node = %a.node, "VeilNode applied");
                retry = PUBLISH_RETRY_MIN;
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(
                    "publishing this node's announcement: {e}; retrying in {}ms",
                    retry.as_millis()
                );
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        info!(node = %a.node, "a newer announcement replaces the one that failed");
                        retry = PUBLISH_RETRY_MIN;
                    }
                    _ = tokio::time::sleep(retry) => {
                        retry = (retry * 2).min(PUBLISH_RETRY_MAX);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
