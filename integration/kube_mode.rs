//! `veil-agent` in Kubernetes mode against a canned API server, and the
//! metrics endpoint of agents carrying traffic.
//!
//! The API server is a tiny HTTP/1.1 server in this test process, listening
//! on 127.0.0.1 inside the node's namespace: it answers the initial lists
//! with canned objects (among them the node's `VeilNodeCertificate`, signed
//! by the test's authority as `veilctl node approve` would), holds every
//! watch open without events, and records every request (so the test sees
//! the agent's server-side apply of its signed `VeilNode`). It is not Kubernetes; it checks what the agent asks and does
//! with the answers.
//!
//! Run as root: `cargo test --test kube_mode -- --test-threads=1`.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::agent::{AGENT_BIN, VEILCTL_BIN};
use harness::fixture::Fixture;
use harness::netns::{require_root, unique_prefix, Netns};
use harness::poll_until;
use harness::process::Bg;
use harness::traffic::{canary, tcp};
use serde_json::{json, Value};

/// Veil's routing table (`netlink::fallback::TABLE`, 0x5e11).
const VEIL_TABLE: &str = "24081";
const METRICS_PORT: u16 = 9962;
const NODE: &str = "n1";

/// One request the fake API server received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query.
    target: String,
    body: Option<Value>,
}

/// The canned API server. Dropping it stops it and closes every connection.
struct FakeApi {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Serves on `listener` (bound inside the node namespace).
    /// `certificates` is served as the `veilnodecertificates` list.
    fn start(listener: TcpListener, certificates: Vec<Value>) -> Self {
        let certificates = Arc::new(certificates);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
                            let certs = Arc::clone(&certificates);
                            conns.push(std::thread::spawn(move || {
                                serve_conn(stream, &seen, &stop, &certs)
                            }));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("fake API server accept: {e}"),
                    }
                }
                drop(listener);
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn list_items(
    path: &str,
    certificates: &[Value],
) -> Option<(&'static str, &'static str, Vec<Value>)> {
    Some(match path {
        "/api/v1/nodes" => (
            "v1",
            "NodeList",
            vec![json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE, "resourceVersion": "1", "uid": "u-n1"},
                "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.1"}]},
            })],
        ),
        "/api/v1/pods" => ("v1", "PodList", vec![]),
        "/api/v1/namespaces" => ("v1", "NamespaceList", vec![]),
        "/apis/veil.dev/v1alpha1/veilnodes" => ("veil.dev/v1alpha1", "VeilNodeList", vec![]),
        "/apis/veil.dev/v1alpha1/veilidentities" => {
            ("veil.dev/v1alpha1", "VeilIdentityList", vec![])
        }
        "/apis/networking.k8s.io/v1/networkpolicies" => {
            ("networking.k8s.io/v1", "NetworkPolicyList", vec![])
        }
        "/apis/veil.dev/v1alpha1/veilpolicies" => ("veil.dev/v1alpha1", "VeilPolicyList", vec![]),
        "/apis/veil.dev/v1alpha1/veilnodecertificates" => (
            "veil.dev/v1alpha1",
            "VeilNodeCertificateList",
            certificates.to_vec(),
        ),
        "/apis/veil.dev/v1alpha1/veilkeyrotations" => {
            ("veil.dev/v1alpha1", "VeilKeyRotationList", vec![])
        }
        "/apis/veil.dev/v1alpha1/veilclusterconfigs" => (
            "veil.dev/v1alpha1",
            "VeilClusterConfigList",
            vec![json!({
                "apiVersion": "veil.dev/v1alpha1", "kind": "VeilClusterConfig",
                "metadata": {"name": "default", "resourceVersion": "1", "uid": "u-cfg"},
                "spec": {"encryption": {"enabled": true, "strict": true}, "clusterPodCIDRs": ["10.244.0.0/16"]},
            })],
        ),
        _ => return None,
    })
}

fn write_json(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).expect("JSON");
    let reason = if code == 200 { "OK" } else { "Error" };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)
}

/// Reads one request (headers, then a Content-Length or chunked body).
fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut len, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some((method, target, body))
}

