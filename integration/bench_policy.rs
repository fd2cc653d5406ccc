//! Policy bench: map size and time to apply one change, for 1,000 pods in
//! 100 label sets (10 namespaces x 10 apps) with 200 policies.
//!
//! Run: `cargo test --test bench_policy` (this workspace's test profile is
//! optimized). As root it also times the BPF map fill and the incremental
//! sync; without root it reports the pure compiler only. Prints one line per
//! measurement. A plain `main` (harness = false), so it needs no namespace
//! harness.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use veil::datapath::Datapath;
use veil::identity::{identity_for, Identity};
use veil::policy::compile::IdentityKey;
use veil::policy::{compile, diff, Compiled, Policy, PolicyInput};

const NAMESPACES: usize = 10;
const APPS: usize = 10;
const PODS: usize = 1000;
const POLICIES: usize = 200;

fn policy(i: usize) -> Policy {
    let ns = i % NAMESPACES;
    let app = (i / NAMESPACES) % APPS;
    let peer_app = (app + 1 + i / (NAMESPACES * APPS)) % APPS;
    let port = 1000 + (i as u16) * 7;
    let yaml = format!(
        "metadata: {{name: p{i}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a{peer_app}}}}}}}, {{namespaceSelector: {{matchLabels: {{team: t{}}}}}}}]\n    ports: [{{port: {port}, endPort: {}}}, {{protocol: UDP, port: 53}}]\n  egress:\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a{peer_app}}}}}}}]\n    ports: [{{port: 443}}]\n  - to: [{{ipBlock: {{cidr: 192.0.2.0/24, except: [192.0.2.{}/32]}}}}]\n",
        ns % 3,
        port + 100,
        i % 250
    );
    let obj: NetworkPolicy = serde_yaml::from_str(&yaml).expect("bench YAML");
    Policy::try_from(&obj).expect("bench policy is valid")
}

fn main() {
    let mut ids: BTreeMap<Identity, IdentityKey> = BTreeMap::new();
    for pod in 0..PODS {
        // 1,000 pods, 100 distinct (namespace, labels): identities are per label set.
        let (ns, app) = (pod % NAMESPACES, (pod / NAMESPACES) % APPS);
        let labels: BTreeMap<String, String> = [("app".to_string(), format!("a{app}"))].into();
        ids.insert(
            identity_for(&format!("ns{ns}"), &labels),
            IdentityKey {
                namespace: format!("ns{ns}"),
                labels,
            },
        );
    }
    assert_eq!(ids.len(), NAMESPACES * APPS);
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = (0..NAMESPACES)
        .map(|n| {
            (
                format!("ns{n}"),
                [("team".to_string(), format!("t{}", n % 3))].into(),
            )
        })
        .collect();
    let mut policies: Vec<Policy> = (0..POLICIES).map(policy).collect();

    let run = |policies: &[Policy]| -> Compiled {
        compile(&PolicyInput {
            identities: &ids,
            namespaces: &namespaces,
            policies,
        })
    };
    let t = Instant::now();
    let full = run(&policies);
    let full_time = t.elapsed();
    println!(
        "bench_policy: pods={PODS} label_sets={} policies={POLICIES} entries={} cidrs={} rules={} full_compile={:?}",
        ids.len(),
        full.entries.len(),
        full.cidrs.len(),
        full.rules.len(),
        full_time
    );

    // One change: policy 17 now allows a different port.
    let mut changed = policy(17);
    if let Some(r) = changed.allow[0].first_mut() {
        r.ports = Some(vec![veil::policy::PortMatch::Range {
            proto: 6,
            lo: 8080,
            hi: 8080,
        }]);
    }
    policies[17] = changed;
    let t = Instant::now();
    let after = run(&policies);
    let d = diff(&full.entries, &after.entries);
    let change_time = t.elapsed();
    println!(
        "bench_policy: one policy changed: recompile+diff={:?} upserts={} removes={} (of {} entries)",
        change_time,
        d.upsert.len(),
        d.remove.len(),
        after.entries.len()
    );
    assert!(!d.is_empty() && d.upsert.len() + d.remove.len() < full.entries.len() / 10);

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("bench_policy: not root, BPF map sync not measured");
        return;
    }
    let mut dp = Datapath::load().expect("load the datapath");
    let t = Instant::now();
    let ops = dp.sync_policy(&full).expect("initial sync");
    println!(
        "bench_policy: initial map fill: {ops} writes in {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let ops = dp.sync_policy(&after).expect("incremental sync");
    println!(
        "bench_policy: apply one change to the kernel map: {ops} writes in {:?}",
        t.elapsed()
    );
}
