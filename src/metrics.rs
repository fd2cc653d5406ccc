//! Prometheus metrics (`/metrics`, OpenMetrics text) and health (`/healthz`).
//!
//! The agent loop owns the engine and the BPF maps, so it takes a
//! [`Snapshot`] of everything observable after each pass (every change, and
//! at least every resync period) and stores it in [`Metrics`]; the HTTP
//! server only renders the latest snapshot. A scrape never touches the
//! datapath and can never stall the agent; values are at most one resync
//! period old.
//!
//! Counters are the engine's and the BPF programs' own monotonic counters,
//! exported as they are (a restart of the agent resets them, which
//! Prometheus' `rate()` handles as a counter reset).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, Level};

use crate::datapath::Reason;
use crate::policy::Direction;
use crate::wireguard::EngineCounters;

/// Default `--metrics-addr`: Cilium's agent uses 9962; a node runs one of the two.
pub const DEFAULT_ADDR: &str = "0.0.0.0:9962";
/// `Content-Type` of `/metrics` (OpenMetrics 1.0 text exposition).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A client that has not sent its request headers by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("metrics server: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--metrics-addr `{value}`: expected host:port (e.g. {DEFAULT_ADDR}) or `none`")]
    Addr { value: String },
}

/// Parses `--metrics-addr`: `none` disables the server.
pub fn parse_addr(value: &str) -> Result<Option<SocketAddr>, Error> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| Error::Addr {
        value: value.to_string(),
    })
}

/// One WireGuard peer as exported.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSample {
    /// The peer's node name (or its public key when no node announces it).
    pub node: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Time since the last completed handshake; `None`: none yet.
    pub handshake_age: Option<Duration>,
}

/// Everything `/metrics` and `/healthz` report, as of one agent pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub peers: Vec<PeerSample>,
    pub engine: EngineCounters,
    /// BPF `veil_metrics`: (packets, bytes) per reason; empty if unreadable.
    pub datapath: BTreeMap<Reason, (u64, u64)>,
    /// BPF `veil_policy_drops`, summed per (direction of the failed check, reason).
    pub policy_denied: BTreeMap<(Direction, Reason), u64>,
    /// BPF `veil_policy_allowed`: packets that passed policy, per direction.
    pub policy_allowed: BTreeMap<Direction, u64>,
    /// Errors the agent loop logged since start (each failed applier step).
    pub reconcile_errors: u64,
    /// Objects currently skipped or kept at their last good version, and
    /// kinds currently not listed or failing to watch.
    pub diagnostics: u64,
    /// Generation of this node's WireGuard key.
    pub key_generation: u64,
    /// `VeilClusterConfig` `spec.encryption.enabled` / `strict`, as in force.
    pub encryption_enabled: bool,
    pub strict: bool,
    /// Whether the cluster source has a complete state.
    pub source_synced: bool,
    /// `None` when ready; otherwise why not (the `/healthz` 503 body).
    pub not_ready: Option<String>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            engine: EngineCounters::default(),
            datapath: BTreeMap::new(),
            policy_denied: BTreeMap::new(),
            policy_allowed: BTreeMap::new(),
            reconcile_errors: 0,
            diagnostics: 0,
            key_generation: 0,
            encryption_enabled: false,
            strict: false,
            source_synced: false,
            not_ready: Some("starting".into()),
        }
    }
}

/// The latest snapshot, shared between the agent loop and the server.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<RwLock<Snapshot>>);

impl Metrics {
    pub fn set(&self, snapshot: Snapshot) {
        *self.0.write() = snapshot;
    }

    /// Marks the agent not ready without a pass (startup, fatal error).
    pub fn set_not_ready(&self, why: impl Into<String>) {
        self.0.write().not_ready = Some(why.into());
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.read().clone()
    }
}

/// Counts ERROR events of the agent loop (`veil::agent*` targets): the agent
/// logs every failed applier step at ERROR and retries it next pass, so this
/// is the reconcile error count without threading a counter through every
/// applier. Install it as a `tracing_subscriber` layer; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct ErrorCount(Arc<AtomicU64>);

