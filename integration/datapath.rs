//! End-to-end datapath tests: a cluster of network namespaces, real `veil-agent`s,
//! traffic between pods, and a capture on every underlay port proving that nothing but
//! WireGuard crossed it. Each test builds its own cluster (see integration/README.md).
//!
//! Run as root: `cargo test --test datapath -- --test-threads=1`.

mod harness;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use harness::cluster::{node_object, pod_object, ClusterDir};
use harness::fixture::Fixture;
use harness::netns::require_root;
use harness::poll_until;
use harness::process::Bg;
use harness::topology::{Pod, POD_NAMESPACE, WG_PORT};
use harness::traffic::{
    self, canary, matrix, parse_ping, ping, tcp, udp, udp_sized, wait_reachable, warm_up,
    MatrixSpec,
};
use harness::wggo::WireguardGo;
use serde_json::json;

/// A continuous `ping` in the background (bounded by `-w`), for "while traffic flows".
fn background_ping(from: &Pod, to: Ipv4Addr, secs: u32, work: &std::path::Path) -> Bg {
    let mut cmd = from.ns.cmd("ping");
    cmd.args([
        "-n",
        "-i",
        "0.2",
        "-W",
        "1",
        "-w",
        &secs.to_string(),
        &to.to_string(),
    ]);
    let log = work.join(format!("ping-{}-{to}.log", from.name));
    Bg::spawn(format!("ping {} -> {to}", from.name), cmd, &log)
}

/// Stops a background ping (SIGINT makes it print its summary) and parses the summary.
fn finish_ping(mut bg: Bg) -> traffic::PingResult {
    bg.signal(libc::SIGINT);
    let done = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        bg.try_status()
    });
    if done.is_none() {
        bg.kill();
    }
    parse_ping(&bg.log())
}

#[test]
fn positive_control_plaintext_is_caught() {
    require_root();
    // No agents and encryption off: the host-gw routes carry pod traffic in the clear.
    let f = Fixture::new(2, 2, false, false);
    let canary = canary("control");
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let cap = f.capture();

    let p = ping(a, b.ip, 3, 56);
    assert!(p.all_ok(), "ping over host-gw failed: {}", p.output);
    let t = tcp(a, b.ip, 200_000, &canary, Duration::from_secs(10));
    assert!(t.ok, "tcp over host-gw failed: {}", t.output);
    let u = udp(b, a.ip, 20, &canary, Duration::from_secs(2));
    assert!(u.ok, "udp over host-gw failed: {}", u.output);

    // The topology itself connects every pod to every other (same node and across
    // nodes), so a failure in the tests below is Veil's, not the harness's.
    let pods: Vec<&Pod> = f.topo.pods.iter().collect();
    let spec = MatrixSpec {
        canary: &canary,
        pings: 1,
        tcp_bytes: 16 * 1024,
        udp_count: 5,
    };
    matrix(&pods, spec).assert_ok("pod matrix over host-gw");

    let r = f.finish(cap, &canary);
    // The capture must be able to fail: here it sees everything the tests below
    // require it never to see.
    assert!(r.canary_frames > 0, "canary not caught in plaintext:\n{r}");
    assert!(r.pod_addr_outer_count > 0, "pod addresses not caught:\n{r}");
    assert!(r.other_count > 0, "non-WireGuard traffic not caught:\n{r}");
    assert_eq!(r.wireguard, 0, "no WireGuard expected without agents:\n{r}");
    assert!(!r.is_clean());
    // Both directions were seen on both ports (captures on every bridge port).
    for port in f.topo.bridge_ports() {
        assert!(
            r.per_port.get(&port).copied().unwrap_or(0) > 0,
            "nothing captured on {port}:\n{r}"
        );
    }
}

