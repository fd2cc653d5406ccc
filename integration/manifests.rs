//! `crds/` and `deploy/` as Kubernetes will read them, without a cluster.
//!
//! - The CRDs in `crds/` are exactly what `crdgen` renders from the Rust
//!   types today (drift fails with a diff), parse as
//!   `CustomResourceDefinition`s, and their printer columns and CEL rules
//!   name fields the schemas have.
//! - The kustomize renders of `deploy/base` and `deploy/example` (`kubectl
//!   kustomize`, built into kubectl; required, like root is for netns tests)
//!   parse into the typed k8s-openapi objects with no field lost on the way
//!   (a misspelt field would silently do nothing in a cluster).
//! - The DaemonSet has the mounts, capabilities, probes and settings the
//!   agent needs, consistent with its ConfigMap and with `veil-agent --help`.
//! - The ClusterRole grants exactly `API_ACCESS`, and `API_ACCESS` is exactly
//!   what a running `KubeSource` asks of a (mock) API server.
//! - The agent does its whole job (BPF, TUN, WireGuard, routes) holding only
//!   the DaemonSet's capabilities (root, network namespaces).

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use veil::cluster::identity::{PublishedIdentity, VeilIdentity, VeilIdentityCrd};
use veil::cluster::kube::{KubeSource, KubeSourceConfig, API_ACCESS, CTL_ACCESS};
use veil::cluster::objects::{
    ClusterCondition, VeilClusterConfig, VeilClusterConfigCrd, VeilClusterConfigStatus, VeilNode,
    VeilNodeCrd,
};
use veil::cluster::{Announcement, ClusterConfig};
use veil::identity::{Identity, IdentityKey};
use veil::policy::{Policy, VeilPolicy, VeilPolicyCrd};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_veil-agent");

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

// ---------------------------------------------------------------- helpers

/// Every YAML document of `text` as JSON values (empty documents skipped).
fn documents(what: &str, text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{what}: document {i} is not YAML: {e}"));
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// Parses `doc` as `T` and fails if serializing it back loses a field: the
/// k8s-openapi types ignore unknown fields, which is how a misspelt
/// `redinessProbe` would pass unnoticed.
fn typed<T: DeserializeOwned + Serialize>(what: &str, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse as its Kubernetes type: {e}"));
    let back = serde_json::to_value(&obj).expect("typed object serializes");
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{what}: fields its Kubernetes type does not have (misspelt or misplaced?): {lost:?}"
    );
    obj
}

fn lost_fields(orig: &Value, back: &Value, path: &str, lost: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &p, lost),
                    None if v.is_null() => {}
                    None => lost.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), lost);
            }
        }
        (Value::Array(_), _) => lost.push(format!("{path} (list changed)")),
        (Value::Object(_), _) => lost.push(format!("{path} (object changed)")),
        // Scalars may change representation (an int-or-string, a quantity).
        _ => {}
    }
}

/// `kubectl kustomize DIR`: the manifests exactly as `kubectl apply -k`
/// would send them.
fn kustomize(dir: &str) -> Vec<Value> {
    let path = root().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `kubectl kustomize` (kubectl, with its built-in kustomize, is required by this test): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(dir, &String::from_utf8_lossy(&out.stdout))
}

/// The objects of one rendered deployment, parsed into their types.
#[derive(Default)]
struct Deployment {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    policies: Vec<ValidatingAdmissionPolicy>,
    policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    cluster_configs: Vec<VeilClusterConfig>,
}

fn parse_deployment(dir: &str) -> Deployment {
    let mut d = Deployment::default();
    for doc in kustomize(dir) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{dir}: {kind}/{name}");
        match (
            doc["apiVersion"].as_str().unwrap_or_default(),
            kind.as_str(),
        ) {
            ("v1", "Namespace") => d.namespaces.push(typed(&what, &doc)),
            ("v1", "ServiceAccount") => d.service_accounts.push(typed(&what, &doc)),
            ("v1", "ConfigMap") => d.config_maps.push(typed(&what, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                d.cluster_roles.push(typed(&what, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                d.bindings.push(typed(&what, &doc))
            }
            ("apps/v1", "DaemonSet") => d.daemon_sets.push(typed(&what, &doc)),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                d.policies.push(typed(&what, &doc))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                d.policy_bindings.push(typed(&what, &doc))
            }
            ("veil.dev/v1alpha1", "VeilClusterConfig") => {
                // Both the agent's reader and the CRD's generated type.
                typed::<VeilClusterConfigCrd>(&what, &doc);
                d.cluster_configs.push(typed(&what, &doc))
            }
            (api, _) => panic!("{what}: unexpected apiVersion {api} / kind in deploy/"),
        }
    }
    d
}

/// The ClusterRole named `name` (the base has the agent's and the operators').
fn role<'a>(d: &'a Deployment, name: &str) -> &'a ClusterRole {
    let found: Vec<_> = d
        .cluster_roles
        .iter()
        .filter(|r| r.metadata.name.as_deref() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one ClusterRole {name}");
    found[0]
}

/// `(group, resource, verb)` triples a ClusterRole grants; no wildcards,
/// no resource names, no non-resource URLs.
fn granted(what: &str, role: &ClusterRole) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{what}: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        ![group, resource, verb].iter().any(|s| s.contains('*')),
                        "{what}: wildcard in {rule:?}"
                    );
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

fn one<'a, T>(what: &str, items: &'a [T]) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

/// `(group, resource, verb)` triples of [`API_ACCESS`].
fn api_access() -> BTreeSet<(String, String, String)> {
    access_set(API_ACCESS)
}

/// `(group, resource, verb)` triples of an access list.
fn access_set(list: &[veil::cluster::kube::ApiAccess]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------- CRDs

#[test]
fn committed_crds_are_what_crdgen_renders() {
    let rendered = veil::crd::render().expect("CRDs render");
    let dir = root().join("crds");
    let mut problems = Vec::new();
    for (name, text) in &rendered {
        let path = dir.join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if &committed != text {
            let first = committed
                .lines()
                .zip(text.lines())
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("line {}: committed `{a}`, rendered `{b}`", i + 1))
                .unwrap_or_else(|| {
                    format!(
                        "{} committed lines, {} rendered",
                        committed.lines().count(),
                        text.lines().count()
                    )
                });
            problems.push(format!("{}: {first}", path.display()));
        }
    }
    let expected: BTreeSet<_> = rendered.iter().map(|(n, _)| n.clone()).collect();
    for entry in std::fs::read_dir(&dir).expect("crds/ exists") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".yaml") && !expected.contains(name.as_ref()) {
            problems.push(format!("crds/{name}: not rendered by crdgen (stale?)"));
        }
    }
    assert!(
        problems.is_empty(),
        "crds/ differs from the Rust types; run `cargo run --bin crdgen` and commit:\n{}",
        problems.join("\n")
    );
}

fn committed_crds() -> BTreeMap<String, (CustomResourceDefinition, Value)> {
    let mut crds = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crds")).expect("crds/ exists") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read CRD");
        let docs = documents(&name, &text);
        assert_eq!(docs.len(), 1, "{name}: one CRD per file");
        let crd: CustomResourceDefinition = typed(&name, &docs[0]);
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .unwrap_or_else(|| panic!("{name}: no schema")),
        )
        .expect("schema serializes");
        crds.insert(crd.spec.names.kind.clone(), (crd, schema));
    }
    crds
}

