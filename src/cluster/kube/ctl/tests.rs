//! `veilctl`'s kube mode and the cluster status writer against a mock API
//! server (tower-test `mock::pair`, as in `kube/tests.rs`): each test plays
//! the server side of one exchange in order and checks every request
//! (method, path, query, body).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::*;
use crate::cluster::kube::{KubeSourceConfig, FIELD_MANAGER};

type Body = ::kube::client::Body;
type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>;
type Responder = tower_test::mock::SendResponse<Response<ResponseBody>>;

const DEADLINE: Duration = Duration::from_secs(10);
const CONFIGS: &str = "/apis/veil.dev/v1alpha1/veilclusterconfigs";

fn mock() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    (Client::new(service, "default"), handle)
}

struct Call {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: Option<Value>,
    send: Responder,
}

impl Call {
    fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn respond(self, status: StatusCode, body: &Value) {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON"));
        self.send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(bytes).boxed_unsync())
                .expect("response"),
        );
    }

    fn fail(self, code: u16, reason: &str) {
        let status = StatusCode::from_u16(code).expect("status code");
        self.respond(
            status,
            &json!({
                "apiVersion": "v1", "kind": "Status", "metadata": {},
                "status": "Failure", "message": format!("test: {reason}"),
                "reason": reason, "code": code,
            }),
        );
    }
}

async fn next(handle: &mut Handle) -> Call {
    let (request, send) = tokio::time::timeout(DEADLINE, handle.next_request())
        .await
        .expect("no request within the deadline")
        .expect("the client went away");
    let query = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON body"));
    Call {
        method,
        path,
        query,
        content_type,
        body,
        send,
    }
}

fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "7"},
        "items": items,
    })
}

fn node(i: u8) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("n{i}"), "resourceVersion": "1"},
        "spec": {"podCIDR": format!("10.244.{i}.0/24"), "podCIDRs": [format!("10.244.{i}.0/24")]},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("198.18.0.{i}")}]},
    })
}

fn veil_node(i: u8, ready: bool) -> Value {
    json!({
        "apiVersion": "veil.dev/v1alpha1", "kind": "VeilNode",
        "metadata": {"name": format!("n{i}"), "resourceVersion": "1"},
        "spec": {
            "publicKey": keymgr::encode_key(&[i; 32]),
            "listenPort": 51820,
            "podCIDRs": [format!("10.244.{i}.0/24")],
        },
        "status": {"encryption": {"enabled": true, "ready": ready, "acceptsPlaintext": true}},
    })
}

fn config(spec: Value) -> Value {
    json!({
        "apiVersion": "veil.dev/v1alpha1", "kind": "VeilClusterConfig",
        "metadata": {"name": "default", "resourceVersion": "3"},
        "spec": spec,
    })
}

/// Every list `load_state` makes, in its order (`Kind::ALL`).
const LIST_PATHS: [&str; 10] = [
    "/api/v1/nodes",
    "/api/v1/pods",
    "/api/v1/namespaces",
    "/apis/veil.dev/v1alpha1/veilnodes",
    CONFIGS,
    "/apis/veil.dev/v1alpha1/veilidentities",
    "/apis/networking.k8s.io/v1/networkpolicies",
    "/apis/veil.dev/v1alpha1/veilpolicies",
    CERTS,
    ROTATIONS,
];
const CERTS: &str = "/apis/veil.dev/v1alpha1/veilnodecertificates";
const ROTATIONS: &str = "/apis/veil.dev/v1alpha1/veilkeyrotations";

/// Serves the lists `load_state` makes, in its order: `lists` for the paths
/// given, an empty list for the others.
async fn serve_lists(handle: &mut Handle, lists: &[(&str, Value)]) {
    for path in LIST_PATHS {
        let call = next(handle).await;
        assert_eq!((&call.method, call.path.as_str()), (&Method::GET, path));
        assert_eq!(call.query("watch"), None, "a one-shot list, not a watch");
        let body = lists
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| list("v1", "List", vec![]));
        call.respond(StatusCode::OK, &body);
    }
}

