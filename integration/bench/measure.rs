//! One measurement: an iperf3 run or a request/response run from the client pod
//! to the server pod, bounded in time, with the CPU time it cost.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::engines::{probe_bin, Setup, IPERF_PORT, RR_PORT};
use crate::harness::poll_until;
use crate::harness::process::create_file;

/// What one figure measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// iperf3 TCP with this many parallel streams.
    Tcp(u8),
    /// iperf3 UDP at an unlimited rate (`-b 0`) with this payload size.
    Udp(u16),
    /// `veil-probe rr-client`: sequential 64-byte round trips.
    Rr,
}

impl Figure {
    pub fn label(self) -> String {
        match self {
            Figure::Tcp(1) => "TCP 1 stream".into(),
            Figure::Tcp(n) => format!("TCP {n} streams"),
            Figure::Udp(n) => format!("UDP {n} B"),
            Figure::Rr => "request/response 64 B".into(),
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// TCP: goodput at the receiver, Gbit/s.
    pub gbps: f64,
    /// TCP: bytes received.
    pub bytes: u64,
    /// UDP: datagrams received per second, and the loss in percent.
    pub pps: f64,
    pub loss_pct: f64,
    /// Request/response round-trip time percentiles, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Request/response: round trips made.
    pub round_trips: u64,
    /// CPU seconds during the run: all CPUs (busy time in /proc/stat), and the
    /// engine processes' own utime + stime.
    pub system_cpu_s: f64,
    pub engine_cpu_s: f64,
    /// Veil only: CPU seconds during the run of each engine packet thread
    /// (`veil-wg-tun*`, `veil-wg-udp*`), by thread name, summed over both nodes.
    pub packet_threads_s: BTreeMap<String, f64>,
}

/// Jiffies per second (`sysconf(_SC_CLK_TCK)`): the unit of /proc/stat and
/// /proc/PID/stat times (proc(5)).
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// System-wide busy jiffies: the first `cpu` line of /proc/stat minus idle and
/// iowait (guest time is already included in user, proc(5)).
fn system_busy() -> u64 {
    let text =
        std::fs::read_to_string("/proc/stat").unwrap_or_else(|e| panic!("read /proc/stat: {e}"));
    parse_system_busy(&text).unwrap_or_else(|| panic!("/proc/stat: no cpu line"))
}

pub fn parse_system_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let busy = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4).copied().unwrap_or(0);
    Some(busy)
}

/// utime + stime of a process (all its threads), in jiffies; 0 if it is gone.
pub fn process_cpu(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_process_cpu(&t))
        .unwrap_or(0)
}

/// Fields 14 and 15 of /proc/PID/stat; counted after the `)` that ends the
/// command name, which may itself contain spaces and parentheses.
pub fn parse_process_cpu(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The thread names of the engine's packet threads: `veil-wg-tun` and
/// `veil-wg-udp` for queue 0, `veil-wg-tun{q}` and `veil-wg-udp{q}` for queue q.
pub fn is_packet_thread(comm: &str) -> bool {
    ["veil-wg-tun", "veil-wg-udp"].iter().any(|p| {
        comm.strip_prefix(p)
            .is_some_and(|q| q.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// utime + stime of each thread of process `pid` (/proc/PID/task/TID/stat), in
/// jiffies, by thread name; threads of the same name are summed. Empty if the
/// process is gone; a thread that exits while it is read is left out.
pub fn thread_cpu(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, cpu)) = parse_thread_stat(&text) {
            *by_name.entry(comm).or_insert(0) += cpu;
        }
    }
    by_name
}

/// (thread name, utime + stime) of a /proc/PID/task/TID/stat line: the name is
/// between the first `(` and the last `)`, as it may contain both.
pub fn parse_thread_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    Some((comm.to_string(), parse_process_cpu(stat)?))
}

/// The packet threads' CPU over a run, in jiffies, by thread name summed over
/// the nodes: `before[i]` and `after[i]` are [`thread_cpu`] of node i's engine.
/// Threads are matched by (node, name); one missing before the run counts from 0.
pub fn packet_thread_delta(
    before: &[BTreeMap<String, u64>],
    after: &[BTreeMap<String, u64>],
) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    for (node, end) in after.iter().enumerate() {
        for (comm, &cpu) in end.iter().filter(|(c, _)| is_packet_thread(c)) {
            let start = before
                .get(node)
                .and_then(|b| b.get(comm))
                .copied()
                .unwrap_or(0);
            *by_name.entry(comm.clone()).or_insert(0) += cpu.saturating_sub(start);
        }
    }
    by_name
}

