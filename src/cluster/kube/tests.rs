//! The kube source against a mock API server, in kube-rs's `ApiServerVerifier`
//! style: `tower_test::mock::pair` stands in for the HTTP connection, and the
//! verifier plays one [`Scenario`] per test, checking each request the
//! source makes (method, path, query, body) and answering it.
//!
//! All watchers run at once, so requests for different kinds interleave in
//! no fixed order. The verifier therefore routes by resource: requests for
//! the kinds a scenario is about are checked in order; the others get a
//! neutral answer (an empty list, then a watch that stays open).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};

use super::*;
use crate::cluster::PublicKey;

type Body = ::kube::client::Body;
type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>;
type Responder = tower_test::mock::SendResponse<Response<ResponseBody>>;

/// Every wait in these tests ends by this deadline instead of hanging.
const DEADLINE: Duration = Duration::from_secs(10);
/// Backoff used by most scenarios: short, so retries do not slow tests down.
const FAST_BACKOFF: BackoffPolicy = BackoffPolicy::Exponential {
    min: Duration::from_millis(20),
    max: Duration::from_millis(100),
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    Nodes,
    Pods,
    Namespaces,
    VeilNodes,
    VeilClusterConfigs,
    VeilIdentities,
    NetworkPolicies,
    VeilPolicies,
    VeilNodeCertificates,
    VeilKeyRotations,
}

/// `notAfter` of the sample certificates is this plus the sample version.
const CERT_BASE: u64 = 2_000_000_000;

impl Res {
    const ALL: [Res; 10] = [
        Res::Nodes,
        Res::Pods,
        Res::Namespaces,
        Res::VeilNodes,
        Res::VeilClusterConfigs,
        Res::VeilIdentities,
        Res::NetworkPolicies,
        Res::VeilPolicies,
        Res::VeilNodeCertificates,
        Res::VeilKeyRotations,
    ];

