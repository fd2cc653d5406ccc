//! On-disk key storage: one small versioned text file per key kind.
//!
//! ```text
//! # Veil key file: secret, keep mode 0600.
//! version=1
//! kind=x25519
//! generation=1
//! private_key=<base64>
//! ```
//!
//! Files are written to a temporary file in the same directory, fsynced,
//! then moved into place (POSIX rename(2) replaces the target atomically,
//! and link(2) creates it only if absent), and the directory is fsynced so
//! the new name survives a crash. Readers therefore see either the old or the
//! new key, never a mix.
//!
//! Files per [`KeyKind`]: `wireguard.key` (current WireGuard key),
//! `wireguard.previous.key` (the one the last rotation replaced),
//! `identity.key` (node identity, Ed25519 seed) and `authority.key` (the
//! cluster authority, Ed25519 seed; only in the operator's store).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

use crate::{
    decode_key, encode_key, AuthorityKey, Error, IdentityKey, WireGuardPrivateKey, KEY_LEN,
};

/// The only file format version this build reads and writes.
const FORMAT_VERSION: &str = "1";
/// Key files are a few lines; anything larger is not one of ours.
const MAX_FILE_LEN: u64 = 4096;
/// Bits that must be clear on a key file: no access for group or others.
const FORBIDDEN_MODE_BITS: u32 = 0o077;

/// A secret as stored, with its generation.
type RawKey = (Zeroizing<[u8; KEY_LEN]>, u64);

/// The kinds of secret a [`KeyStore`] holds; each has its own file.
///
/// Ed25519 seeds are 32 bytes like X25519 keys, so every kind shares the one
/// file format; the `kind=` tag differs per role so that a key copied to the
/// wrong file name is refused instead of used in the wrong role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// The node's current WireGuard static key.
    WireGuard,
    /// The WireGuard key that the last rotation replaced, kept so that
    /// handshakes still addressed to it are answered during the grace period.
    WireGuardPrevious,
    /// The node's Ed25519 identity key (signs its announcements).
    Identity,
    /// The cluster authority's Ed25519 key (operator side only).
    Authority,
}

impl KeyKind {
    fn file_name(self) -> &'static str {
        match self {
            KeyKind::WireGuard => "wireguard.key",
            KeyKind::WireGuardPrevious => "wireguard.previous.key",
            KeyKind::Identity => "identity.key",
            KeyKind::Authority => "authority.key",
        }
    }

    /// The `kind=` value in the file: the algorithm (and, for Ed25519, the
    /// role), so a file copied to the wrong name is refused instead of misused.
    /// Current and previous WireGuard keys share a tag: they are the same
    /// kind of key at different ages.
    fn tag(self) -> &'static str {
        match self {
            KeyKind::WireGuard | KeyKind::WireGuardPrevious => "x25519",
            KeyKind::Identity => "ed25519-node-identity",
            KeyKind::Authority => "ed25519-cluster-authority",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::WireGuard => "WireGuard",
            KeyKind::WireGuardPrevious => "previous WireGuard",
            KeyKind::Identity => "node identity",
            KeyKind::Authority => "cluster authority",
        })
    }
}

/// A key together with its generation (1 for the first key, +1 per rotation).
#[derive(Debug, Clone)]
pub struct StoredKey<K> {
    pub key: K,
    pub generation: u64,
}