fn serve_conn(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    stop: &AtomicBool,
    certificates: &[Value],
) {
    // Short reads so a stopped server closes idle keep-alive connections.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while !stop.load(Ordering::SeqCst) {
        // Wait for the next request without consuming it.
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(5)));
        let Some((method, target, body)) = read_request(&mut reader) else {
            return;
        };
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let body_json = serde_json::from_slice::<Value>(&body).ok();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
            method: method.clone(),
            target: target.clone(),
            body: body_json.clone(),
        });
        let path = target.split('?').next().unwrap_or("").to_string();
        let watch = target.contains("watch=true");
        let result = match (method.as_str(), list_items(&path, certificates)) {
            ("GET", Some(_)) if watch => {
                // Headers only, then silence until the server stops: the
                // watch stays open and never sends an event.
                let r = out.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                if r.is_ok() {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                return;
            }
            ("GET", Some((api_version, kind, items))) => write_json(
                &mut out,
                200,
                &json!({"apiVersion": api_version, "kind": kind,
                        "metadata": {"resourceVersion": "1"}, "items": items}),
            ),
            ("PATCH", _) if path.starts_with("/apis/veil.dev/v1alpha1/veilnodes/") => {
                // Server-side apply answers with the object as stored.
                write_json(&mut out, 200, &body_json.unwrap_or(json!({})))
            }
            _ => write_json(
                &mut out,
                404,
                &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": format!("fake: {method} {path}")}),
            ),
        };
        if result.is_err() {
            return;
        }
    }
}

/// `GET path` on the agent's metrics port inside `ns`: (status, body).
fn http_get(ns: &Netns, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(
            &([127, 0, 0, 1], METRICS_PORT).into(),
            Duration::from_secs(2),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: veil\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    })
}