#[test]
fn encrypted_matrix_3x2() {
    require_root();
    let mut f = Fixture::new(3, 2, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("matrix");
    let cap = f.capture();

    let firsts: Vec<&Pod> = (1..=3).map(|i| f.topo.pod(i, 0)).collect();
    warm_up(
        &[
            (firsts[0], firsts[1]),
            (firsts[0], firsts[2]),
            (firsts[1], firsts[2]),
        ],
        &canary,
    );
    let pods: Vec<&Pod> = f.topo.pods.iter().collect();
    let spec = MatrixSpec {
        canary: &canary,
        pings: 2,
        tcp_bytes: 64 * 1024,
        udp_count: 10,
    };
    let m = matrix(&pods, spec);
    m.assert_ok("pod matrix with encryption");
    let r = f.finish(cap, &canary);
    r.assert_clean("pod matrix with encryption");

    // Each agent: one peer per other node, keys and AllowedIPs from the announcements,
    // a recent handshake.
    let mut before = Vec::new();
    for a in &f.agents {
        let d = a.wg_dump().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.peers.len(), 2, "{}: {}", a.node, a.wg_show());
        for n in &f.topo.nodes {
            if n.name == a.node {
                continue;
            }
            let ann = f
                .dir
                .announcement(&n.name)
                .unwrap_or_else(|| panic!("no announcement for {}", n.name));
            let peer = d.peer(&ann.public_key).unwrap_or_else(|| {
                panic!("{} has no peer for {}: {}", a.node, n.name, a.wg_show())
            });
            assert!(
                peer.allowed_ips.contains(&n.pod_cidr),
                "{}: peer {} allowed-ips {:?} lack {}",
                a.node,
                n.name,
                peer.allowed_ips,
                n.pod_cidr
            );
            let age = peer.handshake_age();
            assert!(
                age.is_some_and(|age| age < Duration::from_secs(120)),
                "{}: peer {} handshake age {age:?}: {}",
                a.node,
                n.name,
                a.wg_show()
            );
            before.push((
                a.node.clone(),
                ann.public_key.clone(),
                peer.rx_bytes,
                peer.tx_bytes,
            ));
        }
    }

    // More traffic between every pair of nodes: every counter must grow.
    for from in &firsts {
        for to in &firsts {
            if from.node != to.node {
                let t = tcp(from, to.ip, 32 * 1024, &canary, Duration::from_secs(10));
                assert!(t.ok, "tcp {} -> {}: {}", from.label(), to.label(), t.output);
            }
        }
    }
    for (node, key, rx, tx) in before {
        let a = f
            .agents
            .iter()
            .find(|a| a.node == node)
            .expect("agent exists");
        let grew = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            let d = a.wg_dump().ok()?;
            let p = d.peer(&key)?;
            (p.rx_bytes > rx && p.tx_bytes > tx).then_some(())
        });
        assert!(
            grew.is_some(),
            "{node}: transfer counters for peer {key} did not grow from rx={rx} tx={tx}: {}",
            a.wg_show()
        );
    }
    f.assert_agents_alive();
}

