//! Network-namespace tests of the userspace WireGuard engine: two "nodes"
//! (namespaces joined by a veth on 198.18.0.0/24), each with an engine whose
//! TUN carries a pod-range address. Everything lives in namespaces these tests
//! create; nothing is configured in the root namespace.
mod harness;

use harness::netns::{require_root, unique_prefix, Netns};
use harness::process::Bg;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use veil::wireguard::{Engine, EngineConfig, PeerConfig};
use x25519_dalek::{PublicKey, StaticSecret};

const PORT: u16 = 51820;
const A_UNDERLAY: &str = "198.18.0.1";
const B_UNDERLAY: &str = "198.18.0.2";

fn new_key() -> StaticSecret {
    StaticSecret::random_from_rng(rand_core::OsRng)
}

fn b64(bytes: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Polls `f` every 50 ms until it holds or `within` passes.
fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two namespaces joined by a veth pair (`ua` in A, `ub` in B).
fn underlay(prefix: &str, mtu: u16) -> (Netns, Netns) {
    let a = Netns::new(format!("{prefix}a"));
    let b = Netns::new(format!("{prefix}b"));
    a.exec_ok(&[
        "ip",
        "link",
        "add",
        "ua",
        "type",
        "veth",
        "peer",
        "name",
        "ub",
        "netns",
        b.name(),
    ]);
    let mtu = mtu.to_string();
    for (ns, dev, addr) in [(&a, "ua", A_UNDERLAY), (&b, "ub", B_UNDERLAY)] {
        ns.exec_ok(&["ip", "link", "set", dev, "mtu", &mtu]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev]);
        ns.exec_ok(&["ip", "link", "set", dev, "up"]);
    }
    (a, b)
}

fn uapi_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{name}.sock"))
}

/// Starts an engine inside `ns` (so its TUN and socket live there) and gives
/// the TUN `pod_ip`/32 with a route to `remote_cidr` through it.
fn start_engine(
    ns: &Netns,
    name: &str,
    key: StaticSecret,
    pod_ip: &str,
    remote_cidr: &str,
) -> Engine {
    start_engine_with(ns, name, key, pod_ip, remote_cidr, 1)
}

/// [`start_engine`] with `queues` packet queues.
fn start_engine_with(
    ns: &Netns,
    name: &str,
    key: StaticSecret,
    pod_ip: &str,
    remote_cidr: &str,
    queues: usize,
) -> Engine {
    // A restart right after a shutdown can race the kernel's teardown of the
    // old device under heavy parallel load: poll with a deadline, and report
    // every failed attempt so a real error is never hidden.
    let deadline = Instant::now() + Duration::from_secs(3);
    let engine = loop {
        let cfg = EngineConfig {
            tun_name: name.to_owned(),
            mtu: 1420,
            listen_port: PORT,
            private_key: key.clone(),
            uapi_socket: Some(uapi_path(name)),
            idle_poll: Duration::from_micros(veil::wireguard::DEFAULT_IDLE_POLL_US),
            queues,
        };
        match ns.run(move || Engine::start(cfg)) {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("engine {name} did not start yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("engine {name} does not start: {e}"),
        }
    };
    assert!(engine.tun_ifindex() > 0);
    assert_eq!(engine.tun_name(), name);
    assert_eq!(engine.queues(), queues);
    assert_eq!(engine.listen_port(), PORT);
    ns.exec_ok(&["ip", "addr", "add", &format!("{pod_ip}/32"), "dev", name]);
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        remote_cidr,
        "dev",
        name,
        "src",
        pod_ip,
    ]);
    engine
}

fn peer(key: [u8; 32], endpoint: Option<&str>, allowed: &str) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: endpoint.map(|e| format!("{e}:{PORT}").parse().expect("endpoint")),
        allowed_ips: vec![allowed.parse().expect("allowed ip")],
        persistent_keepalive: None,
    }
}

fn ping(ns: &Netns, args: &[&str]) -> bool {
    let mut argv = vec!["ping", "-n", "-c", "1", "-W", "1"];
    argv.extend_from_slice(args);
    ns.exec(&argv).status.success()
}

/// A two-node setup: engines A (10.244.1.1) and B (10.244.2.1) peered.
struct Pair {
    a: Netns,
    b: Netns,
    ea: Option<Engine>,
    eb: Option<Engine>,
    ka: StaticSecret,
    kb: StaticSecret,
    name_a: String,
    name_b: String,
}

impl Pair {
    fn new(underlay_mtu: u16) -> Self {
        Pair::with_queues(underlay_mtu, 1)
    }

    /// Engines with `queues` packet queues each.
    fn with_queues(underlay_mtu: u16, queues: usize) -> Self {
        let prefix = unique_prefix();
        let (a, b) = underlay(&prefix, underlay_mtu);
        let (ka, kb) = (new_key(), new_key());
        let (name_a, name_b) = (format!("{prefix}a"), format!("{prefix}b"));
        let start = |ns: &Netns, name: &str, key: &StaticSecret, pod: &str, remote: &str| {
            start_engine_with(ns, name, key.clone(), pod, remote, queues)
        };
        let ea = start(&a, &name_a, &ka, "10.244.1.1", "10.244.2.0/24");
        let eb = start(&b, &name_b, &kb, "10.244.2.1", "10.244.1.0/24");
        let pair = Pair {
            a,
            b,
            ea: Some(ea),
            eb: Some(eb),
            ka,
            kb,
            name_a,
            name_b,
        };
        pair.configure_a();
        pair.configure_b();
        pair
    }

    fn ea(&self) -> &Engine {
        self.ea.as_ref().expect("engine A running")
    }

    fn eb(&self) -> &Engine {
        self.eb.as_ref().expect("engine B running")
    }

    fn configure_a(&self) {
        let kb = PublicKey::from(&self.kb).to_bytes();
        self.ea()
            .set_peers(vec![peer(kb, Some(B_UNDERLAY), "10.244.2.0/24")]);
    }

    fn configure_b(&self) {
        let ka = PublicKey::from(&self.ka).to_bytes();
        self.eb()
            .set_peers(vec![peer(ka, Some(A_UNDERLAY), "10.244.1.0/24")]);
    }

    fn ping_a_to_b(&self, extra: &[&str]) -> bool {
        let mut args = extra.to_vec();
        args.push("10.244.2.1");
        ping(&self.a, &args)
    }
}

