//! Policy enforcement in the eBPF programs (root required): policies are
//! compiled by the real compiler (`veil::policy`), written with
//! `Datapath::sync_policy`, and packets are run through `from_pod` / `to_pod`
//! with BPF_PROG_TEST_RUN. Covers allow, deny (a VeilPolicy deny over an
//! allow), the reply of an allowed connection, an unknown source identity,
//! requireEncryption, an incremental update with a connection in flight, ICMP
//! echo tracked by identifier, and the close timeout after TCP FIN/RST.
mod harness;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use harness::netns::require_root;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use veil::datapath::{Datapath, DatapathConfig, EndpointValue, Hook, Reason, RemoteValue};
use veil::identity::{identity_for, Identity};
use veil::policy::compile::IdentityKey;
use veil::policy::{compile, Compiled, Direction, Policy, PolicyInput, VeilPolicy};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TUN_IFINDEX: u32 = 4242;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10); // prod app=web, local
const DB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11); // prod app=db, local
const TOOL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20); // dev app=tool, remote (peer ready)
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7); // no identity

const TCP: u8 = 6;
const UDP: u8 = 17;

fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn id(ns: &str, l: &str) -> Identity {
    identity_for(ns, &labels(l))
}

struct Env {
    dp: Datapath,
    ids: BTreeMap<Identity, IdentityKey>,
    ns: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<Policy>,
}

impl Env {
    fn new() -> Env {
        require_root();
        let mut dp = Datapath::load().expect("load the datapath");
        dp.set_config(DatapathConfig {
            enabled: true,
            strict: true,
            tun_ifindex: TUN_IFINDEX,
            tun_mtu: 1420,
        })
        .expect("config");
        let mut ids = BTreeMap::new();
        for (ns, l) in [("prod", "app=web"), ("prod", "app=db"), ("dev", "app=tool")] {
            ids.insert(
                id(ns, l),
                IdentityKey {
                    namespace: ns.into(),
                    labels: labels(l),
                },
            );
        }
        let mut eps = BTreeMap::new();
        for (ip, identity, ifindex) in [
            (WEB, id("prod", "app=web"), 5001),
            (DB, id("prod", "app=db"), 5002),
        ] {
            eps.insert(
                IpAddr::V4(ip),
                EndpointValue {
                    identity: identity.0,
                    ifindex,
                },
            );
        }
        dp.sync_endpoints(&eps).expect("endpoints");
        let mut remote = BTreeMap::new();
        remote.insert(
            "10.244.1.0/24".parse::<IpNet>().unwrap(),
            RemoteValue {
                has_peer: true,
                local: false,
                node_id: 1,
            },
        );
        dp.sync_remote(&remote).expect("remote");
        let mut ipc = BTreeMap::new();
        ipc.insert(IpAddr::V4(TOOL), id("dev", "app=tool").0);
        ipc.insert(IpAddr::V4(WEB), id("prod", "app=web").0);
        ipc.insert(IpAddr::V4(DB), id("prod", "app=db").0);
        dp.sync_ipcache(&ipc).expect("ipcache");
        let mut ns = BTreeMap::new();
        ns.insert("prod".to_string(), labels("env=prod"));
        ns.insert("dev".to_string(), labels("env=dev"));
        Env {
            dp,
            ids,
            ns,
            policies: Vec::new(),
        }
    }

    fn np(&mut self, yaml: &str) -> &mut Self {
        let obj: NetworkPolicy = serde_yaml::from_str(yaml).expect("test YAML");
        self.policies.push(Policy::try_from(&obj).expect("valid"));
        self
    }

    fn vp(&mut self, yaml: &str) -> &mut Self {
        let obj: VeilPolicy = serde_yaml::from_str(yaml).expect("test YAML");
        self.policies.push(Policy::try_from(&obj).expect("valid"));
        self
    }

    fn apply(&mut self) -> (Compiled, usize) {
        let c = compile(&PolicyInput {
            identities: &self.ids,
            namespaces: &self.ns,
            policies: &self.policies,
        });
        let ops = self.dp.sync_policy(&c).expect("sync policy");
        (c, ops)
    }

