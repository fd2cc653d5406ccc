//! The results table (stdout and Markdown), with the ratios and the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::engines::Kind;
use crate::measure::{Figure, Sample};
use crate::memory::MemoryResult;

/// Median of 3 (or of however many samples a figure has).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Everything measured for one configuration.
#[derive(Debug, Default)]
pub struct ConfigResults {
    pub samples: Vec<(Figure, Sample)>,
    /// Peak RSS (VmHWM) of the engine process, the largest of the two nodes, KiB.
    pub engine_hwm_kib: Option<u64>,
}

impl ConfigResults {
    fn of(&self, f: Figure) -> impl Iterator<Item = &Sample> {
        self.samples
            .iter()
            .filter(move |(g, _)| *g == f)
            .map(|(_, s)| s)
    }

    fn med(&self, f: Figure, field: impl Fn(&Sample) -> f64) -> f64 {
        median(self.of(f).map(field).collect())
    }

    /// CPU seconds per GB received over all TCP runs: (system, engine).
    fn cpu_per_gb(&self) -> (f64, f64) {
        self.cpu_per(|f| matches!(f, Figure::Tcp(_)), |s| s.bytes as f64 / 1e9)
    }

    /// CPU µs per round trip over all request/response runs: (system, engine).
    fn cpu_per_round_trip(&self) -> (f64, f64) {
        let (sys, eng) = self.cpu_per(|f| f == Figure::Rr, |s| s.round_trips as f64);
        (sys * 1e6, eng * 1e6)
    }

    /// CPU seconds of each engine packet thread over the TCP 4-stream runs, by
    /// thread name (both nodes); `None` without such a run.
    fn packet_threads(&self) -> Option<BTreeMap<String, f64>> {
        let mut runs = self.of(Figure::Tcp(4)).peekable();
        runs.peek()?;
        let mut by_name = BTreeMap::new();
        for s in runs {
            for (comm, secs) in &s.packet_threads_s {
                *by_name.entry(comm.clone()).or_insert(0.0) += secs;
            }
        }
        Some(by_name)
    }

    /// CPU seconds per unit (`units` of a sample) over the runs of the
    /// figures `pick` selects: (system, engine).
    fn cpu_per(&self, pick: impl Fn(Figure) -> bool, units: impl Fn(&Sample) -> f64) -> (f64, f64) {
        let (mut sys, mut eng, mut n) = (0.0, 0.0, 0.0);
        for (_, s) in self.samples.iter().filter(|(f, _)| pick(*f)) {
            sys += s.system_cpu_s;
            eng += s.engine_cpu_s;
            n += units(s);
        }
        if n > 0.0 {
            (sys / n, eng / n)
        } else {
            (f64::NAN, f64::NAN)
        }
    }
}

/// One row: a figure's value per configuration, and how to print it.
struct Row {
    name: String,
    values: Vec<f64>,
    decimals: usize,
    /// Extra text after the value (UDP loss).
    notes: Vec<String>,
}

pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
    pub commit: String,
    pub load_before: String,
    pub load_after: String,
    pub profile: String,
    pub plan: String,
}

fn fmt_val(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "n/a".into()
    } else {
        format!("{v:.decimals$}")
    }
}

/// Where a packet thread goes in the list: by kind (`tun`, `udp`), then by
/// queue (queue 0 has no number), so `tun2` comes before `tun10`.
fn thread_order(name: &str) -> (&str, Option<u64>) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (kind, queue) = name.split_at(name.len() - digits);
    (kind, queue.parse().ok())
}

