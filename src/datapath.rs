//! The eBPF datapath: the TC programs in `bpf/` (built by `build.rs`), their
//! shared maps, and the loader the agent drives.
//!
//! - `from_pod` runs at TC ingress of every local pod's host-side veth: it
//!   stamps the sender's identity into `skb->mark` and steers traffic for
//!   remote pod CIDRs into the WireGuard TUN (or drops it in strict mode
//!   while the peer is missing).
//! - `to_pod` runs at TC ingress of the TUN: it stamps the authenticated
//!   source's identity and delivers packets for local pods straight into the
//!   pod with `bpf_redirect_peer`.
//!
//! - `into_pod` runs at TC egress of every local pod's host-side veth: once
//!   strict mode converged it drops plaintext whose source is a remote pod
//!   or node (tunnel traffic reaches pods via `to_pod`, never through here).
//!
//! The `from_pod` filters are attached with netlink and deliberately survive
//! the agent (fail closed): see [`Datapath::attach_pod`].

use std::fmt;
use std::net::IpAddr;

mod loader;
pub mod maps;
pub mod sync;

pub use loader::{Datapath, Hook, PolicyAllowed, PolicyDrop, POD_FILTER_PRIORITIES};

/// Errors of the datapath; each names the interface, map or program involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program `{name}` is missing from the object or has the wrong type")]
    MissingProgram { name: &'static str },
    #[error("loading eBPF program `{name}` into the kernel: {source}")]
    Verify {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map `{name}` is missing from the object or has the wrong type: {source}")]
    MissingMap {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("network interface `{ifname}`: {source}")]
    Interface {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} `{prog}` on `{ifname}`: {source}")]
    Attach {
        action: &'static str,
        prog: &'static str,
        ifname: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("adding the clsact qdisc to `{ifname}`: {source}")]
    Qdisc {
        ifname: String,
        #[source]
        source: Box<aya::programs::tc::TcError>,
    },
    #[error("map `{map}`, key {key}: {source}")]
    Map {
        map: &'static str,
        key: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("invalid datapath config: {0}")]
    Config(String),
    #[error("identity {identity} of {key} does not fit the 24-bit mark (max {max})", max = maps::IDENTITY_MAX)]
    IdentityTooLarge { key: String, identity: u32 },
}

/// Settings the agent can change at runtime (written to `veil_config`).
///
/// `enabled && strict` also sets `CFG_REFUSE_PLAINTEXT`: the agent passes
/// `strict` only once the transition plan fails closed, which is exactly when
/// the node reports `acceptsPlaintext: false` (`reconcile::enable`), so from
/// then on `into_pod` drops plaintext arriving from remote pods and nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Encrypt traffic to remote pod CIDRs.
    pub enabled: bool,
    /// While enabled, drop (rather than send in plaintext) traffic to remote
    /// pod CIDRs whose node has no WireGuard peer yet.
    pub strict: bool,
    /// ifindex of the WireGuard TUN (`veil0`); `to_pod` also uses it to
    /// recognise that it runs on the TUN (no L2 header).
    pub tun_ifindex: u32,
    /// MTU of the TUN; SYN MSS is clamped to `tun_mtu - 40` (IPv4) and
    /// `tun_mtu - 60` (IPv6).
    pub tun_mtu: u16,
}

/// A local pod, keyed by its IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    /// The pod's security identity.
    pub identity: u32,
    /// ifindex of the pod's host-side veth.
    pub ifindex: u32,
}

/// A remote pod CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteValue {
    /// The owning node's WireGuard peer is configured and can carry traffic.
    pub has_peer: bool,
    /// This node's own pod CIDR, carved out of a covering cluster-wide range.
    pub local: bool,
    /// An agent-chosen number for the owning node (for diagnostics).
    pub node_id: u32,
}