    fn run(&self, hook: Hook, pkt: &[u8]) -> u32 {
        let prog: &SchedClassifier = self.dp.classifier(hook).expect("program");
        let mut out = vec![0u8; pkt.len() + 64];
        prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN")
        .return_value
    }

    /// Runs `from_pod` (the pod sends).
    fn egress(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> u32 {
        self.run(Hook::FromPod, &frame(src, dst, proto, sport, dport))
    }

    /// Runs `to_pod` (a decrypted packet arrives).
    fn ingress(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> u32 {
        self.run(Hook::ToPod, &frame(src, dst, proto, sport, dport))
    }

    fn drops(&self, r: Reason) -> u64 {
        self.dp.metrics().expect("metrics")[&r].0
    }
}

/// An Ethernet + IPv4 + TCP (ACK, no options) or UDP frame. Checksums of
/// L4 are not checked by the programs and left zero.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, 12, 0, 0]);
    }
    l4.extend_from_slice(b"veil");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&l4);
    let mut f = vec![
        0xaa, 0xbb, 0xcc, 0, 0, 0xfe, 0xaa, 0xbb, 0xcc, 0, 0, 1, 0x08, 0x00,
    ];
    f.extend_from_slice(&ip);
    f
}

const DB_FROM_WEB_5432: &str = "metadata: {name: db, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n";

#[test]
fn allow_and_default_deny_same_node_and_from_the_tunnel() {
    let mut env = Env::new();
    // No policy: everything passes.
    assert_eq!(env.egress(WEB, DB, TCP, 40000, 80), TC_ACT_OK);
    env.np(DB_FROM_WEB_5432);
    env.apply();
    assert_eq!(env.egress(WEB, DB, TCP, 40001, 5432), TC_ACT_OK);
    assert_eq!(env.egress(WEB, DB, TCP, 40002, 80), TC_ACT_SHOT);
    assert_eq!(env.egress(WEB, DB, UDP, 40003, 5432), TC_ACT_SHOT);
    // From another node: judged at to_pod on the authenticated source.
    assert_eq!(env.ingress(TOOL, DB, TCP, 40004, 5432), TC_ACT_SHOT);
    assert_eq!(env.ingress(WEB, DB, TCP, 40005, 5432), TC_ACT_REDIRECT);
    assert_eq!(env.drops(Reason::DropPolicy), 3);
    let drops = env.dp.policy_drops().expect("drops");
    let (w, d, t) = (
        id("prod", "app=web").0,
        id("prod", "app=db").0,
        id("dev", "app=tool").0,
    );
    assert_eq!(drops[&(w, d, Direction::Ingress, Reason::DropPolicy)], 2);
    assert_eq!(drops[&(t, d, Direction::Ingress, Reason::DropPolicy)], 1);
    // web is not isolated: its other traffic still flows.
    assert_eq!(env.egress(WEB, TOOL, TCP, 40006, 443), TC_ACT_REDIRECT);
}

#[test]
fn veil_deny_wins_over_allow_on_egress() {
    let mut env = Env::new();
    env.np("metadata: {name: out, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}}]}]\n");
    env.vp("apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: nodns, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egressDeny: [{to: [{namespaceSelector: {matchLabels: {env: dev}}}], ports: [{protocol: UDP, port: 53}]}]\n");
    env.apply();
    assert_eq!(env.egress(WEB, TOOL, UDP, 5000, 53), TC_ACT_SHOT);
    assert_eq!(env.egress(WEB, TOOL, UDP, 5000, 54), TC_ACT_REDIRECT);
    assert_eq!(env.egress(WEB, TOOL, TCP, 5000, 53), TC_ACT_REDIRECT);
    assert_eq!(
        env.egress(WEB, OUTSIDE, TCP, 5000, 80),
        TC_ACT_SHOT,
        "world is not a namespace"
    );
    let drops = env.dp.policy_drops().expect("drops");
    let key = (
        id("prod", "app=web").0,
        id("dev", "app=tool").0,
        Direction::Egress,
        Reason::DropPolicy,
    );
    assert_eq!(drops[&key], 1);
}

