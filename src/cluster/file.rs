//! The file source: a directory of Kubernetes objects as YAML.
//!
//! Every `*.yaml`/`*.yml` under the directory (recursively; names starting
//! with `.` are skipped, which also skips our own temporary files and the
//! `..data` indirection of a mounted ConfigMap) holds one or more documents,
//! each a Kubernetes object or a `List` of them, as `kubectl get -o yaml`
//! prints them.
//!
//! Failure handling follows one rule: a problem with one object skips that
//! object; a problem with a whole file (unreadable, not YAML) keeps the
//! objects that file contributed the last time it was read, so a half-saved
//! edit never tears peers down.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use notify::Watcher as _;
use serde::Deserialize;
use serde_yaml::Value;

use super::objects::{VeilClusterConfig, VeilNode, CLUSTER_CONFIG_NAME, VEIL_API_VERSION};
use super::{
    Announcement, ClusterConfig, ClusterState, Diagnostic, NamespaceInfo, NodeInfo, Object, PodInfo,
};

/// Subdirectory where agents publish their `VeilNode` announcements.
pub const ANNOUNCEMENT_DIR: &str = "veilnodes";
/// Larger files are refused: this is configuration, not a data store.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;
/// Subdirectory nesting beyond this is refused (and symlinked directories
/// are not followed), so a loop cannot make a scan run forever.
const MAX_DEPTH: usize = 16;
/// Events closer together than this are reported once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A steady stream of events is still reported at least this often.
const DEBOUNCE_MAX_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "node name `{}` cannot be a file name (empty, over 253 bytes, leading `.`, or contains `/` or NUL)",
        name.escape_debug()
    )]
    InvalidNodeName { name: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("announcement of node {node}: cannot serialize: {source}")]
    Serialize {
        node: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: cannot watch: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// The cluster state read from a directory of YAML files.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Per file, the objects of its last successful read.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every file; returns the merged state plus diagnostics for everything skipped.
    /// A file that fails to parse keeps contributing its LAST GOOD objects (remembered per
    /// path), with a diagnostic naming the file; a file that was deleted stops contributing.
    pub fn load(&mut self) -> (ClusterState, Vec<Diagnostic>) {
        let mut diags = Vec::new();
        let mut scan = Scan::default();
        scan.walk(&self.dir, 0, &mut diags);

        let mut previous = std::mem::take(&mut self.last_good);
        let mut current = BTreeMap::new();
        for path in &scan.files {
            let before = previous.get(path).map(Vec::as_slice).unwrap_or_default();
            match read_file(path).and_then(|text| parse_file(path, &text, before, &mut diags)) {
                Ok(objects) => {
                    current.insert(path.clone(), objects);
                }
                Err(problem) => {
                    let kept = previous.remove(path);
                    diags.push(file_diag(path, keep_note(problem, kept.as_deref())));
                    if let Some(objects) = kept {
                        current.insert(path.clone(), objects);
                    }
                }
            }
        }
        // Files under a directory we could not list are not known to be
        // deleted: keep what they said.
        for (path, objects) in previous {
            if let Some(dir) = scan.unreadable.iter().find(|d| path.starts_with(d)) {
                diags.push(file_diag(
                    &path,
                    format!(
                        "directory {} could not be read; keeping the {} object(s) of this file's last good read",
                        dir.display(),
                        objects.len()
                    ),
                ));
                current.insert(path, objects);
            }
        }
        self.last_good = current;
        let state = merge(&self.last_good, &mut diags);
        (state, diags)
    }

    /// Writes `DIR/veilnodes/<node>.yaml` atomically (temp file in the same dir + rename), 0644.
    /// Where [`Self::publish_announcement`] writes node `node`'s `VeilNode`.
    pub fn announcement_path(&self, node: &str) -> PathBuf {
        self.dir.join(ANNOUNCEMENT_DIR).join(format!("{node}.yaml"))
    }

    pub fn publish_announcement(&self, a: &Announcement) -> Result<(), Error> {
        // A leading dot would also hide the file from the scanner.
        if a.node.is_empty()
            || a.node.len() > 253
            || a.node.starts_with('.')
            || a.node.contains(['/', '\0'])
        {
            return Err(Error::InvalidNodeName {
                name: a.node.clone(),
            });
        }
        let dir = self.dir.join(ANNOUNCEMENT_DIR);
        fs::create_dir_all(&dir).map_err(|source| io_err(&dir, "create directory", source))?;
        let text =
            serde_yaml::to_string(&VeilNode::from(a)).map_err(|source| Error::Serialize {
                node: a.node.clone(),
                source,
            })?;
        let path = self.announcement_path(&a.node);
        // Unchanged: no write, so no watch event and no rescan on every node.
        if let (Ok(existing), Ok(meta)) = (fs::read(&path), fs::symlink_metadata(&path)) {
            if existing == text.as_bytes()
                && meta.is_file()
                && meta.permissions().mode() & 0o7777 == 0o644
            {
                return Ok(());
            }
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        // A leading dot: the scanner skips it, so a reader never sees a partial file.
        let tmp = dir.join(format!(
            ".{}.yaml.tmp-{}-{}",
            a.node,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = write_synced(&tmp, text.as_bytes()).and_then(|()| {
            // rename(2) replaces the target atomically: readers see the old or the new file.
            fs::rename(&tmp, &path).map_err(|source| io_err(&path, "rename", source))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| io_err(&dir, "fsync directory", source))
    }

    /// Publishes `VeilIdentity/<id>` for `key` unless that number exists:
    /// the file source's create-if-absent. The object is written completely
    /// to a hidden temporary file first, then hard-linked to
    /// `DIR/identities/<id>.yaml`; link(2) fails with `EEXIST` if the name
    /// exists, atomically, so of two agents racing for a number exactly one
    /// wins and no reader ever sees a partial file (rename(2) would silently
    /// replace the other agent's object).
    pub fn create_identity(
        &self,
        id: crate::identity::Identity,
        key: &crate::identity::IdentityKey,
    ) -> Result<crate::identity::Created, Error> {
        use super::identity::{VeilIdentity, IDENTITY_DIR};
        let dir = self.dir.join(IDENTITY_DIR);
        fs::create_dir_all(&dir).map_err(|source| io_err(&dir, "create directory", source))?;
        let path = dir.join(format!("{}.yaml", id.0));
        if path.exists() {
            return Ok(crate::identity::Created::Exists(read_identity(&path)));
        }
        let text = serde_yaml::to_string(&VeilIdentity::new(id, key)).map_err(|source| {
            Error::Serialize {
                node: format!("VeilIdentity/{}", id.0),
                source,
            }
        })?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.yaml.tmp-{}-{}",
            id.0,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let linked =
            write_synced(&tmp, text.as_bytes()).and_then(|()| match fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(source) => Err(io_err(&path, "link", source)),
            });
        let _ = fs::remove_file(&tmp);
        if !linked? {
            return Ok(crate::identity::Created::Exists(read_identity(&path)));
        }
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| io_err(&dir, "fsync directory", source))?;
        Ok(crate::identity::Created::Created)
    }

    /// Deletes `VeilIdentity/<id>` (garbage collection) if the file still
    /// holds `key`; returns whether it did. An object someone replaced by
    /// hand with another label set is left alone.
    pub fn delete_identity(
        &self,
        id: crate::identity::Identity,
        key: &crate::identity::IdentityKey,
    ) -> Result<bool, Error> {
        let path = self
            .dir
            .join(super::identity::IDENTITY_DIR)
            .join(format!("{}.yaml", id.0));
        if read_identity(&path).as_ref() != Some(key) {
            return Ok(false);
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(io_err(&path, "remove", source)),
        }
    }

    /// Blocking-free watch: returns a receiver that gets a `()` whenever something under
    /// DIR changed (recursive, debounced ~100 ms). Dropping the watcher ends the stream.
    /// Watch errors (e.g. an inotify queue overflow) are reported as a change, since
    /// the right reaction to a lost event is a rescan.
    pub fn watch(
        &self,
    ) -> Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>), Error> {
        let (raw_tx, raw_rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reads (including our own scans) must not trigger rescans.
                if let Ok(ev) = &event {
                    if matches!(ev.kind, notify::EventKind::Access(_)) {
                        return;
                    }
                }
                let _ = raw_tx.send(());
            })
            .map_err(|source| Error::Watch {
                path: self.dir.clone(),
                source,
            })?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| Error::Watch {
                path: self.dir.clone(),
                source,
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("veil-file-watch".into())
            .spawn(move || debounce(raw_rx, tx))
            .map_err(|source| io_err(&self.dir, "spawn watch thread", source))?;
        Ok((watcher, rx))
    }
}

/// Agents allocate identities straight into the cluster dir.
impl crate::identity::IdentityStore for FileSource {
    fn create(
        &mut self,
        id: crate::identity::Identity,
        key: &crate::identity::IdentityKey,
    ) -> Result<crate::identity::Created, String> {
        self.create_identity(id, key).map_err(|e| e.to_string())
    }
}

/// Collapses bursts of raw events into one notification each. Ends when the
/// watcher (and with it the raw sender) is dropped or the receiver is closed.
fn debounce(raw: std::sync::mpsc::Receiver<()>, out: tokio::sync::mpsc::Sender<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    while raw.recv().is_ok() {
        let first = Instant::now();
        loop {
            let left = DEBOUNCE_MAX_DELAY.saturating_sub(first.elapsed());
            match raw.recv_timeout(DEBOUNCE.min(left)) {
                Ok(()) if !left.is_zero() => continue,
                Ok(()) | Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    // Deliver what was seen before the watcher went away.
                    let _ = out.try_send(());
                    return;
                }
            }
        }
        // A full channel already holds a pending notification: nothing is lost.
        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = out.try_send(()) {
            return;
        }
    }
}