/// A directory of key files (created with mode 0700).
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the key of `kind` lives.
    pub fn path(&self, kind: KeyKind) -> PathBuf {
        self.dir.join(kind.file_name())
    }

    /// The node's WireGuard key, generated and stored the first time. If
    /// another process creates the key concurrently, both end up with the one
    /// that reached the disk first.
    ///
    /// A fresh key gets generation 1, or one more than a surviving previous
    /// key, so that peers which accepted that generation do not refuse the
    /// new key as a rollback.
    pub fn load_or_generate_wireguard(&self) -> Result<StoredKey<WireGuardPrivateKey>, Error> {
        if let Some(stored) = self.load_wireguard()? {
            return Ok(stored);
        }
        let generation = match self.read(KeyKind::WireGuardPrevious)? {
            Some((_, previous)) => previous.checked_add(1).ok_or(Error::GenerationOverflow {
                kind: KeyKind::WireGuard,
            })?,
            None => 1,
        };
        let fresh = WireGuardPrivateKey::generate();
        let created = self.write(KeyKind::WireGuard, &fresh.to_bytes(), generation, false)?;
        if created {
            return Ok(StoredKey {
                key: fresh,
                generation,
            });
        }
        self.load_wireguard()?.ok_or_else(|| Error::Corrupt {
            path: self.path(KeyKind::WireGuard),
            problem: "key file vanished while it was being created".into(),
        })
    }

    /// The stored WireGuard key, or `None` if there is none yet.
    pub fn load_wireguard(&self) -> Result<Option<StoredKey<WireGuardPrivateKey>>, Error> {
        Ok(self
            .read(KeyKind::WireGuard)?
            .map(|(secret, generation)| StoredKey {
                key: WireGuardPrivateKey::from_bytes(*secret),
                generation,
            }))
    }

    /// Replaces the stored WireGuard key (prefer [`rotate_wireguard`](Self::rotate_wireguard),
    /// which keeps the replaced key for the grace period).
    pub fn store_wireguard(&self, stored: &StoredKey<WireGuardPrivateKey>) -> Result<(), Error> {
        self.write(
            KeyKind::WireGuard,
            &stored.key.to_bytes(),
            stored.generation,
            true,
        )
        .map(|_| ())
    }

    /// Replaces the WireGuard key with a fresh one of the next generation and
    /// keeps the replaced key as the previous key. Returns `(old, new)`.
    ///
    /// Crash safety, step by step (each write is fsynced, each rename is
    /// followed by an fsync of the directory):
    /// 1. the new key is written to a temporary file: nothing in effect has
    ///    changed, a crash leaves the old state;
    /// 2. the old key is written as the previous key (replacing any older
    ///    previous key): a crash now leaves the old current key in place, and
    ///    the previous file holds the same key and generation, which
    ///    [`load_previous_wireguard`](Self::load_previous_wireguard) ignores —
    ///    the old state, less the key two generations back that this rotation
    ///    was retiring anyway;
    /// 3. the temporary file is renamed over the current key, atomically:
    ///    the new state.
    ///
    /// Renaming first and saving the previous key second would open a window
    /// in which a crash loses the old key while peers still use it. Rotations
    /// (and [`forget_previous_wireguard`](Self::forget_previous_wireguard))
    /// are serialized by an advisory lock on `DIR/.lock`, so two concurrent
    /// rotations cannot both save the same old key and lose one generation.
    pub fn rotate_wireguard(
        &self,
    ) -> Result<
        (
            StoredKey<WireGuardPrivateKey>,
            StoredKey<WireGuardPrivateKey>,
        ),
        Error,
    > {
        let _lock = self.lock()?;
        let old = self
            .load_wireguard()?
            .ok_or_else(|| Error::NothingToRotate {
                path: self.path(KeyKind::WireGuard),
                kind: KeyKind::WireGuard,
            })?;
        let generation = old
            .generation
            .checked_add(1)
            .ok_or(Error::GenerationOverflow {
                kind: KeyKind::WireGuard,
            })?;
        let new = StoredKey {
            key: WireGuardPrivateKey::generate(),
            generation,
        };
        // Step 1.
        let staged = self.temp_path(KeyKind::WireGuard);
        let current = self.path(KeyKind::WireGuard);
        let result = write_synced(
            &staged,
            file_content(KeyKind::WireGuard, &new.key.to_bytes(), generation).as_bytes(),
        )
        // Step 2.
        .and_then(|()| {
            self.write(
                KeyKind::WireGuardPrevious,
                &old.key.to_bytes(),
                old.generation,
                true,
            )
        })
        // Step 3.
        .and_then(|_| {
            fs::rename(&staged, &current).map_err(|source| io_err(&current, "rename", source))
        })
        .and_then(|()| self.sync_dir());
        if result.is_err() && staged.exists() {
            let _ = fs::remove_file(&staged);
        }
        result?;
        Ok((old, new))
    }

    /// The key the last rotation replaced, while it is still kept. `None` if
    /// there is none, or if it is not older than the current key (a rotation
    /// interrupted between its steps 2 and 3 leaves such a copy).
    pub fn load_previous_wireguard(&self) -> Result<Option<StoredKey<WireGuardPrivateKey>>, Error> {
        let Some((secret, generation)) = self.read(KeyKind::WireGuardPrevious)? else {
            return Ok(None);
        };
        if let Some((_, current)) = self.read(KeyKind::WireGuard)? {
            if generation >= current {
                return Ok(None);
            }
        }
        Ok(Some(StoredKey {
            key: WireGuardPrivateKey::from_bytes(*secret),
            generation,
        }))
    }

    /// Deletes the previous WireGuard key once the grace period is over.
    /// Returns whether there was one.
    pub fn forget_previous_wireguard(&self) -> Result<bool, Error> {
        let _lock = self.lock()?;
        let path = self.path(KeyKind::WireGuardPrevious);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(io_err(&path, "remove", source)),
        }
        self.sync_dir()?;
        Ok(true)
    }

    /// The node's identity key, generated (generation 1) and stored the
    /// first time; concurrent callers end up with the same key.
    pub fn load_or_generate_identity(&self) -> Result<StoredKey<IdentityKey>, Error> {
        if let Some(stored) = self.load_identity()? {
            return Ok(stored);
        }
        let fresh = IdentityKey::generate();
        if self.write(KeyKind::Identity, &fresh.to_seed(), 1, false)? {
            return Ok(StoredKey {
                key: fresh,
                generation: 1,
            });
        }
        self.load_identity()?.ok_or_else(|| Error::Corrupt {
            path: self.path(KeyKind::Identity),
            problem: "key file vanished while it was being created".into(),
        })
    }

    /// The stored identity key, or `None` if there is none yet.
    pub fn load_identity(&self) -> Result<Option<StoredKey<IdentityKey>>, Error> {
        Ok(self
            .read(KeyKind::Identity)?
            .map(|(seed, generation)| StoredKey {
                key: IdentityKey::from_seed(*seed),
                generation,
            }))
    }

    /// Creates the cluster authority key. Refuses, with
    /// [`Error::AuthorityExists`], if one is already stored: replacing it
    /// would silently invalidate every certificate issued so far.
    pub fn generate_authority(&self) -> Result<StoredKey<AuthorityKey>, Error> {
        let fresh = AuthorityKey::generate();
        if self.write(KeyKind::Authority, &fresh.to_seed(), 1, false)? {
            Ok(StoredKey {
                key: fresh,
                generation: 1,
            })
        } else {
            Err(Error::AuthorityExists {
                path: self.path(KeyKind::Authority),
            })
        }
    }

    /// The stored cluster authority key, or `None` if there is none.
    pub fn load_authority(&self) -> Result<Option<StoredKey<AuthorityKey>>, Error> {
        Ok(self
            .read(KeyKind::Authority)?
            .map(|(seed, generation)| StoredKey {
                key: AuthorityKey::from_seed(*seed),
                generation,
            }))
    }

    /// Takes the store's advisory lock (flock(2) on `DIR/.lock`), released
    /// when the returned file is dropped. The lock protects read-modify-write
    /// sequences; single writes are atomic on their own.
    fn lock(&self) -> Result<File, Error> {
        self.create_dir()?;
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| io_err(&path, "open lock file", source))?;
        file.lock()
            .map_err(|source| io_err(&path, "lock", source))?;
        Ok(file)
    }

    fn create_dir(&self) -> Result<(), Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| io_err(&self.dir, "create directory", source))
    }

    /// A rename or link is durable only once the directory entry is synced.
    fn sync_dir(&self) -> Result<(), Error> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| io_err(&self.dir, "fsync directory", source))
    }

    /// Reads and validates the file of `kind`; `None` if it does not exist.
    fn read(&self, kind: KeyKind) -> Result<Option<RawKey>, Error> {
        let path = self.path(kind);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_err(&path, "open", source)),
        };
        // fstat the opened file, not the path, so the checked file is the read one.
        let meta = file
            .metadata()
            .map_err(|source| io_err(&path, "stat", source))?;
        if !meta.is_file() {
            return Err(corrupt(&path, "not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & FORBIDDEN_MODE_BITS != 0 {
            return Err(Error::Permissions { path, mode });
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(corrupt(
                &path,
                format!("{} bytes, larger than any key file", meta.len()),
            ));
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        Read::by_ref(&mut file)
            .take(MAX_FILE_LEN + 1)
            .read_to_end(&mut raw)
            .map_err(|source| io_err(&path, "read", source))?;
        let text = std::str::from_utf8(&raw).map_err(|_| corrupt(&path, "not UTF-8 text"))?;
        parse(text, kind)
            .map(Some)
            .map_err(|problem| corrupt(&path, problem))
    }

    /// Writes the file of `kind`. With `overwrite == false` an existing file
    /// is left alone and `Ok(false)` returned.
    fn write(
        &self,
        kind: KeyKind,
        secret: &[u8; KEY_LEN],
        generation: u64,
        overwrite: bool,
    ) -> Result<bool, Error> {
        if generation == 0 {
            return Err(Error::GenerationOverflow { kind });
        }
        self.create_dir()?;
        let path = self.path(kind);
        let content = file_content(kind, secret, generation);
        let tmp = self.temp_path(kind);
        let result = write_synced(&tmp, content.as_bytes()).and_then(|()| {
            if overwrite {
                fs::rename(&tmp, &path).map_err(|source| io_err(&path, "rename", source))?;
                Ok(true)
            } else {
                // link(2) fails with EEXIST instead of replacing: create-if-absent.
                match fs::hard_link(&tmp, &path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(source) => Err(io_err(&path, "link", source)),
                }
            }
        });
        // After rename the temp name is gone; after link (or on error) it remains.
        if tmp.exists() {
            let _ = fs::remove_file(&tmp);
        }
        let created = result?;
        self.sync_dir()?;
        Ok(created)
    }

    fn temp_path(&self, kind: KeyKind) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(
            ".{}.tmp-{}-{n}",
            kind.file_name(),
            std::process::id()
        ))
    }
}