#[test]
fn reply_of_an_allowed_connection_passes_new_connections_back_are_judged() {
    let mut env = Env::new();
    // web may open connections to tool:80, and accepts nothing itself.
    env.np("metadata: {name: web, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  egress: [{to: [{namespaceSelector: {}}], ports: [{port: 80}]}]\n");
    env.apply();
    assert_eq!(
        env.ingress(TOOL, WEB, TCP, 80, 41000),
        TC_ACT_SHOT,
        "no connection yet"
    );
    assert_eq!(env.egress(WEB, TOOL, TCP, 41000, 80), TC_ACT_REDIRECT);
    assert_eq!(
        env.ingress(TOOL, WEB, TCP, 80, 41000),
        TC_ACT_REDIRECT,
        "the reply"
    );
    assert_eq!(
        env.egress(WEB, TOOL, TCP, 41000, 80),
        TC_ACT_REDIRECT,
        "and on"
    );
    // A new connection from tool to web, even from port 80, is its own flow.
    assert_eq!(env.ingress(TOOL, WEB, TCP, 80, 41001), TC_ACT_SHOT);
    assert_eq!(env.ingress(TOOL, WEB, TCP, 41000, 80), TC_ACT_SHOT);
    // Same node: db replying to web's allowed connection.
    env.np("metadata: {name: web2, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n");
    env.apply();
    assert_eq!(env.egress(DB, WEB, TCP, 5432, 42000), TC_ACT_SHOT);
    assert_eq!(env.egress(WEB, DB, TCP, 42000, 5432), TC_ACT_OK);
    assert_eq!(env.egress(DB, WEB, TCP, 5432, 42000), TC_ACT_OK);
}

#[test]
fn unknown_source_identity_is_world_and_ip_blocks_name_it() {
    let mut env = Env::new();
    env.np("metadata: {name: pods, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {}}]}]\n");
    env.apply();
    assert_eq!(env.ingress(OUTSIDE, DB, TCP, 1234, 5432), TC_ACT_SHOT);
    assert_eq!(env.ingress(TOOL, DB, TCP, 1234, 5432), TC_ACT_REDIRECT);
    env.np("metadata: {name: outside, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.0/30]}}]}]\n");
    let (c, _) = env.apply();
    assert_eq!(c.cidrs.len(), 2);
    assert_eq!(env.ingress(OUTSIDE, DB, TCP, 1235, 5432), TC_ACT_REDIRECT);
    assert_eq!(
        env.ingress(Ipv4Addr::new(198, 51, 100, 2), DB, TCP, 1235, 5432),
        TC_ACT_SHOT,
        "except"
    );
    assert_eq!(
        env.ingress(Ipv4Addr::new(203, 0, 113, 1), DB, TCP, 1235, 5432),
        TC_ACT_SHOT
    );
}

#[test]
fn require_encryption_refuses_the_plaintext_same_node_path() {
    let mut env = Env::new();
    env.vp("apiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: enc, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  requireEncryption: true\n  ingress: [{from: [{namespaceSelector: {}}]}]\n");
    env.apply();
    assert_eq!(env.egress(WEB, DB, TCP, 43000, 5432), TC_ACT_SHOT);
    assert_eq!(env.drops(Reason::DropPolicyUnencrypted), 1);
    assert_eq!(env.ingress(TOOL, DB, TCP, 43001, 5432), TC_ACT_REDIRECT);
}