#[derive(Default)]
struct Scan {
    files: Vec<PathBuf>,
    unreadable: Vec<PathBuf>,
}

impl Scan {
    fn walk(&mut self, dir: &Path, depth: usize, diags: &mut Vec<Diagnostic>) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // A directory that is gone holds no files: its objects go too.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                diags.push(file_diag(dir, "directory does not exist".into()));
                return;
            }
            Err(e) => {
                diags.push(file_diag(dir, format!("cannot list directory: {e}")));
                self.unreadable.push(dir.to_path_buf());
                return;
            }
        };
        let mut names = BTreeSet::new();
        for entry in entries {
            match entry {
                Ok(entry) => {
                    names.insert(entry.file_name());
                }
                Err(e) => {
                    diags.push(file_diag(dir, format!("cannot list directory: {e}")));
                    self.unreadable.push(dir.to_path_buf());
                    return;
                }
            }
        }
        for name in names {
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = dir.join(&name);
            let Ok(link_meta) = fs::symlink_metadata(&path) else {
                continue; // deleted between listing and stat
            };
            if link_meta.is_dir() {
                if depth + 1 >= MAX_DEPTH {
                    diags.push(file_diag(
                        &path,
                        format!("nested deeper than {MAX_DEPTH} directories; not read"),
                    ));
                } else {
                    self.walk(&path, depth + 1, diags);
                }
                continue;
            }
            let is_yaml = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            // Symlinked files are followed (ConfigMap mounts are symlinks).
            if is_yaml && fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
                self.files.push(path);
            }
        }
    }
}