/// Sends `len` bytes of a deterministic pattern from A to a listener in B over
/// the tunnel and checks that exactly those bytes arrive.
fn tcp_transfer(a: &Netns, b: &Netns, len: usize) {
    let listener = b.run(|| {
        let l = TcpListener::bind("10.244.2.1:5001").expect("bind in B");
        l.set_nonblocking(true).expect("nonblocking listener");
        l
    });
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let expected = data.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no TCP connection within 10 s");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking stream");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut got = Vec::with_capacity(len);
        stream.read_to_end(&mut got).expect("read transfer");
        got
    });
    a.run(move || {
        let addr: SocketAddr = "10.244.2.1:5001".parse().expect("addr");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        s.write_all(&data).expect("send transfer");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let got = server.join().expect("server thread");
    assert_eq!(got.len(), expected.len(), "transfer length");
    assert!(got == expected, "transfer content differs");
}

fn wg(args: &[&str]) -> String {
    let out = Command::new("wg").args(args).output().expect("run wg");
    assert!(
        out.status.success(),
        "wg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_engines_ping_tcp_and_wg_show() {
    require_root();
    let p = Pair::new(1500);
    assert!(
        wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])),
        "ping A -> B through the tunnel never succeeded"
    );
    assert!(ping(&p.b, &["10.244.1.1"]), "ping B -> A");
    tcp_transfer(&p.a, &p.b, 2 << 20);
    let link = p.a.exec_ok(&["ip", "link", "show", &p.name_a]);
    assert!(link.contains("mtu 1420") && link.contains(",UP"), "{link}");

    let stats = p.ea().peer_stats();
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert!(s.has_session && s.last_handshake.is_some());
    assert!(s.tx_bytes >= 2 << 20, "tx_bytes {}", s.tx_bytes);
    assert!(s.rx_bytes > 0);
    assert_eq!(
        s.endpoint,
        Some(format!("{B_UNDERLAY}:{PORT}").parse().unwrap())
    );
    let ca = p.ea().counters();
    assert!(ca.tun_rx_packets > 0 && ca.udp_tx_datagrams > 0);
    assert_eq!(ca.dropped_cryptokey, 0);

    // The stock tool, through our UAPI socket.
    let show = wg(&["show", &p.name_a]);
    let kb = b64(&PublicKey::from(&p.kb).to_bytes());
    assert!(show.contains(&format!("peer: {kb}")), "{show}");
    assert!(
        show.contains(&format!("endpoint: {B_UNDERLAY}:{PORT}")),
        "{show}"
    );
    assert!(show.contains("allowed ips: 10.244.2.0/24"), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    assert!(
        show.contains("transfer:") && show.contains("MiB sent"),
        "{show}"
    );
    assert!(show.contains(&format!("listening port: {PORT}")), "{show}");
    let conf = wg(&["showconf", &p.name_b]);
    assert!(
        conf.contains(&format!("PrivateKey = {}", b64(&p.kb.to_bytes()))),
        "{conf}"
    );
    assert!(conf.contains("AllowedIPs = 10.244.1.0/24"), "{conf}");
    // Configuration changes through UAPI are refused: the agent owns the interface.
    let set = Command::new("wg")
        .args(["set", &p.name_a, "listen-port", "1"])
        .output()
        .expect("run wg set");
    assert!(!set.status.success(), "wg set must be refused");

    // Shutdown removes the device and the socket.
    let sock = uapi_path(&p.name_a);
    let mut p = p;
    p.ea.take().expect("engine A").shutdown();
    assert!(!sock.exists(), "UAPI socket removed");
    assert!(
        !p.a.exec(&["ip", "link", "show", &p.name_a])
            .status
            .success(),
        "TUN gone"
    );
    drop(p.eb.take());
}

#[test]
fn cryptokey_routing_drops_spoofed_sources() {
    require_root();
    let p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    let before = p.eb().counters().dropped_cryptokey;
    // A second address on A's TUN, outside A's AllowedIPs (10.244.1.0/24) as B sees them.
    p.a.exec_ok(&["ip", "addr", "add", "10.244.9.1/32", "dev", &p.name_a]);
    assert!(
        !p.ping_a_to_b(&["-I", "10.244.9.1"]),
        "a packet from outside the sender's AllowedIPs was delivered"
    );
    assert!(
        wait_until(Duration::from_secs(2), || p
            .eb()
            .counters()
            .dropped_cryptokey
            > before),
        "dropped_cryptokey did not grow: {:?}",
        p.eb().counters()
    );
    // The legitimate source still works: the drop is per packet, not per peer.
    assert!(p.ping_a_to_b(&[]));
}

#[test]
fn restart_resumes_within_two_seconds() {
    require_root();
    let mut p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));

    p.eb.take().expect("engine B").shutdown();
    assert!(!p
        .b
        .exec(&["ip", "link", "show", &p.name_b])
        .status
        .success());
    assert!(!p.ping_a_to_b(&[]), "B is down, ping must fail");

    // Same key, same namespace: A still holds its old session with B.
    let eb = start_engine(&p.b, &p.name_b, p.kb.clone(), "10.244.2.1", "10.244.1.0/24");
    p.eb = Some(eb);
    let t0 = Instant::now();
    p.configure_b();
    // Ping from A: it needs B to initiate the new handshake (A's stale session
    // would otherwise only be replaced after WireGuard's 15 s timeout).
    assert!(
        wait_until(Duration::from_secs(2), || p.ping_a_to_b(&[])),
        "traffic did not resume within 2 s of the restart"
    );
    eprintln!("traffic resumed {:?} after restart", t0.elapsed());
}