    fn path(self) -> &'static str {
        match self {
            Res::Nodes => "/api/v1/nodes",
            Res::Pods => "/api/v1/pods",
            Res::Namespaces => "/api/v1/namespaces",
            Res::VeilNodes => "/apis/veil.dev/v1alpha1/veilnodes",
            Res::VeilClusterConfigs => "/apis/veil.dev/v1alpha1/veilclusterconfigs",
            Res::VeilIdentities => "/apis/veil.dev/v1alpha1/veilidentities",
            Res::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Res::VeilPolicies => "/apis/veil.dev/v1alpha1/veilpolicies",
            Res::VeilNodeCertificates => "/apis/veil.dev/v1alpha1/veilnodecertificates",
            Res::VeilKeyRotations => "/apis/veil.dev/v1alpha1/veilkeyrotations",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Nodes | Res::Pods | Res::Namespaces => "v1",
            Res::VeilNodes
            | Res::VeilClusterConfigs
            | Res::VeilIdentities
            | Res::VeilPolicies
            | Res::VeilNodeCertificates
            | Res::VeilKeyRotations => "veil.dev/v1alpha1",
            Res::NetworkPolicies => "networking.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Nodes => "Node",
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::VeilNodes => "VeilNode",
            Res::VeilClusterConfigs => "VeilClusterConfig",
            Res::VeilIdentities => "VeilIdentity",
            Res::NetworkPolicies => "NetworkPolicy",
            Res::VeilPolicies => "VeilPolicy",
            Res::VeilNodeCertificates => "VeilNodeCertificate",
            Res::VeilKeyRotations => "VeilKeyRotation",
        }
    }

    /// The name the samples of this kind use (only `default` counts for the config).
    fn sample_name(self) -> &'static str {
        match self {
            Res::VeilClusterConfigs => "default",
            Res::VeilIdentities => "300",
            Res::Pods => "web",
            _ => "n1",
        }
    }

    /// The object reference diagnostics use.
    fn object_ref(self, name: &str) -> String {
        match self {
            Res::Pods | Res::NetworkPolicies | Res::VeilPolicies => {
                format!("{}/prod/{name}", self.kind())
            }
            _ => format!("{}/{name}", self.kind()),
        }
    }

    /// Version `v` of a valid object of this kind; `observed` reads `v` back
    /// from the converted state.
    fn sample(self, name: &str, v: u8, rv: u32) -> Value {
        let meta = |extra: Value| {
            let mut m = json!({"name": name, "resourceVersion": rv.to_string(), "uid": format!("uid-{name}")});
            if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
                m.extend(extra.clone());
            }
            m
        };
        let body = match self {
            Res::Nodes => json!({
                "metadata": meta(json!({})),
                "spec": {"podCIDR": format!("10.244.{v}.0/24"), "podCIDRs": [format!("10.244.{v}.0/24")]},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("198.18.0.{v}")}]},
            }),
            Res::Pods => json!({
                "metadata": meta(json!({"namespace": "prod", "labels": {"app": "web"}})),
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": format!("10.244.1.{v}"), "podIPs": [{"ip": format!("10.244.1.{v}")}]},
            }),
            Res::Namespaces => json!({
                "metadata": meta(json!({"labels": {"version": v.to_string()}})),
            }),
            Res::VeilNodes => json!({
                "metadata": meta(json!({})),
                "spec": {
                    "publicKey": keymgr::encode_key(&[v; 32]),
                    "listenPort": 51820 + u16::from(v),
                    "podCIDRs": [format!("10.244.{v}.0/24")],
                },
            }),
            Res::VeilClusterConfigs => json!({
                "metadata": meta(json!({})),
                "spec": {"encryption": {"enabled": true}, "clusterPodCIDRs": [format!("10.{v}.0.0/16")]},
            }),
            Res::VeilIdentities => json!({
                "metadata": meta(json!({})),
                "spec": {"namespace": "prod", "labels": {"version": v.to_string()}},
            }),
            // `v` is the allowed port (8000 + v) of the first ingress rule.
            Res::NetworkPolicies => json!({
                "metadata": meta(json!({"namespace": "prod"})),
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"ports": [{"protocol": "TCP", "port": 8000 + u16::from(v)}]}],
                },
            }),
            Res::VeilPolicies => json!({
                "metadata": meta(json!({"namespace": "prod"})),
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"ports": [{"protocol": "TCP", "port": 8000 + u16::from(v)}]}],
                    "ingressDeny": [{"from": [{"ipBlock": {"cidr": "10.244.9.0/24"}}]}],
                    "requireEncryption": true,
                },
            }),
            // Signed by a test authority for identity key `[v; 32]`-seeded.
            Res::VeilNodeCertificates => {
                let identity = keymgr::IdentityKey::from_seed([v; 32]).public_key();
                let cert = keymgr::AuthorityKey::from_seed([1; 32])
                    .certify(name, identity, 1_000, CERT_BASE + u64::from(v))
                    .expect("sample certificate");
                let mut obj = serde_json::to_value(CertificateObject::new(&cert)).expect("JSON");
                obj["metadata"] = meta(json!({}));
                obj
            }
            Res::VeilKeyRotations => json!({
                "metadata": meta(json!({})),
                "spec": {"generation": v},
            }),
        };
        self.typed(body)
    }

    /// An object of this kind that fails validation.
    fn invalid(self, name: &str, rv: u32) -> Value {
        let mut obj = self.sample(name, 1, rv);
        let broken = match self {
            Res::Nodes => ("spec", json!({"podCIDRs": ["10.244.1.0/33"]})),
            Res::Pods => (
                "status",
                json!({"phase": "Running", "podIP": "10.244.1.300"}),
            ),
            // Namespaces have no field that can be invalid but their name.
            Res::Namespaces => ("metadata", json!({"resourceVersion": rv.to_string()})),
            Res::VeilNodes => ("spec", json!({"publicKey": "c2hvcnQ="})),
            Res::VeilClusterConfigs => ("spec", json!({"clusterPodCIDRs": ["10.0.0.0/99"]})),
            Res::VeilIdentities => ("spec", json!({"namespace": "Not_A_Namespace"})),
            Res::NetworkPolicies => (
                "spec",
                json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
            ),
            Res::VeilPolicies => (
                "spec",
                json!({"podSelector": {}, "ingressDeny": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/99"}}]}]}),
            ),
            // The reader field contradicts the signed certificate.
            Res::VeilNodeCertificates => {
                let mut spec = obj["spec"].clone();
                spec["notAfter"] = json!(1);
                ("spec", spec)
            }
            Res::VeilKeyRotations => ("spec", json!({"generation": 0})),
        };
        obj[broken.0] = broken.1;
        obj
    }

    /// The version `v` of the sample named `name`, as the source's state shows it.
    fn observed(self, state: &ClusterState, name: &str) -> Option<u8> {
        let octet = |net: &ipnet::IpNet, i: usize| match net.addr() {
            std::net::IpAddr::V4(a) => a.octets()[i],
            std::net::IpAddr::V6(_) => 0,
        };
        match self {
            Res::Nodes => state
                .nodes
                .get(name)
                .and_then(|n| n.pod_cidrs.first().map(|c| octet(c, 2))),
            Res::Pods => state
                .pods
                .get(&("prod".to_string(), name.to_string()))
                .and_then(|p| match p.pod_ip {
                    Some(std::net::IpAddr::V4(a)) => Some(a.octets()[3]),
                    _ => None,
                }),
            Res::Namespaces => state
                .namespaces
                .get(name)
                .and_then(|n| n.labels.get("version"))
                .and_then(|v| v.parse().ok()),
            Res::VeilNodes => state.announcements.get(name).map(|a| {
                assert_eq!(a.public_key, PublicKey([a.public_key.0[0]; 32]));
                a.public_key.0[0]
            }),
            Res::VeilClusterConfigs => state.config.cluster_pod_cidrs.first().map(|c| octet(c, 1)),
            Res::VeilIdentities => name
                .parse()
                .ok()
                .and_then(|n| state.identities.get(&crate::identity::Identity(n)))
                .and_then(|k| k.labels.get("version"))
                .and_then(|v| v.parse().ok()),
            Res::NetworkPolicies | Res::VeilPolicies => state
                .policies
                .get(&self.object_ref(name))
                .and_then(|p| p.allow[0].first()?.ports.as_ref()?.first().cloned())
                .and_then(|port| match port {
                    crate::policy::PortMatch::Range { lo, .. } => {
                        u8::try_from(lo.checked_sub(8000)?).ok()
                    }
                    crate::policy::PortMatch::Named { .. } => None,
                }),
            Res::VeilNodeCertificates => state
                .certificates
                .get(name)
                .and_then(|c| u8::try_from(c.not_after.checked_sub(CERT_BASE)?).ok()),
            Res::VeilKeyRotations => state
                .rotation_requests
                .get(name)
                .and_then(|g| u8::try_from(*g).ok()),
        }
    }

    fn typed(self, mut body: Value) -> Value {
        body["apiVersion"] = json!(self.api_version());
        body["kind"] = json!(self.kind());
        body
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    List,
    Watch,
    Patch,
    Create,
    Get,
    Delete,
}

/// One request the source made, not answered yet.
struct Call {
    request: Request<Body>,
    res: Option<Res>,
    verb: Verb,
    send: Responder,
}

impl Call {
    fn query(&self, key: &str) -> Option<String> {
        self.request.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        })
    }

    fn describe(&self) -> String {
        format!("{} {}", self.request.method(), self.request.uri())
    }

    fn respond_json(self, status: StatusCode, body: &Value) {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("test JSON"));
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(bytes).boxed_unsync())
            .expect("test response");
        self.send.send_response(response);
    }

    /// Answers a list request with these items at resource version `rv`.
    fn list(self, items: Vec<Value>, rv: u32) {
        assert_eq!(self.verb, Verb::List, "{}", self.describe());
        let res = self.res.expect("list of a watched resource");
        assert_eq!(
            self.query("limit").as_deref(),
            Some("500"),
            "{}",
            self.describe()
        );
        let body = json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind()),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        self.respond_json(StatusCode::OK, &body);
    }

    /// Answers a watch request with a stream the test writes events into.
    fn watch(self) -> WatchStream {
        assert_eq!(self.verb, Verb::Watch, "{}", self.describe());
        let (tx, rx) = fmpsc::unbounded::<Bytes>();
        let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed_unsync(body))
            .expect("test response");
        self.send.send_response(response);
        WatchStream { tx }
    }

    /// Answers with a `Status` error, as the API server does.
    fn fail(self, code: u16, reason: &str) {
        let status = StatusCode::from_u16(code).expect("valid status code");
        let body = status_body(code, reason);
        self.respond_json(status, &body);
    }
}

