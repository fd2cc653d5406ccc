//! `veil-agent`: the per-node Veil agent. Reads the cluster from a directory
//! (`--cluster-dir`) or from the Kubernetes API (otherwise).
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use veil::agent::{self, DEFAULT_MTU, DEFAULT_PORT, DEFAULT_TUN};
use veil::cluster::source::SourceConfig;
use veil::metrics::ErrorCount;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Veil node agent: WireGuard between nodes, eBPF steering, no proxy"
)]
struct Args {
    /// This node's name (`metadata.name` of its Node object).
    #[arg(long, env = "VEIL_NODE")]
    node: String,
    /// Directory of Kubernetes objects as YAML (the file cluster source).
    /// Without it the agent reads the Kubernetes API.
    #[arg(long, env = "VEIL_CLUSTER_DIR")]
    cluster_dir: Option<PathBuf>,
    /// Cluster source: `file` (needs --cluster-dir) or `kube`. Default: `file`
    /// when --cluster-dir is given, otherwise `kube`.
    #[arg(long, env = "VEIL_SOURCE", value_enum)]
    source: Option<SourceKind>,
    /// Kubeconfig for the kube source. Default: the in-cluster service
    /// account, then $KUBECONFIG or ~/.kube/config (as kubectl).
    #[arg(long, env = "VEIL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Listen address of /metrics (OpenMetrics) and /healthz; `none` disables.
    #[arg(long, env = "VEIL_METRICS_ADDR", default_value = veil::metrics::DEFAULT_ADDR)]
    metrics_addr: String,
    /// Where this node's private keys live (created 0700, files 0600).
    #[arg(long, env = "VEIL_KEY_DIR", default_value = "/var/lib/veil/keys")]
    key_dir: PathBuf,
    /// WireGuard UAPI socket (`wg show` reads /var/run/wireguard/<name>.sock).
    #[arg(
        long,
        env = "VEIL_UAPI_SOCKET",
        default_value = "/var/run/wireguard/veil0.sock"
    )]
    uapi_socket: PathBuf,
    /// Do not serve the UAPI socket.
    #[arg(long, env = "VEIL_NO_UAPI")]
    no_uapi: bool,
    /// Name of the TUN device.
    #[arg(long, env = "VEIL_TUN_NAME", default_value = DEFAULT_TUN)]
    tun_name: String,
    /// WireGuard UDP port.
    #[arg(long, env = "VEIL_LISTEN_PORT", default_value_t = DEFAULT_PORT)]
    listen_port: u16,
    /// MTU of the TUN device (underlay MTU minus 80).
    #[arg(long, env = "VEIL_MTU", default_value_t = DEFAULT_MTU)]
    mtu: u16,
    /// Longest time, in µs, an engine packet thread polls for the next packet
    /// before it sleeps; the window adapts and costs nothing on an idle link
    /// or a busy CPU (see ARCHITECTURE.md). 0 turns polling off.
    #[arg(long, env = "VEIL_IDLE_POLL_US", default_value_t = veil::wireguard::DEFAULT_IDLE_POLL_US,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    idle_poll_us: u64,
    /// Engine packet queues: each is a TUN queue, a UDP socket and a pair of
    /// packet threads, so flows are encrypted and decrypted on several cores
    /// (each flow stays on one queue, in order; see ARCHITECTURE.md). 0: one
    /// per CPU the agent may use, at most 8.
    #[arg(long, env = "VEIL_QUEUES", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=veil::wireguard::MAX_QUEUES as i64))]
    queues: u16,
    /// Full resync period in milliseconds, on top of change notifications.
    #[arg(long, env = "VEIL_RESYNC_MS", default_value_t = 2000)]
    resync_ms: u64,
    /// The cluster authority's public key file (`veilctl ca init` writes
    /// `authority.pub`). Required: it is the trust root for every peer's key,
    /// and is never read from the cluster store.
    #[arg(long, env = "VEIL_AUTHORITY_PUBLIC_KEY")]
    authority_public_key: PathBuf,
    /// DEMO AND TESTS ONLY: the authority's private key (a `veilctl ca init`
    /// directory or its `authority.key`); the agent then certifies its own
    /// identity, so anyone who can start an agent can join the cluster.
    /// File source only: refused in Kubernetes mode.
    #[arg(long, env = "VEIL_AUTO_APPROVE_WITH")]
    auto_approve_with: Option<PathBuf>,
    /// TESTS ONLY (hidden): the shortest `spec.keyRotation.interval` honoured,
    /// in seconds; default 600 (10 min). Lets an integration test watch
    /// automatic rotation within seconds.
    #[arg(long, hide = true, env = "VEIL_TEST_MIN_KEY_ROTATION_SECS")]
    test_min_key_rotation_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    File,
    Kube,
}