#[test]
fn crds_have_scope_subresources_and_printer_columns() {
    let crds = committed_crds();
    let expected = [
        ("VeilNode", "veilnodes", "Cluster", true),
        ("VeilClusterConfig", "veilclusterconfigs", "Cluster", true),
        ("VeilPolicy", "veilpolicies", "Namespaced", false),
        ("VeilIdentity", "veilidentities", "Cluster", false),
        (
            "VeilNodeCertificate",
            "veilnodecertificates",
            "Cluster",
            false,
        ),
        ("VeilKeyRotation", "veilkeyrotations", "Cluster", false),
    ];
    assert_eq!(
        crds.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected.iter().map(|e| e.0).collect::<BTreeSet<_>>()
    );
    for (kind, plural, scope, status) in expected {
        let (crd, schema) = &crds[kind];
        assert_eq!(crd.spec.group, "veil.dev", "{kind}");
        assert_eq!(crd.spec.names.plural, plural, "{kind}");
        assert_eq!(crd.spec.scope, scope, "{kind}");
        assert_eq!(crd.spec.versions.len(), 1, "{kind}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1", "{kind}");
        assert!(version.served && version.storage, "{kind}");
        assert_eq!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            status,
            "{kind}: status subresource"
        );
        let columns = version
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        assert!(columns.len() >= 2, "{kind}: printer columns");
        assert!(
            columns.iter().any(|c| c.name == "Age" && c.type_ == "date"),
            "{kind}: Age column"
        );
        for c in &columns {
            if c.json_path.starts_with(".metadata.") {
                continue;
            }
            // `[?(@.type=="X")]` filters select list items; the field
            // after them is looked up in the item schema.
            let path = without_filters(&c.json_path);
            let field: Vec<&str> = path.trim_start_matches('.').split('.').collect();
            assert!(
                lookup(schema, &field).is_some(),
                "{kind}: printer column {} reads {}, which the schema does not have",
                c.name,
                c.json_path
            );
        }
    }
    let columns = |kind: &str| -> Vec<String> {
        crds[kind].0.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.json_path.clone())
            .collect()
    };
    for path in [".spec.generation", ".spec.podCIDRs", ".spec.endpoint"] {
        assert!(columns("VeilNode").contains(&path.to_string()), "{path}");
    }
    for path in [".spec.namespace", ".spec.labels"] {
        assert!(
            columns("VeilIdentity").contains(&path.to_string()),
            "{path}"
        );
    }
    for path in [".spec.identityKey", ".spec.notAfter"] {
        assert!(
            columns("VeilNodeCertificate").contains(&path.to_string()),
            "{path}"
        );
    }
    assert!(columns("VeilKeyRotation").contains(&".spec.generation".to_string()));
    // The Ready/Nodes columns select the condition the agents write.
    let ready = veil::reconcile::enable::READY;
    for path in [
        ".spec.encryption.enabled".to_string(),
        ".spec.encryption.strict".to_string(),
        format!(r#".status.conditions[?(@.type=="{ready}")].readyNodes"#),
        format!(r#".status.conditions[?(@.type=="{ready}")].totalNodes"#),
    ] {
        assert!(columns("VeilClusterConfig").contains(&path), "{path}");
    }
}

/// A printer column's JSONPath without its `[...]` list selectors.
fn without_filters(path: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The schema node at `path` (property names; arrays are stepped through).
fn lookup<'a>(schema: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut node = schema;
    for step in path {
        while node.get("items").is_some() && node.get("properties").is_none() {
            node = &node["items"];
        }
        node = node.get("properties")?.get(*step)?;
    }
    Some(node)
}

/// One CEL rule and where it sits.
#[derive(Debug)]
struct RuleSite {
    kind: String,
    /// Schema path, `.` separated, `[]` for array items.
    path: String,
    rule: String,
    message: String,
    node: Value,
    /// `maxItems` of every array enclosing the rule (the rule's node included).
    arrays: Vec<(String, Option<u64>)>,
}

fn collect_rules(
    kind: &str,
    node: &Value,
    path: &str,
    arrays: &[(String, Option<u64>)],
    out: &mut Vec<RuleSite>,
) {
    let mut arrays = arrays.to_vec();
    if node.get("type").and_then(Value::as_str) == Some("array") {
        arrays.push((
            path.to_string(),
            node.get("maxItems").and_then(Value::as_u64),
        ));
    }
    for rule in node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(RuleSite {
            kind: kind.into(),
            path: path.into(),
            rule: rule["rule"].as_str().unwrap_or_default().into(),
            message: rule["message"].as_str().unwrap_or_default().into(),
            node: node.clone(),
            arrays: arrays.clone(),
        });
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            collect_rules(kind, v, &format!("{path}.{k}"), &arrays, out);
        }
    }
    if let Some(items) = node.get("items") {
        collect_rules(kind, items, &format!("{path}[]"), &arrays, out);
    }
}

/// The CEL functions and macros the rules may use: standard CEL, the
/// strings extension and the Kubernetes IP/CIDR library (1.31+). A name
/// outside this list is a typo the API server would reject the CRD for.
const CEL_FUNCTIONS: &[&str] = &[
    "has",
    "all",
    "exists",
    "size",
    "int",
    "string",
    "matches",
    "contains",
    "startsWith",
    "endsWith",
    "substring",
    "lastIndexOf",
    "isCIDR",
    "isIP",
];

/// Parse-level checks of one CEL rule: balanced brackets and quotes, known
/// functions, and every `self.a.b` naming a field of the schema node.
fn check_rule(site: &RuleSite) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("{} {}: `{}`", site.kind, site.path, site.rule);
    if site.rule.trim().is_empty() || site.message.trim().is_empty() {
        problems.push(format!("{at}: empty rule or message"));
    }
    // Brackets outside string literals.
    let mut depth: Vec<char> = Vec::new();
    let mut quote: Option<char> = None;
    let mut code = String::new();
    for c in site.rule.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                code.push(' ');
            }
            (Some(_), _) => code.push(' '),
            (None, '\'' | '"') => {
                quote = Some(c);
                code.push(' ');
            }
            (None, '(' | '[') => {
                depth.push(c);
                code.push(c);
            }
            (None, ')' | ']') => {
                let open = if c == ')' { '(' } else { '[' };
                if depth.pop() != Some(open) {
                    problems.push(format!("{at}: unbalanced `{c}`"));
                }
                code.push(c);
            }
            (None, c) => code.push(c),
        }
    }
    if quote.is_some() || !depth.is_empty() {
        problems.push(format!("{at}: unterminated string or bracket"));
    }
    // Identifiers followed by `(` are calls.
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_alphabetic() {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if chars.get(i) == Some(&'(') && !CEL_FUNCTIONS.contains(&word.as_str()) {
                problems.push(format!("{at}: unknown CEL function `{word}`"));
            }
        } else {
            i += 1;
        }
    }
    // `self.a.b...`: each step must be a property, until a method call.
    let mut rest = code.as_str();
    while let Some(pos) = rest.find("self.") {
        let before = rest[..pos].chars().last();
        rest = &rest[pos + "self.".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `oldSelf.`, `myself.`
        }
        let chain: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.' || *c == '(')
            .collect();
        let mut node = site.node.clone();
        for step in chain.split('.') {
            if step.is_empty() || step.contains('(') {
                break; // a method call on the value
            }
            if node.get("x-kubernetes-embedded-resource").is_some()
                || (site.path.is_empty() && step == "metadata")
            {
                break; // ObjectMeta: the API server's own schema
            }
            match node.get("properties").and_then(|p| p.get(step)) {
                Some(next) => node = next.clone(),
                None => {
                    problems.push(format!(
                        "{at}: `self.{chain}` names `{step}`, which the schema at {} does not have",
                        site.path
                    ));
                    break;
                }
            }
        }
    }
    // The API server bounds a rule's cost by how often it can run.
    for (array, max) in &site.arrays {
        if max.is_none() {
            problems.push(format!(
                "{at}: enclosing list {array} has no maxItems (unbounded rule cost)"
            ));
        }
    }
    problems
}

#[test]
fn cel_rules_are_sane_bounded_and_where_expected() {
    let crds = committed_crds();
    let mut sites = Vec::new();
    for (kind, (_, schema)) in &crds {
        collect_rules(kind, schema, "", &[], &mut sites);
    }
    let problems: Vec<String> = sites.iter().flat_map(check_rule).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let has_rule = |kind: &str, path: &str, needle: &str| {
        sites
            .iter()
            .any(|s| s.kind == kind && s.path == path && s.rule.contains(needle))
    };
    let expected = [
        ("VeilNode", ".spec.podCIDRs", "isCIDR("),
        ("VeilNode", ".spec.endpoint", "isIP("),
        ("VeilNode", ".spec.endpoint", "65535"),
        ("VeilNode", ".spec", "self.notAfter > self.notBefore"),
        ("VeilClusterConfig", "", "self.metadata.name == 'default'"),
        ("VeilClusterConfig", ".spec.clusterPodCIDRs", "isCIDR("),
        (
            "VeilPolicy",
            ".spec.ingress[].ports[]",
            "self.endPort >= self.port",
        ),
        (
            "VeilPolicy",
            ".spec.egress[].ports[]",
            "self.endPort >= self.port",
        ),
        (
            "VeilPolicy",
            ".spec.ingressDeny[].ports[]",
            "self.endPort >= self.port",
        ),
        (
            "VeilPolicy",
            ".spec.egressDeny[].ports[]",
            "self.endPort >= self.port",
        ),
        (
            "VeilPolicy",
            ".spec.ingress[].ports[]",
            "self.port <= 65535",
        ),
        (
            "VeilPolicy",
            ".spec.ingress[].from[].ipBlock",
            "isCIDR(self.cidr)",
        ),
        ("VeilPolicy", ".spec.egressDeny[].to[].ipBlock", "isCIDR(e)"),
        ("VeilPolicy", ".spec.ingress[].ports[]", "matches('[a-z]')"),
        ("VeilNode", ".spec.endpoint", ".contains(':')"),
        ("VeilIdentity", "", "int(self.metadata.name) >= 256"),
        ("VeilIdentity", "", "self.spec == oldSelf.spec"),
        ("VeilNodeCertificate", "", "self.metadata.name.matches("),
        (
            "VeilNodeCertificate",
            ".spec",
            "self.notAfter > self.notBefore",
        ),
        ("VeilKeyRotation", "", "self.metadata.name.matches("),
    ];
    for (kind, path, needle) in expected {
        assert!(
            has_rule(kind, path, needle),
            "{kind}: no rule containing `{needle}` at `{path}`; rules: {:#?}",
            sites
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| (&s.path, &s.rule))
                .collect::<Vec<_>>()
        );
    }
    // Plain OpenAPI bounds where no CEL is needed.
    let (_, node) = &crds["VeilNode"];
    let port = lookup(node, &["spec", "listenPort"]).expect("listenPort");
    assert_eq!(
        (port["minimum"].as_f64(), port["maximum"].as_f64()),
        (Some(1.0), Some(65535.0))
    );
    let key = lookup(node, &["spec", "publicKey"]).expect("publicKey");
    assert!(key["pattern"].as_str().is_some_and(|p| p.contains("{43}=")));
    let signer = lookup(node, &["spec", "signer"]).expect("signer");
    assert_eq!(signer["enum"], json!(["Node", "Authority"]));
}