fn file_content(kind: KeyKind, secret: &[u8; KEY_LEN], generation: u64) -> Zeroizing<String> {
    Zeroizing::new(format!(
        "# Veil key file: secret, keep mode 0600.\nversion={FORMAT_VERSION}\nkind={}\ngeneration={generation}\nprivate_key={}\n",
        kind.tag(),
        encode_key(secret),
    ))
}

/// Reads a public key file: one base64 Ed25519 public key (as written by
/// [`write_public_key_file`] or `veilctl ca init`), `#` comments and blank
/// lines allowed. Meant for the cluster authority's public key that agents
/// are installed with: the trust root, so the file is refused when group or
/// others may modify it, and the key must be a valid, non-small-order point.
pub fn read_public_key_file(path: &Path) -> Result<[u8; KEY_LEN], Error> {
    let mut file = File::open(path).map_err(|source| io_err(path, "open", source))?;
    let meta = file
        .metadata()
        .map_err(|source| io_err(path, "stat", source))?;
    if !meta.is_file() {
        return Err(corrupt(path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::TrustRootWritable {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut raw = Vec::new();
    Read::by_ref(&mut file)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut raw)
        .map_err(|source| io_err(path, "read", source))?;
    if raw.len() as u64 > MAX_FILE_LEN {
        return Err(corrupt(path, "larger than any public key file"));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| corrupt(path, "not UTF-8 text"))?;
    let mut found = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if found.is_some() {
            return Err(corrupt(
                path,
                format!("line {}: more than one key", index + 1),
            ));
        }
        let key =
            decode_key(line).map_err(|e| corrupt(path, format!("line {}: {e}", index + 1)))?;
        found = Some(key);
    }
    let key = found.ok_or_else(|| corrupt(path, "no key in file"))?;
    match ed25519_dalek::VerifyingKey::from_bytes(&key) {
        Ok(parsed) if !parsed.is_weak() => Ok(key),
        _ => Err(corrupt(
            path,
            "not a valid Ed25519 public key (invalid or small-order point)",
        )),
    }
}

/// Writes `key` as a public key file (mode 0644, atomically: temporary file,
/// fsync, rename, directory fsync). The parent directory must exist.
pub fn write_public_key_file(path: &Path, key: &[u8; KEY_LEN]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| corrupt(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let content = format!(
        "# Veil cluster authority public key (not secret; agents trust certificates it signed).\n{}\n",
        encode_key(key)
    );
    let result = write_synced(&tmp, content.as_bytes())
        .and_then(|()| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
                .map_err(|source| io_err(&tmp, "chmod", source))
        })
        .and_then(|()| fs::rename(&tmp, path).map_err(|source| io_err(path, "rename", source)));
    if result.is_err() && tmp.exists() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io_err(dir, "fsync directory", source))
}

fn write_synced(path: &Path, content: &[u8]) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_err(path, "create", source))?;
    // The umask can only remove bits, but be explicit: the secret must never
    // be readable by others, even briefly.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|source| io_err(path, "chmod", source))?;
    file.write_all(content)
        .map_err(|source| io_err(path, "write", source))?;
    file.sync_all()
        .map_err(|source| io_err(path, "fsync", source))
}