#[test]
fn large_packets_cross_a_small_underlay() {
    require_root();
    // Underlay MTU below the tunnel's: every full-size encrypted packet must be
    // fragmented on the underlay rather than dropped.
    let p = Pair::new(1280);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));

    // Capture the underlay while sending large packets: with IP_PMTUDISC_DONT
    // the engine never sets DF, so the datagrams can be fragmented. The
    // traffic starts only once tcpdump listens (a fixed pause was too short
    // on a loaded host: the capture then saw nothing).
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = p.a.cmd("tcpdump");
    cmd.args([
        "-n",
        "-v",
        "-l",
        "-i",
        "ua",
        "--immediate-mode",
        "-c",
        "6",
        "udp",
    ]);
    let mut cap = Bg::spawn("tcpdump -i ua", cmd, &dir.path().join("tcpdump.log"));
    cap.wait_for_log("listening on", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("capture on ua: {e}"));
    assert!(p.ping_a_to_b(&["-s", "1472", "-M", "dont"]), "ping -s 1472");
    assert!(p.ping_a_to_b(&["-s", "3000"]), "ping -s 3000");
    assert!(
        ping(&p.b, &["-s", "3000", "10.244.1.1"]),
        "ping B -> A -s 3000"
    );
    tcp_transfer(&p.a, &p.b, 1 << 20);
    // Six packets end the capture; give late ones a moment, then stop it.
    let _ = wait_until(Duration::from_secs(5), || !cap.is_running());
    cap.stop(Duration::from_secs(1));
    let out = cap.log();
    assert!(out.contains("UDP"), "capture saw no tunnel traffic: {out}");
    assert!(
        !out.contains("[DF]"),
        "an encrypted datagram had DF set: {out}"
    );
}

/// A `wireguard-go` process in a namespace, terminated on drop.
struct WireguardGo {
    child: Child,
    sock: PathBuf,
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // SIGTERM first so it removes its UAPI socket, then make sure.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of the child this test spawned.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let exited = wait_until(Duration::from_secs(3), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Starts `wireguard-go` as interface `name_g` in `b` (10.244.2.1, key `kb`,
/// port 51820) with one peer: our engine in A under the public key `ka_pub`.
fn start_wireguard_go(b: &Netns, name_g: &str, kb: &StaticSecret, ka_pub: &str) -> WireguardGo {
    let child = b
        .cmd("wireguard-go")
        .args(["-f", name_g])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wireguard-go");
    let wggo = WireguardGo {
        child,
        sock: uapi_path(name_g),
    };
    assert!(
        wait_until(Duration::from_secs(10), || uapi_path(name_g).exists()),
        "wireguard-go did not create its UAPI socket"
    );
    let keyfile = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(keyfile.path(), b64(&kb.to_bytes())).expect("write key");
    let keypath = keyfile.path().to_str().expect("utf-8 path");
    wg(&[
        "set",
        name_g,
        "private-key",
        keypath,
        "listen-port",
        "51820",
        "peer",
        ka_pub,
        "endpoint",
        &format!("{A_UNDERLAY}:{PORT}"),
        "allowed-ips",
        "10.244.1.0/24",
    ]);
    b.exec_ok(&["ip", "addr", "add", "10.244.2.1/32", "dev", name_g]);
    b.exec_ok(&["ip", "link", "set", name_g, "mtu", "1420", "up"]);
    b.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/24",
        "dev",
        name_g,
        "src",
        "10.244.2.1",
    ]);
    wggo
}

#[test]
fn interop_with_wireguard_go() {
    require_root();
    let prefix = unique_prefix();
    let (a, b) = underlay(&prefix, 1500);
    let (ka, kb) = (new_key(), new_key());
    let name_a = format!("{prefix}a");
    let name_g = format!("{prefix}g");
    let ea = start_engine(&a, &name_a, ka.clone(), "10.244.1.1", "10.244.2.0/24");

    let ka_pub = b64(&PublicKey::from(&ka).to_bytes());
    let _wggo = start_wireguard_go(&b, &name_g, &kb, &ka_pub);

    // Our side first has no endpoint: wireguard-go must initiate, we answer and
    // learn its endpoint from the authenticated handshake (roaming).
    let kb_pub = PublicKey::from(&kb).to_bytes();
    ea.set_peers(vec![peer(kb_pub, None, "10.244.2.0/24")]);
    assert!(!ping(&a, &["10.244.2.1"]), "no endpoint yet: must not pass");
    assert!(ea.counters().dropped_no_endpoint > 0, "{:?}", ea.counters());
    assert!(
        wait_until(Duration::from_secs(10), || ping(&b, &["10.244.1.1"])),
        "ping wireguard-go -> engine never succeeded"
    );
    assert!(ping(&a, &["10.244.2.1"]), "ping engine -> wireguard-go");
    let s = &ea.peer_stats()[0];
    assert_eq!(
        s.endpoint,
        Some(format!("{B_UNDERLAY}:{PORT}").parse().unwrap())
    );
    tcp_transfer(&a, &b, 1 << 20);

    // And the other direction of the handshake: we initiate towards
    // wireguard-go, now with several packet queues.
    drop(ea);
    let ea = start_engine_with(&a, &name_a, ka, "10.244.1.1", "10.244.2.0/24", 3);
    ea.set_peers(vec![peer(kb_pub, Some(B_UNDERLAY), "10.244.2.0/24")]);
    assert!(
        wait_until(Duration::from_secs(3), || ping(&a, &["10.244.2.1"])),
        "engine-initiated handshake with wireguard-go failed"
    );
    let show = wg(&["show", &name_g]);
    assert!(show.contains(&format!("peer: {ka_pub}")), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
    tcp_transfer(&a, &b, 1 << 20);
}

fn handshake_time(e: &Engine) -> std::time::SystemTime {
    e.peer_stats()[0]
        .last_handshake
        .expect("a handshake happened")
}

#[test]
fn set_peers_diffs_by_public_key() {
    require_root();
    let p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    let first = handshake_time(p.ea());
    std::thread::sleep(Duration::from_millis(1200));

    // Re-applying the same set keeps the session: no new handshake.
    p.configure_a();
    assert!(p.ping_a_to_b(&[]));
    let again = handshake_time(p.ea());
    let drift = again.duration_since(first).unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(500),
        "session was replaced ({drift:?})"
    );

    // An endpoint change applies in place.
    let kb = PublicKey::from(&p.kb).to_bytes();
    let mut moved = peer(kb, Some("198.18.0.99"), "10.244.2.0/24");
    p.ea().set_peers(vec![moved.clone()]);
    assert_eq!(
        p.ea().peer_stats()[0].endpoint,
        Some(format!("198.18.0.99:{PORT}").parse().unwrap())
    );
    moved.endpoint = Some(format!("{B_UNDERLAY}:{PORT}").parse().unwrap());

    // A persistent keepalive makes A talk while idle (boringtun fixes the
    // interval at creation, so this re-creates the peer and re-handshakes).
    moved.persistent_keepalive = Some(1);
    p.ea().set_peers(vec![moved]);
    assert!(wait_until(Duration::from_secs(3), || p.ea().peer_stats()
        [0]
    .has_session));
    let rx0 = p.eb().counters().udp_rx_datagrams;
    assert!(
        wait_until(Duration::from_secs(4), || p
            .eb()
            .counters()
            .udp_rx_datagrams
            >= rx0 + 2),
        "no persistent keepalives: {:?}",
        p.eb().counters()
    );

    // Removing the peer stops traffic to it.
    p.ea().set_peers(Vec::new());
    assert!(p.ea().peer_stats().is_empty());
    let before = p.ea().counters().dropped_no_peer;
    assert!(!p.ping_a_to_b(&[]));
    assert!(p.ea().counters().dropped_no_peer > before);
}