/// The next request must be a forced server-side apply by veilctl of
/// `path`; returns its body after answering with it.
async fn expect_apply(handle: &mut Handle, path: &str) -> Value {
    let apply = next(handle).await;
    assert_eq!(
        (&apply.method, apply.path.as_str()),
        (&Method::PATCH, path),
        "expected a server-side apply"
    );
    assert_eq!(apply.query("fieldManager"), Some(CTL_FIELD_MANAGER));
    assert_eq!(apply.query("force"), Some("true"));
    assert_eq!(
        apply.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    let body = apply.body.clone().expect("apply body");
    apply.respond(StatusCode::OK, &body);
    body
}

/// A VeilNode waiting for approval: identity key only.
fn pending_node(i: u8, identity: &[u8; 32]) -> Value {
    let mut v = veil_node(i, false);
    v["spec"]["identityKey"] = json!(keymgr::encode_key(identity));
    v
}

#[tokio::test]
async fn approve_applies_a_certificate_for_the_pending_identity() {
    use crate::cluster::store::Store;
    let (client, mut handle) = mock();
    let authority = keymgr::AuthorityKey::from_seed([1; 32]);
    let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
    let store = Store::Kube(client);
    let server = async {
        serve_lists(
            &mut handle,
            &[
                ("/api/v1/nodes", list("v1", "Node", vec![node(1)])),
                (
                    "/apis/veil.dev/v1alpha1/veilnodes",
                    list(
                        "veil.dev/v1alpha1",
                        "VeilNode",
                        vec![pending_node(1, &identity)],
                    ),
                ),
            ],
        )
        .await;
        expect_apply(&mut handle, &format!("{CERTS}/n1")).await
    };
    let (result, body) = tokio::join!(
        store.approve_node(&authority, "n1", Duration::from_secs(86_400)),
        server
    );
    let approved = result.expect("approve");
    assert_eq!(approved.written_to, "VeilNodeCertificate/n1");
    assert_eq!(body["apiVersion"], json!("veil.dev/v1alpha1"));
    assert_eq!(body["kind"], json!("VeilNodeCertificate"));
    assert_eq!(body["metadata"], json!({"name": "n1"}));
    assert_eq!(
        body["spec"]["identityKey"],
        json!(keymgr::encode_key(&identity))
    );
    // What the API server stores is what an agent reads back and verifies.
    let stored: DynamicObject = serde_json::from_value(body).expect("object");
    let Object::Certificate(cert) =
        crate::cluster::kube::convert_certificate(&stored).expect("the applied object converts")
    else {
        panic!("not a certificate");
    };
    assert_eq!(*cert, approved.certificate);
    cert.verify(&authority.public_key(), keymgr::unix_now(), 0)
        .expect("verifies under the authority");
    assert_eq!(cert.identity_key, identity);
}

#[tokio::test]
async fn approve_without_a_node_object_writes_nothing() {
    use crate::cluster::store::Store;
    let (client, mut handle) = mock();
    let authority = keymgr::AuthorityKey::from_seed([1; 32]);
    let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
    let store = Store::Kube(client);
    let lists = [(
        "/apis/veil.dev/v1alpha1/veilnodes",
        list(
            "veil.dev/v1alpha1",
            "VeilNode",
            vec![pending_node(1, &identity)],
        ),
    )];
    let server = serve_lists(&mut handle, &lists);
    let (result, ()) = tokio::join!(
        store.approve_node(&authority, "n1", Duration::from_secs(60)),
        server
    );
    let err = result.expect_err("no Node n1").to_string();
    assert!(err.contains("no Node object named n1"), "{err}");
    drop(store);
    // The client is gone and asked for nothing more: no apply was sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), handle.next_request())
            .await
            .map_or(true, |r| r.is_none()),
        "a request after the refusal"
    );
}

#[tokio::test]
async fn rotate_applies_one_generation_above_announced_and_requested() {
    use crate::cluster::store::Store;
    let (client, mut handle) = mock();
    let store = Store::Kube(client);
    let mut n1 = veil_node(1, true);
    n1["spec"]["generation"] = json!(3);
    let server = async {
        serve_lists(
            &mut handle,
            &[
                ("/api/v1/nodes", list("v1", "Node", vec![node(1), node(2)])),
                (
                    "/apis/veil.dev/v1alpha1/veilnodes",
                    list(
                        "veil.dev/v1alpha1",
                        "VeilNode",
                        vec![n1.clone(), veil_node(2, true)],
                    ),
                ),
                (
                    ROTATIONS,
                    list(
                        "veil.dev/v1alpha1",
                        "VeilKeyRotation",
                        vec![json!({
                            "apiVersion": "veil.dev/v1alpha1", "kind": "VeilKeyRotation",
                            "metadata": {"name": "n2", "resourceVersion": "4"},
                            "spec": {"generation": 7},
                        })],
                    ),
                ),
            ],
        )
        .await;
        let one = expect_apply(&mut handle, &format!("{ROTATIONS}/n1")).await;
        let two = expect_apply(&mut handle, &format!("{ROTATIONS}/n2")).await;
        (one, two)
    };
    let (result, (one, two)) = tokio::join!(store.request_rotations(None), server);
    let done = result.expect("rotate --all");
    // n1 announces 3, nothing requested: 4. n2 announces 0, 7 requested: 8.
    let got: Vec<_> = done
        .iter()
        .map(|r| (r.node.as_str(), r.current, r.want, r.written_to.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("n1", 3, 4, "VeilKeyRotation/n1"),
            ("n2", 0, 8, "VeilKeyRotation/n2")
        ]
    );
    assert_eq!(
        one,
        json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilKeyRotation",
               "metadata": {"name": "n1"}, "spec": {"generation": 4}})
    );
    assert_eq!(two["spec"], json!({"generation": 8}));
}

