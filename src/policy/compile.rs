//! Policies + identities -> the entries of the BPF policy map.
//!
//! # The map (`veil_policy`, an LPM trie)
//! Key, in match order: `subject` identity (32 bits), `peer` identity (32),
//! `direction` (8), then the 24-bit (protocol, port) point of
//! [`super::ranges`]. The fixed part is 72 bits, so an entry's prefix length
//! is `72 + block.len`: 72 = every protocol, 80 = one protocol, every port,
//! up to 96 = one port.
//!
//! The datapath looks up `(subject, peer, dir, proto, port)` first, then the
//! same key with `peer = PEER_ANY` (rules without `from`/`to`); the first hit
//! decides. No hit at all: the subject is not isolated in that direction and
//! the packet passes.
//!
//! Everything else is decided here, at compile time, so that two lookups are
//! the whole datapath cost:
//! - per `(subject, dir, peer)` table the candidate spans of every rule are
//!   resolved into disjoint pieces, highest precedence first (deny >
//!   allow-if-encrypted > allow), and only the winners become blocks; so an
//!   allow of 1000-2000 with a deny of 1500 becomes allow blocks around a
//!   deny block, never overlapping entries whose order would matter;
//! - a peer's table also carries the `PEER_ANY` rules of its subject, so a
//!   hit in the peer's table is final (a deny for "any" still beats an
//!   allow for that peer) and a miss means no rule covers the point;
//! - an isolated subject gets a default-deny entry at prefix 72 in its
//!   `PEER_ANY` table: every longer allow or deny block wins over it by the
//!   longest-prefix rule, every point no rule covers hits it.
//!
//! # Incremental updates
//! Rule ids are hashes of (policy, direction, action, index) and local CIDR
//! identities hashes of their `ipBlock`s, not positions, so adding or
//! removing one policy changes only the entries of the subjects and peers it
//! touches; [`diff`] turns two compilations into the upserts and deletes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;

use super::ranges::{self, Block, Span};
use super::{Direction, NamespaceMatch, Peer, Policy, PolicyRef, PortMatch, Rule};
use crate::cluster::objects::NAMESPACE_NAME_LABEL;
use crate::identity::Identity;

/// The peer identity of entries that apply to every peer.
pub const PEER_ANY: u32 = 0;
/// Bits of the key before the (protocol, port) space.
pub const FIXED_PREFIX_BITS: u32 = 72;

/// What an entry says about the packets it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Deny = 0,
    Allow = 1,
    /// Allowed only when the packet crossed the WireGuard tunnel.
    AllowEncrypted = 2,
}

/// Which rule decided; shown by `veilctl policy trace` and in drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleId(pub u32);

impl RuleId {
    /// No entry matched: the subject is not isolated in this direction.
    pub const NOT_ISOLATED: RuleId = RuleId(0);
    /// The subject is isolated and no rule allows the flow.
    pub const DEFAULT_DENY: RuleId = RuleId(1);
    /// Traffic between a pod and its own node, always allowed.
    pub const HOST: RuleId = RuleId(2);
    /// Hashed ids start here.
    const FIRST_HASHED: u32 = 16;
}

/// What a rule id stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub policy: PolicyRef,
    pub direction: Direction,
    pub verdict: Verdict,
    /// Index in `spec.ingress`/`spec.egress` (or the `*Deny` list).
    pub index: usize,
}

/// The key of one policy map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub subject: Identity,
    /// An identity, or [`PEER_ANY`].
    pub peer: u32,
    pub direction: Direction,
    pub block: Block,
}

