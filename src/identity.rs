//! Security identities: a number per (namespace, label set), the same on every node.
//!
//! The number travels in `skb->mark` between the TC hooks of one node:
//! `mark = (identity << 8) | MARK_MAGIC_IDENTITY`.
//!
//! Allocation is published through the cluster source, like Cilium's CRD
//! identity allocation: a `VeilIdentity` object named after the number holds
//! the label set ([`crate::cluster::identity`]). An agent that needs a number
//! for a label set without one walks a fixed candidate sequence (the stable
//! hash [`identity_for`], then the numbers after it) and creates the first
//! free candidate with create-if-absent semantics ([`allocate_missing`]);
//! reconcile only reads the published set ([`Published`]), so every node
//! maps a label set to the same number, and numbers do not move when other
//! label sets come and go. Values from [`Identity::FIRST_LOCAL`] up are
//! node-local (the policy compiler's CIDR identities) and never leave the node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub u32);

impl Identity {
    /// The node itself (host-network processes).
    pub const HOST: Identity = Identity(1);
    /// Anything outside the cluster.
    pub const WORLD: Identity = Identity(2);
    /// Pods Veil does not manage.
    pub const UNMANAGED: Identity = Identity(3);
    /// Another node of the cluster (its host network).
    pub const REMOTE_NODE: Identity = Identity(4);
    /// A pod whose identity is not published yet. No policy selects it as a
    /// peer by labels, and as a subject it is denied everything but its own
    /// node in each direction some policy would isolate it (fail closed).
    pub const INIT: Identity = Identity(5);

    /// Identities below this are reserved for the constants above and future ones.
    pub const FIRST_ALLOCATED: u32 = 256;
    /// Start of the node-local identities (the policy compiler's `ipBlock`
    /// CIDR identities): never in the IP cache of another node, never hashed to.
    pub const FIRST_LOCAL: u32 = 0x00ff_0000;
    /// Exclusive upper bound: the mark keeps 8 bits for the magic, and 24
    /// bits is what the BPF side stores.
    pub const LIMIT: u32 = 1 << 24;

    pub fn is_reserved(self) -> bool {
        self.0 < Self::FIRST_ALLOCATED
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Identity::HOST => f.write_str("1 (host)"),
            Identity::WORLD => f.write_str("2 (world)"),
            Identity::UNMANAGED => f.write_str("3 (unmanaged)"),
            Identity::REMOTE_NODE => f.write_str("4 (remote-node)"),
            Identity::INIT => f.write_str("5 (init)"),
            Identity(n) => write!(f, "{n}"),
        }
    }
}

/// Low byte of a mark that carries an identity in its upper 24 bits.
pub const MARK_MAGIC_IDENTITY: u32 = 0x5e;
const MARK_MAGIC_MASK: u32 = 0xff;

/// The `skb->mark` value that carries `id`.
pub fn mark(id: Identity) -> u32 {
    (id.0 << 8) | MARK_MAGIC_IDENTITY
}

/// The identity carried by `mark`, or `None` if the mark was not set by Veil
/// (wrong magic) or carries no identity (0).
pub fn identity_from_mark(mark: u32) -> Option<Identity> {
    if mark & MARK_MAGIC_MASK != MARK_MAGIC_IDENTITY {
        return None;
    }
    match mark >> 8 {
        0 => None,
        id => Some(Identity(id)),
    }
}

const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit (http://www.isthe.com/chongo/tech/comp/fnv/): written out
/// because `std`'s `DefaultHasher` may change between Rust releases, and
/// nodes running different builds must agree.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(FNV64_PRIME);
    }
}

/// The MurmurHash3 64-bit finalizer (fmix64): FNV-1a mixes a byte only into
/// bits at and above it, so similar label sets (`app1`, `app2`) would land
/// in structured, clustered values; this spreads every input bit over all
/// output bits before the range reduction.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Feeds a length-prefixed field so that ("ab","c") and ("a","bc") differ.
fn feed(hash: &mut u64, field: &str) {
    fnv1a(hash, &(field.len() as u64).to_le_bytes());
    fnv1a(hash, field.as_bytes());
}