#[test]
fn start_errors_and_uapi_socket_hygiene() {
    require_root();
    let prefix = unique_prefix();
    let ns = Netns::new(format!("{prefix}a"));
    let name = format!("{prefix}a");
    let sock = uapi_path(&name);

    // A stale socket (nobody listening) is replaced.
    std::fs::create_dir_all("/var/run/wireguard").expect("socket dir");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(sock.exists());
    let key = new_key();
    let engine = start_engine(&ns, &name, key.clone(), "10.244.1.1", "10.244.2.0/24");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "UAPI socket must be owner-only");
    assert_eq!(engine.public_key(), PublicKey::from(&key).to_bytes());

    // The TUN name is taken.
    let cfg = |tun: &str, uapi: Option<PathBuf>| EngineConfig {
        tun_name: tun.to_owned(),
        mtu: 1420,
        listen_port: 0,
        private_key: new_key(),
        uapi_socket: uapi,
        idle_poll: Duration::ZERO,
        queues: 1,
    };
    let c = cfg(&name, None);
    let err = ns.run(move || Engine::start(c).err().expect("duplicate TUN must fail"));
    assert!(err.to_string().contains(&name), "{err}");
    // A live UAPI socket is not stolen.
    let other = format!("{prefix}z");
    let c = cfg(&other, Some(sock.clone()));
    let err = ns.run(move || Engine::start(c).err().expect("live UAPI socket must fail"));
    assert!(
        matches!(err, veil::wireguard::Error::UapiInUse { .. }),
        "{err}"
    );
    assert!(
        !ns.exec(&["ip", "link", "show", &other]).status.success(),
        "failed start cleaned up"
    );
    // The UDP port is taken.
    let mut c = cfg(&other, None);
    c.listen_port = PORT;
    let err = ns.run(move || Engine::start(c).err().expect("port in use must fail"));
    assert!(
        matches!(err, veil::wireguard::Error::Bind { port: PORT, .. }),
        "{err}"
    );
    // An MTU the kernel refuses is reported as such, and the device is removed.
    let mut c = cfg(&other, None);
    c.mtu = 10;
    let err = ns.run(move || Engine::start(c).err().expect("MTU 10 must fail"));
    assert!(err.to_string().contains("set MTU"), "{err}");
    assert!(!ns.exec(&["ip", "link", "show", &other]).status.success());
    // Bad names are refused before touching the system.
    let c = cfg("this-name-is-too-long", None);
    let err = ns.run(move || Engine::start(c).err().expect("long name must fail"));
    assert!(
        matches!(err, veil::wireguard::Error::InvalidTunName(_)),
        "{err}"
    );

    engine.shutdown();
    assert!(!sock.exists());
}

// ---------------------------------------------------------------------------
// Hitless key rotation: steady traffic across rotations, measured end to end.

/// Byte `i` of a TCP stream: a pattern that catches lost, duplicated or
/// reordered segments (it does not repeat with a power-of-two period).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(i / 251)) as u8
}

/// A UDP flow at a fixed rate through the tunnel, each datagram carrying its
/// sequence number, so loss is counted exactly.
struct UdpFlow {
    name: &'static str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<HashSet<u64>>,
}

impl UdpFlow {
    fn start(name: &'static str, from: &Netns, to: &Netns, dst: &'static str, port: u16) -> Self {
        const RATE: u32 = 1000;
        let rx = to.run(move || {
            let s = UdpSocket::bind((dst, port)).expect("bind UDP receiver");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("read timeout");
            s
        });
        let tx = from.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind UDP sender");
            s.connect((dst, port)).expect("connect UDP sender");
            s
        });
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let received = Arc::new(AtomicU64::new(0));
        let sender = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let interval = Duration::from_secs(1) / RATE;
                let start = Instant::now();
                let mut seq: u64 = 0;
                let mut payload = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let due = start + interval * u32::try_from(seq).expect("seq fits");
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    payload[..8].copy_from_slice(&seq.to_be_bytes());
                    tx.send(&payload).expect("UDP send through the tunnel");
                    seq += 1;
                }
                seq
            }
        });
        let receiver = std::thread::spawn({
            let (done, received) = (done.clone(), received.clone());
            move || {
                let mut seen = HashSet::new();
                let mut buf = [0u8; 128];
                while !done.load(Ordering::Relaxed) {
                    if let Ok(n) = rx.recv(&mut buf) {
                        if n >= 8 {
                            let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                            if seen.insert(seq) {
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                seen
            }
        });
        UdpFlow {
            name,
            stop,
            done,
            received,
            sender,
            receiver,
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops sending, drains, and asserts that at most `max_loss` (a fraction)
    /// of the datagrams were lost. Returns (sent, received).
    fn finish(self, max_loss: f64) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("UDP sender");
        let received = self.received.clone();
        wait_until(Duration::from_secs(2), || {
            received.load(Ordering::Relaxed) >= sent
        });
        self.done.store(true, Ordering::Relaxed);
        let seen = self.receiver.join().expect("UDP receiver");
        let got = seen.len() as u64;
        let lost = sent.saturating_sub(got);
        eprintln!("{}: sent {sent}, received {got}, lost {lost}", self.name);
        assert!(sent > 0);
        assert!(
            (lost as f64) <= max_loss * sent as f64,
            "{}: lost {lost} of {sent} datagrams (allowed {:.2} %)",
            self.name,
            max_loss * 100.0
        );
        (sent, got)
    }
}

/// A TCP connection writing a known pattern at a steady pace until stopped;
/// the reader checks every byte.
struct TcpFlow {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<u64>,
    reader: std::thread::JoinHandle<Result<u64, String>>,
}

impl TcpFlow {
    fn start(from: &Netns, to: &Netns, dst: &'static str, port: u16) -> Self {
        let listener = to.run(move || TcpListener::bind((dst, port)).expect("bind TCP listener"));
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 << 10];
            let mut off: u64 = 0;
            loop {
                let n = s
                    .read(&mut buf)
                    .map_err(|e| format!("read at {off}: {e}"))?;
                if n == 0 {
                    return Ok(off);
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    let at = off + i as u64;
                    if *b != pattern(at) {
                        return Err(format!("byte {at} corrupted"));
                    }
                }
                off += n as u64;
            }
        });
        let mut stream = from.run(move || {
            let addr: SocketAddr = format!("{dst}:{port}").parse().expect("addr");
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("TCP connect")
        });
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .expect("write timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let stop = stop.clone();
            move || {
                // 32 KiB every 20 ms: about 1.6 MB/s, steady rather than bursty.
                let mut off: u64 = 0;
                let mut chunk = vec![0u8; 32 << 10];
                while !stop.load(Ordering::Relaxed) {
                    for (i, b) in chunk.iter_mut().enumerate() {
                        *b = pattern(off + i as u64);
                    }
                    stream
                        .write_all(&chunk)
                        .expect("TCP write: the connection broke");
                    off += chunk.len() as u64;
                    std::thread::sleep(Duration::from_millis(20));
                }
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("TCP shutdown");
                off
            }
        });
        TcpFlow {
            stop,
            writer,
            reader,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let written = self.writer.join().expect("TCP writer");
        let read = self
            .reader
            .join()
            .expect("TCP reader")
            .unwrap_or_else(|e| panic!("TCP transfer broken: {e}"));
        assert_eq!(read, written, "TCP bytes read vs written");
        eprintln!("tcp: {written} bytes intact");
        written
    }
}

