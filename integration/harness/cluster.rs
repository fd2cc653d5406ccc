//! The cluster directory (`--cluster-dir`): Kubernetes objects as YAML files, written
//! the way `kubectl get -o yaml` shows them, and replaced atomically (write a hidden
//! temporary file, then rename) so an agent never reads half a file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::topology::{Topology, POD_NAMESPACE};

/// A temporary cluster directory, removed on drop.
#[derive(Debug)]
pub struct ClusterDir {
    dir: tempfile::TempDir,
}

/// A node's `VeilNode` announcement, as read back from `veilnodes/<node>.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub node: String,
    pub public_key: String,
    pub listen_port: u16,
    pub pod_cidrs: Vec<String>,
    pub endpoint: Option<String>,
}

impl Default for ClusterDir {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("veil-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create cluster dir: {e}"));
        let me = Self { dir };
        fs::create_dir_all(me.veilnodes_dir())
            .unwrap_or_else(|e| panic!("create {}: {e}", me.veilnodes_dir().display()));
        me
    }

    /// Writes the Namespace, every Node and Pod of `topo`, and the cluster config.
    pub fn for_topology(topo: &Topology, enabled: bool, strict: bool) -> Self {
        let me = Self::new();
        me.add_namespace(
            POD_NAMESPACE,
            &[("kubernetes.io/metadata.name", POD_NAMESPACE)],
        );
        for n in &topo.nodes {
            me.add_node(&n.name, &n.pod_cidr, &n.underlay_ip.to_string());
        }
        for p in &topo.pods {
            me.add_topology_pod(topo, p.node, p.slot);
        }
        me.set_config(enabled, strict);
        me
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn veilnodes_dir(&self) -> PathBuf {
        self.dir.path().join("veilnodes")
    }

    /// Atomically replaces `rel` (relative to the cluster dir) with `contents`.
    pub fn write_raw(&self, rel: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(rel);
        let parent = path
            .parent()
            .unwrap_or_else(|| panic!("{rel} has no parent"))
            .to_path_buf();
        let name = path
            .file_name()
            .unwrap_or_else(|| panic!("{rel} has no file name"))
            .to_string_lossy()
            .into_owned();
        // Hidden and not ending in .yaml: a directory scan never picks it up.
        let tmp = parent.join(format!(".{name}.tmp"));
        fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
        path
    }

    /// Writes `objects` as a multi-document YAML file.
    pub fn write_objects(&self, rel: &str, objects: &[Value]) -> PathBuf {
        let mut text = String::new();
        for o in objects {
            text.push_str("---\n");
            text.push_str(
                &serde_yaml::to_string(o).unwrap_or_else(|e| panic!("YAML for {rel}: {e}")),
            );
        }
        self.write_raw(rel, &text)
    }

    pub fn remove(&self, rel: &str) {
        let path = self.dir.path().join(rel);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    pub fn set_config(&self, enabled: bool, strict: bool) {
        self.write_objects(
            "veilclusterconfig.yaml",
            &[json!({
                "apiVersion": "veil.dev/v1alpha1",
                "kind": "VeilClusterConfig",
                "metadata": {"name": "default"},
                "spec": {
                    "encryption": {"enabled": enabled, "strict": strict},
                    "clusterPodCIDRs": ["10.244.0.0/16"],
                },
            })],
        );
    }

    pub fn node_file(name: &str) -> String {
        format!("node-{name}.yaml")
    }

    pub fn add_node(&self, name: &str, pod_cidr: &str, internal_ip: &str) -> PathBuf {
        self.write_objects(
            &Self::node_file(name),
            &[node_object(name, pod_cidr, internal_ip)],
        )
    }

    pub fn remove_node(&self, name: &str) {
        self.remove(&Self::node_file(name));
    }

    pub fn add_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<_, _> = labels.iter().copied().collect();
        self.write_objects(
            &format!("namespace-{name}.yaml"),
            &[json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            })],
        );
    }

    pub fn pod_file(namespace: &str, name: &str) -> String {
        format!("pod-{namespace}-{name}.yaml")
    }

    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        node: &str,
        pod_ip: &str,
    ) -> PathBuf {
        self.write_objects(
            &Self::pod_file(namespace, name),
            &[pod_object(namespace, name, labels, node, pod_ip)],
        )
    }

    /// Writes the Pod object for the topology's pod `slot` on node `node`.
    pub fn add_topology_pod(&self, topo: &Topology, node: u8, slot: u8) -> PathBuf {
        let p = topo.pod(node, slot);
        let app = format!("app{}", p.node);
        self.add_pod(
            POD_NAMESPACE,
            &p.name,
            &[("app", &app), ("veil.dev/test", "yes")],
            &topo.node(node).name,
            &p.ip.to_string(),
        )
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.remove(&Self::pod_file(namespace, name));
    }

    pub fn announcement_path(&self, node: &str) -> PathBuf {
        self.veilnodes_dir().join(format!("{node}.yaml"))
    }

    /// Reads a node's `VeilNode` announcement, if it has been published and parses.
    pub fn announcement(&self, node: &str) -> Option<Announcement> {
        let text = fs::read_to_string(self.announcement_path(node)).ok()?;
        parse_announcement(&text).ok()
    }

    /// Writes an announcement as a node would (used for non-Veil peers).
    pub fn write_announcement(&self, a: &Announcement) -> PathBuf {
        let mut spec = json!({
            "publicKey": a.public_key,
            "listenPort": a.listen_port,
            "podCIDRs": a.pod_cidrs,
        });
        if let Some(ep) = &a.endpoint {
            spec["endpoint"] = json!(ep);
        }
        self.write_objects(
            &format!("veilnodes/{}.yaml", a.node),
            &[json!({
                "apiVersion": "veil.dev/v1alpha1",
                "kind": "VeilNode",
                "metadata": {"name": a.node},
                "spec": spec,
            })],
        )
    }
}

pub fn node_object(name: &str, pod_cidr: &str, internal_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
        },
    })
}

pub fn pod_object(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
    pod_ip: &str,
) -> Value {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
        },
    })
}

/// Parses a `VeilNode` document; errors name the missing field.
pub fn parse_announcement(text: &str) -> Result<Announcement, String> {
    let v: Value = serde_yaml::from_str(text).map_err(|e| format!("VeilNode YAML: {e}"))?;
    let str_at = |ptr: &str| v.pointer(ptr).and_then(Value::as_str).map(str::to_string);
    if str_at("/kind").as_deref() != Some("VeilNode") {
        return Err(format!("not a VeilNode: kind {:?}", str_at("/kind")));
    }
    let node = str_at("/metadata/name").ok_or("VeilNode without metadata.name")?;
    let public_key = str_at("/spec/publicKey").ok_or("VeilNode without spec.publicKey")?;
    let listen_port = v
        .pointer("/spec/listenPort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or("VeilNode without a valid spec.listenPort")?;
    let pod_cidrs = v
        .pointer("/spec/podCIDRs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(Announcement {
        node,
        public_key,
        listen_port,
        pod_cidrs,
        endpoint: str_at("/spec/endpoint"),
    })
}