#[test]
fn interop_wireguard_go() {
    require_root();
    // Nodes 1-3 run Veil; node 4 runs stock wireguard-go.
    let mut f = Fixture::new(4, 1, true, true);
    let n4 = f.topo.node(4);
    let iface = format!("{}wg", f.topo.prefix);
    let wg = WireguardGo::start(n4, &iface, WG_PORT, f.work());
    // Node 4 is not a cluster node but an external machine: no Node object,
    // an announcement signed by the cluster authority (`veilctl peer add`).
    f.dir.remove_node(&n4.name);
    let endpoint = format!("{}:{WG_PORT}", n4.underlay_ip);
    f.veilctl_ok(&[
        "peer",
        "add",
        &n4.name,
        "--public-key",
        &wg.public_key,
        "--endpoint",
        &endpoint,
        "--allowed-ips",
        &n4.pod_cidr,
        "--ca",
        &f.ca().display().to_string(),
    ]);
    f.start_agents(&[1, 2, 3], 1);

    // Configure wireguard-go from what the Veil agents announced, as an operator would.
    let n4 = f.topo.node(4);
    for i in 1..=3 {
        let n = f.topo.node(i);
        let ann = f
            .dir
            .announcement(&n.name)
            .unwrap_or_else(|| panic!("no announcement for {}", n.name));
        let endpoint = ann
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("{}:{}", n.underlay_ip, ann.listen_port));
        wg.set_peer(n4, &ann.public_key, &endpoint, &ann.pod_cidrs);
        for cidr in &ann.pod_cidrs {
            // Replaces the host-gw route: node 4 sends these through WireGuard.
            n4.ns
                .exec_ok(&["ip", "route", "replace", cidr, "dev", &iface]);
        }
    }

    let canary = canary("interop");
    let cap = f.capture();
    let theirs = f.topo.pod(4, 0);
    let ours: Vec<&Pod> = (1..=3).map(|i| f.topo.pod(i, 0)).collect();
    for p in &ours {
        warm_up(&[(theirs, p)], &canary);
    }
    let mut failures = Vec::new();
    for p in &ours {
        for (from, to) in [(theirs, *p), (*p, theirs)] {
            let pair = format!("{} -> {}", from.label(), to.label());
            let pg = ping(from, to.ip, 3, 56);
            if !pg.all_ok() {
                failures.push(format!("ping {pair}: {}", pg.output));
            }
            let t = tcp(from, to.ip, 256 * 1024, &canary, Duration::from_secs(10));
            if !t.ok {
                failures.push(format!("tcp {pair}: {}", t.output));
            }
            let u = udp(from, to.ip, 20, &canary, Duration::from_secs(2));
            if !u.ok {
                failures.push(format!("udp {pair}: {}", u.output));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "interop failures:\n{}",
        failures.join("\n")
    );
    let r = f.finish(cap, &canary);
    r.assert_clean("Veil <-> wireguard-go");

    let d = wg.dump().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.peers.len(), 3, "wireguard-go peers: {d:?}");
    for p in &d.peers {
        assert!(
            p.latest_handshake.is_some() && p.rx_bytes > 0 && p.tx_bytes > 0,
            "wireguard-go peer {} never exchanged data: {p:?}",
            p.public_key
        );
    }
    for a in &f.agents {
        let d = a.wg_dump().unwrap_or_else(|e| panic!("{e}"));
        let peer = d
            .peer(&wg.public_key)
            .unwrap_or_else(|| panic!("{} has no peer for wireguard-go: {}", a.node, a.wg_show()));
        assert!(
            peer.latest_handshake.is_some(),
            "{}: {}",
            a.node,
            a.wg_show()
        );
    }
    f.assert_agents_alive();
}

