//! The agent runtime: one loop that reads the cluster source, computes the
//! desired state (pure, [`crate::reconcile`]) and hands it to the appliers —
//! the WireGuard engine, the BPF maps and attachments, and the routing safety net.
//!
//! It reconciles on every change the source reports and on a periodic resync
//! (the CNI may create a pod's veth after the Pod object appears). An applier
//! that fails logs why and is retried on the next pass; the others still run,
//! so the node keeps its last good state.
//!
//! On exit the agent leaves the pod-side BPF filters and the strict-mode
//! blackholes in place on purpose: with the agent gone, remote-pod traffic is
//! redirected into a TUN that no longer exists or hits a blackhole — it is
//! dropped, never sent in plaintext (fail closed).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use tracing::{debug, error, info, warn};

use crate::cluster::source::{Source, SourceConfig};
use crate::cluster::trust::{self, Certificates};
use crate::cluster::{
    Announcement, ClusterState, Diagnostic, EncryptionStatus, NodeKeyStatus, PublicKey,
};
use crate::datapath::{Datapath, DatapathConfig, EndpointValue, RemoteValue};
use crate::netlink::{fallback, Netlink};
use crate::reconcile::enable::{self, Flags, SendMode, Transition};
use crate::reconcile::{self, Accepted, Desired, TrustContext};
use crate::wireguard::{Engine, EngineConfig, PeerConfig};

/// Underlay MTU minus the largest WireGuard overhead (IPv6 40 + UDP 8 + WireGuard 32).
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_TUN: &str = "veil0";

mod memory;
mod observe;

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    /// Where the cluster state comes from: a directory or the Kubernetes API.
    pub source: SourceConfig,
    /// Listen address of `/metrics` and `/healthz`; `None`: no server.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The agent loop's ERROR events, counted by a tracing layer
    /// (`veil_reconcile_errors_total`, and `/healthz` after a failed pass).
    pub error_count: crate::metrics::ErrorCount,
    pub key_dir: PathBuf,
    pub uapi_socket: Option<PathBuf>,
    pub tun_name: String,
    pub listen_port: u16,
    pub mtu: u16,
    /// Bound of the engine threads' idle polling (`EngineConfig::idle_poll`).
    pub idle_poll: Duration,
    /// Engine packet queues (`EngineConfig::queues`).
    pub queues: usize,
    /// Full resync period, on top of change notifications.
    pub resync: Duration,
    /// File with the cluster authority's Ed25519 public key (the trust root).
    pub authority_public_key: PathBuf,
    /// Demo/test only: the authority's key store (`veilctl ca init --out`
    /// dir, or its `authority.key`), so the agent certifies its own identity.
    pub auto_approve_with: Option<PathBuf>,
    /// Shortest `spec.keyRotation.interval` honoured; shorter ones are
    /// reported and the last good interval is kept.
    /// [`MIN_KEY_ROTATION_INTERVAL`] unless a test lowers it.
    pub min_key_rotation_interval: Duration,
}

/// Below this, automatic rotation would mostly churn handshakes: each
/// rotation needs every peer to read the new announcement within the grace
/// period ([`ROTATION_GRACE`]).
pub const MIN_KEY_ROTATION_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// How long a signed announcement is valid, and when it is re-signed.
pub const ANNOUNCEMENT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const RESIGN_BEFORE_EXPIRY: Duration = Duration::from_secs(12 * 3600);
/// How long the previous WireGuard key keeps answering handshakes after a
/// rotation: peers that have not yet read the new announcement (resync
/// period plus a handshake) keep working meanwhile.
pub const ROTATION_GRACE: Duration = Duration::from_secs(120);