#[test]
fn incremental_update_keeps_established_flows_and_denies_new_ones() {
    let mut env = Env::new();
    env.np(DB_FROM_WEB_5432);
    env.np("metadata: {name: tool, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}], ports: [{port: 5432}]}]\n");
    let (_, first) = env.apply();
    assert!(first > 0);
    assert_eq!(env.ingress(TOOL, DB, TCP, 44000, 5432), TC_ACT_REDIRECT);
    // Remove the policy for tool: only its entries change.
    env.policies.pop();
    let before = env.dp.policy_entries();
    let (_, ops) = env.apply();
    assert!(ops > 0 && ops < first, "ops {ops} of first {first}");
    assert!(env.dp.policy_entries() < before);
    assert_eq!(
        env.ingress(TOOL, DB, TCP, 44000, 5432),
        TC_ACT_REDIRECT,
        "established"
    );
    assert_eq!(env.ingress(TOOL, DB, TCP, 44001, 5432), TC_ACT_SHOT, "new");
    assert_eq!(
        env.egress(WEB, DB, TCP, 44002, 5432),
        TC_ACT_OK,
        "web untouched"
    );
    // Re-applying the same set writes nothing.
    assert_eq!(env.apply().1, 0);
}

const ICMP: u8 = 1;
const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// An ICMP echo request or reply (`kind`) with identifier `ident`.
fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, ident: u16) -> Vec<u8> {
    // Type, code, checksum (not checked), identifier, sequence: the
    // identifier sits where TCP/UDP keep the destination port.
    let mut f = frame(src, dst, ICMP, u16::from(kind) << 8, 0);
    let l4 = 14 + 20;
    f[l4 + 4..l4 + 6].copy_from_slice(&ident.to_be_bytes());
    f[l4 + 6..l4 + 8].copy_from_slice(&1u16.to_be_bytes());
    f
}

/// A TCP segment with these flags.
fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = frame(src, dst, TCP, sport, dport);
    f[14 + 20 + 13] = flags;
    f
}

/// web may send anything to tool; nothing may reach web (ingress isolated).
const WEB_OUT_ONLY: &str = "metadata: {name: web, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  egress: [{to: [{namespaceSelector: {}}]}]\n";

#[test]
fn echo_replies_pass_only_for_the_ping_they_answer() {
    let mut env = Env::new();
    env.np(WEB_OUT_ONLY);
    env.apply();
    let ping =
        |env: &Env, src, dst, kind, ident, hook| env.run(hook, &icmp_frame(src, dst, kind, ident));
    assert_eq!(
        ping(&env, TOOL, WEB, ECHO_REPLY, 7, Hook::ToPod),
        TC_ACT_SHOT,
        "an unsolicited echo reply"
    );
    assert_eq!(
        ping(&env, WEB, TOOL, ECHO_REQUEST, 7, Hook::FromPod),
        TC_ACT_REDIRECT,
        "web's ping is allowed by its egress policy"
    );
    assert_eq!(
        ping(&env, TOOL, WEB, ECHO_REPLY, 7, Hook::ToPod),
        TC_ACT_REDIRECT,
        "its reply"
    );
    assert_eq!(
        ping(&env, TOOL, WEB, ECHO_REPLY, 8, Hook::ToPod),
        TC_ACT_SHOT,
        "a reply with another identifier answers no tracked ping"
    );
    assert_eq!(
        ping(&env, TOOL, WEB, ECHO_REQUEST, 7, Hook::ToPod),
        TC_ACT_SHOT,
        "a request the other way, even with the same identifier, is a new flow"
    );
    assert_eq!(
        ping(&env, DB, WEB, ECHO_REPLY, 7, Hook::FromPod),
        TC_ACT_SHOT,
        "a reply from a pod web did not ping"
    );
    // The drops are counted against tool -> web ingress.
    let drops = env.dp.policy_drops().expect("drops");
    let key = (
        id("dev", "app=tool").0,
        id("prod", "app=web").0,
        Direction::Ingress,
        Reason::DropPolicy,
    );
    assert_eq!(drops[&key], 3);
    // Same node: web pings db (db is not isolated), db's reply reaches web.
    assert_eq!(
        ping(&env, WEB, DB, ECHO_REQUEST, 9, Hook::FromPod),
        TC_ACT_OK
    );
    assert_eq!(ping(&env, DB, WEB, ECHO_REPLY, 9, Hook::FromPod), TC_ACT_OK);
}

