//! Longest-prefix-match table over IPv4 and IPv6 prefixes (WireGuard's AllowedIPs).
//!
//! One binary trie per address family, nodes in a `Vec` arena so that lookups
//! touch no allocator and the table is cheap to rebuild on every peer-set change
//! (the engine rebuilds it wholesale and swaps it in; it is never mutated while
//! readers use it). Addresses are left-aligned in a `u128` so one walk serves
//! both families; a lookup is at most 32 (v4) or 128 (v6) steps.
//!
//! As in WireGuard (`allowedips.c`), inserting a prefix that is already present
//! replaces its value: the last writer wins.

use ipnet::IpNet;
use std::net::IpAddr;

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Node<T> {
    children: [u32; 2],
    value: Option<T>,
}

#[derive(Clone, Debug)]
struct Trie<T> {
    nodes: Vec<Node<T>>,
}

impl<T> Trie<T> {
    fn new() -> Self {
        Self {
            nodes: vec![Node {
                children: [NONE, NONE],
                value: None,
            }],
        }
    }

    fn bit(key: u128, depth: u8) -> usize {
        ((key >> (127 - u32::from(depth))) & 1) as usize
    }

    fn insert(&mut self, key: u128, len: u8, value: T) -> Option<T> {
        let mut at = 0usize;
        for depth in 0..len {
            let b = Self::bit(key, depth);
            let next = self.nodes[at].children[b];
            at = if next == NONE {
                let idx = self.nodes.len();
                self.nodes.push(Node {
                    children: [NONE, NONE],
                    value: None,
                });
                // The arena never exceeds u32::MAX nodes in practice (each prefix adds
                // at most 128); saturating keeps NONE unambiguous if it ever did.
                self.nodes[at].children[b] = u32::try_from(idx).unwrap_or(NONE - 1);
                idx
            } else {
                next as usize
            };
        }
        self.nodes[at].value.replace(value)
    }

    fn lookup(&self, key: u128, width: u8) -> Option<&T> {
        let mut at = 0usize;
        let mut best = self.nodes[0].value.as_ref();
        for depth in 0..width {
            let next = self.nodes[at].children[Self::bit(key, depth)];
            if next == NONE {
                break;
            }
            at = next as usize;
            if let Some(v) = self.nodes[at].value.as_ref() {
                best = Some(v);
            }
        }
        best
    }
}

/// A longest-prefix-match table from IP prefixes to values of type `T`.
#[derive(Clone, Debug)]
pub struct LpmTable<T> {
    v4: Trie<T>,
    v6: Trie<T>,
    len: usize,
}

impl<T> Default for LpmTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn key_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl<T> LpmTable<T> {
    pub fn new() -> Self {
        Self {
            v4: Trie::new(),
            v6: Trie::new(),
            len: 0,
        }
    }

    /// Inserts `prefix` (host bits are ignored); returns the value it replaced.
    pub fn insert(&mut self, prefix: IpNet, value: T) -> Option<T> {
        let prefix = prefix.trunc();
        let key = key_of(prefix.addr());
        let old = match prefix {
            IpNet::V4(p) => self.v4.insert(key, p.prefix_len(), value),
            IpNet::V6(p) => self.v6.insert(key, p.prefix_len(), value),
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value of the longest prefix containing `addr`, if any.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(_) => self.v4.lookup(key_of(addr), 32),
            IpAddr::V6(_) => self.v6.lookup(key_of(addr), 128),
        }
    }

    /// Number of distinct prefixes stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Deterministic xorshift64*: tests must not be flaky, so no OS randomness.
    pub(crate) struct XorShift(pub u64);
    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn longest_prefix_wins_and_families_are_separate() {
        let mut t = LpmTable::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.244.0.0/16"), 2);
        t.insert(net("10.244.3.0/24"), 3);
        t.insert(net("10.244.3.7/32"), 4);
        t.insert(net("fd00::/8"), 6);
        let look = |s: &str| t.lookup(s.parse().expect("addr")).copied();
        assert_eq!(look("10.1.2.3"), Some(1));
        assert_eq!(look("10.244.9.9"), Some(2));
        assert_eq!(look("10.244.3.8"), Some(3));
        assert_eq!(look("10.244.3.7"), Some(4));
        assert_eq!(look("11.0.0.1"), None);
        assert_eq!(look("fd12::1"), Some(6));
        // The v4-mapped form of a v4 address is a v6 address, not the v4 one.
        assert_eq!(look("::ffff:10.1.2.3"), None);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn default_routes_and_host_bits() {
        let mut t = LpmTable::new();
        t.insert(net("0.0.0.0/0"), "v4any");
        t.insert(net("::/0"), "v6any");
        // Host bits set: stored as the network, like `wg set allowed-ips` does.
        t.insert(net("192.168.1.77/24"), "lan");
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Some(&"v4any"));
        assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), Some(&"v6any"));
        assert_eq!(t.lookup("192.168.1.1".parse().unwrap()), Some(&"lan"));
        assert_eq!(t.insert(net("192.168.1.0/24"), "lan2"), Some("lan"));
        assert_eq!(t.len(), 3);
    }

    fn naive<'a>(entries: &'a [(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        // Last insert of an identical prefix wins, as in the trie.
        let mut best: Option<&'a (IpNet, u32)> = None;
        for e in entries {
            if e.0.contains(&addr) && best.is_none_or(|b| e.0.prefix_len() >= b.0.prefix_len()) {
                best = Some(e);
            }
        }
        best.map(|e| e.1)
    }

    fn random_addr(rng: &mut XorShift, v6: bool) -> IpAddr {
        // Keep addresses in a narrow space so that random prefixes overlap often.
        if v6 {
            let hi = 0xfd00_0000_0000_0000u64 | (rng.next() & 0xff);
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(hi) << 64) | u128::from(rng.next()),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(
                0x0af4_0000 | (rng.next() as u32 & 0x0003_ffff),
            ))
        }
    }

    #[test]
    fn differential_against_linear_scan() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20 {
            let mut entries = Vec::new();
            let mut t = LpmTable::new();
            for i in 0..200u32 {
                let v6 = rng.next().is_multiple_of(2);
                let p = match random_addr(&mut rng, v6) {
                    IpAddr::V4(a) => IpNet::V4(
                        Ipv4Net::new(a, 14 + (rng.next() % 19) as u8)
                            .expect("len <= 32")
                            .trunc(),
                    ),
                    IpAddr::V6(a) => IpNet::V6(
                        Ipv6Net::new(a, 56 + (rng.next() % 73) as u8)
                            .expect("len <= 128")
                            .trunc(),
                    ),
                };
                entries.push((p, i));
                t.insert(p, i);
            }
            for _ in 0..2000 {
                let v6 = rng.next().is_multiple_of(2);
                let mut a = random_addr(&mut rng, v6);
                // Half of the probes land inside a stored prefix.
                if rng.next().is_multiple_of(2) {
                    let (p, _) = entries[(rng.next() % entries.len() as u64) as usize];
                    a = p.addr();
                }
                assert_eq!(
                    t.lookup(a).copied(),
                    naive(&entries, a),
                    "round {round}, address {a}"
                );
            }
        }
    }
}
