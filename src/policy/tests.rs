//! Compiler tests: Kubernetes NetworkPolicy semantics and VeilPolicy
//! extensions, checked through `trace`, which performs the datapath's two
//! LPM lookups over the compiled entries.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::compile::{self, trace, IdentityKey, RuleId, Verdict, PEER_ANY};
use super::*;
use crate::identity::{identity_for, Identity};

fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').expect("k=v");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[derive(Default)]
struct World {
    ids: BTreeMap<Identity, IdentityKey>,
    ns: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<Policy>,
}

impl World {
    /// Pods: `prod/app=web`, `prod/app=db`, `dev/app=web`, `dev/app=tool`;
    /// namespaces `prod` (env=prod) and `dev` (env=dev).
    fn new() -> World {
        let mut w = World::default();
        w.ns.insert("prod".into(), labels("env=prod"));
        w.ns.insert("dev".into(), labels("env=dev"));
        for (ns, l) in [
            ("prod", "app=web"),
            ("prod", "app=db"),
            ("dev", "app=web"),
            ("dev", "app=tool"),
        ] {
            w.pod(ns, l);
        }
        w
    }

    fn pod(&mut self, ns: &str, l: &str) -> Identity {
        let id = identity_for(ns, &labels(l));
        self.ids.insert(
            id,
            IdentityKey {
                namespace: ns.into(),
                labels: labels(l),
            },
        );
        id
    }

    fn id(&self, ns: &str, l: &str) -> Identity {
        identity_for(ns, &labels(l))
    }

    fn np(&mut self, yaml: &str) -> &mut Self {
        let obj: NetworkPolicy = serde_yaml::from_str(yaml).expect("test YAML");
        self.policies
            .push(Policy::try_from(&obj).expect("valid policy"));
        self
    }

    fn vp(&mut self, yaml: &str) -> &mut Self {
        let obj: VeilPolicy = serde_yaml::from_str(yaml).expect("test YAML");
        self.policies
            .push(Policy::try_from(&obj).expect("valid policy"));
        self
    }

    fn compile(&self) -> Compiled {
        compile::compile(&PolicyInput {
            identities: &self.ids,
            namespaces: &self.ns,
            policies: &self.policies,
        })
    }
}

/// Whether `from` may open `proto`/`port` to `to`, over the tunnel.
fn ok(c: &Compiled, from: Identity, to: Identity, proto: u8, port: u16) -> bool {
    trace(c, from, to, proto, port, true).allowed()
}

fn tcp(c: &Compiled, from: Identity, to: Identity, port: u16) -> bool {
    ok(c, from, to, PROTO_TCP, port)
}

#[test]
fn no_policy_allows_everything() {
    let w = World::new();
    let c = w.compile();
    assert!(c.entries.is_empty());
    let t = trace(
        &c,
        w.id("prod", "app=web"),
        w.id("dev", "app=tool"),
        PROTO_UDP,
        53,
        false,
    );
    assert!(t.allowed());
    assert_eq!(t.ingress.rule, RuleId::NOT_ISOLATED);
}

#[test]
fn default_deny_ingress_isolates_only_ingress_of_its_namespace() {
    let mut w = World::new();
    w.np("metadata: {name: deny, namespace: prod}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n");
    let c = w.compile();
    let (pweb, pdb, dweb) = (
        w.id("prod", "app=web"),
        w.id("prod", "app=db"),
        w.id("dev", "app=web"),
    );
    // Into prod: denied, from anywhere, any protocol.
    assert!(!tcp(&c, dweb, pweb, 80));
    assert!(!tcp(&c, pdb, pweb, 80));
    assert!(!ok(&c, Identity::WORLD, pdb, PROTO_UDP, 53));
    let t = trace(&c, dweb, pweb, PROTO_TCP, 80, true);
    assert_eq!(t.ingress.rule, RuleId::DEFAULT_DENY);
    assert!(t.egress.allowed, "dev's egress is not isolated");
    // Out of prod: egress is not isolated.
    assert!(tcp(&c, pweb, dweb, 80));
    // The node itself may still reach the pods (kubelet probes).
    assert!(tcp(&c, Identity::HOST, pweb, 8080));
    assert_eq!(
        trace(&c, Identity::HOST, pweb, PROTO_TCP, 1, true)
            .ingress
            .rule,
        RuleId::HOST
    );
    // Default deny is one entry per subject, not one per peer or port.
    assert_eq!(
        c.entries
            .iter()
            .filter(|(_, v)| v.rule == RuleId::DEFAULT_DENY)
            .count(),
        2
    );
}

