//! End-to-end key management tests: signed announcements, forged ones, agent
//! restarts with and without their key files, and key rotation under load.
//! Each test builds its own 3-node cluster (see integration/README.md).
//!
//! Run as root: `cargo test --test keys -- --test-threads=1`.

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harness::fixture::Fixture;
use harness::netns::require_root;
use harness::poll_until;
use harness::topology::Pod;
use harness::traffic::{canary, tcp, udp_sized, warm_up};
use veil::cluster::file::FileSource;
use veil::cluster::{Announcement, PublicKey};

/// The public key agent `i`'s engine has configured for the peer serving `cidr`.
fn peer_key_for(f: &mut Fixture, i: u8, cidr: &str) -> Option<String> {
    let d = f.agent(i).wg_dump().ok()?;
    d.peers
        .iter()
        .find(|p| p.allowed_ips.iter().any(|a| a == cidr))
        .map(|p| p.public_key.clone())
}

/// A node's published announcement as the agents parse it.
fn announcement(f: &Fixture, node: &str) -> Announcement {
    let (state, _) = FileSource::new(f.dir.path()).load();
    state
        .announcements
        .get(node)
        .cloned()
        .unwrap_or_else(|| panic!("no announcement for {node}"))
}

#[test]
fn forged_announcement_is_rejected_and_traffic_stays_with_the_real_node() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("forged");
    let n2 = f.topo.node(2).name.clone();
    let cidr2 = f.topo.node(2).pod_cidr.clone();
    let real = announcement(&f, &n2);
    warm_up(&[(f.topo.pod(1, 0), f.topo.pod(2, 0))], &canary);

    // Someone who can write the cluster dir, but holds neither node 2's
    // identity key nor the authority key, announces a key of their own for
    // node 2's pod CIDR, certified by an authority of their own. The file
    // sorts before veilnodes/, so it is the VeilNode/<n2> the agents read.
    let rogue = keymgr::AuthorityKey::generate();
    let identity = keymgr::IdentityKey::generate();
    let now = keymgr::unix_now();
    let cert = rogue
        .certify(&n2, identity.public_key(), now - 10, now + 3600)
        .unwrap();
    let stolen = keymgr::WireGuardPrivateKey::generate();
    let mut body = real.body();
    body.wireguard_key = stolen.public_key();
    body.generation = real.trust.generation + 100;
    body.not_before = now - 10;
    body.not_after = now + 3600;
    let forged = keymgr::SignedAnnouncement::sign_by_node(body, &identity, cert).unwrap();
    let forged = Announcement::from_signed(&forged);
    let yaml = serde_yaml::to_string(&veil::cluster::objects::VeilNode::from(&forged)).unwrap();
    let forged_path = f.dir.write_raw("a-forged.yaml", &yaml);
    let forged_file = forged_path.display().to_string();

    let cap = f.capture();
    for i in [1u8, 3] {
        let found = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            let log = f.agent(i).log();
            log.lines()
                .find(|l| {
                    l.contains(&forged_file)
                        && l.contains(&format!("VeilNode/{n2}"))
                        && l.contains("not signed by the cluster authority")
                        && l.contains("keeping the previously accepted key")
                })
                .map(str::to_string)
        });
        let line = found.unwrap_or_else(|| {
            panic!(
                "agent {i} did not log the rejection naming {forged_file} and VeilNode/{n2}:\n{}",
                f.agent(i).log()
            )
        });
        eprintln!("agent {i}: {line}");
        assert_eq!(
            peer_key_for(&mut f, i, &cidr2).as_deref(),
            Some(real.public_key.to_string().as_str()),
            "agent {i} must keep node 2's real key"
        );
    }
    // Traffic to node 2's pods keeps going to node 2.
    let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
    for from in [p1, p3] {
        let t = tcp(from, p2.ip, 128 * 1024, &canary, Duration::from_secs(10));
        assert!(t.ok, "{} -> {}: {}", from.label(), p2.label(), t.output);
    }
    let r = f.finish(cap, &canary);
    r.assert_clean("forged announcement");
    assert!(
        !r.to_string()
            .contains(&PublicKey(stolen.public_key()).to_string()),
        "{r}"
    );

    // The operator sees it too.
    for args in [&["status"][..], &["keys", "status"][..]] {
        let out = f.veilctl_ok(args);
        assert!(
            out.contains(&format!("VeilNode/{n2}")) || out.contains("REJECTED"),
            "veilctl {args:?} does not show the rejection:\n{out}"
        );
        assert!(
            out.contains("not signed by the cluster authority"),
            "veilctl {args:?}:\n{out}"
        );
    }
    f.assert_agents_alive();
}

