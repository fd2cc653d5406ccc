//! One test's whole world: topology, cluster directory, echo servers and agents.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::agent::Agent;
use super::capture::{Capture, Report};
use super::cluster::ClusterDir;
use super::topology::{Topology, WG_PORT};
use super::traffic::Servers;

/// Fields drop in order: agents and servers first, then files, then namespaces.
#[derive(Debug)]
pub struct Fixture {
    pub agents: Vec<Agent>,
    pub servers: Servers,
    pub dir: ClusterDir,
    pub topo: Topology,
    pub work: tempfile::TempDir,
    /// Held until everything above is torn down: see [`serial`].
    _serial: MutexGuard<'static, ()>,
}

/// End-to-end clusters in one test binary run one at a time, whatever
/// `--test-threads` says: on a small machine two clusters' agents compete for CPU and
/// turn timing assertions (resume within 5 s) into noise.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test still gets a clean world because
    // the failed one's fixture was fully dropped before the guard was released.
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `veilctl ca init --out dir`: the authority every agent of the test trusts.
fn create_authority(dir: &Path) {
    let out = std::process::Command::new(super::agent::VEILCTL_BIN)
        .args(["ca", "init", "--out"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("run veilctl ca init: {e}"));
    assert!(
        out.status.success(),
        "veilctl ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Fixture {
    /// Builds the topology, writes the cluster directory and starts echo servers in
    /// every pod. No agents yet.
    pub fn new(nodes: u8, pods_per_node: u8, enabled: bool, strict: bool) -> Self {
        let serial = serial();
        let topo = Topology::build(nodes, pods_per_node);
        let dir = ClusterDir::for_topology(&topo, enabled, strict);
        let work = tempfile::Builder::new()
            .prefix("veil-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create work dir: {e}"));
        create_authority(&work.path().join(super::agent::CA_DIR));
        let mut servers = Servers::new();
        servers.start_all(&topo.pods, work.path());
        Self {
            agents: Vec::new(),
            servers,
            dir,
            topo,
            work,
            _serial: serial,
        }
    }

    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// The cluster authority directory (`veilctl ca init --out`).
    pub fn ca(&self) -> std::path::PathBuf {
        self.work.path().join(super::agent::CA_DIR)
    }

    /// Runs `veilctl --cluster-dir DIR --authority-public-key CA/authority.pub ARGS`.
    pub fn veilctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(super::agent::VEILCTL_BIN)
            .arg("--cluster-dir")
            .arg(self.dir.path())
            .arg("--authority-public-key")
            .arg(self.ca().join("authority.pub"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run veilctl {args:?}: {e}"))
    }

    /// [`veilctl`](Self::veilctl), panicking unless it succeeds; its stdout.
    pub fn veilctl_ok(&self, args: &[&str]) -> String {
        let out = self.veilctl(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "veilctl {args:?} failed: {text}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts an agent on each node in `nodes` and waits until every one has
    /// announced itself and sees `nodes.len() - 1 + extra_peers` peers.
    pub fn start_agents(&mut self, nodes: &[u8], extra_peers: usize) {
        for &i in nodes {
            let a = Agent::start(self.topo.node(i), &self.dir, self.work.path());
            self.agents.push(a);
        }
        for a in &mut self.agents {
            a.wait_ready(&self.dir, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let peers = nodes.len() - 1 + extra_peers;
        for a in &self.agents {
            a.wait_peers(peers, Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    pub fn agent(&mut self, node: u8) -> &mut Agent {
        let name = self.topo.node(node).name.clone();
        self.agents
            .iter_mut()
            .find(|a| a.node == name)
            .unwrap_or_else(|| panic!("no agent on {name}"))
    }

    /// Starts a capture on every underlay bridge port.
    pub fn capture(&self) -> Capture {
        Capture::start(&self.topo.underlay, &self.topo.bridge_ports())
    }

    /// Stops a capture with this topology's WireGuard port.
    pub fn finish(&self, c: Capture, canary: &str) -> Report {
        let r = c.stop(WG_PORT, canary.as_bytes());
        eprintln!("capture: {r}");
        r
    }

    /// Panics (printing every agent log via the agents' Drop) unless all agents live.
    pub fn assert_agents_alive(&mut self) {
        for a in &mut self.agents {
            assert!(a.is_running(), "veil-agent {} died:\n{}", a.node, a.log());
        }
    }
}