#[test]
fn fail_closed_agent_stop_and_restart() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("failclosed");
    let cap = f.capture();
    let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
    warm_up(&[(p1, p2), (p1, p3), (p2, p3)], &canary);

    // Traffic is running while the agent dies.
    let bg = background_ping(p1, p2.ip, 30, f.work());
    let bg_ok = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        bg.log().contains("icmp_seq=").then_some(())
    });
    assert!(
        bg_ok.is_some(),
        "background ping never got a reply:\n{}",
        bg.log()
    );

    f.agent(2).kill();
    let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
    // For two seconds, everything to and from node 2's pod must fail, in both
    // directions and all protocols; each attempt is a chance to leak.
    let dead_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < dead_until {
        for (from, to) in [(p1, p2), (p2, p1), (p2, p3), (p3, p2)] {
            let u = udp(from, to.ip, 3, &canary, Duration::from_millis(300));
            assert!(
                !u.ok,
                "{} -> {} still works with node 2's agent dead: {}",
                from.label(),
                to.label(),
                u.output
            );
        }
    }
    let t = tcp(p2, p1.ip, 10_000, &canary, Duration::from_secs(2));
    assert!(
        !t.ok,
        "tcp from node 2 works with its agent dead: {}",
        t.output
    );
    // Nodes whose agents live are unaffected.
    let u = udp(p1, p3.ip, 5, &canary, Duration::from_secs(2));
    assert!(
        u.ok,
        "node1 -> node3 broke when node 2's agent died: {}",
        u.output
    );

    let t0 = Instant::now();
    f.agent(2).restart();
    let n2 = f.topo.node(2).name.clone();
    let restarted = f
        .agents
        .iter()
        .position(|a| a.node == n2)
        .expect("agent on node 2");
    let (p1, p2) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let resumed = poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
        let a = &mut f.agents[restarted];
        assert!(
            a.is_running(),
            "restarted agent {} exited:\n{}",
            a.node,
            a.log()
        );
        // Both directions every round: whichever side sends first may have to
        // trigger the new handshake.
        let back = udp(p2, p1.ip, 1, &canary, Duration::from_millis(250)).ok;
        let there = udp(p1, p2.ip, 1, &canary, Duration::from_millis(250)).ok;
        (back && there).then(|| t0.elapsed())
    });
    eprintln!("traffic resumed {resumed:?} after the restart began");
    let resumed = resumed.unwrap_or_else(|| panic!("traffic did not resume within 20 s"));
    assert!(
        resumed <= Duration::from_secs(5),
        "traffic resumed only after {resumed:?} (limit 5 s)"
    );
    let p = finish_ping(bg);
    assert!(
        p.transmitted > p.received && p.received > 0,
        "background ping should show loss while the agent was dead: {}",
        p.output
    );
    let r = f.finish(cap, &canary);
    r.assert_clean("agent killed and restarted");
    f.assert_agents_alive();
}

#[test]
fn mtu_10mb_tcp_transfer() {
    require_root();
    let mut f = Fixture::new(2, 1, true, true);
    f.start_agents(&[1, 2], 0);
    let canary = canary("mtu");
    let cap = f.capture();
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    warm_up(&[(a, b)], &canary);

    let t = tcp(a, b.ip, 10 * 1024 * 1024, &canary, Duration::from_secs(60));
    eprintln!("10 MB echo: {}", t.output.trim());
    assert!(t.ok, "10 MB TCP transfer failed: {}", t.output);

    // Full-size datagrams for a 1500-byte pod MTU: 1472 + 8 (UDP) + 20 (IPv4).
    // A retry is allowed: the first one may teach the sender a path MTU.
    for (from, to) in [(a, b), (b, a)] {
        let u = udp_sized(from, to.ip, 5, 1472, &canary, Duration::from_secs(2), 2);
        assert!(
            u.ok,
            "1472-byte UDP {} -> {}: {}",
            from.label(),
            to.label(),
            u.output
        );
    }
    // ICMP at 1472 + 8 + 20 = 1500 bytes; ping's default PMTU strategy may lose the
    // first echo to a frag-needed, the rest must cross.
    let p = ping(a, b.ip, 5, 1472);
    assert!(p.received >= 3, "ping -s 1472: {}", p.output);

    let r = f.finish(cap, &canary);
    r.assert_clean("10 MB transfer");
    f.assert_agents_alive();
}

#[test]
fn pods_reach_other_nodes_host_addresses_encrypted() {
    // A pod talking to another node's own address (its kubelet, a NodePort):
    // the request is steered into the tunnel, the node's reply comes back
    // through it with the node's address as source, which the receiving
    // engine accepts because that address is in the node's AllowedIPs. The
    // capture proves both directions were encrypted: an unsteered request
    // would carry the pod's address on the underlay.
    require_root();
    let mut f = Fixture::new(2, 1, true, true);
    f.start_agents(&[1, 2], 0);
    let canary = canary("hostaddr");
    let cap = f.capture();
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    warm_up(&[(a, b)], &canary);
    for (pod, node) in [(a, f.topo.node(2)), (b, f.topo.node(1))] {
        let p = ping(pod, node.underlay_ip, 5, 56);
        assert!(
            p.received >= 4,
            "{} -> node {}: {}",
            pod.label(),
            node.underlay_ip,
            p.output
        );
    }
    let r = f.finish(cap, &canary);
    r.assert_clean("pods to other nodes' addresses");
    f.assert_agents_alive();
}