impl EntryKey {
    /// The LPM prefix length of this entry.
    pub fn prefix_len(&self) -> u32 {
        FIXED_PREFIX_BITS + u32::from(self.block.len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryValue {
    pub verdict: Verdict,
    pub rule: RuleId,
}

/// The labels an identity stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// What the compiler needs: validated policies, the identities in use and
/// the namespace labels (from `v1 Namespace`; a namespace without an object
/// still has its `kubernetes.io/metadata.name` label).
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    pub identities: &'a BTreeMap<Identity, IdentityKey>,
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub policies: &'a [Policy],
}

/// The compiler's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub entries: BTreeMap<EntryKey, EntryValue>,
    /// `ipBlock` prefixes -> node-local CIDR identity (or `world` for an
    /// `except` hole no block covers), for an LPM map consulted when the IP
    /// cache has no identity for an address. Longest match gives the right
    /// identity because an address's set of matching blocks is determined
    /// by the longest listed prefix that contains it.
    pub cidrs: BTreeMap<IpNet, Identity>,
    pub rules: BTreeMap<RuleId, RuleInfo>,
    /// `(subject, direction)` pairs some policy isolates.
    pub isolated: BTreeSet<(Identity, Direction)>,
}

/// Precedence of candidate verdicts in [`ranges::resolve`].
fn rank(v: Verdict) -> u8 {
    match v {
        Verdict::Allow => 1,
        Verdict::AllowEncrypted => 2,
        Verdict::Deny => 3,
    }
}

fn verdict_of(rank: u8) -> Verdict {
    match rank {
        1 => Verdict::Allow,
        2 => Verdict::AllowEncrypted,
        _ => Verdict::Deny,
    }
}

// FNV-1a 64 + fmix64, as in `identity.rs`: stable across builds and nodes.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in (p.len() as u64).to_le_bytes().iter().chain(p.iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Allocates `ids` for `items` (sorted, deduplicated) by hashing into
/// `first..limit`; a collision goes to the next free value, the item that
/// sorts first keeping its hash, so every node decides the same way.
fn allocate<T: Ord + Clone>(
    items: &BTreeSet<T>,
    first: u32,
    limit: u32,
    hash: impl Fn(&T) -> u64,
) -> BTreeMap<T, u32> {
    let span = u64::from(limit - first);
    let mut taken: HashMap<u32, ()> = HashMap::new();
    let mut out = BTreeMap::new();
    for item in items {
        let mut v = first + (hash(item) % span) as u32;
        while taken.contains_key(&v) {
            v = if v + 1 >= limit { first } else { v + 1 };
        }
        taken.insert(v, ());
        out.insert(item.clone(), v);
    }
    out
}

type RuleKey = (PolicyRef, Direction, Verdict, usize);

fn rule_ids(policies: &[Policy]) -> BTreeMap<RuleKey, RuleId> {
    let mut keys = BTreeSet::new();
    for p in policies {
        for d in Direction::BOTH {
            let allow = if p.require_encryption {
                Verdict::AllowEncrypted
            } else {
                Verdict::Allow
            };
            for i in 0..p.allow[d as usize].len() {
                keys.insert((p.id.clone(), d, allow, i));
            }
            for i in 0..p.deny[d as usize].len() {
                keys.insert((p.id.clone(), d, Verdict::Deny, i));
            }
        }
    }
    allocate(&keys, RuleId::FIRST_HASHED, u32::MAX, |(p, d, v, i)| {
        hash64(&[
            b"veil-rule-v1",
            p.to_string().as_bytes(),
            &[*d as u8, *v as u8],
            &(*i as u64).to_le_bytes(),
        ])
    })
    .into_iter()
    .map(|(k, v)| (k, RuleId(v)))
    .collect()
}

type IpBlockKey = (IpNet, Vec<IpNet>);

/// Node-local identities for `ipBlock` peers; see [`Compiled::cidrs`].
fn cidr_identities(
    policies: &[Policy],
) -> (
    BTreeMap<IpNet, Identity>,
    BTreeMap<IpBlockKey, Vec<Identity>>,
) {
    let mut blocks: BTreeSet<IpBlockKey> = BTreeSet::new();
    for p in policies {
        for rules in p.allow.iter().chain(p.deny.iter()) {
            for r in rules {
                for peer in r.peers.iter().flatten() {
                    if let Peer::IpBlock { cidr, except } = peer {
                        blocks.insert((*cidr, except.clone()));
                    }
                }
            }
        }
    }
    let prefixes: BTreeSet<IpNet> = blocks
        .iter()
        .flat_map(|(c, e)| std::iter::once(*c).chain(e.iter().copied()))
        .collect();
    let members = |p: &IpNet| -> Vec<IpBlockKey> {
        blocks
            .iter()
            .filter(|(c, e)| c.contains(p) && !e.iter().any(|x| x.contains(p)))
            .cloned()
            .collect()
    };
    let sets: BTreeSet<Vec<IpBlockKey>> = prefixes
        .iter()
        .map(members)
        .filter(|m| !m.is_empty())
        .collect();
    let ids = allocate(&sets, Identity::FIRST_LOCAL, Identity::LIMIT, |set| {
        let text: Vec<String> = set.iter().map(|(c, e)| format!("{c}-{e:?}")).collect();
        hash64(&[b"veil-cidr-v1", text.join(",").as_bytes()])
    });
    let mut cidrs = BTreeMap::new();
    let mut by_block: BTreeMap<IpBlockKey, Vec<Identity>> = BTreeMap::new();
    for p in &prefixes {
        let m = members(p);
        let id = ids.get(&m).map_or(Identity::WORLD, |&v| Identity(v));
        cidrs.insert(*p, id);
        for b in m {
            let list = by_block.entry(b).or_default();
            if !list.contains(&id) {
                list.push(id);
            }
        }
    }
    (cidrs, by_block)
}

fn namespace_labels(
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ns: &str,
) -> BTreeMap<String, String> {
    let mut labels = namespaces.get(ns).cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), ns.into());
    labels
}