fn status_body(code: u16, reason: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": format!("test: {reason}"),
        "reason": reason,
        "code": code,
    })
}

/// The body of a watch response: one JSON event per line.
struct WatchStream {
    tx: fmpsc::UnboundedSender<Bytes>,
}

impl WatchStream {
    fn event(&self, kind: &str, object: &Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.tx
            .unbounded_send(Bytes::from(line))
            .expect("watch stream closed by the client");
    }

    /// The API server's answer to a watch from a compacted resource version.
    fn gone(&self) {
        self.event("ERROR", &status_body(410, "Expired"));
    }
}

/// The test's view of the source: its shared state.
struct Probe(Arc<Shared>);

impl Probe {
    fn state(&self) -> (ClusterState, Vec<Diagnostic>) {
        self.0.snapshot()
    }
}

struct ApiServerVerifier {
    handle: Handle,
    /// The resources this scenario checks; the others get neutral answers.
    focus: Vec<Res>,
    /// Requests for focused resources that arrived while waiting for something else.
    stash: VecDeque<Call>,
    /// Watches answered neutrally, kept open so they stay quiet.
    idle: Vec<WatchStream>,
    probe: Probe,
}

/// One test case each.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// Every kind is listed with objects (some invalid); then the state is complete.
    InitialList,
    /// Added, modified, invalid, deleted events for one kind.
    Events(Res),
    /// A watch answered with 410 Gone leads to a fresh list; the old state
    /// stays until that list completes, then objects deleted meanwhile go.
    GoneRelist,
    /// List and watch failures are retried with growing delays; the last
    /// state stays in force throughout.
    ErrorsBackoff,
    /// `publish_announcement` is a server-side apply of the right object.
    Publish,
    /// `patch_node_status` applies to the status subresource.
    StatusPatch,
    /// A rejected write is an error naming the object.
    PublishRejected,
    /// Identity allocation: POST, 409 AlreadyExists and read back, probing.
    CreateIdentity,
    /// Garbage collection deletes with uid/resourceVersion preconditions.
    DeleteIdentity,
}

fn classify(request: &Request<Body>) -> (Option<Res>, Verb) {
    let path = request.uri().path();
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true"));
    let verb = match (request.method(), watch) {
        (&Method::PATCH, _) => Verb::Patch,
        (&Method::POST, _) => Verb::Create,
        (&Method::DELETE, _) => Verb::Delete,
        (&Method::GET, false) if path.starts_with("/apis/veil.dev/v1alpha1/veilidentities/") => {
            Verb::Get
        }
        (&Method::GET, true) => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (m, _) => panic!("unexpected method {m} for {}", request.uri()),
    };
    let res = Res::ALL.into_iter().find(|r| r.path() == path);
    (res, verb)
}

impl ApiServerVerifier {
    /// Waits for the next request matching `want`, answering the others
    /// neutrally (or stashing them when their resource is focused).
    async fn next(&mut self, what: &str, want: impl Fn(&Call) -> bool) -> Call {
        if let Some(i) = self.stash.iter().position(&want) {
            return self.stash.remove(i).expect("index from position");
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let call = tokio::time::timeout_at(deadline, self.receive())
                .await
                .unwrap_or_else(|_| panic!("no request for {what} within {DEADLINE:?}"));
            if want(&call) {
                return call;
            }
            self.route(call);
        }
    }

    async fn next_of(&mut self, res: Res, verb: Verb) -> Call {
        self.next(&format!("{verb:?} {res:?}"), |c| {
            c.res == Some(res) && c.verb == verb
        })
        .await
    }

    async fn receive(&mut self) -> Call {
        let (request, send) = self
            .handle
            .next_request()
            .await
            .expect("the client went away");
        let (res, verb) = classify(&request);
        Call {
            request,
            res,
            verb,
            send,
        }
    }

    fn route(&mut self, call: Call) {
        match (call.res, call.verb) {
            (Some(res), _) if self.focus.contains(&res) => self.stash.push_back(call),
            (Some(_), Verb::List) => call.list(vec![], 1),
            (Some(_), Verb::Watch) => {
                let stream = call.watch();
                self.idle.push(stream);
            }
            _ => panic!("unexpected request {}", call.describe()),
        }
    }

    /// Serves requests until the source's state satisfies `cond`.
    async fn until(&mut self, what: &str, cond: impl Fn(&ClusterState, &[Diagnostic]) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (state, diags) = self.probe.state();
            if cond(&state, &diags) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("not reached within {DEADLINE:?}: {what}\nstate: {state:#?}\ndiagnostics: {diags:#?}");
            }
            tokio::select! {
                call = self.receive() => self.route(call),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }

    /// Answers the first list of `res` with nothing and opens its watch.
    async fn empty_start(&mut self, res: Res) -> WatchStream {
        self.next_of(res, Verb::List).await.list(vec![], 1);
        let call = self.next_of(res, Verb::Watch).await;
        assert_eq!(call.query("resourceVersion").as_deref(), Some("1"));
        call.watch()
    }