fn read_file(path: &Path) -> Result<String, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut text = String::new();
    let read = file
        .take(MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if read as u64 > MAX_FILE_LEN {
        return Err(format!("larger than {MAX_FILE_LEN} bytes"));
    }
    Ok(text)
}

fn keep_note(problem: String, kept: Option<&[Object]>) -> String {
    match kept {
        Some(objects) => format!(
            "{problem}; keeping the {} object(s) of this file's last good read",
            objects.len()
        ),
        None => format!("{problem}; no earlier good read of this file, nothing used from it"),
    }
}

/// Parses all documents of one file. `Err` means the file as a whole is
/// unusable (not YAML); object-level problems go to `diags`.
/// Parses one file. An object that fails validation is skipped, but if the
/// file's previous good read had a version of it (`previous`), that version
/// stays in force: a bad edit to one object never removes it (for the cluster
/// config, that would silently turn encryption off).
fn parse_file(
    path: &Path,
    text: &str,
    previous: &[Object],
    diags: &mut Vec<Diagnostic>,
) -> Result<Vec<Object>, String> {
    // Parse every document first, so a syntax error late in the file does
    // not leave the earlier documents applied on their own.
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| format!("invalid YAML in document {}: {e}", index + 1))?;
        documents.push(value);
    }
    let mut objects = Vec::new();
    let mut ctx = Ctx {
        path,
        text,
        previous,
        diags,
        objects: &mut objects,
    };
    for (index, value) in documents.into_iter().enumerate() {
        ctx.object(value, &format!("document {}", index + 1), Some(index));
    }
    Ok(objects)
}

struct Ctx<'a> {
    path: &'a Path,
    /// The file's text, to re-read a document for an error with its line.
    text: &'a str,
    /// The objects of this file's last good read.
    previous: &'a [Object],
    diags: &'a mut Vec<Diagnostic>,
    objects: &'a mut Vec<Object>,
}