/// Validity of a certificate issued by auto-approve.
pub const AUTO_APPROVE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key store {dir}: {source}")]
    Keys {
        dir: PathBuf,
        #[source]
        source: keymgr::Error,
    },
    #[error("starting the WireGuard engine on {tun}: {source}")]
    Engine {
        tun: String,
        #[source]
        source: crate::wireguard::Error,
    },
    #[error("loading the eBPF datapath: {0}")]
    Datapath(#[from] crate::datapath::Error),
    #[error("{0}")]
    Netlink(#[from] crate::netlink::Error),
    #[error("watching cluster dir {dir}: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: crate::cluster::file::Error,
    },
    #[error("cluster authority public key {path}: {source}")]
    Authority {
        path: PathBuf,
        #[source]
        source: keymgr::Error,
    },
    #[error("--auto-approve-with {path}: {problem}")]
    AutoApprove { path: PathBuf, problem: String },
    #[error("{0}")]
    Trust(#[from] trust::Error),
    #[error("cluster source: {0}")]
    Source(#[from] crate::cluster::source::Error),
    #[error("{0}")]
    Metrics(#[from] crate::metrics::Error),
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Before anything is created: a refused flag must not leave a TUN behind.
    let auto_approve = auto_approve_dir(&cfg)?;
    memory::phase("start");
    // First, while the process is smallest: loading parses the kernel's BTF
    // (aya 0.14 always does, ~20 MiB for a moment), and that transient is the
    // agent's peak memory; done here it does not add to the engine's buffers
    // and threads. Nothing is attached until the TUN exists (below).
    let mut datapath = Datapath::load()?;
    memory::phase("bpf_loaded");
    let metrics = crate::metrics::Metrics::default();
    let _metrics_server = observe::start_server(cfg.metrics_addr, &metrics).await?;
    let store = keymgr::KeyStore::new(&cfg.key_dir);
    let key = store
        .load_or_generate_wireguard()
        .map_err(|source| Error::Keys {
            dir: cfg.key_dir.clone(),
            source,
        })?;
    let engine = Engine::start(EngineConfig {
        tun_name: cfg.tun_name.clone(),
        mtu: cfg.mtu,
        listen_port: cfg.listen_port,
        private_key: key.key.as_static_secret().clone(),
        uapi_socket: cfg.uapi_socket.clone(),
        idle_poll: cfg.idle_poll,
        queues: cfg.queues,
    })
    .map_err(|source| Error::Engine {
        tun: cfg.tun_name.clone(),
        source,
    })?;
    info!(
        node = %cfg.node,
        tun = engine.tun_name(),
        port = engine.listen_port(),
        public_key = %PublicKey(engine.public_key()),
        generation = key.generation,
        "WireGuard engine up"
    );
    memory::phase("engine_started");
    disable_rp_filter(engine.tun_name());
    let previous_until = restore_previous_key(&store, &engine);
    let previous_key = match store.load_previous_wireguard() {
        Ok(Some(p)) if previous_until.is_some() => Some((p.key.public_key(), p.generation)),
        _ => None,
    };

    let identity = store
        .load_or_generate_identity()
        .map_err(|source| Error::Keys {
            dir: cfg.key_dir.clone(),
            source,
        })?
        .key;
    let authority = keymgr::read_public_key_file(&cfg.authority_public_key).map_err(|source| {
        Error::Authority {
            path: cfg.authority_public_key.clone(),
            source,
        }
    })?;
    let approver = match auto_approve {
        None => None,
        Some((path, dir)) => Some((
            trust::load_authority(path).map_err(|e| Error::AutoApprove {
                path: path.clone(),
                problem: e.to_string(),
            })?,
            dir.clone(),
        )),
    };
    if let Some((a, _)) = &approver {
        if a.public_key() != authority {
            return Err(Error::AutoApprove {
                path: cfg.auto_approve_with.clone().unwrap_or_default(),
                problem: "this authority key does not match --authority-public-key".into(),
            });
        }
        warn!("auto-approve is on: this agent certifies its own identity (demo and tests only)");
    }
    let accepted = trust::load_accepted(&cfg.key_dir)?;
    info!(
        identity = %keymgr::encode_key(&identity.public_key()),
        accepted = accepted.len(),
        "node identity loaded"
    );

    datapath.attach_tun(engine.tun_name())?;
    memory::phase("tun_attached");
    let netlink = Netlink::connect()?;

    let source = Source::open(&cfg.source).await?;
    info!(source = source.kind(), "cluster source open");
    memory::phase("source_open");
    // Kube mode: every agent keeps VeilClusterConfig.status current (see
    // ARCHITECTURE.md, "Who writes VeilClusterConfig.status").
    let cluster_status = source
        .kube_source()
        .map(crate::cluster::kube::ctl::ClusterStatusWriter::start);

    let mut node = Node {
        cfg: cfg.clone(),
        engine,
        datapath,
        netlink,
        source,
        peers: None,
        attached: BTreeMap::new(),
        diagnostics: BTreeSet::new(),
        published: None,
        identity,
        authority,
        approver,
        generation: key.generation,
        accepted,
        signed: None,
        cert_problem: None,
        rotation_problem: None,
        previous_until,
        previous_key,
        rotation_interval: None,
        interval_problem: None,
        transition: Transition::default(),
        encryption: None,
    };
    let mut identities = IdentityAllocator::default();
    let mut resync = tokio::time::interval(cfg.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut first_pass = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            () = node.source.changed() => debug!("cluster source changed"),
            _ = resync.tick() => {}
        }
        let (mut state, diags) = node.source.load();
        // Never program the datapath from a partial (unsynced) state.
        let errors_before = cfg.error_count.get();
        let pass = if node.source.synced() {
            if first_pass {
                memory::phase("first_load");
            }
            identities.step(&mut node.source, &mut state).await;
            node.reconcile(&state, diags).await;
            if std::mem::take(&mut first_pass) {
                memory::phase("first_reconcile");
            }
            if let Some(writer) = &cluster_status {
                writer.update(&state);
            }
            observe::Pass::Reconciled {
                errors: cfg.error_count.get().saturating_sub(errors_before),
            }
        } else {
            observe::Pass::Unsynced(diags)
        };
        observe::publish(&metrics, node.observe(&state, pass));
    }
    info!("shutting down; BPF filters and strict-mode blackholes stay in place (fail closed)");
    node.engine.shutdown();
    Ok(())
}

/// `--auto-approve-with` and the cluster dir its certificates go to, or
/// why it is refused: only the file source has a place the agent may write
/// certificates to. In Kubernetes mode a certificate is a
/// `VeilNodeCertificate` that only an operator holding the authority key
/// creates (`veilctl node approve`); the agent's RBAC cannot create one,
/// and the authority key must not sit on every node.
fn auto_approve_dir(cfg: &Config) -> Result<Option<(&PathBuf, &PathBuf)>, Error> {
    match (&cfg.auto_approve_with, &cfg.source) {
        (None, _) => Ok(None),
        (Some(path), SourceConfig::File { dir }) => Ok(Some((path, dir))),
        (Some(path), SourceConfig::Kube { .. }) => Err(Error::AutoApprove {
            path: path.clone(),
            problem: "only with the file source (--cluster-dir); in Kubernetes mode approve the node with `veilctl node approve NAME --ca DIR`, which creates its VeilNodeCertificate".into(),
        }),
    }
}

/// This node's appliers and what they last applied.
struct Node {
    cfg: Config,
    engine: Engine,
    datapath: Datapath,
    netlink: Netlink,
    source: Source,
    peers: Option<Vec<PeerConfig>>,
    /// Host-side pod interfaces with `from_pod` attached: name -> ifindex.
    attached: BTreeMap<String, u32>,
    /// Problems currently reported, so each is logged once, not on every pass.
    diagnostics: BTreeSet<String>,
    published: Option<Announcement>,
    identity: keymgr::IdentityKey,
    authority: [u8; 32],
    /// `--auto-approve-with`: the authority key and the cluster dir the
    /// certificates it issues are written to (file source only).
    approver: Option<(keymgr::AuthorityKey, PathBuf)>,
    /// Generation of the WireGuard key the engine uses.
    generation: u64,
    /// Per peer: the announcement last accepted (persisted in the key dir).
    accepted: BTreeMap<String, Accepted>,
    /// This node's current signed announcement (without status).
    signed: Option<Announcement>,
    /// Why there is no certificate, as last logged.
    cert_problem: Option<String>,
    /// Why a requested rotation was not done, as last logged.
    rotation_problem: Option<String>,
    /// When the previous WireGuard key stops being needed.
    previous_until: Option<std::time::Instant>,
    /// The previous WireGuard public key and its generation, while it may
    /// still carry sessions (for the published session generations).
    previous_key: Option<([u8; 32], u64)>,
    /// The last good `spec.keyRotation.interval` (`None`: only on request).
    rotation_interval: Option<Duration>,
    /// Why the configured interval is not used, as last logged.
    interval_problem: Option<String>,
    /// Where this node is in enabling/disabling encryption, per peer.
    transition: Transition,
    /// This node's report on the enable flag, published in its status.
    encryption: Option<EncryptionStatus>,
}

impl Node {
    async fn reconcile(&mut self, state: &ClusterState, mut diags: Vec<Diagnostic>) {
        let outcome = reconcile::desired(
            state,
            &self.cfg.node,
            &TrustContext {
                authority: self.authority,
                now: keymgr::unix_now(),
                accepted: &self.accepted,
            },
        );
        diags.extend(outcome.diagnostics);
        self.report(diags);
        if outcome.accepted != self.accepted {
            for (name, a) in &outcome.accepted {
                if self.accepted.get(name) != Some(a) {
                    info!(peer = %name, key = %a.public_key, generation = a.generation, "accepted announcement");
                }
            }
            match trust::store_accepted(&self.cfg.key_dir, &outcome.accepted) {
                Ok(()) => self.accepted = outcome.accepted,
                // Not remembering is safe for this run; retried next pass.
                Err(e) => error!("persisting accepted announcements: {e}"),
            }
        }
        let mut desired = outcome.desired;
        self.plan_transition(state, &mut desired);

        self.update_rotation_interval(state.config.key_rotation_interval);
        self.rotate_if_requested(state.rotation_requests.get(&self.cfg.node).copied());
        self.apply_peers(&desired);
        if let Err(e) = self.apply_datapath(&desired).await {
            error!("applying the datapath: {e}; retrying on the next pass");
        }
        // After the engine holds every peer: the status says `ready`, and a
        // peer reading it may start sending encrypted at once.
        self.announce(state, &desired);
        self.apply_policy(state);
        let plan = fallback::plan(&desired, Some(self.engine.tun_ifindex()));
        if let Err(e) = self
            .netlink
            .sync_fallback(&plan, fallback::wants_rule(&desired))
            .await
        {
            error!("applying the routing safety net: {e}; retrying on the next pass");
        }
    }

    /// Decides per peer whether to send encrypted, in plaintext, or not at
    /// all while the enable flag changes ([`reconcile::enable`]), and narrows
    /// `desired` to that.
    fn plan_transition(&mut self, state: &ClusterState, desired: &mut Desired) {
        let flags = Flags {
            enabled: state.config.encryption_enabled,
            strict: state.config.strict,
        };
        let views = enable::peer_views(state, &self.cfg.node, desired);
        let was_open = self.transition.window_open(flags);
        let before = self.transition.encrypted.clone();
        let plan = self
            .transition
            .step(flags, enable::all_encrypting(state), &views);
        for (peer, mode) in &plan.modes {
            let now_encrypted = *mode == SendMode::Encrypted;
            if now_encrypted != before.contains(peer) {
                info!(peer = %peer, mode = ?mode, enabled = flags.enabled, "send mode changed");
            }
        }
        if was_open && !self.transition.window_open(flags) {
            info!(
                strict = flags.strict,
                "every node encrypts to every peer: enable converged"
            );
        }
        let status = EncryptionStatus {
            ready: true,
            ..plan.status.clone()
        };
        if self.encryption.as_ref() != Some(&status) {
            info!(
                enabled = status.enabled,
                accepts_plaintext = status.accepts_plaintext,
                encrypted = status.encrypted_peers,
                plaintext = status.plaintext_peers,
                dropped = status.dropped_peers,
                "encryption status"
            );
        }
        self.encryption = Some(status);
        enable::apply(&plan, desired);
    }

    fn report(&mut self, diags: Vec<Diagnostic>) {
        let now: BTreeSet<String> = diags.iter().map(ToString::to_string).collect();
        for d in &diags {
            if !self.diagnostics.contains(&d.to_string()) {
                warn!(source = %d.source, object = %d.object, "skipped: {}", d.problem);
            }
        }
        for gone in self.diagnostics.difference(&now) {
            info!("resolved: {gone}");
        }
        self.diagnostics = now;
    }

    /// Publishes this node's announcement when it is missing or out of
    /// date: signed when a certificate for our identity exists (or
    /// auto-approve issues one), otherwise a pending identity only.
    fn announce(&mut self, state: &ClusterState, desired: &Desired) {
        if !state.nodes.contains_key(&self.cfg.node) {
            warn!(node = %self.cfg.node, "no Node object for this node yet; not announcing");
            return;
        }
        let now = keymgr::unix_now();
        let identity_key = self.identity.public_key();
        let cert = match trust::check_certificate(
            state.certificates.get(&self.cfg.node),
            &self.cfg.node,
            &identity_key,
            &self.authority,
            now,
        ) {
            Ok(c) => Some(c),
            Err(why) => match &self.approver {
                // File source only (refused at startup otherwise): the
                // certificate goes into the cluster dir like `veilctl node
                // approve` writes it, and is read back from the state on
                // the next pass.
                Some((authority, dir)) => {
                    match Certificates::new(dir).approve(
                        authority,
                        &self.cfg.node,
                        identity_key,
                        now,
                        AUTO_APPROVE_VALIDITY,
                    ) {
                        Ok(c) => {
                            info!(node = %self.cfg.node, "auto-approved this node's identity ({why})");
                            Some(c)
                        }
                        Err(e) => {
                            error!("auto-approve: {e}");
                            None
                        }
                    }
                }
                None => {
                    let object = trust::CertificateObject::object_ref(&self.cfg.node);
                    let why = match state.origins.get(&object) {
                        Some(origin) => format!("{why} (from {origin})"),
                        None => why,
                    };
                    if self.cert_problem.as_ref() != Some(&why) {
                        warn!("no usable certificate: {why}; announcing a pending identity until `veilctl node approve {}`", self.cfg.node);
                        self.cert_problem = Some(why);
                    }
                    None
                }
            },
        };
        let base = Announcement {
            node: self.cfg.node.clone(),
            public_key: PublicKey(self.engine.public_key()),
            listen_port: self.engine.listen_port(),
            pod_cidrs: keymgr::normalize_cidrs(&desired.local_pod_cidrs),
            endpoint: None,
            ..Announcement::default()
        };
        let mut want = match cert {
            Some(cert) => {
                let reuse = self.signed.as_ref().filter(|s| {
                    s.public_key == base.public_key
                        && s.listen_port == base.listen_port
                        && s.pod_cidrs == base.pod_cidrs
                        && s.trust.generation == self.generation
                        && s.trust.certificate.as_ref() == Some(&cert)
                        && s.trust.not_after > now + RESIGN_BEFORE_EXPIRY.as_secs()
                });
                match reuse {
                    Some(s) => s.clone(),
                    None => {
                        let mut body = base.body();
                        body.generation = self.generation;
                        // Back-dated by the skew tolerance so that peers with a
                        // slow clock accept it at once.
                        body.not_before = now.saturating_sub(keymgr::DEFAULT_CLOCK_SKEW_SECS);
                        body.not_after = now + ANNOUNCEMENT_VALIDITY.as_secs();
                        match keymgr::SignedAnnouncement::sign_by_node(body, &self.identity, cert) {
                            Ok(signed) => {
                                let a = Announcement::from_signed(&signed);
                                self.signed = Some(a.clone());
                                a
                            }
                            Err(e) => {
                                error!("signing this node's announcement: {e}");
                                return;
                            }
                        }
                    }
                }
            }
            None => {
                let mut pending = base;
                pending.trust.identity_key = Some(identity_key);
                pending
            }
        };
        let key_since = match (&self.published, state.announcements.get(&self.cfg.node)) {
            (Some(p), _) if p.public_key == want.public_key => p.status.key_since,
            (_, Some(p)) if p.public_key == want.public_key => p.status.key_since,
            _ => None,
        };
        want.status = NodeKeyStatus {
            key_since: key_since.or(Some(now)),
            peers: self
                .accepted
                .iter()
                .map(|(n, a)| (n.clone(), a.generation))
                .collect(),
            encryption: self.encryption.clone(),
            sessions: self.session_generations(desired),
        };
        let current = state.announcements.get(&self.cfg.node);
        if current == Some(&want) && self.published.as_ref() == Some(&want) {
            return;
        }
        match self.source.publish_announcement(&want) {
            Ok(()) => {
                if self.published.as_ref().map(|p| (&p.public_key, &p.trust))
                    != Some((&want.public_key, &want.trust))
                {
                    info!(
                        public_key = %want.public_key,
                        port = want.listen_port,
                        generation = want.trust.generation,
                        signed = want.trust.signature.is_some(),
                        "announced this node"
                    );
                }
                self.published = Some(want);
            }
            Err(e) => error!("publishing this node's announcement: {e}"),
        }
    }

    /// Per peer node: the generation of our own key that the session carrying
    /// our traffic to it was made with (see [`NodeKeyStatus::sessions`]).
    fn session_generations(&self, desired: &Desired) -> BTreeMap<String, u64> {
        let current = self.engine.public_key();
        let by_key: BTreeMap<[u8; 32], &str> = desired
            .peers
            .values()
            .map(|p| (p.public_key.0, p.node.as_str()))
            .collect();
        self.engine
            .peer_stats()
            .into_iter()
            .filter_map(|s| {
                let node = by_key.get(&s.public_key)?;
                let generation = session_generation(
                    s.session_key?,
                    (current, self.generation),
                    self.previous_key,
                )?;
                Some((node.to_string(), generation))
            })
            .collect()
    }

    /// Takes the configured rotation interval if it is not below the
    /// minimum; otherwise logs once and keeps the last good one, as for any
    /// other bad config field.
    fn update_rotation_interval(&mut self, configured: Option<Duration>) {
        match check_rotation_interval(configured, self.cfg.min_key_rotation_interval) {
            Ok(interval) => {
                if interval != self.rotation_interval {
                    info!(
                        interval_secs = interval.map(|i| i.as_secs()),
                        "automatic WireGuard key rotation interval"
                    );
                }
                self.rotation_interval = interval;
                self.interval_problem = None;
            }
            Err(problem) => {
                if self.interval_problem.as_ref() != Some(&problem) {
                    warn!(
                        object = "VeilClusterConfig/default",
                        kept_secs = self.rotation_interval.map(|i| i.as_secs()),
                        "skipped: {problem}; keeping the last good interval"
                    );
                    self.interval_problem = Some(problem);
                }
            }
        }
    }

    /// Carries out `veilctl keys rotate` (when the requested generation is
    /// above ours) and `spec.keyRotation.interval` (when the current key is
    /// older than it): rotate (keymgr keeps the old key for the grace period,
    /// the engine keeps answering for it), and the next announcement
    /// publishes the new key. After the grace period the old key is deleted.
    /// `requested` is this node's `VeilKeyRotation` from the cluster state.
    fn rotate_if_requested(&mut self, requested: Option<u64>) {
        let store = keymgr::KeyStore::new(&self.cfg.key_dir);
        if self
            .previous_until
            .is_some_and(|t| std::time::Instant::now() >= t)
        {
            match store.forget_previous_wireguard() {
                Ok(_) => {
                    self.previous_until = None;
                    self.previous_key = None;
                }
                Err(e) => error!("deleting the previous WireGuard key after its grace period: {e}"),
            }
        }
        let requested = match check_rotation_request(requested, self.generation) {
            Ok(r) => r,
            Err(problem) => {
                self.rotation_note(format!(
                    "{}: {problem}",
                    trust::RotationObject::object_ref(&self.cfg.node)
                ));
                None
            }
        };
        let reason = match (requested, self.rotation_interval) {
            (Some(g), _) => format!("requested generation {g}"),
            (None, None) => return,
            (None, Some(interval)) => {
                // The key file is replaced by an atomic rename on every
                // rotation and never rewritten otherwise, so its mtime is when
                // this generation was created, also across restarts.
                let path = store.path(keymgr::KeyKind::WireGuard);
                let created = match std::fs::metadata(&path).and_then(|m| m.modified()) {
                    Ok(t) => t,
                    Err(e) => {
                        self.rotation_note(format!(
                            "reading the age of the WireGuard key {}: {e}",
                            path.display()
                        ));
                        return;
                    }
                };
                let now = std::time::SystemTime::now();
                if !rotation_due(created, now, interval) {
                    return;
                }
                format!(
                    "key is {}s old, interval {}s",
                    now.duration_since(created).unwrap_or_default().as_secs(),
                    interval.as_secs()
                )
            }
        };
        let (old, new) = match store.rotate_wireguard() {
            Ok(pair) => pair,
            Err(e) => {
                self.rotation_note(format!("rotating the WireGuard key: {e}"));
                return;
            }
        };
        // Hitless: the engine keeps answering handshakes for the old key
        // for the grace period and moves every session to the new one.
        self.engine
            .rotate_key(new.key.as_static_secret().clone(), ROTATION_GRACE);
        self.generation = new.generation;
        self.previous_until = Some(std::time::Instant::now() + ROTATION_GRACE);
        self.previous_key = Some((old.key.public_key(), old.generation));
        self.rotation_problem = None;
        info!(
            old_generation = old.generation,
            new_generation = new.generation,
            reason = %reason,
            public_key = %PublicKey(new.key.public_key()),
            grace_secs = ROTATION_GRACE.as_secs(),
            "rotated the WireGuard key"
        );
    }

    fn rotation_note(&mut self, problem: String) {
        if self.rotation_problem.as_ref() != Some(&problem) {
            warn!("{problem}");
            self.rotation_problem = Some(problem);
        }
    }

    fn apply_peers(&mut self, desired: &Desired) {
        let peers: Vec<PeerConfig> = desired
            .peers
            .values()
            .map(|p| PeerConfig {
                public_key: p.public_key.0,
                endpoint: Some(p.endpoint),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: None,
            })
            .collect();
        if self.peers.as_ref() == Some(&peers) {
            return;
        }
        for p in desired.peers.values() {
            info!(peer = %p.node, endpoint = %p.endpoint, allowed_ips = ?p.allowed_ips, key = %p.public_key, "peer");
        }
        self.engine.set_peers(peers.clone());
        self.peers = Some(peers);
    }

    /// Compiles the policies and writes only the entries that changed.
    fn apply_policy(&mut self, state: &ClusterState) {
        let compiled = crate::policy::compile_state(state);
        match self.datapath.sync_policy(&compiled) {
            Ok(0) => {}
            Ok(ops) => info!(
                changes = ops,
                entries = compiled.entries.len(),
                "policy map updated"
            ),
            Err(e) => error!("applying policy: {e}; retrying on the next pass"),
        }
    }

    async fn apply_datapath(&mut self, desired: &Desired) -> Result<(), Error> {
        // Maps first, attachments last: a freshly attached program must never
        // see empty maps (it would pass remote traffic to the plaintext route).
        self.datapath.set_config(DatapathConfig {
            enabled: desired.encryption_enabled,
            strict: desired.strict,
            tun_ifindex: self.engine.tun_ifindex(),
            tun_mtu: self.cfg.mtu,
        })?;
        let remote = remote_entries(desired);
        self.datapath.sync_remote(&remote)?;
        let ipcache: BTreeMap<IpAddr, u32> =
            desired.ipcache.iter().map(|(ip, id)| (*ip, id.0)).collect();
        self.datapath.sync_ipcache(&ipcache)?;

        let routes = self.netlink.host_routes().await?;
        let names = self.netlink.link_names().await?;
        let mut endpoints = BTreeMap::new();
        let mut want_attached = BTreeMap::new();
        for (ip, ep) in &desired.local_endpoints {
            let Some((ifindex, ifname)) = routes
                .get(ip)
                .and_then(|i| names.get(i).map(|n| (*i, n.clone())))
            else {
                debug!(pod = %format!("{}/{}", ep.namespace, ep.name), %ip, "no host route to the pod yet");
                continue;
            };
            endpoints.insert(
                *ip,
                EndpointValue {
                    identity: ep.identity.0,
                    ifindex,
                },
            );
            want_attached.insert(ifname, ifindex);
        }
        self.datapath.sync_endpoints(&endpoints)?;

        for (ifname, ifindex) in &want_attached {
            if self.attached.get(ifname) == Some(ifindex) {
                continue;
            }
            match self.datapath.attach_pod(ifname) {
                Ok(()) => {
                    info!(interface = %ifname, "steering pod traffic");
                    self.attached.insert(ifname.clone(), *ifindex);
                }
                Err(e) => error!(interface = %ifname, "attaching from_pod: {e}"),
            }
        }
        let stale: Vec<String> = self
            .attached
            .keys()
            .filter(|n| !want_attached.contains_key(*n))
            .cloned()
            .collect();
        for ifname in stale {
            self.attached.remove(&ifname);
            // The veth usually went away with its pod; only a live one needs detaching.
            if names.values().any(|n| *n == ifname) {
                if let Err(e) = self.datapath.detach_pod(&ifname) {
                    warn!(interface = %ifname, "detaching from_pod: {e}");
                }
            }
        }
        Ok(())
    }
}

/// The `veil_remote` LPM entries for a desired state: every remote pod CIDR
/// (with or without a peer), this node's own pod CIDRs marked local, and the
/// cluster-wide pod ranges as peerless entries, so that in strict mode an
/// address in them that no node serves is dropped rather than routed in
/// plaintext. Longest prefix wins, so node CIDRs carve themselves out of the
/// cluster range.
pub fn remote_entries(desired: &Desired) -> BTreeMap<IpNet, RemoteValue> {
    let nodes: BTreeMap<&str, u32> = desired
        .remote_cidrs
        .values()
        .map(|r| r.node.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .zip(1..)
        .collect();
    let mut out: BTreeMap<IpNet, RemoteValue> = desired
        .cluster_pod_cidrs
        .iter()
        .map(|c| {
            let value = RemoteValue {
                has_peer: false,
                local: false,
                node_id: 0,
            };
            (c.trunc(), value)
        })
        .collect();
    for (cidr, r) in &desired.remote_cidrs {
        let value = RemoteValue {
            has_peer: r.peer.is_some(),
            local: false,
            node_id: nodes.get(r.node.as_str()).copied().unwrap_or(0),
        };
        out.insert(cidr.trunc(), value);
    }
    for (ip, node) in &desired.remote_node_ips {
        let value = RemoteValue {
            has_peer: true,
            local: false,
            node_id: nodes.get(node.as_str()).copied().unwrap_or(0),
        };
        out.insert(IpNet::from(*ip), value);
    }
    for cidr in &desired.local_pod_cidrs {
        let value = RemoteValue {
            has_peer: false,
            local: true,
            node_id: 0,
        };
        out.insert(cidr.trunc(), value);
    }
    out
}

/// The generation of our key `session_key`: the current one or, during a
/// grace period, the previous one; `None` for a key older than that.
pub fn session_generation(
    session_key: [u8; 32],
    current: ([u8; 32], u64),
    previous: Option<([u8; 32], u64)>,
) -> Option<u64> {
    if session_key == current.0 {
        return Some(current.1);
    }
    previous.filter(|(k, _)| *k == session_key).map(|(_, g)| g)
}

/// Whether a key created at `created` is due for rotation at `now`. A key
/// dated in the future (the clock went back) is not: rotating on every pass
/// until the clock catches up would churn every peer's session.
pub fn rotation_due(
    created: std::time::SystemTime,
    now: std::time::SystemTime,
    interval: Duration,
) -> bool {
    now.duration_since(created).is_ok_and(|age| age >= interval)
}

/// How far above the current generation a rotation request may reach.
/// `veilctl keys rotate` asks for one above the higher of the announced and
/// the pending generation; a request far beyond that is a typo or a writer
/// trying to make the node rotate on every pass until it gets there.
pub const MAX_ROTATION_AHEAD: u64 = 8;

/// The generation to rotate towards, if a request asks for one above
/// `current`; a request more than [`MAX_ROTATION_AHEAD`] above is refused.
pub fn check_rotation_request(requested: Option<u64>, current: u64) -> Result<Option<u64>, String> {
    match requested {
        Some(g) if g > current.saturating_add(MAX_ROTATION_AHEAD) => Err(format!(
            "asks for generation {g}, more than {MAX_ROTATION_AHEAD} above the current \
             generation {current}; ignored (`veilctl keys rotate` asks for one above)"
        )),
        Some(g) if g > current => Ok(Some(g)),
        _ => Ok(None),
    }
}

/// The interval to use for `configured`, or why it is refused.
pub fn check_rotation_interval(
    configured: Option<Duration>,
    minimum: Duration,
) -> Result<Option<Duration>, String> {
    match configured {
        Some(i) if i < minimum => Err(format!(
            "spec.keyRotation.interval: {}s is below the minimum of {}s",
            i.as_secs(),
            minimum.as_secs()
        )),
        other => Ok(other),
    }
}

/// After a restart within a rotation's grace period, the engine keeps
/// answering for the previous key until the grace period that began with the
/// rotation (the previous key file's mtime) ends; a stale one is deleted.
fn restore_previous_key(store: &keymgr::KeyStore, engine: &Engine) -> Option<std::time::Instant> {
    let previous = match store.load_previous_wireguard() {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            warn!("reading the previous WireGuard key: {e}");
            return None;
        }
    };
    let rotated_at = std::fs::metadata(store.path(keymgr::KeyKind::WireGuardPrevious))
        .and_then(|m| m.modified())
        .ok()?;
    let until = rotated_at + ROTATION_GRACE;
    let left = until.duration_since(std::time::SystemTime::now()).ok();
    match left {
        Some(left) => {
            engine.set_previous_key(previous.key.as_static_secret().clone(), until);
            info!(
                generation = previous.generation,
                secs_left = left.as_secs(),
                "still answering handshakes for the previous WireGuard key"
            );
            Some(std::time::Instant::now() + left)
        }
        // Grace period over: the next pass deletes it.
        _ => Some(std::time::Instant::now()),
    }
}

/// The identity allocation step (see `crate::identity`): before each
/// reconcile, publish an identity for every pod label set that has none (so
/// this pass already uses it), and delete identities unused for the grace
/// period. Every agent does this for every pod, not only its own: the
/// create-if-absent write makes racing agents converge, and remote pods do
/// not stay `init` when their own node's agent is slow.
struct IdentityAllocator {
    gc: crate::identity::Collector,
    /// How long an identity must be unused before it is deleted.
    grace: Duration,
    /// Problems currently reported, so each is logged once.
    problems: BTreeSet<String>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            gc: crate::identity::Collector::default(),
            grace: crate::identity::GC_GRACE,
            problems: BTreeSet::new(),
        }
    }
}