fn peers_of(
    input: &PolicyInput<'_>,
    ns_labels: &BTreeMap<String, BTreeMap<String, String>>,
    by_block: &BTreeMap<IpBlockKey, Vec<Identity>>,
    rule: &Rule,
) -> BTreeSet<u32> {
    let Some(peers) = &rule.peers else {
        return BTreeSet::from([PEER_ANY]);
    };
    let mut out = BTreeSet::new();
    for p in peers {
        match p {
            Peer::Pods { namespaces, pods } => {
                for (id, key) in input.identities {
                    let ns_ok = match namespaces {
                        NamespaceMatch::Same(ns) => &key.namespace == ns,
                        NamespaceMatch::Selector(s) => {
                            ns_labels.get(&key.namespace).is_some_and(|l| s.matches(l))
                        }
                    };
                    if ns_ok && pods.matches(&key.labels) {
                        out.insert(id.0);
                    }
                }
            }
            Peer::IpBlock { cidr, except } => {
                for id in by_block.get(&(*cidr, except.clone())).into_iter().flatten() {
                    out.insert(id.0);
                }
            }
        }
    }
    out
}

fn port_spans(rule: &Rule) -> Vec<(u32, u32)> {
    match &rule.ports {
        None => vec![(0, ranges::SPACE_MAX)],
        Some(ports) => ports
            .iter()
            .filter_map(|p| match p {
                PortMatch::Range { proto, lo, hi } => {
                    let base = u32::from(*proto) << 16;
                    Some((base | u32::from(*lo), base | u32::from(*hi)))
                }
                PortMatch::Named { .. } => None,
            })
            .collect(),
    }
}

