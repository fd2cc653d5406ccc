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
];
