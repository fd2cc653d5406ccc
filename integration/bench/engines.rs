//! The configurations the bench compares, each on its own copy of the harness
//! topology (two node namespaces on an underlay bridge, one pod per node, pod
//! MTU 1500, host-gw routes): plain routing, Veil (two `veil-agent`s on the file
//! source, as the datapath tests run them), stock `wireguard-go`, and `gotatun`
//! when its binary is installed. All of them stay up for the whole run, so the
//! measurements can be interleaved round-robin without tearing anything down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::agent::{wg_dump, Agent, VEILCTL_BIN};
use crate::harness::cluster::ClusterDir;
use crate::harness::process::Bg;
use crate::harness::topology::{Pod, Topology, WG_PORT};
use crate::harness::traffic::{canary, warm_up, Servers, PROBE_BIN};
use crate::harness::wggo::{Launch, WireguardGo};

/// The `veil-probe` for the request/response figure: `VEIL_PROBE_BIN` when set
/// (run.sh passes the release build), else this build's.
pub fn probe_bin() -> String {
    std::env::var("VEIL_PROBE_BIN").unwrap_or_else(|_| PROBE_BIN.to_string())
}

/// The iperf3 server port in the server pod.
pub const IPERF_PORT: u16 = 5201;
/// The request/response (`veil-probe rr-server`) port in the server pod.
pub const RR_PORT: u16 = 7003;
/// Tunnel MTU for every WireGuard configuration: what the harness gives Veil
/// (`--mtu 1420`) and wireguard-go's default, so all tunnels carry the same packets.
pub const TUNNEL_MTU: u16 = 1420;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Veil,
    /// Veil with another agent binary ([`agent_b_bin`]): an A/B comparison of
    /// two builds in one interleaved run.
    VeilB,
    WireguardGo,
    Gotatun,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Veil => "Veil",
            Kind::VeilB => "Veil-B",
            Kind::WireguardGo => "wireguard-go",
            Kind::Gotatun => "gotatun",
        }
    }

    /// Parses a `--configs` entry (the labels, case-insensitive).
    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Plain,
            Kind::Veil,
            Kind::VeilB,
            Kind::WireguardGo,
            Kind::Gotatun,
        ]
        .into_iter()
        .find(|k| k.label().eq_ignore_ascii_case(s))
    }

    pub fn is_veil(self) -> bool {
        matches!(self, Kind::Veil | Kind::VeilB)
    }
}

/// The agent binary of the [`Kind::VeilB`] configuration: `VEIL_AGENT_BIN_B`
/// (e.g. the previous commit's release build, copied aside).
pub fn agent_b_bin() -> Option<String> {
    std::env::var("VEIL_AGENT_BIN_B").ok()
}

/// Where the `gotatun` binary is, if installed (`cargo install gotatun-cli`
/// puts it in `~/.cargo/bin`, which a root shell's PATH may not include).
pub fn find_gotatun() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GOTATUN_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.into_iter()
        .map(|d| d.join("gotatun"))
        .find(|p| p.is_file())
}

/// One configuration, up and verified. Fields drop in order: processes first,
/// then files, then the namespaces.
#[derive(Debug)]
pub struct Setup {
    pub kind: Kind,
    servers: Vec<Bg>,
    echo: Servers,
    agents: Vec<Agent>,
    userspace: Vec<WireguardGo>,
    dir: Option<ClusterDir>,
    pub topo: Topology,
    work: tempfile::TempDir,
}

fn work_dir(kind: Kind) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("veil-bench-{}-", kind.label()))
        .tempdir()
        .unwrap_or_else(|e| panic!("create work dir: {e}"))
}