/// Compiles `input` into map entries. Pure and deterministic.
pub fn compile(input: &PolicyInput<'_>) -> Compiled {
    let rule_ids = rule_ids(input.policies);
    let (cidrs, by_block) = cidr_identities(input.policies);
    let mut ns_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for key in input.identities.values() {
        ns_labels
            .entry(key.namespace.clone())
            .or_insert_with(|| namespace_labels(input.namespaces, &key.namespace));
    }

    let mut out = Compiled {
        cidrs,
        ..Compiled::default()
    };
    let mut tables: BTreeMap<(Identity, Direction, u32), Vec<Span<RuleId>>> = BTreeMap::new();
    for p in input.policies {
        let subjects: Vec<Identity> = input
            .identities
            .iter()
            .filter(|(_, k)| k.namespace == p.id.namespace && p.subject.matches(&k.labels))
            .map(|(id, _)| *id)
            .collect();
        if subjects.is_empty() {
            continue;
        }
        let allow = if p.require_encryption {
            Verdict::AllowEncrypted
        } else {
            Verdict::Allow
        };
        for d in Direction::BOTH {
            if p.isolates[d as usize] {
                for s in &subjects {
                    out.isolated.insert((*s, d));
                }
            }
            let lists = [
                (allow, &p.allow[d as usize]),
                (Verdict::Deny, &p.deny[d as usize]),
            ];
            for (verdict, rules) in lists {
                for (i, rule) in rules.iter().enumerate() {
                    let key = (p.id.clone(), d, verdict, i);
                    let Some(&rid) = rule_ids.get(&key) else {
                        continue; // every rule was given an id above
                    };
                    out.rules.insert(
                        rid,
                        RuleInfo {
                            policy: p.id.clone(),
                            direction: d,
                            verdict,
                            index: i,
                        },
                    );
                    let spans = port_spans(rule);
                    let peers = peers_of(input, &ns_labels, &by_block, rule);
                    for s in &subjects {
                        for peer in &peers {
                            let t = tables.entry((*s, d, *peer)).or_default();
                            for &(lo, hi) in &spans {
                                t.push(Span {
                                    lo,
                                    hi,
                                    rank: rank(verdict),
                                    tag: rid,
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    // Isolated subjects always talk to their own node.
    for &(s, d) in &out.isolated {
        tables
            .entry((s, d, Identity::HOST.0))
            .or_default()
            .push(Span {
                lo: 0,
                hi: ranges::SPACE_MAX,
                rank: rank(Verdict::Allow),
                tag: RuleId::HOST,
            });
    }

    // A peer's table carries the "any peer" rules too (see the module docs).
    let any: BTreeMap<(Identity, Direction), Vec<Span<RuleId>>> = tables
        .iter()
        .filter(|((_, _, peer), _)| *peer == PEER_ANY)
        .map(|((s, d, _), spans)| ((*s, *d), spans.clone()))
        .collect();
    for ((s, d, peer), spans) in tables.iter_mut() {
        if *peer != PEER_ANY {
            if let Some(extra) = any.get(&(*s, *d)) {
                spans.extend_from_slice(extra);
            }
        }
    }

    for ((subject, direction, peer), spans) in &tables {
        for (lo, hi, rank, rule) in ranges::resolve(spans) {
            for block in ranges::blocks(lo, hi) {
                out.entries.insert(
                    EntryKey {
                        subject: *subject,
                        peer: *peer,
                        direction: *direction,
                        block,
                    },
                    EntryValue {
                        verdict: verdict_of(rank),
                        rule,
                    },
                );
            }
        }
    }
    for &(subject, direction) in &out.isolated {
        out.entries
            .entry(EntryKey {
                subject,
                peer: PEER_ANY,
                direction,
                block: Block { start: 0, len: 0 },
            })
            .or_insert(EntryValue {
                verdict: Verdict::Deny,
                rule: RuleId::DEFAULT_DENY,
            });
    }
    out
}

/// The changes that turn map contents `old` into `new`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// New keys and keys whose value changed.
    pub upsert: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upsert: new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        remove: old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// The datapath's lookup, in user space: the peer's table, then
/// `PEER_ANY`'s, each longest prefix first.
pub fn lookup(
    entries: &BTreeMap<EntryKey, EntryValue>,
    subject: Identity,
    direction: Direction,
    peer: Identity,
    proto: u8,
    port: u16,
) -> Option<EntryValue> {
    let point = (u32::from(proto) << 16) | u32::from(port);
    for p in [peer.0, PEER_ANY] {
        for len in (0..=ranges::SPACE_BITS).rev() {
            let free = ranges::SPACE_BITS - len;
            let start = (point >> free) << free;
            let key = EntryKey {
                subject,
                peer: p,
                direction,
                block: Block {
                    start,
                    len: len as u8,
                },
            };
            if let Some(v) = entries.get(&key) {
                return Some(*v);
            }
        }
    }
    None
}

/// One direction's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub verdict: Option<Verdict>,
    pub rule: RuleId,
}

/// Decides one direction as the datapath does; `encrypted` is whether the
/// packet crosses (egress) or crossed (ingress) the tunnel.
pub fn decide(
    compiled: &Compiled,
    subject: Identity,
    direction: Direction,
    peer: Identity,
    proto: u8,
    port: u16,
    encrypted: bool,
) -> Decision {
    match lookup(&compiled.entries, subject, direction, peer, proto, port) {
        None => Decision {
            allowed: true,
            verdict: None,
            rule: RuleId::NOT_ISOLATED,
        },
        Some(v) => Decision {
            allowed: match v.verdict {
                Verdict::Deny => false,
                Verdict::Allow => true,
                Verdict::AllowEncrypted => encrypted,
            },
            verdict: Some(v.verdict),
            rule: v.rule,
        },
    }
}

/// A flow from one pod to another: the sender's egress and the receiver's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub egress: Decision,
    pub ingress: Decision,
}

impl Trace {
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }
}

pub fn trace(
    compiled: &Compiled,
    from: Identity,
    to: Identity,
    proto: u8,
    port: u16,
    encrypted: bool,
) -> Trace {
    Trace {
        egress: decide(
            compiled,
            from,
            Direction::Egress,
            to,
            proto,
            port,
            encrypted,
        ),
        ingress: decide(
            compiled,
            to,
            Direction::Ingress,
            from,
            proto,
            port,
            encrypted,
        ),
    }
}

impl Compiled {
    /// Describes a rule id for humans.
    pub fn describe(&self, rule: RuleId) -> String {
        match rule {
            RuleId::NOT_ISOLATED => "no policy selects the pod for this direction".into(),
            RuleId::DEFAULT_DENY => "isolated by policy, and no rule allows it".into(),
            RuleId::HOST => "traffic with the pod's own node is always allowed".into(),
            r => match self.rules.get(&r) {
                Some(i) => {
                    let list = match (i.direction, i.verdict) {
                        (Direction::Ingress, Verdict::Deny) => "spec.ingressDeny",
                        (Direction::Egress, Verdict::Deny) => "spec.egressDeny",
                        (Direction::Ingress, _) => "spec.ingress",
                        (Direction::Egress, _) => "spec.egress",
                    };
                    format!("{} {list}[{}]", i.policy, i.index)
                }
                None => format!("rule {}", r.0),
            },
        }
    }
}