    async fn run(mut self, scenario: Scenario, source: &KubeSource) {
        match scenario {
            Scenario::InitialList => self.initial_list().await,
            Scenario::Events(res) => self.events(res).await,
            Scenario::GoneRelist => self.gone_relist().await,
            Scenario::ErrorsBackoff => self.errors_backoff().await,
            Scenario::Publish => self.publish(source).await,
            Scenario::StatusPatch => self.status_patch(source).await,
            Scenario::PublishRejected => self.publish_rejected(source).await,
            Scenario::CreateIdentity => self.create_identity(source).await,
            Scenario::DeleteIdentity => self.delete_identity(source).await,
        }
    }

    async fn initial_list(&mut self) {
        self.until("nothing listed yet, all kinds pending", |s, d| {
            *s == ClusterState::default()
                && d.iter()
                    .filter(|d| d.problem.contains("initial list not received"))
                    .count()
                    == Res::ALL.len()
        })
        .await;
        let mut watches = Vec::new();
        for res in Res::ALL {
            let items = match res {
                Res::Nodes => vec![
                    res.sample("n1", 1, 5),
                    res.sample("n2", 2, 6),
                    res.invalid("bad", 7),
                ],
                Res::Pods => vec![res.sample("web", 5, 5), res.invalid("bad", 6)],
                Res::Namespaces => vec![res.sample("prod", 1, 5)],
                Res::VeilNodes => vec![res.sample("n1", 1, 5), res.invalid("bad", 6)],
                Res::VeilClusterConfigs => vec![
                    res.sample("default", 44, 5),
                    // Only `default` counts; another name is diagnosed.
                    res.sample("other", 9, 6),
                ],
                Res::VeilIdentities => vec![res.sample("300", 7, 5), res.invalid("301", 6)],
                Res::NetworkPolicies => vec![res.sample("allow", 8, 5), res.invalid("bad", 6)],
                Res::VeilPolicies => vec![res.sample("allow", 9, 5), res.invalid("bad", 6)],
                Res::VeilNodeCertificates => vec![res.sample("n1", 3, 5), res.invalid("bad", 6)],
                Res::VeilKeyRotations => vec![res.sample("n1", 4, 5), res.invalid("bad", 6)],
            };
            self.next_of(res, Verb::List).await.list(items, 10);
            let watch = self.next_of(res, Verb::Watch).await;
            assert_eq!(
                watch.query("resourceVersion").as_deref(),
                Some("10"),
                "watch resumes from the list's version"
            );
            assert_eq!(watch.query("allowWatchBookmarks").as_deref(), Some("true"));
            watches.push(watch.watch());
        }
        let (state, diags) = self.probe.state();
        assert!(self.probe.0.synced());
        assert_eq!(
            state.nodes.keys().collect::<Vec<_>>(),
            vec!["n1", "n2"],
            "{diags:#?}"
        );
        assert_eq!(
            state.nodes["n2"].internal_ip,
            Some("198.18.0.2".parse().unwrap())
        );
        assert_eq!(Res::Pods.observed(&state, "web"), Some(5));
        assert_eq!(
            state.pods[&("prod".to_string(), "web".to_string())]
                .node_name
                .as_deref(),
            Some("n1")
        );
        assert_eq!(
            state.namespaces["prod"]
                .labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("prod"),
            "same conversion as the file source"
        );
        assert_eq!(state.announcements["n1"].listen_port, 51821);
        assert!(state.config.encryption_enabled);
        assert_eq!(
            Res::VeilClusterConfigs.observed(&state, "default"),
            Some(44)
        );
        assert_eq!(Res::VeilIdentities.observed(&state, "300"), Some(7));
        assert_eq!(Res::NetworkPolicies.observed(&state, "allow"), Some(8));
        assert_eq!(Res::VeilPolicies.observed(&state, "allow"), Some(9));
        assert_eq!(Res::VeilNodeCertificates.observed(&state, "n1"), Some(3));
        assert_eq!(Res::VeilKeyRotations.observed(&state, "n1"), Some(4));
        assert_eq!(
            state
                .origins
                .get("VeilNodeCertificate/n1")
                .map(String::as_str),
            Some("kube")
        );
        let vp = &state.policies["VeilPolicy/prod/allow"];
        assert!(vp.require_encryption && vp.deny[0].len() == 1, "{vp:#?}");
        assert_eq!(
            state
                .origins
                .get("NetworkPolicy/prod/allow")
                .map(String::as_str),
            Some("kube")
        );
        assert_eq!(
            state.origins.get("Node/n1").map(String::as_str),
            Some("kube")
        );
        assert_eq!(
            state.origins.get("Pod/prod/web").map(String::as_str),
            Some("kube")
        );
        let expect = [
            ("Node/bad", "spec.podCIDRs"),
            ("Pod/prod/bad", "status.podIP"),
            ("VeilNode/bad", "spec.publicKey"),
            ("VeilIdentity/301", "spec.namespace"),
            ("NetworkPolicy/prod/bad", "spec.policyTypes"),
            ("VeilPolicy/prod/bad", "spec.ingressDeny"),
            ("VeilNodeCertificate/bad", "spec.notAfter is `1`"),
            ("VeilKeyRotation/bad", "spec.generation must be at least 1"),
            (
                "VeilClusterConfig/other",
                "only the VeilClusterConfig named",
            ),
        ];
        for (object, needle) in expect {
            let found: Vec<_> = diags.iter().filter(|d| d.object == object).collect();
            assert_eq!(found.len(), 1, "{object}: {diags:#?}");
            assert_eq!(found[0].source, "kube");
            assert!(
                found[0].problem.contains(needle) && found[0].problem.contains("object skipped"),
                "{object}: {}",
                found[0].problem
            );
        }
        assert_eq!(diags.len(), expect.len(), "{diags:#?}");
        drop(watches);
    }