/// The identity of pods in `namespace` with `labels`. The map is sorted, so
/// the label order in the object does not matter.
pub fn identity_for(namespace: &str, labels: &BTreeMap<String, String>) -> Identity {
    let mut hash = FNV64_OFFSET;
    // Domain separation, so a future v2 encoding cannot collide with this one.
    feed(&mut hash, "veil-identity-v1");
    feed(&mut hash, namespace);
    fnv1a(&mut hash, &(labels.len() as u64).to_le_bytes());
    for (key, value) in labels {
        feed(&mut hash, key);
        feed(&mut hash, value);
    }
    let hash = fmix64(hash);
    let span = u64::from(Identity::FIRST_LOCAL - Identity::FIRST_ALLOCATED);
    // span < 2^24, so the remainder fits in u32.
    Identity(Identity::FIRST_ALLOCATED + (hash % span) as u32)
}

/// The labels an identity stands for (the policy compiler's key type).
pub use crate::policy::compile::IdentityKey;

/// How many candidates an allocation tries before giving up. Each taken
/// candidate is a different label set that hashed (or probed) to the same
/// number; 64 in a row is astronomically unlikely with honest writers, so
/// reaching it means someone filled the range on purpose.
pub const MAX_PROBES: u32 = 64;

/// How long a published identity must be unused, continuously as this agent
/// sees it, before the agent deletes it. Long enough to cover watch lag and
/// a pod being recreated with the same labels (a rolling update).
pub const GC_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "identity for namespace {namespace} labels {labels:?}: {tries} candidate numbers in a row are \
         taken by other label sets; not allocated (treated as `init`)",
        namespace = key.namespace,
        labels = key.labels
    )]
    Exhausted { key: IdentityKey, tries: u32 },
    #[error(
        "identity for namespace {namespace} labels {labels:?}: creating VeilIdentity/{id}: {problem}; \
         retried on the next pass (treated as `init` until then)",
        namespace = key.namespace,
        labels = key.labels,
        id = id.0
    )]
    Store {
        key: IdentityKey,
        id: Identity,
        problem: String,
    },
    #[error(
        "identity for namespace {namespace} labels {labels:?}: cannot be published: {problem} \
         (treated as `init`)",
        namespace = key.namespace,
        labels = key.labels
    )]
    Unpublishable { key: IdentityKey, problem: String },
}

/// The `attempt`-th candidate number for `key`: its hash, then the numbers
/// after it (wrapping inside the allocated range). Every agent walks the
/// same sequence, which is what makes racing agents converge.
pub fn candidate(key: &IdentityKey, attempt: u32) -> Identity {
    let start = identity_for(&key.namespace, &key.labels).0 - Identity::FIRST_ALLOCATED;
    let span = Identity::FIRST_LOCAL - Identity::FIRST_ALLOCATED;
    Identity(Identity::FIRST_ALLOCATED + (start + attempt % span) % span)
}

/// The published identities, resolved: one number per label set.
///
/// Two objects can name the same label set (an agent whose view lacked the
/// first one created a second): the lowest number wins everywhere, so every
/// node that sees the same objects picks the same one, and the loser is
/// unused and garbage collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    by_key: BTreeMap<IdentityKey, Identity>,
    /// Losing duplicates: number -> the number that wins for its label set.
    pub duplicates: BTreeMap<Identity, Identity>,
}

impl Published {
    pub fn resolve(published: &BTreeMap<Identity, IdentityKey>) -> Self {
        let mut out = Published::default();
        // Ascending numbers: the first seen per key is the lowest.
        for (id, key) in published {
            match out.by_key.get(key) {
                Some(&winner) => {
                    out.duplicates.insert(*id, winner);
                }
                None => {
                    out.by_key.insert(key.clone(), *id);
                }
            }
        }
        out
    }

