//! The README's demo (`bash integration/demo.sh`), and a test like any other: it
//! asserts everything it shows and exits non-zero when one claim does not hold.
//!
//! A 3-node x 2-pod cluster in network namespaces on the file source, one
//! `veil-agent` per node. It prints, for a person watching: the topology,
//! `veilctl status`, an encrypted ping across nodes, `wg show` on each node, and a
//! capture of the underlay during cross-node ICMP/TCP/UDP carrying a canary: only
//! WireGuard, no canary. Then `veilctl disable` (the positive control: the same
//! capture catches the canary in plaintext, so "clean" above means something), and
//! `veilctl enable`: clean again.
//!
//! `harness = false` (a plain `main`): the output is the point, so it is not
//! captured; `CARGO_BIN_EXE_*` are still set, and the suite runs it.
//! Everything is torn down on drop: on success, on a failed assertion (panics are
//! caught below after unwinding) and on Ctrl-C (a SIGINT handler sets a flag that
//! the next checkpoint turns into such a panic).

// Without libtest (`harness = false`) the harness's own `#[test]` functions are
// not compiled, so their `use super::*` would be unused here.
#[allow(unused_imports)]
mod harness;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use harness::capture::Report;
use harness::fixture::Fixture;
use harness::poll_until;
use harness::process::Bg;
use harness::topology::{Pod, POD_GATEWAY, WG_PORT};
use harness::traffic::{canary, parse_ping, tcp, udp, wait_reachable};

const VEILCTL: &str = env!("CARGO_BIN_EXE_veilctl");
const NAME: &str = "demo";
/// Lines of tcpdump text shown per protocol and capture.
const SNIFF_PER_KIND: usize = 3;

/// Prints a section header with the time since the start.
struct Show {
    start: Instant,
    step: u32,
}

impl Show {
    fn section(&mut self, title: &str) {
        harness::interrupt::checkpoint();
        self.step += 1;
        println!(
            "\n[{:>5.1}s] == {}. {title}",
            self.start.elapsed().as_secs_f64(),
            self.step
        );
    }
}

/// Prints `text` indented, so command output stands apart from the narration.
fn indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn ok(claim: &str) {
    println!("  ok: {claim}");
}

/// Runs `veilctl --cluster-dir DIR ARGS`; panics with its output unless it succeeds.
fn veilctl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(VEILCTL)
        .arg("--cluster-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run veilctl: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "veilctl {args:?} failed:\n{text}");
    text
}

/// Whether the agent on `ns` has applied the encryption flag: with encryption on it
/// keeps a policy rule for its fallback routing table, with it off it removes the
/// rule, in the same reconcile pass that writes the flag to the BPF config map.
fn rule_present(node_ns: &harness::netns::Netns) -> bool {
    let table = veil::netlink::fallback::TABLE.to_string();
    let out = node_ns.exec(&["ip", "-4", "rule", "show", "table", &table]);
    out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn wait_flag_applied(f: &Fixture, enabled: bool) {
    for n in &f.topo.nodes {
        let done = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            harness::interrupt::checkpoint();
            (rule_present(&n.ns) == enabled).then_some(())
        });
        assert!(
            done.is_some(),
            "{}: the agent did not apply encryption {} within 10 s",
            n.name,
            if enabled { "on" } else { "off" }
        );
    }
}

/// A text tcpdump on one underlay port, to show a person what crossed the wire.
/// (The leak verdict comes from the pcap analysis of every port, not from this.)
struct Sniffer {
    bg: Bg,
}