/// The packet-thread cell of one configuration: `tun 1.92 · tun1 1.85 · udp 2.10`.
fn packet_thread_cell(kind: Kind, r: &ConfigResults) -> String {
    if !kind.is_veil() {
        return "n/a".into();
    }
    let Some(by_name) = r.packet_threads() else {
        return "not measured".into();
    };
    let mut threads: Vec<(&str, f64)> = by_name
        .iter()
        .map(|(comm, &secs)| (comm.strip_prefix("veil-wg-").unwrap_or(comm), secs))
        .collect();
    if threads.is_empty() {
        return "n/a (no veil-wg-tun*/udp* threads found)".into();
    }
    threads.sort_by(|a, b| thread_order(a.0).cmp(&thread_order(b.0)));
    threads
        .iter()
        .map(|(name, secs)| format!("{name} {secs:.2}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

/// Builds the report as Markdown (also readable as plain text on stdout).
pub fn render(
    machine: &Machine,
    kinds: &[Kind],
    results: &[ConfigResults],
    gotatun_note: &str,
    memory: Option<&MemoryResult>,
) -> String {
    let mut rows = Vec::new();
    let per = |f: Figure, field: fn(&Sample) -> f64| -> Vec<f64> {
        results.iter().map(|r| r.med(f, field)).collect()
    };
    for (f, name) in [
        (Figure::Tcp(1), "TCP 1 stream (Gbit/s)"),
        (Figure::Tcp(4), "TCP 4 streams (Gbit/s)"),
    ] {
        rows.push(Row {
            name: name.into(),
            values: per(f, |s| s.gbps),
            decimals: 2,
            notes: Vec::new(),
        });
    }
    for size in [64u16, 1400] {
        let f = Figure::Udp(size);
        rows.push(Row {
            name: format!("UDP {size} B (kpps received)"),
            values: per(f, |s| s.pps / 1e3),
            decimals: 1,
            notes: per(f, |s| s.loss_pct)
                .iter()
                .map(|l| format!(" ({} % loss)", fmt_val(*l, 1)))
                .collect(),
        });
    }
    rows.push(Row {
        name: "RR 64 B p50 (µs)".into(),
        values: per(Figure::Rr, |s| s.p50_us),
        decimals: 1,
        notes: Vec::new(),
    });
    rows.push(Row {
        name: "RR 64 B p99 (µs)".into(),
        values: per(Figure::Rr, |s| s.p99_us),
        decimals: 1,
        notes: Vec::new(),
    });
    // Engine CPU: none for plain routing (no engine process).
    let engine_only = |v: Vec<f64>| -> Vec<f64> {
        v.into_iter()
            .zip(kinds)
            .map(|(x, k)| if *k == Kind::Plain { f64::NAN } else { x })
            .collect()
    };
    rows.push(Row {
        name: "CPU s/GB, system (TCP runs)".into(),
        values: results.iter().map(|r| r.cpu_per_gb().0).collect(),
        decimals: 2,
        notes: Vec::new(),
    });
    rows.push(Row {
        name: "CPU s/GB, engine process".into(),
        values: engine_only(results.iter().map(|r| r.cpu_per_gb().1).collect()),
        decimals: 2,
        notes: Vec::new(),
    });
    rows.push(Row {
        name: "CPU µs per round trip, system (RR runs)".into(),
        values: results.iter().map(|r| r.cpu_per_round_trip().0).collect(),
        decimals: 0,
        notes: Vec::new(),
    });
    rows.push(Row {
        name: "CPU µs per round trip, engine process".into(),
        values: engine_only(results.iter().map(|r| r.cpu_per_round_trip().1).collect()),
        decimals: 0,
        notes: Vec::new(),
    });
    rows.push(Row {
        name: "engine peak RSS (MiB)".into(),
        values: results
            .iter()
            .map(|r| r.engine_hwm_kib.map_or(f64::NAN, |k| k as f64 / 1024.0))
            .collect(),
        decimals: 1,
        notes: Vec::new(),
    });

    let idx = |k: Kind| kinds.iter().position(|x| *x == k);
    let veil = idx(Kind::Veil);
    let mut ratio_cols: Vec<(String, usize)> = Vec::new();
    for (k, name) in [
        (Kind::WireguardGo, "Veil/wireguard-go"),
        (Kind::Plain, "Veil/plain"),
        (Kind::Gotatun, "Veil/gotatun"),
        (Kind::VeilB, "Veil/Veil-B"),
    ] {
        if let Some(i) = idx(k) {
            ratio_cols.push((name.into(), i));
        }
    }

    let mut md = String::new();
    let _ = writeln!(md, "# Veil data plane benchmark\n");
    let _ = writeln!(
        md,
        "Produced by `bash integration/bench/run.sh` (see README \"Benchmark\"). \
         Two node namespaces joined by an underlay bridge, one pod per node, pod MTU 1500, \
         tunnel MTU 1420; pod to pod across the nodes. Each figure is the median of the runs \
         below, interleaved round-robin across the configurations.\n"
    );
    let _ = writeln!(md, "| machine | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} |", machine.cpu);
    let _ = writeln!(md, "| cores | {} |", machine.cores);
    let _ = writeln!(md, "| kernel | {} |", machine.kernel);
    let _ = writeln!(md, "| date | {} |", machine.date);
    let _ = writeln!(md, "| git commit | {} |", machine.commit);
    let _ = writeln!(md, "| build | {} |", machine.profile);
    let _ = writeln!(md, "| runs | {} |", machine.plan);
    let _ = writeln!(
        md,
        "| load average (1/5/15 min) before, after | {} / {} |",
        machine.load_before, machine.load_after
    );
    let _ = writeln!(md, "| gotatun | {gotatun_note} |\n");

    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for k in kinds {
        let _ = write!(header, " {} |", k.label());
        rule.push_str("---:|");
    }
    for (name, _) in &ratio_cols {
        let _ = write!(header, " {name} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for r in &rows {
        let mut line = format!("| {} |", r.name);
        for (i, v) in r.values.iter().enumerate() {
            let note = r.notes.get(i).map(String::as_str).unwrap_or("");
            let _ = write!(line, " {}{note} |", fmt_val(*v, r.decimals));
        }
        for (_, i) in &ratio_cols {
            let text = match veil {
                Some(vi) => ratio(r.values[vi], r.values[*i]),
                None => "n/a".into(),
            };
            let _ = write!(line, " {text} |");
        }
        let _ = writeln!(md, "{line}");
    }

    let _ = writeln!(md, "\n## Engine packet threads\n");
    let _ = writeln!(
        md,
        "| configuration | CPU s per engine packet thread (TCP 4 streams, both nodes) |\n|---|---|"
    );
    for (k, r) in kinds.iter().zip(results) {
        let _ = writeln!(md, "| {} | {} |", k.label(), packet_thread_cell(*k, r));
    }

    let _ = writeln!(md, "\n## Targets (issue 6; printed, not asserted)\n");
    let get = |k: Kind, f: Figure, field: fn(&Sample) -> f64| {
        idx(k).map_or(f64::NAN, |i| results[i].med(f, field))
    };
    let v1 = get(Kind::Veil, Figure::Tcp(1), |s| s.gbps);
    let g1 = get(Kind::WireguardGo, Figure::Tcp(1), |s| s.gbps);
    let t1 = get(Kind::Gotatun, Figure::Tcp(1), |s| s.gbps);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        md,
        "- TCP single stream, Veil >= 4x wireguard-go: {} ({} vs {} Gbit/s, target 4.00x) — {}",
        ratio(v1, g1),
        fmt_val(v1, 2),
        fmt_val(g1, 2),
        verdict(v1 >= 4.0 * g1)
    );
    if t1.is_nan() {
        let _ = writeln!(
            md,
            "- TCP single stream, Veil ahead of gotatun: not measured ({gotatun_note})"
        );
    } else {
        let _ = writeln!(
            md,
            "- TCP single stream, Veil ahead of gotatun: {} vs {} Gbit/s — {}",
            fmt_val(v1, 2),
            fmt_val(t1, 2),
            verdict(v1 > t1)
        );
    }
    let vp99 = get(Kind::Veil, Figure::Rr, |s| s.p99_us);
    let pp99 = get(Kind::Plain, Figure::Rr, |s| s.p99_us);
    let added = vp99 - pp99;
    let _ = writeln!(
        md,
        "- request/response p99 added over plain <= 100 µs: {} µs ({} vs {} µs) — {}",
        fmt_val(added, 1),
        fmt_val(vp99, 1),
        fmt_val(pp99, 1),
        verdict(added <= 100.0)
    );
    match memory {
        Some(m) => {
            let rss = m.rss_kib as f64 / 1024.0;
            let hwm = m.hwm_kib as f64 / 1024.0;
            let _ = writeln!(
                md,
                "- agent memory with {} pods and {} nodes ({} peers in `wg show`, converged in {:.1} s, no traffic), \
                 target <= 40 MiB: VmRSS {rss:.1} MiB — {}; peak (VmHWM, since start) {hwm:.1} MiB — {}",
                m.pods,
                m.nodes,
                m.peers,
                m.converge.as_secs_f64(),
                verdict(rss <= 40.0),
                verdict(hwm <= 40.0)
            );
            if let Some(line) = m.breakdown() {
                let _ = writeln!(md, "- {line}");
            }
        }
        None => {
            let _ = writeln!(md, "- agent memory: not measured in this run");
        }
    }
    let _ = writeln!(md, "\n## Every run (in run order)\n");
    let _ = writeln!(md, "| figure | configuration | runs |\n|---|---|---|");
    for f in [
        Figure::Tcp(1),
        Figure::Tcp(4),
        Figure::Udp(64),
        Figure::Udp(1400),
        Figure::Rr,
    ] {
        for (k, r) in kinds.iter().zip(results) {
            let runs: Vec<String> = r
                .of(f)
                .map(|s| match f {
                    Figure::Tcp(_) => format!("{:.2} Gbit/s", s.gbps),
                    Figure::Udp(_) => format!("{:.1} kpps ({:.1} % loss)", s.pps / 1e3, s.loss_pct),
                    Figure::Rr => format!("p50 {:.1} / p99 {:.1} µs", s.p50_us, s.p99_us),
                })
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                f.label(),
                k.label(),
                runs.join(", ")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nUDP: iperf3 `-u -b 0 -l SIZE` (unlimited send rate), datagrams the receiver got per \
         second, loss = 1 - received/sent; a 1400-byte payload is a 1428-byte IP packet, above the \
         1420-byte tunnel MTU, so every tunnel sends it as two underlay frames (wireguard-go and \
         gotatun: the pod fragments after the node's ICMP fragmentation-needed; Veil: the \
         encrypted datagram is fragmented, see ARCHITECTURE.md \"MTU without black holes\"). RR: `veil-probe rr-client`, sequential 64-byte \
         round trips on one TCP connection, Nagle off. CPU s/GB: busy time of all CPUs \
         (/proc/stat, so it includes iperf3 and anything else running) and utime+stime of \
         both nodes' engine processes (/proc/PID/stat), summed over the TCP runs, per GB \
         received; CPU µs per round trip: the same over the RR runs, per round trip (Veil's \
         packet threads poll briefly before they sleep, which is most of its engine CPU \
         there: ARCHITECTURE.md \"Idle polling\"). Engine peak RSS: the larger VmHWM of \
         the two engines after all runs. Engine packet threads: utime+stime of each \
         `veil-wg-tun*` (tun->udp) and `veil-wg-udp*` (udp->tun) thread of both nodes' \
         engines (/proc/PID/task/TID/stat), summed by name over the TCP 4-stream runs \
         (`tun` and `udp` are queue 0, `tun1` and `udp1` queue 1, ...); with several \
         queues the tun->udp work spreads over the queues' threads by flow, while one \
         peer's inbound datagrams stay on one udp->tun thread, because SO_REUSEPORT \
         picks the socket by a hash of the peer's 4-tuple."
    );
    md
}

/// Checks of the packet-thread cell (run by [`crate::measure::self_test`]).
pub fn self_test() {
    assert_eq!(thread_order("tun"), ("tun", None));
    assert_eq!(thread_order("udp12"), ("udp", Some(12)));
    let sample = |threads: &[(&str, f64)]| Sample {
        packet_threads_s: threads.iter().map(|&(c, s)| (c.to_string(), s)).collect(),
        ..Sample::default()
    };
    let r = ConfigResults {
        samples: vec![
            (
                Figure::Tcp(4),
                sample(&[
                    ("veil-wg-udp", 1.0),
                    ("veil-wg-tun10", 0.5),
                    ("veil-wg-tun", 1.5),
                    ("veil-wg-tun2", 0.25),
                ]),
            ),
            (
                Figure::Tcp(4),
                sample(&[("veil-wg-udp", 1.1), ("veil-wg-tun2", 0.004)]),
            ),
            // Not a TCP 4-stream run: not counted.
            (Figure::Tcp(1), sample(&[("veil-wg-tun", 9.0)])),
        ],
        engine_hwm_kib: None,
    };
    assert_eq!(
        packet_thread_cell(Kind::Veil, &r),
        "tun 1.50 · tun2 0.25 · tun10 0.50 · udp 2.10"
    );
    assert_eq!(packet_thread_cell(Kind::WireguardGo, &r), "n/a");
    assert_eq!(packet_thread_cell(Kind::Plain, &r), "n/a");
    assert_eq!(
        packet_thread_cell(Kind::VeilB, &ConfigResults::default()),
        "not measured"
    );
}
