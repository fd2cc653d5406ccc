//! The cluster-wide enable flag, switched at runtime without dropping traffic.
//!
//! `spec.encryption.enabled` changes on every node at a slightly different
//! moment, so a node cannot simply start (or stop) encrypting when it reads
//! the flag: its peer may not be able to decrypt yet (or may already refuse
//! plaintext). Each pair of nodes therefore switches on its own, driven by
//! what the *receiver* reports in its `VeilNode` status
//! ([`EncryptionStatus`]), in two phases like a two-phase commit:
//!
//! Enabling (flag false -> true):
//! 1. every node keeps accepting plaintext and reports `ready` once its
//!    engine holds all the peers it accepted;
//! 2. a sender switches a peer to encrypted once that peer is `ready` and
//!    lists the sender among its peers (so it will answer our handshake);
//! 3. once every node reports "ready, nothing sent in plaintext", the
//!    transition is over: in strict mode a peer that is not reachable
//!    encrypted is now dropped, never sent plaintext, and nodes report that
//!    they no longer accept plaintext.
//!
//! Disabling (true -> false) is the mirror: every node at once reports that
//! it accepts plaintext; a sender keeps encrypting to a peer until that peer
//! says so, then switches it to plaintext.
//!
//! The statuses are unsigned, so only the direction *towards* encryption
//! may depend on them while the flag is on: a peer once sent encrypted
//! stays encrypted (its status can only be forged into "not ready", which
//! must not turn it back to plaintext), and the plaintext window of phase 1
//! exists only in an agent that itself saw the flag off, until it saw the
//! cluster converge. An agent started with the flag on is strict from the
//! start (fail closed, as before this module).
//!
//! Pure: [`Transition::step`] is a function of its memory and input.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::{ClusterState, EncryptionStatus};
use crate::reconcile::Desired;

/// How this node sends to one peer's pod CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SendMode {
    /// Through the tunnel.
    Encrypted,
    /// The CNI's route, in the clear.
    Plaintext,
    /// Dropped (strict mode, no usable encrypted path).
    Drop,
}

/// What this node knows about one remote node, for the send decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerView {
    /// Its announcement was accepted and it is configured in our engine.
    pub has_peer: bool,
    /// An external WireGuard machine (`veilctl peer add`): it speaks only
    /// WireGuard and publishes no status, so it is always ready.
    pub external: bool,
    /// It reports `ready` and lists us among its peers: it can decrypt
    /// what we send.
    pub receives_from_us: bool,
    /// It reports that it delivers plaintext (true when it reports nothing).
    pub accepts_plaintext: bool,
}

/// The cluster config as the transition uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    pub enabled: bool,
    pub strict: bool,
}

/// What one agent remembers between passes. Lost on restart, on purpose:
/// a restarted agent is fail-closed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transition {
    /// This agent saw the flag off since it last saw the cluster converge:
    /// the plaintext window of an enable is open.
    pub saw_disabled: bool,
    /// Peers currently sent encrypted.
    pub encrypted: BTreeSet<String>,
}

/// The outcome of one pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Per remote node (and external peer).
    pub modes: BTreeMap<String, SendMode>,
    /// Whether BPF steering and the safety-net rule stay on: while
    /// enabled, and while disabling as long as some peer is still encrypted.
    pub datapath_enabled: bool,
    /// Whether a peer without an encrypted path is dropped (strict mode,
    /// once any enable transition is over).
    pub datapath_strict: bool,
    /// This node's report, for its `VeilNode` status (`ready` is left to
    /// the caller, which knows whether the engine is configured).
    pub status: EncryptionStatus,
}

impl Transition {
    /// Whether an enable transition is in progress from this agent's view.
    pub fn window_open(&self, flags: Flags) -> bool {
        flags.enabled && self.saw_disabled
    }