impl IdentityAllocator {
    async fn step(&mut self, source: &mut Source, state: &mut ClusterState) {
        let wanted = crate::identity::wanted(state);
        let (done, errors) = source
            .allocate_identities(&mut state.identities, &wanted)
            .await;
        for (id, key) in &done {
            info!(identity = id.0, namespace = %key.namespace, labels = ?key.labels, "identity published");
        }
        let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for problem in now.difference(&self.problems) {
            warn!("{problem}");
        }
        self.problems = now;

        let unused = crate::identity::unused(&state.identities, &wanted);
        let due = self.gc.due(&unused, std::time::Instant::now(), self.grace);
        for id in due {
            let Some(key) = state.identities.get(&id).cloned() else {
                self.gc.forget(id);
                continue;
            };
            match source.delete_identity(id, &key).await {
                Ok(deleted) => {
                    // Not deleted: the file changed or went away; the next
                    // load shows what it holds now.
                    if deleted {
                        info!(identity = id.0, namespace = %key.namespace, labels = ?key.labels, "unused identity deleted");
                        state.identities.remove(&id);
                    }
                    self.gc.forget(id);
                }
                Err(e) => warn!(
                    identity = id.0,
                    "deleting an unused identity: {e}; retrying"
                ),
            }
        }
    }
}