/// A `VmXXX:  N kB` line of /proc/PID/status, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, field)
}

pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Runs `argv` in the client pod with stdout to a file (a pipe could fill up
/// while we wait), killed (by PID) if it outlives `limit`. Returns (success, stdout, stderr).
fn run_bounded(setup: &Setup, argv: &[&str], limit: Duration, tag: &str) -> (bool, String) {
    let out_path = setup.work().join(format!("{tag}.out"));
    let err_path = setup.work().join(format!("{tag}.err"));
    let mut cmd = setup.client().ns.cmd(argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(create_file(&out_path)))
        .stderr(Stdio::from(create_file(&err_path)));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    let status = poll_until(limit, Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    let ok = match status {
        Some(s) => s.success(),
        None => {
            // SAFETY: kill(2) on our own unreaped child (`ip netns exec` execs the
            // program, so this PID is the program itself).
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            false
        }
    };
    let read = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let out = read(&out_path);
    let err = read(&err_path);
    let text = if ok {
        out
    } else {
        format!(
            "{}{out}{err}",
            if status.is_none() {
                format!("killed after {limit:?}\n")
            } else {
                String::new()
            }
        )
    };
    (ok, text)
}

fn num(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr).and_then(Value::as_f64)
}

/// Parses iperf3 `-J` output of a TCP run: (Gbit/s, bytes) at the receiver.
pub fn parse_iperf_tcp(json: &str) -> Result<(f64, u64), String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {e}"));
    }
    let bps = num(&v, "/end/sum_received/bits_per_second")
        .ok_or("iperf3 JSON without end.sum_received.bits_per_second")?;
    let bytes = num(&v, "/end/sum_received/bytes").ok_or("iperf3 JSON without bytes")?;
    Ok((bps / 1e9, bytes as u64))
}

/// Parses iperf3 `-J` output of a UDP run: (datagrams received per second, loss %).
/// The receiver's `packets` counts up to the highest sequence number seen, so
/// what arrived is `packets - lost_packets`.
pub fn parse_iperf_udp(json: &str) -> Result<(f64, f64), String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(format!("iperf3: {e}"));
    }
    let r = "/end/sum_received";
    let packets = num(&v, &format!("{r}/packets")).ok_or("iperf3 JSON without packets")?;
    let lost = num(&v, &format!("{r}/lost_packets")).ok_or("iperf3 JSON without lost_packets")?;
    let secs = num(&v, &format!("{r}/seconds")).ok_or("iperf3 JSON without seconds")?;
    let sent = num(&v, "/end/sum_sent/packets").unwrap_or(packets);
    if secs <= 0.0 {
        return Err("iperf3 reported a zero-length run".into());
    }
    let received = (packets - lost).max(0.0);
    let loss = if sent > 0.0 {
        100.0 * (1.0 - received / sent).max(0.0)
    } else {
        100.0
    };
    Ok((received / secs, loss))
}

/// Parses `veil-probe rr-client` output: (p50 µs, p99 µs).
pub fn parse_rr(out: &str) -> Result<(f64, f64), String> {
    let line = out
        .lines()
        .find(|l| l.starts_with("ok rr "))
        .ok_or_else(|| format!("rr-client printed no result: {out}"))?;
    let field = |name: &str| -> Result<f64, String> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("rr-client result without {name}: {line}"))?
            .parse()
            .map_err(|e| format!("rr-client {name}: {e}"))
    };
    Ok((field("p50_us")?, field("p99_us")?))
}

