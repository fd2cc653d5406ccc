//! What the kube source asks of the API server, as RBAC names it.
//!
//! [`API_ACCESS`] is the single list the deployment's ClusterRole must equal
//! (`deploy/base/rbac.yaml`). `cargo test --test manifests` checks both
//! directions: it records every request a running [`super::KubeSource`]
//! makes against a mock API server (watches, announcement, both status
//! patches, identity create/get/delete) and requires the set of
//! `(group, resource, verb)` to be exactly this list, and it requires the
//! ClusterRole to grant exactly this list.
//! A new API call in the source therefore fails the test until both this
//! list and the RBAC say so; a stale grant fails it too.

/// One resource the agent uses and the verbs it uses on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Plural resource name, `resource/subresource` for a subresource.
    pub resource: &'static str,
    /// RBAC verbs: `list`/`watch` for the watchers (kube-runtime's watcher
    /// lists, then watches from the list's resource version); `patch` for
    /// server-side apply, plus `create` where the apply may create the
    /// object: the API server authorizes an apply that creates as `create`
    /// ("Server-Side Apply", RBAC and permissions), and admission sees it as
    /// CREATE. An apply to a subresource never creates (`status` of a
    /// missing object is NotFound), so `*/status` needs `patch` only.
    pub verbs: &'static [&'static str],
}

pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilnodes",
        verbs: &["list", "watch", "create", "patch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilnodes/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilclusterconfigs",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilclusterconfigs/status",
        verbs: &["patch"],
    },
    // Identity allocation: watched; created with a plain POST (409 when
    // taken is the compare-and-swap), read back on 409 and before garbage
    // collection, deleted with uid/resourceVersion preconditions. Never
    // updated or patched: an identity's label set does not change.
    ApiAccess {
        group: "veil.dev",
        resource: "veilidentities",
        verbs: &["list", "watch", "create", "get", "delete"],
    },
    // Policies, read only: both kinds compile into the BPF policy maps.
    ApiAccess {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilpolicies",
        verbs: &["list", "watch"],
    },
    // The trust objects, read only: an agent verifies its own certificate
    // and obeys its rotation request, but never writes either (a node must
    // not certify itself; SECURITY.md).
    ApiAccess {
        group: "veil.dev",
        resource: "veilnodecertificates",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilkeyrotations",
        verbs: &["list", "watch"],
    },
];

/// What `veilctl` asks of the API server in Kubernetes mode
/// (`cluster::store::Store::Kube`), for the `veil-operator` ClusterRole in
/// `deploy/base/rbac.yaml`. `cargo test --test manifests` records the
/// requests of every store operation against a mock API server, requires
/// them to equal this list, and requires the role to grant exactly it.
///
/// Reading is one list of every kind the agent watches (`status`,
/// `policy trace` and the checks of every write need the whole state).
/// Writes are server-side applies (`patch`, plus `create` when the object
/// may not exist): the cluster config's `spec.encryption`
/// (`enable`/`disable`, which first `get`s the current strict setting),
/// certificates (`node approve`), rotation requests (`keys rotate`) and
/// external peers' `VeilNode`s (`peer add`).
pub const CTL_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list"],
    },
    ApiAccess {
        group: "",
        resource: "pods",
        verbs: &["list"],
    },
    ApiAccess {
        group: "",
        resource: "namespaces",
        verbs: &["list"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilnodes",
        verbs: &["list", "create", "patch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilclusterconfigs",
        verbs: &["list", "get", "create", "patch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilidentities",
        verbs: &["list"],
    },
    ApiAccess {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: &["list"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilpolicies",
        verbs: &["list"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilnodecertificates",
        verbs: &["list", "create", "patch"],
    },
    ApiAccess {
        group: "veil.dev",
        resource: "veilkeyrotations",
        verbs: &["list", "create", "patch"],
    },
];