#[test]
fn restart_keeps_the_key_and_lost_keys_are_adopted_without_restarts() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("restart");
    let n2 = f.topo.node(2).name.clone();
    let cidr2 = f.topo.node(2).pod_cidr.clone();
    {
        let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
        warm_up(&[(p1, p2), (p3, p2)], &canary);
    }
    let before = announcement(&f, &n2);
    let peer_pids: Vec<Option<u32>> = [1u8, 3].iter().map(|&i| f.agent(i).pid()).collect();
    let cap = f.capture();

    // (b) A plain restart: same key, same generation, same identity; the
    // peers never see a new key.
    f.agent(2).restart();
    let idx = f.agents.iter().position(|a| a.node == n2).unwrap();
    f.agents[idx]
        .wait_ready(&f.dir, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let (p1, p2) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    warm_up(&[(p1, p2)], &canary);
    let after = announcement(&f, &n2);
    assert_eq!(
        after.public_key, before.public_key,
        "restart changed the key"
    );
    assert_eq!(after.trust.generation, before.trust.generation);
    assert_eq!(after.trust.identity_key, before.trust.identity_key);
    for i in [1u8, 3] {
        assert_eq!(
            peer_key_for(&mut f, i, &cidr2).as_deref(),
            Some(before.public_key.to_string().as_str())
        );
    }

    // (c) The key files are lost: a new WireGuard key and a new identity,
    // re-approved (auto-approve); the peers adopt it without restarting.
    f.agent(2).kill();
    let key_dir = f.agent(2).key_dir().to_path_buf();
    for entry in std::fs::read_dir(&key_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::remove_file(&p).unwrap();
        }
    }
    f.agent(2).restart();
    f.agents[idx]
        .wait_ready(&f.dir, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let fresh = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        let a = announcement(&f, &n2);
        (a.public_key != before.public_key && a.trust.signature.is_some()).then_some(a)
    })
    .expect("node 2 never announced a new signed key");
    assert_ne!(fresh.trust.identity_key, before.trust.identity_key);
    for i in [1u8, 3] {
        let adopted = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
            (peer_key_for(&mut f, i, &cidr2).as_deref()
                == Some(fresh.public_key.to_string().as_str()))
            .then_some(())
        });
        assert!(
            adopted.is_some(),
            "agent {i} did not adopt node 2's new key:\n{}",
            f.agent(i).wg_show()
        );
    }
    let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
    warm_up(&[(p1, p2), (p3, p2)], &canary);
    let t = tcp(p1, p2.ip, 256 * 1024, &canary, Duration::from_secs(10));
    assert!(t.ok, "tcp to node 2 after its keys were lost: {}", t.output);
    let pids_now: Vec<Option<u32>> = [1u8, 3].iter().map(|&i| f.agent(i).pid()).collect();
    assert_eq!(
        pids_now, peer_pids,
        "the peers must not have been restarted"
    );
    let r = f.finish(cap, &canary);
    r.assert_clean("restart and lost keys");
    f.assert_agents_alive();
}