impl Ctx<'_> {
    /// Converts a document to its type. A `Value` has no positions, so on
    /// failure the document is deserialized again straight from the text:
    /// that error names the field path, line and column.
    fn typed<T: serde::de::DeserializeOwned>(
        &self,
        value: Value,
        document: Option<usize>,
    ) -> Result<T, String> {
        serde_yaml::from_value(value).map_err(|e| {
            let located = document
                .and_then(|i| serde_yaml::Deserializer::from_str(self.text).nth(i))
                .and_then(|doc| T::deserialize(doc).err());
            format!("malformed: {}", located.unwrap_or(e))
        })
    }

    fn diag(&mut self, object: String, problem: String) {
        self.diags.push(Diagnostic {
            source: self.path.display().to_string(),
            object,
            problem,
        });
    }

    /// Handles one object (or `List`); `place` locates it for objects without a name.
    /// `document` is the index of a top-level document (`None` for `List` items).
    fn object(&mut self, value: Value, place: &str, document: Option<usize>) {
        if value.is_null() {
            return; // an empty document, e.g. a trailing `---`
        }
        if !value.is_mapping() {
            self.diag(
                format!("<{place}>"),
                "not a Kubernetes object (expected a mapping with apiVersion and kind)".into(),
            );
            return;
        }
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        let shown_kind = if kind.is_empty() {
            "<no kind>"
        } else {
            kind.as_str()
        };
        let label = match (&name, kind.as_str()) {
            (Some(n), "Pod" | "NetworkPolicy" | "VeilPolicy") => {
                format!("{kind}/{namespace}/{n}")
            }
            (Some(n), _) => format!("{shown_kind}/{n}"),
            (None, _) => format!("{shown_kind}/<no name, {place}>"),
        };
        if api_version.is_empty() || kind.is_empty() {
            self.diag(
                label,
                "not a Kubernetes object: apiVersion or kind missing".into(),
            );
            return;
        }
        // `kubectl get -o yaml` of several objects prints a `v1 List`.
        if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
            match value.get("items") {
                Some(Value::Sequence(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        self.object(item.clone(), &format!("{place}, items[{i}]"), None);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => self.diag(label, "items is not a list".into()),
            }
            return;
        }
        let converted = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Node") => self.typed::<Node>(value, document).and_then(|n| {
                NodeInfo::try_from(&n)
                    .map(Object::Node)
                    .map_err(|e| e.to_string())
            }),
            ("v1", "Pod") => self.typed::<Pod>(value, document).and_then(|p| {
                PodInfo::try_from(&p)
                    .map(Object::Pod)
                    .map_err(|e| e.to_string())
            }),
            ("v1", "Namespace") => self.typed::<Namespace>(value, document).and_then(|n| {
                NamespaceInfo::try_from(&n)
                    .map(Object::Namespace)
                    .map_err(|e| e.to_string())
            }),
            (VEIL_API_VERSION, VeilNode::KIND) => {
                self.typed::<VeilNode>(value, document).and_then(|v| {
                    Announcement::try_from(&v)
                        .map(|a| Object::Announcement(Box::new(a)))
                        .map_err(|e| e.to_string())
                })
            }
            (VEIL_API_VERSION, VeilClusterConfig::KIND) => self
                .typed::<VeilClusterConfig>(value, document)
                .and_then(|c| match name.as_deref() {
                    Some(CLUSTER_CONFIG_NAME) => ClusterConfig::try_from(&c.spec)
                        .map(Object::Config)
                        .map_err(|e| e.to_string()),
                    Some(_) => Err(format!(
                        "ignored: only the VeilClusterConfig named `{CLUSTER_CONFIG_NAME}` is used"
                    )),
                    None => Err("metadata.name is missing or empty".into()),
                }),
            ("networking.k8s.io/v1", "NetworkPolicy") => self
                .typed::<k8s_openapi::api::networking::v1::NetworkPolicy>(value, document)
                .and_then(|p| {
                    crate::policy::Policy::try_from(&p)
                        .map(Object::Policy)
                        .map_err(|e| e.to_string())
                }),
            (VEIL_API_VERSION, crate::policy::VeilPolicy::KIND) => self
                .typed::<crate::policy::VeilPolicy>(value, document)
                .and_then(|p| {
                    crate::policy::Policy::try_from(&p)
                        .map(Object::Policy)
                        .map_err(|e| e.to_string())
                }),
            (VEIL_API_VERSION, super::identity::VeilIdentity::KIND) => self
                .typed::<super::identity::VeilIdentity>(value, document)
                .and_then(|v| {
                    super::identity::PublishedIdentity::try_from(&v)
                        .map(Object::Identity)
                        .map_err(|e| e.to_string())
                }),
            (VEIL_API_VERSION, super::trust::CertificateObject::KIND) => self
                .typed::<super::trust::CertificateObject>(value, document)
                .and_then(|c| {
                    super::trust::certificate_of(&c)
                        .map(|c| Object::Certificate(Box::new(c)))
                        .map_err(|e| e.to_string())
                }),
            (VEIL_API_VERSION, super::trust::RotationObject::KIND) => self
                .typed::<super::trust::RotationObject>(value, document)
                .and_then(|r| {
                    super::trust::rotation_of(&r)
                        .map(Object::Rotation)
                        .map_err(|e| e.to_string())
                }),
            (_, VeilNode::KIND | VeilClusterConfig::KIND)
                if api_version.starts_with("veil.dev/") =>
            {
                Err(format!(
                    "unsupported apiVersion `{api_version}` (this agent reads {VEIL_API_VERSION})"
                ))
            }
            _ => {
                tracing::debug!(
                    file = %self.path.display(),
                    object = %label,
                    api_version = %api_version,
                    "kind not used by the file source; ignored"
                );
                return;
            }
        };
        match converted {
            Ok(object) => self.objects.push(object),
            Err(problem) => match self.previous.iter().find(|o| o.key() == label) {
                Some(last_good) => {
                    self.objects.push(last_good.clone());
                    self.diag(
                        label,
                        format!("{problem}; keeping the last good version of this object"),
                    );
                }
                None => self.diag(label, format!("{problem}; object skipped")),
            },
        }
    }
}