/// Decrypted packets arrive on the TUN with pod source addresses that the
/// kernel's reverse-path filter would reject (their route points elsewhere);
/// cryptokey routing already authenticated them.
fn disable_rp_filter(tun: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{tun}/rp_filter");
    if let Err(e) = std::fs::write(&path, "0") {
        warn!("cannot write {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::RemoteCidr;

    #[test]
    fn rotation_requests_above_current_within_reach_only() {
        assert_eq!(check_rotation_request(None, 3), Ok(None));
        assert_eq!(check_rotation_request(Some(3), 3), Ok(None));
        assert_eq!(check_rotation_request(Some(2), 3), Ok(None));
        assert_eq!(check_rotation_request(Some(4), 3), Ok(Some(4)));
        assert_eq!(
            check_rotation_request(Some(3 + MAX_ROTATION_AHEAD), 3),
            Ok(Some(11))
        );
        let err = check_rotation_request(Some(u64::MAX), 3).unwrap_err();
        assert!(
            err.contains("generation 18446744073709551615") && err.contains("current generation 3"),
            "{err}"
        );
        assert!(check_rotation_request(Some(u64::MAX), u64::MAX)
            .unwrap()
            .is_none());
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn auto_approve_is_refused_in_kube_mode_before_anything_starts() {
        let cfg = |source: SourceConfig| Config {
            node: "n1".into(),
            source,
            metrics_addr: None,
            error_count: crate::metrics::ErrorCount::default(),
            key_dir: PathBuf::from("/nonexistent/keys"),
            uapi_socket: None,
            tun_name: "veiltest0".into(),
            listen_port: 0,
            mtu: DEFAULT_MTU,
            idle_poll: Duration::ZERO,
            queues: 1,
            resync: Duration::from_secs(1),
            authority_public_key: PathBuf::from("/nonexistent/authority.pub"),
            auto_approve_with: Some(PathBuf::from("/ca")),
            min_key_rotation_interval: MIN_KEY_ROTATION_INTERVAL,
        };
        let kube = cfg(SourceConfig::Kube { kubeconfig: None });
        let err = run(kube, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--auto-approve-with /ca")
                && err.contains("only with the file source")
                && err.contains("veilctl node approve"),
            "{err}"
        );
        let file = cfg(SourceConfig::File {
            dir: PathBuf::from("/c"),
        });
        let approve = auto_approve_dir(&file)
            .unwrap()
            .map(|(p, d)| (p.clone(), d.clone()));
        assert_eq!(approve, Some((PathBuf::from("/ca"), PathBuf::from("/c"))));
    }

    #[test]
    fn session_generation_names_current_or_previous_key() {
        let (cur, prev, old) = ([1; 32], [2; 32], [3; 32]);
        assert_eq!(session_generation(cur, (cur, 5), Some((prev, 4))), Some(5));
        assert_eq!(session_generation(prev, (cur, 5), Some((prev, 4))), Some(4));
        assert_eq!(session_generation(old, (cur, 5), Some((prev, 4))), None);
        assert_eq!(session_generation(prev, (cur, 5), None), None);
    }

    #[test]
    fn rotation_is_due_once_the_key_is_as_old_as_the_interval() {
        use std::time::{Duration, UNIX_EPOCH};
        let created = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert!(!rotation_due(created, created, day));
        assert!(!rotation_due(
            created,
            created + day - Duration::from_secs(1),
            day
        ));
        assert!(rotation_due(created, created + day, day));
        assert!(rotation_due(created, created + 3 * day, day));
        // Clock went back: never due.
        assert!(!rotation_due(created, created - day, day));
    }

    #[test]
    fn rotation_interval_below_the_minimum_is_refused() {
        let min = MIN_KEY_ROTATION_INTERVAL;
        assert_eq!(check_rotation_interval(None, min), Ok(None));
        assert_eq!(check_rotation_interval(Some(min), min), Ok(Some(min)));
        let err = check_rotation_interval(Some(Duration::from_secs(60)), min).unwrap_err();
        assert!(err.contains("spec.keyRotation.interval: 60s"), "{err}");
        assert!(err.contains("minimum of 600s"), "{err}");
        assert_eq!(
            check_rotation_interval(Some(Duration::from_secs(5)), Duration::from_secs(1)),
            Ok(Some(Duration::from_secs(5)))
        );
    }

    #[test]
    fn remote_entries_carve_local_and_peer_cidrs_out_of_the_cluster_range() {
        let mut d = Desired {
            encryption_enabled: true,
            strict: true,
            local_pod_cidrs: vec![net("10.244.1.0/24")],
            cluster_pod_cidrs: vec![net("10.244.0.0/16")],
            ..Default::default()
        };
        d.remote_cidrs.insert(
            net("10.244.2.0/24"),
            RemoteCidr {
                node: "b".into(),
                peer: Some(PublicKey([2; 32])),
            },
        );
        d.remote_cidrs.insert(
            net("10.244.3.0/24"),
            RemoteCidr {
                node: "c".into(),
                peer: None,
            },
        );
        let e = remote_entries(&d);
        assert_eq!(e.len(), 4);
        let cluster = e[&net("10.244.0.0/16")];
        assert!(!cluster.has_peer && !cluster.local);
        assert!(e[&net("10.244.1.0/24")].local);
        let b = e[&net("10.244.2.0/24")];
        assert!(b.has_peer && !b.local && b.node_id == 1);
        let c = e[&net("10.244.3.0/24")];
        assert!(!c.has_peer && !c.local && c.node_id == 2);
    }

    #[test]
    fn a_node_cidr_equal_to_the_cluster_range_wins() {
        let mut d = Desired {
            cluster_pod_cidrs: vec![net("10.244.2.0/24")],
            ..Default::default()
        };
        d.remote_cidrs.insert(
            net("10.244.2.0/24"),
            RemoteCidr {
                node: "b".into(),
                peer: Some(PublicKey([2; 32])),
            },
        );
        assert!(remote_entries(&d)[&net("10.244.2.0/24")].has_peer);
    }

    #[tokio::test]
    async fn identity_step_publishes_before_reconcile_and_collects_unused() {
        use crate::cluster::{ClusterState, PodInfo};
        let dir = tempfile::tempdir().unwrap();
        let mut source = Source::file(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.pods.insert(
            ("prod".into(), "web".into()),
            PodInfo {
                namespace: "prod".into(),
                name: "web".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                node_name: Some("n1".into()),
                pod_ip: None,
                pod_ips: vec![],
                host_network: false,
            },
        );
        let mut step = IdentityAllocator {
            grace: Duration::ZERO,
            ..IdentityAllocator::default()
        };
        step.step(&mut source, &mut state).await;
        // This pass already has the number, and the dir holds it for the others.
        let (&id, key) = state.identities.iter().next().expect("published");
        assert_eq!(key.namespace, "prod");
        let (reread, _) = source.load();
        assert_eq!(reread.identities, state.identities);
        // Still used: kept, however short the grace.
        step.step(&mut source, &mut state).await;
        assert!(state.identities.contains_key(&id));
        // The pod is gone: deleted once unused for the grace period (0 here).
        state.pods.clear();
        step.step(&mut source, &mut state).await;
        assert!(state.identities.is_empty());
        assert!(source.load().0.identities.is_empty());
    }
}