    /// The published identity of pods in `namespace` with `labels`, if any.
    pub fn get(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Option<Identity> {
        // Borrowed lookups need the owned key type; label sets are small.
        self.by_key
            .get(&IdentityKey {
                namespace: namespace.to_string(),
                labels: labels.clone(),
            })
            .copied()
    }

    /// Like [`Self::get`], but [`Identity::INIT`] while nothing is published.
    pub fn of(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Identity {
        self.get(namespace, labels).unwrap_or(Identity::INIT)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IdentityKey, Identity)> {
        self.by_key.iter().map(|(k, id)| (k, *id))
    }
}

/// What a create-if-absent of `VeilIdentity/<id>` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist; ours is now published.
    Created,
    /// It exists already: with this label set, or `None` when the existing
    /// object is malformed (then the number is taken by nobody usable, and
    /// is skipped rather than overwritten).
    Exists(Option<IdentityKey>),
}

/// Where identities are published: the cluster dir or the API server. The
/// only write is create-if-absent, so no writer can overwrite another's
/// allocation.
pub trait IdentityStore {
    fn create(&mut self, id: Identity, key: &IdentityKey) -> Result<Created, String>;
}

/// An in-memory store: tests, and tools that compute identities from a
/// snapshot (`veilctl policy trace` on a state without published identities).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStore(pub BTreeMap<Identity, IdentityKey>);

impl IdentityStore for MemoryStore {
    fn create(&mut self, id: Identity, key: &IdentityKey) -> Result<Created, String> {
        match self.0.get(&id) {
            Some(existing) => Ok(Created::Exists(Some(existing.clone()))),
            None => {
                self.0.insert(id, key.clone());
                Ok(Created::Created)
            }
        }
    }
}

/// The label sets that need an identity: every pod that is an endpoint
/// (host-network pods share their node's address and identity).
pub fn wanted(state: &crate::cluster::ClusterState) -> BTreeSet<IdentityKey> {
    state
        .pods
        .values()
        .filter(|p| !p.host_network)
        .map(|p| IdentityKey {
            namespace: p.namespace.clone(),
            labels: p.labels.clone(),
        })
        .collect()
}

/// Publishes an identity for every key in `wanted` that has none in
/// `published`, and records in `published` what it created or learned.
/// Returns the numbers it created or adopted, and what failed.
///
/// For each key the candidates of [`candidate`] are tried in order: one the
/// view already holds for another label set is skipped; otherwise the agent
/// creates it. Losing the race to an agent that created the same number for
/// the same label set is success (both converge on it); for another label
/// set, the next candidate is tried. Since all agents walk the same
/// sequence and the store arbitrates each number, they end on one number.
pub fn allocate_missing<S: IdentityStore>(
    published: &mut BTreeMap<Identity, IdentityKey>,
    wanted: &BTreeSet<IdentityKey>,
    store: &mut S,
) -> (Vec<(Identity, IdentityKey)>, Vec<Error>) {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for key in missing(published, wanted, &mut errors) {
        let mut attempt = 0;
        loop {
            match next_candidate(published, &key, &mut attempt) {
                Next::Have(id) => {
                    done.push((id, key));
                    break;
                }
                Next::Exhausted(e) => {
                    errors.push(e);
                    break;
                }
                Next::Create(id) => match store.create(id, &key) {
                    Ok(outcome) => {
                        if record(published, id, &key, outcome) {
                            done.push((id, key));
                            break;
                        }
                    }
                    Err(problem) => {
                        errors.push(Error::Store { key, id, problem });
                        break;
                    }
                },
            }
        }
    }
    (done, errors)
}

/// The keys of `wanted` without a published identity that can be
/// published; the others are reported in `errors`.
pub fn missing(
    published: &BTreeMap<Identity, IdentityKey>,
    wanted: &BTreeSet<IdentityKey>,
    errors: &mut Vec<Error>,
) -> Vec<IdentityKey> {
    let resolved = Published::resolve(published);
    let mut out = Vec::new();
    for key in wanted {
        if resolved.by_key.contains_key(key) {
            continue;
        }
        // An object the readers would refuse must never be written: it
        // would occupy a number without publishing anything.
        match crate::cluster::identity::check_key(key) {
            Ok(()) => out.push(key.clone()),
            Err(problem) => errors.push(Error::Unpublishable {
                key: key.clone(),
                problem: problem.to_string(),
            }),
        }
    }
    out
}

/// One step of an allocation (see [`allocate_missing`]; async stores drive
/// the same steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The view already holds this number for the key.
    Have(Identity),
    /// Create-if-absent this number, then pass the outcome to [`record`].
    Create(Identity),
    Exhausted(Error),
}