    async fn events(&mut self, res: Res) {
        let name = res.sample_name();
        let object = res.object_ref(name);
        let watch = self.empty_start(res).await;
        self.until("synced", |_, d| {
            !d.iter()
                .any(|d| d.problem.contains("initial list not received"))
        })
        .await;

        watch.event("ADDED", &res.sample(name, 3, 11));
        self.until("added", |s, _| res.observed(s, name) == Some(3))
            .await;
        watch.event("MODIFIED", &res.sample(name, 4, 12));
        self.until("modified", |s, _| res.observed(s, name) == Some(4))
            .await;

        // An invalid edit keeps the last good version, with a diagnostic.
        if res != Res::Namespaces {
            watch.event("MODIFIED", &res.invalid(name, 13));
            self.until("invalid edit diagnosed", |_, d| {
                d.iter().any(|d| d.object == object)
            })
            .await;
            let (state, diags) = self.probe.state();
            assert_eq!(res.observed(&state, name), Some(4), "last good kept");
            let diag = diags.iter().find(|d| d.object == object).unwrap();
            assert_eq!(diag.source, "kube");
            assert!(
                diag.problem
                    .contains("keeping the last good version of this object"),
                "{}",
                diag.problem
            );
            watch.event("MODIFIED", &res.sample(name, 5, 14));
            self.until("fixed", |s, d| {
                res.observed(s, name) == Some(5) && !d.iter().any(|d| d.object == object)
            })
            .await;
        }

        // A second object comes and goes without touching the first.
        if res != Res::VeilClusterConfigs {
            watch.event("ADDED", &res.sample("other", 6, 15));
            self.until("second added", |s, _| res.observed(s, "other") == Some(6))
                .await;
            watch.event("DELETED", &res.sample("other", 6, 16));
            self.until("second deleted", |s, _| res.observed(s, "other").is_none())
                .await;
            assert!(res.observed(&self.probe.state().0, name).is_some());
        }

        watch.event("DELETED", &res.sample(name, 5, 17));
        self.until("deleted", |s, _| res.observed(s, name).is_none())
            .await;
        if res == Res::VeilClusterConfigs {
            assert_eq!(
                self.probe.state().0.config,
                ClusterConfig::default(),
                "without the config object, the defaults apply"
            );
        }
        let (state, diags) = self.probe.state();
        assert_eq!(state, ClusterState::default());
        assert!(diags.is_empty(), "{diags:#?}");
    }

    async fn gone_relist(&mut self) {
        let res = Res::Nodes;
        self.next_of(res, Verb::List)
            .await
            .list(vec![res.sample("n1", 1, 5), res.sample("n2", 2, 6)], 10);
        let watch = self.next_of(res, Verb::Watch).await.watch();
        self.until("listed", |s, _| s.nodes.len() == 2).await;
        let before = self.probe.state().0;

        // Our resource version was compacted away: the server says 410 Gone.
        watch.gone();
        // The watcher must start over with a list (not a watch from the stale version).
        let relist = self.next_of(res, Verb::List).await;
        let (state, _) = self.probe.state();
        assert_eq!(state, before, "the old state stays while relisting");
        // n1 was deleted and n2 modified while we could not watch.
        relist.list(vec![res.sample("n2", 7, 20), res.sample("n3", 3, 21)], 30);
        let rewatch = self.next_of(res, Verb::Watch).await;
        assert_eq!(
            rewatch.query("resourceVersion").as_deref(),
            Some("30"),
            "watches resume from the relist's version"
        );
        let rewatch = rewatch.watch();
        self.until("relisted", |s, _| {
            s.nodes.keys().collect::<Vec<_>>() == vec!["n2", "n3"]
                && res.observed(s, "n2") == Some(7)
        })
        .await;
        // And events on the new watch apply as usual.
        rewatch.event("DELETED", &res.sample("n3", 3, 31));
        self.until("deleted after relist", |s, _| s.nodes.len() == 1)
            .await;
        let (_, diags) = self.probe.state();
        assert!(diags.is_empty(), "{diags:#?}");
        drop(watch);
    }

    async fn errors_backoff(&mut self) {
        let res = Res::Nodes;
        // The very first list fails: nothing is known, and the kind says so.
        self.next_of(res, Verb::List)
            .await
            .fail(500, "InternalError");
        let failed_at = Instant::now();
        let list = self.next_of(res, Verb::List).await;
        assert!(
            failed_at.elapsed() >= BACKOFF_MIN,
            "retried after {:?}, before the backoff",
            failed_at.elapsed()
        );
        assert!(!self.probe.0.synced());
        let (_, diags) = self.probe.state();
        assert!(
            diags
                .iter()
                .any(|d| d.object == "Node" && d.problem.contains("watch failed")),
            "{diags:#?}"
        );
        list.list(vec![res.sample("n1", 1, 5)], 10);

        // The watch cannot start (500), then the server is unreachable (a
        // connection error): each retry waits longer, from the same version,
        // and the last state stays in force.
        self.next_of(res, Verb::Watch)
            .await
            .fail(500, "InternalError");
        let first = Instant::now();
        let watch = self.next_of(res, Verb::Watch).await;
        let first_gap = first.elapsed();
        assert_eq!(watch.query("resourceVersion").as_deref(), Some("10"));
        let (state, diags) = self.probe.state();
        assert_eq!(res.observed(&state, "n1"), Some(1), "last state kept");
        let problem = diags
            .iter()
            .find(|d| d.object == "Node")
            .map(|d| d.problem.clone())
            .unwrap_or_default();
        assert!(
            problem.contains("watch failed") && problem.contains("keeping the 1 object(s)"),
            "{diags:#?}"
        );
        watch
            .send
            .send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let second = Instant::now();
        let watch = self.next_of(res, Verb::Watch).await;
        let second_gap = second.elapsed();
        assert!(
            first_gap >= BACKOFF_MIN && second_gap >= BACKOFF_MIN * 2,
            "retries after {first_gap:?} and {second_gap:?}; expected >= {BACKOFF_MIN:?} then doubled"
        );
        assert_eq!(watch.query("resourceVersion").as_deref(), Some("10"));
        assert_eq!(res.observed(&self.probe.state().0, "n1"), Some(1));

        // Back: events flow and the error is cleared.
        let watch = watch.watch();
        watch.event("ADDED", &res.sample("n2", 2, 11));
        self.until("recovered", |s, d| {
            s.nodes.len() == 2 && !d.iter().any(|d| d.object == "Node")
        })
        .await;
    }