#[test]
fn policy_types_default_adds_egress_when_egress_rules_exist() {
    let mut w = World::new();
    w.np("metadata: {name: e, namespace: dev}\nspec:\n  podSelector: {matchLabels: {app: tool}}\n  egress: [{to: [{podSelector: {matchLabels: {app: web}}}]}]\n");
    let c = w.compile();
    let (tool, dweb, pweb) = (
        w.id("dev", "app=tool"),
        w.id("dev", "app=web"),
        w.id("prod", "app=web"),
    );
    assert!(c.isolated.contains(&(tool, Direction::Ingress)));
    assert!(c.isolated.contains(&(tool, Direction::Egress)));
    assert!(tcp(&c, tool, dweb, 443));
    assert!(
        !tcp(&c, tool, pweb, 443),
        "podSelector alone = own namespace"
    );
    assert!(!tcp(&c, dweb, tool, 80), "ingress isolated with no rules");
}

#[test]
fn egress_only_policy_leaves_ingress_open() {
    let mut w = World::new();
    w.np("metadata: {name: e, namespace: dev}\nspec: {podSelector: {matchLabels: {app: tool}}, policyTypes: [Egress]}\n");
    let c = w.compile();
    let (tool, dweb) = (w.id("dev", "app=tool"), w.id("dev", "app=web"));
    assert!(!tcp(&c, tool, dweb, 80));
    assert!(tcp(&c, dweb, tool, 80));
}

#[test]
fn allows_of_several_policies_are_unioned() {
    let mut w = World::new();
    w.np("metadata: {name: a, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n");
    w.np("metadata: {name: b, namespace: prod}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}], ports: [{port: 9090}]}]\n");
    let c = w.compile();
    let (pweb, pdb, dtool) = (
        w.id("prod", "app=web"),
        w.id("prod", "app=db"),
        w.id("dev", "app=tool"),
    );
    assert!(tcp(&c, pweb, pdb, 5432));
    assert!(!tcp(&c, pweb, pdb, 9090));
    assert!(tcp(&c, dtool, pdb, 9090));
    assert!(!tcp(&c, dtool, pdb, 5432));
    assert!(tcp(&c, dtool, pweb, 9090));
    // The rule that decided is named.
    let t = trace(&c, pweb, pdb, PROTO_TCP, 5432, true);
    assert_eq!(
        c.describe(t.ingress.rule),
        "NetworkPolicy/prod/a spec.ingress[0]"
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_intersect_in_two_peers_union() {
    let one = "metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: tool}}}]}]\n";
    let two = "metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}, {podSelector: {matchLabels: {app: web}}}]}]\n";
    let mut w = World::new();
    w.np(one);
    let c = w.compile();
    let pdb = w.id("prod", "app=db");
    assert!(tcp(&c, w.id("dev", "app=tool"), pdb, 1));
    assert!(!tcp(&c, w.id("dev", "app=web"), pdb, 1));
    assert!(!tcp(&c, w.id("prod", "app=web"), pdb, 1));

    let mut w = World::new();
    w.np(two);
    let c = w.compile();
    assert!(tcp(&c, w.id("dev", "app=tool"), pdb, 1));
    assert!(tcp(&c, w.id("dev", "app=web"), pdb, 1));
    assert!(tcp(&c, w.id("prod", "app=web"), pdb, 1));
}

#[test]
fn empty_selectors() {
    // podSelector {} in a peer: every pod of the policy's namespace;
    // namespaceSelector {}: every pod of every namespace.
    let mut w = World::new();
    w.np("metadata: {name: same, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {}}]}]\n");
    let c = w.compile();
    let pdb = w.id("prod", "app=db");
    assert!(tcp(&c, w.id("prod", "app=web"), pdb, 1));
    assert!(!tcp(&c, w.id("dev", "app=web"), pdb, 1));
    assert!(!tcp(&c, Identity::WORLD, pdb, 1));

    let mut w = World::new();
    w.np("metadata: {name: all, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n");
    let c = w.compile();
    assert!(tcp(&c, w.id("dev", "app=web"), pdb, 1));
    assert!(
        !tcp(&c, Identity::WORLD, pdb, 1),
        "pods only, not the world"
    );

    // A rule with neither from nor ports: everything, the world included.
    let mut w = World::new();
    w.np("metadata: {name: any, namespace: prod}\nspec:\n  podSelector: {}\n  ingress: [{}]\n");
    let c = w.compile();
    assert!(ok(&c, Identity::WORLD, pdb, 47, 0));
    assert!(c
        .entries
        .keys()
        .all(|k| k.peer == PEER_ANY || k.peer == Identity::HOST.0));
}

#[test]
fn ports_protocols_and_ranges() {
    let mut w = World::new();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 2000}, {protocol: SCTP}]\n");
    let c = w.compile();
    let (from, to) = (w.id("dev", "app=tool"), w.id("prod", "app=web"));
    assert!(tcp(&c, from, to, 80));
    assert!(!tcp(&c, from, to, 81));
    assert!(!ok(&c, from, to, PROTO_UDP, 80), "protocol defaults to TCP");
    for (port, want) in [
        (999, false),
        (1000, true),
        (1500, true),
        (2000, true),
        (2001, false),
    ] {
        assert_eq!(ok(&c, from, to, PROTO_UDP, port), want, "udp/{port}");
    }
    assert!(!tcp(&c, from, to, 1500));
    assert!(ok(&c, from, to, PROTO_SCTP, 7), "port absent = every port");
    assert!(!ok(&c, from, to, 1, 0), "ICMP is not listed");
}