/// The next candidate for `key` from `*attempt` on, skipping numbers the
/// view holds for other label sets; advances `*attempt` past it.
pub fn next_candidate(
    published: &BTreeMap<Identity, IdentityKey>,
    key: &IdentityKey,
    attempt: &mut u32,
) -> Next {
    while *attempt < MAX_PROBES {
        let id = candidate(key, *attempt);
        *attempt += 1;
        match published.get(&id) {
            Some(k) if k == key => return Next::Have(id),
            Some(_) => continue,
            None => return Next::Create(id),
        }
    }
    Next::Exhausted(Error::Exhausted {
        key: key.clone(),
        tries: MAX_PROBES,
    })
}

/// Records what a create of `id` for `key` found; returns whether `key`
/// now has `id` (created, or created by someone else for the same labels).
pub fn record(
    published: &mut BTreeMap<Identity, IdentityKey>,
    id: Identity,
    key: &IdentityKey,
    outcome: Created,
) -> bool {
    match outcome {
        Created::Created => {}
        Created::Exists(Some(existing)) if existing == *key => {}
        Created::Exists(Some(other)) => {
            published.insert(id, other);
            return false;
        }
        Created::Exists(None) => return false,
    }
    published.insert(id, key.clone());
    true
}

/// Published identities nobody needs: their label set has no pod, or they
/// lost to a lower number for the same label set.
pub fn unused(
    published: &BTreeMap<Identity, IdentityKey>,
    wanted: &BTreeSet<IdentityKey>,
) -> BTreeSet<Identity> {
    let resolved = Published::resolve(published);
    published
        .iter()
        .filter(|(id, key)| !wanted.contains(*key) || resolved.duplicates.contains_key(*id))
        .map(|(id, _)| *id)
        .collect()
}

/// Garbage collection by whoever notices: an identity is deleted once it has
/// been unused for [`GC_GRACE`] without a break, as this agent saw it. A pod
/// that comes back with those labels in the meantime resets the clock; one
/// that comes back just after the delete gets the number again on the next
/// pass (same candidate sequence), or another if the number was taken.
#[derive(Debug, Clone, Default)]
pub struct Collector {
    unused_since: BTreeMap<Identity, std::time::Instant>,
}

