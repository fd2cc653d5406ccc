//! The source abstraction on both sources: the file source over a temp dir,
//! the kube source over a tower-test mock of the API server (as in
//! `cluster/kube/tests.rs`, reduced to what this layer adds: synced, change
//! notification, and the background publisher).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};

use super::*;
use crate::cluster::kube::BackoffPolicy;
use crate::cluster::PublicKey;

type Body = ::kube::client::Body;
type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>;

const DEADLINE: Duration = Duration::from_secs(10);

const NODE_YAML: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 198.18.0.1}]}\n";

fn announcement() -> Announcement {
    let mut a = Announcement {
        node: "n1".into(),
        public_key: PublicKey([7; 32]),
        listen_port: 51820,
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        ..Announcement::default()
    };
    a.status.key_since = Some(1_750_000_000);
    a.status.peers.insert("n2".into(), 3);
    a
}

#[tokio::test]
async fn file_source_is_synced_notifies_and_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::open(&SourceConfig::File {
        dir: dir.path().to_path_buf(),
    })
    .await
    .unwrap();
    assert_eq!(source.kind(), "file");
    assert!(source.synced(), "a directory scan is always complete");
    assert!(source.load().0.nodes.is_empty());

    std::fs::write(dir.path().join("n1.yaml"), NODE_YAML).unwrap();
    tokio::time::timeout(DEADLINE, source.changed())
        .await
        .expect("no change notification for a new file");
    let (state, diags) = source.load();
    assert!(state.nodes.contains_key("n1"), "{diags:?}");

    let a = announcement();
    source.publish_announcement(&a).unwrap();
    let (state, diags) = source.load();
    assert_eq!(state.announcements.get("n1"), Some(&a), "{diags:?}");
}

#[tokio::test]
async fn file_source_names_the_directory_it_cannot_watch() {
    let err = Source::file(Path::new("/nonexistent/veil-cluster")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/veil-cluster"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_kubeconfig_is_named() {
    let Err(err) = kube_client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
        panic!("a missing kubeconfig gave a client");
    };
    assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
}

fn kube_source() -> (Source, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    let client = ::kube::Client::new(service, "default");
    let source = Source::kube(
        client,
        KubeSourceConfig {
            backoff: BackoffPolicy::Exponential {
                min: Duration::from_millis(20),
                max: Duration::from_millis(100),
            },
            watch_timeout: None,
        },
    );
    (source, handle)
}

fn respond(send: tower_test::mock::SendResponse<Response<ResponseBody>>, code: u16, body: &Value) {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    send.send_response(
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Full::new(bytes).boxed_unsync())
            .unwrap(),
    );
}

/// A list response for the resource at `path`.
fn list_for(path: &str, items: Vec<Value>) -> Value {
    let (api_version, kind) = if path.starts_with("/apis/veil.dev/") {
        ("veil.dev/v1alpha1", "List")
    } else {
        ("v1", "List")
    };
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// What the mock received: method, path, body.
type Seen = (Method, String, Option<Value>);

/// Answers requests until `stop` says so: lists get `items_for(path)`,
/// watches a stream that stays open, PATCHes the answer `patch_code`
/// gives. Returns every request seen.
async fn serve(
    handle: &mut Handle,
    seen: &mut Vec<Seen>,
    watches: &mut Vec<fmpsc::UnboundedSender<Bytes>>,
    mut patch_code: impl FnMut(&str) -> u16,
    mut stop: impl FnMut(&[Seen]) -> bool,
) {
    while !stop(seen) {
        let (request, send) = tokio::time::timeout(DEADLINE, handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request; seen so far: {seen:?}"))
            .expect("client gone");
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let method = request.method().clone();
        if method == Method::GET && query.contains("watch=true") {
            let (tx, rx) = fmpsc::unbounded::<Bytes>();
            let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
            send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(BodyExt::boxed_unsync(body))
                    .unwrap(),
            );
            watches.push(tx);
            seen.push((method, path, None));
        } else if method == Method::GET {
            let items = if path == "/api/v1/nodes" {
                vec![serde_json::to_value(
                    serde_yaml::from_str::<k8s_openapi::api::core::v1::Node>(NODE_YAML).unwrap(),
                )
                .unwrap()]
            } else {
                vec![]
            };
            respond(send, 200, &list_for(&path, items));
            seen.push((method, path, None));
        } else {
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            let code = patch_code(&path);
            if code == 200 {
                respond(send, 200, &body);
            } else {
                respond(
                    send,
                    code,
                    &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                            "message": "test: unavailable", "reason": "ServiceUnavailable", "code": code}),
                );
            }
            seen.push((method, path, Some(body)));
        }
    }
}