impl Sniffer {
    fn start(f: &Fixture, port: &str, log: &Path) -> Self {
        let mut cmd = f.topo.underlay.cmd("tcpdump");
        cmd.args(["-i", port, "-nn", "-l", "-q", "--immediate-mode"]);
        let mut bg = Bg::spawn(format!("tcpdump -i {port} (text)"), cmd, log);
        bg.wait_for_log("listening on", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        Self { bg }
    }

    /// Stops tcpdump and returns a sample of its IP lines: the first few of each
    /// protocol, so ICMP, TCP and UDP all show when they crossed in the clear.
    fn stop(mut self) -> Vec<String> {
        self.bg.signal(libc::SIGINT);
        if poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            self.bg.try_status()
        })
        .is_none()
        {
            self.bg.kill();
        }
        let log = self.bg.log();
        let mut per_kind = [0usize; 3];
        let mut sample = Vec::new();
        for line in log.lines().filter(|l| l.contains(" IP ")) {
            // tcpdump -q prints `ICMP ...`, `tcp N` or `UDP, length N` after the addresses.
            let kind = if line.contains(": ICMP") {
                0
            } else if line.contains(": tcp") {
                1
            } else {
                2
            };
            if per_kind[kind] < SNIFF_PER_KIND {
                per_kind[kind] += 1;
                sample.push(line.to_string());
            }
        }
        sample
    }
}

/// The cross-node pairs every traffic round uses: each pair of nodes, both ways.
fn cross_pairs(f: &Fixture) -> Vec<(&Pod, &Pod)> {
    let t = &f.topo;
    let pairs = [
        (t.pod(1, 0), t.pod(2, 0)),
        (t.pod(2, 1), t.pod(3, 0)),
        (t.pod(3, 1), t.pod(1, 1)),
    ];
    pairs.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect()
}

/// ICMP, TCP and UDP with the canary over every cross-node pair; panics naming
/// every failure. Returns a one-line summary per pair.
fn cross_node_traffic(f: &Fixture, canary: &str) -> Vec<String> {
    // First make sure every pair answers (a new WireGuard session waits for its
    // handshake; a plaintext path may wait for ARP), so the counts below are exact.
    for (from, to) in cross_pairs(f) {
        harness::interrupt::checkpoint();
        let t = wait_reachable(from, to.ip, canary, Duration::from_secs(20));
        assert!(
            t.is_some(),
            "{} cannot reach {} within 20 s",
            from.label(),
            to.label()
        );
    }
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for (from, to) in cross_pairs(f) {
        harness::interrupt::checkpoint();
        let pair = format!("{:<24} -> {:<24}", from.label(), to.label());
        let p = ping_text(from, to.ip, 2);
        let pr = parse_ping(&p);
        let t = tcp(from, to.ip, 64 * 1024, canary, Duration::from_secs(10));
        let u = udp(from, to.ip, 10, canary, Duration::from_secs(2));
        if !pr.all_ok() {
            failures.push(format!("ping {pair}:\n{p}"));
        }
        if !t.ok {
            failures.push(format!("tcp {pair}: {}", t.output));
        }
        if !u.ok {
            failures.push(format!("udp {pair}: {}", u.output));
        }
        lines.push(format!(
            "{pair} icmp {}/{}  tcp 64 KiB {}  udp 10 x 256 B {}",
            pr.received,
            pr.transmitted,
            if t.ok { "echoed" } else { "FAILED" },
            if u.ok { "echoed" } else { "FAILED" },
        ));
    }
    assert!(
        failures.is_empty(),
        "cross-node traffic failed:\n{}",
        failures.join("\n")
    );
    lines
}

