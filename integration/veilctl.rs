//! CLI tests of `veilctl status|enable|disable --cluster-dir` against temporary
//! cluster directories. No root needed: nothing here touches the network.

mod harness;

use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;
use harness::cluster::{node_object, pod_object, Announcement, ClusterDir};
use serde_json::Value;

const VEILCTL: &str = env!("CARGO_BIN_EXE_veilctl");
const CONFIG_FILE: &str = "veilclusterconfig.yaml";

/// One `veilctl` run: exit status and both streams.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "ok={}\n--- stdout\n{}--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

fn veilctl(dir: &Path, args: &[&str]) -> Run {
    let out: Output = Command::new(VEILCTL)
        .arg("--cluster-dir")
        .arg(dir)
        .args(args)
        // The flag has an environment variable too; make sure only the argument counts.
        .env_remove("VEIL_CLUSTER_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {VEILCTL}: {e}"));
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn veilctl_ok(dir: &Path, args: &[&str]) -> Run {
    let r = veilctl(dir, args);
    assert!(r.ok, "veilctl {args:?} failed:\n{}", r.show());
    r
}

/// The config file `veilctl` manages, parsed.
fn read_config(dir: &Path) -> Value {
    let path = dir.join(CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}:\n{text}", path.display()))
}

fn encryption(cfg: &Value) -> (Option<bool>, Option<bool>) {
    (
        cfg.pointer("/spec/encryption/enabled")
            .and_then(Value::as_bool),
        cfg.pointer("/spec/encryption/strict")
            .and_then(Value::as_bool),
    )
}