impl Collector {
    /// Updates the clocks with the currently `unused` set and returns the
    /// identities unused for at least `grace` at `now`.
    pub fn due(
        &mut self,
        unused: &BTreeSet<Identity>,
        now: std::time::Instant,
        grace: std::time::Duration,
    ) -> Vec<Identity> {
        self.unused_since.retain(|id, _| unused.contains(id));
        for id in unused {
            self.unused_since.entry(*id).or_insert(now);
        }
        self.unused_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets `id` (deleted, or gone by itself).
    pub fn forget(&mut self, id: Identity) {
        self.unused_since.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stable_across_nodes_and_builds() {
        let l = labels(&[("app", "web"), ("tier", "frontend")]);
        let a = identity_for("default", &l);
        // Insertion order does not matter: same set, same identity.
        let reordered = labels(&[("tier", "frontend"), ("app", "web")]);
        assert_eq!(identity_for("default", &reordered), a);
        // Pinned value: a change here means nodes on old and new builds would
        // disagree on identities, which breaks policy across an upgrade.
        assert_eq!(a, Identity(pinned()));
        assert_eq!(
            identity_for("default", &BTreeMap::new()),
            Identity(pinned_empty())
        );
        // And a literal, so a change made to both copies above is still caught.
        assert_eq!(a, Identity(PINNED_LITERAL));
    }

    // Computed independently of `identity_for`, from the FNV-1a and fmix64 definitions.
    fn reference(parts: &[&[u8]]) -> u32 {
        let mut h: u64 = 0xcbf29ce484222325;
        for part in parts {
            for &b in *part {
                h ^= b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51afd7ed558ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
        h ^= h >> 33;
        256 + (h % (0x00ff_0000 - 256)) as u32
    }

    fn lp(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    // Changed once, when the node-local range was carved out of the top
    // (FIRST_LOCAL): all nodes of a cluster must run builds on the same side.
    const PINNED_LITERAL: u32 = 14_136_624;

    fn pinned() -> u32 {
        let parts = [
            lp("veil-identity-v1"),
            lp("default"),
            2u64.to_le_bytes().to_vec(),
            lp("app"),
            lp("web"),
            lp("tier"),
            lp("frontend"),
        ];
        reference(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    fn pinned_empty() -> u32 {
        let parts = [
            lp("veil-identity-v1"),
            lp("default"),
            0u64.to_le_bytes().to_vec(),
        ];
        reference(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>())
    }

    #[test]
    fn distinguishes_namespace_labels_and_boundaries() {
        let l = labels(&[("app", "web")]);
        let base = identity_for("default", &l);
        assert_ne!(identity_for("prod", &l), base);
        assert_ne!(identity_for("default", &labels(&[("app", "db")])), base);
        assert_ne!(identity_for("default", &labels(&[("ap", "pweb")])), base);
        assert_ne!(identity_for("default", &BTreeMap::new()), base);
        assert_ne!(
            identity_for("default", &labels(&[("app", "web"), ("x", "")])),
            base
        );
    }

    #[test]
    fn always_in_allocated_range() {
        for i in 0..2000 {
            let id = identity_for(&format!("ns{i}"), &labels(&[("i", &i.to_string())]));
            assert!(
                id.0 >= Identity::FIRST_ALLOCATED && id.0 < Identity::FIRST_LOCAL,
                "{id:?}"
            );
            assert!(!id.is_reserved());
        }
    }

    fn key(ns: &str, pairs: &[(&str, &str)]) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            labels: labels(pairs),
        }
    }

    /// Two label sets whose hashes collide (a birthday search over ~16.7 M values).
    fn colliding() -> (IdentityKey, IdentityKey) {
        let mut seen: BTreeMap<Identity, IdentityKey> = BTreeMap::new();
        (0..200_000)
            .find_map(|i| {
                let k = key("default", &[("app", &format!("a{i}"))]);
                let id = candidate(&k, 0);
                seen.insert(id, k.clone()).map(|prev| (prev, k))
            })
            .expect("a collision within 200k label sets")
    }

    #[test]
    fn first_candidate_is_the_hash_then_probing_wraps() {
        let k = key("default", &[("app", "web")]);
        assert_eq!(candidate(&k, 0), identity_for("default", &k.labels));
        assert_eq!(candidate(&k, 1).0, candidate(&k, 0).0 + 1);
        // The sequence stays in the allocated range, wrapping at the top.
        let span = Identity::FIRST_LOCAL - Identity::FIRST_ALLOCATED;
        let to_top = Identity::FIRST_LOCAL - candidate(&k, 0).0;
        assert_eq!(candidate(&k, to_top), Identity(Identity::FIRST_ALLOCATED));
        assert_eq!(candidate(&k, span), candidate(&k, 0));
    }

    #[test]
    fn allocation_publishes_once_and_then_reads_back() {
        let mut store = MemoryStore::default();
        let mut view = BTreeMap::new();
        let web = key("prod", &[("app", "web")]);
        let db = key("prod", &[("app", "db")]);
        let wanted: BTreeSet<_> = [web.clone(), db.clone()].into();
        let (done, errors) = allocate_missing(&mut view, &wanted, &mut store);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done.len(), 2);
        assert_eq!(view, store.0);
        let p = Published::resolve(&view);
        assert_eq!(p.get("prod", &web.labels), Some(candidate(&web, 0)));
        assert_eq!(p.of("prod", &labels(&[("app", "x")])), Identity::INIT);
        // Nothing missing: no store access at all.
        struct Refuse;
        impl IdentityStore for Refuse {
            fn create(&mut self, id: Identity, _: &IdentityKey) -> Result<Created, String> {
                panic!("unexpected create of {id}");
            }
        }
        let (done, errors) = allocate_missing(&mut view, &wanted, &mut Refuse);
        assert!(done.is_empty() && errors.is_empty());
    }

    #[test]
    fn racing_agents_converge_on_one_number() {
        // Agent A publishes; agent B, whose view has not caught up, tries the
        // same number, finds A's object with the same labels and adopts it.
        let mut store = MemoryStore::default();
        let web = key("prod", &[("app", "web")]);
        let wanted: BTreeSet<_> = [web.clone()].into();
        let (a, _) = allocate_missing(&mut BTreeMap::new(), &wanted, &mut store);
        let mut stale = BTreeMap::new();
        let (b, errors) = allocate_missing(&mut stale, &wanted, &mut store);
        assert!(errors.is_empty());
        assert_eq!(a, b);
        assert_eq!(store.0.len(), 1, "one object, not two");
    }

    #[test]
    fn a_collision_with_another_label_set_probes_the_next_number() {
        let (first, second) = colliding();
        let h = candidate(&first, 0);
        let mut store = MemoryStore::default();
        // Agent A allocated `first` (at its hash); agent B does not know yet.
        allocate_missing(&mut BTreeMap::new(), &[first.clone()].into(), &mut store);
        let mut view = BTreeMap::new();
        let (done, errors) = allocate_missing(&mut view, &[second.clone()].into(), &mut store);
        assert!(errors.is_empty());
        assert_eq!(done, vec![(Identity(h.0 + 1), second.clone())]);
        // B learned A's object on the way.
        assert_eq!(view.get(&h), Some(&first));
        // An agent that already sees both allocates nothing, and a third one
        // racing from scratch lands on the same numbers.
        let mut fresh = BTreeMap::new();
        let (mut c, _) = allocate_missing(
            &mut fresh,
            &[first.clone(), second.clone()].into(),
            &mut store,
        );
        c.sort();
        assert_eq!(c, vec![(h, first), (Identity(h.0 + 1), second)]);
        assert_eq!(store.0.len(), 2);
    }

    #[test]
    fn malformed_or_exhausted_candidates_are_skipped_not_overwritten() {
        struct Broken(u32);
        impl IdentityStore for Broken {
            fn create(&mut self, _: Identity, _: &IdentityKey) -> Result<Created, String> {
                // The first `n` numbers hold malformed objects.
                if self.0 == 0 {
                    return Ok(Created::Created);
                }
                self.0 -= 1;
                Ok(Created::Exists(None))
            }
        }
        let web = key("prod", &[("app", "web")]);
        let wanted: BTreeSet<_> = [web.clone()].into();
        let (done, errors) = allocate_missing(&mut BTreeMap::new(), &wanted, &mut Broken(2));
        assert!(errors.is_empty());
        assert_eq!(done, vec![(candidate(&web, 2), web.clone())]);
        let (done, errors) =
            allocate_missing(&mut BTreeMap::new(), &wanted, &mut Broken(MAX_PROBES));
        assert!(done.is_empty());
        assert_eq!(
            errors,
            vec![Error::Exhausted {
                key: web.clone(),
                tries: MAX_PROBES
            }]
        );
        assert!(
            errors[0].to_string().contains("namespace prod"),
            "{}",
            errors[0]
        );

        struct Down;
        impl IdentityStore for Down {
            fn create(&mut self, _: Identity, _: &IdentityKey) -> Result<Created, String> {
                Err("permission denied".into())
            }
        }
        let (done, errors) = allocate_missing(&mut BTreeMap::new(), &wanted, &mut Down);
        assert!(done.is_empty());
        assert!(matches!(&errors[..], [Error::Store { id, .. }] if *id == candidate(&web, 0)));
        assert!(errors[0].to_string().contains("permission denied"));

        // A label set readers would refuse is never written (it would only
        // occupy a number): reported, and the store is not touched.
        let bad: BTreeSet<_> = [key("Not_A_Namespace", &[("app", "web")])].into();
        let (done, errors) = allocate_missing(&mut BTreeMap::new(), &bad, &mut Down);
        assert!(done.is_empty());
        assert!(
            matches!(&errors[..], [Error::Unpublishable { .. }]),
            "{errors:?}"
        );
    }

    #[test]
    fn duplicates_resolve_to_the_lowest_number_and_become_unused() {
        let web = key("prod", &[("app", "web")]);
        let db = key("prod", &[("app", "db")]);
        let published: BTreeMap<Identity, IdentityKey> = [
            (Identity(900), web.clone()),
            (Identity(300), web.clone()),
            (Identity(500), db.clone()),
        ]
        .into();
        let p = Published::resolve(&published);
        assert_eq!(p.get("prod", &web.labels), Some(Identity(300)));
        assert_eq!(p.duplicates, [(Identity(900), Identity(300))].into());
        // Only web has pods: db is unused, and so is web's losing duplicate.
        let unused = unused(&published, &[web.clone()].into());
        assert_eq!(unused, [Identity(500), Identity(900)].into());
    }

    #[test]
    fn collector_deletes_only_after_a_continuous_grace_period() {
        use std::time::{Duration, Instant};
        let grace = Duration::from_secs(600);
        let t0 = Instant::now();
        let mut c = Collector::default();
        let a = Identity(300);
        let set: BTreeSet<_> = [a].into();
        assert!(c.due(&set, t0, grace).is_empty());
        assert!(c.due(&set, t0 + Duration::from_secs(599), grace).is_empty());
        // Used again for a moment: the clock starts over.
        assert!(c
            .due(&BTreeSet::new(), t0 + Duration::from_secs(599), grace)
            .is_empty());
        let t1 = t0 + Duration::from_secs(700);
        assert!(c.due(&set, t1, grace).is_empty());
        assert_eq!(c.due(&set, t1 + grace, grace), vec![a]);
        c.forget(a);
        assert!(c.due(&set, t1 + grace, grace).is_empty());
    }

    #[test]
    fn mark_round_trip() {
        for id in [
            Identity::HOST,
            Identity::WORLD,
            Identity::UNMANAGED,
            Identity::REMOTE_NODE,
            Identity(256),
            Identity(Identity::LIMIT - 1),
        ] {
            let m = mark(id);
            assert_eq!(m & 0xff, MARK_MAGIC_IDENTITY);
            assert_eq!(identity_from_mark(m), Some(id));
        }
        assert_eq!(mark(Identity(0x123456)), 0x1234_565e);
    }

    #[test]
    fn foreign_marks_are_not_identities() {
        assert_eq!(identity_from_mark(0), None);
        assert_eq!(identity_from_mark(0x5e), None); // magic but no identity
        assert_eq!(identity_from_mark(0x1234_5600), None);
        assert_eq!(identity_from_mark(0x1234_565f), None);
        assert_eq!(identity_from_mark(0xe5), None);
    }
}