/// The value of the sample `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Veil's routing table; empty while it does not exist (nothing programmed).
fn veil_table(ns: &Netns) -> String {
    let out = ns.exec(&["ip", "route", "show", "table", VEIL_TABLE]);
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("FIB table does not exist") {
        return String::new();
    }
    assert!(
        out.status.success(),
        "ip route show table {VEIL_TABLE}: {err}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubeconfig(path: &Path, port: u16) {
    let text = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
         users: [{{name: fake, user: {{token: test-token}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
         current-context: fake\n"
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

/// Starts the agent in kube mode. Returns it and the node's
/// `VeilNodeCertificate` (as `veilctl node approve` applies it) for the
/// fake API server to serve: the identity key is created in the key dir
/// first, as the agent would on its first start, and certified with a
/// fresh authority. No `--auto-approve-with`: kube mode refuses it.
fn start_agent(ns: &Netns, work: &Path, kubeconfig: &Path) -> (Bg, Value) {
    let ca = work.join("ca");
    let out = std::process::Command::new(VEILCTL_BIN)
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .output()
        .expect("run veilctl ca init");
    assert!(out.status.success(), "veilctl ca init: {out:?}");
    let keys = work.join("keys");
    let identity = keymgr::KeyStore::new(&keys)
        .load_or_generate_identity()
        .expect("node identity key")
        .key
        .public_key();
    let authority = veil::cluster::trust::load_authority(&ca).expect("authority key");
    let now = keymgr::unix_now();
    let cert = authority
        .certify(NODE, identity, now - 60, now + 3600)
        .expect("certify");
    let mut cert_obj =
        serde_json::to_value(veil::cluster::trust::CertificateObject::new(&cert)).expect("JSON");
    cert_obj["metadata"]["resourceVersion"] = json!("1");
    let mut cmd = ns.cmd(AGENT_BIN);
    cmd.args(["--node", NODE])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--key-dir")
        .arg(&keys)
        .arg("--uapi-socket")
        .arg(format!("/var/run/wireguard/{}.sock", ns.name()))
        .args(["--tun-name", "veil0", "--resync-ms", "300"])
        .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
        .arg("--authority-public-key")
        .arg(ca.join("authority.pub"))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,veil=debug");
    (
        Bg::spawn("veil-agent (kube)", cmd, &work.join("agent.log")),
        cert_obj,
    )
}

/// Polls `f` for up to 30 s; panics with `what` and the agent log otherwise.
fn wait<T>(agent: &Bg, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_until(Duration::from_secs(30), Duration::from_millis(100), f)
        .unwrap_or_else(|| panic!("timed out waiting for {what}; agent log:\n{}", agent.log()))
}

#[test]
fn kube_mode_programs_only_once_synced_and_keeps_state_without_the_api_server() {
    require_root();
    let ns = Netns::new(format!("{}k", unique_prefix()));
    let work = tempfile::Builder::new()
        .prefix("veil-kube-")
        .tempdir()
        .expect("work dir");
    // A port free in the fresh namespace; nothing listens on it until the
    // fake server starts, so the agent first gets "connection refused".
    let port = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind probe");
        l.local_addr().expect("local addr").port()
    });
    let kc = work.path().join("kubeconfig");
    kubeconfig(&kc, port);
    let (mut agent, certificate) = start_agent(&ns, work.path(), &kc);

    // 1. No API server: up, not ready, nothing programmed.
    // The first pass (after startup's "starting") names what is missing.
    let (_, body) = wait(&agent, "/healthz 503: not synced", || {
        http_get(&ns, "/healthz").filter(|(c, b)| *c == 503 && b.contains("kube source not synced"))
    });
    assert!(
        body.contains("Node: "),
        "names the kinds not listed: {body}"
    );
    // Several failed list attempts (with backoff) must pass before we judge.
    wait(&agent, "repeated failed watches", || {
        (agent.log().matches("kube watch failed").count() >= 10).then_some(())
    });
    assert!(agent.is_running(), "agent died:\n{}", agent.log());
    assert_eq!(
        veil_table(&ns).trim(),
        "",
        "programmed routes from an unsynced state"
    );
    let rules = ns.exec_ok(&["ip", "rule", "show"]);
    assert!(
        !rules.contains(&format!("lookup {VEIL_TABLE}")) && !rules.contains("lookup 0x5e11"),
        "added Veil's rule from an unsynced state: {rules}"
    );
    let (_, metrics) = http_get(&ns, "/metrics").expect("scrape");
    assert_eq!(
        sample(&metrics, "veil_source_synced"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "veil_ready"), Some(0.0), "{metrics}");
    assert!(
        !agent.log().contains("announced this node"),
        "announced without a synced state:\n{}",
        agent.log()
    );

    // 2. The API server appears: synced, VeilNode applied, ready, programmed.
    let listener = ns.run(move || TcpListener::bind(("127.0.0.1", port)).expect("bind fake API"));
    let api = FakeApi::start(listener, vec![certificate.clone()]);
    let apply = wait(&agent, "the VeilNode apply", || {
        api.seen().into_iter().find(|s| {
            s.method == "PATCH"
                && s.target
                    .starts_with(&format!("/apis/veil.dev/v1alpha1/veilnodes/{NODE}?"))
        })
    });
    // Signed at once: the certificate came with the first synced state.
    let spec = &apply.body.as_ref().expect("apply body is JSON")["spec"];
    assert_eq!(spec["signer"], "Node", "{spec}");
    assert_eq!(
        spec["certificate"], certificate["spec"]["certificate"],
        "the announcement carries the VeilNodeCertificate served by the API"
    );
    assert!(spec["signature"].is_string(), "{spec}");
    assert!(
        apply.target.contains("fieldManager=veil-agent") && apply.target.contains("force=true"),
        "not a forced server-side apply: {}",
        apply.target
    );
    let body = apply.body.expect("apply body is JSON");
    assert_eq!(body["kind"], "VeilNode", "{body}");
    assert_eq!(body["metadata"]["name"], NODE, "{body}");
    assert_eq!(body["spec"]["podCIDRs"], json!(["10.244.1.0/24"]), "{body}");
    assert!(
        body["spec"]["publicKey"]
            .as_str()
            .is_some_and(|k| k.len() == 44),
        "{body}"
    );
    wait(&agent, "the VeilNode status patch", || {
        api.seen().into_iter().find(|s| {
            s.method == "PATCH"
                && s.target
                    .starts_with(&format!("/apis/veil.dev/v1alpha1/veilnodes/{NODE}/status?"))
        })
    });
    wait(&agent, "/healthz 200", || {
        http_get(&ns, "/healthz").filter(|(c, _)| *c == 200)
    });
    let table = wait(
        &agent,
        "strict-mode blackhole for the cluster range",
        || {
            let t = veil_table(&ns);
            t.contains("blackhole 10.244.0.0/16").then_some(t)
        },
    );
    let (_, metrics) = http_get(&ns, "/metrics").expect("scrape");
    assert_eq!(
        sample(&metrics, "veil_source_synced"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "veil_encryption_enabled"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "veil_encryption_strict"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "veil_key_generation"),
        Some(1.0),
        "{metrics}"
    );

    // veilctl without --cluster-dir reads the same API: one list per kind.
    let veilctl = |args: &[&str]| {
        let mut c = ns.cmd(VEILCTL_BIN);
        c.arg("--kubeconfig").arg(&kc).args(args);
        c.output().expect("run veilctl")
    };
    let before = api.seen().len();
    let out = veilctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "veilctl status: {out:?}");
    assert!(
        text.contains("encryption: enabled  strict: on  cluster pod CIDRs: 10.244.0.0/16")
            && text
                .lines()
                .any(|l| l.starts_with(NODE) && l.contains("10.244.1.0/24")),
        "{text}"
    );
    for kind in ["veilnodecertificates", "veilkeyrotations", "veilidentities"] {
        assert!(
            api.seen()[before..].iter().any(|s| s.method == "GET"
                && s.target.split('?').next()
                    == Some(format!("/apis/veil.dev/v1alpha1/{kind}").as_str())
                && !s.target.contains("watch=true")),
            "veilctl did not list {kind}"
        );
    }
    // The fake server keeps no VeilNode (applies are only echoed): refused
    // before anything is written.
    let out = veilctl(&["keys", "rotate", "--node", NODE]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("n1 is not a Veil node with an announcement"),
        "{out:?}"
    );
    assert!(
        !api.seen()
            .iter()
            .any(|s| s.target.contains("veilkeyrotations/")),
        "a rotation request was written"
    );

    // 3. The API server goes away: the last good state stays in force.
    drop(api);
    wait(&agent, "watch failures after the API server left", || {
        let (_, m) = http_get(&ns, "/metrics")?;
        (sample(&m, "veil_diagnostics")? >= 1.0).then_some(())
    });
    let failures = agent.log().matches("kube watch failed").count();
    wait(&agent, "more failed watches", || {
        (agent.log().matches("kube watch failed").count() >= failures + 5).then_some(())
    });
    assert_eq!(
        veil_table(&ns),
        table,
        "routes changed while the API server was away"
    );
    let (code, body) = http_get(&ns, "/healthz").expect("healthz");
    assert_eq!(
        code, 200,
        "an outage after sync keeps the agent ready: {body}"
    );
    assert!(agent.is_running(), "agent died:\n{}", agent.log());
    agent.stop(Duration::from_secs(5));
}

#[test]
fn metrics_show_per_peer_bytes_growing_with_traffic() {
    require_root();
    let mut f = Fixture::new(2, 1, true, true);
    f.start_agents(&[1, 2], 0);
    let peer = f.topo.node(2).name.clone();
    let series_tx = format!("veil_peer_tx_bytes_total{{peer=\"{peer}\"}}");
    let series_rx = format!("veil_peer_rx_bytes_total{{peer=\"{peer}\"}}");
    let scrape = |f: &Fixture| {
        let (code, text) = http_get(&f.topo.node(1).ns, "/metrics").expect("scrape node 1");
        assert_eq!(code, 200, "{text}");
        text
    };
    let before = scrape(&f);
    let tx0 = sample(&before, &series_tx).unwrap_or_else(|| panic!("{series_tx} in:\n{before}"));
    let rx0 = sample(&before, &series_rx).unwrap_or_else(|| panic!("{series_rx} in:\n{before}"));

    let c = canary("metrics");
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let r = tcp(a, b.ip, 200_000, &c, Duration::from_secs(20));
    assert!(r.ok, "tcp {} -> {}: {}", a.name, b.ip, r.output);

    // The snapshot is taken every resync (2 s); wait for one after the traffic.
    let after = poll_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let t = scrape(&f);
        (sample(&t, &series_tx)? >= tx0 + 200_000.0).then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "{series_tx} did not grow by 200000 from {tx0}:\n{}",
            scrape(&f)
        )
    });
    assert!(
        sample(&after, &series_rx).is_some_and(|rx| rx > rx0),
        "{series_rx} did not grow from {rx0}:\n{after}"
    );
    let age_series = format!("veil_peer_last_handshake_age_seconds{{peer=\"{peer}\"}}");
    let age = sample(&after, &age_series).unwrap_or_else(|| panic!("{age_series} in:\n{after}"));
    assert!((0.0..180.0).contains(&age), "handshake age {age}");
    assert_eq!(
        sample(&after, "veil_encryption_enabled"),
        Some(1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "veil_datapath_packets_total{action=\"forwarded_to_tun\"}"
        )
        .is_some_and(|n| n > 0.0),
        "{after}"
    );
    let (code, body) = http_get(&f.topo.node(1).ns, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    f.assert_agents_alive();
}
