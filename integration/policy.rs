//! Policy end to end (root required): 3 nodes, 6 pods in two namespaces with
//! different labels, the agents compiling policies from the cluster dir into
//! the BPF maps, and a reachability matrix checked against the expected one
//! for each scenario: every pod to every pod, TCP and UDP, each on two ports
//! (port A: TCP 7001 / UDP 7002, port B: TCP 8001 / UDP 8002).
//!
//! Scenarios (15 matrices): no policy, default deny, allow by label across
//! nodes (TCP endPort range), port-specific allow, endPort ranges per
//! protocol, namespaceSelector+podSelector in one peer vs two peers, deny
//! overriding allow, namespace isolation with empty podSelectors, egress
//! only, ipBlock over the pod CIDRs (matches no pod), ipBlock with except on
//! non-pod workloads, requireEncryption, and a policy update while a
//! long-lived TCP connection keeps exchanging data (matrices before and
//! after). Probes run in parallel; a failure prints both matrices.
mod harness;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::fixture::Fixture;
use harness::netns::require_root;
use harness::poll_until;
use harness::topology::{Pod, POD_NAMESPACE};
use harness::traffic::{tcp_port, udp_port, TCP_PORT, TCP_PORT_B, UDP_PORT, UDP_PORT_B};

const CANARY: &str = "veil-policy";
/// A denied probe costs its full timeout; an allowed one on an idle path takes
/// a few milliseconds, and a wrong "denied" under load is probed again.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// How long a matrix may take to reach its expected state after a change.
const SETTLE: Duration = Duration::from_secs(12);

/// Reachability of one ordered pair: TCP A, TCP B, UDP A, UDP B.
type Cell = [bool; 4];
const ALL: Cell = [true; 4];
const NONE: Cell = [false; 4];

/// Who a pod (or a node's host namespace, `ns == "host"`) is, for the
/// expectation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Who {
    ns: &'static str,
    app: &'static str,
    node: u8,
}

/// (namespace, app label) of the pod on `node` (1-based), `slot`. Both
/// namespaces have an `app: web` pod on node 1, so a podSelector alone (own
/// namespace) and one combined with a namespaceSelector select differently.
fn placement(node: u8, slot: u8) -> Who {
    let (ns, app) = match slot {
        0 => ("alpha", if node == 1 { "web" } else { "db" }),
        _ => ("beta", if node == 1 { "web" } else { "tool" }),
    };
    Who { ns, app, node }
}

/// A probe target: a pod, or the underlay address of a node (servers in the
/// node's namespace, for ipBlock: node addresses are not pods).
#[derive(Clone, Copy)]
struct Target<'a> {
    who: Who,
    ip: Ipv4Addr,
    name: &'a str,
}

fn probe(from: &Pod, to: Ipv4Addr) -> Cell {
    let t = |port| tcp_port(from, to, port, 256, CANARY, PROBE_TIMEOUT).ok;
    let u = |port| udp_port(from, to, port, 1, CANARY, PROBE_TIMEOUT).ok;
    [t(TCP_PORT), t(TCP_PORT_B), u(UDP_PORT), u(UDP_PORT_B)]
}

fn cell_str(c: Cell) -> String {
    let mark = |ok: bool, ch: char| if ok { ch } else { '.' };
    format!(
        "{}{}{}{}",
        mark(c[0], 'T'),
        mark(c[1], 't'),
        mark(c[2], 'U'),
        mark(c[3], 'u')
    )
}

