//! `veilctl`: operate Veil, against a cluster dir (`--cluster-dir`) or,
//! without one, the Kubernetes API (`--kubeconfig` or in-cluster). Every
//! command is written once against `cluster::store::Store`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use veil::cluster::file::FileSource;
use veil::cluster::objects::{
    VeilClusterConfig, VeilClusterConfigSpec, VeilNode, CLUSTER_CONFIG_NAME, VEIL_API_VERSION,
};
use veil::cluster::store::{veil_nodes, Error as StoreError, Store};
use veil::cluster::trust as files;
use veil::cluster::{Announcement, ClusterState, PublicKey};
use veil::reconcile::{verify_announcement, TrustContext};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Operate Veil: status, the cluster-wide encryption flag"
)]
struct Cli {
    /// Directory of Kubernetes objects as YAML (the file cluster source).
    /// Without it, every command uses the Kubernetes API.
    #[arg(long, env = "VEIL_CLUSTER_DIR", global = true)]
    cluster_dir: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API. Default: the in-cluster service
    /// account, then $KUBECONFIG or ~/.kube/config (as kubectl).
    #[arg(long, env = "VEIL_KUBECONFIG", global = true)]
    kubeconfig: Option<PathBuf>,
    /// The cluster authority's public key file: lets `status`, `keys status`
    /// and `peer config` check every announcement's signature.
    #[arg(long, env = "VEIL_AUTHORITY_PUBLIC_KEY", global = true)]
    authority_public_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// File name of the authority's public key in a `ca init` directory.
const AUTHORITY_PUB: &str = "authority.pub";

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the encryption flag, every node, its announcement, and any problem found.
    Status,
    /// Turn encryption on cluster-wide. Nodes switch pair by pair, each
    /// once its peer reports it can decrypt; `status` shows the progress.
    Enable {
        /// Fail closed: once every node encrypts, never send or deliver remote
        /// pod traffic in plaintext. `--strict` alone means true. Left as it
        /// is when not given (on for a new config).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        strict: Option<bool>,
        /// Same as `--strict false`.
        #[arg(long, conflicts_with = "strict")]
        no_strict: bool,
    },
    /// Turn encryption off cluster-wide. Every node first accepts plaintext
    /// again and says so; only then do its peers stop encrypting to it.
    Disable,
    /// The cluster authority (certifies node identities).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Node identities.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// External standard WireGuard machines.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// WireGuard key generations and rotation.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Identity policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create the authority key (DIR/authority.key, 0600) and its public key
    /// (DIR/authority.pub), which every agent gets as --authority-public-key.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Certify the identity key node NAME published while pending.
    Approve {
        name: String,
        /// The `ca init` directory.
        #[arg(long)]
        ca: PathBuf,
        /// Certificate validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Announce an external WireGuard machine, signed by the authority.
    Add {
        name: String,
        /// Its WireGuard public key (`wg pubkey`).
        #[arg(long)]
        public_key: String,
        /// Where Veil nodes reach it, IP:PORT.
        #[arg(long)]
        endpoint: SocketAddr,
        /// The addresses it may send from and receives for (CIDR[,CIDR]).
        #[arg(long, value_delimiter = ',', required = true)]
        allowed_ips: Vec<IpNet>,
        /// The `ca init` directory.
        #[arg(long)]
        ca: PathBuf,
        /// Announcement validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Print the wg-quick configuration the external machine NAME needs.
    Config { name: String },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Ask agents to rotate their WireGuard keys.
    Rotate {
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        node: Vec<String>,
        #[arg(long)]
        all: bool,
        /// Show progress and return when every peer uses the new keys.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Each node's key generation, age, and which peers use which generation.
    Status,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// The verdict for a new connection and the rule that decided it
    /// (exit status 0 allowed, 2 denied).
    Trace {
        /// Source pod, NAMESPACE/POD.
        #[arg(long)]
        from: String,
        /// Destination pod, NAMESPACE/POD.
        #[arg(long)]
        to: String,
        /// Destination port and protocol: 80/tcp, 53/udp.
        #[arg(long)]
        port: String,
    },
}

/// The file `veilctl` writes the cluster config to.
const CONFIG_FILE: &str = "veilclusterconfig.yaml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no cluster at all.
    if let Command::Ca {
        command: CaCommand::Init { out },
    } = &cli.command
    {
        return exit(ca_init(out));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit(Err(format!("starting the async runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => exit(Err(e)),
    }
}

/// The file source with `--cluster-dir`, the Kubernetes API without it
/// (veil-agent's rule); `Some(dir)` for the file source.
fn store_choice(cli: &Cli) -> Result<Option<PathBuf>, String> {
    match (&cli.cluster_dir, &cli.kubeconfig) {
        (Some(_), Some(_)) => Err(
            "--kubeconfig is for the Kubernetes API; --cluster-dir selects the file source".into(),
        ),
        (dir, _) => Ok(dir.clone()),
    }
}

/// Every command but `ca init`, written once against [`Store`].
async fn run(cli: Cli) -> Result<ExitCode, String> {
    let authority = cli.authority_public_key.as_deref();
    let store = match store_choice(&cli)? {
        Some(dir) => Store::File(dir),
        None => Store::Kube(
            veil::cluster::source::kube_client(cli.kubeconfig.as_deref())
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let done = |r: Result<(), String>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Status => done(status(&store, authority).await),
        Command::Enable { strict, no_strict } => {
            done(set_encryption(&store, true, if no_strict { Some(false) } else { strict }).await)
        }
        Command::Disable => done(set_encryption(&store, false, None).await),
        Command::Ca { .. } => done(Err("`ca init` needs no cluster".into())),
        Command::Node {
            command: NodeCommand::Approve { name, ca, days },
        } => done(node_approve(&store, &name, &ca, days).await),
        Command::Peer {
            command:
                PeerCommand::Add {
                    name,
                    public_key,
                    endpoint,
                    allowed_ips,
                    ca,
                    days,
                },
        } => done(
            peer_add(
                &store,
                &name,
                &public_key,
                endpoint,
                &allowed_ips,
                &ca,
                days,
            )
            .await,
        ),
        Command::Peer {
            command: PeerCommand::Config { name },
        } => done(peer_config(&store, &name, authority).await),
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    node,
                    all,
                    wait,
                    timeout,
                },
        } => done(
            keys_rotate(
                &store,
                (!all).then_some(node.as_slice()),
                wait.then(|| Duration::from_secs(timeout)),
            )
            .await,
        ),
        Command::Keys {
            command: KeysCommand::Status,
        } => done(keys_status(&store, authority).await),
        Command::Policy {
            command: PolicyCommand::Trace { from, to, port },
        } => {
            let (state, _) = load(&store).await?;
            let (allowed, text) =
                veil::policy::trace_pods(&state, &from, &to, &port).map_err(|e| e.to_string())?;
            print!("{text}");
            Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veilctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn status(store: &Store, authority: Option<&Path>) -> Result<(), String> {
    let (state, diags) = load(store).await?;
    print_status(&state, diags, authority)
}

/// The status report of both modes.
fn print_status(
    state: &ClusterState,
    mut diags: Vec<veil::cluster::Diagnostic>,
    authority: Option<&Path>,
) -> Result<(), String> {
    print!("{}", render_status(state));
    print!("{}", render_conditions(state));
    if let Some(path) = authority {
        let authority = read_authority(path)?;
        for (name, verdict) in verdicts(state, &authority) {
            if let Err(reason) = verdict {
                let object = VeilNode::object_ref(&name);
                let source = state
                    .origins
                    .get(&object)
                    .cloned()
                    .unwrap_or_else(|| "reconcile".into());
                diags.push(veil::cluster::Diagnostic {
                    source,
                    object,
                    problem: format!("rejected: {reason}"),
                });
            }
        }
    }
    if !diags.is_empty() {
        println!(
            "\nproblems ({}; the objects named are skipped):",
            diags.len()
        );
        for d in &diags {
            println!("  {d}");
        }
    }
    Ok(())
}

fn render_status(state: &ClusterState) -> String {
    use std::fmt::Write as _;
    let c = &state.config;
    let mut out = String::new();
    let cluster: Vec<String> = c
        .cluster_pod_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(
        out,
        "encryption: {}  strict: {}  cluster pod CIDRs: {}",
        if c.encryption_enabled {
            "enabled"
        } else {
            "disabled"
        },
        if c.strict { "on" } else { "off" },
        if cluster.is_empty() {
            "(not set)".to_string()
        } else {
            cluster.join(",")
        }
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<20} {:<16} {:<6} {:<46} PORT",
        "NODE", "POD CIDRS", "INTERNAL IP", "PODS", "PUBLIC KEY"
    );
    for (name, node) in &state.nodes {
        let cidrs: Vec<String> = node.pod_cidrs.iter().map(ToString::to_string).collect();
        let pods = state
            .pods
            .values()
            .filter(|p| p.node_name.as_deref() == Some(name.as_str()))
            .count();
        let (key, port) = match state.announcements.get(name) {
            Some(a) => (a.public_key.to_string(), a.listen_port.to_string()),
            None => ("(not announced)".to_string(), "-".to_string()),
        };
        let ip = node
            .internal_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{name:<16} {:<20} {ip:<16} {pods:<6} {key:<46} {port}",
            cidrs.join(",")
        );
    }
    out
}

/// The `VeilClusterConfig` conditions and each node's report on the flag.
fn render_conditions(state: &ClusterState) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let status = veil::reconcile::enable::conditions(state);
    let _ = writeln!(
        out,
        "\n{:<18} {:<6} {:<6} {:<22} MESSAGE",
        "CONDITION", "STATUS", "NODES", "REASON"
    );
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "{:<18} {:<6} {:<6} {:<22} {}",
            c.type_,
            c.status,
            format!("{}/{}", c.ready_nodes, c.total_nodes),
            c.reason,
            c.message
        );
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:<8} {:<6} {:<10} {:<10} {:<10} {:<8} PLAINTEXT IN",
        "NODE", "ENABLED", "READY", "ENCRYPTED", "PLAINTEXT", "DROPPED", "PEERS"
    );
    for name in state.nodes.keys() {
        let a = state.announcements.get(name);
        match a.and_then(|a| a.status.encryption.as_ref()) {
            Some(e) => {
                let _ = writeln!(
                    out,
                    "{name:<16} {:<8} {:<6} {:<10} {:<10} {:<10} {:<8} {}",
                    e.enabled,
                    e.ready,
                    e.encrypted_peers,
                    e.plaintext_peers,
                    e.dropped_peers,
                    a.map_or(0, |a| a.status.peers.len()),
                    if e.accepts_plaintext {
                        "accepted"
                    } else {
                        "refused"
                    }
                );
            }
            None => {
                let _ = writeln!(out, "{name:<16} (no report)");
            }
        }
    }
    out
}

async fn load(store: &Store) -> Result<(ClusterState, Vec<veil::cluster::Diagnostic>), String> {
    store.load().await.map_err(|e| match e {
        StoreError::NotADirectory { dir } => {
            format!("cluster dir {} is not a directory", dir.display())
        }
        e => e.to_string(),
    })
}

fn read_authority(path: &Path) -> Result<[u8; 32], String> {
    keymgr::read_public_key_file(path).map_err(|e| format!("authority public key: {e}"))
}

/// Whether each announcement verifies, as a fresh agent would decide it
/// (no accepted history, so no rollback check).
fn verdicts(state: &ClusterState, authority: &[u8; 32]) -> BTreeMap<String, Result<(), String>> {
    let none = BTreeMap::new();
    let ctx = TrustContext {
        authority: *authority,
        now: keymgr::unix_now(),
        accepted: &none,
    };
    state
        .announcements
        .iter()
        .map(|(n, a)| {
            (
                n.clone(),
                verify_announcement(state, n, a, &ctx).map(|_| ()),
            )
        })
        .collect()
}

fn ca_init(out: &Path) -> Result<(), String> {
    let store = keymgr::KeyStore::new(out);
    let key = store.generate_authority().map_err(|e| e.to_string())?.key;
    let public = out.join(AUTHORITY_PUB);
    keymgr::write_public_key_file(&public, &key.public_key()).map_err(|e| e.to_string())?;
    println!(
        "cluster authority created\n  private key: {} (keep it offline; never put it in the cluster store)\n  public key:  {} ({})\ngive every agent --authority-public-key {}",
        store.path(keymgr::KeyKind::Authority).display(),
        public.display(),
        keymgr::encode_key(&key.public_key()),
        public.display()
    );
    Ok(())
}

async fn node_approve(store: &Store, name: &str, ca: &Path, days: u64) -> Result<(), String> {
    let authority = files::load_authority(ca).map_err(|e| e.to_string())?;
    let approved = store
        .approve_node(
            &authority,
            name,
            Duration::from_secs(days.saturating_mul(86_400)),
        )
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "approved node {name}: identity key {} (compare with the `node identity loaded` line of its agent log), valid until {}\nwrote {}",
        keymgr::encode_key(&approved.certificate.identity_key),
        approved.certificate.not_after,
        approved.written_to
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn peer_add(
    store: &Store,
    name: &str,
    public_key: &str,
    endpoint: SocketAddr,
    allowed_ips: &[IpNet],
    ca: &Path,
    days: u64,
) -> Result<(), String> {
    keymgr::validate_node_name(name).map_err(|e| e.to_string())?;
    let key = keymgr::decode_key(public_key).map_err(|e| format!("--public-key: {e}"))?;
    if !keymgr::is_usable_public_key(&key) {
        return Err("--public-key: a small-order point cannot take part in a handshake".into());
    }
    if endpoint.port() == 0 {
        return Err("--endpoint: port 0 cannot be reached".into());
    }
    let authority = files::load_authority(ca).map_err(|e| e.to_string())?;
    let (state, _) = load(store).await?;
    check_external(&state, name, allowed_ips)?;
    let generation = match state.announcements.get(name) {
        Some(a) if a.public_key.0 == key => a.trust.generation.max(1),
        Some(a) => a.trust.generation + 1,
        None => 1,
    };
    let now = keymgr::unix_now();
    let body = keymgr::AnnouncementBody {
        node: name.into(),
        wireguard_key: key,
        generation,
        listen_port: endpoint.port(),
        pod_cidrs: allowed_ips.to_vec(),
        endpoint: Some(endpoint),
        not_before: now.saturating_sub(keymgr::DEFAULT_CLOCK_SKEW_SECS),
        not_after: now + days.saturating_mul(86_400),
    };
    let signed = keymgr::SignedAnnouncement::sign_by_authority(body, &authority)
        .map_err(|e| e.to_string())?;
    let written = store
        .write_announcement(&Announcement::from_signed(&signed))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "announced external peer {name} (generation {generation}) in {written}; print its configuration with `veilctl peer config {name}`"
    );
    Ok(())
}

/// An external peer must not be a node, and must not take a node's addresses.
fn check_external(state: &ClusterState, name: &str, allowed_ips: &[IpNet]) -> Result<(), String> {
    if state.nodes.contains_key(name) {
        return Err(format!(
            "{name} is a Node of this cluster; external peers need a name of their own"
        ));
    }
    if allowed_ips.is_empty() {
        return Err("--allowed-ips: at least one CIDR is required".into());
    }
    for cidr in allowed_ips {
        for node in state.nodes.values() {
            if let Some(c) = node
                .pod_cidrs
                .iter()
                .find(|c| c.contains(cidr) || cidr.contains(*c))
            {
                return Err(format!(
                    "--allowed-ips {cidr} overlaps pod CIDR {c} of Node/{}; an external peer cannot take a node's addresses",
                    node.name
                ));
            }
        }
    }
    Ok(())
}

async fn peer_config(store: &Store, name: &str, authority: Option<&Path>) -> Result<(), String> {
    let (state, _) = load(store).await?;
    let me = state
        .announcements
        .get(name)
        .filter(|a| a.trust.signer == Some(keymgr::SignerKind::Authority))
        .ok_or_else(|| {
            format!("no external peer {name}; add it with `veilctl peer add {name} ...`")
        })?;
    let ok = match authority {
        Some(p) => Some(verdicts(&state, &read_authority(p)?)),
        None => None,
    };
    print!("{}", render_peer_config(&state, me, ok.as_ref()));
    Ok(())
}

/// The wg-quick file for external peer `me`: one [Peer] per Veil node with
/// an announcement (only verified ones when `ok` is given).
fn render_peer_config(
    state: &ClusterState,
    me: &Announcement,
    ok: Option<&BTreeMap<String, Result<(), String>>>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# wg-quick configuration for external peer {} (generated by veilctl)",
        me.node
    );
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(
        out,
        "PrivateKey = <this machine's private key; its public key must be {}>",
        me.public_key
    );
    let _ = writeln!(out, "ListenPort = {}", me.listen_port);
    for (name, node) in &state.nodes {
        let Some(a) = state.announcements.get(name) else {
            let _ = writeln!(out, "\n# node {name}: not announced yet");
            continue;
        };
        if let Some(Err(reason)) = ok.and_then(|v| v.get(name)) {
            let _ = writeln!(out, "\n# node {name}: announcement rejected: {reason}");
            continue;
        }
        let endpoint = match (a.endpoint, node.internal_ip) {
            (Some(e), _) => e.to_string(),
            (None, Some(ip)) => SocketAddr::new(ip, a.listen_port).to_string(),
            (None, None) => {
                let _ = writeln!(out, "\n# node {name}: no endpoint (no InternalIP)");
                continue;
            }
        };
        let cidrs: Vec<String> = a.pod_cidrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\n# node {name}, key generation {}",
            a.trust.generation
        );
        let _ = writeln!(out, "[Peer]");
        let _ = writeln!(out, "PublicKey = {}", a.public_key);
        let _ = writeln!(out, "Endpoint = {endpoint}");
        let _ = writeln!(out, "AllowedIPs = {}", cidrs.join(", "));
    }
    out
}

