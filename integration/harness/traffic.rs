//! Traffic between pods: `veil-probe` echo servers in every pod, and bounded clients
//! (`ping`, `veil-probe tcp-client` / `udp-client`) run inside the sending pod.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::poll_until;
use super::process::Bg;
use super::topology::Pod;

pub const PROBE_BIN: &str = env!("CARGO_BIN_EXE_veil-probe");
pub const TCP_PORT: u16 = 7001;
pub const UDP_PORT: u16 = 7002;
/// A second pair of echo ports, for tests that tell ports apart (policy).
pub const TCP_PORT_B: u16 = 8001;
pub const UDP_PORT_B: u16 = 8002;

/// Echo servers (TCP and UDP) in a set of pods; killed on drop.
#[derive(Debug, Default)]
pub struct Servers {
    procs: Vec<Bg>,
}

impl Servers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts both echo servers in `pod` and waits until they listen.
    pub fn start_in(&mut self, pod: &Pod, logdir: &Path) {
        for (kind, port) in [("tcp-server", TCP_PORT), ("udp-server", UDP_PORT)] {
            let mut cmd = pod.ns.cmd(PROBE_BIN);
            cmd.args([kind, &port.to_string()]);
            let log = logdir.join(format!("{}-{kind}.log", pod.name));
            let mut bg = Bg::spawn(format!("{kind} in {}", pod.name), cmd, &log);
            bg.wait_for_log("listening on", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}"));
            self.procs.push(bg);
        }
    }

    /// Starts a TCP echo server on `tcp_port` and a UDP one on `udp_port` in any
    /// namespace (a pod's or a node's), named `name` in logs, and waits until they listen.
    pub fn start_ports_in(
        &mut self,
        ns: &super::netns::Netns,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
        logdir: &Path,
    ) {
        for (kind, port) in [("tcp-server", tcp_port), ("udp-server", udp_port)] {
            let mut cmd = ns.cmd(PROBE_BIN);
            cmd.args([kind, &port.to_string()]);
            let log = logdir.join(format!("{name}-{kind}-{port}.log"));
            let mut bg = Bg::spawn(format!("{kind} :{port} in {name}"), cmd, &log);
            bg.wait_for_log("listening on", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}"));
            self.procs.push(bg);
        }
    }

    pub fn start_all<'a>(&mut self, pods: impl IntoIterator<Item = &'a Pod>, logdir: &Path) {
        for p in pods {
            self.start_in(p, logdir);
        }
    }
}

/// The outcome of one client run.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    pub output: String,
    pub elapsed: Duration,
}

fn run_in(pod: &Pod, argv: &[&str]) -> ProbeResult {
    let start = Instant::now();
    let out = pod.ns.exec(argv);
    ProbeResult {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        elapsed: start.elapsed(),
    }
}

/// `ping` result: how many of how many came back.
#[derive(Debug, Clone)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    pub output: String,
}