/// Which source the flags select, or why they contradict each other.
fn source_config(args: &Args) -> Result<SourceConfig, String> {
    let kind = args.source.unwrap_or(if args.cluster_dir.is_some() {
        SourceKind::File
    } else {
        SourceKind::Kube
    });
    match (kind, &args.cluster_dir, &args.kubeconfig) {
        (SourceKind::File, Some(dir), None) => Ok(SourceConfig::File { dir: dir.clone() }),
        (SourceKind::File, None, _) => Err("--source file needs --cluster-dir".into()),
        (SourceKind::File, Some(_), Some(_)) => {
            Err("--kubeconfig is for the kube source; --cluster-dir selects the file source".into())
        }
        (SourceKind::Kube, Some(_), _) => {
            Err("--source kube reads the Kubernetes API; drop --cluster-dir".into())
        }
        (SourceKind::Kube, None, kubeconfig) => Ok(SourceConfig::Kube {
            kubeconfig: kubeconfig.clone(),
        }),
    }
}

/// Logs go to stderr (filtered by RUST_LOG); the error counter sees every
/// ERROR event whatever the filter.
fn init_logging(errors: ErrorCount) {
    use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let out = fmt::layer().with_writer(std::io::stderr);
    let out = if json {
        out.json().boxed()
    } else {
        out.boxed()
    };
    tracing_subscriber::registry()
        .with(out.with_filter(filter))
        .with(errors)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let error_count = ErrorCount::default();
    init_logging(error_count.clone());
    let source = match source_config(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("veil-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics_addr = match veil::metrics::parse_addr(&args.metrics_addr) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("veil-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = agent::Config {
        node: args.node,
        source,
        metrics_addr,
        error_count,
        key_dir: args.key_dir,
        uapi_socket: (!args.no_uapi).then_some(args.uapi_socket),
        tun_name: args.tun_name,
        listen_port: args.listen_port,
        mtu: args.mtu,
        idle_poll: Duration::from_micros(args.idle_poll_us),
        queues: usize::from(args.queues),
        resync: Duration::from_millis(args.resync_ms.max(100)),
        authority_public_key: args.authority_public_key,
        auto_approve_with: args.auto_approve_with,
        min_key_rotation_interval: args
            .test_min_key_rotation_secs
            .map_or(agent::MIN_KEY_ROTATION_INTERVAL, |s| {
                Duration::from_secs(s.max(1))
            }),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veil-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(agent::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                tracing::error!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(flags: &[&str]) -> Result<SourceConfig, String> {
        let mut argv = vec![
            "veil-agent",
            "--node",
            "n1",
            "--authority-public-key",
            "/a.pub",
        ];
        argv.extend_from_slice(flags);
        source_config(&Args::try_parse_from(argv).map_err(|e| e.to_string())?)
    }

    #[test]
    fn cluster_dir_selects_the_file_source_otherwise_kube() {
        assert_eq!(
            source(&["--cluster-dir", "/c"]),
            Ok(SourceConfig::File { dir: "/c".into() })
        );
        assert_eq!(source(&[]), Ok(SourceConfig::Kube { kubeconfig: None }));
        assert_eq!(
            source(&["--kubeconfig", "/k"]),
            Ok(SourceConfig::Kube {
                kubeconfig: Some("/k".into())
            })
        );
        assert_eq!(
            source(&["--source", "file", "--cluster-dir", "/c"]),
            Ok(SourceConfig::File { dir: "/c".into() })
        );
    }

    #[test]
    fn contradictory_source_flags_are_refused() {
        let err = source(&["--source", "file"]).unwrap_err();
        assert!(err.contains("needs --cluster-dir"), "{err}");
        let err = source(&["--source", "kube", "--cluster-dir", "/c"]).unwrap_err();
        assert!(err.contains("drop --cluster-dir"), "{err}");
        let err = source(&["--cluster-dir", "/c", "--kubeconfig", "/k"]).unwrap_err();
        assert!(err.contains("--kubeconfig"), "{err}");
        assert!(source(&["--source", "etcd"]).is_err());
    }
}