/// Every field a fully populated object serializes must be in its CRD's
/// schema, or the API server prunes it on write and the agent never sees it.
fn assert_schema_keeps(kind: &str, schema: &Value, object: &Value, path: &str) {
    match object {
        Value::Object(map) => {
            if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true))
                && schema.get("properties").is_none()
            {
                return;
            }
            for (k, v) in map {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = schema
                    .get("properties")
                    .and_then(|p| p.get(k))
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or_else(|| {
                        panic!("{kind}: `{path}.{k}` would be pruned: not in the CRD schema")
                    });
                assert_schema_keeps(kind, sub, v, &format!("{path}.{k}"));
            }
        }
        Value::Array(items) => {
            let sub = schema
                .get("items")
                .unwrap_or_else(|| panic!("{kind}: `{path}` is a list the schema does not type"));
            for v in items {
                assert_schema_keeps(kind, sub, v, &format!("{path}[]"));
            }
        }
        _ => {}
    }
}

#[test]
fn crd_schemas_keep_every_field_the_agent_reads() {
    let crds = committed_crds();
    let node: VeilNode = serde_yaml::from_str(
        r#"
apiVersion: veil.dev/v1alpha1
kind: VeilNode
metadata: {name: n1}
spec:
  publicKey: CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=
  listenPort: 51820
  podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]
  endpoint: "[fd00::1]:51820"
  generation: 3
  notBefore: 1750000000
  notAfter: 1750086400
  identityKey: AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=
  certificate: c2lnbmVk
  signature: c2lnbmF0dXJl
  signer: Node
status:
  keySince: 1750000000
  peerGenerations: {n2: 4}
  sessionGenerations: {n2: 3}
  encryption:
    enabled: true
    ready: true
    acceptsPlaintext: false
    encryptedPeers: 2
    plaintextPeers: 1
    droppedPeers: 1
"#,
    )
    .expect("sample VeilNode");
    let value = serde_json::to_value(&node).expect("serialize");
    assert_schema_keeps("VeilNode", &crds["VeilNode"].1, &value, "");
    // The kube-derive root reads and writes the same document.
    let crd_typed: VeilNodeCrd = serde_json::from_value(value.clone()).expect("as VeilNodeCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);

    // Certificates and rotation requests: the objects veilctl writes.
    let cert = keymgr::AuthorityKey::from_seed([1; 32])
        .certify(
            "n1",
            keymgr::IdentityKey::from_seed([2; 32]).public_key(),
            1_000,
            2_000,
        )
        .expect("certificate");
    let value = serde_json::to_value(veil::cluster::trust::CertificateObject::new(&cert))
        .expect("serialize");
    assert_schema_keeps(
        "VeilNodeCertificate",
        &crds["VeilNodeCertificate"].1,
        &value,
        "",
    );
    let crd_typed: veil::cluster::trust::VeilNodeCertificateCrd =
        serde_json::from_value(value.clone()).expect("as VeilNodeCertificateCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);
    let value = serde_json::to_value(veil::cluster::trust::RotationObject::new("n1", 4))
        .expect("serialize");
    assert_schema_keeps("VeilKeyRotation", &crds["VeilKeyRotation"].1, &value, "");
    let crd_typed: veil::cluster::trust::VeilKeyRotationCrd =
        serde_json::from_value(value.clone()).expect("as VeilKeyRotationCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);

    let config: VeilClusterConfig = serde_yaml::from_str(
        r#"
apiVersion: veil.dev/v1alpha1
kind: VeilClusterConfig
metadata: {name: default}
spec:
  encryption: {enabled: true, strict: false}
  clusterPodCIDRs: [10.244.0.0/16]
  keyRotation: {interval: 24h}
"#,
    )
    .expect("sample VeilClusterConfig");
    // The status the agents patch (the plain type has no status field).
    let status = VeilClusterConfigStatus {
        conditions: vec![ClusterCondition {
            type_: "EncryptionReady".into(),
            status: "False".into(),
            reason: "NodesNotReady".into(),
            message: "1 of 2 nodes ready".into(),
            ready_nodes: 1,
            total_nodes: 2,
        }],
    };
    let status = json!({"status": serde_json::to_value(&status).expect("serialize")});
    assert_schema_keeps(
        "VeilClusterConfig",
        &crds["VeilClusterConfig"].1,
        &status,
        "",
    );
    let value = serde_json::to_value(&config).expect("serialize");
    assert_schema_keeps(
        "VeilClusterConfig",
        &crds["VeilClusterConfig"].1,
        &value,
        "",
    );
    let crd_typed: VeilClusterConfigCrd =
        serde_json::from_value(value.clone()).expect("as VeilClusterConfigCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);
    ClusterConfig::try_from(&config.spec).expect("sample is valid");

    let policy: VeilPolicy = serde_yaml::from_str(
        r#"
apiVersion: veil.dev/v1alpha1
kind: VeilPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  requireEncryption: true
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
      namespaceSelector: {matchLabels: {team: a}}
    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.8/29]}
    ports: [{protocol: TCP, port: 5432, endPort: 5440}, {port: metrics}]
  egress:
  - to: [{podSelector: {}}]
    ports: [{protocol: UDP, port: 53}]
  ingressDeny:
  - from: [{ipBlock: {cidr: 198.51.100.0/24}}]
  egressDeny:
  - to: [{ipBlock: {cidr: 203.0.113.0/24}}]
    ports: [{protocol: SCTP}]
"#,
    )
    .expect("sample VeilPolicy");
    let value = serde_json::to_value(&policy).expect("serialize");
    assert_schema_keeps("VeilPolicy", &crds["VeilPolicy"].1, &value, "");
    let crd_typed: VeilPolicyCrd = serde_json::from_value(value.clone()).expect("as VeilPolicyCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);
    Policy::try_from(&policy).expect("sample is valid");

    let identity: VeilIdentity = serde_yaml::from_str(
        r#"
apiVersion: veil.dev/v1alpha1
kind: VeilIdentity
metadata: {name: "4711"}
spec:
  namespace: prod
  labels: {app: db, tier: backend}
"#,
    )
    .expect("sample VeilIdentity");
    let value = serde_json::to_value(&identity).expect("serialize");
    assert_schema_keeps("VeilIdentity", &crds["VeilIdentity"].1, &value, "");
    let crd_typed: VeilIdentityCrd =
        serde_json::from_value(value.clone()).expect("as VeilIdentityCrd");
    assert_eq!(serde_json::to_value(&crd_typed).expect("serialize"), value);
    PublishedIdentity::try_from(&identity).expect("sample is valid");
}

// ---------------------------------------------------------------- deploy/

/// Every file under deploy/ is part of a kustomization (nothing stray that
/// looks applicable but is not applied).
#[test]
fn every_manifest_in_deploy_is_rendered() {
    for dir in ["deploy/base", "deploy/example"] {
        let text = std::fs::read_to_string(root().join(dir).join("kustomization.yaml"))
            .expect("kustomization.yaml");
        let k = &documents(dir, &text)[0];
        for entry in std::fs::read_dir(root().join(dir)).expect("dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .to_string();
            if name == "kustomization.yaml" || !name.ends_with(".yaml") {
                continue;
            }
            let listed = k["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r.as_str() == Some(name.as_str()));
            assert!(
                listed,
                "{dir}/{name} is not in its kustomization's resources"
            );
        }
    }
    for entry in std::fs::read_dir(root().join("deploy")).expect("deploy/") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            path.is_dir() || name.ends_with(".md"),
            "deploy/{name}: manifests belong in deploy/base or an overlay"
        );
    }
}

fn container(ds: &DaemonSet) -> &Container {
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    one("container", &spec.containers)
}

fn env_value(d: &Deployment, c: &Container, name: &str) -> Option<String> {
    if let Some(e) = c.env.iter().flatten().find(|e| e.name == name) {
        return e.value.clone();
    }
    for from in c.env_from.iter().flatten() {
        let Some(cm) = &from.config_map_ref else {
            continue;
        };
        let map = d
            .config_maps
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(cm.name.as_str()))
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {} which is not deployed", cm.name));
        if let Some(v) = map.data.as_ref().and_then(|data| data.get(name)) {
            return Some(v.clone());
        }
    }
    None
}

