use super::*;

fn sample() -> Snapshot {
    let mut s = Snapshot {
        peers: vec![
            PeerSample {
                node: "n2".into(),
                rx_bytes: 1234,
                tx_bytes: 5678,
                handshake_age: Some(Duration::from_millis(2500)),
            },
            PeerSample {
                node: "n3".into(),
                rx_bytes: 0,
                tx_bytes: 0,
                handshake_age: None,
            },
        ],
        engine: EngineCounters {
            dropped_no_peer: 3,
            dropped_invalid: 4,
            tun_rx_packets: 10,
            idle_poll: crate::wireguard::idle_poll::Stats {
                caught: 12,
                slept: 30,
                preempted: 1,
                polled: Duration::from_millis(250),
            },
            queues: vec![
                crate::wireguard::QueueCounters {
                    tun_rx_packets: 6,
                    udp_rx_datagrams: 1,
                },
                crate::wireguard::QueueCounters {
                    tun_rx_packets: 4,
                    udp_rx_datagrams: 0,
                },
            ],
            ..EngineCounters::default()
        },
        reconcile_errors: 2,
        diagnostics: 5,
        key_generation: 7,
        encryption_enabled: true,
        strict: true,
        source_synced: true,
        not_ready: None,
        ..Snapshot::default()
    };
    s.datapath.insert(Reason::ForwardedToTun, (11, 1100));
    s.datapath.insert(Reason::DropNoPeer, (6, 600));
    s.datapath.insert(Reason::DropPolicy, (8, 800));
    s.policy_denied
        .insert((Direction::Ingress, Reason::DropPolicy), 8);
    s.policy_denied
        .insert((Direction::Egress, Reason::DropPolicyUnencrypted), 1);
    s.policy_allowed.insert(Direction::Ingress, 40);
    s.policy_allowed.insert(Direction::Egress, 41);
    s
}

/// The value of the one sample line starting with `series ` (name and labels).
fn value(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_string)
}

#[test]
fn renders_every_metric_with_its_labels_and_value() {
    let text = render(&sample());
    let want = [
        ("veil_peer_rx_bytes_total{peer=\"n2\"}", "1234"),
        ("veil_peer_tx_bytes_total{peer=\"n2\"}", "5678"),
        ("veil_peer_rx_bytes_total{peer=\"n3\"}", "0"),
        ("veil_peer_last_handshake_age_seconds{peer=\"n2\"}", "2.5"),
        (
            "veil_dropped_packets_total{component=\"engine\",reason=\"no_peer\"}",
            "3",
        ),
        (
            "veil_dropped_packets_total{component=\"engine\",reason=\"invalid\"}",
            "4",
        ),
        (
            "veil_dropped_packets_total{component=\"bpf\",reason=\"no_peer\"}",
            "6",
        ),
        (
            "veil_dropped_packets_total{component=\"bpf\",reason=\"policy\"}",
            "8",
        ),
        (
            "veil_datapath_packets_total{action=\"forwarded_to_tun\"}",
            "11",
        ),
        (
            "veil_policy_verdicts_total{verdict=\"denied\",direction=\"ingress\"}",
            "8",
        ),
        (
            "veil_policy_verdicts_total{verdict=\"denied_unencrypted\",direction=\"egress\"}",
            "1",
        ),
        (
            "veil_policy_verdicts_total{verdict=\"allowed\",direction=\"ingress\"}",
            "40",
        ),
        (
            "veil_policy_verdicts_total{verdict=\"allowed\",direction=\"egress\"}",
            "41",
        ),
        ("veil_engine_packets_total{path=\"tun_rx\"}", "10"),
        ("veil_engine_idle_polls_total{outcome=\"caught\"}", "12"),
        ("veil_engine_idle_polls_total{outcome=\"preempted\"}", "1"),
        ("veil_engine_idle_poll_seconds_total", "0.25"),
        (
            "veil_engine_queue_packets_total{queue=\"0\",path=\"tun_rx\"}",
            "6",
        ),
        (
            "veil_engine_queue_packets_total{queue=\"1\",path=\"tun_rx\"}",
            "4",
        ),
        (
            "veil_engine_queue_packets_total{queue=\"1\",path=\"udp_rx\"}",
            "0",
        ),
        ("veil_reconcile_errors_total", "2"),
        ("veil_diagnostics", "5"),
        ("veil_key_generation", "7"),
        ("veil_encryption_enabled", "1"),
        ("veil_encryption_strict", "1"),
        ("veil_source_synced", "1"),
        ("veil_ready", "1"),
    ];
    for (series, v) in want {
        assert_eq!(
            value(&text, series).as_deref(),
            Some(v),
            "{series} in:\n{text}"
        );
    }
    // No handshake yet: no age sample (a 0 would claim a fresh handshake).
    assert!(
        value(&text, "veil_peer_last_handshake_age_seconds{peer=\"n3\"}").is_none(),
        "{text}"
    );
    assert!(text.contains("# TYPE veil_peer_rx_bytes counter"), "{text}");
    assert!(text.contains("# TYPE veil_diagnostics gauge"), "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {text}"
    );
}