#[test]
fn named_ports_match_nothing() {
    let mut w = World::new();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: http}]}]\n");
    let c = w.compile();
    assert!(!tcp(
        &c,
        w.id("dev", "app=tool"),
        w.id("prod", "app=web"),
        80
    ));
}

#[test]
fn ip_block_with_except() {
    let mut w = World::new();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]}]\n");
    let c = w.compile();
    let to = w.id("prod", "app=web");
    let inside = c.cidrs[&"198.51.100.0/24".parse().unwrap()];
    let hole = c.cidrs[&"198.51.100.128/25".parse().unwrap()];
    assert!(inside.0 >= Identity::FIRST_LOCAL, "{inside}");
    assert_eq!(hole, Identity::WORLD, "the except hole is plain world");
    assert!(tcp(&c, inside, to, 443));
    assert!(!tcp(&c, hole, to, 443));
    assert!(!tcp(&c, Identity::WORLD, to, 443));
    // Pods never match an ipBlock: their address resolves to their identity.
    assert!(!tcp(&c, w.id("dev", "app=tool"), to, 443));
}

#[test]
fn overlapping_ip_blocks_get_one_identity_per_membership() {
    let mut w = World::new();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - {from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{port: 80}]}\n  - {from: [{ipBlock: {cidr: 10.1.2.0/24}}], ports: [{port: 22}]}\n");
    let c = w.compile();
    let to = w.id("prod", "app=web");
    let wide = c.cidrs[&"10.0.0.0/8".parse().unwrap()];
    let hole = c.cidrs[&"10.1.0.0/16".parse().unwrap()];
    let narrow = c.cidrs[&"10.1.2.0/24".parse().unwrap()];
    assert_eq!(hole, Identity::WORLD);
    assert!(tcp(&c, wide, to, 80) && !tcp(&c, wide, to, 22));
    assert!(tcp(&c, narrow, to, 22) && !tcp(&c, narrow, to, 80));
}

#[test]
fn veil_deny_wins_over_allows() {
    let mut w = World::new();
    w.np("metadata: {name: allow, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 5000, endPort: 6000}]}]\n");
    w.vp("apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: deny, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingressDeny: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}], ports: [{port: 5432}]}]\n");
    let c = w.compile();
    let (pdb, pweb, dtool) = (
        w.id("prod", "app=db"),
        w.id("prod", "app=web"),
        w.id("dev", "app=tool"),
    );
    assert!(tcp(&c, pweb, pdb, 5432));
    assert!(tcp(&c, dtool, pdb, 5431));
    assert!(tcp(&c, dtool, pdb, 5433));
    let t = trace(&c, dtool, pdb, PROTO_TCP, 5432, true);
    assert!(!t.allowed());
    assert_eq!(t.ingress.verdict, Some(Verdict::Deny));
    assert_eq!(
        c.describe(t.ingress.rule),
        "VeilPolicy/prod/deny spec.ingressDeny[0]"
    );
    // Blocks are disjoint within a table: no two entries of one
    // (subject, peer, direction) overlap, so LPM order never matters.
    let keys: Vec<_> = c
        .entries
        .keys()
        .filter(|k| k.subject == pdb && k.peer == dtool.0)
        .collect();
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            if a.direction == b.direction {
                assert!(
                    a.block.end() < b.block.start || b.block.end() < a.block.start,
                    "{a:?} {b:?}"
                );
            }
        }
    }
}