/// The host path mounted at the container path that contains `path`.
fn host_path_of(ds: &DaemonSet, path: &str) -> Option<(String, Volume)> {
    let c = container(ds);
    let spec = ds.spec.as_ref()?.template.spec.as_ref()?;
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?
        .clone();
    Some((mount.mount_path.clone(), volume))
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` has no port"))
}

fn check_daemonset(dir: &str, d: &Deployment) {
    let ds = one("DaemonSet", &d.daemon_sets);
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    let c = container(ds);
    assert_eq!(pod.host_network, Some(true), "{dir}: hostNetwork");
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "{dir}"
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "{dir}: must run on every node, tainted or not"
    );

    // Capabilities: exactly NET_ADMIN, BPF and PERFMON, everything else dropped.
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false), "{dir}");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{dir}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{dir}");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.drop.clone().unwrap_or_default(),
        vec!["ALL".to_string()]
    );
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(
        added,
        ["BPF", "NET_ADMIN", "PERFMON"].map(String::from).into(),
        "{dir}: capabilities"
    );

    // The node name from the downward API.
    let node = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "VEIL_NODE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node.as_deref(), Some("spec.nodeName"), "{dir}: VEIL_NODE");

    // Host state where the agent keeps it.
    let host = |path: &str, host: &str, kind: &str| {
        let (_, volume) =
            host_path_of(ds, path).unwrap_or_else(|| panic!("{dir}: nothing mounted at {path}"));
        let hp = volume
            .host_path
            .unwrap_or_else(|| panic!("{dir}: {path} is not a hostPath"));
        assert!(
            Path::new(host).starts_with(&hp.path),
            "{dir}: {path} comes from host {}, expected {host}",
            hp.path
        );
        assert_eq!(hp.type_.as_deref(), Some(kind), "{dir}: {path}");
    };
    host("/dev/net/tun", "/dev/net/tun", "CharDevice");
    let key_dir = env_value(d, c, "VEIL_KEY_DIR").expect("VEIL_KEY_DIR");
    host(&key_dir, "/var/lib/veil/keys", "DirectoryOrCreate");
    let uapi = env_value(d, c, "VEIL_UAPI_SOCKET").expect("VEIL_UAPI_SOCKET");
    assert_eq!(
        uapi, "/var/run/wireguard/veil0.sock",
        "{dir}: `wg show veil0` reads this"
    );
    host(&uapi, "/var/run/wireguard", "DirectoryOrCreate");
    let authority = env_value(d, c, "VEIL_AUTHORITY_PUBLIC_KEY").expect("authority key");
    let (_, volume) = host_path_of(ds, &authority).expect("authority mount");
    assert!(
        volume.config_map.is_some(),
        "{dir}: the authority key comes from a ConfigMap"
    );

    // Ports and probes agree with the configuration.
    let metrics = env_value(d, c, "VEIL_METRICS_ADDR").expect("VEIL_METRICS_ADDR");
    assert!(
        c.args
            .iter()
            .flatten()
            .any(|a| a == "--metrics-addr=$(VEIL_METRICS_ADDR)"),
        "{dir}: --metrics-addr from the ConfigMap"
    );
    let port = |name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{dir}: no port named {name}"))
            .clone()
    };
    assert_eq!(port("health").container_port, port_of(&metrics), "{dir}");
    let listen: i32 = env_value(d, c, "VEIL_LISTEN_PORT")
        .and_then(|p| p.parse().ok())
        .expect("VEIL_LISTEN_PORT");
    let wg = port("wireguard");
    assert_eq!(
        (wg.container_port, wg.protocol.as_deref()),
        (listen, Some("UDP")),
        "{dir}"
    );
    let ready = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
    let ready = ready.unwrap_or_else(|| panic!("{dir}: readiness probe"));
    assert_eq!(ready.path.as_deref(), Some("/healthz"), "{dir}");
    assert_eq!(ready.port, IntOrString::String("health".into()), "{dir}");
    let live = c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref());
    let live = live.unwrap_or_else(|| panic!("{dir}: liveness probe"));
    assert_eq!(live.port, IntOrString::String("health".into()), "{dir}");

    // Service account, RBAC subject and admission policy name the same agent.
    let sa = one("ServiceAccount", &d.service_accounts);
    let sa_name = sa.metadata.name.clone().expect("name");
    let sa_ns = sa.metadata.namespace.clone().expect("namespace");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(sa_ns.as_str()));
    let binding = one("ClusterRoleBinding", &d.bindings);
    let subject = one("subject", binding.subjects.as_deref().unwrap_or_default());
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", sa_name.as_str(), Some(sa_ns.as_str()))
    );
    let role = role(d, "veil-agent");
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            Some(binding.role_ref.name.as_str())
        ),
        ("ClusterRole", role.metadata.name.as_deref())
    );
    let ns = one("Namespace", &d.namespaces);
    assert_eq!(ns.metadata.name.as_deref(), Some(sa_ns.as_str()));

    // The enable flag object is the one the agent reads, and valid.
    let config = one("VeilClusterConfig", &d.cluster_configs);
    assert_eq!(config.metadata.name.as_deref(), Some("default"));
    ClusterConfig::try_from(&config.spec).expect("valid VeilClusterConfig");
}

#[test]
fn deploy_base_parses_and_daemonset_is_complete() {
    let d = parse_deployment("deploy/base");
    check_daemonset("deploy/base", &d);
    let config = one("VeilClusterConfig", &d.cluster_configs);
    let config = ClusterConfig::try_from(&config.spec).expect("valid");
    assert!(
        !config.encryption_enabled && config.strict,
        "base: off, strict"
    );
}

#[test]
fn deploy_example_overrides_the_settings() {
    let d = parse_deployment("deploy/example");
    check_daemonset("deploy/example", &d);
    let config = one("VeilClusterConfig", &d.cluster_configs);
    let config = ClusterConfig::try_from(&config.spec).expect("valid");
    assert!(
        config.encryption_enabled && config.strict,
        "example: on, strict"
    );
    let c = container(one("DaemonSet", &d.daemon_sets));
    assert_eq!(
        env_value(&d, c, "VEIL_LISTEN_PORT").as_deref(),
        Some("51821")
    );
}

#[test]
fn daemonset_only_passes_what_the_agent_accepts() {
    let out = Command::new(AGENT_BIN)
        .arg("--help")
        .output()
        .expect("run veil-agent --help");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "veil-agent --help failed: {help}");
    let d = parse_deployment("deploy/base");
    let c = container(one("DaemonSet", &d.daemon_sets));
    let mut given: BTreeSet<String> = c.env.iter().flatten().map(|e| e.name.clone()).collect();
    for map in &d.config_maps {
        given.extend(map.data.iter().flatten().map(|(k, _)| k.clone()));
    }
    // Variables only expanded into args (`$(NAME)`) are not the agent's.
    let expanded = |name: &str| {
        c.args
            .iter()
            .flatten()
            .any(|a| a.contains(&format!("$({name})")))
    };
    for name in given.iter().filter(|n| !expanded(n)) {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "the DaemonSet sets {name}, which veil-agent does not read:\n{help}"
        );
    }
    for arg in c.args.iter().flatten() {
        let flag = arg.split('=').next().unwrap_or_default();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "the DaemonSet passes {flag}, which veil-agent does not accept:\n{help}"
        );
    }
    // Every required option is given (clap lists them in the usage line).
    let usage = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_default();
    for word in usage.split_whitespace().filter(|w| w.starts_with("--")) {
        let flag = word.trim_start_matches('[');
        // The option's own entry is its last mention (the usage line
        // names it first).
        let by_env = help
            .rsplit(&format!("{flag} "))
            .next()
            .and_then(|rest| rest.split("[env: ").nth(1))
            .and_then(|rest| rest.split('=').next())
            .map(str::to_string);
        let by_arg = c.args.iter().flatten().any(|a| a.starts_with(flag));
        assert!(
            by_arg || by_env.as_ref().is_some_and(|e| given.contains(e)),
            "veil-agent requires {flag} (env {by_env:?}), which the DaemonSet does not give"
        );
    }
}

#[test]
fn cluster_role_grants_exactly_the_api_access() {
    for dir in ["deploy/base", "deploy/example"] {
        let d = parse_deployment(dir);
        let names: BTreeSet<_> = d
            .cluster_roles
            .iter()
            .filter_map(|r| r.metadata.name.as_deref())
            .collect();
        assert_eq!(
            names,
            BTreeSet::from(["veil-agent", "veil-operator"]),
            "{dir}"
        );
        for (name, needed) in [
            ("veil-agent", access_set(API_ACCESS)),
            ("veil-operator", access_set(CTL_ACCESS)),
        ] {
            let granted = granted(&format!("{dir}: {name}"), role(&d, name));
            let extra: Vec<_> = granted.difference(&needed).collect();
            let missing: Vec<_> = needed.difference(&granted).collect();
            assert!(
                extra.is_empty() && missing.is_empty(),
                "{dir}: ClusterRole {name} grants more than it needs: {extra:?}; less: {missing:?}"
            );
        }
        // The operators' role is for people to bind; the agent never gets it.
        assert!(
            d.bindings
                .iter()
                .all(|b| b.role_ref.name != "veil-operator"),
            "{dir}: veil-operator must not be bound by the base"
        );
    }
}

#[test]
fn admission_policy_binds_veilnode_writes_to_the_token_node() {
    let d = parse_deployment("deploy/base");
    let vap = one("ValidatingAdmissionPolicy", &d.policies);
    let spec = vap.spec.as_ref().expect("spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|m| m.resource_rules.clone())
        .unwrap_or_default();
    let mut covered = BTreeSet::new();
    for r in &rules {
        assert_eq!(
            r.api_groups.clone().unwrap_or_default(),
            vec!["veil.dev".to_string()]
        );
        for res in r.resources.iter().flatten() {
            for op in r.operations.iter().flatten() {
                covered.insert((res.clone(), op.clone()));
            }
        }
    }
    // Every write the agent may make to a VeilNode (API_ACCESS) is covered.
    for a in API_ACCESS
        .iter()
        .filter(|a| a.resource.starts_with("veilnodes"))
    {
        for op in ["CREATE", "UPDATE"] {
            if a.verbs
                .iter()
                .any(|v| matches!(*v, "create" | "patch" | "update"))
            {
                assert!(
                    covered.contains(&(a.resource.to_string(), op.to_string())),
                    "{} {op} not covered",
                    a.resource
                );
            }
        }
    }
    // Scoped to the agent's service account, whatever its namespace.
    let sa = one("ServiceAccount", &d.service_accounts);
    let sa_name = sa.metadata.name.clone().expect("name");
    let conditions = spec.match_conditions.clone().unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.expression.contains(&format!("endsWith(':{sa_name}')"))),
        "matchConditions must select the agent's service account: {conditions:?}"
    );
    let variables: BTreeSet<String> = spec
        .variables
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let validations = spec.validations.clone().unwrap_or_default();
    let expr = &one("validation", &validations).expression;
    assert!(expr.contains("request.userInfo.extra['authentication.kubernetes.io/node-name']"));
    // Every `variables.x` used is declared.
    let mut all_cel: Vec<String> = validations
        .iter()
        .flat_map(|v| [Some(v.expression.clone()), v.message_expression.clone()])
        .flatten()
        .collect();
    all_cel.extend(
        spec.variables
            .iter()
            .flatten()
            .map(|v| v.expression.clone()),
    );
    all_cel.extend(conditions.iter().map(|c| c.expression.clone()));
    for e in &all_cel {
        for used in e.split("variables.").skip(1) {
            let name: String = used
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            assert!(
                variables.contains(&name),
                "`variables.{name}` is not declared"
            );
        }
        let site = RuleSite {
            kind: "ValidatingAdmissionPolicy".into(),
            path: String::new(),
            rule: e.clone(),
            message: "-".into(),
            node: json!({}),
            arrays: vec![],
        };
        let problems: Vec<_> = check_rule(&site)
            .into_iter()
            .filter(|p| !p.contains("unknown CEL function"))
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
    }
    let binding = one("ValidatingAdmissionPolicyBinding", &d.policy_bindings);
    let bspec = binding.spec.as_ref().expect("binding spec");
    assert_eq!(bspec.policy_name.as_deref(), vap.metadata.name.as_deref());
    assert_eq!(
        bspec.validation_actions.clone().unwrap_or_default(),
        vec!["Deny".to_string()]
    );
}

// ---------------------------------------------------------------- API use

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// The RBAC view of one HTTP request: `(group, resource[/subresource], verbs)`.
/// Mirrors the API server's request-info parsing (k8s.io/apiserver
/// `RequestInfoFactory`) for the request shapes a client sends.
fn rbac_of(method: &Method, uri: &http::Uri, content_type: &str) -> Vec<(String, String, String)> {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let (group, mut rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not a resource path: {uri}"),
    };
    if rest.len() >= 3 && rest[0] == "namespaces" {
        rest = &rest[2..];
    }
    let resource = match rest {
        [r] | [r, _] => r.to_string(),
        [r, _, sub] => format!("{r}/{sub}"),
        _ => panic!("unexpected path {uri}"),
    };
    let named = rest.len() >= 2;
    let watch = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verbs: Vec<&str> = match (method.as_str(), named, watch) {
        ("GET", _, true) => vec!["watch"],
        ("GET", false, false) => vec!["list"],
        ("GET", true, false) => vec!["get"],
        ("POST", ..) => vec!["create"],
        ("PUT", ..) => vec!["update"],
        // An apply may create the object; a subresource apply never does.
        ("PATCH", ..) if content_type.starts_with("application/apply-patch") && rest.len() == 2 => {
            vec!["patch", "create"]
        }
        ("PATCH", ..) => vec!["patch"],
        ("DELETE", true, _) => vec!["delete"],
        ("DELETE", false, _) => vec!["deletecollection"],
        (m, ..) => panic!("unexpected method {m} {uri}"),
    };
    verbs
        .into_iter()
        .map(|v| (group.to_string(), resource.clone(), v.to_string()))
        .collect()
}

#[test]
fn rbac_of_understands_request_shapes() {
    let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
    assert_eq!(
        rbac_of(&Method::GET, &uri("/api/v1/namespaces?limit=500"), ""),
        vec![("".into(), "namespaces".into(), "list".into())]
    );
    assert_eq!(
        rbac_of(
            &Method::GET,
            &uri("/api/v1/namespaces/prod/pods?watch=true&resourceVersion=1"),
            ""
        ),
        vec![("".into(), "pods".into(), "watch".into())]
    );
    assert_eq!(
        rbac_of(
            &Method::PATCH,
            &uri("/apis/veil.dev/v1alpha1/veilnodes/n1/status?fieldManager=x"),
            "application/apply-patch+yaml"
        ),
        vec![("veil.dev".into(), "veilnodes/status".into(), "patch".into())]
    );
    assert_eq!(
        rbac_of(&Method::DELETE, &uri("/api/v1/namespaces/prod"), "").len(),
        1
    );
}

fn respond(send: tower_test::mock::SendResponse<Response<ResponseBody>>, body: Value) {
    let bytes = Bytes::from(serde_json::to_vec(&body).expect("json"));
    send.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(bytes).boxed_unsync())
            .expect("response"),
    );
}

/// The `(group, resource, verb)` of every request a mock API server saw.
type Recorded = std::sync::Arc<parking_lot::Mutex<BTreeSet<(String, String, String)>>>;

/// A mock API server that records the RBAC view of every request: empty
/// lists, watches held open, creates and applies echoed, the identity the
/// agent test creates served back on `get`, everything else 404 (recorded
/// too, so comparisons name it). Returns a client for it and the record.
fn recording_api() -> (kube::Client, tokio::task::JoinHandle<()>, Recorded) {
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<ResponseBody>>();
    let client = kube::Client::new(service, "default");
    let recorded = std::sync::Arc::new(parking_lot::Mutex::new(BTreeSet::new()));
    let log = std::sync::Arc::clone(&recorded);
    // The mock API server: empty lists, watches held open, applies echoed.
    let server = tokio::spawn(async move {
        let mut open_watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let content_type = request
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let (method, uri) = (request.method().clone(), request.uri().clone());
            let access = rbac_of(&method, &uri, &content_type);
            log.lock().extend(access.iter().cloned());
            let verb = access[0].2.as_str();
            match verb {
                "watch" => {
                    let (tx, rx) = fmpsc::unbounded::<Bytes>();
                    let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
                    send.send_response(
                        Response::builder()
                            .status(StatusCode::OK)
                            .header("content-type", "application/json")
                            .body(BodyExt::boxed_unsync(body))
                            .expect("response"),
                    );
                    open_watches.push(tx);
                }
                "list" => respond(
                    send,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}),
                ),
                "create" => {
                    let bytes = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut echo: Value = serde_json::from_slice(&bytes).unwrap_or(json!({}));
                    echo["metadata"]["resourceVersion"] = json!("2");
                    echo["metadata"]["uid"] = json!("u-1");
                    let bytes = Bytes::from(serde_json::to_vec(&echo).expect("json"));
                    send.send_response(
                        Response::builder()
                            .status(StatusCode::CREATED)
                            .header("content-type", "application/json")
                            .body(Full::new(bytes).boxed_unsync())
                            .expect("response"),
                    );
                }
                // The identity the test created, as it was stored.
                "get" if access[0].1 == "veilidentities" => respond(
                    send,
                    json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilIdentity",
                        "metadata": {"name": "4711", "uid": "u-1", "resourceVersion": "2"},
                        "spec": {"namespace": "prod", "labels": {"app": "db"}}}),
                ),
                "delete" => respond(
                    send,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 200}),
                ),
                "patch" => {
                    let bytes = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut echo: Value = serde_json::from_slice(&bytes).unwrap_or(json!({}));
                    echo["metadata"]["resourceVersion"] = json!("2");
                    respond(send, echo);
                }
                // Recorded above, so the comparison below names it.
                _ => {
                    let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound", "message": format!("not served by this mock: {method} {uri}")});
                    let bytes = Bytes::from(serde_json::to_vec(&status).expect("json"));
                    send.send_response(
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .header("content-type", "application/json")
                            .body(Full::new(bytes).boxed_unsync())
                            .expect("response"),
                    );
                }
            }
        }
    });

    (client, server, recorded)
}

#[tokio::test]
async fn kube_source_uses_exactly_the_api_access() {
    let (client, server, recorded) = recording_api();
    let source = KubeSource::start(client, KubeSourceConfig::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !source.synced() {
        assert!(
            Instant::now() < deadline,
            "kube source never synced against the mock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node: VeilNode = serde_yaml::from_str(
        "apiVersion: veil.dev/v1alpha1\nkind: VeilNode\nmetadata: {name: n1}\nspec:\n  publicKey: CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n  podCIDRs: [10.244.1.0/24]\n",
    )
    .expect("sample");
    let announcement = Announcement::try_from(&node).expect("valid sample");
    source
        .publish_announcement(&announcement)
        .await
        .expect("publish");
    source
        .patch_node_status("n1", &json!({"keySince": 1}))
        .await
        .expect("node status");
    source
        .patch_cluster_config_status(&json!({"conditions": []}))
        .await
        .expect("config status");
    let key = IdentityKey {
        namespace: "prod".into(),
        labels: BTreeMap::from([("app".to_string(), "db".to_string())]),
    };
    let created = source
        .create_identity(Identity(4711), &key)
        .await
        .expect("create identity");
    assert_eq!(created, veil::identity::Created::Created);
    assert!(
        source
            .delete_identity(Identity(4711), &key)
            .await
            .expect("delete identity"),
        "the identity read back holds the key, so it is deleted"
    );
    drop(source);
    server.abort();

    let used: BTreeSet<(String, String, String)> = recorded.lock().clone();
    let declared = api_access();
    assert_eq!(
        used, declared,
        "the kube source's requests differ from API_ACCESS (src/cluster/kube/access.rs); \
         update it and deploy/base/rbac.yaml together"
    );
}

/// Every API call `veilctl` can make in Kubernetes mode (all of them go
/// through `Store::Kube` and `kube::ctl`), recorded, must be exactly
/// `CTL_ACCESS`, which `veil-operator` grants (test above).
#[tokio::test]
async fn veilctl_uses_exactly_the_ctl_access() {
    use veil::cluster::store::Store;
    let (client, server, recorded) = recording_api();
    let store = Store::Kube(client.clone());
    store
        .load()
        .await
        .expect("load (status, policy trace, keys status)");
    veil::cluster::kube::ctl::set_encryption(&client, true, None)
        .await
        .expect("enable");
    let authority = keymgr::AuthorityKey::from_seed([1; 32]);
    let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
    let cert = authority
        .certify("n1", identity, 1_000, 2_000)
        .expect("certificate");
    // `node approve` and `keys rotate` are a load plus these writes (their
    // checks refuse on the mock's empty state, so the writes are called
    // directly).
    store.write_certificate(&cert).await.expect("node approve");
    store.write_rotation("n1", 2).await.expect("keys rotate");
    let node: VeilNode = serde_yaml::from_str(
        "apiVersion: veil.dev/v1alpha1\nkind: VeilNode\nmetadata: {name: ext}\nspec:\n  publicKey: CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n  podCIDRs: [10.250.0.0/24]\n",
    )
    .expect("sample");
    let announcement = Announcement::try_from(&node).expect("valid sample");
    store
        .write_announcement(&announcement)
        .await
        .expect("peer add");
    drop(store);
    drop(client);
    server.abort();
    let used: BTreeSet<(String, String, String)> = recorded.lock().clone();
    assert_eq!(
        used,
        access_set(CTL_ACCESS),
        "veilctl's requests differ from CTL_ACCESS (src/cluster/kube/access.rs); \
         update it and the veil-operator role in deploy/base/rbac.yaml together"
    );
}

// ---------------------------------------------------------------- capabilities

/// The capability bits of `/proc/PID/status` (`CapEff:` etc.).
fn cap_mask(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}

/// Bit numbers from linux/capability.h.
fn cap_bit(name: &str) -> u64 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not known to this test"),
    }
}

/// The claim in the DaemonSet's comments: NET_ADMIN, BPF and PERFMON are
/// enough (without PERFMON the verifier refuses `from_pod`). The
/// agent runs as root with its bounding set cut to the DaemonSet's list (as
/// a container runtime does), on a 2-node cluster in strict mode: it must
/// load and attach its BPF programs, bring up WireGuard with a normal peer
/// and carry pod traffic encrypted both ways, with no permission error.
#[test]
fn agent_works_with_only_the_daemonset_capabilities() {
    use harness::agent::{wg_dump, CA_DIR, TUN_NAME};
    use harness::fixture::Fixture;
    use harness::netns::require_root;
    use harness::process::Bg;
    use harness::topology::WG_PORT;
    use harness::traffic::{canary, tcp, warm_up};

    require_root();
    let d = parse_deployment("deploy/base");
    let caps: Vec<String> = container(one("DaemonSet", &d.daemon_sets))
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .expect("capabilities.add");
    let mask = caps.iter().fold(0u64, |m, c| m | 1 << cap_bit(c));
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");

    let mut f = Fixture::new(2, 1, true, true);
    let (node_ns, node_name) = {
        let n = f.topo.node(1);
        (n.ns.name().to_string(), n.name.clone())
    };
    let ca = f.work().join(CA_DIR);
    let key_dir = f.work().join("keys-restricted");
    std::fs::create_dir_all(&key_dir).expect("key dir");
    let uapi_name = node_ns.clone();
    let uapi = format!("/var/run/wireguard/{uapi_name}.sock");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node_ns, "setpriv"])
        .arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", "--"])
        .arg(AGENT_BIN)
        .args(["--node", &node_name, "--cluster-dir"])
        .arg(f.dir.path())
        .arg("--key-dir")
        .arg(&key_dir)
        .args(["--uapi-socket", &uapi, "--tun-name", TUN_NAME])
        .args(["--listen-port", &WG_PORT.to_string(), "--mtu", "1420"])
        .arg("--authority-public-key")
        .arg(ca.join("authority.pub"))
        .arg("--auto-approve-with")
        .arg(&ca)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,veil=debug");
    let log = f.work().join("agent-restricted.log");
    let mut agent = Bg::spawn("veil-agent with the DaemonSet's capabilities", cmd, &log);

    // `ip netns exec` and `setpriv` exec in place: the pid becomes the agent.
    let pid = agent.pid();
    let caps_seen = harness::poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "veil-agent").then(|| (cap_mask(pid, "CapEff:"), cap_mask(pid, "CapBnd:")))
    });
    assert_eq!(
        caps_seen,
        Some((Some(mask), Some(mask))),
        "the agent must run with exactly {caps:?} (mask {mask:#x}); log:\n{}",
        agent.log()
    );

    let ready = harness::poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        if !agent.is_running() {
            return Some(false);
        }
        (f.dir.announcement(&node_name).is_some() && Path::new(&uapi).exists()).then_some(true)
    });
    assert_eq!(
        ready,
        Some(true),
        "restricted agent not ready:\n{}",
        agent.log()
    );
    f.start_agents(&[2], 1);
    let peered = harness::poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        wg_dump(&node_ns, &uapi_name)
            .ok()
            .filter(|d| d.peers.len() == 1)
    });
    assert!(
        peered.is_some(),
        "restricted agent has no peer:\n{}",
        agent.log()
    );

    // Its BPF program is attached to the pod's veth.
    let pod = f.topo.pod(1, 0);
    let filters =
        f.topo
            .node(1)
            .ns
            .exec_ok(&["tc", "filter", "show", "dev", &pod.host_if, "ingress"]);
    assert!(
        filters.contains("bpf"),
        "no BPF filter on {}: {filters}",
        pod.host_if
    );

    let canary = canary("caps");
    let cap = f.capture();
    let (a, b) = (f.topo.pod(1, 0), f.topo.pod(2, 0));
    warm_up(&[(a, b)], &canary);
    for (from, to) in [(a, b), (b, a)] {
        let t = tcp(from, to.ip, 64 * 1024, &canary, Duration::from_secs(10));
        assert!(
            t.ok,
            "tcp {} -> {}: {}\n{}",
            from.label(),
            to.label(),
            t.output,
            agent.log()
        );
    }
    f.finish(cap, &canary)
        .assert_clean("pod traffic through the agent holding only the DaemonSet's capabilities");

    assert!(
        agent.is_running(),
        "restricted agent died:\n{}",
        agent.log()
    );
    // The data-path threads' real-time priority needs CAP_SYS_NICE, which
    // the DaemonSet does not grant on purpose: the agent logs that it runs
    // them at the default priority and carries on. Every other permission
    // error counts.
    let text: String = agent
        .log()
        .lines()
        .filter(|l| !l.contains("cannot raise the thread's priority"))
        .map(|l| format!("{l}\n"))
        .collect();
    for bad in ["Operation not permitted", "EPERM", "Permission denied"] {
        assert!(
            !text.contains(bad),
            "permission error with the DaemonSet's capabilities:\n{text}"
        );
    }
}

// ---------------------------------------------------------------- CEL, evaluated

/// The CRD's schema with a rule-free `metadata` (the API server's own) and
/// the object's errors from kube-cel, which implements the Kubernetes CEL
/// libraries (`isCIDR`, `isIP`, strings) the API server evaluates.
fn cel_errors(schema: &Value, object: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn cel_rules_compile_within_budget() {
    let crds = committed_crds();
    for (kind, (_, schema)) in &crds {
        let compiled = kube_cel::compile_schema(schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{kind}: rules do not compile: {errors:?}"
        );
        let mut sites = Vec::new();
        collect_rules(kind, schema, "", &[], &mut sites);
        assert!(!sites.is_empty(), "{kind}: no rules");
        for site in &sites {
            let node = kube_cel::compile_schema(&site.node);
            let warnings =
                kube_cel::analyze_rule(&site.rule, &node, kube_cel::ScopeContext::CrdValidation);
            // kube-cel's scope check does not know comprehension variables
            // (`c` in `self.all(c, ...)`); every other warning counts.
            let warnings: Vec<_> = warnings
                .into_iter()
                .filter(|w| w.kind != kube_cel::WarningKind::WrongScope)
                .collect();
            assert!(
                warnings.is_empty(),
                "{kind} {}: `{}`: {warnings:?}",
                site.path,
                site.rule
            );
        }
    }
}

/// `(sample, expected message fragment)`: `None` = must be admitted.
fn check_samples(kind: &str, schema: &Value, cases: &[(Value, Option<&str>)]) {
    for (object, expect) in cases {
        let errors = cel_errors(schema, object);
        match expect {
            None => assert!(
                errors.is_empty(),
                "{kind}: valid sample refused: {errors:?}\n{object}"
            ),
            Some(fragment) => assert!(
                errors.iter().any(|e| e.contains(fragment)),
                "{kind}: expected an error containing `{fragment}`, got {errors:?}\n{object}"
            ),
        }
    }
}

#[test]
fn cel_rules_catch_mistakes_in_veil_nodes() {
    let crds = committed_crds();
    let schema = &crds["VeilNode"].1;
    let node = |spec: Value| {
        let mut s = json!({
            "publicKey": "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=",
            "podCIDRs": ["10.244.1.0/24"],
        });
        if let (Some(s), Some(extra)) = (s.as_object_mut(), spec.as_object()) {
            s.extend(extra.clone());
        }
        json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilNode", "metadata": {"name": "n1"}, "spec": s})
    };
    check_samples(
        "VeilNode",
        schema,
        &[
            (node(json!({})), None),
            (
                node(json!({"podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]})),
                None,
            ),
            (node(json!({"endpoint": "198.18.0.1:51820"})), None),
            (node(json!({"endpoint": "[fd00::1]:51821"})), None),
            (node(json!({"notBefore": 10, "notAfter": 20})), None),
            (
                node(json!({"podCIDRs": ["10.244.300.0/24"]})),
                Some("must be a CIDR"),
            ),
            (
                node(json!({"podCIDRs": ["10.244.1.0"]})),
                Some("must be a CIDR"),
            ),
            (
                node(json!({"endpoint": "198.18.0.1"})),
                Some("must be ip:port"),
            ),
            (
                node(json!({"endpoint": "198.18.0.999:51820"})),
                Some("must be ip:port"),
            ),
            (
                node(json!({"endpoint": "fd00::1:51820"})),
                Some("must be ip:port"),
            ),
            (
                node(json!({"endpoint": "node1.example:51820"})),
                Some("must be ip:port"),
            ),
            (node(json!({"endpoint": "198.18.0.1:0"})), Some("1-65535")),
            (
                node(json!({"endpoint": "[fd00::1]:65536"})),
                Some("1-65535"),
            ),
            (
                node(json!({"notBefore": 20, "notAfter": 10})),
                Some("notAfter must be later"),
            ),
        ],
    );
}

#[test]
fn cel_rules_catch_mistakes_in_the_cluster_config() {
    let crds = committed_crds();
    let schema = &crds["VeilClusterConfig"].1;
    let config = |name: &str, spec: Value| json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilClusterConfig", "metadata": {"name": name}, "spec": spec});
    check_samples(
        "VeilClusterConfig",
        schema,
        &[
            (
                config("default", json!({"encryption": {"enabled": true}})),
                None,
            ),
            (
                config(
                    "default",
                    json!({"clusterPodCIDRs": ["10.244.0.0/16", "fd00:244::/56"]}),
                ),
                None,
            ),
            (
                config("prod", json!({})),
                Some("the only VeilClusterConfig is named `default`"),
            ),
            (
                config("default", json!({"clusterPodCIDRs": ["10.244.0.0/40"]})),
                Some("must be a CIDR"),
            ),
        ],
    );
}

#[test]
fn cel_rules_catch_mistakes_in_veil_policies() {
    let crds = committed_crds();
    let schema = &crds["VeilPolicy"].1;
    let policy = |rule: Value| {
        json!({
            "apiVersion": "veil.dev/v1alpha1", "kind": "VeilPolicy",
            "metadata": {"name": "p", "namespace": "prod"},
            "spec": {"podSelector": {}, "ingress": [rule.clone()], "egressDeny": [{"to": rule["from"].clone(), "ports": rule["ports"].clone()}]},
        })
    };
    let ports = |p: Value| policy(json!({"from": [{"podSelector": {}}], "ports": [p]}));
    let block = |b: Value| policy(json!({"from": [{"ipBlock": b}], "ports": [{"port": 80}]}));
    check_samples(
        "VeilPolicy",
        schema,
        &[
            (
                ports(json!({"protocol": "TCP", "port": 8000, "endPort": 8080})),
                None,
            ),
            (ports(json!({"protocol": "UDP", "port": 53})), None),
            (ports(json!({"port": "metrics"})), None),
            (ports(json!({"protocol": "SCTP"})), None),
            (
                block(json!({"cidr": "192.0.2.0/24", "except": ["192.0.2.8/29"]})),
                None,
            ),
            (
                ports(json!({"port": 8080, "endPort": 8000})),
                Some("endPort needs a numeric port"),
            ),
            (
                ports(json!({"port": "metrics", "endPort": 9000})),
                Some("endPort needs a numeric port"),
            ),
            (
                ports(json!({"endPort": 9000})),
                Some("endPort needs a numeric port"),
            ),
            (ports(json!({"port": 0})), Some("port must be 1-65535")),
            (ports(json!({"port": 70000})), Some("port must be 1-65535")),
            (
                ports(json!({"protocol": "ICMP", "port": 1})),
                Some("protocol must be TCP, UDP or SCTP"),
            ),
            (
                block(json!({"cidr": "192.0.2.0"})),
                Some("ipBlock.cidr must be a CIDR"),
            ),
            (
                block(json!({"cidr": "192.0.2.0/24", "except": ["nope"]})),
                Some("ipBlock.except"),
            ),
        ],
    );
}

#[test]
fn cel_rules_catch_mistakes_in_veil_identities() {
    let crds = committed_crds();
    let schema = &crds["VeilIdentity"].1;
    let identity = |name: &str, labels: Value| json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilIdentity", "metadata": {"name": name}, "spec": {"namespace": "prod", "labels": labels}});
    let number = "must be an identity number";
    check_samples(
        "VeilIdentity",
        schema,
        &[
            (identity("4711", json!({"app": "db"})), None),
            (identity("256", json!({})), None),
            (identity("16711679", json!({"app": "db"})), None),
            (identity("255", json!({})), Some(number)),
            (identity("16711680", json!({})), Some(number)),
            (identity("04711", json!({})), Some(number)),
            (identity("db", json!({})), Some(number)),
            (identity("99999999999", json!({})), Some(number)),
        ],
    );
    // The Rust reader agrees on every name the schema admits or refuses.
    for name in ["256", "4711", "16711679", "255", "16711680", "04711", "db"] {
        let object = identity(name, json!({}));
        let typed: VeilIdentity = serde_json::from_value(object.clone()).expect("typed");
        assert_eq!(
            cel_errors(schema, &object).is_empty(),
            PublishedIdentity::try_from(&typed).is_ok(),
            "{name}"
        );
    }
    // Updates: the label set of a number never changes.
    let old = identity("4711", json!({"app": "db"}));
    let same = identity("4711", json!({"app": "db"}));
    let edited = identity("4711", json!({"app": "web"}));
    let update = |new: &Value| match kube_cel::Validator::new().validate(schema, new, Some(&old)) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
    };
    assert!(update(&same).is_empty(), "{:?}", update(&same));
    assert!(
        update(&edited)
            .iter()
            .any(|e| e.contains("spec is immutable")),
        "{:?}",
        update(&edited)
    );
}

#[test]
fn cel_rules_catch_mistakes_in_certificates_and_rotations() {
    let crds = committed_crds();
    let authority = keymgr::AuthorityKey::from_seed([1; 32]);
    let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
    let cert = authority
        .certify("n1", identity, 1_000, 2_000)
        .expect("certificate");
    let sample =
        serde_json::to_value(veil::cluster::trust::CertificateObject::new(&cert)).expect("JSON");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut o = sample.clone();
        f(&mut o);
        o
    };
    let name = "must be the node's name";
    let schema = &crds["VeilNodeCertificate"].1;
    check_samples(
        "VeilNodeCertificate",
        schema,
        &[
            (sample.clone(), None),
            (
                with(&|o| o["metadata"]["name"] = json!("ip-10-0-0-1.ec2.internal")),
                None,
            ),
            (with(&|o| o["metadata"]["name"] = json!("N1")), Some(name)),
            (with(&|o| o["metadata"]["name"] = json!("n1.")), Some(name)),
            (with(&|o| o["metadata"]["name"] = json!("-n1")), Some(name)),
            (
                with(&|o| o["spec"]["notAfter"] = json!(1_000)),
                Some("notAfter must be later than notBefore"),
            ),
        ],
    );
    let rotation = |n: &str| json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilKeyRotation", "metadata": {"name": n}, "spec": {"generation": 2}});
    let rschema = &crds["VeilKeyRotation"].1;
    check_samples(
        "VeilKeyRotation",
        rschema,
        &[(rotation("n1"), None), (rotation("n_1"), Some(name))],
    );
    // The schema admits exactly the names the agent's reader takes.
    for n in [
        "n1",
        "a.b-c",
        "ip-10-0-0-1.ec2.internal",
        "N1",
        "n1.",
        "a..b",
        "-a",
        "a-",
        "n_1",
    ] {
        let object = rotation(n);
        let typed: veil::cluster::trust::RotationObject =
            serde_json::from_value(object.clone()).expect("typed");
        assert_eq!(
            cel_errors(rschema, &object).is_empty(),
            veil::cluster::trust::rotation_of(&typed).is_ok(),
            "{n}"
        );
    }
    // Plain OpenAPI bounds.
    let generation = lookup(rschema, &["spec", "generation"]).expect("generation");
    assert_eq!(generation["minimum"].as_f64(), Some(1.0));
    let key = lookup(schema, &["spec", "identityKey"]).expect("identityKey");
    assert!(key["pattern"].as_str().is_some_and(|p| p.contains("{43}=")));
    let blob = lookup(schema, &["spec", "certificate"]).expect("certificate");
    assert_eq!(blob["maxLength"].as_u64(), Some(1024));
}

/// The admission policy's CEL, evaluated on the requests an agent makes,
/// with `request` shaped as the API server's AdmissionRequest
/// (`userInfo.username`, `userInfo.extra`).
#[test]
fn admission_policy_lets_an_agent_write_only_its_own_node() {
    use kube_cel::cel::{Context, Program, Value as Cel};
    use kube_cel::KubeCelExt;

    let d = parse_deployment("deploy/base");
    let spec = one("ValidatingAdmissionPolicy", &d.policies)
        .spec
        .clone()
        .expect("spec");
    let compile =
        |e: &str| Program::compile(e).unwrap_or_else(|err| panic!("`{e}` does not compile: {err}"));
    let conditions: Vec<Program> = spec
        .match_conditions
        .iter()
        .flatten()
        .map(|c| compile(&c.expression))
        .collect();
    let variables: Vec<(String, Program)> = spec
        .variables
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), compile(&v.expression)))
        .collect();
    let validations: Vec<(Program, Option<Program>)> = spec
        .validations
        .iter()
        .flatten()
        .map(|v| {
            (
                compile(&v.expression),
                v.message_expression.as_deref().map(compile),
            )
        })
        .collect();

    let sa = "system:serviceaccount:veil-system:veil-agent";
    // None: admitted (or the policy does not apply); Some(message): denied.
    let admit = |user: &str, node: Option<&str>, op: &str, target: &str| -> Option<String> {
        let mut user_info = json!({"username": user, "groups": ["system:serviceaccounts"]});
        if let Some(node) = node {
            user_info["extra"] = json!({"authentication.kubernetes.io/node-name": [node]});
        }
        let vn = json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilNode", "metadata": {"name": target}});
        let (object, old) = match op {
            "DELETE" => (Value::Null, vn),
            "UPDATE" => (vn.clone(), vn),
            _ => (vn, Value::Null),
        };
        let request = json!({
            "operation": op, "name": target, "userInfo": user_info,
            "resource": {"group": "veil.dev", "version": "v1alpha1", "resource": "veilnodes"},
        });
        let mut ctx = Context::default();
        ctx.register_all();
        ctx.add_variable("request", request).expect("request");
        ctx.add_variable("object", object).expect("object");
        ctx.add_variable("oldObject", old).expect("oldObject");
        for c in &conditions {
            match c.execute(&ctx) {
                Ok(Cel::Bool(true)) => {}
                Ok(Cel::Bool(false)) => return None,
                other => panic!("matchCondition for {user}: {other:?}"),
            }
        }
        let mut vars = serde_json::Map::new();
        for (name, p) in &variables {
            ctx.add_variable("variables", Value::Object(vars.clone()))
                .expect("variables");
            let v = p
                .execute(&ctx)
                .unwrap_or_else(|e| panic!("variable {name}: {e:?}"));
            let v = match v {
                Cel::String(s) => json!(s.as_str()),
                other => panic!("variable {name} is {other:?}"),
            };
            vars.insert(name.clone(), v);
        }
        ctx.add_variable("variables", Value::Object(vars))
            .expect("variables");
        for (v, message) in &validations {
            match v.execute(&ctx) {
                Ok(Cel::Bool(true)) => {}
                Ok(Cel::Bool(false)) => {
                    let text = message
                        .as_ref()
                        .map(|m| match m.execute(&ctx) {
                            Ok(Cel::String(s)) => s.to_string(),
                            other => panic!("messageExpression: {other:?}"),
                        })
                        .unwrap_or_default();
                    return Some(text);
                }
                other => panic!("validation for {user} on {target}: {other:?}"),
            }
        }
        None
    };
    let denied = |r: Option<String>| r.is_some();

    assert!(
        !denied(admit(sa, Some("n1"), "CREATE", "n1")),
        "own VeilNode, create"
    );
    assert!(
        !denied(admit(sa, Some("n1"), "UPDATE", "n1")),
        "own VeilNode, update"
    );
    assert!(
        !denied(admit(sa, Some("n1"), "DELETE", "n1")),
        "own VeilNode, delete"
    );
    let other = admit(sa, Some("n1"), "UPDATE", "n2");
    assert!(
        other.as_deref().is_some_and(|m| m.contains("VeilNode n2")),
        "another node's VeilNode must be refused with a message naming it: {other:?}"
    );
    assert!(denied(admit(sa, Some("n1"), "CREATE", "n2")));
    assert!(denied(admit(sa, Some("n1"), "DELETE", "n2")));
    assert!(
        denied(admit(sa, None, "CREATE", "n1")),
        "token without node binding"
    );
    let moved = "system:serviceaccount:other-ns:veil-agent";
    assert!(
        denied(admit(moved, Some("n1"), "CREATE", "n2")),
        "agent in another namespace"
    );
    // Not the agent: left to RBAC.
    assert!(!denied(admit("kubernetes-admin", None, "CREATE", "n2")));
    assert!(!denied(admit(
        "system:serviceaccount:kube-system:other",
        Some("n1"),
        "CREATE",
        "n2"
    )));
}
