//! The `veil-agent` process for one node, and `wg show` parsing shared with the
//! wireguard-go peer.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cluster::ClusterDir;
use super::netns::Netns;
use super::poll_until;
use super::process::Bg;
use super::topology::{Node, WG_PORT};

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_veil-agent");
pub const VEILCTL_BIN: &str = env!("CARGO_BIN_EXE_veilctl");
/// Where [`super::fixture::Fixture`] puts the cluster authority (`veilctl ca init`).
pub const CA_DIR: &str = "ca";
pub const TUN_NAME: &str = "veil0";

/// The `veil-agent` to run: `VEIL_AGENT_BIN` when set (the benchmark runs a
/// release build of the agent from a test-profile driver), else this build's.
pub fn agent_bin() -> String {
    std::env::var("VEIL_AGENT_BIN").unwrap_or_else(|_| AGENT_BIN.to_string())
}

/// One agent, run inside its node's namespace; SIGKILLed on drop, and its log is
/// printed if the test is failing.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    ns_name: String,
    cluster_dir: PathBuf,
    key_dir: PathBuf,
    /// The UAPI interface name: `wg show <uapi_name>` talks to
    /// `/var/run/wireguard/<uapi_name>.sock`.
    pub uapi_name: String,
    log: PathBuf,
    proc: Option<Bg>,
    /// The test's cluster authority directory: the agent trusts its public
    /// key and auto-approves its own identity with it.
    ca: PathBuf,
    /// Extra environment for the next (re)start, e.g. hidden test-only flags.
    env: Vec<(String, String)>,
    /// The binary to run instead of [`agent_bin`] (the benchmark's A/B runs).
    bin: Option<String>,
}

impl Agent {
    /// Starts the agent for `node`; its key dir and log live under `work`.
    pub fn start(node: &Node, cluster: &ClusterDir, work: &Path) -> Self {
        Agent::start_bin(node, cluster, work, None)
    }

    /// [`Agent::start`] with another `veil-agent` binary than [`agent_bin`]
    /// (e.g. an older build the benchmark compares against in the same run).
    pub fn start_bin(node: &Node, cluster: &ClusterDir, work: &Path, bin: Option<&str>) -> Self {
        let key_dir = work.join(format!("keys-{}", node.name));
        std::fs::create_dir_all(&key_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", key_dir.display()));
        let mut a = Agent {
            node: node.name.clone(),
            ns_name: node.ns.name().to_string(),
            cluster_dir: cluster.path().to_path_buf(),
            key_dir,
            // The node namespace name is unique per test run and short (<= 15 bytes).
            uapi_name: node.ns.name().to_string(),
            log: work.join(format!("agent-{}.log", node.name)),
            proc: None,
            ca: work.join(CA_DIR),
            env: Vec::new(),
            bin: bin.map(str::to_string),
        };
        a.spawn();
        a
    }

    /// Sets `key=value` in the agent's environment from its next restart on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn key_dir(&self) -> &Path {
        &self.key_dir
    }

    pub fn uapi_socket(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/wireguard/{}.sock", self.uapi_name))
    }

    fn spawn(&mut self) {
        assert!(
            self.proc.is_none(),
            "agent {} is already running",
            self.node
        );
        let bin = self.bin.clone().unwrap_or_else(agent_bin);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns_name, &bin])
            .arg("--node")
            .arg(&self.node)
            .arg("--cluster-dir")
            .arg(&self.cluster_dir)
            .arg("--key-dir")
            .arg(&self.key_dir)
            .arg("--uapi-socket")
            .arg(self.uapi_socket())
            .args(["--tun-name", TUN_NAME])
            .args(["--listen-port", &WG_PORT.to_string()])
            .args(["--mtu", "1420"])
            .arg("--authority-public-key")
            .arg(self.ca.join("authority.pub"))
            .arg("--auto-approve-with")
            .arg(&self.ca);
        // Plain text logs: the tests search them for file and object names.
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,veil=debug");
        }
        self.proc = Some(Bg::spawn(
            format!("veil-agent {}", self.node),
            cmd,
            &self.log,
        ));
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Bg::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Bg::is_running)
    }

    /// Graceful stop: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Abrupt stop (SIGKILL): what a crash or OOM kill looks like.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the agent again with the same key dir (a killed agent is restarted).
    pub fn restart(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until this agent has published its announcement and serves UAPI.
    pub fn wait_ready(&mut self, cluster: &ClusterDir, timeout: Duration) -> Result<(), String> {
        let sock = self.uapi_socket();
        poll_until(timeout, Duration::from_millis(50), || {
            if !self.is_running() {
                return Some(Err(format!(
                    "veil-agent {} exited during startup:\n{}",
                    self.node,
                    self.log()
                )));
            }
            let ready = cluster.announcement(&self.node).is_some() && sock.exists();
            ready.then_some(Ok(()))
        })
        .unwrap_or_else(|| {
            Err(format!(
                "veil-agent {} not ready within {timeout:?} (announcement {}, socket {}):\n{}",
                self.node,
                cluster.announcement_path(&self.node).display(),
                sock.display(),
                self.log()
            ))
        })
    }

    /// Waits until `wg show` lists exactly `peers` peers.
    pub fn wait_peers(&self, peers: usize, timeout: Duration) -> Result<WgDump, String> {
        let mut last = Err(String::from("never polled"));
        let got = poll_until(timeout, Duration::from_millis(100), || {
            last = self.wg_dump();
            match &last {
                Ok(d) if d.peers.len() == peers => Some(d.clone()),
                _ => None,
            }
        });
        got.ok_or_else(|| {
            format!(
                "veil-agent {}: expected {peers} peers within {timeout:?}, last wg dump: {last:?}",
                self.node
            )
        })
    }

    fn ns(&self) -> NsRef<'_> {
        NsRef(&self.ns_name)
    }

    /// `wg show <name>`: the human-readable view.
    pub fn wg_show(&self) -> String {
        self.ns().wg(&["show", &self.uapi_name])
    }

    /// `wg show <name> dump`, parsed.
    pub fn wg_dump(&self) -> Result<WgDump, String> {
        wg_dump(&self.ns_name, &self.uapi_name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        // A killed agent cannot unlink its UAPI socket; the path is unique to this test.
        let _ = std::fs::remove_file(self.uapi_socket());
        if std::thread::panicking() {
            eprintln!(
                "----- log of veil-agent {} ({}) -----\n{}\n----- end of log -----",
                self.node,
                self.log.display(),
                self.log()
            );
        }
    }
}