/// A log line naming both the file and the object of a problem.
fn log_names(log: &str, file: &str, object: Option<&str>) -> bool {
    log.lines()
        .any(|l| l.contains(file) && object.is_none_or(|o| l.contains(o)))
}

#[test]
fn bad_input_keeps_last_good_state() {
    require_root();
    let mut f = Fixture::new(2, 1, true, true);
    f.start_agents(&[1, 2], 0);
    let canary = canary("badinput");
    let cap = f.capture();
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    warm_up(&[(a, b)], &canary);
    let peers_before: Vec<_> = f
        .agents
        .iter()
        .map(|ag| ag.wg_dump().unwrap_or_else(|e| panic!("{e}")).peers)
        .collect();
    let bg = background_ping(a, b.ip, 30, f.work());

    // (file, object the log must name with it, as `Kind/name` or
    // `Kind/namespace/name` like cluster::Diagnostic). A malformed file has no object.
    let problems: Vec<(&str, Option<&str>)> = vec![
        ("bad-malformed.yaml", None),
        ("bad-thief.yaml", Some("Node/thief")),
        ("bad-orphan.yaml", Some("Pod/default/orphan")),
        ("node9.yaml", Some("VeilNode/node9")),
    ];
    f.dir.write_raw(
        "bad-malformed.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: [unclosed\n  spec: : :\n",
    );
    f.dir.write_objects(
        "bad-thief.yaml",
        &[node_object("thief", &f.topo.node(2).pod_cidr, "198.18.0.8")],
    );
    f.dir.write_objects(
        "bad-orphan.yaml",
        &[pod_object(
            POD_NAMESPACE,
            "orphan",
            &[("app", "x")],
            "ghost",
            "10.244.1.99",
        )],
    );
    // A real node whose announcement carries a key that is not 32 bytes of base64.
    f.dir.add_node("node9", "10.244.9.0/24", "198.18.0.9");
    f.dir.write_objects(
        "veilnodes/node9.yaml",
        &[json!({
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "VeilNode",
            "metadata": {"name": "node9"},
            "spec": {"publicKey": "not a key!", "listenPort": 51820, "podCIDRs": ["10.244.9.0/24"]},
        })],
    );

    for ag in &f.agents {
        let all_named = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            let log = ag.log();
            problems
                .iter()
                .all(|(file, obj)| log_names(&log, file, *obj))
                .then_some(())
        });
        let log = ag.log();
        let missing: Vec<_> = problems
            .iter()
            .filter(|(file, obj)| !log_names(&log, file, *obj))
            .collect();
        assert!(
            all_named.is_some(),
            "{}: log does not name file and object for {missing:?}",
            ag.node
        );
    }
    f.assert_agents_alive();

    // The last good state holds: same peers, node2's CIDR not stolen, traffic flows.
    for (ag, before) in f.agents.iter().zip(&peers_before) {
        let d = ag.wg_dump().unwrap_or_else(|e| panic!("{e}"));
        let keys = |v: &[harness::agent::WgPeer]| {
            v.iter()
                .map(|p| (p.public_key.clone(), p.allowed_ips.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&d.peers), keys(before), "{}: peers changed", ag.node);
    }
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    for (from, to) in [(a, b), (b, a)] {
        let t = tcp(from, to.ip, 64 * 1024, &canary, Duration::from_secs(10));
        assert!(
            t.ok,
            "tcp {} -> {} after bad input: {}",
            from.label(),
            to.label(),
            t.output
        );
        let u = udp(from, to.ip, 10, &canary, Duration::from_secs(2));
        assert!(
            u.ok,
            "udp {} -> {} after bad input: {}",
            from.label(),
            to.label(),
            u.output
        );
    }
    let p = finish_ping(bg);
    assert!(
        p.transmitted > 0 && p.received * 10 >= p.transmitted * 9,
        "traffic did not keep flowing during bad input: {}",
        p.output
    );
    let r = f.finish(cap, &canary);
    r.assert_clean("bad input");
    f.assert_agents_alive();
}

