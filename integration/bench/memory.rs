//! Issue 6 item 3: the agent's memory with a large cluster in its state and no
//! traffic. One node namespace runs the measured agent (with its own pods as real
//! namespaces); the other nodes exist only as objects in the cluster directory:
//! a `Node`, their `Pod`s, and a `VeilNode` announcement signed the way a real
//! agent signs its own (a node identity key certified by the cluster authority,
//! `veilctl node approve`), so the measured agent accepts every one as a peer.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use veil::cluster::file::FileSource;
use veil::cluster::trust::load_authority;
use veil::cluster::Announcement;

use crate::engines::create_authority;
use crate::harness::agent::{Agent, CA_DIR};
use crate::harness::cluster::{pod_object, ClusterDir};
use crate::harness::poll_until;
use crate::harness::topology::{Topology, POD_NAMESPACE, WG_PORT};
use crate::measure::status_kib;

#[derive(Debug, Clone)]
pub struct MemoryResult {
    pub nodes: u32,
    pub pods: u32,
    pub peers: usize,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub converge: Duration,
    /// The agent's own `memory phase=...` DEBUG lines, in log order.
    pub phases: Vec<Phase>,
}

/// VmRSS and VmHWM of the agent at one point of its start, as it logged them
/// (`veil::agent::memory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub name: String,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The `memory` lines of an agent log: `... memory phase="start"
/// vm_rss_kib=5000 vm_hwm_kib=5100`. Other lines, and lines missing a
/// figure, are skipped.
pub fn parse_phases(log: &str) -> Vec<Phase> {
    log.lines()
        .filter_map(|line| {
            let field = |name: &str| -> Option<&str> {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            };
            if !line.contains(" memory ") {
                return None;
            }
            Some(Phase {
                name: field("phase")?.trim_matches('"').to_string(),
                rss_kib: field("vm_rss_kib")?.parse().ok()?,
                hwm_kib: field("vm_hwm_kib")?.parse().ok()?,
            })
        })
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl MemoryResult {
    /// One line for the report: RSS/peak at each phase the agent logged, then
    /// the settled figures, and between which two the peak was reached (the
    /// first phase whose VmHWM is already the final one; VmHWM only grows).
    pub fn breakdown(&self) -> Option<String> {
        if self.phases.is_empty() {
            return None;
        }
        let mut parts: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {:.1}/{:.1}", p.name, mib(p.rss_kib), mib(p.hwm_kib)))
            .collect();
        parts.push(format!(
            "settled {:.1}/{:.1}",
            mib(self.rss_kib),
            mib(self.hwm_kib)
        ));
        let at = self.phases.iter().position(|p| p.hwm_kib >= self.hwm_kib);
        let when = match at {
            Some(0) => format!("before `{}`", self.phases[0].name),
            Some(i) => format!(
                "between `{}` and `{}`",
                self.phases[i - 1].name,
                self.phases[i].name
            ),
            None => format!(
                "after `{}` (later passes, before settling)",
                self.phases[self.phases.len() - 1].name
            ),
        };
        Some(format!(
            "where the memory goes (VmRSS/VmHWM in MiB at each step of the agent's start): {}; \
             the peak was reached {when}",
            parts.join(", ")
        ))
    }
}

/// Checks of [`parse_phases`] and [`MemoryResult::breakdown`] (see
/// `measure::self_test`).
pub fn self_test() {
    let log = "2026-11-21T17:00:00.000001Z DEBUG veil::agent::memory: memory phase=\"start\" vm_rss_kib=4096 vm_hwm_kib=4096\n\
               2026-11-21T17:00:00.000002Z  INFO veil::agent: WireGuard engine up\n\
               2026-11-21T17:00:00.000003Z DEBUG veil::agent::memory: memory phase=\"datapath_loaded\" vm_rss_kib=10240 vm_hwm_kib=30720\n\
               2026-11-21T17:00:00.000004Z DEBUG veil::agent::memory: memory phase=\"broken\" vm_rss_kib=x vm_hwm_kib=1\n\
               2026-11-21T17:00:00.000005Z DEBUG veil::agent::memory: memory phase=first_reconcile vm_rss_kib=20480 vm_hwm_kib=30720\n";
    let phases = parse_phases(log);
    let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["start", "datapath_loaded", "first_reconcile"]);
    assert_eq!((phases[1].rss_kib, phases[1].hwm_kib), (10240, 30720));
    let mut m = MemoryResult {
        nodes: 2,
        pods: 2,
        peers: 1,
        rss_kib: 20480,
        hwm_kib: 30720,
        converge: Duration::from_secs(1),
        phases,
    };
    let line = m.breakdown().expect("phases were logged");
    assert!(
        line.contains("start 4.0/4.0, datapath_loaded 10.0/30.0")
            && line.contains("settled 20.0/30.0")
            && line.ends_with("between `start` and `datapath_loaded`"),
        "{line}"
    );
    m.hwm_kib = 40960;
    let line = m.breakdown().expect("phases were logged");
    assert!(
        line.ends_with("after `first_reconcile` (later passes, before settling)"),
        "{line}"
    );
    m.phases.clear();
    assert_eq!(m.breakdown(), None);
}