    async fn publish(&mut self, source: &KubeSource) {
        let announcement = Announcement {
            node: "n1".into(),
            public_key: PublicKey([7; 32]),
            listen_port: 51821,
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            endpoint: Some("198.18.0.1:51821".parse().unwrap()),
            ..Announcement::default()
        };
        let expected = json!({
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "VeilNode",
            "metadata": {"name": "n1"},
            "spec": {
                "publicKey": keymgr::encode_key(&[7; 32]),
                "listenPort": 51821,
                "podCIDRs": ["10.244.1.0/24"],
                "endpoint": "198.18.0.1:51821",
            },
        });
        let server = async {
            let call = self
                .next("PATCH veilnodes/n1", |c| c.verb == Verb::Patch)
                .await;
            assert_eq!(
                call.request.uri().path(),
                "/apis/veil.dev/v1alpha1/veilnodes/n1"
            );
            let body = check_apply(&call);
            let (_, send) = (call.request, call.send);
            let body = body.await;
            assert_eq!(body, expected);
            respond(send, StatusCode::OK, &expected);
        };
        let (result, ()) = tokio::join!(source.publish_announcement(&announcement), server);
        result.expect("publish");
    }

    async fn status_patch(&mut self, source: &KubeSource) {
        let status = json!({
            "ready": true,
            "conditions": [{"type": "Ready", "status": "True", "reason": "EngineUp"}],
        });
        let server = async {
            let call = self
                .next("PATCH veilnodes/n1/status", |c| c.verb == Verb::Patch)
                .await;
            assert_eq!(
                call.request.uri().path(),
                "/apis/veil.dev/v1alpha1/veilnodes/n1/status"
            );
            let body = check_apply(&call);
            let (_, send) = (call.request, call.send);
            let body = body.await;
            assert_eq!(
                body,
                json!({
                    "apiVersion": "veil.dev/v1alpha1",
                    "kind": "VeilNode",
                    "metadata": {"name": "n1"},
                    "status": status,
                })
            );
            respond(send, StatusCode::OK, &body);
        };
        let (result, ()) = tokio::join!(source.patch_node_status("n1", &status), server);
        result.expect("status patch");

        let progress = json!({"nodesReady": 2, "nodes": 3});
        let server = async {
            let call = self
                .next("PATCH veilclusterconfigs/default/status", |c| {
                    c.verb == Verb::Patch
                })
                .await;
            assert_eq!(
                call.request.uri().path(),
                "/apis/veil.dev/v1alpha1/veilclusterconfigs/default/status"
            );
            let body = check_apply(&call);
            let (_, send) = (call.request, call.send);
            let body = body.await;
            assert_eq!(
                body,
                json!({
                    "apiVersion": "veil.dev/v1alpha1",
                    "kind": "VeilClusterConfig",
                    "metadata": {"name": "default"},
                    "status": progress,
                })
            );
            // A status patch the server refuses is an error naming the object.
            respond(send, StatusCode::NOT_FOUND, &status_body(404, "NotFound"));
        };
        let (result, ()) = tokio::join!(source.patch_cluster_config_status(&progress), server);
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Status { .. }), "{err}");
        assert!(
            err.to_string().contains("VeilClusterConfig/default"),
            "{err}"
        );

        // Names that cannot be one path segment are refused before any request.
        for bad in ["", "a/b", ".."] {
            let err = source.patch_node_status(bad, &status).await.unwrap_err();
            assert!(matches!(err, Error::InvalidNodeName { .. }), "{err}");
        }
    }

    async fn create_identity(&mut self, source: &KubeSource) {
        use crate::identity::{candidate, Created, Identity, IdentityKey};
        let key = |app: &str| IdentityKey {
            namespace: "prod".into(),
            labels: [("app".to_string(), app.to_string())].into(),
        };
        let web = key("web");
        let id = candidate(&web, 0);
        let object = |id: Identity, k: &IdentityKey| {
            let mut v =
                serde_json::to_value(crate::cluster::identity::VeilIdentity::new(id, k)).unwrap();
            v["metadata"]["uid"] = json!(format!("uid-{}", id.0));
            v["metadata"]["resourceVersion"] = json!("7");
            v
        };
        let path = |id: Identity| format!("/apis/veil.dev/v1alpha1/veilidentities/{}", id.0);

        // Free number: one POST of the object, 201 Created.
        let server = async {
            let call = self
                .next("POST veilidentities", |c| c.verb == Verb::Create)
                .await;
            assert_eq!(call.request.uri().path(), Res::VeilIdentities.path());
            let body = call.request.body().try_clone().expect("buffered body");
            let bytes = body.collect_bytes().await.expect("request body");
            let sent: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(sent["kind"], "VeilIdentity");
            assert_eq!(sent["metadata"]["name"], id.0.to_string());
            assert_eq!(
                sent["spec"],
                json!({"namespace": "prod", "labels": {"app": "web"}})
            );
            call.respond_json(StatusCode::CREATED, &object(id, &web));
        };
        let (result, ()) = tokio::join!(source.create_identity(id, &web), server);
        assert_eq!(result.expect("create"), Created::Created);

        // Lost the race to an agent that allocated the same label set: 409,
        // read back, adopted.
        let server = async {
            self.next("POST veilidentities", |c| c.verb == Verb::Create)
                .await
                .fail(409, "AlreadyExists");
            let get = self
                .next("GET veilidentities/ID", |c| c.verb == Verb::Get)
                .await;
            assert_eq!(get.request.uri().path(), path(id));
            get.respond_json(StatusCode::OK, &object(id, &web));
        };
        let (result, ()) = tokio::join!(source.create_identity(id, &web), server);
        assert_eq!(result.expect("create"), Created::Exists(Some(web.clone())));

        // The number is taken by another label set (a hash collision): the
        // allocation probes the next candidate, which is free.
        let db = key("db");
        let server = async {
            self.next("POST veilidentities", |c| c.verb == Verb::Create)
                .await
                .fail(409, "AlreadyExists");
            let get = self
                .next("GET veilidentities/ID", |c| c.verb == Verb::Get)
                .await;
            // The stored object holds db's labels under web's first candidate.
            get.respond_json(StatusCode::OK, &object(id, &db));
            let call = self
                .next("POST veilidentities", |c| c.verb == Verb::Create)
                .await;
            let body = call.request.body().try_clone().expect("buffered body");
            let bytes = body.collect_bytes().await.expect("request body");
            let sent: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(sent["metadata"]["name"], candidate(&web, 1).0.to_string());
            call.respond_json(StatusCode::CREATED, &object(candidate(&web, 1), &web));
        };
        let mut view = BTreeMap::new();
        let wanted = [web.clone()].into();
        let ((done, errors), ()) =
            tokio::join!(source.allocate_identities(&mut view, &wanted), server);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(done, vec![(candidate(&web, 1), web.clone())]);
        assert_eq!(view.get(&id), Some(&db), "learned the other allocation");

        // Any other refusal is an error naming the object.
        let server = async {
            self.next("POST veilidentities", |c| c.verb == Verb::Create)
                .await
                .fail(403, "Forbidden");
        };
        let (result, ()) = tokio::join!(source.create_identity(id, &web), server);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains(&format!("VeilIdentity/{}", id.0)) && err.contains("Forbidden"),
            "{err}"
        );
    }

    async fn delete_identity(&mut self, source: &KubeSource) {
        use crate::identity::{Identity, IdentityKey};
        let web = IdentityKey {
            namespace: "prod".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
        };
        let mut stored = serde_json::to_value(crate::cluster::identity::VeilIdentity::new(
            Identity(4242),
            &web,
        ))
        .unwrap();
        stored["metadata"]["uid"] = json!("uid-4242");
        stored["metadata"]["resourceVersion"] = json!("99");
        let server = async {
            let get = self
                .next("GET veilidentities/4242", |c| c.verb == Verb::Get)
                .await;
            get.respond_json(StatusCode::OK, &stored);
            let del = self
                .next("DELETE veilidentities/4242", |c| c.verb == Verb::Delete)
                .await;
            assert_eq!(
                del.request.uri().path(),
                "/apis/veil.dev/v1alpha1/veilidentities/4242"
            );
            let body = del.request.body().try_clone().expect("buffered body");
            let bytes = body.collect_bytes().await.expect("request body");
            let sent: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(
                sent["preconditions"],
                json!({"uid": "uid-4242", "resourceVersion": "99"})
            );
            del.respond_json(StatusCode::OK, &stored);
        };
        let (result, ()) = tokio::join!(source.delete_identity(Identity(4242), &web), server);
        assert!(result.expect("delete"));

        // Someone re-pointed the number at another label set: left alone.
        let other = IdentityKey {
            namespace: "prod".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
        };
        let server = async {
            let get = self
                .next("GET veilidentities/4242", |c| c.verb == Verb::Get)
                .await;
            get.respond_json(StatusCode::OK, &stored);
        };
        let (result, ()) = tokio::join!(source.delete_identity(Identity(4242), &other), server);
        assert!(!result.expect("no delete"));
        // Changed between the read and the delete: the server's 409 is "not deleted".
        let server = async {
            let get = self
                .next("GET veilidentities/4242", |c| c.verb == Verb::Get)
                .await;
            get.respond_json(StatusCode::OK, &stored);
            self.next("DELETE veilidentities/4242", |c| c.verb == Verb::Delete)
                .await
                .fail(409, "Conflict");
        };
        let (result, ()) = tokio::join!(source.delete_identity(Identity(4242), &web), server);
        assert!(!result.expect("precondition failed"));
    }

    async fn publish_rejected(&mut self, source: &KubeSource) {
        let announcement = Announcement {
            node: "n2".into(),
            public_key: PublicKey([7; 32]),
            listen_port: 51820,
            pod_cidrs: vec![],
            endpoint: None,
            ..Announcement::default()
        };
        let server = async {
            let call = self
                .next("PATCH veilnodes/n2", |c| c.verb == Verb::Patch)
                .await;
            // The admission policy lets an agent write only its own node's VeilNode.
            call.fail(403, "Forbidden");
        };
        let (result, ()) = tokio::join!(source.publish_announcement(&announcement), server);
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Publish { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("VeilNode/n2") && text.contains("Forbidden"),
            "{text}"
        );
    }
}

