//! Network-namespace tests of the userspace WireGuard engine: two "nodes"
//! (namespaces joined by a veth on 198.18.0.0/24), each with an engine whose
//! TUN carries a pod-range address. Everything lives in namespaces these tests
//! create; nothing is configured in the root namespace.
mod harness;

use harness::netns::{require_root, unique_prefix, Netns};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
    let cfg = EngineConfig {
        tun_name: name.to_owned(),
        mtu: 1420,
        listen_port: PORT,
        private_key: key,
        uapi_socket: Some(uapi_path(name)),
    };
    let engine = ns.run(move || Engine::start(cfg).expect("engine starts"));
    assert!(engine.tun_ifindex() > 0);
    assert_eq!(engine.tun_name(), name);
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
        let prefix = unique_prefix();
        let (a, b) = underlay(&prefix, underlay_mtu);
        let (ka, kb) = (new_key(), new_key());
        let (name_a, name_b) = (format!("{prefix}a"), format!("{prefix}b"));
        let ea = start_engine(&a, &name_a, ka.clone(), "10.244.1.1", "10.244.2.0/24");
        let eb = start_engine(&b, &name_b, kb.clone(), "10.244.2.1", "10.244.1.0/24");
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
    // the engine never sets DF, so the datagrams can be fragmented.
    let mut cap =
        p.a.cmd("timeout")
            .args([
                "5",
                "tcpdump",
                "-n",
                "-v",
                "-i",
                "ua",
                "--immediate-mode",
                "-c",
                "6",
                "udp",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tcpdump");
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.ping_a_to_b(&["-s", "1472", "-M", "dont"]), "ping -s 1472");
    assert!(p.ping_a_to_b(&["-s", "3000"]), "ping -s 3000");
    assert!(
        ping(&p.b, &["-s", "3000", "10.244.1.1"]),
        "ping B -> A -s 3000"
    );
    tcp_transfer(&p.a, &p.b, 1 << 20);
    let mut out = String::new();
    if let Some(mut so) = cap.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    let _ = cap.wait();
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

#[test]
fn interop_with_wireguard_go() {
    require_root();
    let prefix = unique_prefix();
    let (a, b) = underlay(&prefix, 1500);
    let (ka, kb) = (new_key(), new_key());
    let name_a = format!("{prefix}a");
    let name_g = format!("{prefix}g");
    let ea = start_engine(&a, &name_a, ka.clone(), "10.244.1.1", "10.244.2.0/24");

    let child = b
        .cmd("wireguard-go")
        .args(["-f", &name_g])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wireguard-go");
    let _wggo = WireguardGo {
        child,
        sock: uapi_path(&name_g),
    };
    assert!(
        wait_until(Duration::from_secs(10), || uapi_path(&name_g).exists()),
        "wireguard-go did not create its UAPI socket"
    );
    let keyfile = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(keyfile.path(), b64(&kb.to_bytes())).expect("write key");
    let keypath = keyfile.path().to_str().expect("utf-8 path");
    let ka_pub = b64(&PublicKey::from(&ka).to_bytes());
    wg(&[
        "set",
        &name_g,
        "private-key",
        keypath,
        "listen-port",
        "51820",
        "peer",
        &ka_pub,
        "endpoint",
        &format!("{A_UNDERLAY}:{PORT}"),
        "allowed-ips",
        "10.244.1.0/24",
    ]);
    b.exec_ok(&["ip", "addr", "add", "10.244.2.1/32", "dev", &name_g]);
    b.exec_ok(&["ip", "link", "set", &name_g, "mtu", "1420", "up"]);
    b.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/24",
        "dev",
        &name_g,
        "src",
        "10.244.2.1",
    ]);

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

    // And the other direction of the handshake: we initiate towards wireguard-go.
    drop(ea);
    let ea = start_engine(&a, &name_a, ka, "10.244.1.1", "10.244.2.0/24");
    ea.set_peers(vec![peer(kb_pub, Some(B_UNDERLAY), "10.244.2.0/24")]);
    assert!(
        wait_until(Duration::from_secs(3), || ping(&a, &["10.244.2.1"])),
        "engine-initiated handshake with wireguard-go failed"
    );
    let show = wg(&["show", &name_g]);
    assert!(show.contains(&format!("peer: {ka_pub}")), "{show}");
    assert!(show.contains("latest handshake:"), "{show}");
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