/// `veilctl ca init --out dir`: the authority the agents trust.
pub fn create_authority(dir: &Path) {
    let out = Command::new(VEILCTL_BIN)
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

impl Setup {
    /// Builds the topology and brings configuration `kind` up; panics (cleaning
    /// up) when it does not work at all.
    pub fn new(kind: Kind, gotatun: Option<&Path>) -> Self {
        let topo = Topology::build(2, 1);
        let work = work_dir(kind);
        let mut s = Setup {
            kind,
            servers: Vec::new(),
            echo: Servers::new(),
            agents: Vec::new(),
            userspace: Vec::new(),
            dir: None,
            topo,
            work,
        };
        match kind {
            // host-gw routes are what Topology builds: nothing to add.
            Kind::Plain => {}
            Kind::Veil => s.start_veil(None),
            Kind::VeilB => {
                let bin = agent_b_bin()
                    .unwrap_or_else(|| panic!("Veil-B needs VEIL_AGENT_BIN_B (an agent binary)"));
                s.start_veil(Some(&bin))
            }
            Kind::WireguardGo => s.start_userspace(Path::new("wireguard-go")),
            Kind::Gotatun => s.start_userspace(
                gotatun.unwrap_or_else(|| panic!("gotatun requested but not installed")),
            ),
        }
        s.start_servers();
        // Handshakes done (and, for Veil, BPF steering in place) before anything is timed.
        warm_up(
            &[(s.client(), s.server())],
            &canary(&format!("bench-{}", kind.label())),
        );
        s
    }

    fn start_veil(&mut self, bin: Option<&str>) {
        let dir = ClusterDir::for_topology(&self.topo, true, true);
        create_authority(&self.work.path().join(crate::harness::agent::CA_DIR));
        for i in [1, 2] {
            self.agents.push(Agent::start_bin(
                self.topo.node(i),
                &dir,
                self.work.path(),
                bin,
            ));
        }
        for a in &mut self.agents {
            a.wait_ready(&dir, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        for a in &self.agents {
            a.wait_peers(1, Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        self.dir = Some(dir);
    }

    fn start_userspace(&mut self, bin: &Path) {
        // One name per node: the UAPI socket path (/var/run/wireguard/<iface>.sock)
        // is shared by all namespaces.
        let iface = |i: u8| format!("{}w{i}", self.topo.prefix);
        for i in [1, 2] {
            let bin = bin.to_string_lossy();
            let how = match self.kind {
                // Quiet logs: verbose logging would cost the engine time during
                // the measurement.
                Kind::WireguardGo => Launch {
                    bin: &bin,
                    env: ("LOG_LEVEL", "error"),
                    mtu: Some(TUNNEL_MTU),
                    ..Launch::WIREGUARD_GO
                },
                // gotatun-cli 0.10: `-f` foreground, log level from WG_LOG_LEVEL; as
                // root it keeps its privileges anyway, the flag only makes that explicit.
                _ => Launch {
                    label: self.kind.label(),
                    bin: &bin,
                    args: &["-f", "--disable-drop-privileges"],
                    env: ("WG_LOG_LEVEL", "error"),
                    mtu: Some(TUNNEL_MTU),
                },
            };
            let u = WireguardGo::launch(
                self.topo.node(i),
                &iface(i),
                WG_PORT,
                self.work.path(),
                &how,
            );
            self.userspace.push(u);
        }
        for (i, other) in [(1u8, 2u8), (2, 1)] {
            let node = self.topo.node(i);
            let peer = self.topo.node(other);
            let key = &self.userspace[usize::from(other) - 1].public_key;
            let endpoint = format!("{}:{WG_PORT}", peer.underlay_ip);
            node.ns.exec_ok(&[
                "wg",
                "set",
                &iface(i),
                "peer",
                key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &peer.pod_cidr,
            ]);
            // Replaces the host-gw route: pod traffic to the other node goes
            // through the tunnel.
            node.ns
                .exec_ok(&["ip", "route", "replace", &peer.pod_cidr, "dev", &iface(i)]);
        }
    }

    fn start_servers(&mut self) {
        let server = self.topo.pod(2, 0);
        // Echo servers for warm_up (UDP) and sanity; iperf3 and rr-server for the figures.
        self.echo.start_in(server, self.work.path());
        self.echo.start_in(self.topo.pod(1, 0), self.work.path());
        let mut iperf = server.ns.cmd("iperf3");
        iperf.args(["-s", "-p", &IPERF_PORT.to_string(), "--forceflush"]);
        let log = self.work.path().join("iperf3-server.log");
        let mut bg = Bg::spawn("iperf3 server", iperf, &log);
        bg.wait_for_log("Server listening", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        self.servers.push(bg);
        let mut rr = server.ns.cmd(&probe_bin());
        rr.args(["rr-server", &RR_PORT.to_string()]);
        let log = self.work.path().join("rr-server.log");
        let mut bg = Bg::spawn("rr-server", rr, &log);
        bg.wait_for_log("listening on", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        self.servers.push(bg);
    }

    pub fn client(&self) -> &Pod {
        self.topo.pod(1, 0)
    }

    pub fn server(&self) -> &Pod {
        self.topo.pod(2, 0)
    }

    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// The WireGuard engine processes (one per node); empty for plain routing.
    pub fn engine_pids(&self) -> Vec<u32> {
        match self.kind {
            Kind::Plain => Vec::new(),
            k if k.is_veil() => self.agents.iter().filter_map(Agent::pid).collect(),
            _ => self.userspace.iter().map(WireguardGo::pid).collect(),
        }
    }

    /// Bytes the server node's engine has received through its tunnel (the
    /// `transfer-rx` of its peers in `wg show dump`): proves the measured traffic
    /// was encrypted and not carried by the host-gw routes. `None` for plain.
    pub fn tunnel_rx_bytes(&self) -> Option<u64> {
        let dump = match self.kind {
            Kind::Plain => return None,
            k if k.is_veil() => self.agents[1].wg_dump(),
            _ => {
                let u = &self.userspace[1];
                wg_dump(&u.ns_name, &u.iface)
            }
        };
        let dump = dump.unwrap_or_else(|e| {
            panic!(
                "{}: cannot read the tunnel counters: {e}",
                self.kind.label()
            )
        });
        Some(dump.peers.iter().map(|p| p.rx_bytes).sum())
    }

    /// Panics, with the engine logs, if an engine process has died.
    pub fn assert_alive(&mut self) {
        for a in &mut self.agents {
            assert!(a.is_running(), "veil-agent {} died:\n{}", a.node, a.log());
        }
        for u in &mut self.userspace {
            assert!(
                u.is_running(),
                "{} on {} died:\n{}",
                self.kind.label(),
                u.ns_name,
                u.log()
            );
        }
    }
}