#[test]
fn deny_for_any_peer_beats_allow_for_a_specific_peer_and_does_not_isolate() {
    let mut w = World::new();
    w.vp("apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: d, namespace: dev}\nspec:\n  podSelector: {}\n  egressDeny: [{ports: [{protocol: UDP, port: 53}]}]\n");
    let c = w.compile();
    let (tool, pweb) = (w.id("dev", "app=tool"), w.id("prod", "app=web"));
    assert!(!ok(&c, tool, pweb, PROTO_UDP, 53));
    assert!(
        ok(&c, tool, pweb, PROTO_UDP, 54),
        "deny rules alone do not isolate"
    );
    assert!(tcp(&c, tool, pweb, 53));
    assert!(!c.isolated.contains(&(tool, Direction::Egress)));

    w.np("metadata: {name: a, namespace: dev}\nspec:\n  podSelector: {}\n  egress: [{to: [{namespaceSelector: {}}]}]\n  policyTypes: [Egress]\n");
    let c = w.compile();
    assert!(
        !ok(&c, tool, pweb, PROTO_UDP, 53),
        "specific allow, any-peer deny"
    );
    assert!(ok(&c, tool, pweb, PROTO_UDP, 54));
    assert!(
        !ok(&c, tool, Identity::WORLD, PROTO_UDP, 54),
        "egress now isolated"
    );
}

#[test]
fn require_encryption_allows_only_through_the_tunnel() {
    let mut w = World::new();
    w.vp("apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: enc, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  requireEncryption: true\n  ingress: [{from: [{namespaceSelector: {}}]}]\n");
    // A plain allow of the same flow does not relax the requirement.
    w.np("metadata: {name: plain, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {}}]}]\n");
    let c = w.compile();
    let (pweb, pdb) = (w.id("prod", "app=web"), w.id("prod", "app=db"));
    assert!(trace(&c, pweb, pdb, PROTO_TCP, 1, true).allowed());
    let t = trace(&c, pweb, pdb, PROTO_TCP, 1, false);
    assert!(!t.allowed());
    assert_eq!(t.ingress.verdict, Some(Verdict::AllowEncrypted));
}

#[test]
fn namespace_relabel_changes_the_result() {
    let mut w = World::new();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {trusted: 'yes'}}}]}]\n");
    let (tool, pweb) = (w.id("dev", "app=tool"), w.id("prod", "app=web"));
    assert!(!tcp(&w.compile(), tool, pweb, 80));
    w.ns.get_mut("dev")
        .unwrap()
        .insert("trusted".into(), "yes".into());
    assert!(tcp(&w.compile(), tool, pweb, 80));
    // The automatic name label selects a namespace without a Namespace object.
    let mut w = World::new();
    w.ns.clear();
    w.np("metadata: {name: p, namespace: prod}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}}]}]\n");
    let c = w.compile();
    assert!(tcp(&c, tool, pweb, 80));
    assert!(!tcp(&c, w.id("prod", "app=db"), pweb, 80));
}