#[tokio::test]
async fn rejected_rotation_names_the_object() {
    let (client, mut handle) = mock();
    let server = async {
        next(&mut handle).await.fail(403, "Forbidden");
    };
    let (result, ()) = tokio::join!(apply_rotation(&client, "n1", 2), server);
    let text = result.expect_err("403 must fail").to_string();
    assert!(
        text.contains("VeilKeyRotation/n1") && text.contains("Forbidden"),
        "{text}"
    );
}

#[tokio::test]
async fn enable_strict_applies_spec_encryption() {
    let (client, mut handle) = mock();
    let server = async {
        // Absent: a GET answered 404, then the apply creates it.
        let get = next(&mut handle).await;
        assert_eq!(get.method, Method::GET);
        assert_eq!(get.path, format!("{CONFIGS}/default"));
        get.fail(404, "NotFound");
        let apply = next(&mut handle).await;
        assert_eq!(apply.method, Method::PATCH);
        assert_eq!(apply.path, format!("{CONFIGS}/default"));
        assert_eq!(apply.query("fieldManager"), Some(CTL_FIELD_MANAGER));
        assert_eq!(apply.query("force"), Some("true"));
        assert_eq!(
            apply.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(
            apply.body,
            Some(json!({
                "apiVersion": "veil.dev/v1alpha1",
                "kind": "VeilClusterConfig",
                "metadata": {"name": "default"},
                "spec": {"encryption": {"enabled": true, "strict": true}},
            })),
            "the apply claims spec.encryption only"
        );
        let body = apply.body.clone().expect("body");
        apply.respond(StatusCode::CREATED, &body);
    };
    let (result, ()) = tokio::join!(set_encryption(&client, true, Some(true)), server);
    assert_eq!(
        result.expect("enable"),
        EncryptionSetting {
            enabled: true,
            strict: true
        }
    );
}

#[tokio::test]
async fn disable_keeps_the_current_strict_setting() {
    let (client, mut handle) = mock();
    let server = async {
        let get = next(&mut handle).await;
        assert_eq!(get.method, Method::GET);
        get.respond(
            StatusCode::OK,
            &config(json!({"encryption": {"enabled": true, "strict": false}, "clusterPodCIDRs": ["10.244.0.0/16"]})),
        );
        let apply = next(&mut handle).await;
        assert_eq!(apply.method, Method::PATCH);
        let body = apply.body.clone().expect("body");
        assert_eq!(
            body["spec"],
            json!({"encryption": {"enabled": false, "strict": false}}),
            "no strict flag keeps strict; clusterPodCIDRs is left to its owner"
        );
        apply.respond(StatusCode::OK, &body);
    };
    let (result, ()) = tokio::join!(set_encryption(&client, false, None), server);
    assert_eq!(
        result.expect("disable"),
        EncryptionSetting {
            enabled: false,
            strict: false
        }
    );
}

#[tokio::test]
async fn rejected_enable_names_the_object() {
    let (client, mut handle) = mock();
    let server = async {
        next(&mut handle).await.fail(404, "NotFound");
        next(&mut handle).await.fail(403, "Forbidden");
    };
    let (result, ()) = tokio::join!(set_encryption(&client, true, None), server);
    let text = result.expect_err("403 must fail").to_string();
    assert!(
        text.contains("VeilClusterConfig/default") && text.contains("Forbidden"),
        "{text}"
    );
}

#[tokio::test]
async fn status_counts_ready_nodes_from_lists() {
    let (client, mut handle) = mock();
    let lists = [
        (
            "/api/v1/nodes",
            list("v1", "Node", vec![node(1), node(2), node(3)]),
        ),
        (
            "/apis/veil.dev/v1alpha1/veilnodes",
            list(
                "veil.dev/v1alpha1",
                "VeilNode",
                vec![
                    veil_node(1, true),
                    veil_node(2, true),
                    veil_node(3, false),
                    // Does not convert: reported, and skipped.
                    json!({"apiVersion": "veil.dev/v1alpha1", "kind": "VeilNode",
                           "metadata": {"name": "bad"}, "spec": {"publicKey": "c2hvcnQ="}}),
                ],
            ),
        ),
        (
            CONFIGS,
            list(
                "veil.dev/v1alpha1",
                "VeilClusterConfig",
                vec![config(
                    json!({"encryption": {"enabled": true, "strict": false}}),
                )],
            ),
        ),
    ];
    let server = serve_lists(&mut handle, &lists);
    let (result, ()) = tokio::join!(load_state(&client), server);
    let (state, diags) = result.expect("status");
    assert!(state.config.encryption_enabled && !state.config.strict);
    assert_eq!(state.nodes.len(), 3);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(diags[0].object, "VeilNode/bad");
    let status = conditions(&state);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::reconcile::enable::READY)
        .expect("Ready condition");
    assert_eq!((ready.ready_nodes, ready.total_nodes), (2, 3));
    assert_eq!(ready.status, "False");
}