/// Merges the files in path order; of two objects with the same kind and
/// name, the one in the first file wins.
fn merge(files: &BTreeMap<PathBuf, Vec<Object>>, diags: &mut Vec<Diagnostic>) -> ClusterState {
    let mut state = ClusterState::default();
    let mut seen: BTreeMap<String, &Path> = BTreeMap::new();
    for (path, objects) in files {
        for object in objects {
            let key = object.key();
            if let Some(first) = seen.get(&key) {
                let problem = if *first == path.as_path() {
                    "duplicate: defined earlier in the same file; this copy is ignored".to_string()
                } else {
                    format!(
                        "duplicate: already defined in {}; this copy is ignored",
                        first.display()
                    )
                };
                diags.push(Diagnostic {
                    source: path.display().to_string(),
                    object: key,
                    problem,
                });
                continue;
            }
            state.insert(object, &path.display().to_string());
            seen.insert(key, path);
        }
    }
    state
}

/// The label set of an identity file, or `None` if it is unreadable or
/// malformed (such a number is skipped by allocation, never overwritten).
fn read_identity(path: &Path) -> Option<crate::identity::IdentityKey> {
    let text = read_file(path).ok()?;
    let obj: super::identity::VeilIdentity = serde_yaml::from_str(&text).ok()?;
    let published = super::identity::PublishedIdentity::try_from(&obj).ok()?;
    let expected = path.file_stem().and_then(|s| s.to_str());
    (expected == Some(published.id.0.to_string().as_str())).then_some(published.key)
}

fn write_synced(path: &Path, content: &[u8]) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|source| io_err(path, "create", source))?;
    // The umask may have removed bits; announcements are public by design.
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(|source| io_err(path, "chmod", source))?;
    file.write_all(content)
        .map_err(|source| io_err(path, "write", source))?;
    file.sync_all()
        .map_err(|source| io_err(path, "fsync", source))
}

fn io_err(path: &Path, op: &'static str, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn file_diag(path: &Path, problem: String) -> Diagnostic {
    Diagnostic {
        source: path.display().to_string(),
        object: "-".into(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::PublicKey;

    fn key_b64(byte: u8) -> String {
        keymgr::encode_key(&[byte; 32])
    }

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn problems<'a>(diags: &'a [Diagnostic], object: &str) -> Vec<&'a str> {
        diags
            .iter()
            .filter(|d| d.object == object)
            .map(|d| d.problem.as_str())
            .collect()
    }

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: n1
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs:
  - 10.244.1.0/24
status:
  addresses:
  - address: 198.18.0.1
    type: InternalIP
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{address: 198.18.0.2, type: InternalIP}]}
---
"#;

    #[test]
    fn an_invalid_edit_keeps_the_objects_last_good_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let config =
            "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\n";
        write(
            dir,
            "c.yaml",
            &format!("{config}spec: {{encryption: {{enabled: true}}, clusterPodCIDRs: [10.244.0.0/16]}}\n---\n{NODES}"),
        );
        let mut source = FileSource::new(dir);
        let (good, diags) = source.load();
        assert!(diags.is_empty(), "{diags:?}");
        assert!(good.config.encryption_enabled);

        // Break one object of each kind; the file itself still parses.
        let broken_nodes = NODES.replace("podCIDR: 10.244.2.0/24", "podCIDR: 10.244.2.0/33");
        write(
            dir,
            "c.yaml",
            &format!("{config}spec: {{encryption: {{enabled: true}}, clusterPodCIDRs: [10.244.0.0/99]}}\n---\n{broken_nodes}"),
        );
        let (state, diags) = source.load();
        assert_eq!(state.config, good.config, "the config stays as it was");
        assert_eq!(state.nodes, good.nodes, "node n2 stays as it was");
        for object in ["VeilClusterConfig/default", "Node/n2"] {
            assert!(
                problems(&diags, object)
                    .iter()
                    .any(|p| p.contains("keeping the last good version")),
                "{object}: {diags:?}"
            );
        }

        // An object that never had a good version is simply skipped.
        write(
            dir,
            "new.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n9}\nspec: {podCIDR: nonsense}\n",
        );
        let (state, diags) = source.load();
        assert!(!state.nodes.contains_key("n9"));
        assert!(problems(&diags, "Node/n9")
            .iter()
            .any(|p| p.contains("object skipped")));
    }

    #[test]
    fn problems_found_while_reconciling_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "nodes.yaml", NODES);
        let thief = write(
            dir,
            "thief.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: thief}\nspec: {podCIDR: 10.244.2.0/24}\n",
        );
        let orphan = write(
            dir,
            "orphan.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: orphan}\nspec: {nodeName: nowhere}\nstatus: {podIP: 10.244.1.9}\n",
        );
        let (state, _) = FileSource::new(dir).load();
        let outcome = crate::reconcile::desired(
            &state,
            "n1",
            &crate::reconcile::TrustContext {
                authority: keymgr::AuthorityKey::from_seed([1; 32]).public_key(),
                now: 0,
                accepted: &BTreeMap::new(),
            },
        );
        let source_of = |object: &str| {
            outcome
                .diagnostics
                .iter()
                .find(|d| d.object == object)
                .map(|d| d.source.clone())
        };
        assert_eq!(source_of("Node/thief"), Some(thief.display().to_string()));
        assert_eq!(
            source_of("Pod/default/orphan"),
            Some(orphan.display().to_string())
        );
    }

    #[test]
    fn reads_every_kind_from_many_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "nodes.yaml", NODES);
        write(
            dir,
            "workloads/pods.yml",
            r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: prod, labels: {app: web}}
  spec: {nodeName: n1, containers: [{name: c, image: x}]}
  status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: db}
  spec: {nodeName: n2, hostNetwork: true}
  status: {podIP: 198.18.0.2}