/// Parses a key file body; the error is the problem, without key material.
fn parse(text: &str, kind: KeyKind) -> Result<RawKey, String> {
    let mut version = None;
    let mut file_kind = None;
    let mut generation = None;
    let mut secret = None;
    for (index, line) in text.lines().enumerate() {
        let lineno = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((field, value)) = line.split_once('=') else {
            return Err(format!("line {lineno}: expected `field=value`"));
        };
        let slot = match field.trim() {
            "version" => &mut version,
            "kind" => &mut file_kind,
            "generation" => &mut generation,
            "private_key" => &mut secret,
            other => {
                return Err(format!(
                    "line {lineno}: unknown field `{}`",
                    other.escape_debug()
                ))
            }
        };
        if slot.replace((lineno, value.trim())).is_some() {
            return Err(format!("line {lineno}: field `{}` repeated", field.trim()));
        }
    }
    let (_, version) = version.ok_or("missing `version`")?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "unsupported version `{}` (this build reads version {FORMAT_VERSION})",
            version.escape_debug()
        ));
    }
    let (lineno, file_kind) = file_kind.ok_or("missing `kind`")?;
    if file_kind != kind.tag() {
        return Err(format!(
            "line {lineno}: kind `{}`, expected `{}`",
            file_kind.escape_debug(),
            kind.tag()
        ));
    }
    let (lineno, generation) = generation.ok_or("missing `generation`")?;
    let generation = match generation.parse::<u64>() {
        Ok(g) if g >= 1 => g,
        _ => {
            return Err(format!(
                "line {lineno}: generation must be a whole number >= 1"
            ))
        }
    };
    let (lineno, secret) = secret.ok_or("missing `private_key`")?;
    let secret = decode_key(secret)
        .map(Zeroizing::new)
        .map_err(|e| format!("line {lineno}: private_key: {e}"))?;
    Ok((secret, generation))
}