/// Per target: (own generation, peers using it / peers in total, peers lagging).
fn rotation_progress(
    state: &ClusterState,
    target: &str,
    want: u64,
) -> (u64, usize, usize, Vec<String>) {
    let generation = state
        .announcements
        .get(target)
        .map_or(0, |a| a.trust.generation);
    let mut switched = 0;
    let mut lagging = Vec::new();
    for other in veil_nodes(state) {
        if other == target {
            continue;
        }
        let used = state.announcements[&other]
            .status
            .peers
            .get(target)
            .copied();
        if used.is_some_and(|g| g >= want) {
            switched += 1;
        } else {
            lagging.push(other);
        }
    }
    (generation, switched, switched + lagging.len(), lagging)
}

async fn keys_rotate(
    store: &Store,
    nodes: Option<&[String]>,
    wait: Option<Duration>,
) -> Result<(), String> {
    let requested = store
        .request_rotations(nodes)
        .await
        .map_err(|e| e.to_string())?;
    let mut wanted = BTreeMap::new();
    for r in requested {
        println!(
            "{}: rotation requested, generation {} -> {}",
            r.node, r.current, r.want
        );
        wanted.insert(r.node, (r.current, r.want));
    }
    let Some(timeout) = wait else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let mut pending = Vec::new();
        let load_error = match store.load().await {
            Ok((state, _)) => {
                let mut lines = String::new();
                for (t, (old, want)) in &wanted {
                    let (now_gen, switched, total, lagging) = rotation_progress(&state, t, *want);
                    let done = now_gen >= *want && lagging.is_empty();
                    lines.push_str(&format!(
                        "{t}: generation {old} -> {now_gen} (want {want}), peers switched {switched}/{total}{}\n",
                        if done { ", done" } else { "" }
                    ));
                    if !done {
                        pending.push(if now_gen < *want {
                            format!("{t} (still at generation {now_gen})")
                        } else {
                            format!("{t} (peers not switched: {})", lagging.join(", "))
                        });
                    }
                }
                if lines != last {
                    print!("{lines}");
                    last = lines;
                }
                if pending.is_empty() {
                    println!("all rotations complete");
                    return Ok(());
                }
                None
            }
            // A failed read (API server briefly away) is retried until the deadline.
            Err(e) => Some(e.to_string()),
        };
        if Instant::now() >= deadline {
            let why = match load_error {
                Some(e) => format!("reading {}: {e}", store.describe()),
                None => pending.join("; "),
            };
            return Err(format!(
                "rotation did not complete within {}s: {why}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(store.poll_interval()).await;
    }
}

async fn keys_status(store: &Store, authority: Option<&Path>) -> Result<(), String> {
    let (state, _) = load(store).await?;
    let ok = match authority {
        Some(p) => Some(verdicts(&state, &read_authority(p)?)),
        None => None,
    };
    print!(
        "{}",
        render_keys_status(&state, ok.as_ref(), keymgr::unix_now())
    );
    Ok(())
}

fn render_keys_status(
    state: &ClusterState,
    ok: Option<&BTreeMap<String, Result<(), String>>>,
    now: u64,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<6} {:<10} {:<10} {:<46} PEERS ON THIS GENERATION",
        "NODE", "GEN", "KEY AGE", "SIGNER", "PUBLIC KEY"
    );
    let veil = veil_nodes(state);
    for (name, a) in &state.announcements {
        let age = a
            .status
            .key_since
            .map_or("-".to_string(), |t| format!("{}s", now.saturating_sub(t)));
        let signer = match (a.trust.signer, a.trust.identity_key) {
            (Some(keymgr::SignerKind::Node), _) => "node",
            (Some(keymgr::SignerKind::Authority), _) => "authority",
            (None, Some(_)) => "pending",
            (None, None) => "unsigned",
        };
        let gen = a.trust.generation;
        let mut on = Vec::new();
        let mut off = Vec::new();
        for other in &veil {
            if other == name {
                continue;
            }
            match state.announcements[other].status.peers.get(name) {
                Some(g) if *g == gen => on.push(other.clone()),
                Some(g) => off.push(format!("{other}@{g}")),
                None => off.push(format!("{other}@-")),
            }
        }
        let mut peers = format!("{}/{}", on.len(), on.len() + off.len());
        if !off.is_empty() {
            peers.push_str(&format!(" (elsewhere: {})", off.join(", ")));
        }
        let _ = writeln!(
            out,
            "{name:<16} {gen:<6} {age:<10} {signer:<10} {:<46} {peers}",
            PublicKey::to_string(&a.public_key)
        );
        if let Some(Err(reason)) = ok.and_then(|v| v.get(name)) {
            let _ = writeln!(out, "  REJECTED: {reason}");
        }
        if let Some(line) = session_line(name, a, &veil) {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// Which of `name`'s own key generations each of its peers' live sessions
/// uses, as `name` reports it: `sessions: n2 gen 4 (current), n3 gen 3
/// (previous)`. `None` for a node that reports no sessions at all (an
/// external peer, or an agent that has not published them yet).
fn session_line(name: &str, a: &Announcement, veil: &[String]) -> Option<String> {
    if a.status.sessions.is_empty() {
        return None;
    }
    let gen = a.trust.generation;
    let parts: Vec<String> = veil
        .iter()
        .filter(|other| *other != name)
        .map(|other| match a.status.sessions.get(other) {
            Some(g) if *g == gen => format!("{other} gen {g} (current)"),
            Some(g) if g.checked_add(1) == Some(gen) => format!("{other} gen {g} (previous)"),
            Some(g) => format!("{other} gen {g} (old)"),
            None => format!("{other} no session"),
        })
        .collect();
    Some(format!("sessions: {}", parts.join(", ")))
}

/// `enable`/`disable` on either store.
async fn set_encryption(store: &Store, enabled: bool, strict: Option<bool>) -> Result<(), String> {
    match store {
        Store::File(dir) => set_encryption_file(dir, enabled, strict),
        Store::Kube(client) => {
            let set = veil::cluster::kube::ctl::set_encryption(client, enabled, strict)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "encryption {} (strict {}) in VeilClusterConfig/{CLUSTER_CONFIG_NAME}",
                if set.enabled { "enabled" } else { "disabled" },
                if set.strict { "on" } else { "off" },
            );
            Ok(())
        }
    }
}

fn set_encryption_file(dir: &Path, enabled: bool, strict: Option<bool>) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("cluster dir {} is not a directory", dir.display()));
    }
    let path = dir.join(CONFIG_FILE);
    // The config may only be defined once; refuse to create a second definition.
    // Ask the file source itself where it found the config, so what counts
    // here is exactly what the agents read.
    let (state, _) = FileSource::new(dir).load();
    let defined_in = state
        .origins
        .get(&format!("VeilClusterConfig/{CLUSTER_CONFIG_NAME}"))
        .map(PathBuf::from);
    if let Some(other) = defined_in.filter(|p| *p != path) {
        return Err(format!(
            "VeilClusterConfig/default is defined in {}; change it there (veilctl manages only {})",
            other.display(),
            path.display()
        ));
    }
    // Keep every other field of an existing config (e.g. clusterPodCIDRs).
    let mut config = match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml::from_str::<VeilClusterConfig>(&text)
            .map_err(|e| format!("{}: {e}; fix or remove it first", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => VeilClusterConfig {
            api_version: VEIL_API_VERSION.into(),
            kind: VeilClusterConfig::KIND.into(),
            metadata: ObjectMeta {
                name: Some(CLUSTER_CONFIG_NAME.into()),
                ..ObjectMeta::default()
            },
            spec: VeilClusterConfigSpec::default(),
        },
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    config.spec.encryption.enabled = Some(enabled);
    // Written out explicitly, so the file says what is in force.
    config.spec.encryption.strict = strict.or(config.spec.encryption.strict).or(Some(true));
    let yaml = serde_yaml::to_string(&config).map_err(|e| format!("encoding the config: {e}"))?;
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, yaml).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming to {}: {e}", path.display()))?;
    println!(
        "encryption {} (strict {}) in {}",
        if enabled { "enabled" } else { "disabled" },
        if config.spec.encryption.strict.unwrap_or(true) {
            "on"
        } else {
            "off"
        },
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil::cluster::{AnnouncementTrust, NodeInfo, NodeKeyStatus};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("veilctl").chain(args.iter().copied()))
    }

    #[test]
    fn kube_mode_only_without_cluster_dir() {
        let both = parse(&["--cluster-dir", "/x", "--kubeconfig", "k", "status"]).expect("parses");
        let err = store_choice(&both).expect_err("contradiction");
        assert!(err.contains("--kubeconfig"), "{err}");
        let file = parse(&["--cluster-dir", "/x", "keys", "rotate", "--all"]).expect("parses");
        assert_eq!(store_choice(&file), Ok(Some(PathBuf::from("/x"))));
        for args in [
            &["status"][..],
            &["node", "approve", "n1", "--ca", "/ca"][..],
            &["keys", "status"][..],
            &[
                "policy", "trace", "--from", "a/b", "--to", "c/d", "--port", "80/tcp",
            ][..],
        ] {
            let cli = parse(args).expect("parses");
            if cli.cluster_dir.is_none() {
                assert_eq!(store_choice(&cli), Ok(None), "{args:?} uses the API");
            }
        }
    }

    #[test]
    fn cli_parsing() {
        let cli = parse(&["keys", "rotate", "--all", "--wait", "--timeout", "5"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys {
                command: KeysCommand::Rotate {
                    all: true,
                    wait: true,
                    timeout: 5,
                    ..
                }
            }
        ));
        let cli = parse(&["keys", "rotate", "--node", "n1", "--node", "n2"]).unwrap();
        match cli.command {
            Command::Keys {
                command: KeysCommand::Rotate { node, all, .. },
            } => {
                assert_eq!(node, vec!["n1", "n2"]);
                assert!(!all);
            }
            other => panic!("{other:?}"),
        }
        for (args, want) in [
            (&["enable"][..], None),
            (&["enable", "--strict"][..], Some(true)),
            (&["enable", "--strict", "false"][..], Some(false)),
            (&["enable", "--no-strict"][..], None),
        ] {
            match parse(args).unwrap().command {
                Command::Enable { strict, no_strict } => {
                    assert_eq!(strict, want, "{args:?}");
                    assert_eq!(no_strict, args.contains(&"--no-strict"), "{args:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(parse(&["enable", "--strict", "--no-strict"]).is_err());
        // Neither --node nor --all, or both: refused.
        assert!(parse(&["keys", "rotate"]).is_err());
        assert!(parse(&["keys", "rotate", "--all", "--node", "n1"]).is_err());
        let cli = parse(&[
            "peer",
            "add",
            "ext",
            "--public-key",
            "k",
            "--endpoint",
            "198.18.0.9:51820",
            "--allowed-ips",
            "10.250.0.0/24,10.251.0.0/24",
            "--ca",
            "/ca",
        ])
        .unwrap();
        match cli.command {
            Command::Peer {
                command: PeerCommand::Add { allowed_ips, .. },
            } => assert_eq!(allowed_ips.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(parse(&[
            "peer",
            "add",
            "ext",
            "--public-key",
            "k",
            "--endpoint",
            "nope",
            "--allowed-ips",
            "10.0.0.0/8",
            "--ca",
            "/ca"
        ])
        .is_err());
        assert!(parse(&["ca", "init"]).is_err(), "--out is required");
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            s.nodes.insert(
                n.to_string(),
                NodeInfo {
                    name: n.to_string(),
                    pod_cidrs: vec![format!("10.244.{}.0/24", i + 1).parse().unwrap()],
                    internal_ip: Some(format!("198.18.0.{}", i + 1).parse().unwrap()),
                },
            );
            s.announcements.insert(
                n.to_string(),
                Announcement {
                    node: n.to_string(),
                    public_key: PublicKey([i as u8 + 1; 32]),
                    listen_port: 51820,
                    pod_cidrs: s.nodes[*n].pod_cidrs.clone(),
                    endpoint: None,
                    trust: AnnouncementTrust {
                        generation: 2,
                        signer: Some(keymgr::SignerKind::Node),
                        ..Default::default()
                    },
                    status: NodeKeyStatus {
                        key_since: Some(1000),
                        peers: BTreeMap::new(),
                        ..Default::default()
                    },
                },
            );
        }
        s.announcements.get_mut("n1").unwrap().status.peers = [("n2".to_string(), 2)].into();
        s.announcements.get_mut("n2").unwrap().status.peers = [("n1".to_string(), 1)].into();
        s
    }

    #[test]
    fn conditions_rendering() {
        let mut s = state();
        s.config.encryption_enabled = true;
        s.announcements.get_mut("n1").unwrap().status.encryption =
            Some(veil::cluster::EncryptionStatus {
                enabled: true,
                ready: true,
                accepts_plaintext: true,
                encrypted_peers: 1,
                ..Default::default()
            });
        let out = render_conditions(&s);
        let ready = out
            .lines()
            .find(|l| l.starts_with("EncryptionReady"))
            .unwrap_or_else(|| panic!("{out}"));
        let total = s.nodes.len();
        assert!(ready.contains(&format!("False  1/{total}")), "{out}");
        assert!(out.contains("(no report)"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("n1") && l.contains("accepted")),
            "{out}"
        );
    }

    #[test]
    fn keys_status_shows_session_generations() {
        let mut s = state();
        // n1 is at generation 2; its session with n2 still uses generation 1.
        s.announcements.get_mut("n1").unwrap().status.sessions = [("n2".to_string(), 1)].into();
        s.announcements.get_mut("n2").unwrap().status.sessions = [("n1".to_string(), 2)].into();
        let out = render_keys_status(&s, None, 1060);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("n1"), "{out}");
        assert_eq!(lines[2], "  sessions: n2 gen 1 (previous)", "{out}");
        assert!(lines[3].starts_with("n2"), "{out}");
        assert_eq!(lines[4], "  sessions: n1 gen 2 (current)", "{out}");
        s.announcements
            .get_mut("n1")
            .unwrap()
            .status
            .sessions
            .clear();
        let out = render_keys_status(&s, None, 1060);
        assert!(
            !out.contains("n1\n  sessions"),
            "no line without sessions:\n{out}"
        );
    }

    #[test]
    fn keys_status_rendering() {
        let s = state();
        let mut verdicts = BTreeMap::new();
        verdicts.insert("n1".to_string(), Ok(()));
        verdicts.insert("n2".to_string(), Err("forged".to_string()));
        let out = render_keys_status(&s, Some(&verdicts), 1060);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{out}");
        // n1 is at generation 2, but n2 still uses generation 1 of n1's key.
        assert!(lines[1].starts_with("n1"), "{out}");
        assert!(lines[1].contains("60s"), "{out}");
        assert!(lines[1].contains("0/1 (elsewhere: n2@1)"), "{out}");
        assert!(
            lines[2].starts_with("n2") && lines[2].contains("1/1"),
            "{out}"
        );
        assert_eq!(lines[3], "  REJECTED: forged");
        let (gen, switched, total, lagging) = rotation_progress(&s, "n1", 2);
        assert_eq!((gen, switched, total), (2, 0, 1));
        assert_eq!(lagging, vec!["n2"]);
        assert_eq!(rotation_progress(&s, "n2", 2).1, 1);
    }

    #[test]
    fn peer_config_and_external_checks() {
        let mut s = state();
        let me = Announcement {
            node: "ext".into(),
            public_key: PublicKey([9; 32]),
            listen_port: 51999,
            pod_cidrs: vec!["10.250.0.0/24".parse().unwrap()],
            endpoint: Some("198.18.0.9:51999".parse().unwrap()),
            ..Announcement::default()
        };
        s.announcements.get_mut("n2").unwrap().endpoint = Some("198.19.0.2:51000".parse().unwrap());
        let out = render_peer_config(&s, &me, None);
        assert!(out.contains("[Interface]\nPrivateKey = <this machine's private key; its public key must be CQkJ"), "{out}");
        assert!(out.contains("ListenPort = 51999"), "{out}");
        assert!(
            out.contains(&format!(
                "[Peer]\nPublicKey = {}\nEndpoint = 198.18.0.1:51820\nAllowedIPs = 10.244.1.0/24",
                PublicKey([1; 32])
            )),
            "{out}"
        );
        assert!(out.contains("Endpoint = 198.19.0.2:51000"), "{out}");
        let mut verdicts = BTreeMap::new();
        verdicts.insert("n2".to_string(), Err("expired".to_string()));
        let out = render_peer_config(&s, &me, Some(&verdicts));
        assert!(
            out.contains("# node n2: announcement rejected: expired"),
            "{out}"
        );
        assert_eq!(out.matches("[Peer]").count(), 1, "{out}");

        assert!(check_external(&s, "ext", &["10.250.0.0/24".parse().unwrap()]).is_ok());
        let e = check_external(&s, "ext", &["10.244.0.0/16".parse().unwrap()]).unwrap_err();
        assert!(
            e.contains("overlaps pod CIDR 10.244.1.0/24 of Node/n1"),
            "{e}"
        );
        assert!(
            check_external(&s, "n1", &["10.250.0.0/24".parse().unwrap()])
                .unwrap_err()
                .contains("is a Node")
        );
        assert!(check_external(&s, "ext", &[]).is_err());
    }
}
