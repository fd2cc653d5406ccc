//! The routing safety net, as a pure plan.
//!
//! eBPF steers pod traffic into `veil0`, but a packet the programs never see
//! (a pod whose veth is not attached yet, host-originated traffic) would follow
//! the CNI's plain route to the remote node — in plaintext. So Veil also keeps
//! a routing table, consulted before `main` by a rule, with per remote pod CIDR:
//! - a route `dev veil0` when that CIDR has a peer (the engine encrypts it);
//! - in strict mode a `blackhole` at a worse metric. Routes through `veil0`
//!   vanish with the device when the agent dies; the blackhole stays, so the
//!   fallback fails closed instead of falling through to `main`.
//!
//! In strict mode the cluster-wide pod ranges are blackholed too (a node whose
//! Node object is gone still has its CNI route), and this node's own pod CIDRs
//! get a `throw` route, which ends the lookup in Veil's table and continues
//! with the next rule (`main`), so local pods stay reachable.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::reconcile::Desired;

/// The routing table Veil owns ("ve" in ASCII-ish, away from common ids).
pub const TABLE: u32 = 0x5e11;
/// Priority of the `lookup TABLE` rule: before `main` (32766).
pub const RULE_PRIORITY: u32 = 90;
/// Metric of the route through the TUN device.
pub const TUN_METRIC: u32 = 0;
/// Metric of the strict-mode blackhole, behind the TUN route.
pub const BLACKHOLE_METRIC: u32 = 4096;

/// One route in Veil's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FallbackRoute {
    /// `dst dev <tun> metric TUN_METRIC`
    Tun { dst: IpNet, ifindex: u32 },
    /// `blackhole dst metric BLACKHOLE_METRIC`
    Blackhole { dst: IpNet },
    /// `throw dst`: not Veil's business, continue with the next rule.
    Throw { dst: IpNet },
}

impl FallbackRoute {
    pub fn dst(&self) -> IpNet {
        match *self {
            FallbackRoute::Tun { dst, .. }
            | FallbackRoute::Blackhole { dst }
            | FallbackRoute::Throw { dst } => dst,
        }
    }
}

/// The routes Veil's table should hold. Empty when encryption is off (and then
/// the rule is removed too, see [`wants_rule`]).
pub fn plan(desired: &Desired, tun_ifindex: Option<u32>) -> BTreeSet<FallbackRoute> {
    let mut routes = BTreeSet::new();
    if !desired.encryption_enabled {
        return routes;
    }
    for (cidr, remote) in &desired.remote_cidrs {
        let dst = cidr.trunc();
        if let (Some(ifindex), Some(_)) = (tun_ifindex, remote.peer) {
            routes.insert(FallbackRoute::Tun { dst, ifindex });
        }
        if desired.strict {
            routes.insert(FallbackRoute::Blackhole { dst });
        }
    }
    if desired.strict {
        for cidr in &desired.cluster_pod_cidrs {
            routes.insert(FallbackRoute::Blackhole { dst: cidr.trunc() });
        }
        for cidr in &desired.local_pod_cidrs {
            routes.insert(FallbackRoute::Throw { dst: cidr.trunc() });
        }
    }
    routes
}

/// Whether the `lookup TABLE` rule should exist.
pub fn wants_rule(desired: &Desired) -> bool {
    desired.encryption_enabled
}