/// Runs `figure` once on `setup` for `secs` seconds (`rr_count` round trips for
/// [`Figure::Rr`]). Panics when the configuration does not work at all: an
/// error, zero throughput, or (for a tunnel) traffic that bypassed the tunnel.
pub fn run(setup: &mut Setup, figure: Figure, secs: u32, rr_count: u32, tag: &str) -> Sample {
    let what = format!("{} {}", setup.kind.label(), figure.label());
    let server_ip = setup.server().ip.to_string();
    let port = IPERF_PORT.to_string();
    let t = secs.to_string();
    let probe = probe_bin();
    let mut argv: Vec<String> = Vec::new();
    match figure {
        Figure::Tcp(streams) => {
            argv.extend(
                [
                    "iperf3",
                    "-c",
                    &server_ip,
                    "-p",
                    &port,
                    "-t",
                    &t,
                    "-J",
                    "--connect-timeout",
                    "5000",
                    "-P",
                ]
                .map(String::from),
            );
            argv.push(streams.to_string());
        }
        Figure::Udp(size) => {
            argv.extend(
                [
                    "iperf3",
                    "-c",
                    &server_ip,
                    "-p",
                    &port,
                    "-t",
                    &t,
                    "-J",
                    "--connect-timeout",
                    "5000",
                    "-u",
                    "-b",
                    "0",
                    "-l",
                ]
                .map(String::from),
            );
            argv.push(size.to_string());
        }
        Figure::Rr => {
            argv.extend(
                [
                    probe.as_str(),
                    "rr-client",
                    &server_ip,
                    &RR_PORT.to_string(),
                    "--size",
                    "64",
                    "--timeout-ms",
                    "60000",
                    "--count",
                ]
                .map(String::from),
            );
            argv.push(rr_count.to_string());
        }
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let pids = setup.engine_pids();
    // Per-thread CPU for Veil: read outside the window of the other CPU figures.
    let threads = |pids: &[u32]| -> Vec<BTreeMap<String, u64>> {
        if setup.kind.is_veil() {
            pids.iter().map(|&p| thread_cpu(p)).collect()
        } else {
            Vec::new()
        }
    };
    let thr0 = threads(&pids);
    let rx0 = setup.tunnel_rx_bytes();
    let sys0 = system_busy();
    let eng0: u64 = pids.iter().map(|&p| process_cpu(p)).sum();
    let limit = Duration::from_secs(u64::from(secs) + 30);
    let (ok, out) = run_bounded(setup, &argv, limit, tag);
    let sys1 = system_busy();
    let eng1: u64 = pids.iter().map(|&p| process_cpu(p)).sum();
    let thr1 = threads(&pids);
    setup.assert_alive();
    assert!(ok, "{what}: the run failed:\n{out}");
    let mut s = Sample {
        system_cpu_s: sys1.saturating_sub(sys0) as f64 / clk_tck(),
        engine_cpu_s: eng1.saturating_sub(eng0) as f64 / clk_tck(),
        packet_threads_s: packet_thread_delta(&thr0, &thr1)
            .into_iter()
            .map(|(comm, j)| (comm, j as f64 / clk_tck()))
            .collect(),
        ..Sample::default()
    };
    match figure {
        Figure::Tcp(_) => {
            let (gbps, bytes) =
                parse_iperf_tcp(&out).unwrap_or_else(|e| panic!("{what}: {e}\n{out}"));
            assert!(
                gbps > 0.0 && bytes > 0,
                "{what}: no data arrived ({gbps} Gbit/s, {bytes} bytes)"
            );
            s.gbps = gbps;
            s.bytes = bytes;
            // WireGuard counts ciphertext, which is larger than the TCP payload:
            // a tunnel that carried the run has counted at least as many bytes.
            if let (Some(a), Some(b)) = (rx0, setup.tunnel_rx_bytes()) {
                assert!(
                    b.saturating_sub(a) >= bytes,
                    "{what}: {bytes} bytes arrived but the tunnel received only {} bytes: \
                     the traffic bypassed the tunnel",
                    b.saturating_sub(a)
                );
            }
        }
        Figure::Udp(_) => {
            let (pps, loss) =
                parse_iperf_udp(&out).unwrap_or_else(|e| panic!("{what}: {e}\n{out}"));
            assert!(pps > 0.0, "{what}: no datagram arrived (loss {loss:.1} %)");
            s.pps = pps;
            s.loss_pct = loss;
        }
        Figure::Rr => {
            let (p50, p99) = parse_rr(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
            s.p50_us = p50;
            s.p99_us = p99;
            s.round_trips = u64::from(rr_count);
        }
    }
    s
}

/// Checks of the parsers above, run at the start of every bench run (a
/// `harness = false` binary compiles no `#[test]`s): a parser that drifted
/// would otherwise print garbage instead of failing.
pub fn self_test() {
    crate::memory::self_test();
    crate::report::self_test();
    {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_system_busy(stat), Some(161));
        let pstat = "4242 (veil agent) (x)) S 1 2 3 4 5 6 7 8 9 10 111 22 0 0 20 0 5";
        assert_eq!(parse_process_cpu(pstat), Some(133));
        let status = "Name:\tveil-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }
    {
        let tstat = "4243 (veil-wg-tun1) S 1 2 3 4 5 6 7 8 9 10 70 5 0 0 20 0 5";
        assert_eq!(parse_thread_stat(tstat), Some(("veil-wg-tun1".into(), 75)));
        let odd = "4244 (a (b) c)) R 1 2 3 4 5 6 7 8 9 10 1 2 0 0 20 0 5";
        assert_eq!(parse_thread_stat(odd), Some(("a (b) c)".into(), 3)));
        assert_eq!(parse_thread_stat("4245 (x"), None);
        for (comm, packet) in [
            ("veil-wg-tun", true),
            ("veil-wg-udp", true),
            ("veil-wg-tun1", true),
            ("veil-wg-udp12", true),
            ("veil-wg-timers", false),
            ("veil-wg-uapi", false),
            ("veil-wg-tunx", false),
            ("tokio-runtime-w", false),
        ] {
            assert_eq!(is_packet_thread(comm), packet, "{comm}");
        }
        let snap = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|&(c, j)| (c.to_string(), j)).collect()
        };
        let before = [
            snap(&[
                ("veil-wg-tun", 100),
                ("veil-wg-udp", 50),
                ("veil-wg-timers", 1),
            ]),
            snap(&[("veil-wg-tun", 10), ("veil-wg-udp", 500)]),
        ];
        let after = [
            // Node 0: veil-wg-tun1 appeared during the run (counts from 0).
            snap(&[
                ("veil-wg-tun", 130),
                ("veil-wg-tun1", 7),
                ("veil-wg-udp", 50),
                ("veil-wg-timers", 9),
            ]),
            snap(&[("veil-wg-tun", 15), ("veil-wg-udp", 560)]),
        ];
        let d = packet_thread_delta(&before, &after);
        let d: Vec<(&str, u64)> = d.iter().map(|(c, &j)| (c.as_str(), j)).collect();
        assert_eq!(
            d,
            [
                ("veil-wg-tun", 35),
                ("veil-wg-tun1", 7),
                ("veil-wg-udp", 60)
            ]
        );
        assert!(packet_thread_delta(&[], &[]).is_empty());
    }
    {
        let udp = r#"{"end":{"sum_sent":{"packets":1000},"sum_received":{"seconds":2.0,"packets":1000,"lost_packets":100}}}"#;
        let (pps, loss) = parse_iperf_udp(udp).unwrap();
        assert!((pps - 450.0).abs() < 1e-9 && (loss - 10.0).abs() < 1e-9);
        let tcp = r#"{"end":{"sum_received":{"bits_per_second":2.5e9,"bytes":1000}}}"#;
        assert_eq!(parse_iperf_tcp(tcp).unwrap(), (2.5, 1000));
        assert!(parse_iperf_tcp(r#"{"error":"unable to connect"}"#).is_err());
        let rr = "ok rr count=10 size=64 p50_us=41.5 p99_us=80.0 mean_us=45.0 max_us=90.0 secs=0.1";
        assert_eq!(parse_rr(rr).unwrap(), (41.5, 80.0));
        assert!(parse_rr("veil-probe: connect: refused").is_err());
    }
}
