//! `#[repr(C)]` mirrors of the structs and constants in `bpf/lib/maps.h` and
//! `bpf/lib/common.h`, and the encoding of addresses and prefixes into the
//! 16-byte keys the maps use.
//!
//! Sizes are checked at compile time against the C layout; a mismatch with
//! the C side is a build error here, not a silently misread map value.

use std::mem::size_of;
use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;

/// `skb->mark` low byte tagging a Veil identity mark (bits 8..31 hold the identity).
pub const MARK_MAGIC_IDENTITY: u32 = 0x5e;
/// Shift of the identity inside the mark.
pub const MARK_IDENTITY_SHIFT: u32 = 8;
/// Largest identity that fits the mark (24 bits).
pub const IDENTITY_MAX: u32 = 0x00ff_ffff;

/// Reserved identity: the local host.
pub const ID_HOST: u32 = 1;
/// Reserved identity: anything outside the cluster (and unknown remote sources).
pub const ID_WORLD: u32 = 2;
/// Reserved identity: a local source that is not a Veil-managed pod.
pub const ID_UNMANAGED: u32 = 3;
/// Reserved identity: another node of the cluster.
pub const ID_REMOTE_NODE: u32 = 4;

/// `veil_config.flags`: encryption enabled.
pub const CFG_ENABLED: u32 = 1 << 0;
/// `veil_config.flags`: drop remote-pod traffic while its peer is not ready.
pub const CFG_STRICT: u32 = 1 << 1;
/// `veil_config.flags`: strict mode converged; `into_pod` drops plaintext
/// arriving from remote pods and nodes.
pub const CFG_REFUSE_PLAINTEXT: u32 = 1 << 2;
/// `veil_remote` value flag: the node's WireGuard peer is configured.
pub const REMOTE_HAS_PEER: u32 = 1 << 0;
/// `veil_remote` value flag: this node's own pod CIDR (never steered, never dropped).
pub const REMOTE_LOCAL: u32 = 1 << 1;

/// Number of slots in `veil_metrics` (`METRICS_MAX`).
pub const METRICS_MAX: u32 = 10;

/// The mark a program stamps for `identity` (`identity_mark()` in maps.h).
pub const fn identity_mark(identity: u32) -> u32 {
    ((identity & IDENTITY_MAX) << MARK_IDENTITY_SHIFT) | MARK_MAGIC_IDENTITY
}

/// A 16-byte address key: IPv6 as is, IPv4 as IPv4-mapped `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr16(pub [u8; 16]);

impl From<IpAddr> for Addr16 {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Self(a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => Self(a.octets()),
        }
    }
}

/// `struct endpoint_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointRaw {
    pub identity: u32,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub flags: u8,
    pub pad: u8,
}

/// `struct remote_key` (what aya's `Key<Addr16>` lays out, packed).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteKey {
    pub prefixlen: u32,
    pub addr: [u8; 16],
}

/// `struct remote_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RemoteRaw {
    pub flags: u32,
    pub node_id: u32,
}

/// `struct config_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigRaw {
    pub flags: u32,
    pub tun_ifindex: u32,
    pub mss_v4: u16,
    pub mss_v6: u16,
    pub pad: u32,
}

/// `struct metrics_value` (one per CPU and reason).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsRaw {
    pub packets: u64,
    pub bytes: u64,
}

/// The data part of `struct policy_key` (after `prefixlen`, which aya's
/// `Key` adds): big-endian, because the LPM trie matches bytes in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyData {
    pub subject: [u8; 4],
    pub peer: [u8; 4],
    pub dir: u8,
    pub proto: u8,
    pub port: [u8; 2],
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValueRaw {
    pub verdict: u8,
    pub pad: [u8; 3],
    pub rule: u32,
}

/// `struct policy_drop_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyDropKey {
    pub src: u32,
    pub dst: u32,
    /// `|DROP_*|`.
    pub reason: u32,
    /// 0 ingress, 1 egress (the direction whose check failed).
    pub dir: u32,
}

/// The LPM key of a compiled policy entry.
pub fn policy_key(k: &crate::policy::compile::EntryKey) -> Key<PolicyKeyData> {
    let start = k.block.start;
    Key::new(
        k.prefix_len(),
        PolicyKeyData {
            subject: k.subject.0.to_be_bytes(),
            peer: k.peer.to_be_bytes(),
            dir: k.direction as u8,
            proto: (start >> 16) as u8,
            port: ((start & 0xffff) as u16).to_be_bytes(),
        },
    )
}