/// What to add and what to delete to get from `have` to `want`.
pub fn diff<'a>(
    have: &'a BTreeSet<FallbackRoute>,
    want: &'a BTreeSet<FallbackRoute>,
) -> (Vec<FallbackRoute>, Vec<FallbackRoute>) {
    let add = want.difference(have).copied().collect();
    let del = have.difference(want).copied().collect();
    (add, del)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::PublicKey;
    use crate::reconcile::RemoteCidr;

    fn desired(enabled: bool, strict: bool) -> Desired {
        let mut d = Desired {
            encryption_enabled: enabled,
            strict,
            ..Default::default()
        };
        d.remote_cidrs.insert(
            "10.244.2.0/24".parse().unwrap(),
            RemoteCidr {
                node: "b".into(),
                peer: Some(PublicKey([1; 32])),
            },
        );
        d.remote_cidrs.insert(
            "10.244.3.0/24".parse().unwrap(),
            RemoteCidr {
                node: "c".into(),
                peer: None,
            },
        );
        d
    }

    #[test]
    fn strict_blackholes_every_remote_cidr_and_tunnels_those_with_peers() {
        let routes = plan(&desired(true, true), Some(7));
        let b: IpNet = "10.244.2.0/24".parse().unwrap();
        let c: IpNet = "10.244.3.0/24".parse().unwrap();
        let want: BTreeSet<_> = [
            FallbackRoute::Tun { dst: b, ifindex: 7 },
            FallbackRoute::Blackhole { dst: b },
            FallbackRoute::Blackhole { dst: c },
        ]
        .into();
        assert_eq!(routes, want);
    }

    #[test]
    fn strict_blackholes_the_cluster_range_and_throws_local_cidrs() {
        let mut d = desired(true, true);
        d.cluster_pod_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
        d.local_pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
        let routes = plan(&d, Some(7));
        assert!(routes.contains(&FallbackRoute::Blackhole {
            dst: "10.244.0.0/16".parse().unwrap()
        }));
        assert!(routes.contains(&FallbackRoute::Throw {
            dst: "10.244.1.0/24".parse().unwrap()
        }));
        // Not strict: neither.
        d.strict = false;
        let routes = plan(&d, Some(7));
        assert!(routes
            .iter()
            .all(|r| matches!(r, FallbackRoute::Tun { .. })));
    }

    #[test]
    fn without_tun_strict_still_blackholes() {
        let routes = plan(&desired(true, true), None);
        assert_eq!(routes.len(), 2);
        assert!(routes
            .iter()
            .all(|r| matches!(r, FallbackRoute::Blackhole { .. })));
    }

    #[test]
    fn non_strict_has_no_blackholes() {
        let routes = plan(&desired(true, false), Some(7));
        assert_eq!(routes.len(), 1);
        assert!(matches!(
            routes.iter().next(),
            Some(FallbackRoute::Tun { .. })
        ));
    }

    #[test]
    fn disabled_means_no_routes_and_no_rule() {
        let d = desired(false, true);
        assert!(plan(&d, Some(7)).is_empty());
        assert!(!wants_rule(&d));
    }

    #[test]
    fn host_bits_are_truncated() {
        let mut d = desired(true, true);
        d.remote_cidrs.clear();
        d.remote_cidrs.insert(
            "10.244.9.7/24".parse().unwrap(),
            RemoteCidr {
                node: "x".into(),
                peer: None,
            },
        );
        let routes = plan(&d, None);
        assert_eq!(
            routes.iter().next().map(|r| r.dst()),
            Some("10.244.9.0/24".parse().unwrap())
        );
    }

    #[test]
    fn diff_adds_missing_and_deletes_stale() {
        let b: IpNet = "10.244.2.0/24".parse().unwrap();
        let c: IpNet = "10.244.3.0/24".parse().unwrap();
        let have: BTreeSet<_> = [
            FallbackRoute::Blackhole { dst: b },
            FallbackRoute::Tun { dst: b, ifindex: 3 },
        ]
        .into();
        let want: BTreeSet<_> = [
            FallbackRoute::Blackhole { dst: b },
            FallbackRoute::Tun { dst: b, ifindex: 9 },
            FallbackRoute::Blackhole { dst: c },
        ]
        .into();
        let (add, del) = diff(&have, &want);
        assert_eq!(
            add,
            vec![
                FallbackRoute::Tun { dst: b, ifindex: 9 },
                FallbackRoute::Blackhole { dst: c }
            ]
        );
        assert_eq!(del, vec![FallbackRoute::Tun { dst: b, ifindex: 3 }]);
    }
}