#[test]
fn fin_and_rst_shorten_the_flow_to_the_close_timeout() {
    let mut env = Env::new();
    env.np(WEB_OUT_ONLY);
    env.apply();
    let out =
        |env: &Env, sport, flags| env.run(Hook::FromPod, &tcp_frame(WEB, TOOL, sport, 80, flags));
    let back =
        |env: &Env, dport, flags| env.run(Hook::ToPod, &tcp_frame(TOOL, WEB, 80, dport, flags));
    // Three connections: one closed by FIN, one by RST, one left open.
    for port in [45000, 45001, 45002] {
        assert_eq!(out(&env, port, SYN), TC_ACT_REDIRECT);
        assert_eq!(back(&env, port, SYN | ACK), TC_ACT_REDIRECT);
    }
    assert_eq!(out(&env, 45000, FIN | ACK), TC_ACT_REDIRECT);
    // The teardown still passes right after the FIN.
    assert_eq!(back(&env, 45000, FIN | ACK), TC_ACT_REDIRECT);
    assert_eq!(back(&env, 45001, RST), TC_ACT_REDIRECT);
    // A new connection reusing a closing tuple is judged again: tool may
    // not connect to web, so tool's SYN is dropped, although the tuple
    // matches web's closing flow in reverse.
    assert_eq!(back(&env, 45000, SYN), TC_ACT_SHOT);
    assert_eq!(
        back(&env, 45000, ACK),
        TC_ACT_REDIRECT,
        "the last ACK of the teardown"
    );
    // The kernel clock cannot be moved and every packet that hits an entry
    // refreshes it, so the close timeout (10 s) is waited out without
    // probing; then the closed flows' replies are dropped while the open
    // one, idle just as long, keeps passing (1 h timeout).
    std::thread::sleep(std::time::Duration::from_millis(10_500));
    assert_eq!(
        back(&env, 45000, ACK),
        TC_ACT_SHOT,
        "FIN-closed flow expired"
    );
    assert_eq!(
        back(&env, 45001, ACK),
        TC_ACT_SHOT,
        "RST-closed flow expired"
    );
    assert_eq!(
        back(&env, 45002, ACK),
        TC_ACT_REDIRECT,
        "the open flow lives on"
    );
}

#[test]
fn allowed_verdicts_are_counted_per_direction() {
    let mut env = Env::new();
    let allowed = |env: &Env| env.dp.policy_allowed().expect("allowed counters");
    let zero = allowed(&env);
    assert_eq!(zero[&Direction::Ingress], 0);
    assert_eq!(zero[&Direction::Egress], 0);
    env.np(DB_FROM_WEB_5432);
    env.apply();
    // Same node: both ends judged at from_pod, one count in each direction.
    assert_eq!(env.egress(WEB, DB, TCP, 41001, 5432), TC_ACT_OK);
    let a = allowed(&env);
    assert_eq!((a[&Direction::Egress], a[&Direction::Ingress]), (1, 1));
    // Denied: no allowed count.
    assert_eq!(env.egress(WEB, DB, TCP, 41002, 80), TC_ACT_SHOT);
    // To a remote pod: the sender's egress only.
    assert_eq!(env.egress(WEB, TOOL, TCP, 41003, 443), TC_ACT_REDIRECT);
    // From the tunnel: the receiver's ingress only.
    assert_eq!(env.ingress(WEB, DB, TCP, 41004, 5432), TC_ACT_REDIRECT);
    assert_eq!(env.ingress(TOOL, DB, TCP, 41005, 5432), TC_ACT_SHOT);
    let a = allowed(&env);
    assert_eq!((a[&Direction::Egress], a[&Direction::Ingress]), (2, 2));
    // A later packet of an admitted flow (conntrack) counts too: the
    // counter is per packet, like the denials.
    assert_eq!(env.egress(WEB, DB, TCP, 41001, 5432), TC_ACT_OK);
    let a = allowed(&env);
    assert_eq!((a[&Direction::Egress], a[&Direction::Ingress]), (3, 3));
}