#[test]
fn not_ready_shows_in_the_gauges_and_healthz() {
    let mut s = sample();
    s.not_ready = Some("kube source not synced".into());
    s.source_synced = false;
    s.encryption_enabled = false;
    let text = render(&s);
    assert_eq!(value(&text, "veil_ready").as_deref(), Some("0"));
    assert_eq!(value(&text, "veil_source_synced").as_deref(), Some("0"));
    assert_eq!(
        value(&text, "veil_encryption_enabled").as_deref(),
        Some("0")
    );
    let (code, body) = health(&s);
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "not ready: kube source not synced\n");
    s.not_ready = None;
    assert_eq!(health(&s), (StatusCode::OK, "ok\n".to_string()));
    assert_eq!(
        health(&Snapshot::default()).0,
        StatusCode::SERVICE_UNAVAILABLE,
        "a fresh agent is not ready"
    );
}

#[test]
fn label_values_are_escaped() {
    let mut s = Snapshot::default();
    s.peers.push(PeerSample {
        node: "we\"ird\\n".into(),
        rx_bytes: 1,
        tx_bytes: 1,
        handshake_age: None,
    });
    let text = render(&s);
    assert!(
        text.contains(r#"veil_peer_rx_bytes_total{peer="we\"ird\\n"} 1"#),
        "{text}"
    );
}

#[test]
fn routes_metrics_healthz_and_refuses_the_rest() {
    let m = Metrics::default();
    let r = route(&Method::GET, "/healthz", &m);
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    m.set(sample());
    assert_eq!(route(&Method::GET, "/healthz", &m).status(), StatusCode::OK);
    let r = route(&Method::GET, "/metrics", &m);
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some(CONTENT_TYPE)
    );
    assert_eq!(route(&Method::GET, "/", &m).status(), StatusCode::NOT_FOUND);
    assert_eq!(
        route(&Method::POST, "/metrics", &m).status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    m.set_not_ready("engine stopped");
    assert_eq!(
        route(&Method::GET, "/healthz", &m).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn metrics_addr_parses_or_names_the_bad_value() {
    assert_eq!(parse_addr("none").unwrap(), None);
    assert_eq!(
        parse_addr(DEFAULT_ADDR).unwrap(),
        Some("0.0.0.0:9962".parse().unwrap())
    );
    assert_eq!(
        parse_addr("[::1]:9000").unwrap(),
        Some("[::1]:9000".parse().unwrap())
    );
    let err = parse_addr("localhost").unwrap_err().to_string();
    assert!(err.contains("`localhost`"), "{err}");
}

#[test]
fn error_count_counts_agent_errors_only() {
    use tracing_subscriber::layer::SubscriberExt;
    let count = ErrorCount::default();
    let subscriber = tracing_subscriber::registry().with(count.clone());
    tracing::subscriber::with_default(subscriber, || {
        tracing::error!(target: "veil::agent", "applying the datapath failed");
        tracing::error!(target: "veil::agent::observe", "another");
        tracing::warn!(target: "veil::agent", "only a warning");
        tracing::error!(target: "veil::wireguard", "not the agent loop");
    });
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn serves_over_http() {
    let m = Metrics::default();
    m.set(sample());
    // A free port on loopback of the namespace the unit tests run in: no
    // address is added and nothing leaves the host.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let task = serve(addr, m).await.unwrap();
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("veil_peer_tx_bytes_total{peer=\"n2\"} 5678"),
        "{text}"
    );
    let err = serve(addr, Metrics::default()).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    task.abort();
}
