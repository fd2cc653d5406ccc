//! Thin rtnetlink adapter: the host routes that tell us which interface leads
//! to a local pod, link names, and Veil's routing safety net (see [`fallback`]).
//!
//! Everything here talks to the kernel of the network namespace the agent runs
//! in; the decisions live in pure code ([`fallback::plan`], the reconciler).

pub mod fallback;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use fallback::{FallbackRoute, BLACKHOLE_METRIC, RULE_PRIORITY, TABLE, TUN_METRIC};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("invalid route for {dst}: {problem}")]
    InvalidRoute { dst: IpNet, problem: String },
    #[error("netlink: {what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Request { what, source }
}

/// A route-netlink connection in the agent's network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current tokio runtime.
    pub fn connect() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Host routes (`/32`, `/128`) of the main table with their output
    /// interface: a ptp-style CNI installs one per local pod, which is how
    /// the agent finds a pod's host-side veth.
    pub async fn host_routes(&self) -> Result<BTreeMap<IpAddr, u32>, Error> {
        let mut out = BTreeMap::new();
        for msg in self.dump_routes().await? {
            if route_table(&msg) != u32::from(RouteHeader::RT_TABLE_MAIN)
                || msg.header.kind != RouteType::Unicast
            {
                continue;
            }
            let Some(dst) = route_dst(&msg) else { continue };
            if dst.prefix_len() != dst.max_prefix_len() {
                continue;
            }
            if let Some(oif) = route_oif(&msg) {
                out.insert(dst.addr(), oif);
            }
        }
        Ok(out)
    }

    /// Interface names by index.
    pub async fn link_names(&self) -> Result<BTreeMap<u32, String>, Error> {
        let mut links = self.handle.link().get().execute();
        let mut out = BTreeMap::new();
        while let Some(msg) = links.try_next().await.map_err(req("dump links"))? {
            for attr in &msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    out.insert(msg.header.index, name.clone());
                }
            }
        }
        Ok(out)
    }

    /// Makes Veil's routing table and rule match the plan: adds what is
    /// missing, deletes what is stale (and anything else found in the table,
    /// which Veil owns). Adds before deletes, so a route is never missing in between.
    pub async fn sync_fallback(
        &self,
        want: &BTreeSet<FallbackRoute>,
        rule: bool,
    ) -> Result<(), Error> {
        if rule {
            self.ensure_rules().await?;
        }
        let mut have = BTreeSet::new();
        let mut foreign = Vec::new();
        for msg in self.dump_routes().await? {
            if route_table(&msg) != TABLE {
                continue;
            }
            match parse_fallback(&msg) {
                Some(r) => {
                    have.insert(r);
                }
                None => foreign.push(msg),
            }
        }
        let (add, del) = fallback::diff(&have, want);
        for r in add {
            self.handle
                .route()
                .add(build_fallback(&r)?)
                .replace()
                .execute()
                .await
                .map_err(req(format!("add {r:?} to table {TABLE}")))?;
        }
        for r in del {
            self.handle
                .route()
                .del(build_fallback(&r)?)
                .execute()
                .await
                .map_err(req(format!("delete {r:?} from table {TABLE}")))?;
        }
        for msg in foreign {
            self.handle
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(req(format!("delete a foreign route from table {TABLE}")))?;
        }
        if !rule {
            self.remove_rules().await?;
        }
        Ok(())
    }

    async fn dump_routes(&self) -> Result<Vec<RouteMessage>, Error> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(msg).execute();
            while let Some(r) = routes.try_next().await.map_err(req("dump routes"))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn veil_rules(&self) -> Result<Vec<RuleMessage>, Error> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let mut rules = self.handle.rule().get(v).execute();
            while let Some(r) = rules.try_next().await.map_err(req("dump rules"))? {
                let prio = r
                    .attributes
                    .contains(&RuleAttribute::Priority(RULE_PRIORITY));
                let table = r.attributes.contains(&RuleAttribute::Table(TABLE));
                if prio && table {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    async fn ensure_rules(&self) -> Result<(), Error> {
        let have = self.veil_rules().await?;
        let has = |fam| have.iter().any(|r| r.header.family == fam);
        use netlink_packet_route::AddressFamily;
        for (family, name) in [
            (AddressFamily::Inet, "IPv4"),
            (AddressFamily::Inet6, "IPv6"),
        ] {
            if has(family) {
                continue;
            }
            let mut add = self
                .handle
                .rule()
                .add()
                .table_id(TABLE)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable);
            add.message_mut().header.family = family;
            add.execute().await.map_err(req(format!(
                "add rule {RULE_PRIORITY}: lookup {TABLE} ({name})"
            )))?;
        }
        Ok(())
    }

    async fn remove_rules(&self) -> Result<(), Error> {
        for r in self.veil_rules().await? {
            self.handle
                .rule()
                .del(r)
                .execute()
                .await
                .map_err(req(format!("delete rule {RULE_PRIORITY}")))?;
        }
        Ok(())
    }
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_dst(msg: &RouteMessage) -> Option<IpNet> {
    let addr: IpAddr = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    IpNet::new(addr, msg.header.destination_prefix_length).ok()
}

fn route_oif(msg: &RouteMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_metric(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// Recognises a route Veil itself would have built; anything else is foreign.
fn parse_fallback(msg: &RouteMessage) -> Option<FallbackRoute> {
    let dst = route_dst(msg)?;
    match (msg.header.kind, route_metric(msg)) {
        (RouteType::BlackHole, BLACKHOLE_METRIC) => Some(FallbackRoute::Blackhole { dst }),
        (RouteType::Throw, _) => Some(FallbackRoute::Throw { dst }),
        (RouteType::Unicast, TUN_METRIC) => Some(FallbackRoute::Tun {
            dst,
            ifindex: route_oif(msg)?,
        }),
        _ => None,
    }
}

fn build_fallback(r: &FallbackRoute) -> Result<RouteMessage, Error> {
    let dst = r.dst();
    let b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .map_err(|e| Error::InvalidRoute {
            dst,
            problem: e.to_string(),
        })?
        .table_id(TABLE)
        .protocol(RouteProtocol::Static);
    Ok(match *r {
        FallbackRoute::Tun { ifindex, .. } => {
            b.output_interface(ifindex).priority(TUN_METRIC).build()
        }
        FallbackRoute::Blackhole { .. } => b
            .kind(RouteType::BlackHole)
            .priority(BLACKHOLE_METRIC)
            .build(),
        FallbackRoute::Throw { .. } => b.kind(RouteType::Throw).build(),
    })
}