/// Traffic in both directions plus a TCP transfer A -> B.
struct Traffic {
    ab: UdpFlow,
    ba: UdpFlow,
    tcp: TcpFlow,
}

impl Traffic {
    fn start(a: &Netns, b: &Netns) -> Self {
        let t = Traffic {
            ab: UdpFlow::start("udp A->B", a, b, "10.244.2.1", 6001),
            ba: UdpFlow::start("udp B->A", b, a, "10.244.1.1", 6002),
            tcp: TcpFlow::start(a, b, "10.244.2.1", 5001),
        };
        assert!(
            wait_until(Duration::from_secs(5), || t.ab.received() > 100
                && t.ba.received() > 100),
            "traffic did not start"
        );
        t
    }

    /// Lets the flows run for `d` (traffic duration, not synchronisation).
    fn run_for(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn finish(self, max_loss: f64) {
        self.ab.finish(max_loss);
        self.ba.finish(max_loss);
        self.tcp.finish();
    }
}

fn pubkey(k: &StaticSecret) -> [u8; 32] {
    PublicKey::from(k).to_bytes()
}

fn session_key(e: &Engine) -> Option<[u8; 32]> {
    e.peer_stats().first().and_then(|s| s.session_key)
}

/// Rotates `rot`'s key, tells the other side only after `announce_after`,
/// and waits until the sessions moved to the new key. Returns the new key.
fn rotate_with_slow_announcement(
    rot: &Engine,
    other: &Engine,
    rot_underlay: &str,
    rot_cidr: &str,
    grace: Duration,
    announce_after: Duration,
) -> StaticSecret {
    let old = rot.public_key();
    let new = new_key();
    rot.rotate_key(new.clone(), grace);
    assert_eq!(rot.public_key(), pubkey(&new));
    std::thread::sleep(announce_after);
    // The other side has not heard of the new key: the old session carries on.
    assert_eq!(
        session_key(rot),
        Some(old),
        "before the announcement, traffic must still use the old key's session"
    );
    other.set_peers(vec![peer(pubkey(&new), Some(rot_underlay), rot_cidr)]);
    assert!(
        wait_until(Duration::from_secs(3), || session_key(rot)
            == Some(pubkey(&new))),
        "sessions did not move to the new key: {:?}",
        rot.peer_stats()
    );
    let seen = other.peer_stats();
    assert_eq!(seen.len(), 1, "re-keyed peer replaced, not duplicated");
    assert_eq!(seen[0].public_key, pubkey(&new));
    assert!(seen[0].has_session);
    new
}

#[test]
fn rotation_is_hitless_and_old_key_expires() {
    require_root();
    let mut p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    assert_eq!(session_key(p.ea()), Some(pubkey(&p.ka)));
    let traffic = Traffic::start(&p.a, &p.b);

    let grace = Duration::from_secs(6);
    let rotated_at = Instant::now();
    let k1 = rotate_with_slow_announcement(
        p.ea(),
        p.eb(),
        A_UNDERLAY,
        "10.244.1.0/24",
        grace,
        Duration::from_secs(2),
    );
    traffic.run_for(Duration::from_secs(1));
    traffic.finish(0.001);
    // B's own key did not change.
    assert_eq!(session_key(p.eb()), Some(pubkey(&p.kb)));

    // After the grace period the old key answers no handshake: a restarted B
    // that still only knows A's old key cannot reach A.
    let left = (rotated_at + grace).saturating_duration_since(Instant::now());
    std::thread::sleep(left + Duration::from_millis(300));
    p.eb.take().expect("engine B").shutdown();
    let eb = start_engine(&p.b, &p.name_b, p.kb.clone(), "10.244.2.1", "10.244.1.0/24");
    p.eb = Some(eb);
    let invalid_before = p.ea().counters().dropped_invalid;
    p.configure_b(); // A's old public key
    assert!(
        wait_until(Duration::from_secs(2), || p.ea().counters().dropped_invalid
            > invalid_before),
        "A never saw B's initiation to the old key"
    );
    assert!(
        !ping(&p.b, &["10.244.1.1"]),
        "a handshake with A's expired key succeeded"
    );
    assert!(!p.eb().peer_stats()[0].has_session);
    // With the new key it works at once.
    p.eb()
        .set_peers(vec![peer(pubkey(&k1), Some(A_UNDERLAY), "10.244.1.0/24")]);
    assert!(
        wait_until(Duration::from_secs(3), || ping(&p.b, &["10.244.1.1"])),
        "B with A's new key cannot reach A"
    );
    assert_eq!(session_key(p.ea()), Some(pubkey(&k1)));
}

#[test]
fn three_rotations_in_a_row_under_traffic() {
    require_root();
    let p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    let traffic = Traffic::start(&p.a, &p.b);
    let grace = Duration::from_secs(3);
    let slow = Duration::from_millis(1500);
    // A, then B, then A again: each side sees both its own and its peer's rotation.
    let a1 =
        rotate_with_slow_announcement(p.ea(), p.eb(), A_UNDERLAY, "10.244.1.0/24", grace, slow);
    let b1 =
        rotate_with_slow_announcement(p.eb(), p.ea(), B_UNDERLAY, "10.244.2.0/24", grace, slow);
    let a2 =
        rotate_with_slow_announcement(p.ea(), p.eb(), A_UNDERLAY, "10.244.1.0/24", grace, slow);
    traffic.run_for(Duration::from_secs(1));
    traffic.finish(0.001);
    assert_ne!(pubkey(&a1), pubkey(&a2));
    assert_eq!(session_key(p.ea()), Some(pubkey(&a2)));
    assert_eq!(session_key(p.eb()), Some(pubkey(&b1)));
    // Old slots are retired once the grace periods and overlaps are over; the
    // tunnel keeps working on the newest keys.
    assert!(p.ping_a_to_b(&[]));
}

#[test]
fn rotation_against_wireguard_go() {
    require_root();
    let prefix = unique_prefix();
    let (a, b) = underlay(&prefix, 1500);
    let (ka, kb) = (new_key(), new_key());
    let name_a = format!("{prefix}a");
    let name_g = format!("{prefix}g");
    let ea = start_engine(&a, &name_a, ka.clone(), "10.244.1.1", "10.244.2.0/24");
    let ka_pub = b64(&pubkey(&ka));
    let _wggo = start_wireguard_go(&b, &name_g, &kb, &ka_pub);
    ea.set_peers(vec![peer(pubkey(&kb), Some(B_UNDERLAY), "10.244.2.0/24")]);
    assert!(
        wait_until(Duration::from_secs(10), || ping(&a, &["10.244.2.1"])),
        "engine -> wireguard-go never worked"
    );
    let traffic = Traffic::start(&a, &b);

    let k1 = new_key();
    ea.rotate_key(k1.clone(), Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        session_key(&ea),
        Some(pubkey(&ka)),
        "old session still in use"
    );
    // The announcement reaches wireguard-go: the new peer takes over the
    // AllowedIPs and the old one is removed.
    let k1_pub = b64(&pubkey(&k1));
    wg(&[
        "set",
        &name_g,
        "peer",
        &ka_pub,
        "remove",
        "peer",
        &k1_pub,
        "endpoint",
        &format!("{A_UNDERLAY}:{PORT}"),
        "allowed-ips",
        "10.244.1.0/24",
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || session_key(&ea)
            == Some(pubkey(&k1))),
        "session did not move to the new key: {:?}",
        ea.peer_stats()
    );
    traffic.run_for(Duration::from_secs(1));
    // wireguard-go drops what arrives on the removed peer's session while its
    // new handshake completes (about one round trip), so allow a little loss.
    traffic.finish(0.01);
    let show = wg(&["show", &name_g]);
    assert!(show.contains(&format!("peer: {k1_pub}")), "{show}");
    assert!(!show.contains(&format!("peer: {ka_pub}")), "{show}");
}

#[test]
fn previous_key_restored_after_restart_answers_until_its_deadline() {
    require_root();
    let mut p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    let k0 = p.ka.clone();
    let k1 = new_key();
    // A rotated, then restarted during the grace period: it comes back with k1
    // and restores k0 until the persisted deadline.
    p.ea().rotate_key(k1.clone(), Duration::from_secs(30));
    p.ea.take().expect("engine A").shutdown();
    let ea = start_engine(&p.a, &p.name_a, k1.clone(), "10.244.1.1", "10.244.2.0/24");
    let until = std::time::SystemTime::now() + Duration::from_secs(4);
    ea.set_previous_key(k0.clone(), until);
    p.ea = Some(ea);
    p.configure_a();
    // B restarts too and still only knows k0: A answers with the restored key.
    p.eb.take().expect("engine B").shutdown();
    p.eb = Some(start_engine(
        &p.b,
        &p.name_b,
        p.kb.clone(),
        "10.244.2.1",
        "10.244.1.0/24",
    ));
    p.configure_b();
    assert!(
        wait_until(Duration::from_secs(3), || ping(&p.b, &["10.244.1.1"])),
        "the restored previous key did not answer"
    );
    assert_eq!(
        session_key(p.ea()),
        Some(pubkey(&k0)),
        "the session was made with the previous key"
    );
    // Setting a deadline in the past, or our current key, changes nothing.
    p.ea().set_previous_key(
        new_key(),
        std::time::SystemTime::now() - Duration::from_secs(1),
    );
    p.ea()
        .set_previous_key(k1.clone(), until + Duration::from_secs(60));

    // A's new handshake (pushed while the old session stands in) fails until
    // B learns k1; then the session moves over.
    p.eb()
        .set_peers(vec![peer(pubkey(&k1), Some(A_UNDERLAY), "10.244.1.0/24")]);
    assert!(
        wait_until(Duration::from_secs(3), || session_key(p.ea())
            == Some(pubkey(&k1))),
        "{:?}",
        p.ea().peer_stats()
    );

    // Past the deadline, k0 answers nothing.
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(left + Duration::from_millis(300));
    p.eb.take().expect("engine B").shutdown();
    p.eb = Some(start_engine(
        &p.b,
        &p.name_b,
        p.kb.clone(),
        "10.244.2.1",
        "10.244.1.0/24",
    ));
    p.configure_b(); // k0 again
    assert!(
        !wait_until(Duration::from_secs(2), || ping(&p.b, &["10.244.1.1"])),
        "k0 still answered after its deadline"
    );
}

/// A peer's new key is configured only after its announcement is read, but
/// the peer initiates with it at once. The responder holds such initiations
/// for a moment and answers them when the key is configured, instead of
/// leaving the initiator waiting REKEY_TIMEOUT (5 s) for its next attempt.
#[test]
fn initiation_from_a_key_not_yet_configured_is_answered_once_it_is() {
    require_root();
    let p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    // B forgets A entirely; A rotates and initiates to B with its new key.
    p.eb().set_peers(Vec::new());
    let held_before = p.eb().counters().initiations_held;
    // The setup itself may have held and answered A's first initiation (if it
    // reached B before B's peers were set): count from here.
    let answered_before = p.eb().counters().held_answered;
    let k1 = new_key();
    p.ea().rotate_key(k1.clone(), Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(2), || p
            .eb()
            .counters()
            .initiations_held
            > held_before),
        "B did not hold A's initiation: {:?}",
        p.eb().counters()
    );
    assert_eq!(p.eb().counters().held_answered, answered_before);
    assert_ne!(session_key(p.ea()), Some(pubkey(&k1)));
    // B configures A's new key *without an endpoint*: B cannot initiate, so
    // only the held initiation can make the session, and well before A's
    // next attempt (REKEY_TIMEOUT after the rotation).
    let configured = Instant::now();
    p.eb()
        .set_peers(vec![peer(pubkey(&k1), None, "10.244.1.0/24")]);
    assert_eq!(p.eb().counters().held_answered, answered_before + 1);
    assert!(
        wait_until(Duration::from_secs(2), || session_key(p.ea())
            == Some(pubkey(&k1))),
        "the held initiation was not answered: {:?}",
        p.ea().peer_stats()
    );
    assert!(configured.elapsed() < Duration::from_secs(2));
    assert!(p.ping_a_to_b(&[]), "no traffic over the answered session");