#[test]
fn one_policy_change_touches_only_its_entries() {
    let mut w = World::new();
    w.np("metadata: {name: a, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n");
    w.np("metadata: {name: b, namespace: dev}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]\n");
    let before = w.compile();
    w.np("metadata: {name: c, namespace: dev}\nspec:\n  podSelector: {matchLabels: {app: tool}}\n  ingress: [{ports: [{port: 22}]}]\n");
    let after = w.compile();
    let d = compile::diff(&before.entries, &after.entries);
    assert!(d.remove.is_empty());
    let tool = w.id("dev", "app=tool");
    assert!(!d.upsert.is_empty());
    assert!(d.upsert.iter().all(|(k, _)| k.subject == tool), "{d:?}");
    // Applying the diff gives the new map.
    let mut applied = before.entries.clone();
    for (k, v) in &d.upsert {
        applied.insert(*k, *v);
    }
    for k in &d.remove {
        applied.remove(k);
    }
    assert_eq!(applied, after.entries);
    // And removing it again removes exactly those.
    w.policies.pop();
    let back = w.compile();
    let d2 = compile::diff(&after.entries, &back.entries);
    assert!(d2.upsert.is_empty());
    assert_eq!(d2.remove.len(), d.upsert.len());
    assert_eq!(back, before);
}

#[test]
fn invalid_policies_are_rejected_naming_the_object() {
    let cases = [
        (
            "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
            "not strictly inside",
        ),
        (
            "ingress: [{ports: [{port: 0}]}]",
            "spec.ingress[0].ports[0].port: 0",
        ),
        ("ingress: [{ports: [{port: 70000}]}]", "70000 is not a port"),
        (
            "ingress: [{ports: [{port: 90, endPort: 80}]}]",
            "endPort: 80 is below port 90",
        ),
        (
            "ingress: [{ports: [{protocol: ICMP}]}]",
            "`ICMP` is not TCP, UDP or SCTP",
        ),
        ("ingress: [{ports: [{port: Bad_Name}]}]", "valid port name"),
        ("ingress: [{from: [{}]}]", "a peer needs"),
        (
            "ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Foo}]}}]}]",
            "unknown operator",
        ),
        ("policyTypes: [Sideways]", "`Sideways`"),
    ];
    for (spec, want) in cases {
        let yaml = format!(
            "metadata: {{name: bad, namespace: prod}}\nspec:\n  podSelector: {{}}\n  {spec}\n"
        );
        let obj: NetworkPolicy = serde_yaml::from_str(&yaml).expect("test YAML");
        let err = Policy::try_from(&obj).unwrap_err().to_string();
        assert!(err.starts_with("NetworkPolicy/prod/bad: "), "{err}");
        assert!(err.contains(want), "{spec}: {err}");
    }
    let vp: VeilPolicy = serde_yaml::from_str(
        "apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {namespace: x}\n",
    )
    .unwrap();
    assert!(Policy::try_from(&vp)
        .unwrap_err()
        .to_string()
        .contains("metadata.name"));
}

