//! A stock WireGuard peer: `wireguard-go` in a node namespace, configured with `wg`.
//! Proves Veil speaks the standard protocol, not just to itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::agent::{wg_dump, WgDump};
use super::poll_until;
use super::process::Bg;
use super::topology::Node;

/// A running userspace WireGuard (`wireguard-go -f <iface>` unless started with
/// [`WireguardGo::launch`]); killed on drop.
#[derive(Debug)]
pub struct WireguardGo {
    pub iface: String,
    pub ns_name: String,
    pub public_key: String,
    label: String,
    proc: Bg,
}

/// How to run a userspace WireGuard implementation that speaks the
/// cross-platform UAPI (wireguard-go, gotatun): `bin ARGS.. <iface>` in the
/// foreground with `env` set, then configured with `wg`.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub label: &'a str,
    pub bin: &'a str,
    pub args: &'a [&'a str],
    pub env: (&'a str, &'a str),
    /// Interface MTU; `None` keeps the implementation's default.
    pub mtu: Option<u16>,
}

impl Launch<'_> {
    /// Stock wireguard-go, verbose logs (the tests print them on failure).
    pub const WIREGUARD_GO: Launch<'static> = Launch {
        label: "wireguard-go",
        bin: "wireguard-go",
        args: &["-f"],
        env: ("LOG_LEVEL", "verbose"),
        mtu: None,
    };
}

/// Runs `wg <args>` with `stdin`, returning trimmed stdout.
pub fn wg_stdin(args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run wg {args:?}: {e}"));
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())
            .unwrap_or_else(|e| panic!("write to wg {args:?}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for wg {args:?}: {e}"));
    assert!(
        out.status.success(),
        "wg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl WireguardGo {
    /// Starts wireguard-go on `node` with a fresh key (`wg genkey` / `wg pubkey`),
    /// listening on `port`, interface up; no peers yet.
    pub fn start(node: &Node, iface: &str, port: u16, work: &Path) -> Self {
        Self::launch(node, iface, port, work, &Launch::WIREGUARD_GO)
    }

    /// Starts the implementation `how` describes on `node`, like [`Self::start`].
    pub fn launch(node: &Node, iface: &str, port: u16, work: &Path, how: &Launch) -> Self {
        assert!(iface.len() <= 15, "interface name {iface:?} too long");
        let private = wg_stdin(&["genkey"], "");
        let public_key = wg_stdin(&["pubkey"], &private);
        let key_file: PathBuf = work.join(format!("{iface}.key"));
        std::fs::write(&key_file, format!("{private}\n"))
            .unwrap_or_else(|e| panic!("write {}: {e}", key_file.display()));

        let mut cmd = node.ns.cmd(how.bin);
        cmd.args(how.args).arg(iface).env(how.env.0, how.env.1);
        let label = format!("{} {iface}", how.label);
        let log = work.join(format!("{}-{iface}.log", how.label));
        let mut proc = Bg::spawn(label.clone(), cmd, &log);
        let sock = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
        let up = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            (sock.exists() || !proc.is_running()).then_some(())
        });
        assert!(
            up.is_some() && proc.is_running(),
            "{label} did not come up (no UAPI socket {}):\n{}",
            sock.display(),
            proc.log()
        );
        let port = port.to_string();
        let key = key_file.to_string_lossy().into_owned();
        node.ns.exec_ok(&[
            "wg",
            "set",
            iface,
            "private-key",
            &key,
            "listen-port",
            &port,
        ]);
        if let Some(mtu) = how.mtu {
            node.ns
                .exec_ok(&["ip", "link", "set", iface, "mtu", &mtu.to_string()]);
        }
        node.ns.exec_ok(&["ip", "link", "set", iface, "up"]);
        Self {
            iface: iface.to_string(),
            ns_name: node.ns.name().to_string(),
            public_key,
            label,
            proc,
        }
    }

    /// `wg set <iface> peer <key> endpoint <ep> allowed-ips <cidrs>`.
    pub fn set_peer(&self, node: &Node, public_key: &str, endpoint: &str, allowed: &[String]) {
        node.ns.exec_ok(&[
            "wg",
            "set",
            &self.iface,
            "peer",
            public_key,
            "endpoint",
            endpoint,
            "allowed-ips",
            &allowed.join(","),
        ]);
    }

    pub fn dump(&self) -> Result<WgDump, String> {
        wg_dump(&self.ns_name, &self.iface)
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        self.proc.kill();
        // SIGKILL leaves the UAPI socket behind; the name is unique to this test.
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} -----\n{}\n----- end of log -----",
                self.label,
                self.proc.log()
            );
        }
    }
}