/// Checks a server-side apply request and returns its body as JSON.
fn check_apply(call: &Call) -> impl std::future::Future<Output = Value> {
    assert_eq!(call.request.method(), Method::PATCH);
    assert_eq!(
        call.query("fieldManager").as_deref(),
        Some(FIELD_MANAGER),
        "{}",
        call.describe()
    );
    assert_eq!(
        call.query("force").as_deref(),
        Some("true"),
        "{}",
        call.describe()
    );
    assert_eq!(
        call.request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/apply-patch+yaml")
    );
    let body = call.request.body().try_clone().expect("buffered body");
    async move {
        let bytes = body.collect_bytes().await.expect("request body");
        serde_json::from_slice(&bytes).expect("apply body is JSON")
    }
}

fn respond(send: Responder, status: StatusCode, body: &Value) {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(bytes).boxed_unsync())
            .unwrap(),
    );
}

fn verifier_synced(source: &KubeSource) -> bool {
    source.synced()
}

const BACKOFF_MIN: Duration = Duration::from_millis(150);

fn setup(scenario: Scenario) -> (KubeSource, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    let client = Client::new(service, "default");
    let backoff = match scenario {
        Scenario::ErrorsBackoff => BackoffPolicy::Exponential {
            min: BACKOFF_MIN,
            max: Duration::from_secs(2),
        },
        _ => FAST_BACKOFF,
    };
    let source = KubeSource::start(
        client,
        KubeSourceConfig {
            backoff,
            watch_timeout: None,
        },
    );
    let focus = match scenario {
        Scenario::InitialList => Res::ALL.to_vec(),
        Scenario::Events(res) => vec![res],
        Scenario::GoneRelist | Scenario::ErrorsBackoff => vec![Res::Nodes],
        Scenario::Publish
        | Scenario::StatusPatch
        | Scenario::PublishRejected
        | Scenario::CreateIdentity
        | Scenario::DeleteIdentity => vec![],
    };
    let verifier = ApiServerVerifier {
        handle,
        focus,
        stash: VecDeque::new(),
        idle: Vec::new(),
        probe: Probe(Arc::clone(&source.shared)),
    };
    (source, verifier)
}