/// `ping` with its normal (not quiet) output, for showing.
fn ping_text(from: &Pod, to: Ipv4Addr, count: u32) -> String {
    let out = from.ns.exec(&[
        "ping",
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        &to.to_string(),
    ]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One capture phase: sniffer + full capture, traffic, both stopped.
fn captured_traffic(f: &Fixture, canary: &str, tag: &str) -> (Vec<String>, Vec<String>, Report) {
    let sniff = Sniffer::start(
        f,
        &f.topo.node(1).bridge_port,
        &f.work().join(format!("sniff-{tag}.log")),
    );
    let cap = f.capture();
    let lines = cross_node_traffic(f, canary);
    let report = cap.stop(WG_PORT, canary.as_bytes());
    let sniffed = sniff.stop();
    (lines, sniffed, report)
}

fn print_phase(f: &Fixture, lines: &[String], sniffed: &[String], r: &Report) {
    for l in lines {
        println!("  {l}");
    }
    println!(
        "  tcpdump -nn -q on bridge port {} (a sample):",
        f.topo.node(1).bridge_port
    );
    for l in sniffed {
        println!("    {l}");
    }
    print_report(r);
}

fn print_report(r: &Report) {
    println!(
        "  capture on every underlay port: {} frames = {} WireGuard UDP/{} + {} ARP + {} ICMP errors about WireGuard + {} other",
        r.total, r.wireguard, WG_PORT, r.arp, r.wireguard_icmp_errors, r.other_count
    );
    println!(
        "  frames with a pod address outside: {}   frames containing the canary: {}",
        r.pod_addr_outer_count, r.canary_frames
    );
}

fn run_demo(show: &mut Show) {
    show.section("Building the cluster: 3 nodes x 2 pods in network namespaces");
    let mut f = Fixture::new(3, 2, true, true);
    println!(
        "  underlay: netns {} with bridge br0; host-gw routes between nodes carry pod traffic in plaintext unless Veil steers it",
        f.topo.underlay.name()
    );
    for n in &f.topo.nodes {
        println!(
            "  {:<6} netns {:<10} eth0 {:<12} pod CIDR {:<14} (bridge port {})",
            n.name,
            n.ns.name(),
            n.underlay_ip,
            n.pod_cidr,
            n.bridge_port
        );
        for p in f.topo.pods_on(n.index) {
            println!(
                "           pod {:<8} netns {:<12} eth0 {}/32 via {POD_GATEWAY}  (host side {})",
                p.name,
                p.ns.name(),
                p.ip,
                p.host_if
            );
        }
    }
    println!("  cluster dir (file source): {}", f.dir.path().display());

    show.section("Starting veil-agent on every node (encryption enabled, strict)");
    f.start_agents(&[1, 2, 3], 0);
    for a in &f.agents {
        println!(
            "  {} agent pid {}; log {}",
            a.node,
            a.pid().map(|p| p.to_string()).unwrap_or_default(),
            a.log_path().display()
        );
    }
    ok("every agent announced itself and configured a peer for each other node");

    show.section("veilctl status");
    let status = veilctl(f.dir.path(), &["status"]);
    indented(&status);
    assert!(
        status.starts_with("encryption: enabled  strict: on"),
        "status does not show encryption on:\n{status}"
    );
    for n in &f.topo.nodes {
        let ann = f
            .dir
            .announcement(&n.name)
            .unwrap_or_else(|| panic!("no announcement for {}", n.name));
        assert!(
            status.lines().any(|l| l.starts_with(&n.name)
                && l.contains(&n.pod_cidr)
                && l.contains(&ann.public_key)),
            "status has no announced row for {}:\n{status}",
            n.name
        );
    }
    assert!(
        !status.contains("problems"),
        "status reports problems:\n{status}"
    );
    ok("status lists every node with its announced key");

    show.section("An encrypted ping between pods on different nodes");
    let canary1 = canary("encrypted");
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    let warm = wait_reachable(a, b.ip, &canary1, Duration::from_secs(20));
    assert!(warm.is_some(), "{} cannot reach {}", a.label(), b.label());
    println!(
        "  $ ip netns exec {} ping -c 3 {}    ({} on node1 -> {} on node2)",
        a.ns.name(),
        b.ip,
        a.name,
        b.name
    );
    let p = ping_text(a, b.ip, 3);
    indented(&p);
    let pr = parse_ping(&p);
    assert!(
        pr.all_ok(),
        "ping {} -> {} lost replies",
        a.label(),
        b.label()
    );
    ok("3/3 replies");

    show.section("Underlay capture during cross-node ICMP, TCP and UDP (canary in every payload)");
    println!("  canary: {canary1}");
    let (lines, sniffed, r) = captured_traffic(&f, &canary1, "encrypted");
    print_phase(&f, &lines, &sniffed, &r);
    r.assert_clean("encrypted phase");
    ok("only WireGuard crossed the underlay; no pod address outside, no canary");

    show.section("wg show on every node (the stock `wg` tool over Veil's UAPI socket)");
    for a in &f.agents {
        println!("  {} $ wg show {}", a.node, a.uapi_name);
        indented(&a.wg_show());
        let d = a.wg_dump().unwrap_or_else(|e| panic!("{}: {e}", a.node));
        assert_eq!(d.peers.len(), 2, "{}: {}", a.node, a.wg_show());
        for peer in &d.peers {
            assert!(
                peer.latest_handshake.is_some() && peer.rx_bytes > 0 && peer.tx_bytes > 0,
                "{}: peer {} has no handshake or no traffic: {}",
                a.node,
                peer.public_key,
                a.wg_show()
            );
        }
    }
    ok("each node has 2 peers, each with a handshake and traffic both ways");

    show.section("Positive control: veilctl disable");
    indented(&veilctl(f.dir.path(), &["disable"]));
    wait_flag_applied(&f, false);
    ok("every agent applied encryption off");
    let canary2 = canary("plaintext");
    println!("  canary: {canary2}");
    let (lines, sniffed, r) = captured_traffic(&f, &canary2, "plaintext");
    print_phase(&f, &lines, &sniffed, &r);
    for c in r.canary_examples.iter().take(3) {
        println!("    canary seen: {c}");
    }
    assert!(
        r.canary_frames > 0 && r.pod_addr_outer_count > 0 && r.other_count > 0,
        "with encryption off the capture must catch the plaintext canary:\n{r}"
    );
    ok("the same capture catches pod addresses and the canary in plaintext: it is not blind");

    show.section("veilctl enable again");
    indented(&veilctl(f.dir.path(), &["enable"]));
    wait_flag_applied(&f, true);
    ok("every agent applied encryption on");
    let canary3 = canary("reenabled");
    println!("  canary: {canary3}");
    let (lines, sniffed, r) = captured_traffic(&f, &canary3, "reenabled");
    print_phase(&f, &lines, &sniffed, &r);
    r.assert_clean("re-enabled phase");
    ok("clean again: only WireGuard, no canary");
    f.assert_agents_alive();

    show.section("Cleaning up (agents stopped, namespaces and files removed)");
    drop(f);
}

/// Whether the libtest-style arguments a runner may pass (`cargo test -- ARGS`)
/// select this demo: name filters (substring, or whole name with `--exact`),
/// `--skip`, `--ignored` (the demo is not ignored); other options are accepted.
fn selected(args: &[String]) -> bool {
    let matches = |filter: &str, exact: bool| {
        if exact {
            filter == NAME
        } else {
            NAME.contains(filter)
        }
    };
    let exact = args.iter().any(|a| a == "--exact");
    let mut filters = Vec::new();
    let mut skips: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ignored" => return false,
            "--skip" => skips.extend(it.next().map(String::as_str)),
            // Options whose value is a separate argument.
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" => {
                it.next();
            }
            _ if a.starts_with("--skip=") => skips.push(&a["--skip=".len()..]),
            _ if a.starts_with('-') => {}
            _ => filters.push(a.as_str()),
        }
    }
    (filters.is_empty() || filters.iter().any(|f| matches(f, exact)))
        && !skips.iter().any(|s| matches(s, exact))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    if !selected(&args) {
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out");
        return ExitCode::SUCCESS;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "demo: needs root (network namespaces, TUN, BPF): run `sudo bash integration/demo.sh`"
        );
        println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        return ExitCode::FAILURE;
    }
    harness::interrupt::install(NAME);
    let mut show = Show {
        start: Instant::now(),
        step: 0,
    };
    println!("Veil demo: transparent WireGuard between pods, steered by eBPF");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_demo(&mut show)));
    let secs = show.start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("\ndemo: every claim above was checked");
            println!(
                "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
            ExitCode::SUCCESS
        }
        Err(_) => {
            // The panic message (and any agent logs) were printed while unwinding.
            println!("\ndemo: FAILED (see the message above); everything was cleaned up");
            println!(
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
            ExitCode::FAILURE
        }
    }
}
