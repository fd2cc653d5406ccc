//! Policy end to end (root required): 3 nodes, 6 pods in two namespaces with
//! different labels, the agents compiling policies from the cluster dir into
//! the BPF maps, and a reachability matrix (TCP and UDP, every pod to every
//! pod) checked against the expected one for each scenario.
//!
//! Reduced scope (see the report): one TCP and one UDP port (the probe's
//! echo servers), six scenarios, the last a policy update while a flow runs.
mod harness;

use std::time::{Duration, Instant};

use harness::fixture::Fixture;
use harness::netns::require_root;
use harness::poll_until;
use harness::process::Bg;
use harness::topology::{Pod, POD_NAMESPACE};
use harness::traffic::parse_ping;
use harness::traffic::{tcp, udp};

/// (namespace, app label) of the pod on `node` (1-based), `slot`.
fn placement(node: u8, slot: u8) -> (&'static str, &'static str) {
    match slot {
        0 => ("alpha", if node == 1 { "web" } else { "db" }),
        _ => ("beta", "tool"),
    }
}

fn reach(from: &Pod, to: &Pod) -> (bool, bool) {
    let t = tcp(from, to.ip, 512, "veil-policy", Duration::from_millis(800));
    let u = udp(from, to.ip, 1, "veil-policy", Duration::from_millis(800));
    (t.ok, u.ok)
}

/// Checks every ordered pair against `want`. A pair may take up to 10 s to
/// reach its expected state (the agents apply a change on the next watch
/// event, and a probe of a denied pair takes its full timeout, so one pass
/// over the matrix is longer than that); once it has, the next pairs follow.
fn check(f: &Fixture, scenario: &str, want: impl Fn((&str, &str), (&str, &str)) -> (bool, bool)) {
    let pods: Vec<&Pod> = f.topo.pods.iter().collect();
    let mut wrong = Vec::new();
    for from in &pods {
        for to in &pods {
            if from.ip == to.ip {
                continue;
            }
            let w = want(placement(from.node, from.slot), placement(to.node, to.slot));
            let mut got = (false, false);
            let ok = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
                got = reach(from, to);
                (got == w).then_some(())
            });
            if ok.is_none() {
                wrong.push(format!(
                    "{} -> {}: want tcp/udp {:?}, got {:?}",
                    from.label(),
                    to.label(),
                    w,
                    got
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{scenario}:\n{}", wrong.join("\n"));
}

#[test]
fn reachability_matrix_under_policies() {
    require_root();
    let mut f = Fixture::new(3, 2, true, true);
    f.dir.add_namespace("alpha", &[("team", "a")]);
    f.dir.add_namespace("beta", &[("team", "b")]);
    let pods: Vec<(String, u8, u8, String)> = f
        .topo
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.node, p.slot, p.ip.to_string()))
        .collect();
    for (name, node, slot, ip) in &pods {
        let (ns, app) = placement(*node, *slot);
        f.dir.remove_pod(POD_NAMESPACE, name);
        let node_name = f.topo.node(*node).name.clone();
        f.dir.add_pod(ns, name, &[("app", app)], &node_name, ip);
    }
    f.start_agents(&[1, 2, 3], 0);

    check(&f, "no policy", |_, _| (true, true));

    // Default deny of ingress in alpha.
    f.dir.write_raw(
        "np-deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: alpha}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    );
    check(&f, "default deny in alpha", |_, to| {
        let v = to.0 != "alpha";
        (v, v)
    });

    // Allow by label across nodes: web may reach db, TCP only.
    f.dir.write_raw(
        "np-web-db.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-db, namespace: alpha}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{protocol: TCP, port: 7000, endPort: 9999}]}]\n",
    );
    check(&f, "allow web -> db (TCP) across nodes", |from, to| {
        if to.0 != "alpha" {
            return (true, true);
        }
        (from == ("alpha", "web") && to.1 == "db", false)
    });

    // Deny overriding allow: beta may not reach anything in alpha on UDP,
    // and alpha opens UDP to beta; the deny wins.
    f.dir.remove("np-web-db.yaml");
    f.dir.remove("np-deny.yaml");
    f.dir.write_raw(
        "vp-deny.yaml",
        "apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: no-beta, namespace: alpha}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n  ingressDeny: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]\n",
    );
    check(
        &f,
        "deny overrides allow (namespace isolation)",
        |from, to| {
            let v = !(to.0 == "alpha" && from.0 == "beta");
            (v, v)
        },
    );

    // Egress only: beta may only talk to beta; its ingress stays open.
    f.dir.remove("vp-deny.yaml");
    f.dir.write_raw(
        "np-egress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: egress, namespace: beta}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}]}]\n",
    );
    check(&f, "egress-only policy in beta", |from, to| {
        let v = from.0 != "beta" || to.0 == "beta";
        (v, v)
    });

    // Update under traffic: web -> db (node 1 -> node 2) allowed, a ping
    // flow running, then the policy changes to deny web. The running flow
    // (tracked) keeps working; a new connection fails within 1 s.
    f.dir.remove("np-egress.yaml");
    let db_policy = |from_app: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: alpha}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from_app}}}}}}}]}}]\n")
    };
    f.dir.write_raw("np-db.yaml", &db_policy("web"));
    let (web, db) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let reachable = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (reach(web, db) == (true, true)).then_some(())
    });
    assert!(reachable.is_some(), "web -> db allowed before the update");
    let mut cmd = web.ns.cmd("ping");
    cmd.args(["-n", "-i", "0.2", "-W", "1", "-w", "20", &db.ip.to_string()]);
    let mut ping = Bg::spawn("ping web -> db", cmd, &f.work().join("ping-update.log"));
    // The flow is established once replies come back.
    let flowing = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        ping.log().contains("bytes from").then_some(())
    });
    assert!(flowing.is_some(), "ping flow: {}", ping.log());

    let changed = Instant::now();
    f.dir.write_raw("np-db.yaml", &db_policy("nobody"));
    let denied = poll_until(Duration::from_secs(1), Duration::from_millis(10), || {
        let t = tcp(web, db.ip, 64, "veil-policy", Duration::from_millis(150));
        (!t.ok).then(|| changed.elapsed())
    });
    assert!(
        denied.is_some_and(|d| d <= Duration::from_secs(1)),
        "a new connection web -> db still succeeded 1 s after the policy change"
    );
    // Keep the flow running past the change, then stop it and count.
    let past = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        (changed.elapsed() > Duration::from_secs(2)).then_some(())
    });
    assert!(past.is_some());
    ping.signal(libc::SIGINT);
    let done = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        ping.try_status()
    });
    if done.is_none() {
        ping.kill();
    }
    let p = parse_ping(&ping.log());
    assert!(
        p.transmitted >= 10 && p.received == p.transmitted,
        "the established flow must survive the update: {}",
        p.output
    );
    // Afterwards db admits nobody (new flows), everything else is open.
    check(&f, "after the update", |_, to| {
        let v = to != ("alpha", "db");
        (v, v)
    });
    f.assert_agents_alive();
}