fn io_err(path: &Path, op: &'static str, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn corrupt(path: &Path, problem: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn store() -> (tempfile::TempDir, KeyStore) {
        let tmp = tempfile::tempdir().unwrap();
        let ks = KeyStore::new(tmp.path().join("keys"));
        (tmp, ks)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn generates_once_then_loads_same_key() {
        let (_tmp, ks) = store();
        assert!(ks.load_wireguard().unwrap().is_none());
        let first = ks.load_or_generate_wireguard().unwrap();
        assert_eq!(first.generation, 1);
        let second = ks.load_or_generate_wireguard().unwrap();
        assert_eq!(second.generation, 1);
        assert_eq!(*first.key.to_bytes(), *second.key.to_bytes());
        let text = fs::read_to_string(ks.path(KeyKind::WireGuard)).unwrap();
        assert!(text.contains("version=1\n"), "{text}");
        assert!(text.contains("kind=x25519\n"), "{text}");
        assert!(text.contains("generation=1\n"), "{text}");
        assert!(text.contains(&format!("private_key={}\n", first.key.to_base64().as_str())));
    }

    #[test]
    fn file_and_dir_modes() {
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        assert_eq!(mode(ks.dir()), 0o700);
        assert_eq!(mode(&ks.path(KeyKind::WireGuard)), 0o600);
    }

    #[test]
    fn no_temp_files_left() {
        let (_tmp, ks) = store();
        let stored = ks.load_or_generate_wireguard().unwrap();
        assert_eq!(entries(ks.dir()), vec!["wireguard.key"]);
        ks.store_wireguard(&StoredKey {
            key: WireGuardPrivateKey::generate(),
            generation: stored.generation + 1,
        })
        .unwrap();
        assert_eq!(entries(ks.dir()), vec!["wireguard.key"]);
        // The create-if-absent path when the file already exists also cleans up.
        assert!(!ks.write(KeyKind::WireGuard, &[9; 32], 1, false).unwrap());
        assert_eq!(entries(ks.dir()), vec!["wireguard.key"]);
        assert_eq!(ks.load_wireguard().unwrap().unwrap().generation, 2);
    }

    #[test]
    fn generation_persisted() {
        let (_tmp, ks) = store();
        let key = WireGuardPrivateKey::generate();
        ks.store_wireguard(&StoredKey {
            key: key.clone(),
            generation: 7,
        })
        .unwrap();
        let loaded = KeyStore::new(ks.dir())
            .load_or_generate_wireguard()
            .unwrap();
        assert_eq!(loaded.generation, 7);
        assert_eq!(loaded.key.public_key(), key.public_key());
        assert_eq!(mode(&ks.path(KeyKind::WireGuard)), 0o600);
        assert!(matches!(
            ks.store_wireguard(&StoredKey { key, generation: 0 }),
            Err(Error::GenerationOverflow { .. })
        ));
    }

    #[test]
    fn loose_permissions_refused() {
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        let path = ks.path(KeyKind::WireGuard);
        for bad in [0o640, 0o604, 0o644, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = ks.load_or_generate_wireguard().unwrap_err();
            match &err {
                Error::Permissions { path: p, mode } => {
                    assert_eq!(p, &path);
                    assert_eq!(*mode, bad);
                }
                other => panic!("expected permissions error, got {other:?}"),
            }
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        // 0400 (read-only for the owner) is fine.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        ks.load_wireguard().unwrap().unwrap();
    }

    fn corrupt_case(body: &[u8], expect: &str) {
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        let path = ks.path(KeyKind::WireGuard);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = ks.load_or_generate_wireguard().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(expect), "{msg} does not contain {expect}");
        // A corrupt key is never silently replaced by a new one.
        assert_eq!(fs::read(&path).unwrap(), body);
    }

    #[test]
    fn corrupt_files_refused() {
        let good = encode_key(&[3; 32]);
        corrupt_case(b"", "missing `version`");
        corrupt_case(b"\xff\xfe garbage", "not UTF-8");
        corrupt_case(
            b"garbage without equals\n",
            "line 1: expected `field=value`",
        );
        corrupt_case(
            format!("version=2\nkind=x25519\ngeneration=1\nprivate_key={good}\n").as_bytes(),
            "unsupported version `2`",
        );
        corrupt_case(
            format!("version=1\nkind=ed25519\ngeneration=1\nprivate_key={good}\n").as_bytes(),
            "kind `ed25519`",
        );
        corrupt_case(
            format!("version=1\nkind=x25519\ngeneration=0\nprivate_key={good}\n").as_bytes(),
            "line 3: generation",
        );
        corrupt_case(
            format!("version=1\nkind=x25519\ngeneration=x\nprivate_key={good}\n").as_bytes(),
            "line 3: generation",
        );
        corrupt_case(
            b"version=1\nkind=x25519\ngeneration=1\n",
            "missing `private_key`",
        );
        // Truncated key (a short write, e.g. from a tool that is not atomic).
        corrupt_case(
            format!(
                "version=1\nkind=x25519\ngeneration=1\nprivate_key={}\n",
                &good[..20]
            )
            .as_bytes(),
            "line 4: private_key",
        );
        let short = encode_key(&[3; 32]).replace('=', "");
        let short16 = &short[..22];
        corrupt_case(
            format!("version=1\nkind=x25519\ngeneration=1\nprivate_key={short16}==\n").as_bytes(),
            "expected 32",
        );
        corrupt_case(
            format!("version=1\nversion=1\nkind=x25519\ngeneration=1\nprivate_key={good}\n")
                .as_bytes(),
            "line 2: field `version` repeated",
        );
        corrupt_case(
            format!("version=1\nkind=x25519\ngeneration=1\nprivate_key={good}\nextra=1\n")
                .as_bytes(),
            "unknown field `extra`",
        );
        corrupt_case(&[b'#'; 5000], "larger than any key file");
    }

    #[test]
    fn corrupt_error_does_not_leak_secret() {
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        let path = ks.path(KeyKind::WireGuard);
        let text = fs::read_to_string(&path).unwrap();
        let secret = text
            .lines()
            .find_map(|l| l.strip_prefix("private_key="))
            .unwrap()
            .to_string();
        fs::write(&path, text.replace("kind=x25519", "kind=other")).unwrap();
        let msg = ks.load_wireguard().unwrap_err().to_string();
        assert!(!msg.contains(&secret), "{msg}");
    }

    #[test]
    fn directory_in_place_of_file_is_an_error() {
        let (_tmp, ks) = store();
        fs::create_dir_all(ks.path(KeyKind::WireGuard)).unwrap();
        assert!(ks.load_or_generate_wireguard().is_err());
    }

    fn pub_of(stored: &StoredKey<WireGuardPrivateKey>) -> [u8; 32] {
        stored.key.public_key()
    }

    #[test]
    fn identity_key_generated_once_with_private_mode() {
        let (_tmp, ks) = store();
        assert!(ks.load_identity().unwrap().is_none());
        let first = ks.load_or_generate_identity().unwrap();
        assert_eq!(first.generation, 1);
        let again = KeyStore::new(ks.dir()).load_or_generate_identity().unwrap();
        assert_eq!(again.key.public_key(), first.key.public_key());
        let path = ks.path(KeyKind::Identity);
        assert_eq!(path.file_name().unwrap(), "identity.key");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(ks.dir()), 0o700);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("kind=ed25519-node-identity\n"), "{text}");
        // The identity key does not disturb the WireGuard key and vice versa.
        let wg = ks.load_or_generate_wireguard().unwrap();
        assert_eq!(
            ks.load_or_generate_identity().unwrap().key.public_key(),
            first.key.public_key()
        );
        assert_eq!(pub_of(&ks.load_wireguard().unwrap().unwrap()), pub_of(&wg));
        // Loose permissions are refused for identity keys too.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ks.load_or_generate_identity(),
            Err(Error::Permissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn authority_never_overwritten() {
        let (_tmp, ks) = store();
        assert!(ks.load_authority().unwrap().is_none());
        let ca = ks.generate_authority().unwrap();
        assert_eq!(ca.generation, 1);
        let path = ks.path(KeyKind::Authority);
        assert_eq!(mode(&path), 0o600);
        let before = fs::read(&path).unwrap();
        let err = ks.generate_authority().unwrap_err();
        assert!(
            matches!(&err, Error::AuthorityExists { path: p } if p == &path),
            "{err:?}"
        );
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(
            ks.load_authority().unwrap().unwrap().key.public_key(),
            ca.key.public_key()
        );
        assert_eq!(entries(ks.dir()), vec!["authority.key"]);
    }

    #[test]
    fn key_kinds_cannot_be_swapped() {
        let (_tmp, ks) = store();
        ks.load_or_generate_identity().unwrap();
        ks.load_or_generate_wireguard().unwrap();
        // An identity key copied into the authority's place is refused, as is
        // a WireGuard key in the identity's place.
        fs::copy(ks.path(KeyKind::Identity), ks.path(KeyKind::Authority)).unwrap();
        let err = ks.load_authority().unwrap_err();
        assert!(
            err.to_string().contains("kind `ed25519-node-identity`"),
            "{err}"
        );
        fs::copy(ks.path(KeyKind::WireGuard), ks.path(KeyKind::Identity)).unwrap();
        let err = ks.load_or_generate_identity().unwrap_err();
        assert!(err.to_string().contains("kind `x25519`"), "{err}");
    }

    #[test]
    fn rotation_round_trip() {
        let (_tmp, ks) = store();
        let first = ks.load_or_generate_wireguard().unwrap();
        assert!(ks.load_previous_wireguard().unwrap().is_none());

        let (old, new) = ks.rotate_wireguard().unwrap();
        assert_eq!((old.generation, new.generation), (1, 2));
        assert_eq!(pub_of(&old), pub_of(&first));
        assert_ne!(pub_of(&new), pub_of(&old));
        // Persisted: a fresh store object (an agent restarted during the
        // grace period) sees the new key and still has the old one.
        let reopened = KeyStore::new(ks.dir());
        let current = reopened.load_or_generate_wireguard().unwrap();
        assert_eq!((current.generation, pub_of(&current)), (2, pub_of(&new)));
        let previous = reopened.load_previous_wireguard().unwrap().unwrap();
        assert_eq!((previous.generation, pub_of(&previous)), (1, pub_of(&old)));
        assert_eq!(*previous.key.to_bytes(), *first.key.to_bytes());
        assert_eq!(mode(&ks.path(KeyKind::WireGuardPrevious)), 0o600);
        assert_eq!(mode(&ks.path(KeyKind::WireGuard)), 0o600);

        // A second rotation retires generation 1 and keeps generation 2.
        let (old2, new2) = ks.rotate_wireguard().unwrap();
        assert_eq!((old2.generation, new2.generation), (2, 3));
        assert_eq!(pub_of(&old2), pub_of(&new));
        let previous = ks.load_previous_wireguard().unwrap().unwrap();
        assert_eq!((previous.generation, pub_of(&previous)), (2, pub_of(&new)));

        // Forgetting ends the grace period; forgetting twice is harmless.
        assert!(ks.forget_previous_wireguard().unwrap());
        assert!(ks.load_previous_wireguard().unwrap().is_none());
        assert!(!ks.forget_previous_wireguard().unwrap());
        assert_eq!(ks.load_wireguard().unwrap().unwrap().generation, 3);
        // Only the key and the lock file remain: no temporary files.
        assert_eq!(entries(ks.dir()), vec![".lock", "wireguard.key"]);
    }

    #[test]
    fn rotation_needs_a_key_and_a_free_generation() {
        let (_tmp, ks) = store();
        let err = ks.rotate_wireguard().unwrap_err();
        assert!(matches!(err, Error::NothingToRotate { .. }), "{err:?}");
        assert!(ks.load_wireguard().unwrap().is_none());

        let top = StoredKey {
            key: WireGuardPrivateKey::generate(),
            generation: u64::MAX,
        };
        ks.store_wireguard(&top).unwrap();
        assert!(matches!(
            ks.rotate_wireguard(),
            Err(Error::GenerationOverflow { .. })
        ));
        let still = ks.load_wireguard().unwrap().unwrap();
        assert_eq!((still.generation, pub_of(&still)), (u64::MAX, pub_of(&top)));
        assert!(ks.load_previous_wireguard().unwrap().is_none());
    }

    #[test]
    fn failed_rotation_changes_nothing() {
        let (_tmp, ks) = store();
        let first = ks.load_or_generate_wireguard().unwrap();
        // Step 2 cannot replace a non-empty directory: the rotation fails
        // after the new key was staged.
        let previous = ks.path(KeyKind::WireGuardPrevious);
        fs::create_dir_all(previous.join("blocker")).unwrap();
        assert!(ks.rotate_wireguard().is_err());
        let current = ks.load_wireguard().unwrap().unwrap();
        assert_eq!((current.generation, pub_of(&current)), (1, pub_of(&first)));
        // The staged new key was removed.
        assert_eq!(
            entries(ks.dir()),
            vec![".lock", "wireguard.key", "wireguard.previous.key"]
        );
        fs::remove_dir_all(&previous).unwrap();
        let (old, new) = ks.rotate_wireguard().unwrap();
        assert_eq!((old.generation, new.generation), (1, 2));
    }

    #[test]
    fn rotation_interrupted_before_the_switch() {
        let (_tmp, ks) = store();
        let first = ks.load_or_generate_wireguard().unwrap();
        let (_, second) = ks.rotate_wireguard().unwrap();
        // The state a crash between steps 2 and 3 of the next rotation leaves:
        // the previous file already holds the current key.
        fs::copy(
            ks.path(KeyKind::WireGuard),
            ks.path(KeyKind::WireGuardPrevious),
        )
        .unwrap();
        let current = ks.load_or_generate_wireguard().unwrap();
        assert_eq!((current.generation, pub_of(&current)), (2, pub_of(&second)));
        // The copy is not reported as a previous key (it is the current one).
        assert!(ks.load_previous_wireguard().unwrap().is_none());
        assert_ne!(pub_of(&current), pub_of(&first));
        // Rotating again from that state works and keeps generation 2.
        let (old, new) = ks.rotate_wireguard().unwrap();
        assert_eq!((old.generation, new.generation), (2, 3));
        let previous = ks.load_previous_wireguard().unwrap().unwrap();
        assert_eq!(pub_of(&previous), pub_of(&second));
    }

    #[test]
    fn lost_current_key_regenerates_above_previous() {
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        ks.rotate_wireguard().unwrap();
        ks.rotate_wireguard().unwrap();
        fs::remove_file(ks.path(KeyKind::WireGuard)).unwrap();
        // Peers accepted generation 3; a fresh key must not look like a rollback.
        let fresh = ks.load_or_generate_wireguard().unwrap();
        assert_eq!(fresh.generation, 3);
        assert!(ks.load_previous_wireguard().unwrap().is_some());
    }

    #[test]
    fn concurrent_rotations_lose_no_generation() {
        const THREADS: u64 = 4;
        const EACH: u64 = 5;
        let (_tmp, ks) = store();
        ks.load_or_generate_wireguard().unwrap();
        let results: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let ks = KeyStore::new(ks.dir());
                    scope.spawn(move || {
                        (0..EACH)
                            .map(|_| {
                                let (old, new) = ks.rotate_wireguard().unwrap();
                                (old.generation, new.generation)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut news: Vec<u64> = results.iter().map(|&(_, new)| new).collect();
        news.sort_unstable();
        assert_eq!(news, (2..=THREADS * EACH + 1).collect::<Vec<_>>());
        assert!(results.iter().all(|&(old, new)| new == old + 1));
        assert_eq!(
            ks.load_wireguard().unwrap().unwrap().generation,
            THREADS * EACH + 1
        );
        assert_eq!(
            ks.load_previous_wireguard().unwrap().unwrap().generation,
            THREADS * EACH
        );
        assert_eq!(
            entries(ks.dir()),
            vec![".lock", "wireguard.key", "wireguard.previous.key"]
        );
    }

    #[test]
    fn stored_keys_debug_hides_secrets() {
        let (_tmp, ks) = store();
        let wg = ks.load_or_generate_wireguard().unwrap();
        let (old, new) = ks.rotate_wireguard().unwrap();
        let id = ks.load_or_generate_identity().unwrap();
        let ca = ks.generate_authority().unwrap();
        let shown = format!("{wg:?} {old:?} {new:?} {id:?} {ca:?}");
        for secret in [
            wg.key.to_base64(),
            new.key.to_base64(),
            Zeroizing::new(encode_key(&id.key.to_seed())),
            Zeroizing::new(encode_key(&ca.key.to_seed())),
        ] {
            assert!(!shown.contains(secret.as_str()), "{shown}");
        }
    }

    #[test]
    fn public_key_file_round_trip_and_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("authority.pub");
        let ca = AuthorityKey::generate();
        write_public_key_file(&path, &ca.public_key()).unwrap();
        assert_eq!(mode(&path), 0o644);
        assert_eq!(read_public_key_file(&path).unwrap(), ca.public_key());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(&encode_key(&ca.public_key())), "{text}");
        assert!(!text.contains(&encode_key(&ca.to_seed())), "{text}");
        // Overwriting is atomic and leaves no temporary file.
        write_public_key_file(&path, &ca.public_key()).unwrap();
        assert_eq!(entries(tmp.path()), vec!["authority.pub"]);

        // A trust root others can modify is refused.
        for bad in [0o664, 0o646, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = read_public_key_file(&path).unwrap_err();
            assert!(
                matches!(&err, Error::TrustRootWritable { mode, .. } if *mode == bad),
                "{err:?}"
            );
        }

        let case = |body: &str, expect: &str| {
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            let err = read_public_key_file(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
            assert!(msg.contains(expect), "{msg} lacks {expect}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        };
        let key = encode_key(&ca.public_key());
        case("", "no key in file");
        case("# only a comment\n\n", "no key in file");
        case(&format!("{key}\n{key}\n"), "line 2: more than one key");
        case("garbage!\n", "line 1");
        case(
            &base64::engine::general_purpose::STANDARD.encode([1u8; 16]),
            "expected 32",
        );
        // The Edwards identity point is a small-order key.
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        case(
            &encode_key(&identity_point),
            "not a valid Ed25519 public key",
        );
        case(&"#".repeat(5000), "larger than");
        // Comments and blank lines around the key are fine.
        fs::write(&path, format!("# ca\n\n  {key}  \n# end\n")).unwrap();
        assert_eq!(read_public_key_file(&path).unwrap(), ca.public_key());
        assert!(matches!(
            read_public_key_file(&tmp.path().join("missing.pub")),
            Err(Error::Io { op: "open", .. })
        ));
    }
}