fn lists(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|(m, p, _)| *m == Method::GET && !p.is_empty())
        .count()
}

#[tokio::test]
async fn kube_source_is_unsynced_until_every_kind_is_listed() {
    let (mut source, mut handle) = kube_source();
    assert_eq!(source.kind(), "kube");
    assert!(!source.synced());
    let (state, diags) = source.load();
    assert!(state.nodes.is_empty());
    assert!(
        diags
            .iter()
            .any(|d| d.problem.contains("initial list not received yet")),
        "{diags:?}"
    );

    let mut seen = Vec::new();
    let mut watches = Vec::new();
    // Five kinds: a list and a watch each.
    serve(
        &mut handle,
        &mut seen,
        &mut watches,
        |_| 200,
        |s| lists(s) >= 10,
    )
    .await;
    tokio::time::timeout(DEADLINE, async {
        while !source.synced() {
            source.changed().await;
        }
    })
    .await
    .expect("the source never reported synced");
    let (state, diags) = source.load();
    assert!(state.nodes.contains_key("n1"));
    assert!(diags.is_empty(), "{diags:?}");
}

#[tokio::test]
async fn kube_publisher_applies_spec_then_status_and_retries() {
    let (source, mut handle) = kube_source();
    let mut seen = Vec::new();
    let mut watches = Vec::new();
    let a = announcement();
    source.publish_announcement(&a).unwrap();
    // The first apply fails (503); the publisher must retry it, then set the status.
    let mut failed = false;
    serve(
        &mut handle,
        &mut seen,
        &mut watches,
        |path| {
            if path.ends_with("/veilnodes/n1") && !failed {
                failed = true;
                503
            } else {
                200
            }
        },
        |s| {
            s.iter()
                .any(|(m, p, _)| *m == Method::PATCH && p.ends_with("/veilnodes/n1/status"))
        },
    )
    .await;
    let patches: Vec<&Seen> = seen
        .iter()
        .filter(|(m, _, _)| *m == Method::PATCH)
        .collect();
    let paths: Vec<&str> = patches.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/apis/veil.dev/v1alpha1/veilnodes/n1",
            "/apis/veil.dev/v1alpha1/veilnodes/n1",
            "/apis/veil.dev/v1alpha1/veilnodes/n1/status",
        ],
        "apply, retried apply after the 503, then status"
    );
    let spec = patches[1].2.as_ref().unwrap();
    assert_eq!(spec["spec"]["publicKey"], keymgr::encode_key(&[7; 32]));
    let status = patches[2].2.as_ref().unwrap();
    assert_eq!(status["status"]["keySince"], 1_750_000_000u64);
    assert_eq!(status["status"]["peerGenerations"]["n2"], 3);

    // Publishing the same announcement again is not a new write.
    source.publish_announcement(&a).unwrap();
    let mut b = a.clone();
    b.listen_port = 51821;
    source.publish_announcement(&b).unwrap();
    let before = seen.len();
    serve(
        &mut handle,
        &mut seen,
        &mut watches,
        |_| 200,
        |s| {
            s.iter()
                .filter(|(m, p, _)| *m == Method::PATCH && p.ends_with("/veilnodes/n1/status"))
                .count()
                >= 2
        },
    )
    .await;
    let spec_writes: Vec<&Value> = seen[before..]
        .iter()
        .filter(|(m, p, _)| *m == Method::PATCH && p.ends_with("/veilnodes/n1"))
        .filter_map(|(_, _, b)| b.as_ref())
        .collect();
    assert_eq!(
        spec_writes.len(),
        1,
        "only the changed announcement is written"
    );
    assert_eq!(spec_writes[0]["spec"]["listenPort"], 51821);
}