#[tokio::test]
async fn status_list_error_names_the_kind() {
    let (client, mut handle) = mock();
    let server = async {
        let call = next(&mut handle).await;
        assert_eq!(call.path, "/api/v1/nodes");
        call.respond(StatusCode::OK, &list("v1", "Node", vec![node(1)]));
        next(&mut handle).await.fail(403, "Forbidden");
    };
    let (result, ()) = tokio::join!(load_state(&client), server);
    let text = result.expect_err("403 must fail").to_string();
    assert!(
        text.contains("Pod list") && text.contains("Forbidden"),
        "{text}"
    );
}

fn state_with(ready: &[bool]) -> ClusterState {
    let mut state = ClusterState::default();
    for (i, r) in ready.iter().enumerate() {
        let i = u8::try_from(i + 1).expect("few nodes");
        let n: Node = serde_json::from_value(node(i)).expect("node");
        state.insert(&convert_node(&n).expect("node converts"), "test");
        let v: DynamicObject = serde_json::from_value(veil_node(i, *r)).expect("veil node");
        state.insert(&convert_veil_node(&v).expect("veil node converts"), "test");
    }
    let c: DynamicObject =
        serde_json::from_value(config(json!({"encryption": {"enabled": true}}))).expect("config");
    state.insert(
        &convert_cluster_config(&c).expect("config converts"),
        "test",
    );
    state
}

#[tokio::test]
async fn status_writer_applies_only_changes() {
    let (client, mut handle) = mock();
    let source = Arc::new(KubeSource::start(client, KubeSourceConfig::default()));
    let writer = ClusterStatusWriter::start(Arc::clone(&source));
    // The source's watchers make requests too; answer those neutrally
    // (an error, retried with backoff) and return the status patches.
    async fn next_status(handle: &mut Handle) -> Call {
        loop {
            let call = next(handle).await;
            if call.path.ends_with("/veilclusterconfigs/default/status") {
                return call;
            }
            call.fail(503, "ServiceUnavailable");
        }
    }
    let one = state_with(&[true, false]);
    writer.update(&one);
    let call = next_status(&mut handle).await;
    assert_eq!(call.method, Method::PATCH);
    assert_eq!(call.query("fieldManager"), Some(FIELD_MANAGER));
    let body = call.body.clone().expect("body");
    assert_eq!(
        body["status"],
        serde_json::to_value(conditions(&one)).expect("status JSON")
    );
    assert_eq!(body["status"]["conditions"][0]["readyNodes"], json!(1));
    call.respond(StatusCode::OK, &body);
    // Same state again (another pass): nothing to write. Then a change:
    // the next status request carries it, so the repeat was not sent.
    writer.update(&state_with(&[true, false]));
    tokio::task::yield_now().await;
    let two = state_with(&[true, true]);
    writer.update(&two);
    let call = next_status(&mut handle).await;
    let body = call.body.clone().expect("body");
    assert_eq!(body["status"]["conditions"][0]["readyNodes"], json!(2));
    assert_eq!(body["status"]["conditions"][0]["status"], json!("True"));
    // A failed write is retried.
    call.fail(500, "InternalError");
    let retry = next_status(&mut handle).await;
    assert_eq!(
        retry.body.as_ref().map(|b| &b["status"]),
        Some(&body["status"])
    );
    retry.respond(StatusCode::OK, &body);
    drop(writer);
}

#[test]
fn no_config_object_no_status_write() {
    let mut state = state_with(&[true]);
    state.origins.remove("VeilClusterConfig/default");
    assert!(!has_config(&state));
    assert!(has_config(&state_with(&[true])));
}