    /// Decides every peer's send mode. `converged`: every node reports the
    /// flag on, ready, and nothing sent in plaintext ([`all_encrypting`]).
    pub fn step(
        &mut self,
        flags: Flags,
        converged: bool,
        peers: &BTreeMap<String, PeerView>,
    ) -> Plan {
        if !flags.enabled {
            self.saw_disabled = true;
        } else if converged {
            self.saw_disabled = false;
        }
        let window = self.window_open(flags);
        let fail_closed = flags.enabled && flags.strict && !window;
        let mut plan = Plan {
            datapath_strict: fail_closed,
            ..Plan::default()
        };
        let mut encrypted = BTreeSet::new();
        for (name, view) in peers {
            let mode = send_mode(flags, window, self.encrypted.contains(name), view);
            if mode == SendMode::Encrypted {
                encrypted.insert(name.clone());
            }
            plan.modes.insert(name.clone(), mode);
        }
        self.encrypted = encrypted;
        let count = |m: SendMode| plan.modes.values().filter(|v| **v == m).count() as u32;
        plan.status = EncryptionStatus {
            enabled: flags.enabled,
            ready: false,
            accepts_plaintext: !fail_closed,
            encrypted_peers: count(SendMode::Encrypted),
            plaintext_peers: count(SendMode::Plaintext),
            dropped_peers: count(SendMode::Drop),
        };
        plan.datapath_enabled = flags.enabled || plan.status.encrypted_peers > 0;
        plan
    }
}

/// The per-pair rule (see the module docs). `was_encrypted`: we sent to
/// this peer encrypted on the previous pass.
pub fn send_mode(flags: Flags, window: bool, was_encrypted: bool, peer: &PeerView) -> SendMode {
    if !flags.enabled {
        // Disabling: keep encrypting until the receiver says it takes
        // plaintext again.
        return if peer.has_peer && was_encrypted && !peer.accepts_plaintext {
            SendMode::Encrypted
        } else {
            SendMode::Plaintext
        };
    }
    let fail_closed = flags.strict && !window;
    let ready = peer.external || peer.receives_from_us;
    if peer.has_peer && (ready || was_encrypted || fail_closed) {
        // A fail-closed node encrypts even to a peer not (yet) ready: at
        // worst that peer drops it, which is what strict promises anyway.
        SendMode::Encrypted
    } else if fail_closed {
        SendMode::Drop
    } else {
        SendMode::Plaintext
    }
}

/// What this node sees of every remote node: from the desired state (who
/// has a peer) and each node's reported status.
pub fn peer_views(state: &ClusterState, me: &str, desired: &Desired) -> BTreeMap<String, PeerView> {
    let mut names: BTreeSet<&str> = desired
        .remote_cidrs
        .values()
        .map(|r| r.node.as_str())
        .collect();
    names.extend(desired.peers.keys().map(String::as_str));
    names
        .into_iter()
        .filter(|n| *n != me)
        .map(|name| {
            let status = state
                .announcements
                .get(name)
                .and_then(|a| a.status.encryption.as_ref().map(|e| (a, e)));
            let view = PeerView {
                has_peer: desired.peers.contains_key(name),
                external: desired.peers.contains_key(name) && !state.nodes.contains_key(name),
                receives_from_us: status
                    .is_some_and(|(a, e)| e.ready && a.status.peers.contains_key(me)),
                accepts_plaintext: status.is_none_or(|(_, e)| e.accepts_plaintext),
            };
            (name.to_string(), view)
        })
        .collect()
}

/// Every node (every Node object) reports the flag on, ready, and no peer
/// sent in plaintext: the enable transition is over cluster-wide.
pub fn all_encrypting(state: &ClusterState) -> bool {
    !state.nodes.is_empty()
        && state.nodes.keys().all(|name| {
            state
                .announcements
                .get(name)
                .and_then(|a| a.status.encryption.as_ref())
                .is_some_and(|e| e.enabled && e.ready && e.plaintext_peers == 0)
        })
}

/// Narrows `desired` to the plan: only peers sent encrypted keep their
/// CIDRs (and node address) on the tunnel; the datapath flags follow the
/// plan. Engine peers are left alone, so receiving never stops.
pub fn apply(plan: &Plan, desired: &mut Desired) {
    desired.encryption_enabled = plan.datapath_enabled;
    desired.strict = plan.datapath_strict;
    let encrypted = |node: &str| plan.modes.get(node) == Some(&SendMode::Encrypted);
    for remote in desired.remote_cidrs.values_mut() {
        if !encrypted(&remote.node) {
            remote.peer = None;
        }
    }
    desired.remote_node_ips.retain(|_, node| encrypted(node));
}

/// Condition types of the `VeilClusterConfig` status.
pub const READY: &str = "EncryptionReady";
pub const ENCRYPTED: &str = "TrafficEncrypted";
pub const PLAINTEXT_REFUSED: &str = "PlaintextRefused";
pub const PLAINTEXT_ACCEPTED: &str = "PlaintextAccepted";

