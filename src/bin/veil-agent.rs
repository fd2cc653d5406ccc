//! `veil-agent`: the per-node Veil agent (file cluster source).
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use veil::agent::{self, DEFAULT_MTU, DEFAULT_PORT, DEFAULT_TUN};

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
    #[arg(long, env = "VEIL_CLUSTER_DIR")]
    cluster_dir: PathBuf,
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
    #[arg(long, env = "VEIL_AUTO_APPROVE_WITH")]
    auto_approve_with: Option<PathBuf>,
    /// TESTS ONLY (hidden): the shortest `spec.keyRotation.interval` honoured,
    /// in seconds; default 600 (10 min). Lets an integration test watch
    /// automatic rotation within seconds.
    #[arg(long, hide = true, env = "VEIL_TEST_MIN_KEY_ROTATION_SECS")]
    test_min_key_rotation_secs: Option<u64>,
}

fn init_logging() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
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
    init_logging();
    let cfg = agent::Config {
        node: args.node,
        cluster_dir: args.cluster_dir,
        key_dir: args.key_dir,
        uapi_socket: (!args.no_uapi).then_some(args.uapi_socket),
        tun_name: args.tun_name,
        listen_port: args.listen_port,
        mtu: args.mtu,
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