/// Node `k`'s underlay address: 198.18.0.0/15, the benchmarking range, only
/// ever configured inside namespaces this run made (node 1's). Nodes 2.. are
/// never contacted: no traffic flows, so no handshake is ever started.
fn underlay_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (k / 250) as u8, (k % 250) as u8)
}

/// Measures the agent on node 1 of a cluster of `nodes` nodes x `pods_per_node` pods.
pub fn measure(nodes: u8, pods_per_node: u8) -> MemoryResult {
    assert!(nodes >= 2, "the memory bench needs peers");
    let topo = Topology::build(1, pods_per_node);
    let dir = ClusterDir::new();
    let work = tempfile::Builder::new()
        .prefix("veil-bench-memory-")
        .tempdir()
        .unwrap_or_else(|e| panic!("create work dir: {e}"));
    let ca = work.path().join(CA_DIR);
    create_authority(&ca);
    let authority = load_authority(&ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));

    dir.add_namespace(
        POD_NAMESPACE,
        &[("kubernetes.io/metadata.name", POD_NAMESPACE)],
    );
    let me = topo.node(1);
    dir.add_node(&me.name, &me.pod_cidr, &me.underlay_ip.to_string());
    for p in &topo.pods {
        dir.add_topology_pod(&topo, p.node, p.slot);
    }
    let now = keymgr::unix_now();
    let publisher = FileSource::new(dir.path());
    for k in 2..=u32::from(nodes) {
        let name = format!("node{k}");
        let cidr = format!("10.244.{k}.0/24");
        dir.add_node(&name, &cidr, &underlay_ip(k).to_string());
        let pods: Vec<Value> = (0..u32::from(pods_per_node))
            .map(|j| {
                // Ten apps across the cluster, so identities repeat as in real clusters.
                let app = format!("app{}", (k + j) % 10);
                pod_object(
                    POD_NAMESPACE,
                    &format!("pod-{k}-{j}"),
                    &[("app", &app), ("veil.dev/test", "yes")],
                    &name,
                    &format!("10.244.{k}.{}", 10 + j),
                )
            })
            .collect();
        dir.write_objects(&format!("pods-{name}.yaml"), &pods);

        let identity = keymgr::IdentityKey::generate();
        let not_before = now.saturating_sub(keymgr::DEFAULT_CLOCK_SKEW_SECS);
        let not_after = now + 86_400;
        let cert = authority
            .certify(&name, identity.public_key(), not_before, not_after)
            .unwrap_or_else(|e| panic!("certify {name}: {e}"));
        let wg = keymgr::WireGuardPrivateKey::generate();
        let body = keymgr::AnnouncementBody {
            node: name.clone(),
            wireguard_key: wg.public_key(),
            generation: 1,
            listen_port: WG_PORT,
            pod_cidrs: vec![cidr.parse().unwrap_or_else(|e| panic!("CIDR {cidr}: {e}"))],
            endpoint: None::<SocketAddr>,
            not_before,
            not_after,
        };
        let signed = keymgr::SignedAnnouncement::sign_by_node(body, &identity, cert)
            .unwrap_or_else(|e| panic!("sign announcement of {name}: {e}"));
        publisher
            .publish_announcement(&Announcement::from_signed(&signed))
            .unwrap_or_else(|e| panic!("publish announcement of {name}: {e}"));
    }
    dir.set_config(true, true);

    let start = Instant::now();
    let mut agent = Agent::start(me, &dir, work.path());
    agent
        .wait_ready(&dir, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let peers = usize::from(nodes) - 1;
    let dump = agent
        .wait_peers(peers, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("memory bench: {e}"));
    let converge = start.elapsed();
    let pid = agent
        .pid()
        .unwrap_or_else(|| panic!("memory bench: the agent is not running"));
    // Settled: RSS unchanged for a second (reconcile passes and the first
    // timers are over), or whatever it is after 20 s.
    let mut last = 0;
    let _ = poll_until(Duration::from_secs(20), Duration::from_secs(1), || {
        let now = status_kib(pid, "VmRSS")?;
        let settled = now == last;
        last = now;
        settled.then_some(())
    });
    assert!(
        agent.is_running(),
        "memory bench: the agent died:\n{}",
        agent.log()
    );
    let rss_kib = status_kib(pid, "VmRSS").unwrap_or_else(|| panic!("no VmRSS for {pid}"));
    let hwm_kib = status_kib(pid, "VmHWM").unwrap_or_else(|| panic!("no VmHWM for {pid}"));
    // Read after the figures above, so reading the log costs the agent nothing.
    let phases = parse_phases(&agent.log());
    // The bench (main.rs) and the harness turn these lines on unless RUST_LOG
    // was given; when they are on, a missing breakdown means the format drifted.
    let lines_on = std::env::var("RUST_LOG").map_or(true, |v| {
        v.contains("veil::agent::memory=debug") || v.contains("veil=debug")
    });
    assert!(
        !phases.is_empty() || !lines_on,
        "memory bench: the agent logged no `memory phase=...` line:\n{}",
        agent.log()
    );
    MemoryResult {
        nodes: u32::from(nodes),
        pods: u32::from(nodes) * u32::from(pods_per_node),
        peers: dump.peers.len(),
        rss_kib,
        hwm_kib,
        converge,
        phases,
    }
}
