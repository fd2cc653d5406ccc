//! What the agent reports about itself: the metrics snapshot after each
//! pass, and readiness (`/healthz`).
//!
//! Ready means: the WireGuard engine runs, the source has a complete state,
//! and the last pass applied it without an applier error. An API server
//! outage after the first sync does not make the agent unready — the
//! datapath keeps its last good state and keeps forwarding; the failing
//! watches show in `veil_diagnostics` and the log.

use std::time::SystemTime;

use tracing::{info, warn};

use super::{Node, PublicKey};
use crate::cluster::{ClusterState, Diagnostic};
use crate::metrics::{Metrics, PeerSample, Snapshot};

/// What the loop did this pass.
pub(super) enum Pass {
    /// Reconciled a synced state; `errors` applier errors were logged.
    Reconciled { errors: u64 },
    /// The source is not synced: nothing was programmed.
    Unsynced(Vec<Diagnostic>),
}

/// Aborts the metrics server when the agent returns.
pub(super) struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) async fn start_server(
    addr: Option<std::net::SocketAddr>,
    metrics: &Metrics,
) -> Result<Option<ServerGuard>, crate::metrics::Error> {
    match addr {
        None => Ok(None),
        Some(addr) => Ok(Some(ServerGuard(
            crate::metrics::serve(addr, metrics.clone()).await?,
        ))),
    }
}

/// Stores `next`, logging when readiness changes.
pub(super) fn publish(metrics: &Metrics, next: Snapshot) {
    let before = metrics.snapshot().not_ready;
    if before != next.not_ready {
        match &next.not_ready {
            None => info!("ready"),
            Some(why) => warn!("not ready: {why}"),
        }
    }
    metrics.set(next);
}

/// Why the agent is not ready, if it is not.
pub fn not_ready(
    engine_running: bool,
    source_kind: &str,
    unsynced: Option<&[Diagnostic]>,
    pass_errors: u64,
) -> Option<String> {
    if !engine_running {
        return Some("the WireGuard engine stopped".into());
    }
    if let Some(diags) = unsynced {
        // Kind-level problems (`Node`, `VeilNode`: no `/`) say what is missing.
        let kinds: Vec<String> = diags
            .iter()
            .filter(|d| !d.object.contains('/'))
            .take(5)
            .map(|d| format!("{}: {}", d.object, d.problem))
            .collect();
        return Some(format!(
            "{source_kind} source not synced, nothing programmed yet ({})",
            if kinds.is_empty() {
                "waiting for the first list".to_string()
            } else {
                kinds.join("; ")
            }
        ));
    }
    if pass_errors > 0 {
        return Some(format!(
            "the last pass had {pass_errors} error(s) applying the desired state; see the log"
        ));
    }
    None
}

impl Node {
    /// The metrics snapshot after a pass over `state`.
    pub(super) fn observe(&self, state: &ClusterState, pass: Pass) -> Snapshot {
        let names: std::collections::BTreeMap<PublicKey, &str> = self
            .accepted
            .iter()
            .map(|(n, a)| (a.public_key, n.as_str()))
            .collect();
        let now = SystemTime::now();
        let peers = self
            .engine
            .peer_stats()
            .into_iter()
            .map(|p| {
                let key = PublicKey(p.public_key);
                PeerSample {
                    node: names
                        .get(&key)
                        .map_or_else(|| key.to_string(), |n| (*n).to_string()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    handshake_age: p
                        .last_handshake
                        .map(|t| now.duration_since(t).unwrap_or_default()),
                }
            })
            .collect();
        // Read failures are warnings, not errors: they must not count as
        // reconcile errors or flip readiness; the metric is just absent.
        let datapath = self.datapath.metrics().unwrap_or_else(|e| {
            warn!("reading BPF counters: {e}");
            Default::default()
        });
        let mut policy_denied = std::collections::BTreeMap::new();
        match self.datapath.policy_drops() {
            Ok(drops) => {
                for ((_src, _dst, dir, reason), n) in drops {
                    *policy_denied.entry((dir, reason)).or_insert(0u64) += n;
                }
            }
            Err(e) => warn!("reading BPF policy drop counters: {e}"),
        }
        let policy_allowed = self.datapath.policy_allowed().unwrap_or_else(|e| {
            warn!("reading BPF policy allowed counters: {e}");
            Default::default()
        });
        let (unsynced, pass_errors, diagnostics) = match &pass {
            Pass::Reconciled { errors } => (None, *errors, self.diagnostics.len()),
            Pass::Unsynced(diags) => (Some(diags.as_slice()), 0, diags.len()),
        };
        Snapshot {
            peers,
            engine: self.engine.counters(),
            datapath,
            policy_denied,
            policy_allowed,
            reconcile_errors: self.cfg.error_count.get(),
            diagnostics: diagnostics as u64,
            key_generation: self.generation,
            encryption_enabled: state.config.encryption_enabled,
            strict: state.config.strict,
            source_synced: unsynced.is_none(),
            not_ready: not_ready(
                self.engine.is_running(),
                self.source.kind(),
                unsynced,
                pass_errors,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(object: &str, problem: &str) -> Diagnostic {
        Diagnostic {
            source: "kube".into(),
            object: object.into(),
            problem: problem.into(),
        }
    }

    #[test]
    fn ready_needs_engine_sync_and_a_clean_pass() {
        assert_eq!(not_ready(true, "kube", None, 0), None);
        let why = not_ready(false, "kube", None, 0).unwrap();
        assert!(why.contains("engine stopped"), "{why}");
        let diags = [
            diag("Node", "initial list not received yet"),
            diag("Pod/default/web", "bad label"),
            diag("VeilNode", "watch failed: connection refused"),
        ];
        let why = not_ready(true, "kube", Some(&diags), 0).unwrap();
        assert!(why.starts_with("kube source not synced"), "{why}");
        assert!(why.contains("Node: initial list not received yet"), "{why}");
        assert!(why.contains("VeilNode: watch failed"), "{why}");
        assert!(
            !why.contains("Pod/default/web"),
            "object problems are not the reason: {why}"
        );
        let why = not_ready(true, "file", None, 2).unwrap();
        assert!(why.contains("2 error(s)"), "{why}");
    }
}