// SAFETY: each type is #[repr(C)], made only of integers and byte arrays,
// with no padding (the sizes below prove every byte is a field), so every bit
// pattern is a valid value and the bytes can be copied to and from the kernel.
unsafe impl aya::Pod for Addr16 {}
// SAFETY: see above.
unsafe impl aya::Pod for EndpointRaw {}
// SAFETY: see above.
unsafe impl aya::Pod for RemoteKey {}
// SAFETY: see above.
unsafe impl aya::Pod for RemoteRaw {}
// SAFETY: see above.
unsafe impl aya::Pod for ConfigRaw {}
// SAFETY: see above.
unsafe impl aya::Pod for MetricsRaw {}
// SAFETY: see above.
unsafe impl aya::Pod for PolicyKeyData {}
// SAFETY: see above.
unsafe impl aya::Pod for PolicyValueRaw {}
// SAFETY: see above.
unsafe impl aya::Pod for PolicyDropKey {}

const _: () = assert!(size_of::<Addr16>() == 16);
const _: () = assert!(size_of::<EndpointRaw>() == 4 + 4 + 6 + 1 + 1);
const _: () = assert!(size_of::<RemoteKey>() == 4 + 16);
const _: () = assert!(size_of::<Key<Addr16>>() == size_of::<RemoteKey>());
const _: () = assert!(size_of::<RemoteRaw>() == 8);
const _: () = assert!(size_of::<ConfigRaw>() == 4 + 4 + 2 + 2 + 4);
const _: () = assert!(size_of::<MetricsRaw>() == 16);
const _: () = assert!(size_of::<PolicyKeyData>() == 12);
const _: () = assert!(size_of::<Key<PolicyKeyData>>() == 16);
const _: () = assert!(size_of::<PolicyValueRaw>() == 8);
const _: () = assert!(size_of::<PolicyDropKey>() == 16);

/// The LPM key of a prefix: host bits cleared, IPv4 prefix lengths + 96 to
/// account for the `::ffff:0:0/96` mapping.
pub fn prefix_key(net: IpNet) -> RemoteKey {
    let net = net.trunc();
    let prefixlen = match net {
        IpNet::V4(n) => u32::from(n.prefix_len()) + 96,
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    RemoteKey {
        prefixlen,
        addr: Addr16::from(net.addr()).0,
    }
}

impl From<RemoteKey> for Key<Addr16> {
    fn from(k: RemoteKey) -> Self {
        Key::new(k.prefixlen, Addr16(k.addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn v4_is_ipv4_mapped() {
        let a = Addr16::from(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7)));
        assert_eq!(
            a.0,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 244, 1, 7]
        );
    }

    #[test]
    fn v6_is_verbatim() {
        let ip: Ipv6Addr = "fd00:10:244::1:7".parse().unwrap();
        assert_eq!(Addr16::from(IpAddr::V6(ip)).0, ip.octets());
    }

    #[test]
    fn v4_prefix_adds_96_and_clears_host_bits() {
        let k = prefix_key("10.244.1.99/24".parse().unwrap());
        assert_eq!(k.prefixlen, 120);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 10, 244, 1, 0]);
        assert_eq!(&k.addr[..10], &[0; 10]);
        let all = prefix_key("0.0.0.0/0".parse().unwrap());
        assert_eq!(all.prefixlen, 96);
    }

    #[test]
    fn v6_prefix_is_verbatim() {
        let k = prefix_key("fd00:10:244:1::ff/64".parse().unwrap());
        assert_eq!(k.prefixlen, 64);
        let want: Ipv6Addr = "fd00:10:244:1::".parse().unwrap();
        assert_eq!(k.addr, want.octets());
    }

    #[test]
    fn mark_layout() {
        assert_eq!(identity_mark(0x1234), 0x0012_345e);
        assert_eq!(identity_mark(ID_WORLD), 0x25e);
        // Identities wider than 24 bits cannot leak into other users' bits.
        assert_eq!(identity_mark(0xff00_0001), 0x15e);
    }
}