#[test]
fn converges_on_changes() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("converge");
    let cap = f.capture();
    {
        let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
        warm_up(&[(p1, p2), (p1, p3)], &canary);
    }

    // A new pod on node 2, the way a CNI and then the API server would make it.
    let idx = f.topo.add_pod(2);
    f.servers.start_in(&f.topo.pods[idx], f.work.path());
    f.dir.add_topology_pod(&f.topo, 2, 1);
    let (p1, new) = (f.topo.pod(1, 0), f.topo.pod(2, 1));
    let t = wait_reachable(p1, new.ip, &canary, Duration::from_secs(15));
    assert!(
        t.is_some(),
        "new pod {} never became reachable",
        new.label()
    );
    let t = tcp(new, p1.ip, 64 * 1024, &canary, Duration::from_secs(10));
    assert!(t.ok, "tcp from the new pod: {}", t.output);
    let p = ping(p1, new.ip, 3, 56);
    assert!(p.all_ok(), "ping to the new pod: {}", p.output);

    // Node 3 leaves: its agent is gone and its announcement withdrawn. The others
    // must drop its peer and then drop (not leak) traffic to its pod CIDR.
    f.agent(3).kill();
    let node3 = f.topo.node(3).name.clone();
    f.dir.remove(&format!("veilnodes/{node3}.yaml"));
    for i in [1, 2] {
        let ag = f.agent(i);
        ag.wait_peers(1, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_dropped_to_node3(&f, "announcement removed", &canary);
    // Then the Node and its Pod objects go too.
    let p3_name = f.topo.pod(3, 0).name.clone();
    f.dir.remove(&ClusterDir::node_file(&node3));
    f.dir.remove_pod(POD_NAMESPACE, &p3_name);
    for i in [1, 2] {
        f.agent(i)
            .wait_peers(1, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Nothing observable says the agents have applied this removal, so keep trying
    // for a few seconds: every attempt after they apply it must be dropped too.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_dropped_to_node3(&f, "Node removed", &canary);
    }
    // The remaining nodes still talk.
    let (p1, p2, new) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(2, 1));
    for (from, to) in [(p1, p2), (p2, p1), (p1, new), (new, p1)] {
        let u = udp(from, to.ip, 5, &canary, Duration::from_secs(2));
        assert!(
            u.ok,
            "{} -> {} after node 3 left: {}",
            from.label(),
            to.label(),
            u.output
        );
    }
    let r = f.finish(cap, &canary);
    r.assert_clean("pod added, node removed");
    for i in [1, 2] {
        assert!(f.agent(i).is_running(), "agent {i} died");
    }
}

/// Every pod left on nodes 1 and 2 fails to reach node 3's pod (UDP and TCP); the
/// capture, checked at the end, proves the attempts were dropped rather than leaked.
fn assert_dropped_to_node3(f: &Fixture, stage: &str, canary: &str) {
    let p3 = f.topo.pod(3, 0);
    for from in f.topo.pods.iter().filter(|p| p.node != 3) {
        let u = udp(from, p3.ip, 3, canary, Duration::from_millis(500));
        assert!(
            !u.ok,
            "{stage}: {} still reaches {}: {}",
            from.label(),
            p3.label(),
            u.output
        );
        let t = tcp(from, p3.ip, 4096, canary, Duration::from_secs(1));
        assert!(
            !t.ok,
            "{stage}: tcp {} -> {}: {}",
            from.label(),
            p3.label(),
            t.output
        );
    }
}
