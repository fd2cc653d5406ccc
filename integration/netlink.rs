//! The netlink adapter against a real kernel, inside a throwaway namespace.
mod harness;

use std::collections::BTreeSet;

use harness::netns::{unique_prefix, Netns};
use veil::netlink::fallback::{FallbackRoute, TABLE};
use veil::netlink::Netlink;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn fallback_table_and_rule_converge_and_clean_up() {
    let ns = Netns::new(format!("{}nl", unique_prefix()));
    ns.exec_ok(&[
        "ip", "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
    ]);
    ns.exec_ok(&["ip", "link", "set", "tun0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "tun0p", "up"]);
    let idx: u32 = ns
        .exec_ok(&["cat", "/sys/class/net/tun0/ifindex"])
        .trim()
        .parse()
        .expect("ifindex");

    let b = "10.244.2.0/24".parse().unwrap();
    let c = "10.244.3.0/24".parse().unwrap();
    let want: BTreeSet<_> = [
        FallbackRoute::Tun {
            dst: b,
            ifindex: idx,
        },
        FallbackRoute::Blackhole { dst: b },
        FallbackRoute::Blackhole { dst: c },
    ]
    .into();

    let w = want.clone();
    ns.run(move || {
        rt().block_on(async {
            let nl = Netlink::connect().expect("netlink");
            nl.sync_fallback(&w, true).await.expect("sync");
            // Idempotent: a second pass changes nothing and does not fail.
            nl.sync_fallback(&w, true).await.expect("sync again");
        })
    });
    let table = TABLE.to_string();
    let routes = ns.exec_ok(&["ip", "route", "show", "table", &table]);
    assert!(routes.contains("10.244.2.0/24 dev tun0"), "{routes}");
    assert!(routes.contains("blackhole 10.244.2.0/24"), "{routes}");
    assert!(routes.contains("blackhole 10.244.3.0/24"), "{routes}");
    let rules = ns.exec_ok(&["ip", "rule", "show"]);
    assert!(rules.contains(&format!("lookup {table}")), "{rules}");
    let rules6 = ns.exec_ok(&["ip", "-6", "rule", "show"]);
    assert!(rules6.contains(&format!("lookup {table}")), "{rules6}");

    // The lookup really goes through Veil's table: to a remote CIDR via the device...
    let get = ns.exec_ok(&["ip", "route", "get", "10.244.2.5"]);
    assert!(get.contains("dev tun0"), "{get}");
    // ...and when the device disappears (agent died), the blackhole takes over.
    ns.exec_ok(&["ip", "link", "del", "tun0"]);
    let get = ns.exec(&["ip", "route", "get", "10.244.2.5"]);
    assert!(
        !get.status.success() || String::from_utf8_lossy(&get.stdout).contains("blackhole"),
        "expected a blackhole, got {get:?}"
    );

    // Removing everything (encryption disabled) leaves no trace.
    ns.run(|| {
        rt().block_on(async {
            let nl = Netlink::connect().expect("netlink");
            nl.sync_fallback(&BTreeSet::new(), false)
                .await
                .expect("sync");
        })
    });
    let routes = ns.exec_ok(&["ip", "route", "show", "table", &table]);
    assert!(routes.trim().is_empty(), "{routes}");
    let rules = ns.exec_ok(&["ip", "rule", "show"]);
    assert!(!rules.contains(&format!("lookup {table}")), "{rules}");
    let rules6 = ns.exec_ok(&["ip", "-6", "rule", "show"]);
    assert!(!rules6.contains(&format!("lookup {table}")), "{rules6}");
}

#[test]
fn host_routes_find_pod_interfaces() {
    let ns = Netns::new(format!("{}nh", unique_prefix()));
    ns.exec_ok(&[
        "ip", "link", "add", "veth1", "type", "veth", "peer", "name", "veth1p",
    ]);
    ns.exec_ok(&["ip", "link", "set", "veth1", "up"]);
    ns.exec_ok(&["ip", "link", "set", "veth1p", "up"]);
    ns.exec_ok(&["ip", "route", "add", "10.244.1.10/32", "dev", "veth1"]);
    ns.exec_ok(&["ip", "route", "add", "10.244.7.0/24", "dev", "veth1"]);
    let (routes, names) = ns.run(|| {
        rt().block_on(async {
            let nl = Netlink::connect().expect("netlink");
            (
                nl.host_routes().await.expect("routes"),
                nl.link_names().await.expect("links"),
            )
        })
    });
    let ip = "10.244.1.10".parse().unwrap();
    let idx = routes.get(&ip).expect("host route found");
    assert_eq!(names.get(idx).map(String::as_str), Some("veth1"));
    // A /24 is not a pod's host route.
    assert!(!routes.contains_key(&"10.244.7.0".parse().unwrap()));
}