    // An initiation held longer than its lifetime is not answered: by then
    // the initiator has moved on to a new one.
    p.eb().set_peers(Vec::new());
    let held_before = p.eb().counters().initiations_held;
    let k2 = new_key();
    p.ea().rotate_key(k2.clone(), Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(2), || p
        .eb()
        .counters()
        .initiations_held
        > held_before));
    std::thread::sleep(Duration::from_millis(3300));
    p.eb()
        .set_peers(vec![peer(pubkey(&k2), None, "10.244.1.0/24")]);
    assert_eq!(
        p.eb().counters().held_answered,
        answered_before + 1,
        "an expired initiation was answered"
    );
}

/// Anyone who knows B's public key can send it initiations from keys that are
/// not peers: they are held in a bounded buffer (newest win), answered for no
/// key that is not configured, and a real peer's initiation still gets through.
#[test]
fn a_flood_of_unknown_initiations_is_bounded_and_answers_nobody() {
    require_root();
    let p = Pair::new(1500);
    assert!(wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])));
    p.eb().set_peers(Vec::new());
    let kb_pub = boringtun::x25519::PublicKey::from(pubkey(&p.kb));
    let sock =
        p.a.run(|| UdpSocket::bind("198.18.0.1:0").expect("bind in A"));
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let before = p.eb().counters();
    let flood = 150u32;
    let mut buf = [0u8; 256];
    let mut sent = 0;
    for i in 0..flood {
        let mut t = boringtun::noise::Tunn::new(new_key(), kb_pub, None, None, i + 1, None);
        if let boringtun::noise::TunnResult::WriteToNetwork(init) =
            t.format_handshake_initiation(&mut buf, false)
        {
            sock.send_to(init, format!("{B_UNDERLAY}:{PORT}"))
                .expect("send forged initiation");
            sent += 1;
        }
        // Stay under B's handshake rate limit (200 per second, counted over
        // boringtun's 1 s reset period) so each one is really held.
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(sent, flood);
    assert!(
        wait_until(Duration::from_secs(5), || p
            .eb()
            .counters()
            .initiations_held
            - before.initiations_held
            >= u64::from(flood) / 2),
        "B held too few of the forged initiations: {:?}",
        p.eb().counters()
    );
    // No handshake response (message type 2) for any of them: only
    // configured keys get one. (A cookie reply, type 3, is B's load
    // protection at work, not an answer.)
    let mut reply = [0u8; 256];
    while let Ok(n) = sock.recv(&mut reply) {
        assert_ne!(
            reply.get(..4),
            Some(&[2u8, 0, 0, 0][..]),
            "B answered a key it does not know ({n} bytes)"
        );
    }
    assert_eq!(p.eb().counters().held_answered, before.held_answered);

    // A real rotation right after the flood is still answered at once. (Wait
    // out the limiter's 1 s period first, or A would get a cookie reply and
    // retry only after REKEY_TIMEOUT: the load protection, not what is tested.)
    std::thread::sleep(Duration::from_millis(1100));
    let k1 = new_key();
    let held = p.eb().counters().initiations_held;
    p.ea().rotate_key(k1.clone(), Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(2), || p
        .eb()
        .counters()
        .initiations_held
        > held));
    p.eb()
        .set_peers(vec![peer(pubkey(&k1), None, "10.244.1.0/24")]);
    assert_eq!(
        p.eb().counters().held_answered,
        before.held_answered + 1,
        "exactly the configured key's initiation is answered"
    );
    assert!(
        wait_until(Duration::from_secs(2), || session_key(p.ea())
            == Some(pubkey(&k1))),
        "{:?}",
        p.ea().peer_stats()
    );
}