/// The file source reads both kinds; an invalid edit keeps the last good
/// version (nothing it allowed is dropped); trace names the deciding rule.
#[test]
fn file_source_policies_trace_and_bad_edits() {
    use crate::cluster::file::FileSource;
    let dir = tempfile::tempdir().expect("tempdir");
    let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    w(
        "cluster.yaml",
        "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {encryption: {enabled: true}}\n---\n\
apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {env: prod}}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: prod, labels: {app: web}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.244.1.10}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: prod, labels: {app: db}}\nspec: {nodeName: n2}\nstatus: {podIP: 10.244.2.10}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: db2, namespace: prod, labels: {app: db}}\nspec: {nodeName: n1}\nstatus: {podIP: 10.244.1.11}\n",
    );
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n";
    w("np.yaml", np);
    w("vp.yaml", "apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: enc, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  requireEncryption: true\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 6000}]}]\n");
    let mut src = FileSource::new(dir.path());
    let (mut state, diags) = src.load();
    assert!(
        diags.iter().all(|d| !d.object.contains("Policy")),
        "{diags:?}"
    );
    // Until identities are published, every pod is `init`; publish them
    // as the agents do (into the cluster dir), then read them back.
    let web = crate::identity::Published::resolve(&state.identities).of("prod", &labels("app=web"));
    assert_eq!(web, Identity::INIT);
    let wanted = crate::identity::wanted(&state);
    let (done, errors) =
        crate::identity::allocate_missing(&mut state.identities, &wanted, &mut src);
    assert!(errors.is_empty() && done.len() == 2, "{errors:?} {done:?}");
    let (reread, _) = src.load();
    assert_eq!(reread.identities, state.identities);
    let state = reread;
    assert_eq!(
        state.policies.keys().collect::<Vec<_>>(),
        ["NetworkPolicy/prod/db", "VeilPolicy/prod/enc"]
    );
    let (ok, text) = trace_pods(&state, "prod/web", "prod/db", "5432/tcp").unwrap();
    assert!(ok, "{text}");
    assert!(
        text.contains("NetworkPolicy/prod/db spec.ingress[0]"),
        "{text}"
    );
    assert!(text.contains("WireGuard tunnel"), "{text}");
    let (ok, text) = trace_pods(&state, "prod/web", "prod/db", "80/tcp").unwrap();
    assert!(!ok);
    assert!(
        text.contains("isolated by policy, and no rule allows it"),
        "{text}"
    );
    assert!(text.ends_with("verdict: DENY\n"), "{text}");
    // Same node: plaintext, so the encrypted-only allow refuses it.
    let (ok, text) = trace_pods(&state, "prod/web", "prod/db2", "6000/tcp").unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("allowed only over the tunnel"), "{text}");
    assert!(
        trace_pods(&state, "prod/web", "prod/db", "6000/tcp")
            .unwrap()
            .0
    );
    assert!(trace_pods(&state, "prod/nope", "prod/db", "80").is_err());
    assert!(trace_pods(&state, "prod/web", "prod/db", "80/icmp").is_err());

    // A broken edit: diagnosed by name, the last good policy stays.
    w("np.yaml", &np.replace("port: 5432", "port: 99999"));
    let (state2, diags) = src.load();
    let d = diags
        .iter()
        .find(|d| d.object == "NetworkPolicy/prod/db")
        .expect("diagnostic for the policy");
    assert!(
        d.problem.contains("99999 is not a port") && d.problem.contains("last good"),
        "{d}"
    );
    assert_eq!(state2.policies, state.policies);
    assert!(
        trace_pods(&state2, "prod/web", "prod/db", "5432/tcp")
            .unwrap()
            .0
    );
}

/// Pods whose identity is not published are `init`: fail closed where a
/// policy would isolate them, untouched where none would.
#[test]
fn unpublished_pods_are_init_and_fail_closed_when_isolated() {
    use crate::cluster::{ClusterState, PodInfo};
    let mut state = ClusterState::default();
    for (name, app) in [("web", "web"), ("db", "db")] {
        state.pods.insert(
            ("prod".into(), name.into()),
            PodInfo {
                namespace: "prod".into(),
                name: name.into(),
                labels: labels(&format!("app={app}")),
                node_name: Some("n1".into()),
                pod_ip: None,
                pod_ips: vec![],
                host_network: false,
            },
        );
    }
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_yaml::from_str(
        "metadata: {name: db, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {}}]}]\n",
    )
    .unwrap();
    let p = Policy::try_from(&np).unwrap();
    state.policies.insert(p.id.to_string(), p);

    // Nothing published: db would be isolated for ingress, so `init` is,
    // with only its own node allowed; egress stays open (nobody isolates it).
    let c = crate::policy::compile_state(&state);
    assert!(c.isolated.contains(&(Identity::INIT, Direction::Ingress)));
    assert!(!c.isolated.contains(&(Identity::INIT, Direction::Egress)));
    let web_id = identity_for("prod", &labels("app=web"));
    assert!(!ok(&c, web_id, Identity::INIT, PROTO_TCP, 80));
    assert!(ok(&c, Identity::HOST, Identity::INIT, PROTO_TCP, 80));
    assert!(ok(&c, Identity::INIT, web_id, PROTO_TCP, 80));

    // Published (db only): db gets its real policy, web is still `init`
    // and, as a peer, no label selector matches it.
    let mut store = crate::identity::MemoryStore::default();
    let db_key = crate::identity::IdentityKey {
        namespace: "prod".into(),
        labels: labels("app=db"),
    };
    crate::identity::allocate_missing(&mut state.identities, &[db_key].into(), &mut store);
    let c = crate::policy::compile_state(&state);
    let db_id =
        crate::identity::Published::resolve(&state.identities).of("prod", &labels("app=db"));
    assert_ne!(db_id, Identity::INIT);
    assert!(
        !c.isolated.contains(&(Identity::INIT, Direction::Ingress)),
        "web is not isolated"
    );
    assert!(
        !ok(&c, Identity::INIT, db_id, PROTO_TCP, 80),
        "init matches no podSelector"
    );
}