metadata: {resourceVersion: ""}
"#,
        );
        write(
            dir,
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: a}}\n",
        );
        write(
            dir,
            "config.yaml",
            "apiVersion: veil.dev/v1alpha1\nkind: VeilClusterConfig\nmetadata: {name: default}\nspec: {encryption: {enabled: true}}\n",
        );
        write(
            dir,
            "veilnodes/n2.yaml",
            &format!("apiVersion: veil.dev/v1alpha1\nkind: VeilNode\nmetadata: {{name: n2}}\nspec:\n  publicKey: {}\n  listenPort: 51821\n  podCIDRs: [10.244.2.0/24]\n  endpoint: 198.18.0.2:51821\n", key_b64(2)),
        );
        // Ignored without complaint: other kinds, non-YAML files, hidden files.
        write(
            dir,
            "policy.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}}\n---\napiVersion: veil.dev/v1alpha1\nkind: VeilPolicy\nmetadata: {name: p, namespace: prod}\n",
        );
        write(dir, "README.txt", "not: [yaml");
        write(dir, ".hidden.yaml", "not: [yaml");

        let mut source = FileSource::new(dir);
        let (state, diags) = source.load();
        assert!(diags.is_empty(), "{diags:#?}");
        assert_eq!(state.nodes.len(), 2);
        assert_eq!(
            state.nodes["n1"].internal_ip,
            Some("198.18.0.1".parse().unwrap())
        );
        assert_eq!(
            state.nodes["n2"].pod_cidrs,
            vec!["10.244.2.0/24".parse().unwrap()]
        );
        let web = &state.pods[&("prod".to_string(), "web".to_string())];
        assert_eq!(web.pod_ip, Some("10.244.1.5".parse().unwrap()));
        assert_eq!(web.node_name.as_deref(), Some("n1"));
        let db = &state.pods[&("default".to_string(), "db".to_string())];
        assert!(db.host_network);
        assert_eq!(
            state.namespaces["prod"]
                .labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("prod")
        );
        assert_eq!(
            state.config,
            ClusterConfig {
                encryption_enabled: true,
                strict: true,
                cluster_pod_cidrs: vec![],
                ..ClusterConfig::default()
            }
        );
        let ann = &state.announcements["n2"];
        assert_eq!(ann.public_key, PublicKey([2; 32]));
        assert_eq!(ann.listen_port, 51821);
        assert_eq!(ann.endpoint, Some("198.18.0.2:51821".parse().unwrap()));
    }

    #[test]
    fn empty_or_missing_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, diags) = FileSource::new(tmp.path()).load();
        assert_eq!(state, ClusterState::default());
        assert!(diags.is_empty());
        let missing = tmp.path().join("nope");
        let (state, diags) = FileSource::new(&missing).load();
        assert_eq!(state, ClusterState::default());
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].source, missing.display().to_string());
        assert!(diags[0].problem.contains("does not exist"));
    }

    #[test]
    fn broken_file_keeps_last_good_objects_until_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(tmp.path(), "nodes.yaml", NODES);
        write(
            tmp.path(),
            "other.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        );
        let mut source = FileSource::new(tmp.path());
        let (good, diags) = source.load();
        assert!(diags.is_empty(), "{diags:#?}");
        assert_eq!(good.nodes.len(), 2);

        // A half-written edit: the flow mapping is cut off.
        fs::write(&path, "apiVersion: v1\nkind: Node\nmetadata: {name: n1\n").unwrap();
        let (state, diags) = source.load();
        assert_eq!(state, good, "last good objects still used");
        assert_eq!(diags.len(), 1, "{diags:#?}");
        assert_eq!(diags[0].source, path.display().to_string());
        assert!(
            diags[0].problem.contains("invalid YAML"),
            "{}",
            diags[0].problem
        );
        assert!(diags[0].problem.contains("line"), "{}", diags[0].problem);
        assert!(
            diags[0].problem.contains("keeping the 2 object(s)"),
            "{}",
            diags[0].problem
        );

        // Still broken on the next scan: still kept.
        let (state, _) = source.load();
        assert_eq!(state, good);

        // Fixed with different content: the new content is used.
        fs::write(&path, "apiVersion: v1\nkind: Node\nmetadata: {name: n9}\n").unwrap();
        let (state, diags) = source.load();
        assert!(diags.is_empty(), "{diags:#?}");
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), vec!["n9"]);

        // Deleted: its objects are gone, the other file stays.
        fs::remove_file(&path).unwrap();
        let (state, diags) = source.load();
        assert!(diags.is_empty(), "{diags:#?}");
        assert!(state.nodes.is_empty());
        assert!(state.namespaces.contains_key("x"));

        // Broken from the start: nothing used, diagnosed.
        write(tmp.path(), "nodes.yaml", "{{{");
        let (state, diags) = source.load();
        assert!(state.nodes.is_empty());
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0].problem.contains("no earlier good read"),
            "{}",
            diags[0].problem
        );
    }

    #[test]
    fn object_problems_skip_only_that_object() {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(
            tmp.path(),
            "bad.yaml",
            &format!(
                r#"apiVersion: v1
kind: Node
metadata: {{}}
---
apiVersion: v1
kind: Node
metadata: {{name: badcidr}}
spec: {{podCIDRs: [10.244.1.0/33]}}
---
apiVersion: v1
kind: Node
metadata: {{name: badip}}
status: {{addresses: [{{type: InternalIP, address: "198.18.0.300"}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: badtype}}
spec: {{podCIDRs: 5}}
---
apiVersion: veil.dev/v1alpha1
kind: VeilNode
metadata: {{name: shortkey}}
spec: {{publicKey: "{short}", podCIDRs: [10.244.3.0/24]}}
---
apiVersion: veil.dev/v1alpha1
kind: VeilNode
metadata: {{name: port0}}
spec: {{publicKey: "{good}", listenPort: 0}}
---
apiVersion: veil.dev/v1alpha1
kind: VeilClusterConfig
metadata: {{name: other}}
spec: {{encryption: {{enabled: true}}}}
---
apiVersion: veil.dev/v1beta9
kind: VeilNode
metadata: {{name: future}}
---
kind: Node
metadata: {{name: nokind}}
---
- just
- a list
---
apiVersion: v1
kind: Pod
metadata: {{name: badpod, namespace: prod}}
status: {{podIP: 10.244.1.999}}
---
apiVersion: v1
kind: Node
metadata: {{name: fine}}
"#,
                short = &key_b64(1)[..20],
                good = key_b64(1)
            ),
        );
        let (state, diags) = FileSource::new(tmp.path()).load();
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), vec!["fine"]);
        assert!(state.announcements.is_empty());
        assert!(state.pods.is_empty());
        assert_eq!(
            state.config,
            ClusterConfig::default(),
            "config `other` ignored"
        );
        let source = path.display().to_string();
        assert!(diags.iter().all(|d| d.source == source), "{diags:#?}");
        let expect = [
            ("Node/<no name, document 1>", "metadata.name"),
            ("Node/badcidr", "10.244.1.0/33"),
            ("Node/badip", "198.18.0.300"),
            (
                "Node/badtype",
                "spec.podCIDRs: invalid type: integer `5`, expected a sequence at line 18",
            ),
            ("VeilNode/shortkey", "spec.publicKey"),
            ("VeilNode/port0", "port 0"),
            (
                "VeilClusterConfig/other",
                "only the VeilClusterConfig named `default`",
            ),
            ("VeilNode/future", "unsupported apiVersion"),
            ("Node/nokind", "apiVersion or kind missing"),
            ("<document 10>", "not a Kubernetes object"),
            ("Pod/prod/badpod", "status.podIP"),
        ];
        for (object, needle) in expect {
            let found = problems(&diags, object);
            assert_eq!(found.len(), 1, "{object}: {diags:#?}");
            assert!(found[0].contains(needle), "{object}: {}", found[0]);
        }
        assert_eq!(diags.len(), expect.len(), "{diags:#?}");
    }

    #[test]
    fn certificates_and_rotation_requests_are_read_and_checked() {
        use crate::cluster::trust::{self, Certificates};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let authority = keymgr::AuthorityKey::from_seed([1; 32]);
        let identity = keymgr::IdentityKey::from_seed([2; 32]).public_key();
        let cert = authority.certify("n1", identity, 1000, 2000).unwrap();
        // Written as veilctl writes them in file mode.
        Certificates::new(dir).write(&cert).unwrap();
        trust::write_rotation(dir, "n1", 3).unwrap();
        let mut source = FileSource::new(dir);
        let (state, diags) = source.load();
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(state.certificates.get("n1"), Some(&cert));
        assert_eq!(state.rotation_requests.get("n1"), Some(&3));
        assert_eq!(
            state
                .origins
                .get("VeilNodeCertificate/n1")
                .map(String::as_str),
            Some(
                Certificates::new(dir)
                    .path("n1")
                    .display()
                    .to_string()
                    .as_str()
            )
        );

        // A certificate whose reader fields contradict the signed copy, and
        // a rotation to generation 0: diagnosed by name, last good kept.
        let path = Certificates::new(dir).path("n1");
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("notAfter: 2000", "notAfter: 9999")).unwrap();
        write(
            dir,
            "veilrotations/n1.yaml",
            "apiVersion: veil.dev/v1alpha1\nkind: VeilKeyRotation\nmetadata: {name: n1}\nspec: {generation: 0}\n",
        );
        let (state, diags) = source.load();
        assert_eq!(state.certificates.get("n1"), Some(&cert), "last good kept");
        assert_eq!(
            state.rotation_requests.get("n1"),
            Some(&3),
            "last good kept"
        );
        let cert_problems = problems(&diags, "VeilNodeCertificate/n1");
        assert_eq!(cert_problems.len(), 1, "{diags:?}");
        assert!(
            cert_problems[0].contains("spec.notAfter is `9999`")
                && cert_problems[0].contains("keeping the last good version"),
            "{cert_problems:?}"
        );
        let rot_problems = problems(&diags, "VeilKeyRotation/n1");
        assert!(
            rot_problems.len() == 1
                && rot_problems[0].contains("spec.generation must be at least 1"),
            "{diags:?}"
        );

        // Deleted: gone from the state.
        fs::remove_file(&path).unwrap();
        fs::remove_file(trust::rotation_path(dir, "n1")).unwrap();
        let (state, _) = source.load();
        assert!(state.certificates.is_empty() && state.rotation_requests.is_empty());
    }

    #[test]
    fn duplicates_keep_the_first_in_path_order() {
        let tmp = tempfile::tempdir().unwrap();
        let first = write(
            tmp.path(),
            "a.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n",
        );
        let second = write(
            tmp.path(),
            "b/n.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.9.0/24}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: other}\n",
        );
        let (state, diags) = FileSource::new(tmp.path()).load();
        assert_eq!(
            state.nodes["n1"].pod_cidrs,
            vec!["10.244.1.0/24".parse().unwrap()]
        );
        assert_eq!(state.pods.len(), 2);
        assert_eq!(diags.len(), 2, "{diags:#?}");
        assert_eq!(diags[0].source, second.display().to_string());
        assert_eq!(diags[0].object, "Node/n1");
        assert!(diags[0].problem.contains(&first.display().to_string()));
        assert_eq!(diags[1].object, "Pod/default/p");
        assert!(diags[1].problem.contains("same file"));
    }

    #[test]
    fn publish_announcement_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let source = FileSource::new(tmp.path());
        let mut ann = Announcement {
            node: "n1".into(),
            public_key: PublicKey([5; 32]),
            listen_port: 51820,
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            endpoint: None,
            ..Announcement::default()
        };
        source.publish_announcement(&ann).unwrap();
        let dir = tmp.path().join(ANNOUNCEMENT_DIR);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let first = inode(&dir.join("n1.yaml"));
        // Unchanged content is not rewritten (rename would give a new inode).
        source.publish_announcement(&ann).unwrap();
        assert_eq!(inode(&dir.join("n1.yaml")), first);
        ann.endpoint = Some("[fd00::1]:51820".parse().unwrap());
        source.publish_announcement(&ann).unwrap();
        assert_ne!(inode(&dir.join("n1.yaml")), first);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["n1.yaml"], "no temp files left");
        let mode = fs::metadata(dir.join("n1.yaml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);
        let (state, diags) = FileSource::new(tmp.path()).load();
        assert!(diags.is_empty(), "{diags:#?}");
        assert_eq!(state.announcements["n1"], ann);

        for bad in ["", "..", ".hidden", "a/b", "a\0b"] {
            let err = source
                .publish_announcement(&Announcement {
                    node: bad.into(),
                    ..ann.clone()
                })
                .unwrap_err();
            assert!(matches!(err, Error::InvalidNodeName { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn watch_reports_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let source = FileSource::new(tmp.path());
        let (_watcher, mut rx) = source.watch().unwrap();
        write(tmp.path(), "sub/nodes.yaml", NODES);
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no change event within 10s")
            .expect("watch channel closed");
        // Drain the rest of the burst (directory creation and file write may
        // straddle a debounce window).
        while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await {
        }
        // Our own reads must not count as changes: a scan (which opens and
        // reads every file) produces no notification within several debounce windows.
        let mut source = source;
        let (state, _) = source.load();
        assert_eq!(state.nodes.len(), 2);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .is_err(),
            "reading the files was reported as a change"
        );
        // A later write must be reported.
        source
            .publish_announcement(&Announcement {
                node: "n1".into(),
                public_key: PublicKey([5; 32]),
                listen_port: 51820,
                pod_cidrs: vec![],
                endpoint: None,
                ..Announcement::default()
            })
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no change event within 10s after publish")
            .expect("watch channel closed");
    }

    #[test]
    fn watch_missing_dir_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = FileSource::new(tmp.path().join("nope"))
            .watch()
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn debounce_coalesces_bursts() {
        let (raw_tx, raw_rx) = std::sync::mpsc::channel();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let worker = std::thread::spawn(move || debounce(raw_rx, tx));
        for _ in 0..50 {
            raw_tx.send(()).unwrap();
        }
        drop(raw_tx);
        worker.join().unwrap();
        // 50 events in a burst, then the watcher went away: one notification.
        assert_eq!(rx.try_recv(), Ok(()));
        assert!(rx.try_recv().is_err());
    }
}