async fn play(scenario: Scenario) {
    let (source, verifier) = setup(scenario);
    tokio::time::timeout(DEADLINE * 3, verifier.run(scenario, &source))
        .await
        .unwrap_or_else(|_| panic!("scenario {scenario:?} timed out"));
}

#[tokio::test]
async fn initial_list() {
    play(Scenario::InitialList).await;
}

#[tokio::test]
async fn node_events() {
    play(Scenario::Events(Res::Nodes)).await;
}

#[tokio::test]
async fn pod_events() {
    play(Scenario::Events(Res::Pods)).await;
}

#[tokio::test]
async fn namespace_events() {
    play(Scenario::Events(Res::Namespaces)).await;
}

#[tokio::test]
async fn veil_node_events() {
    play(Scenario::Events(Res::VeilNodes)).await;
}

#[tokio::test]
async fn cluster_config_events() {
    play(Scenario::Events(Res::VeilClusterConfigs)).await;
}

#[tokio::test]
async fn network_policy_events() {
    play(Scenario::Events(Res::NetworkPolicies)).await;
}

#[tokio::test]
async fn veil_policy_events() {
    play(Scenario::Events(Res::VeilPolicies)).await;
}

#[tokio::test]
async fn certificate_events() {
    play(Scenario::Events(Res::VeilNodeCertificates)).await;
}

#[tokio::test]
async fn rotation_events() {
    play(Scenario::Events(Res::VeilKeyRotations)).await;
}

#[tokio::test]
async fn gone_relists() {
    play(Scenario::GoneRelist).await;
}

#[tokio::test]
async fn errors_back_off_and_keep_state() {
    play(Scenario::ErrorsBackoff).await;
}

#[tokio::test]
async fn publish_is_server_side_apply() {
    play(Scenario::Publish).await;
}

#[tokio::test]
async fn status_patch_targets_the_subresource() {
    play(Scenario::StatusPatch).await;
}

#[tokio::test]
async fn rejected_publish_names_the_object() {
    play(Scenario::PublishRejected).await;
}

#[tokio::test]
async fn identity_create_is_create_if_absent() {
    play(Scenario::CreateIdentity).await;
}

#[tokio::test]
async fn identity_delete_has_preconditions() {
    play(Scenario::DeleteIdentity).await;
}

#[tokio::test]
async fn watch_notifies_subscribers() {
    let (source, mut verifier) = setup(Scenario::Events(Res::Nodes));
    let mut changes = source.watch();
    let watch = verifier.empty_start(Res::Nodes).await;
    verifier
        .until("synced", |_, _| verifier_synced(&source))
        .await;
    // Notifications of the initial lists are coalesced into (at most) one.
    while changes.try_recv().is_ok() {}
    watch.event("ADDED", &Res::Nodes.sample("n1", 1, 2));
    tokio::time::timeout(DEADLINE, changes.recv())
        .await
        .expect("no notification")
        .expect("channel closed");
    assert!(source.state().0.nodes.contains_key("n1"));
    // Dropping the source stops its watchers; once nothing holds the shared
    // state any more, the notification channel closes.
    drop(source);
    drop(verifier);
    tokio::time::timeout(DEADLINE, async { while changes.recv().await.is_some() {} })
        .await
        .expect("channel still open after the source was dropped");
}

#[test]
fn exponential_backoff_doubles_caps_and_resets() {
    let mut b = BackoffPolicy::Exponential {
        min: Duration::from_millis(100),
        max: Duration::from_millis(350),
    }
    .build();
    let delays: Vec<_> = (&mut b).take(4).map(|d| d.as_millis()).collect();
    assert_eq!(delays, vec![100, 200, 350, 350]);
    b.reset();
    assert_eq!(b.next(), Some(Duration::from_millis(100)));
}

#[test]
fn relist_keeps_last_good_version_of_invalid_objects() {
    let shared = Shared::default();
    let node = |cidr: &str| NodeInfo {
        name: "n1".into(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        internal_ip: None,
    };
    let key = || "Node/n1".to_string();
    shared.apply(Kind::Node, Event::Init);
    shared.apply(
        Kind::Node,
        Event::InitApply((key(), Ok(Object::Node(node("10.244.1.0/24"))))),
    );
    assert!(shared.snapshot().0.nodes.is_empty(), "not before InitDone");
    shared.apply(Kind::Node, Event::InitDone);
    assert_eq!(shared.snapshot().0.nodes["n1"], node("10.244.1.0/24"));
    // A relist where n1 became invalid keeps its last good version.
    shared.apply(Kind::Node, Event::Init);
    shared.apply(
        Kind::Node,
        Event::InitApply((key(), Err("spec.podCIDRs: bad".into()))),
    );
    shared.apply(Kind::Node, Event::InitDone);
    let (state, diags) = shared.snapshot();
    assert_eq!(state.nodes["n1"], node("10.244.1.0/24"));
    assert!(diags
        .iter()
        .any(|d| d.object == "Node/n1" && d.problem.contains("keeping the last good version")));
}