fn cluster_cidrs(cfg: &Value) -> Vec<String> {
    cfg.pointer("/spec/clusterPodCIDRs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The first line of `status`: the cluster-wide flag.
fn flag_line(status: &str) -> &str {
    status.lines().next().unwrap_or("")
}

#[test]
fn enable_creates_the_config() {
    let dir = ClusterDir::new();
    let r = veilctl_ok(dir.path(), &["status"]);
    assert!(
        flag_line(&r.stdout).starts_with("encryption: disabled"),
        "no config means encryption off:\n{}",
        r.show()
    );

    let r = veilctl_ok(dir.path(), &["enable"]);
    assert!(
        r.stdout.contains(CONFIG_FILE),
        "enable should say which file it wrote:\n{}",
        r.show()
    );
    let cfg = read_config(dir.path());
    assert_eq!(cfg["apiVersion"], "veil.dev/v1alpha1");
    assert_eq!(cfg["kind"], "VeilClusterConfig");
    assert_eq!(cfg.pointer("/metadata/name"), Some(&Value::from("default")));
    assert_eq!(encryption(&cfg), (Some(true), Some(true)));
    // Written atomically: no temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.path().display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let r = veilctl_ok(dir.path(), &["status"]);
    assert!(
        flag_line(&r.stdout).starts_with("encryption: enabled  strict: on"),
        "status after enable:\n{}",
        r.show()
    );
    // The file source itself accepts what veilctl wrote: no problems reported.
    assert!(!r.stdout.contains("problems"), "{}", r.show());
}

#[test]
fn enable_and_disable_keep_other_fields() {
    let dir = ClusterDir::new();
    // The harness writes the config as an operator would, with clusterPodCIDRs.
    dir.set_config(false, false);
    assert_eq!(cluster_cidrs(&read_config(dir.path())), ["10.244.0.0/16"]);

    veilctl_ok(dir.path(), &["enable", "--strict", "false"]);
    let cfg = read_config(dir.path());
    assert_eq!(encryption(&cfg), (Some(true), Some(false)));
    assert_eq!(cluster_cidrs(&cfg), ["10.244.0.0/16"], "{cfg:?}");
    let r = veilctl_ok(dir.path(), &["status"]);
    assert!(
        flag_line(&r.stdout)
            .starts_with("encryption: enabled  strict: off  cluster pod CIDRs: 10.244.0.0/16"),
        "{}",
        r.show()
    );

    // A plain enable leaves the operator's strict choice alone...
    veilctl_ok(dir.path(), &["enable"]);
    let cfg = read_config(dir.path());
    assert_eq!(encryption(&cfg), (Some(true), Some(false)));
    // ...and so does disable.
    veilctl_ok(dir.path(), &["disable"]);
    assert_eq!(
        encryption(&read_config(dir.path())),
        (Some(false), Some(false))
    );
    veilctl_ok(dir.path(), &["enable", "--strict", "true"]);
    let cfg = read_config(dir.path());
    assert_eq!(encryption(&cfg), (Some(true), Some(true)));
    assert_eq!(cluster_cidrs(&cfg), ["10.244.0.0/16"], "{cfg:?}");

    let r = veilctl_ok(dir.path(), &["disable"]);
    assert!(r.stdout.contains("disabled"), "{}", r.show());
    let cfg = read_config(dir.path());
    assert_eq!(encryption(&cfg).0, Some(false), "{cfg:?}");
    assert_eq!(cluster_cidrs(&cfg), ["10.244.0.0/16"], "{cfg:?}");
    let r = veilctl_ok(dir.path(), &["status"]);
    assert!(
        flag_line(&r.stdout).starts_with("encryption: disabled"),
        "status after disable:\n{}",
        r.show()
    );

    // And back: the flag flips again, the rest stays.
    veilctl_ok(dir.path(), &["enable"]);
    let cfg = read_config(dir.path());
    assert_eq!(encryption(&cfg), (Some(true), Some(true)));
    assert_eq!(cluster_cidrs(&cfg), ["10.244.0.0/16"], "{cfg:?}");
}

#[test]
fn config_defined_in_another_file_is_refused() {
    let dir = ClusterDir::new();
    let other = dir.write_raw(
        "cluster.yaml",
        "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\n\
         spec:\n  encryption: {enabled: true, strict: true}\n",
    );
    let before = std::fs::read_to_string(&other).unwrap_or_else(|e| panic!("read: {e}"));
    for args in [&["enable"][..], &["disable"][..]] {
        let r = veilctl(dir.path(), args);
        assert!(!r.ok, "veilctl {args:?} must refuse:\n{}", r.show());
        assert!(
            r.stderr.contains(&other.display().to_string()),
            "veilctl {args:?} must name {}:\n{}",
            other.display(),
            r.show()
        );
        assert!(
            !dir.path().join(CONFIG_FILE).exists(),
            "veilctl {args:?} created a second definition"
        );
        let after = std::fs::read_to_string(&other).unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!(
            before,
            after,
            "veilctl {args:?} changed {}",
            other.display()
        );
    }
    // However the other file spells it (here: a quoted kind), what counts is
    // what the agents' file source reads.
    let dir = ClusterDir::new();
    let quoted = dir.write_raw(
        "quoted.yaml",
        "apiVersion: \"veil.dev/v1alpha1\"\nkind: \"VeilClusterConfig\"\nmetadata: {name: default}\n\
         spec:\n  encryption: {enabled: true}\n",
    );
    let r = veilctl(dir.path(), &["disable"]);
    assert!(!r.ok, "disable must refuse:\n{}", r.show());
    assert!(
        r.stderr.contains(&quoted.display().to_string()),
        "must name {}:\n{}",
        quoted.display(),
        r.show()
    );
    assert!(!dir.path().join(CONFIG_FILE).exists());

    // The same in a subdirectory (the file source reads those too).
    let dir = ClusterDir::new();
    let nested = dir.write_objects(
        "veilnodes/config.yaml",
        &[serde_json::json!({
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "VeilClusterConfig",
            "metadata": {"name": "default"},
            "spec": {"encryption": {"enabled": false}},
        })],
    );
    let r = veilctl(dir.path(), &["enable"]);
    assert!(!r.ok, "enable must refuse:\n{}", r.show());
    assert!(
        r.stderr.contains(&nested.display().to_string()),
        "must name {}:\n{}",
        nested.display(),
        r.show()
    );
    assert!(!dir.path().join(CONFIG_FILE).exists());
}

#[test]
fn malformed_config_is_reported_and_left_alone() {
    let dir = ClusterDir::new();
    let garbage = "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nspec: {encryption: [\n";
    let path = dir.write_raw(CONFIG_FILE, garbage);
    for args in [&["enable"][..], &["disable"][..]] {
        let r = veilctl(dir.path(), args);
        assert!(
            !r.ok,
            "veilctl {args:?} on a malformed config:\n{}",
            r.show()
        );
        assert!(
            r.stderr.contains(&path.display().to_string()),
            "the error must name {}:\n{}",
            path.display(),
            r.show()
        );
        assert!(
            r.stderr.lines().count() == 1 && !r.stderr.contains("panicked"),
            "one clear error line, no panic:\n{}",
            r.show()
        );
        let now = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!(
            now, garbage,
            "veilctl {args:?} overwrote the malformed file"
        );
    }
    // A config with a wrong field type is malformed too (not silently replaced).
    dir.write_raw(
        CONFIG_FILE,
        "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\n\
         spec: {encryption: {enabled: maybe}}\n",
    );
    let r = veilctl(dir.path(), &["enable"]);
    assert!(
        !r.ok,
        "a non-boolean `enabled` must be refused:\n{}",
        r.show()
    );
    assert!(r.stderr.contains(CONFIG_FILE), "{}", r.show());

    // status still works and lists the file as a problem.
    dir.write_raw(CONFIG_FILE, garbage);
    let r = veilctl_ok(dir.path(), &["status"]);
    assert!(
        r.stdout.contains("problems") && r.stdout.contains(&path.display().to_string()),
        "status must report the malformed file:\n{}",
        r.show()
    );
}

#[test]
fn missing_cluster_dir_is_an_error() {
    let dir = ClusterDir::new();
    let missing = dir.path().join("no-such-dir");
    for args in [&["status"][..], &["enable"][..], &["disable"][..]] {
        let r = veilctl(&missing, args);
        assert!(!r.ok, "veilctl {args:?} on a missing dir:\n{}", r.show());
        assert!(
            r.stderr.contains(&missing.display().to_string()),
            "{}",
            r.show()
        );
    }
    assert!(!missing.exists(), "veilctl created the cluster dir");
}

/// A syntactically valid WireGuard public key (32 bytes, base64).
fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

#[test]
fn status_lists_nodes_announcements_and_problems() {
    let dir = ClusterDir::new();
    dir.set_config(true, true);
    dir.add_node("node1", "10.244.1.0/24", "198.18.0.1");
    dir.add_node("node2", "10.244.2.0/24", "198.18.0.2");
    for (name, node, ip) in [
        ("a", "node1", "10.244.1.10"),
        ("b", "node1", "10.244.1.11"),
        ("c", "node2", "10.244.2.10"),
    ] {
        dir.add_pod("default", name, &[("app", name)], node, ip);
    }
    let k1 = key(7);
    dir.write_announcement(&Announcement {
        node: "node1".into(),
        public_key: k1.clone(),
        listen_port: 51999,
        pod_cidrs: vec!["10.244.1.0/24".into()],
        endpoint: None,
    });
    // An invalid Node (its pod CIDR is not a CIDR) and an invalid announcement.
    let bad_node = dir.write_objects(
        "bad-node.yaml",
        &[node_object("broken", "10.244.300.0/24", "198.18.0.9")],
    );
    let bad_ann = dir.write_raw(
        "veilnodes/node2.yaml",
        "apiVersion: veil.dev/v1alpha1\nkind: VeilNode\nmetadata: {name: node2}\n\
         spec: {publicKey: 'not a key!', listenPort: 51820, podCIDRs: [10.244.2.0/24]}\n",
    );
    // A pod object that is not YAML at all.
    let bad_yaml = dir.write_raw("bad.yaml", "kind: Pod\nmetadata: {name: [unclosed\n");
    // A valid pod for reference, in a separate multi-document file.
    dir.write_objects(
        "more-pods.yaml",
        &[pod_object(
            "default",
            "d",
            &[("app", "d")],
            "node2",
            "10.244.2.11",
        )],
    );

    let r = veilctl_ok(dir.path(), &["status"]);
    let out = &r.stdout;
    assert!(
        flag_line(out)
            .starts_with("encryption: enabled  strict: on  cluster pod CIDRs: 10.244.0.0/16"),
        "{}",
        r.show()
    );
    let row = |node: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap_or_else(|| panic!("status has no row for {node}:\n{}", r.show()))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // NODE, POD CIDRS, INTERNAL IP, PODS, PUBLIC KEY, PORT
    assert_eq!(
        row("node1"),
        [
            "node1",
            "10.244.1.0/24",
            "198.18.0.1",
            "2",
            k1.as_str(),
            "51999"
        ],
        "{}",
        r.show()
    );
    let n2 = row("node2");
    assert_eq!(
        &n2[..4],
        ["node2", "10.244.2.0/24", "198.18.0.2", "2"],
        "{}",
        r.show()
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("node2") && l.contains("(not announced)")),
        "node2's invalid announcement must not count as announced:\n{}",
        r.show()
    );
    assert!(
        !out.lines()
            .any(|l| l.split_whitespace().next() == Some("broken")),
        "the invalid Node must not be listed as a node:\n{}",
        r.show()
    );

    let problems: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("problems"))
        .skip(1)
        .collect();
    let has = |file: &Path, object: Option<&str>| {
        problems.iter().any(|l| {
            l.contains(&file.display().to_string()) && object.is_none_or(|o| l.contains(o))
        })
    };
    assert!(has(&bad_node, Some("Node/broken")), "{}", r.show());
    assert!(has(&bad_ann, Some("VeilNode/node2")), "{}", r.show());
    assert!(has(&bad_yaml, None), "{}", r.show());
    assert_eq!(
        problems.len(),
        3,
        "exactly the three problems, nothing about the valid objects:\n{}",
        r.show()
    );
    assert!(
        out.contains("problems (3;"),
        "the problem count is shown:\n{}",
        r.show()
    );
}