/// One matrix as text: rows are senders, columns receivers; `T`/`t` TCP on
/// port A/B, `U`/`u` UDP on port A/B, `.` blocked, `-` not probed.
fn render(pods: &[&Pod], targets: &[Target<'_>], cells: &[Vec<Option<Cell>>]) -> String {
    let mut s = format!("{:>24}", "from \\ to");
    for t in targets {
        let _ = write!(s, " {:>9}", t.name);
    }
    s.push('\n');
    for (i, from) in pods.iter().enumerate() {
        let w = placement(from.node, from.slot);
        let _ = write!(s, "{:>24}", format!("{} {}/{}", from.name, w.ns, w.app));
        for c in &cells[i] {
            let _ = write!(s, " {:>9}", c.map(cell_str).unwrap_or_else(|| "-".into()));
        }
        s.push('\n');
    }
    s
}

/// Probes every (pod, target) pair in parallel, pairs that have not yet shown
/// their expected cell again until `SETTLE` passes; panics with the expected
/// and the actual matrix. `want` returns `None` for a pair not to probe.
///
/// A pair that matched is settled: the caller waits for the agents to have
/// applied the change first ([`wait_applied`]), so a match is not a leftover
/// of the previous policy.
fn check_targets(
    pods: &[&Pod],
    targets: &[Target<'_>],
    scenario: &str,
    want: impl Fn(Who, Who) -> Option<Cell>,
) {
    let started = Instant::now();
    let expected: Vec<Vec<Option<Cell>>> = pods
        .iter()
        .map(|p| {
            targets
                .iter()
                .map(|t| {
                    if t.ip == p.ip {
                        None
                    } else {
                        want(placement(p.node, p.slot), t.who)
                    }
                })
                .collect()
        })
        .collect();
    let mut actual: Vec<Vec<Option<Cell>>> = vec![vec![None; targets.len()]; pods.len()];
    let mut settled: Vec<Vec<bool>> = expected
        .iter()
        .map(|row| row.iter().map(Option::is_none).collect())
        .collect();
    loop {
        let todo: Vec<(usize, usize)> = (0..pods.len())
            .flat_map(|i| (0..targets.len()).map(move |j| (i, j)))
            .filter(|&(i, j)| !settled[i][j])
            .collect();
        if todo.is_empty() {
            eprintln!(
                "{scenario}: ok in {:?}\n{}",
                started.elapsed(),
                render(pods, targets, &actual)
            );
            return;
        }
        if started.elapsed() > SETTLE {
            panic!(
                "{scenario}: the reachability matrix did not reach the expected one in {SETTLE:?}\n\
                 expected:\n{}actual:\n{}",
                render(pods, targets, &expected),
                render(pods, targets, &actual)
            );
        }
        let got: Vec<((usize, usize), Cell)> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .iter()
                .map(|&(i, j)| {
                    let (from, to) = (pods[i], targets[j].ip);
                    s.spawn(move || ((i, j), probe(from, to)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for ((i, j), c) in got {
            actual[i][j] = Some(c);
            settled[i][j] = expected[i][j] == Some(c);
        }
    }
}

/// The cluster's pods: the first `NODES * PODS_PER_NODE` of the topology
/// (the ones after them are the unregistered workloads of scenario 10b).
const NODES: u8 = 3;
const PODS_PER_NODE: u8 = 2;
const N_PODS: usize = NODES as usize * PODS_PER_NODE as usize;

fn cluster_pods(f: &Fixture) -> Vec<&Pod> {
    f.topo.pods[..N_PODS].iter().collect()
}

/// [`check_targets`] over pods only.
fn check(f: &Fixture, scenario: &str, want: impl Fn(Who, Who) -> Cell) {
    let pods = cluster_pods(f);
    let targets = pod_targets(f);
    check_targets(&pods, &targets, scenario, |a, b| Some(want(a, b)));
}

fn pod_targets(f: &Fixture) -> Vec<Target<'_>> {
    cluster_pods(f)
        .into_iter()
        .map(|p| Target {
            who: placement(p.node, p.slot),
            ip: p.ip,
            name: &p.name,
        })
        .collect()
}

fn policy_updates(f: &Fixture) -> Vec<usize> {
    f.agents
        .iter()
        .map(|a| a.log().matches("policy map updated").count())
        .collect()
}

/// Applies a change to the cluster directory and waits (bounded) until every
/// agent logged one more policy map update, so a following matrix sees the
/// new policy rather than the old one.
fn apply(f: &Fixture, change: impl FnOnce(&Fixture)) {
    let before = policy_updates(f);
    change(f);
    wait_applied(f, &before);
}

fn wait_applied(f: &Fixture, before: &[usize]) {
    let done = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let now = policy_updates(f);
        now.iter().zip(before).all(|(n, b)| n > b).then_some(())
    });
    assert!(
        done.is_some(),
        "not every agent applied the policy change within 10 s: {before:?} -> {:?}",
        policy_updates(f)
    );
}

fn np(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn vp(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// A TCP connection from inside a pod to an echo server, exchanging a small
/// message every 20 ms on a background thread until stopped.
struct LongFlow {
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl LongFlow {
    fn start(from: &Pod, to: SocketAddr) -> Self {
        // The socket is created on a thread inside the pod's namespace and
        // keeps that namespace for its whole life (sockets belong to the
        // namespace they were created in).
        let stream = from
            .ns
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("long-lived connection to {to}: {e}"));
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (rounds.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<u64, String> {
            let mut s = stream;
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                let msg = format!("{CANARY} round {n:08}");
                s.write_all(msg.as_bytes())
                    .map_err(|e| format!("round {n}: send: {e}"))?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back)
                    .map_err(|e| format!("round {n}: no echo within 1 s: {e}"))?;
                if back != msg.as_bytes() {
                    return Err(format!("round {n}: echo corrupted"));
                }
                n += 1;
                r.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n)
        });
        Self {
            rounds,
            stop,
            thread: Some(thread),
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err("flow thread panicked".into()),
        }
    }
}

impl Drop for LongFlow {
    fn drop(&mut self) {
        // Bounded: every round waits at most 1 s for its echo.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn reachability_matrix_under_policies() {
    require_root();
    let mut f = Fixture::new(NODES, PODS_PER_NODE, true, true);
    f.dir.add_namespace("alpha", &[("team", "a")]);
    f.dir.add_namespace("beta", &[("team", "b")]);
    let pods: Vec<(String, u8, u8, String)> = f
        .topo
        .pods
        .iter()
        .take(N_PODS)
        .map(|p| (p.name.clone(), p.node, p.slot, p.ip.to_string()))
        .collect();
    for (name, node, slot, ip) in &pods {
        let w = placement(*node, *slot);
        f.dir.remove_pod(POD_NAMESPACE, name);
        let node_name = f.topo.node(*node).name.clone();
        f.dir.add_pod(w.ns, name, &[("app", w.app)], &node_name, ip);
    }
    // Two workloads on node 3 inside its pod CIDR that are NOT pods of the
    // cluster (never written to the cluster dir): what an ipBlock selects.
    let ext = [f.topo.add_pod(3), f.topo.add_pod(3)];
    // Port B servers in every pod, both ports in the two workloads.
    let work = f.work().to_path_buf();
    let mut servers = std::mem::take(&mut f.servers);
    for p in &f.topo.pods[..N_PODS] {
        servers.start_ports_in(&p.ns, &p.name, TCP_PORT_B, UDP_PORT_B, &work);
    }
    for &i in &ext {
        let p = &f.topo.pods[i];
        servers.start_ports_in(&p.ns, &p.name, TCP_PORT, UDP_PORT, &work);
        servers.start_ports_in(&p.ns, &p.name, TCP_PORT_B, UDP_PORT_B, &work);
    }
    f.servers = servers;
    f.start_agents(&[1, 2, 3], 0);

    check(&f, "1. no policy", |_, _| ALL);

    // 2. Default deny of ingress in alpha.
    apply(&f, |f| {
        f.dir.write_raw(
            "np-deny.yaml",
            &np(
                "deny",
                "alpha",
                "  podSelector: {}\n  policyTypes: [Ingress]\n",
            ),
        );
    });
    check(&f, "2. default deny in alpha", |_, to| {
        if to.ns == "alpha" {
            NONE
        } else {
            ALL
        }
    });

    // 3. Allow by label across nodes (web on node 1, db on nodes 2 and 3),
    // TCP only, both TCP ports through one endPort range. beta's web pod
    // has the label too but lives in another namespace: not selected.
    apply(&f, |f| {
        f.dir.write_raw(
            "np-web-db.yaml",
            &np(
                "web-db",
                "alpha",
                "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{protocol: TCP, port: 7000, endPort: 8999}]}]\n",
            ),
        );
    });
    check(
        &f,
        "3. allow alpha/web -> alpha/db (TCP 7000-8999) across nodes",
        |from, to| match (to.ns, to.app) {
            ("alpha", "db") if from.ns == "alpha" && from.app == "web" => {
                [true, true, false, false]
            }
            ("alpha", _) => NONE,
            _ => ALL,
        },
    );

    // 4. Port-specific allow: port A of both protocols from everywhere, port
    // B stays denied by the default deny.
    apply(&f, |f| {
        f.dir.remove("np-web-db.yaml");
        f.dir.write_raw(
            "np-ports.yaml",
            &np(
                "ports",
                "alpha",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{protocol: TCP, port: 7001}, {protocol: UDP, port: 7002}]}]\n",
            ),
        );
    });
    check(
        &f,
        "4. port-specific allow into alpha (port A only)",
        |_, to| {
            if to.ns == "alpha" {
                [true, false, true, false]
            } else {
                ALL
            }
        },
    );

    // 5. endPort ranges per protocol: TCP 7000-7999 (A, not B) and UDP
    // 8000-8999 (B, not A).
    apply(&f, |f| {
        f.dir.remove("np-ports.yaml");
        f.dir.write_raw(
            "np-range.yaml",
            &np(
                "range",
                "alpha",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{protocol: TCP, port: 7000, endPort: 7999}, {protocol: UDP, port: 8000, endPort: 8999}]}]\n",
            ),
        );
    });
    check(&f, "5. endPort ranges into alpha", |_, to| {
        if to.ns == "alpha" {
            [true, false, false, true]
        } else {
            ALL
        }
    });

    // 6a. namespaceSelector and podSelector in ONE peer: the intersection,
    // web pods of team b namespaces (beta's web only).
    apply(&f, |f| {
        f.dir.remove("np-range.yaml");
        f.dir.write_raw(
            "np-peer.yaml",
            &np(
                "peer",
                "alpha",
                "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: web}}}]}]\n",
            ),
        );
    });
    check(
        &f,
        "6a. one peer: namespaceSelector AND podSelector",
        |from, to| match (to.ns, to.app) {
            ("alpha", "db") if from.ns == "beta" && from.app == "web" => ALL,
            ("alpha", _) => NONE,
            _ => ALL,
        },
    );

    // 6b. The same selectors as TWO peers: the union, every pod of beta and
    // the web pod of alpha (a podSelector alone means the own namespace).
    apply(&f, |f| {
        f.dir.write_raw(
            "np-peer.yaml",
            &np(
                "peer",
                "alpha",
                "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}, {podSelector: {matchLabels: {app: web}}}]}]\n",
            ),
        );
    });
    check(
        &f,
        "6b. two peers: namespaceSelector OR podSelector",
        |from, to| match (to.ns, to.app) {
            ("alpha", "db") if from.ns == "beta" || from.app == "web" => ALL,
            ("alpha", _) => NONE,
            _ => ALL,
        },
    );

    // 7. Deny overriding allow: alpha admits every namespace, and denies
    // team b; the deny wins (of any policy, for both protocols and ports).
    apply(&f, |f| {
        f.dir.remove("np-peer.yaml");
        f.dir.remove("np-deny.yaml");
        f.dir.write_raw(
            "vp-deny.yaml",
            &vp(
                "no-beta",
                "alpha",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n  ingressDeny: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]\n",
            ),
        );
    });
    check(&f, "7. deny overrides allow", |from, to| {
        if to.ns == "alpha" && from.ns == "beta" {
            NONE
        } else {
            ALL
        }
    });

    // 8. Namespace isolation with empty podSelectors: in each namespace
    // every pod is selected and every pod of the same namespace admitted.
    apply(&f, |f| {
        f.dir.remove("vp-deny.yaml");
        let spec = "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n";
        f.dir.write_raw("np-iso-a.yaml", &np("iso", "alpha", spec));
        f.dir.write_raw("np-iso-b.yaml", &np("iso", "beta", spec));
    });
    check(
        &f,
        "8. namespace isolation (empty podSelector)",
        |from, to| {
            if from.ns == to.ns {
                ALL
            } else {
                NONE
            }
        },
    );

    // 9. Egress only: beta may only talk to beta; its ingress stays open.
    apply(&f, |f| {
        f.dir.remove("np-iso-a.yaml");
        f.dir.remove("np-iso-b.yaml");
        f.dir.write_raw(
            "np-egress.yaml",
            &np(
                "egress",
                "beta",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}]}]\n",
            ),
        );
    });
    check(&f, "9. egress-only policy in beta", |from, to| {
        if from.ns != "beta" || to.ns == "beta" {
            ALL
        } else {
            NONE
        }
    });

    // 10a. ipBlock, on egress from beta. Veil (like Cilium)
    // never matches a pod address with an ipBlock: a pod's address resolves
    // to the pod's identity, rules about pods are written with selectors. So
    // an egress allow to 10.244.0.0/16 (every pod CIDR; except node 2's)
    // admits no pod: beta still reaches only beta.
    apply(&f, |f| {
        f.dir.write_raw(
            "np-egress.yaml",
            &np(
                "egress",
                "beta",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}, {ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]}]\n",
            ),
        );
    });
    check(
        &f,
        "10a. ipBlock over the pod CIDRs matches no pod",
        |from, to| {
            if from.ns != "beta" || to.ns == "beta" {
                ALL
            } else {
                NONE
            }
        },
    );

    // 10b. ipBlock with except on addresses that are not pods: the two
    // unregistered workloads on node 3 (10.244.3.12 and .13). beta may reach
    // the block 10.244.3.12/31 except .13, so .12 and not .13; alpha is
    // not isolated and reaches both. Cross-node and same-node (node 3's
    // beta pod) senders alike.
    apply(&f, |f| {
        let (a, b) = (f.topo.pods[ext[0]].ip, f.topo.pods[ext[1]].ip);
        f.dir.write_raw(
            "np-egress.yaml",
            &np(
                "egress",
                "beta",
                &format!("  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{podSelector: {{}}}}, {{ipBlock: {{cidr: {a}/31, except: [{b}/32]}}}}]}}]\n"),
            ),
        );
    });
    {
        let pods = cluster_pods(&f);
        let mut targets = pod_targets(&f);
        for (k, &i) in ext.iter().enumerate() {
            let p = &f.topo.pods[i];
            targets.push(Target {
                who: Who {
                    ns: "ext",
                    app: if k == 0 { "allowed" } else { "except" },
                    node: p.node,
                },
                ip: p.ip,
                name: &p.name,
            });
        }
        check_targets(
            &pods,
            &targets,
            "10b. ipBlock with except (egress from beta)",
            |from, to| {
                if to.ns == "ext" {
                    return Some(if from.ns == "beta" && to.app == "except" {
                        NONE
                    } else {
                        ALL
                    });
                }
                Some(if from.ns != "beta" || to.ns == "beta" {
                    ALL
                } else {
                    NONE
                })
            },
        );
    }

    // 11. requireEncryption: beta admits every namespace, only through the
    // tunnel; a same-node sender reaches the pod over the plaintext veth path.
    apply(&f, |f| {
        f.dir.remove("np-egress.yaml");
        f.dir.write_raw(
            "vp-enc.yaml",
            &vp(
                "enc",
                "beta",
                "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n  requireEncryption: true\n",
            ),
        );
    });
    check(&f, "11. requireEncryption into beta", |from, to| {
        if to.ns == "beta" && to.node == from.node {
            NONE
        } else {
            ALL
        }
    });

    // 12. Update under traffic: web -> db (node 1 -> node 2) allowed, a TCP
    // connection exchanging data every 20 ms, then the policy changes to
    // admit nobody into db. The established connection (tracked) keeps
    // working; a new connection fails within 1 s of the agents applying it.
    let db_policy = |from_app: &str| {
        np(
            "db",
            "alpha",
            &format!("  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from_app}}}}}}}]}}]\n"),
        )
    };
    apply(&f, |f| {
        f.dir.remove("vp-enc.yaml");
        f.dir.write_raw("np-db.yaml", &db_policy("web"));
    });
    check(
        &f,
        "12a. before the update: alpha/web -> alpha/db",
        |from, to| {
            if to.ns == "alpha" && to.app == "db" && !(from.ns == "alpha" && from.app == "web") {
                NONE
            } else {
                ALL
            }
        },
    );
    let (web, db) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let flow = LongFlow::start(web, SocketAddr::from((db.ip, TCP_PORT)));
    let flowing = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        (flow.rounds() >= 5).then_some(())
    });
    assert!(
        flowing.is_some(),
        "long-lived web -> db connection exchanges no data"
    );

    let before = policy_updates(&f);
    let written = Instant::now();
    f.dir.write_raw("np-db.yaml", &db_policy("nobody"));
    wait_applied(&f, &before);
    let apply_took = written.elapsed();
    let applied = Instant::now();
    let rounds_at_change = flow.rounds();
    // Every attempt is a fresh connection (new source port, new tuple).
    let denied = poll_until(Duration::from_secs(1), Duration::from_millis(10), || {
        let t = tcp_port(web, db.ip, TCP_PORT, 64, CANARY, Duration::from_millis(150));
        (!t.ok).then(|| applied.elapsed())
    });
    assert!(
        denied.is_some_and(|d| d <= Duration::from_secs(1)),
        "a new connection web -> db still succeeded 1 s after the agents applied the change"
    );
    // The old connection keeps exchanging data for 2 s past the change.
    let kept = poll_until(Duration::from_secs(4), Duration::from_millis(20), || {
        (applied.elapsed() >= Duration::from_secs(2)).then_some(())
    });
    assert!(kept.is_some());
    let rounds_after = flow.rounds() - rounds_at_change;
    let result = flow.finish();
    assert!(
        result.is_ok() && rounds_after >= 20,
        "the established connection must survive the update: {result:?}, {rounds_after} rounds after it"
    );
    eprintln!(
        "12. update: agents applied it {apply_took:?} after the write; new connections denied \
         {denied:?} after that; the old connection made {rounds_after} rounds after it"
    );
    check(
        &f,
        "12b. after the update: nobody into alpha/db",
        |_, to| {
            if to.ns == "alpha" && to.app == "db" {
                NONE
            } else {
                ALL
            }
        },
    );
    f.assert_agents_alive();
}
