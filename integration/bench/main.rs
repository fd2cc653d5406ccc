//! The data plane benchmark (issue 6): plain routing, Veil, stock `wireguard-go`
//! and (when installed) `gotatun`, pod to pod across two node namespaces, in one
//! run, interleaved round-robin; plus the agent's memory with 1,000 pods and
//! 100 nodes in its state.
//!
//! ```text
//! bash integration/bench/run.sh            # release build, full run, writes RESULTS.md
//! cargo test --test bench                  # smoke: every configuration, ~1 s per figure
//! cargo test --release --test bench -- --full [--out FILE] [--note TEXT] [--no-memory | --memory-only]
//!     [--only tcp1,tcp4,udp64,udp1400,rr] [--configs plain,Veil,Veil-B,wireguard-go,gotatun]
//!     [--rounds N]
//! ```
//!
//! `VEIL_AGENT_BIN_B=PATH` adds a `Veil-B` configuration running that agent
//! binary: an A/B comparison of two builds, interleaved in one run.
//!
//! Targets are printed, not asserted; but a configuration that does not work at
//! all (an error, zero throughput, a tunnel the traffic bypassed) fails the run.
//! `harness = false`: the table is the point, so output is not captured. All
//! namespaces, processes and files are removed on drop: on success, on failure
//! and on Ctrl-C (a flag turned into an unwind at the next checkpoint).

// Without libtest the harness's own `#[test]` functions are not compiled, so
// their `use super::*` would be unused here.
#[allow(unused_imports)]
#[path = "../harness/mod.rs"]
mod harness;

mod engines;
mod measure;
mod memory;
mod report;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use engines::{find_gotatun, Kind, Setup};
use measure::{status_kib, Figure};
use report::{ConfigResults, Machine};

const NAME: &str = "bench";

/// How much to measure.
#[derive(Debug, Clone)]
struct Plan {
    full: bool,
    secs: u32,
    rounds: u32,
    rr_count: u32,
    /// (nodes, pods per node) of the memory measurement; `None` skips it.
    memory: Option<(u8, u8)>,
    /// Only the memory measurement (no throughput configurations).
    memory_only: bool,
    out: Option<PathBuf>,
    note: Option<String>,
    /// `--only`: the figures to measure (default: all).
    figures: Vec<Figure>,
    /// `--configs`: the configurations to compare (default: plain, Veil,
    /// wireguard-go, gotatun when installed, Veil-B when VEIL_AGENT_BIN_B is set).
    configs: Option<Vec<Kind>>,
}

const ALL_FIGURES: [Figure; 5] = [
    Figure::Tcp(1),
    Figure::Tcp(4),
    Figure::Udp(64),
    Figure::Udp(1400),
    Figure::Rr,
];

/// Parses a `--only` entry: `tcp1`, `tcp4`, `udp64`, `udp1400`, `rr`.
fn parse_figure(s: &str) -> Option<Figure> {
    match s.to_ascii_lowercase().as_str() {
        "tcp1" => Some(Figure::Tcp(1)),
        "tcp4" => Some(Figure::Tcp(4)),
        "udp64" => Some(Figure::Udp(64)),
        "udp1400" => Some(Figure::Udp(1400)),
        "rr" => Some(Figure::Rr),
        _ => None,
    }
}