struct NsRef<'a>(&'a str);

impl NsRef<'_> {
    fn wg(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.0, "wg"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run wg {args:?}: {e}"));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// `wg show <iface> dump` for an interface whose UAPI socket is reachable from `ns`.
pub fn wg_dump(ns: &str, iface: &str) -> Result<WgDump, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "wg", "show", iface, "dump"])
        .output()
        .map_err(|e| format!("run wg show {iface} dump: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "wg show {iface} dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    WgDump::parse(&String::from_utf8_lossy(&out.stdout))
}

/// The interface line of `wg show <iface> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgInterface {
    pub public_key: String,
    pub listen_port: u16,
}

/// A peer line of `wg show <iface> dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the epoch; `None` if there never was a handshake.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl WgPeer {
    /// Age of the latest handshake, if any.
    pub fn handshake_age(&self) -> Option<Duration> {
        let hs = self.latest_handshake?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        Some(Duration::from_secs(now.saturating_sub(hs)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDump {
    pub interface: WgInterface,
    pub peers: Vec<WgPeer>,
}

impl WgDump {
    /// Parses the tab-separated format of wireguard-tools' `show.c` (`dump_print`):
    /// interface: private-key public-key listen-port fwmark;
    /// peer: public-key preshared-key endpoint allowed-ips latest-handshake
    /// transfer-rx transfer-tx persistent-keepalive.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines.next().ok_or("empty wg dump")?;
        let f: Vec<&str> = first.split('\t').collect();
        if f.len() != 4 {
            return Err(format!(
                "wg dump interface line has {} fields: {first:?}",
                f.len()
            ));
        }
        let interface = WgInterface {
            public_key: f[1].to_string(),
            listen_port: f[2]
                .parse()
                .map_err(|e| format!("wg dump listen port {:?}: {e}", f[2]))?,
        };
        let mut peers = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 8 {
                return Err(format!(
                    "wg dump peer line has {} fields: {line:?}",
                    f.len()
                ));
            }
            let num = |s: &str, what: &str| -> Result<u64, String> {
                s.parse().map_err(|e| format!("wg dump {what} {s:?}: {e}"))
            };
            let hs = num(f[4], "latest-handshake")?;
            peers.push(WgPeer {
                public_key: f[0].to_string(),
                endpoint: (f[2] != "(none)").then(|| f[2].to_string()),
                allowed_ips: if f[3] == "(none)" {
                    Vec::new()
                } else {
                    f[3].split(',').map(|s| s.trim().to_string()).collect()
                },
                latest_handshake: (hs != 0).then_some(hs),
                rx_bytes: num(f[5], "transfer-rx")?,
                tx_bytes: num(f[6], "transfer-tx")?,
            });
        }
        Ok(Self { interface, peers })
    }

    pub fn peer(&self, public_key: &str) -> Option<&WgPeer> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// Whether a device exists in a namespace (e.g. the agent's TUN).
pub fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", dev])
        .status
        .success()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wg_dump() {
        let text = "cHJpdg==\tcHVi\t51820\toff\n\
                    a2V5MQ==\t(none)\t198.18.0.2:51820\t10.244.2.0/24\t1700000000\t1234\t5678\toff\n\
                    a2V5Mg==\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let d = WgDump::parse(text).unwrap();
        assert_eq!(d.interface.listen_port, 51820);
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].endpoint.as_deref(), Some("198.18.0.2:51820"));
        assert_eq!(d.peers[0].allowed_ips, vec!["10.244.2.0/24"]);
        assert_eq!(d.peers[0].latest_handshake, Some(1_700_000_000));
        assert_eq!((d.peers[0].rx_bytes, d.peers[0].tx_bytes), (1234, 5678));
        assert_eq!(d.peers[1].latest_handshake, None);
        assert!(d.peers[1].allowed_ips.is_empty());
        assert!(WgDump::parse("garbage").is_err());
        assert!(WgDump::parse("").is_err());
    }
}