impl PingResult {
    pub fn all_ok(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// `ping -c count -s size` from `from` to `to`; each reply waited for at most 1 s.
pub fn ping(from: &Pod, to: Ipv4Addr, count: u32, size: u32) -> PingResult {
    let (c, s) = (count.to_string(), size.to_string());
    let out = run_in(
        from,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &c,
            "-i",
            "0.2",
            "-W",
            "1",
            "-s",
            &s,
            &to.to_string(),
        ],
    );
    parse_ping(&out.output)
}

/// Parses ping's summary line: "N packets transmitted, M received, ...".
pub fn parse_ping(output: &str) -> PingResult {
    let mut r = PingResult {
        transmitted: 0,
        received: 0,
        output: output.to_string(),
    };
    for line in output.lines() {
        if let Some((tx, rest)) = line.split_once(" packets transmitted, ") {
            r.transmitted = tx.trim().parse().unwrap_or(0);
            r.received = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    r
}

/// `veil-probe tcp-client`: `bytes` through the TCP echo server in `to`, checked.
pub fn tcp(from: &Pod, to: Ipv4Addr, bytes: u64, canary: &str, timeout: Duration) -> ProbeResult {
    tcp_port(from, to, TCP_PORT, bytes, canary, timeout)
}

/// [`tcp`] to any address and port.
pub fn tcp_port(
    from: &Pod,
    to: Ipv4Addr,
    port: u16,
    bytes: u64,
    canary: &str,
    timeout: Duration,
) -> ProbeResult {
    run_in(
        from,
        &[
            PROBE_BIN,
            "tcp-client",
            &to.to_string(),
            &port.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--canary",
            canary,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
    )
}

/// [`udp`] to any address and port: `count` datagrams, no retries.
pub fn udp_port(
    from: &Pod,
    to: Ipv4Addr,
    port: u16,
    count: u32,
    canary: &str,
    timeout: Duration,
) -> ProbeResult {
    run_in(
        from,
        &[
            PROBE_BIN,
            "udp-client",
            &to.to_string(),
            &port.to_string(),
            "--count",
            &count.to_string(),
            "--canary",
            canary,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
    )
}

/// `veil-probe udp-client`: `count` datagrams of `size` bytes, echoed and checked.
pub fn udp_sized(
    from: &Pod,
    to: Ipv4Addr,
    count: u32,
    size: usize,
    canary: &str,
    timeout: Duration,
    retries: u32,
) -> ProbeResult {
    run_in(
        from,
        &[
            PROBE_BIN,
            "udp-client",
            &to.to_string(),
            &UDP_PORT.to_string(),
            "--count",
            &count.to_string(),
            "--canary",
            canary,
            "--timeout-ms",
            &timeout.as_millis().to_string(),
            "--size",
            &size.to_string(),
            "--retries",
            &retries.to_string(),
        ],
    )
}

pub fn udp(from: &Pod, to: Ipv4Addr, count: u32, canary: &str, timeout: Duration) -> ProbeResult {
    udp_sized(from, to, count, 256, canary, timeout, 0)
}

/// One UDP round trip, retried until it succeeds or `timeout` passes; returns how long
/// it took. The first packets of a new WireGuard session may wait for a handshake.
pub fn wait_reachable(
    from: &Pod,
    to: Ipv4Addr,
    canary: &str,
    timeout: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    poll_until(timeout, Duration::from_millis(20), || {
        let r = udp_sized(from, to, 1, 64, canary, Duration::from_millis(250), 0);
        r.ok.then(|| start.elapsed())
    })
}

/// What to run for every ordered pair in [`matrix`].
#[derive(Debug, Clone, Copy)]
pub struct MatrixSpec<'a> {
    pub canary: &'a str,
    pub pings: u32,
    pub tcp_bytes: u64,
    pub udp_count: u32,
}

/// Failures of a matrix run, one line per (kind, from, to).
#[derive(Debug, Default)]
pub struct MatrixResult {
    pub runs: usize,
    pub failures: Vec<String>,
}

impl MatrixResult {
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{what}: {} of {} runs failed:\n{}",
            self.failures.len(),
            self.runs,
            self.failures.join("\n")
        );
    }
}

/// ICMP, TCP and UDP from every pod to every other pod.
pub fn matrix(pods: &[&Pod], spec: MatrixSpec<'_>) -> MatrixResult {
    let mut r = MatrixResult::default();
    for from in pods {
        for to in pods {
            if from.ip == to.ip {
                continue;
            }
            let pair = format!("{} -> {}", from.label(), to.label());
            let p = ping(from, to.ip, spec.pings, 56);
            r.runs += 1;
            if !p.all_ok() {
                r.failures.push(format!("ping {pair}: {}", p.output.trim()));
            }
            let t = tcp(
                from,
                to.ip,
                spec.tcp_bytes,
                spec.canary,
                Duration::from_secs(10),
            );
            r.runs += 1;
            if !t.ok {
                r.failures.push(format!("tcp {pair}: {}", t.output.trim()));
            }
            let u = udp(
                from,
                to.ip,
                spec.udp_count,
                spec.canary,
                Duration::from_secs(2),
            );
            r.runs += 1;
            if !u.ok {
                r.failures.push(format!("udp {pair}: {}", u.output.trim()));
            }
        }
    }
    r
}

/// A payload marker unique to this test run: if a capture ever contains it, a pod's
/// payload crossed the underlay in the clear.
pub fn canary(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("VEILCANARY-{tag}-{:x}{nanos:x}", std::process::id())
}

/// Waits until each pair reaches each other both ways (UDP echo), so the
/// WireGuard handshakes are done before a test measures anything.
pub fn warm_up(pairs: &[(&Pod, &Pod)], canary: &str) {
    for (a, b) in pairs {
        for (from, to) in [(a, b), (b, a)] {
            let t = wait_reachable(from, to.ip, canary, Duration::from_secs(20));
            assert!(
                t.is_some(),
                "{} cannot reach {} within 20 s",
                from.label(),
                to.label()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "PING 10.244.2.10 (10.244.2.10) 56(84) bytes of data.\n\n\
                   --- 10.244.2.10 ping statistics ---\n\
                   5 packets transmitted, 3 received, 40% packet loss, time 804ms\n";
        let r = parse_ping(out);
        assert_eq!((r.transmitted, r.received), (5, 3));
        assert!(!r.all_ok());
        let r = parse_ping("5 packets transmitted, 5 received, 0% packet loss");
        assert!(r.all_ok());
        assert!(!parse_ping("ping: connect: Network is unreachable").all_ok());
    }
}