impl Plan {
    fn from_args(args: &[String]) -> Result<Self, String> {
        let full = args.iter().any(|a| a == "--full");
        let value = |flag: &str| -> Result<Option<String>, String> {
            match args.iter().position(|a| a == flag) {
                None => Ok(None),
                Some(i) => args
                    .get(i + 1)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        let mut plan = if full {
            Plan {
                full,
                secs: 5,
                rounds: 3,
                rr_count: 10_000,
                memory: Some((100, 10)),
                memory_only: false,
                out: Some(
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("integration/bench/RESULTS.md"),
                ),
                note: None,
                figures: ALL_FIGURES.to_vec(),
                configs: None,
            }
        } else {
            // Smoke: every code path, cheaply; writes no RESULTS.md.
            Plan {
                full,
                secs: 1,
                rounds: 1,
                rr_count: 1_000,
                memory: Some((4, 2)),
                memory_only: false,
                out: None,
                note: None,
                figures: ALL_FIGURES.to_vec(),
                configs: None,
            }
        };
        if let Some(o) = value("--out")? {
            plan.out = Some(PathBuf::from(o));
        }
        plan.note = value("--note")?;
        if args.iter().any(|a| a == "--no-memory") {
            plan.memory = None;
        }
        if let Some(n) = value("--rounds")? {
            plan.rounds = n
                .parse()
                .ok()
                .filter(|&r| r > 0)
                .ok_or_else(|| format!("--rounds: {n:?} is not a positive number"))?;
        }
        if let Some(list) = value("--only")? {
            plan.figures = list
                .split(',')
                .map(|f| {
                    parse_figure(f).ok_or_else(|| {
                        format!("--only: unknown figure {f:?} (tcp1, tcp4, udp64, udp1400, rr)")
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(list) = value("--configs")? {
            plan.configs = Some(
                list.split(',')
                    .map(|k| {
                        Kind::parse(k).ok_or_else(|| {
                            format!(
                                "--configs: unknown configuration {k:?} \
                                 (plain, Veil, Veil-B, wireguard-go, gotatun)"
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            );
        }
        plan.memory_only = args.iter().any(|a| a == "--memory-only");
        if plan.memory_only && plan.memory.is_none() {
            return Err("--memory-only and --no-memory leave nothing to measure".into());
        }
        Ok(plan)
    }

    fn describe(&self) -> String {
        format!(
            "{} x {} s per figure and configuration (median), {} round trips per RR run{}",
            self.rounds,
            self.secs,
            self.rr_count,
            if self.full { "" } else { " (SMOKE run)" }
        )
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_text(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Which build the engines and probes come from: the numbers mean little unless
/// it is a release build (run.sh passes VEIL_AGENT_BIN / VEIL_PROBE_BIN).
fn build_text() -> String {
    let agent = harness::agent::agent_bin();
    let probe = engines::probe_bin();
    let release = |p: &str| p.contains("/release/");
    let driver = if cfg!(debug_assertions) {
        "test profile"
    } else {
        "release"
    };
    let kind = if release(&agent) && release(&probe) {
        "release"
    } else {
        "NOT release (not representative)"
    };
    format!("{kind}: agent {agent}, probe {probe} (bench driver: {driver})")
}

fn machine(plan: &Plan, load_before: String) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let repo = env!("CARGO_MANIFEST_DIR");
    let commit =
        command_text(Command::new("git").args(["-C", repo, "rev-parse", "--short", "HEAD"]))
            .unwrap_or_else(|| "unknown".into());
    let dirty = command_text(Command::new("git").args([
        "-C",
        repo,
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_some_and(|s| !s.is_empty());
    let mut plan_text = plan.describe();
    if let Some(n) = &plan.note {
        plan_text = format!("{plan_text}; {n}");
    }
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        date: command_text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .unwrap_or_else(|| "unknown".into()),
        commit: if dirty {
            format!("{commit} (with uncommitted changes)")
        } else {
            commit
        },
        load_before,
        load_after: loadavg(),
        profile: build_text(),
        plan: plan_text,
    }
}

fn run_bench(plan: &Plan) {
    measure::self_test();
    let load_before = loadavg();
    let started = Instant::now();
    let gotatun = find_gotatun();
    let gotatun_note = match &gotatun {
        Some(p) => format!("installed: {}", p.display()),
        None => "not installed (`cargo install gotatun-cli --locked` adds it)".into(),
    };
    println!("bench: {}", plan.describe());
    println!("bench: gotatun {gotatun_note}");

    let mut kinds = vec![Kind::Plain, Kind::Veil, Kind::WireguardGo];
    if gotatun.is_some() {
        kinds.push(Kind::Gotatun);
    }
    if engines::agent_b_bin().is_some() {
        kinds.push(Kind::VeilB);
    }
    if let Some(c) = &plan.configs {
        kinds = c.clone();
        if kinds.contains(&Kind::Gotatun) && gotatun.is_none() {
            panic!("--configs asks for gotatun, which is not installed");
        }
    }
    if plan.memory_only {
        kinds.clear();
    }
    let mut setups = Vec::new();
    for &k in &kinds {
        harness::interrupt::checkpoint();
        let t = Instant::now();
        setups.push(Setup::new(k, gotatun.as_deref()));
        println!(
            "bench: {} up and reachable in {:.1} s",
            k.label(),
            t.elapsed().as_secs_f64()
        );
    }

    let figures = plan.figures.clone();
    let mut results: Vec<ConfigResults> = kinds.iter().map(|_| ConfigResults::default()).collect();
    let rounds = if kinds.is_empty() { 0 } else { plan.rounds };
    for round in 1..=rounds {
        for &f in &figures {
            for (i, setup) in setups.iter_mut().enumerate() {
                harness::interrupt::checkpoint();
                let tag = format!("r{round}-{:?}", f).replace(['(', ')'], "");
                let s = measure::run(setup, f, plan.secs, plan.rr_count, &tag);
                let value = match f {
                    Figure::Tcp(_) => format!("{:.2} Gbit/s", s.gbps),
                    Figure::Udp(_) => format!("{:.1} kpps, {:.1} % loss", s.pps / 1e3, s.loss_pct),
                    Figure::Rr => format!("p50 {:.1} µs, p99 {:.1} µs", s.p50_us, s.p99_us),
                };
                println!(
                    "bench: round {round}/{} {:<13} {:<22} {value}",
                    plan.rounds,
                    setup.kind.label(),
                    f.label()
                );
                results[i].samples.push((f, s));
            }
        }
    }
    for (setup, r) in setups.iter().zip(&mut results) {
        r.engine_hwm_kib = setup
            .engine_pids()
            .iter()
            .filter_map(|&p| status_kib(p, "VmHWM"))
            .max();
    }
    drop(setups);

    let mem = plan.memory.map(|(nodes, pods)| {
        harness::interrupt::checkpoint();
        println!("bench: memory: agent with {nodes} nodes x {pods} pods in its state");
        let m = memory::measure(nodes, pods);
        println!(
            "bench: memory: {} peers after {:.1} s, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            m.peers,
            m.converge.as_secs_f64(),
            m.rss_kib as f64 / 1024.0,
            m.hwm_kib as f64 / 1024.0
        );
        m
    });

    let machine = machine(plan, load_before);
    let md = report::render(&machine, &kinds, &results, &gotatun_note, mem.as_ref());
    println!("\n{md}");
    println!(
        "bench: finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(out) = &plan.out {
        std::fs::write(out, &md).unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
        println!("bench: wrote {}", out.display());
    }
}

/// Whether the libtest-style arguments a runner may pass (`cargo test -- ARGS`)
/// select this bench: name filters, `--skip`, `--ignored`; other options are accepted.
fn selected(args: &[String]) -> bool {
    let exact = args.iter().any(|a| a == "--exact");
    let matches = |filter: &str| {
        if exact {
            filter == NAME
        } else {
            NAME.contains(filter)
        }
    };
    let mut filters = Vec::new();
    let mut skips: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ignored" => return false,
            "--skip" => skips.extend(it.next().map(String::as_str)),
            // Options whose value is a separate argument (libtest's and ours).
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" | "--out" | "--note"
            | "--only" | "--configs" | "--rounds" => {
                it.next();
            }
            _ if a.starts_with("--skip=") => skips.push(&a["--skip=".len()..]),
            _ if a.starts_with('-') => {}
            _ => filters.push(a.as_str()),
        }
    }
    (filters.is_empty() || filters.iter().any(|f| matches(f))) && !skips.iter().any(|s| matches(s))
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
    let plan = match Plan::from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench: needs root (network namespaces, TUN, BPF)");
        println!("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        return ExitCode::FAILURE;
    }
    // Agents log at info: debug logging would cost the engine time during the runs.
    // Set before any thread exists (set_var is not thread-safe).
    if std::env::var_os("RUST_LOG").is_none() {
        // Except the agent's memory lines: a few at start, none during runs;
        // the memory report's breakdown is built from them.
        std::env::set_var("RUST_LOG", "info,veil::agent::memory=debug");
    }
    harness::interrupt::install(NAME);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| run_bench(&plan));
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!(
                "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
            ExitCode::SUCCESS
        }
        Err(_) => {
            println!("\nbench: FAILED (see the message above); everything was cleaned up");
            println!(
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
            ExitCode::FAILURE
        }
    }
}