/// A burst of small UDP datagrams, which the sending engine drains from its
/// TUN and sends in a few batched GSO/`sendmmsg` calls and the receiving one
/// takes in with `recvmmsg`, arrives complete and in order: batching
/// regroups packets by peer and must never reorder a flow.
/// Sends `flows` UDP flows from A's pod to B's, interleaved in paced bursts
/// of `per_burst` datagrams per flow (each flow its own source port, each
/// datagram `[seq: u32, flow: u8]`), and returns the sequence numbers B
/// received, per flow, in arrival order.
fn udp_bursts(p: &Pair, flows: u8, per_flow: u32, per_burst: u32) -> Vec<Vec<u32>> {
    use socket2::{Domain, Socket, Type};
    let total = usize::from(flows) * per_flow as usize;
    let rx = p.b.run(|| {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket in B");
        // Room for every datagram, so the receiver's pace cannot lose any.
        s.set_recv_buffer_size(8 << 20).expect("SO_RCVBUF");
        let addr: SocketAddr = "10.244.2.1:5002".parse().expect("addr");
        s.bind(&addr.into()).expect("bind in B");
        let u: UdpSocket = s.into();
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        u
    });
    let reader = std::thread::spawn(move || {
        let mut seqs = vec![Vec::new(); usize::from(flows)];
        let (mut got, mut buf) = (0, [0u8; 256]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < total && Instant::now() < deadline {
            match rx.recv(&mut buf) {
                Ok(n) if n >= 5 && buf[4] < flows => {
                    seqs[usize::from(buf[4])]
                        .push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    got += 1;
                }
                Ok(n) => panic!("unexpected {n}-byte datagram in B: {:?}", &buf[..n.min(8)]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("receive in B: {e}"),
            }
        }
        seqs
    });
    p.a.run(move || {
        let txs: Vec<UdpSocket> = (0..flows)
            .map(|_| UdpSocket::bind("10.244.1.1:0").expect("bind in A"))
            .collect();
        let mut payload = [0x5au8; 64];
        for burst in 0..per_flow.div_ceil(per_burst) {
            for (flow, tx) in txs.iter().enumerate() {
                for seq in burst * per_burst..((burst + 1) * per_burst).min(per_flow) {
                    payload[..4].copy_from_slice(&seq.to_be_bytes());
                    payload[4] = flow as u8;
                    tx.send_to(&payload, "10.244.2.1:5002").expect("send in A");
                }
            }
            // Bounded load: bursts well within the TUN queue, paced.
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    reader.join().expect("reader thread")
}

/// Every datagram of every flow arrived, each flow in the order it was sent.
fn assert_complete_and_in_order(seqs: &[Vec<u32>], per_flow: u32) {
    for (flow, got) in seqs.iter().enumerate() {
        assert_eq!(
            got.len(),
            per_flow as usize,
            "flow {flow}: datagrams lost in the tunnel"
        );
        assert!(
            got.iter().enumerate().all(|(i, &s)| s == i as u32),
            "flow {flow}: datagrams reordered, first misplaced at {:?}",
            got.iter().enumerate().find(|(i, &s)| s != *i as u32)
        );
    }
}

#[test]
fn udp_bursts_cross_batched_in_order() {
    require_root();
    let p = Pair::new(1500);
    assert!(
        wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])),
        "ping A -> B through the tunnel never succeeded"
    );
    // 20 bursts of 200: several packets per TUN read and GSO send.
    const TOTAL: u32 = 4000;
    let sent_before = p.ea().counters().udp_tx_datagrams;
    assert_complete_and_in_order(&udp_bursts(&p, 1, TOTAL, 200), TOTAL);
    let sent = p.ea().counters().udp_tx_datagrams - sent_before;
    assert!(sent >= u64::from(TOTAL), "engine A sent {sent} datagrams");
}

/// Several packet queues: flows are encrypted by different threads (each
/// queue carries a share of them), and every flow still arrives complete and
/// in order, on UDP and TCP.
#[test]
fn queues_spread_flows_and_keep_each_in_order() {
    require_root();
    const QUEUES: usize = 3;
    const FLOWS: u8 = 24;
    const PER_FLOW: u32 = 300;
    let p = Pair::with_queues(1500, QUEUES);
    assert!(
        wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])),
        "ping A -> B through the tunnel never succeeded"
    );
    let before = p.ea().counters();
    assert_complete_and_in_order(&udp_bursts(&p, FLOWS, PER_FLOW, 10), PER_FLOW);
    let after = p.ea().counters();
    // The kernel hashes each flow to a queue: with 24 flows over 3 queues,
    // every queue gets some (all on two of them: p = 3 * (2/3)^24 < 2e-4).
    assert_every_queue_encrypted(&before, &after, QUEUES, u64::from(PER_FLOW));
    // TCP (data one way, ACKs the other) through several queues: intact.
    tcp_transfer(&p.a, &p.b, 8 << 20);
}

