//! The test cluster's network: an underlay bridge, node namespaces on it, pod
//! namespaces on each node, host-gw routes between nodes (DESIGN.md "Test topology").
//!
//! Everything lives in namespaces created here; nothing touches the root namespace.
//! Veths are created directly in their target namespaces (`ip -n NS link add ... peer
//! ... netns OTHER`), so no device ever appears in the root namespace, even briefly.

use std::net::Ipv4Addr;

use super::netns::{unique_prefix, Netns};

/// The WireGuard port every node listens on.
pub const WG_PORT: u16 = 51820;
/// Calico-style gateway the pods route through; answered by proxy ARP on the host veth.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// The Kubernetes namespace all test pods live in.
pub const POD_NAMESPACE: &str = "default";

/// One node: a namespace with `eth0` on the underlay bridge.
#[derive(Debug)]
pub struct Node {
    pub ns: Netns,
    /// 1-based, as in `198.18.0.<index>` and `10.244.<index>.0/24`.
    pub index: u8,
    /// The Kubernetes node name (`node<index>`).
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    /// This node's port on the underlay bridge (in the underlay namespace).
    pub bridge_port: String,
    /// Next pod slot on this node (pods can be added at runtime).
    next_pod: u8,
}

/// One pod: a namespace with `eth0` (a /32) whose peer `veth<j>` sits on its node.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    /// Index of the node (1-based).
    pub node: u8,
    pub slot: u8,
    /// The Kubernetes pod name (`pod-<node>-<slot>`).
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host-side interface in the node namespace.
    pub host_if: String,
}

impl Pod {
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.ip)
    }
}

/// The whole network; dropping it removes every namespace (and so every device).
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    // Pods first: dropped before the nodes they hang off.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub underlay: Netns,
}

impl Topology {
    /// `nodes` node namespaces (1..=nodes) with `pods_per_node` pods each.
    pub fn build(nodes: u8, pods_per_node: u8) -> Self {
        assert!(
            (1..=200).contains(&nodes) && pods_per_node <= 200,
            "topology too large"
        );
        let prefix = unique_prefix();
        let underlay = Netns::new(format!("{prefix}u"));
        disable_ipv6(&underlay);
        // Without multicast snooping the bridge joins no group (with it, it joins
        // 224.0.0.106, RFC 4286) and so sends no IGMP reports onto the ports: the
        // underlay carries only what the nodes send.
        underlay.exec_ok(&[
            "ip",
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        underlay.exec_ok(&["ip", "link", "set", "br0", "up"]);
        let mut topo = Topology {
            prefix,
            pods: Vec::new(),
            nodes: Vec::new(),
            underlay,
        };
        for i in 1..=nodes {
            topo.add_node(i);
        }
        // host-gw: every node routes every other node's pod CIDR in plaintext via its
        // underlay address, so whatever Veil fails to steer leaves in the clear and the
        // capture catches it.
        for n in &topo.nodes {
            for other in &topo.nodes {
                if other.index != n.index {
                    n.ns.exec_ok(&[
                        "ip",
                        "route",
                        "add",
                        &other.pod_cidr,
                        "via",
                        &other.underlay_ip.to_string(),
                        "dev",
                        "eth0",
                    ]);
                }
            }
        }
        for i in 1..=nodes {
            for _ in 0..pods_per_node {
                topo.add_pod(i);
            }
        }
        topo
    }

    fn add_node(&mut self, i: u8) {
        let ns = Netns::new(format!("{}n{i}", self.prefix));
        disable_ipv6(&ns);
        sysctl(&ns, "net.ipv4.ip_forward", "1");
        sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0");
        sysctl(&ns, "net.ipv4.conf.default.rp_filter", "0");
        let port = format!("n{i}");
        let under = self.underlay.name().to_string();
        ns.exec_ok(&[
            "ip", "link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", &port,
            "netns", &under,
        ]);
        self.underlay
            .exec_ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
        let ip = Ipv4Addr::new(198, 18, 0, i);
        ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        // Proxy ARP answers for the pods' gateway only if the node has a unicast route
        // to it through another device (arp_fwd_proxy in net/ipv4/arp.c); a /32 on lo
        // gives it one without routing anything onto the underlay.
        ns.exec_ok(&[
            "ip",
            "route",
            "add",
            &format!("{POD_GATEWAY}/32"),
            "dev",
            "lo",
        ]);
        self.nodes.push(Node {
            ns,
            index: i,
            name: format!("node{i}"),
            underlay_ip: ip,
            pod_cidr: format!("10.244.{i}.0/24"),
            bridge_port: port,
            next_pod: 0,
        });
    }

    /// Adds a pod on node `i` (as a CNI would: netns, veth, /32 route, proxy ARP).
    /// Returns its index in `self.pods`.
    pub fn add_pod(&mut self, i: u8) -> usize {
        let prefix = self.prefix.clone();
        let node = self.node_mut(i);
        let j = node.next_pod;
        node.next_pod += 1;
        let node = self.node(i);
        let ns = Netns::new(format!("{prefix}n{i}p{j}"));
        disable_ipv6(&ns);
        let host_if = format!("veth{j}");
        node.ns.exec_ok(&[
            "ip",
            "link",
            "add",
            &host_if,
            "mtu",
            "1500",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        let ip = Ipv4Addr::new(10, 244, i, 10 + j);
        ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        ns.exec_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY,
            "dev",
            "eth0",
            "onlink",
        ]);
        sysctl(&node.ns, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1");
        sysctl(&node.ns, &format!("net.ipv4.conf.{host_if}.rp_filter"), "0");
        node.ns.exec_ok(&["ip", "link", "set", &host_if, "up"]);
        node.ns.exec_ok(&[
            "ip",
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &host_if,
            "scope",
            "link",
        ]);
        self.pods.push(Pod {
            ns,
            node: i,
            slot: j,
            name: format!("pod-{i}-{j}"),
            ip,
            host_if,
        });
        self.pods.len() - 1
    }

    pub fn node(&self, i: u8) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.index == i)
            .unwrap_or_else(|| panic!("no node {i} in topology"))
    }

    fn node_mut(&mut self, i: u8) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.index == i)
            .unwrap_or_else(|| panic!("no node {i} in topology"))
    }

    pub fn pod(&self, node: u8, slot: u8) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.node == node && p.slot == slot)
            .unwrap_or_else(|| panic!("no pod {slot} on node {node}"))
    }

    pub fn pods_on(&self, node: u8) -> Vec<&Pod> {
        self.pods.iter().filter(|p| p.node == node).collect()
    }

    /// The underlay bridge ports, one per node: where a capture must listen.
    pub fn bridge_ports(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.bridge_port.clone()).collect()
    }
}

fn sysctl(ns: &Netns, key: &str, value: &str) {
    ns.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")]);
}

/// No IPv6 on test links: router solicitations and MLD reports would otherwise show
/// up on the underlay as non-WireGuard traffic and muddy the leak analysis.
fn disable_ipv6(ns: &Netns) {
    sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1");
    sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1");
}