impl ErrorCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ErrorCount {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() == Level::ERROR && meta.target().starts_with("veil::agent") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

/// A counter family with one label, `key`, one counter per value.
fn counters_by<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: [(&'static str, u64); N],
) {
    let f = counter_family(registry, name, help);
    for (label, n) in values {
        f.get_or_create(&vec![(key, label.into())]).inc_by(n);
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The OpenMetrics text for `s` (ends with `# EOF`).
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("veil");

    // prometheus-client appends `_total` to counter names.
    let rx = counter_family(
        &mut r,
        "peer_rx_bytes",
        "Plaintext bytes received from a WireGuard peer.",
    );
    let tx = counter_family(
        &mut r,
        "peer_tx_bytes",
        "Plaintext bytes sent to a WireGuard peer.",
    );
    let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    r.register(
        "peer_last_handshake_age_seconds",
        "Seconds since the last completed handshake with a peer (absent: none yet).",
        age.clone(),
    );
    for p in &s.peers {
        let l = vec![("peer", p.node.clone())];
        rx.get_or_create(&l).inc_by(p.rx_bytes);
        tx.get_or_create(&l).inc_by(p.tx_bytes);
        if let Some(a) = p.handshake_age {
            age.get_or_create(&l).set(a.as_secs_f64());
        }
    }

    let dropped = counter_family(
        &mut r,
        "dropped_packets",
        "Packets dropped, by component (engine: WireGuard engine, bpf: TC programs) and reason.",
    );
    let e = &s.engine;
    for (reason, n) in [
        ("no_peer", e.dropped_no_peer),
        ("no_endpoint", e.dropped_no_endpoint),
        ("no_session", e.dropped_no_session),
        ("cryptokey", e.dropped_cryptokey),
        ("invalid", e.dropped_invalid),
        ("unknown_peer", e.dropped_unknown_peer),
        ("send_error", e.send_errors),
    ] {
        dropped
            .get_or_create(&vec![
                ("component", "engine".into()),
                ("reason", reason.into()),
            ])
            .inc_by(n);
    }
    let forwarded = counter_family(
        &mut r,
        "datapath_packets",
        "Packets the TC programs steered, by what they did with them (drops are in veil_dropped_packets_total).",
    );
    for (reason, (packets, _bytes)) in &s.datapath {
        let name = reason.as_str();
        if reason.is_drop() {
            let short = name.strip_prefix("drop_").unwrap_or(name);
            dropped
                .get_or_create(&vec![("component", "bpf".into()), ("reason", short.into())])
                .inc_by(*packets);
        } else {
            forwarded
                .get_or_create(&vec![("action", name.into())])
                .inc_by(*packets);
        }
    }

    let verdicts = counter_family(
        &mut r,
        "policy_verdicts",
        "Packets judged by identity policy in the BPF programs, by verdict and direction of the check.",
    );
    for ((direction, reason), n) in &s.policy_denied {
        let dir = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let verdict = match reason {
            Reason::DropPolicyUnencrypted => "denied_unencrypted",
            _ => "denied",
        };
        verdicts
            .get_or_create(&vec![
                ("verdict", verdict.into()),
                ("direction", dir.into()),
            ])
            .inc_by(*n);
    }
    for (direction, n) in &s.policy_allowed {
        verdicts
            .get_or_create(&vec![
                ("verdict", "allowed".into()),
                ("direction", direction.to_string()),
            ])
            .inc_by(*n);
    }

    counters_by(
        &mut r,
        "engine_packets",
        "Packets through the WireGuard engine, by path.",
        "path",
        [
            ("tun_rx", e.tun_rx_packets),
            ("tun_tx", e.tun_tx_packets),
            ("udp_rx", e.udp_rx_datagrams),
            ("udp_tx", e.udp_tx_datagrams),
            ("cookie_reply", e.cookie_replies),
        ],
    );

    let queue_packets = counter_family(
        &mut r,
        "engine_queue_packets",
        "Packets each engine packet queue carried (its own threads and cores): tun_rx read and encrypted, udp_rx received and decrypted.",
    );
    for (q, c) in e.queues.iter().enumerate() {
        for (path, n) in [("tun_rx", c.tun_rx_packets), ("udp_rx", c.udp_rx_datagrams)] {
            queue_packets
                .get_or_create(&vec![("queue", q.to_string()), ("path", path.into())])
                .inc_by(n);
        }
    }

    let p = &e.idle_poll;
    counters_by(
        &mut r,
        "engine_idle_polls",
        "Waits of the engine's packet threads, by how they ended: caught by polling, slept, or polling cut short by preemption.",
        "outcome",
        [
            ("caught", p.caught),
            ("slept", p.slept),
            ("preempted", p.preempted),
        ],
    );
    let polled = Counter::<f64, AtomicU64>::default();
    polled.inc_by(p.polled.as_secs_f64());
    r.register(
        "engine_idle_poll_seconds",
        "Time the engine's packet threads spent polling for the next packet instead of sleeping (yielding to any other runnable task).",
        polled,
    );

    let errors = Counter::<u64>::default();
    errors.inc_by(s.reconcile_errors);
    r.register(
        "reconcile_errors",
        "Failed applier steps in the agent loop (each is retried on the next pass).",
        errors,
    );
    gauge(
        &mut r,
        "diagnostics",
        "Cluster objects currently skipped or kept at their last good version, plus kinds not listed or failing to watch.",
        saturating_i64(s.diagnostics),
    );
    gauge(
        &mut r,
        "key_generation",
        "Generation of this node's WireGuard key.",
        saturating_i64(s.key_generation),
    );
    gauge(
        &mut r,
        "encryption_enabled",
        "1 when the cluster config enables encryption.",
        i64::from(s.encryption_enabled),
    );
    gauge(
        &mut r,
        "encryption_strict",
        "1 when strict mode is on (never plaintext to a remote pod).",
        i64::from(s.strict),
    );
    gauge(
        &mut r,
        "source_synced",
        "1 once the cluster source has a complete state.",
        i64::from(s.source_synced),
    );
    gauge(
        &mut r,
        "ready",
        "1 when /healthz answers 200.",
        i64::from(s.not_ready.is_none()),
    );

    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in
    // the metric definitions above, which the unit tests render.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
        tracing::error!("rendering metrics: {e}");
    }
    out
}

/// `/healthz`: 200 and `ok`, or 503 and the reason.
pub fn health(s: &Snapshot) -> (StatusCode, String) {
    match &s.not_ready {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Routes one request; anything but `GET|HEAD /metrics` and `/healthz` is refused.
pub fn route(method: &Method, path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
    }
    match path {
        "/metrics" => respond(StatusCode::OK, CONTENT_TYPE, render(&metrics.snapshot())),
        "/healthz" => {
            let (status, body) = health(&metrics.snapshot());
            respond(status, "text/plain; charset=utf-8", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics or /healthz\n".into(),
        ),
    }
}

/// Binds `addr` (so a bad address fails the agent at start, naming it) and
/// serves HTTP/1.1 on it until the returned task is aborted.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<JoinHandle<()>, Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!("metrics server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = route(req.method(), req.uri().path(), &metrics);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(%peer, "metrics connection: {e}");
                }
            });
        }
    }))
}

#[cfg(test)]
mod tests;