/// Why a packet was counted in `veil_metrics` (the slot is the code's
/// absolute value; drop codes are negative, as `DROP_*` in bpf/lib/common.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// `from_pod` redirected the packet into the TUN (to be encrypted).
    ForwardedToTun,
    /// `to_pod` delivered a decrypted packet into a local pod.
    DeliveredToPod,
    /// Non-strict mode sent a remote-pod packet in plaintext: no peer yet.
    PassedNoPeer,
    /// Strict mode dropped a remote-pod packet: no peer yet.
    DropNoPeer,
    /// Truncated or malformed headers.
    DropInvalid,
    /// Encryption enabled but no TUN ifindex configured.
    DropNoTun,
    /// A packet rewrite helper failed.
    DropWrite,
    /// Denied by identity policy (a deny rule, or isolated and not allowed).
    DropPolicy,
    /// Allowed by policy only over the tunnel, and it was not.
    DropPolicyUnencrypted,
    /// `into_pod`: plaintext from a remote pod or node, after strict mode
    /// converged.
    DropPlaintextRefused,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::ForwardedToTun,
        Reason::DeliveredToPod,
        Reason::PassedNoPeer,
        Reason::DropNoPeer,
        Reason::DropInvalid,
        Reason::DropNoTun,
        Reason::DropWrite,
        Reason::DropPolicy,
        Reason::DropPolicyUnencrypted,
        Reason::DropPlaintextRefused,
    ];

    /// The code the programs use (`FWD_*` >= 0, `DROP_*` < 0).
    pub const fn code(self) -> i32 {
        match self {
            Reason::ForwardedToTun => 0,
            Reason::DeliveredToPod => 1,
            Reason::PassedNoPeer => 2,
            Reason::DropNoPeer => -3,
            Reason::DropInvalid => -4,
            Reason::DropNoTun => -5,
            Reason::DropWrite => -6,
            Reason::DropPolicy => -7,
            Reason::DropPolicyUnencrypted => -8,
            Reason::DropPlaintextRefused => -9,
        }
    }

    /// The `veil_metrics` slot.
    pub const fn slot(self) -> u32 {
        self.code().unsigned_abs()
    }

    pub const fn is_drop(self) -> bool {
        self.code() < 0
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::ForwardedToTun => "forwarded_to_tun",
            Reason::DeliveredToPod => "delivered_to_pod",
            Reason::PassedNoPeer => "passed_no_peer",
            Reason::DropNoPeer => "drop_no_peer",
            Reason::DropInvalid => "drop_invalid",
            Reason::DropNoTun => "drop_no_tun",
            Reason::DropWrite => "drop_write",
            Reason::DropPolicy => "drop_policy",
            Reason::DropPolicyUnencrypted => "drop_policy_unencrypted",
            Reason::DropPlaintextRefused => "drop_plaintext_refused",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// MSS values for a TUN MTU: the IPv4 (20) or IPv6 (40) header plus the
/// 20-byte TCP header come off the MTU (RFC 879, RFC 8200 section 5).
pub fn mss_for_mtu(tun_mtu: u16) -> Result<(u16, u16), Error> {
    // 1280 is the IPv6 minimum link MTU (RFC 8200 section 5); a WireGuard TUN
    // smaller than that cannot carry IPv6 and is certainly a mistake.
    if tun_mtu < 1280 {
        return Err(Error::Config(format!(
            "tun_mtu {tun_mtu} is below 1280, the minimum IPv6 link MTU"
        )));
    }
    Ok((tun_mtu - 40, tun_mtu - 60))
}

fn key_str(ip: &IpAddr) -> String {
    ip.to_string()
}

// The agent moves the datapath across tokio tasks.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Datapath>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_slots_are_distinct_and_in_range() {
        let mut seen = std::collections::BTreeSet::new();
        for r in Reason::ALL {
            assert!(r.slot() < maps::METRICS_MAX, "{r}");
            assert!(seen.insert(r.slot()), "duplicate slot for {r}");
            assert_eq!(r.is_drop(), r.as_str().starts_with("drop_"));
        }
    }

    #[test]
    fn mss_from_mtu() {
        assert_eq!(mss_for_mtu(1420).unwrap(), (1380, 1360));
        assert!(mss_for_mtu(1000).is_err());
    }
}