/// Each of the `queues` queues read (and encrypted) at least `min` packets
/// between the two counter snapshots, and the per-queue counts add up.
fn assert_every_queue_encrypted(
    before: &veil::wireguard::EngineCounters,
    after: &veil::wireguard::EngineCounters,
    queues: usize,
    min: u64,
) {
    assert_eq!(after.queues.len(), queues, "{after:?}");
    for (q, (b, a)) in before.queues.iter().zip(&after.queues).enumerate() {
        let read = a.tun_rx_packets - b.tun_rx_packets;
        assert!(
            read >= min,
            "queue {q} encrypted {read} packets, fewer than one flow's {min}: {after:?}"
        );
    }
    let per_queue: u64 = after.queues.iter().map(|q| q.tun_rx_packets).sum();
    assert_eq!(per_queue, after.tun_rx_packets, "{after:?}");
}

/// Replies do not move a flow to another queue. The tun driver learns a
/// flow's queue from the queue that writes its packets and would move the
/// flow there (a reorder risk at the move); the engine writes through
/// detached queues, which teach it nothing. Here every flow is a ping-pong,
/// so all of A's replies are written by the one udp->tun thread that B's
/// datagrams reach: if the driver learned from those writes, every flow's
/// requests after the first would be read by that one queue, and the other
/// queue would have read only first requests.
#[test]
fn replies_do_not_move_a_flow_to_another_queue() {
    require_root();
    const QUEUES: usize = 2;
    const FLOWS: usize = 16;
    const EXCHANGES: u64 = 40;
    let p = Pair::with_queues(1500, QUEUES);
    assert!(
        wait_until(Duration::from_secs(10), || p.ping_a_to_b(&[])),
        "ping A -> B through the tunnel never succeeded"
    );
    let echo = p.b.run(|| {
        let u = UdpSocket::bind("10.244.2.1:5003").expect("bind in B");
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        u
    });
    let stop = Arc::new(AtomicBool::new(false));
    let echoer = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    echo.send_to(&buf[..n], from).expect("echo in B");
                }
            }
        }
    });
    let before = p.ea().counters();
    p.a.run(|| {
        let socks: Vec<UdpSocket> = (0..FLOWS)
            .map(|_| {
                let u = UdpSocket::bind("10.244.1.1:0").expect("bind in A");
                u.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("read timeout");
                u
            })
            .collect();
        let mut buf = [0u8; 64];
        for i in 0..EXCHANGES {
            for (flow, u) in socks.iter().enumerate() {
                u.send_to(&i.to_be_bytes(), "10.244.2.1:5003")
                    .expect("send in A");
                let n = u
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("flow {flow}, exchange {i}: no echo: {e}"));
                assert_eq!(&buf[..n], i.to_be_bytes(), "flow {flow}: wrong echo");
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    echoer.join().expect("echo thread");
    let after = p.ea().counters();
    // 16 flows over 2 queues by hash: each queue reads at least one whole
    // flow (all on one queue: p = 2 * 2^-16), which it cannot if the flows
    // had moved to the replies' queue after their first request.
    assert_every_queue_encrypted(&before, &after, QUEUES, EXCHANGES);
}