/// (d) Three rotations of every node's key while UDP at a fixed rate and a
/// long TCP transfer run between pods on every pair of nodes.
///
/// What used to lose datagrams here, found by the engine's drop counters
/// (logged at debug), the TUN device's TX drops and the batch timestamps
/// printed below: (1) initiations from a peer's new key dropped as unknown
/// before its announcement was read, so new sessions waited REKEY_TIMEOUT
/// (now held and answered once the key is configured); (2) the slot created
/// to answer for our previous key evicted the moment it was added (now added
/// as the newest); (3) the TUN queue (500 packets) overflowing while the
/// engine threads waited for a CPU behind the busy control plane, while the
/// engine itself dropped nothing (now a 1024-packet queue and nice -10 data
/// path threads). Runs at 14:35-14:47 UTC on a host at load ~17: 0/860,
/// 0/1100, 0/760 lost (one attempt in between stopped before any rotation:
/// an agent not ready within 30 s while BPF programs loaded).
#[test]
fn rotate_all_three_times_under_load() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("rotate");
    let pods: Vec<&Pod> = (1..=3).map(|i| f.topo.pod(i, 0)).collect();
    let pairs: Vec<(&Pod, &Pod)> = vec![(pods[0], pods[1]), (pods[1], pods[2]), (pods[2], pods[0])];
    warm_up(&pairs, &canary);
    let before: Vec<String> = (1..=3)
        .map(|i| {
            announcement(&f, &f.topo.node(i).name)
                .public_key
                .to_string()
        })
        .collect();
    let cap = f.capture();
    let stop = AtomicBool::new(false);
    let (rotations, tcp_results, udp_results) = std::thread::scope(|s| {
        let tcps: Vec<_> = pairs
            .iter()
            .map(|(a, b)| {
                let canary = canary.clone();
                // ~45 s on this machine: longer than the three rotations.
                s.spawn(move || {
                    tcp(
                        a,
                        b.ip,
                        400 * 1024 * 1024,
                        &canary,
                        Duration::from_secs(120),
                    )
                })
            })
            .collect();
        let udps: Vec<_> = pairs
            .iter()
            .flat_map(|(a, b)| [(*a, *b), (*b, *a)])
            .map(|(a, b)| {
                let canary = canary.clone();
                let stop = &stop;
                s.spawn(move || {
                    // Fixed rate: a batch of 20 datagrams every 200 ms.
                    let (mut sent, mut lost) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = std::time::Instant::now();
                        let at = wall_clock();
                        let r = udp_sized(a, b.ip, 20, 256, &canary, Duration::from_secs(2), 0);
                        sent += 20;
                        if !r.ok {
                            lost += lost_in(&r.output, 20);
                            // When, to match against the agents' logs.
                            eprintln!(
                                "udp batch from {at} lost datagrams: {} -> {}: {}",
                                a.label(),
                                b.label(),
                                r.output.trim()
                            );
                        }
                        if let Some(rest) = Duration::from_millis(200).checked_sub(t0.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                    (format!("{} -> {}", a.label(), b.label()), sent, lost)
                })
            })
            .collect();
        let mut rotations = Vec::new();
        for round in 1..=3 {
            let out = f.veilctl(&["keys", "rotate", "--all", "--wait", "--timeout", "60"]);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("rotation {round}:\n{text}");
            rotations.push((out.status.success(), text));
        }
        stop.store(true, Ordering::Relaxed);
        let tcp_results: Vec<_> = tcps.into_iter().map(|h| h.join().unwrap()).collect();
        let udp_results: Vec<_> = udps.into_iter().map(|h| h.join().unwrap()).collect();
        (rotations, tcp_results, udp_results)
    });
    for (ok, text) in &rotations {
        assert!(ok, "veilctl keys rotate --all --wait failed:\n{text}");
    }
    for t in &tcp_results {
        assert!(t.ok, "TCP transfer broke during rotation: {}", t.output);
    }
    let (sent, lost) = udp_results
        .iter()
        .fold((0, 0), |(s, l), (_, s1, l1)| (s + s1, l + l1));
    eprintln!("udp: {udp_results:?}");
    // Where datagrams can be lost outside the engine: the TUN queue (TX
    // drops of veil0) and the UDP sockets (buffer errors), per node.
    for i in 1..=3u8 {
        let ns = &f.topo.node(i).ns;
        let link = ns.exec(&["ip", "-s", "link", "show", "veil0"]);
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
        let udp: Vec<String> = String::from_utf8_lossy(&snmp.stdout)
            .lines()
            .filter(|l| l.starts_with("Udp:"))
            .map(str::to_owned)
            .collect();
        eprintln!(
            "node{i} veil0:\n{}\n{}",
            String::from_utf8_lossy(&link.stdout),
            udp.join("\n")
        );
    }
    assert!(sent > 0);
    assert!(
        lost * 1000 <= sent,
        "UDP loss {lost}/{sent} exceeds 0.1 %: {udp_results:?}"
    );
    let r = f.finish(cap, &canary);
    r.assert_clean("three rotations under load");
    // `wg show` on every node lists the new keys of its peers.
    for i in 1..=3u8 {
        let name = f.topo.node(i).name.clone();
        let a = announcement(&f, &name);
        assert!(
            a.trust.generation >= 4,
            "{name}: generation {}",
            a.trust.generation
        );
        assert_ne!(a.public_key.to_string(), before[usize::from(i - 1)]);
        for j in (1..=3u8).filter(|j| *j != i) {
            let cidr = f.topo.node(i).pod_cidr.clone();
            assert_eq!(
                peer_key_for(&mut f, j, &cidr).as_deref(),
                Some(a.public_key.to_string().as_str()),
                "wg show on node {j}:\n{}",
                f.agent(j).wg_show()
            );
        }
    }
    // `veilctl keys status` shows, per node, which of its own key
    // generations the live session with each peer uses: once the rotations
    // have settled, every session is on the newest generation.
    let expected: Vec<String> = (1..=3u8)
        .map(|i| {
            let g = announcement(&f, &f.topo.node(i).name).trust.generation;
            let peers: Vec<String> = (1..=3u8)
                .filter(|j| *j != i)
                .map(|j| format!("{} gen {g} (current)", f.topo.node(j).name))
                .collect();
            format!("  sessions: {}", peers.join(", "))
        })
        .collect();
    let mut last = String::new();
    let settled = poll_until(Duration::from_secs(20), Duration::from_millis(500), || {
        last = f.veilctl_ok(&["keys", "status"]);
        let lines: Vec<&str> = last.lines().collect();
        (1..=3u8)
            .all(|i| {
                let name = &f.topo.node(i).name;
                lines
                    .iter()
                    .position(|l| l.starts_with(&format!("{name} ")))
                    .and_then(|n| lines.get(n + 1))
                    .is_some_and(|l| *l == expected[usize::from(i - 1)])
            })
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "keys status does not show every session on the current generation; want {expected:#?}, got:\n{last}"
    );
    eprintln!("keys status after the rotations:\n{last}");
    f.assert_agents_alive();
}

/// `spec.keyRotation.interval`: agents allowed short intervals (hidden
/// test-only minimum) rotate on their own and their peers follow; an agent
/// with the default 10 min minimum refuses an 8 s interval with a clear log
/// and keeps its key; a malformed interval is reported and the last good
/// one stays in force; removing it stops automatic rotation.
#[test]
fn rotation_interval_rotates_keys_automatically() {
    require_root();
    let mut f = Fixture::new(3, 1, true, true);
    f.start_agents(&[1, 2, 3], 0);
    let canary = canary("interval");
    let names: Vec<String> = (1..=3).map(|i| f.topo.node(i).name.clone()).collect();
    // Agents 1 and 2 honour intervals down to 1 s; agent 3 keeps the default.
    for i in [1u8, 2] {
        f.agent(i).set_env("VEIL_TEST_MIN_KEY_ROTATION_SECS", "1");
        f.agent(i).restart();
    }
    for i in [1u8, 2] {
        let idx = f
            .agents
            .iter()
            .position(|a| a.node == names[usize::from(i - 1)])
            .unwrap();
        f.agents[idx]
            .wait_ready(&f.dir, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    {
        let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
        warm_up(&[(p1, p2), (p2, p3), (p3, p1)], &canary);
    }
    let before: Vec<Announcement> = names.iter().map(|n| announcement(&f, n)).collect();
    let config = |interval: Option<&str>| {
        let mut spec = serde_json::json!({
            "encryption": {"enabled": true, "strict": true},
            "clusterPodCIDRs": ["10.244.0.0/16"],
        });
        if let Some(i) = interval {
            spec["keyRotation"] = serde_json::json!({"interval": i});
        }
        serde_json::json!({
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "VeilClusterConfig",
            "metadata": {"name": "default"},
            "spec": spec,
        })
    };
    let cap = f.capture();
    f.dir
        .write_objects("veilclusterconfig.yaml", &[config(Some("8s"))]);

    // Two automatic rotations each on nodes 1 and 2 (8 s apart at most one
    // resync later), adopted by both peers.
    for i in [1u8, 2] {
        let name = &names[usize::from(i - 1)];
        let cidr = f.topo.node(i).pod_cidr.clone();
        let want = before[usize::from(i - 1)].trust.generation + 2;
        let rotated = poll_until(Duration::from_secs(45), Duration::from_millis(200), || {
            let a = announcement(&f, name);
            (a.trust.generation >= want).then_some(a)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} did not rotate twice on its own:\n{}",
                f.agent(i).log()
            )
        });
        for j in (1..=3u8).filter(|j| *j != i) {
            let adopted = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
                let a = announcement(&f, name);
                (a.trust.generation >= rotated.trust.generation
                    && peer_key_for(&mut f, j, &cidr).as_deref()
                        == Some(a.public_key.to_string().as_str()))
                .then_some(())
            });
            assert!(
                adopted.is_some(),
                "node {j} did not follow {name}'s automatic rotation:\n{}",
                f.agent(j).wg_show()
            );
        }
    }
    assert!(
        f.agent(1).log().contains("reason=key is"),
        "the rotation log must say it was the interval:\n{}",
        f.agent(1).log()
    );
    // Agent 3 refuses 8 s (below its 600 s minimum) and keeps its key.
    let refusal = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        f.agent(3)
            .log()
            .lines()
            .find(|l| {
                l.contains("VeilClusterConfig/default")
                    && l.contains("spec.keyRotation.interval: 8s is below the minimum of 600s")
            })
            .map(str::to_string)
    });
    assert!(
        refusal.is_some(),
        "agent 3 did not refuse 8 s:\n{}",
        f.agent(3).log()
    );
    assert_eq!(
        announcement(&f, &names[2]).trust.generation,
        before[2].trust.generation,
        "node 3 rotated despite refusing the interval"
    );

    // A malformed interval is reported naming the file and field; the last
    // good one (8 s) stays in force, so node 1 keeps rotating.
    f.dir
        .write_objects("veilclusterconfig.yaml", &[config(Some("8 parsecs"))]);
    let reported = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        f.agent(1)
            .log()
            .lines()
            .find(|l| {
                l.contains("veilclusterconfig.yaml")
                    && l.contains("spec.keyRotation.interval: `8 parsecs`")
            })
            .map(str::to_string)
    });
    assert!(
        reported.is_some(),
        "agent 1 did not report the bad interval:\n{}",
        f.agent(1).log()
    );
    let g1 = announcement(&f, &names[0]).trust.generation;
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
            (announcement(&f, &names[0]).trust.generation > g1).then_some(())
        })
        .is_some(),
        "the last good interval must stay in force after a bad edit"
    );

    // No interval: automatic rotation stops (after a rotation possibly
    // already under way when the config changed).
    f.dir
        .write_objects("veilclusterconfig.yaml", &[config(None)]);
    let stopped = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        f.agent(1)
            .log()
            .lines()
            .rev()
            .find(|l| {
                l.contains("automatic WireGuard key rotation interval")
                    && !l.contains("interval_secs")
            })
            .map(str::to_string)
    });
    assert!(
        stopped.is_some(),
        "agent 1 did not drop the interval:\n{}",
        f.agent(1).log()
    );
    let settled = announcement(&f, &names[0]).trust.generation;
    // Two full intervals without a rotation.
    let moved = poll_until(Duration::from_secs(16), Duration::from_millis(500), || {
        (announcement(&f, &names[0]).trust.generation != settled).then_some(())
    });
    assert!(moved.is_none(), "node 1 kept rotating without an interval");

    let (p1, p2, p3) = (f.topo.pod(1, 0), f.topo.pod(2, 0), f.topo.pod(3, 0));
    warm_up(&[(p1, p2), (p2, p3), (p3, p1)], &canary);
    let t = tcp(p1, p2.ip, 256 * 1024, &canary, Duration::from_secs(10));
    assert!(t.ok, "tcp after automatic rotations: {}", t.output);
    let r = f.finish(cap, &canary);
    r.assert_clean("automatic rotation");
    f.assert_agents_alive();
}

/// Datagrams lost in a failed `veil-probe udp-client` run, from its
/// `udp received=R sent=S` line; the whole batch if it printed none.
fn lost_in(output: &str, batch: u64) -> u64 {
    let field = |name: &str| {
        output
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("received="), field("sent=")) {
        (Some(r), Some(s)) => s.saturating_sub(r),
        _ => batch,
    }
}

/// Seconds since the epoch with milliseconds, as in the agents' log timestamps.
fn wall_clock() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:03} (UTC s of day {:.3})",
        d.as_secs(),
        d.subsec_millis(),
        (d.as_secs_f64()) % 86_400.0
    )
}