/// The `VeilClusterConfig` status for `state`: per condition, how many of
/// the cluster's nodes (Node objects) meet it, from their own reports.
/// - `EncryptionReady`: the node acts on `enabled: true` and can receive
///   encrypted from its peers;
/// - `TrafficEncrypted`: ...and sends nothing to any peer in plaintext;
/// - `PlaintextRefused`: strict mode converged on the node: it neither sends
///   nor delivers plaintext (only meaningful with `strict`);
/// - `PlaintextAccepted`: the node acts on `enabled: false`, delivers
///   plaintext and no longer encrypts to anyone (disable converged).
///
/// Computed the same way by every writer, so several writers agree.
pub fn conditions(state: &ClusterState) -> crate::cluster::objects::VeilClusterConfigStatus {
    let cfg = &state.config;
    let reports: Vec<Option<&EncryptionStatus>> = state
        .nodes
        .keys()
        .map(|n| {
            state
                .announcements
                .get(n)
                .and_then(|a| a.status.encryption.as_ref())
        })
        .collect();
    let total = reports.len() as u32;
    let count = |f: &dyn Fn(&EncryptionStatus) -> bool| {
        reports.iter().filter(|r| r.is_some_and(f)).count() as u32
    };
    let ready = count(&|e| e.enabled && e.ready);
    let encrypted = count(&|e| e.enabled && e.ready && e.plaintext_peers == 0);
    let refused = count(&|e| e.enabled && !e.accepts_plaintext);
    let accepted = count(&|e| !e.enabled && e.accepts_plaintext && e.encrypted_peers == 0);
    let cond =
        |type_: &str, wanted: bool, n: u32, reason_ok: &str, reason_wait: &str, what: &str| {
            let met = wanted && n == total && total > 0;
            crate::cluster::objects::ClusterCondition {
                type_: type_.into(),
                status: if met { "True" } else { "False" }.into(),
                reason: if !wanted {
                    "NotRequested".into()
                } else if met {
                    reason_ok.into()
                } else {
                    reason_wait.into()
                },
                message: format!("{n}/{total} nodes {what}"),
                ready_nodes: n,
                total_nodes: total,
            }
        };
    let on = cfg.encryption_enabled;
    crate::cluster::objects::VeilClusterConfigStatus {
        conditions: vec![
            cond(
                READY,
                on,
                ready,
                "AllNodesReady",
                "WaitingForNodes",
                "ready to receive encrypted",
            ),
            cond(
                ENCRYPTED,
                on,
                encrypted,
                "AllPeersEncrypted",
                "WaitingForNodes",
                "send only encrypted",
            ),
            cond(
                PLAINTEXT_REFUSED,
                on && cfg.strict,
                refused,
                "StrictEnforced",
                "WaitingForConvergence",
                "refuse plaintext",
            ),
            cond(
                PLAINTEXT_ACCEPTED,
                !on,
                accepted,
                "AllNodesDisabled",
                "WaitingForNodes",
                "accept plaintext and encrypt to no one",
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Announcement, NodeInfo, PublicKey};
    use crate::reconcile::{PeerSpec, RemoteCidr};

    const MODES: [SendMode; 3] = [SendMode::Encrypted, SendMode::Plaintext, SendMode::Drop];

    fn views() -> impl Iterator<Item = PeerView> {
        (0..16u8).map(|bits| PeerView {
            has_peer: bits & 1 != 0,
            external: bits & 2 != 0,
            receives_from_us: bits & 4 != 0,
            accepts_plaintext: bits & 8 != 0,
        })
    }

    fn all_flags() -> impl Iterator<Item = Flags> {
        [(false, false), (false, true), (true, false), (true, true)]
            .into_iter()
            .map(|(enabled, strict)| Flags { enabled, strict })
    }

    /// The rule over every combination of flags, window, memory and peer
    /// report, checked against the properties the issue asks for.
    #[test]
    fn every_combination_keeps_the_promises() {
        let mut seen = BTreeSet::new();
        for flags in all_flags() {
            for window in [false, true] {
                for was in [false, true] {
                    for v in views() {
                        let m = send_mode(flags, window, was, &v);
                        seen.insert(m);
                        let ctx = format!("{flags:?} window={window} was={was} {v:?} -> {m:?}");
                        // Encrypted needs a configured peer.
                        if m == SendMode::Encrypted {
                            assert!(v.has_peer, "{ctx}");
                        }
                        // Disabled: never drop; encrypted only while the receiver
                        // still refuses plaintext and we were already encrypting.
                        if !flags.enabled {
                            assert_ne!(m, SendMode::Drop, "{ctx}");
                            assert_eq!(
                                m == SendMode::Encrypted,
                                v.has_peer && was && !v.accepts_plaintext,
                                "{ctx}"
                            );
                        }
                        if flags.enabled {
                            // Strict with the window closed: never plaintext.
                            if flags.strict && !window {
                                assert_ne!(m, SendMode::Plaintext, "{ctx}");
                            }
                            // Never drop outside fail-closed.
                            let fail_closed = flags.strict && !window;
                            if !fail_closed {
                                assert_ne!(m, SendMode::Drop, "{ctx}");
                            }
                            // Once encrypted, never back to plaintext while on:
                            // an unsigned status must not undo encryption.
                            if was && v.has_peer {
                                assert_eq!(m, SendMode::Encrypted, "{ctx}");
                            }
                            // Plaintext -> encrypted only when the peer can receive
                            // (or fail-closed, where encrypted beats dropping).
                            if !was && m == SendMode::Encrypted {
                                assert!(
                                    v.receives_from_us || v.external || (flags.strict && !window),
                                    "{ctx}"
                                );
                            }
                            // A ready peer with a key is always encrypted.
                            if v.has_peer && (v.receives_from_us || v.external) {
                                assert_eq!(m, SendMode::Encrypted, "{ctx}");
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(seen, MODES.into_iter().collect());
    }

    fn ready() -> PeerView {
        PeerView {
            has_peer: true,
            external: false,
            receives_from_us: true,
            accepts_plaintext: true,
        }
    }

    fn not_ready() -> PeerView {
        PeerView {
            receives_from_us: false,
            ..ready()
        }
    }

    fn on(strict: bool) -> Flags {
        Flags {
            enabled: true,
            strict,
        }
    }

    const OFF: Flags = Flags {
        enabled: false,
        strict: true,
    };

    fn peers(list: &[(&str, PeerView)]) -> BTreeMap<String, PeerView> {
        list.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn enable_then_converge_then_disable() {
        let mut t = Transition::default();
        // Flag off: plaintext to everyone, datapath off, plaintext accepted.
        let p = t.step(OFF, false, &peers(&[("b", ready()), ("c", not_ready())]));
        assert!(p.modes.values().all(|m| *m == SendMode::Plaintext));
        assert!(!p.datapath_enabled && !p.datapath_strict);
        assert!(p.status.accepts_plaintext && !p.status.enabled);

        // Flag on (strict): b is ready, c not yet -> c stays plaintext.
        let p = t.step(
            on(true),
            false,
            &peers(&[("b", ready()), ("c", not_ready())]),
        );
        assert_eq!(p.modes["b"], SendMode::Encrypted);
        assert_eq!(p.modes["c"], SendMode::Plaintext);
        assert!(p.datapath_enabled && !p.datapath_strict);
        assert!(p.status.accepts_plaintext);
        assert_eq!((p.status.encrypted_peers, p.status.plaintext_peers), (1, 1));

        // b's status is forged to "not ready": b stays encrypted.
        let p = t.step(
            on(true),
            false,
            &peers(&[("b", not_ready()), ("c", ready())]),
        );
        assert_eq!(p.modes["b"], SendMode::Encrypted);
        assert_eq!(p.modes["c"], SendMode::Encrypted);

        // Converged: strict from now on; a new unready node d is dropped.
        let no_key = PeerView {
            has_peer: false,
            ..not_ready()
        };
        let p = t.step(
            on(true),
            true,
            &peers(&[("b", ready()), ("c", ready()), ("d", no_key)]),
        );
        assert!(p.datapath_strict && !p.status.accepts_plaintext);
        assert_eq!(p.modes["d"], SendMode::Drop);
        // ...and convergence is remembered even if statuses regress.
        let p = t.step(
            on(true),
            false,
            &peers(&[("b", not_ready()), ("d", no_key)]),
        );
        assert!(p.datapath_strict);
        assert_eq!(p.modes["b"], SendMode::Encrypted);
        assert_eq!(p.modes["d"], SendMode::Drop);

        // Flag off: every node accepts plaintext at once; b still refuses it
        // (has not seen the flag yet) so stays encrypted; c accepts -> plaintext.
        let refuses = PeerView {
            accepts_plaintext: false,
            ..ready()
        };
        let p = t.step(OFF, false, &peers(&[("b", refuses), ("c", ready())]));
        assert!(p.status.accepts_plaintext && !p.status.enabled);
        assert_eq!(p.modes["b"], SendMode::Encrypted);
        assert_eq!(p.modes["c"], SendMode::Plaintext);
        assert!(p.datapath_enabled, "still encrypting to b");
        assert!(!p.datapath_strict);
        // c goes back to refusing plaintext: we do not go back to encrypting it.
        let p = t.step(OFF, false, &peers(&[("b", ready()), ("c", refuses)]));
        assert!(p.modes.values().all(|m| *m == SendMode::Plaintext));
        assert!(!p.datapath_enabled);
    }

    #[test]
    fn an_agent_started_with_the_flag_on_is_fail_closed() {
        let mut t = Transition::default();
        let p = t.step(on(true), false, &peers(&[("b", not_ready())]));
        assert!(p.datapath_strict);
        assert_eq!(p.modes["b"], SendMode::Encrypted);
        let no_key = PeerView {
            has_peer: false,
            ..not_ready()
        };
        let p = t.step(on(true), false, &peers(&[("b", no_key)]));
        assert_eq!(p.modes["b"], SendMode::Drop);
        // Non-strict: plaintext until the peer is ready, then encrypted.
        let mut t = Transition::default();
        let p = t.step(on(false), false, &peers(&[("b", not_ready())]));
        assert_eq!(p.modes["b"], SendMode::Plaintext);
        assert!(!p.datapath_strict && p.status.accepts_plaintext);
        let p = t.step(on(false), false, &peers(&[("b", ready())]));
        assert_eq!(p.modes["b"], SendMode::Encrypted);
    }

    #[test]
    fn external_peers_are_always_ready() {
        let mut t = Transition {
            saw_disabled: true,
            ..Transition::default()
        };
        let ext = PeerView {
            external: true,
            ..not_ready()
        };
        let p = t.step(on(true), false, &peers(&[("ext", ext)]));
        assert_eq!(p.modes["ext"], SendMode::Encrypted);
    }

    fn node(name: &str, cidr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            internal_ip: None,
        }
    }

    fn report(state: &mut ClusterState, name: &str, e: Option<EncryptionStatus>, peers: &[&str]) {
        let mut a = Announcement {
            node: name.into(),
            ..Announcement::default()
        };
        a.status.encryption = e;
        a.status.peers = peers.iter().map(|p| (p.to_string(), 1)).collect();
        state.announcements.insert(name.into(), a);
    }

    #[test]
    fn views_and_convergence_come_from_the_reports() {
        let mut state = ClusterState::default();
        for (n, c) in [
            ("a", "10.244.1.0/24"),
            ("b", "10.244.2.0/24"),
            ("c", "10.244.3.0/24"),
        ] {
            state.nodes.insert(n.into(), node(n, c));
        }
        let good = EncryptionStatus {
            enabled: true,
            ready: true,
            accepts_plaintext: true,
            encrypted_peers: 2,
            ..EncryptionStatus::default()
        };
        report(&mut state, "a", Some(good.clone()), &["b", "c"]);
        // b is ready but has not accepted a's key yet.
        report(&mut state, "b", Some(good.clone()), &["c"]);
        // c reports nothing (an older agent).
        report(&mut state, "c", None, &["a", "b"]);
        let mut d = Desired::default();
        for (n, c) in [
            ("b", "10.244.2.0/24"),
            ("c", "10.244.3.0/24"),
            ("x", "10.244.9.0/24"),
        ] {
            d.remote_cidrs.insert(
                c.parse().unwrap(),
                RemoteCidr {
                    node: n.into(),
                    peer: Some(PublicKey([n.as_bytes()[0]; 32])),
                },
            );
            d.peers.insert(
                n.into(),
                PeerSpec {
                    node: n.into(),
                    public_key: PublicKey([n.as_bytes()[0]; 32]),
                    endpoint: "198.18.0.9:51820".parse().unwrap(),
                    allowed_ips: vec![c.parse().unwrap()],
                },
            );
        }
        let v = peer_views(&state, "a", &d);
        assert!(!v["b"].receives_from_us && v["b"].has_peer && !v["b"].external);
        assert!(!v["c"].receives_from_us && v["c"].accepts_plaintext);
        assert!(v["x"].external, "a peer without a Node object is external");
        assert!(!all_encrypting(&state));

        report(&mut state, "b", Some(good.clone()), &["a", "c"]);
        report(&mut state, "c", Some(good.clone()), &["a", "b"]);
        assert!(peer_views(&state, "a", &d)["b"].receives_from_us);
        assert!(all_encrypting(&state));
        let lagging = EncryptionStatus {
            plaintext_peers: 1,
            ..good
        };
        report(&mut state, "c", Some(lagging), &["a", "b"]);
        assert!(!all_encrypting(&state));
    }

    #[test]
    fn conditions_count_nodes_per_stage() {
        let mut state = ClusterState::default();
        for (n, c) in [
            ("a", "10.244.1.0/24"),
            ("b", "10.244.2.0/24"),
            ("c", "10.244.3.0/24"),
        ] {
            state.nodes.insert(n.into(), node(n, c));
        }
        state.config.encryption_enabled = true;
        state.config.strict = true;
        let mixed = EncryptionStatus {
            enabled: true,
            ready: true,
            accepts_plaintext: true,
            encrypted_peers: 1,
            plaintext_peers: 1,
            dropped_peers: 0,
        };
        let done = EncryptionStatus {
            accepts_plaintext: false,
            encrypted_peers: 2,
            plaintext_peers: 0,
            ..mixed.clone()
        };
        report(&mut state, "a", Some(done.clone()), &[]);
        report(&mut state, "b", Some(mixed.clone()), &[]);
        // c has not reported.
        let get = |st: &ClusterState, t: &str| {
            conditions(st)
                .conditions
                .into_iter()
                .find(|c| c.type_ == t)
                .unwrap()
        };
        let r = get(&state, READY);
        assert_eq!(
            (r.status.as_str(), r.ready_nodes, r.total_nodes),
            ("False", 2, 3)
        );
        assert_eq!(r.message, "2/3 nodes ready to receive encrypted");
        assert_eq!(get(&state, ENCRYPTED).ready_nodes, 1);
        assert_eq!(get(&state, PLAINTEXT_REFUSED).ready_nodes, 1);
        assert_eq!(get(&state, PLAINTEXT_ACCEPTED).reason, "NotRequested");
        for n in ["a", "b", "c"] {
            report(&mut state, n, Some(done.clone()), &[]);
        }
        for t in [READY, ENCRYPTED, PLAINTEXT_REFUSED] {
            let c = get(&state, t);
            assert_eq!((c.status.as_str(), c.ready_nodes), ("True", 3), "{c:?}");
        }
        // Disable: converged once every node accepts plaintext and encrypts to no one.
        state.config.encryption_enabled = false;
        let off = EncryptionStatus {
            enabled: false,
            ready: true,
            accepts_plaintext: true,
            encrypted_peers: 0,
            plaintext_peers: 2,
            dropped_peers: 0,
        };
        report(&mut state, "a", Some(off.clone()), &[]);
        report(
            &mut state,
            "b",
            Some(EncryptionStatus {
                encrypted_peers: 1,
                ..off.clone()
            }),
            &[],
        );
        let c = get(&state, PLAINTEXT_ACCEPTED);
        assert_eq!((c.status.as_str(), c.ready_nodes), ("False", 1));
        assert_eq!(get(&state, READY).reason, "NotRequested");
        report(&mut state, "b", Some(off.clone()), &[]);
        report(&mut state, "c", Some(off), &[]);
        assert_eq!(get(&state, PLAINTEXT_ACCEPTED).status, "True");
    }

    #[test]
    fn apply_moves_only_encrypted_peers_onto_the_tunnel() {
        let mut d = Desired::default();
        for (n, c) in [("b", "10.244.2.0/24"), ("c", "10.244.3.0/24")] {
            d.remote_cidrs.insert(
                c.parse().unwrap(),
                RemoteCidr {
                    node: n.into(),
                    peer: Some(PublicKey([1; 32])),
                },
            );
        }
        d.remote_node_ips
            .insert("198.18.0.2".parse().unwrap(), "b".into());
        d.remote_node_ips
            .insert("198.18.0.3".parse().unwrap(), "c".into());
        let plan = Plan {
            modes: [
                ("b".to_string(), SendMode::Encrypted),
                ("c".to_string(), SendMode::Plaintext),
            ]
            .into(),
            datapath_enabled: true,
            datapath_strict: false,
            status: EncryptionStatus::default(),
        };
        apply(&plan, &mut d);
        assert!(d.encryption_enabled && !d.strict);
        let b: ipnet::IpNet = "10.244.2.0/24".parse().unwrap();
        let c: ipnet::IpNet = "10.244.3.0/24".parse().unwrap();
        assert!(d.remote_cidrs[&b].peer.is_some());
        assert!(d.remote_cidrs[&c].peer.is_none());
        assert_eq!(d.remote_node_ips.len(), 1);
    }
}
