//! Security identities: a number per (namespace, label set), the same on every node.
//!
//! The number travels in `skb->mark` between the TC hooks of one node:
//! `mark = (identity << 8) | MARK_MAGIC_IDENTITY`.
//!
//! Allocation is a stable hash, so every node computes the same number
//! without talking to the others; [`allocate`] resolves hash collisions
//! deterministically over the set of label sets present (see there for the
//! trade-off against a published allocation). Values from
//! [`Identity::FIRST_LOCAL`] up are node-local (the policy compiler's CIDR
//! identities) and never leave the node.

use std::collections::BTreeMap;
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

/// Allocates identities to every `(namespace, labels)` key present, the
/// same on every node that sees the same set.
///
/// Each key gets [`identity_for`], its hash. Two keys that hash to the same
/// value are resolved deterministically: the key that sorts first keeps the
/// hash, the next one takes the next free value (wrapping inside the
/// allocated range). So every node with the same cluster view computes the
/// same numbers without coordination, and collisions (about 3% odds for
/// 1,000 label sets in ~16.7 M values) no longer merge two label sets into
/// one identity.
///
/// The cost of not publishing allocations: when the colliding key that
/// sorts first appears or disappears, the other one is renumbered, and
/// nodes that have not yet seen the change disagree until they do (one
/// resync). Only label sets that collide are affected; a published
/// allocation (identities written to the cluster source by the first agent
/// that needs one) would remove that window at the cost of a writer and
/// garbage collection, and is left for the kube source.
pub fn allocate<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
) -> BTreeMap<(String, BTreeMap<String, String>), Identity> {
    let sorted: std::collections::BTreeSet<(&str, &BTreeMap<String, String>)> =
        keys.into_iter().collect();
    let mut taken = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for (ns, labels) in sorted {
        let mut id = identity_for(ns, labels).0;
        while !taken.insert(id) {
            id += 1;
            if id >= Identity::FIRST_LOCAL {
                id = Identity::FIRST_ALLOCATED;
            }
        }
        out.insert((ns.to_string(), labels.clone()), Identity(id));
    }
    out
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

    #[test]
    fn allocation_resolves_collisions_deterministically() {
        // Find two label sets whose hashes collide (a birthday search over
        // ~16.7 M values: a few thousand candidates suffice).
        let mut seen: BTreeMap<Identity, BTreeMap<String, String>> = BTreeMap::new();
        let (a, b) = (0..200_000)
            .find_map(|i| {
                let l = labels(&[("app", &format!("a{i}"))]);
                let id = identity_for("default", &l);
                seen.insert(id, l.clone()).map(|prev| (prev, l))
            })
            .expect("a collision within 200k label sets");
        let other = labels(&[("app", "other")]);
        let keys = [("default", &b), ("default", &other), ("default", &a)];
        let alloc = allocate(keys);
        let ida = alloc[&("default".to_string(), a.clone())];
        let idb = alloc[&("default".to_string(), b.clone())];
        assert_ne!(ida, idb);
        // The key that sorts first keeps its hash.
        let (first, second) = if a < b { (ida, idb) } else { (idb, ida) };
        assert_eq!(first, identity_for("default", &a));
        assert_eq!(second.0, first.0 + 1);
        // Input order does not matter; keys without collision keep their hash.
        let rev = allocate([("default", &a), ("default", &other), ("default", &b)]);
        assert_eq!(rev, alloc);
        assert_eq!(
            alloc[&("default".to_string(), other.clone())],
            identity_for("default", &other)
        );
        // Alone, the second key gets its hash back.
        let alone = allocate([("default", if a < b { &b } else { &a })]);
        assert_eq!(alone.values().next(), Some(&identity_for("default", &a)));
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
