//! `veilctl`: operate Veil. Today against the file source (`--cluster-dir`).
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use veil::cluster::file::FileSource;
use veil::cluster::objects::{
    VeilClusterConfig, VeilClusterConfigSpec, CLUSTER_CONFIG_NAME, VEIL_API_VERSION,
};
use veil::cluster::ClusterState;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Operate Veil: status, the cluster-wide encryption flag"
)]
struct Cli {
    /// Directory of Kubernetes objects as YAML (the file cluster source).
    #[arg(long, env = "VEIL_CLUSTER_DIR", global = true, default_value = ".")]
    cluster_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the encryption flag, every node, its announcement, and any problem found.
    Status,
    /// Turn encryption on cluster-wide.
    Enable {
        /// Fail closed: never send remote pod traffic in plaintext (default).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        strict: bool,
    },
    /// Turn encryption off cluster-wide.
    Disable,
    /// Identity policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
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
    let result = match cli.command {
        Command::Status => status(&cli.cluster_dir),
        Command::Enable { strict } => set_encryption(&cli.cluster_dir, true, strict),
        Command::Disable => set_encryption(&cli.cluster_dir, false, true),
        Command::Policy {
            command: PolicyCommand::Trace { from, to, port },
        } => {
            let (state, _) = FileSource::new(&cli.cluster_dir).load();
            match veil::policy::trace_pods(&state, &from, &to, &port) {
                Ok((allowed, text)) => {
                    print!("{text}");
                    return if allowed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(2)
                    };
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veilctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("cluster dir {} is not a directory", dir.display()));
    }
    let (state, diags) = FileSource::new(dir).load();
    print!("{}", render_status(&state));
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

fn set_encryption(dir: &Path, enabled: bool, strict: bool) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("cluster dir {} is not a directory", dir.display()));
    }
    let path = dir.join(CONFIG_FILE);
    // The config may only be defined once; refuse to create a second definition.
    if let Some(other) = config_defined_elsewhere(dir, &path) {
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
    config.spec.encryption.strict = Some(strict);
    let yaml = serde_yaml::to_string(&config).map_err(|e| format!("encoding the config: {e}"))?;
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, yaml).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("renaming to {}: {e}", path.display()))?;
    println!(
        "encryption {} (strict {}) in {}",
        if enabled { "enabled" } else { "disabled" },
        if strict { "on" } else { "off" },
        path.display()
    );
    Ok(())
}

/// Another YAML file under `dir` that defines a `VeilClusterConfig`.
fn config_defined_elsewhere(dir: &Path, ours: &Path) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p != ours
                && p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && std::fs::read_to_string(&p)
                    .is_ok_and(|s| s.lines().any(|l| l.trim() == "kind: VeilClusterConfig"))
            {
                return Some(p);
            }
        }
    }
    None
}
