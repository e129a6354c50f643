//! Compiled components on disk, so restarts and re-drops of a known file
//! skip Cranelift.
//!
//! Entries are keyed by the component's sha256 and the engine's
//! compatibility hash (wasmtime version and settings). Deserializing is
//! `unsafe` in wasmtime because it trusts the bytes, so every entry has the
//! sha256 of its contents beside it (`.sum`) and is checked before use: a
//! truncated or corrupted entry is recompiled and rewritten, never loaded.
//! The sum proves no author, so the cache is used only where no one but
//! this user can write: the directory and the one above it owned by this
//! user, writable by no one else, and not symbolic links. Anywhere else a
//! planted entry would be mapped as code and run as the host.
//!
//! Entries are mapped, not read: the compiled code of a Python or
//! JavaScript plugin is 40-odd MB, of which a plugin touches a small part,
//! and only touched pages of a mapped file take memory.
//!
//! Every new version of a file adds an entry (three for a plugin with a
//! snapshot after `init`), so the directory is bounded the way wasmtime's
//! own cache is: a soft limit on its size, least recently used entries
//! removed first after each write and at start. An entry's mtime is its
//! last use (written, or mapped for a load). Removing the entry of a
//! plugin that serves is harmless: its mapping keeps the file's pages, and
//! only its next load compiles it again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

pub struct ComponentCache {
    dir: PathBuf,
    /// Why the directory is not the host's alone, when it is not: the cache
    /// is then neither read nor written.
    untrusted: Option<String>,
    engine_key: String,
    /// Soft limit on the entries' bytes; 0 = no limit.
    max_bytes: u64,
    /// The entries' bytes as the last pass over the directory found them.
    bytes: AtomicU64,
}

/// Makes `dir` (0700) and checks that it and the directory above it are
/// this user's alone.
fn private_to_this_user(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    prismhook_core::secret::create_private_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for d in [
        Some(dir),
        dir.parent().filter(|p| !p.as_os_str().is_empty()),
    ]
    .into_iter()
    .flatten()
    {
        let meta = std::fs::symlink_metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(format!(
                "{} is not a directory but a link or a file",
                d.display()
            ));
        }
        if meta.uid() != me {
            return Err(format!(
                "{} belongs to another user (uid {})",
                d.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "others may write to {} (mode {:o})",
                d.display(),
                meta.mode() & 0o777
            ));
        }
    }
    Ok(())
}

impl ComponentCache {
    pub fn new(dir: PathBuf, engine: &Engine, max_bytes: u64) -> ComponentCache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let untrusted = private_to_this_user(&dir).err();
        if let Some(why) = &untrusted {
            tracing::warn!(dir = %dir.display(), "not using the compiled-component cache (every plugin is compiled at each start): {why}");
        }
        let cache = ComponentCache {
            dir,
            untrusted,
            engine_key: format!("{:016x}", h.finish()),
            max_bytes,
            bytes: AtomicU64::new(0),
        };
        // A lowered limit takes effect now rather than at the next
        // compilation. (Entries of an older wasmtime or other settings are
        // never used again, so they are the first to go.)
        cache.prune(None);
        cache
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        if self.untrusted.is_some() {
            return None;
        }
        let path = self.path(sha256);
        let sum = std::fs::read(path.with_extension("sum")).ok()?;
        let intact = file_sha256(&path).is_ok_and(|actual| actual.as_slice() == sum.as_slice());
        if !intact {
            tracing::warn!(path = %path.display(), "compiled-component cache entry is corrupt or incomplete; recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let component = map(engine, &path)?;
        touch(&path);
        Some(component)
    }

    /// Writes `component` as the entry for `sha256` and returns it mapped
    /// from there, so that from now on only its pages in use take memory;
    /// `None` when it could not be written (the caller keeps its copy).
    pub fn put(&self, engine: &Engine, sha256: &str, component: &Component) -> Option<Component> {
        if self.untrusted.is_some() {
            return None;
        }
        let path = self.path(sha256);
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let body = component.serialize()?;
            // The sum first: a crash between the two renames leaves a sum
            // that does not match, never an unchecked entry.
            let tmp = path.with_extension("sum.tmp");
            std::fs::write(&tmp, Sha256::digest(&body))?;
            std::fs::rename(tmp, path.with_extension("sum"))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, body)?;
            std::fs::rename(tmp, &path)?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.prune(Some(&path));
                map(engine, &path)
            }
            Err(e) => {
                tracing::warn!("cannot write the compiled-component cache: {e:#}");
                None
            }
        }
    }

    /// The entries' bytes, as of the last write or start.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Removes least recently used entries until the cache is within its
    /// limit, never `keep` (the entry just written, which may alone exceed
    /// a small limit).
    fn prune(&self, keep: Option<&Path>) {
        if self.untrusted.is_some() {
            return;
        }
        let limit = match self.max_bytes {
            0 => u64::MAX,
            limit => limit,
        };
        let pruned = prune_dir(&self.dir, limit, keep);
        if let Ok(p) = &pruned {
            self.bytes.store(p.kept_bytes, Ordering::Relaxed);
        }
        match pruned {
            Ok(p) if p.removed > 0 => tracing::info!(
                dir = %self.dir.display(),
                entries = p.removed,
                freed_mib = p.freed_bytes >> 20,
                kept_mib = p.kept_bytes >> 20,
                "removed the least recently used compiled components to stay under `plugins.cache_max_mib`"
            ),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot prune the compiled-component cache: {e}")
            }
        }
    }
}

/// What one pass of [`prune_dir`] did.
#[derive(Debug, Default, PartialEq)]
struct Pruned {
    removed: usize,
    freed_bytes: u64,
    kept_bytes: u64,
}

/// A write interrupted by a crash leaves a `.tmp` file, and a write in
/// progress has a `.sum` before its entry: either is removed only when
/// this old, so a concurrent write is never disturbed.
const STALE: Duration = Duration::from_secs(3600);

/// Entries (`.cwasm` and its `.sum`) of `dir` by mtime, oldest removed
/// first until the rest fit in `max_bytes`; also stale leftovers of
/// interrupted writes.
fn prune_dir(dir: &Path, max_bytes: u64, keep: Option<&Path>) -> std::io::Result<Pruned> {
    let now = SystemTime::now();
    let mut entries = Vec::new();
    let mut leftovers = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        let Ok(meta) = item.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().unwrap_or(now);
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let stale = now.duration_since(modified).unwrap_or_default() > STALE;
        match ext {
            "cwasm" => {
                let sum = path.with_extension("sum");
                let sum_len = std::fs::metadata(&sum).map(|m| m.len()).unwrap_or(0);
                entries.push((modified, meta.len() + sum_len, path));
            }
            "sum" if stale && !path.with_extension("cwasm").exists() => leftovers.push(path),
            "tmp" if stale => leftovers.push(path),
            _ => {}
        }
    }
    for path in leftovers {
        let _ = std::fs::remove_file(path);
    }
    let mut pruned = Pruned {
        kept_bytes: entries.iter().map(|(_, len, _)| len).sum(),
        ..Pruned::default()
    };
    entries.sort();
    for (_, len, path) in entries {
        if pruned.kept_bytes <= max_bytes {
            break;
        }
        if Some(path.as_path()) == keep {
            continue;
        }
        // The sum first: an entry without one is never read, and the next
        // write of it replaces both.
        let _ = std::fs::remove_file(path.with_extension("sum"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            // Another pass removed it first: its bytes are gone all the same.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        pruned.removed += 1;
        pruned.freed_bytes += len;
        pruned.kept_bytes -= len;
    }
    Ok(pruned)
}

/// Marks an entry as used now, for the least-recently-used order.
fn touch(path: &Path) {
    let result = std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), "cannot mark a cache entry as used: {e}");
    }
}

/// Maps a checked cache entry; an entry wasmtime refuses is removed.
fn map(engine: &Engine, path: &std::path::Path) -> Option<Component> {
    // SAFETY: the file is exactly what `Component::serialize` wrote for this
    // engine configuration (checked by the key, and by the checksum or
    // because this process just wrote it; only this process writes the cache
    // directory); wasmtime additionally checks version and settings.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(path = %path.display(), "compiled-component cache entry unusable ({e}); recompiling");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

fn file_sha256(path: &std::path::Path) -> std::io::Result<sha2::digest::Output<Sha256>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_used_only_where_no_one_else_may_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(private_to_this_user(&data.join("cache")), Ok(()));
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let open = private_to_this_user(&data.join("cache")).unwrap_err();
        assert!(
            open.contains("others may write to") && open.contains("mode 777"),
            "{open}"
        );
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, data.join("linked")).unwrap();
        let linked = private_to_this_user(&data.join("linked")).unwrap_err();
        assert!(linked.contains("not a directory but a link"), "{linked}");
    }

    /// An entry of `len` bytes (and its 32-byte sum) last used `age` ago.
    fn entry(dir: &Path, name: &str, len: usize, age: Duration) -> PathBuf {
        let path = dir.join(format!("{name}.cwasm"));
        std::fs::write(&path, vec![0u8; len]).unwrap();
        std::fs::write(path.with_extension("sum"), [0u8; 32]).unwrap();
        let when = SystemTime::now() - age;
        for p in [&path, &path.with_extension("sum")] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        path
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn the_least_recently_used_entries_go_first_until_the_rest_fit() {
        let dir = tempfile::tempdir().unwrap();
        entry(dir.path(), "old", 1000, 30 * MIN);
        entry(dir.path(), "older", 1000, 40 * MIN);
        entry(dir.path(), "new", 1000, MIN);
        entry(dir.path(), "newest", 1000, Duration::ZERO);

        let pruned = prune_dir(dir.path(), 2 * 1032, None).unwrap();

        assert_eq!(
            pruned,
            Pruned {
                removed: 2,
                freed_bytes: 2 * 1032,
                kept_bytes: 2 * 1032
            }
        );
        assert_eq!(
            names(dir.path()),
            ["new.cwasm", "new.sum", "newest.cwasm", "newest.sum"]
        );
        // Within the limit, nothing more goes.
        assert_eq!(prune_dir(dir.path(), 2 * 1032, None).unwrap().removed, 0);
    }

    #[test]
    fn the_entry_just_written_stays_even_when_it_alone_is_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        entry(dir.path(), "other", 10, MIN);
        // Its mtime is older than the other's (a copied file, a clock step):
        // being just written protects it, not its mtime.
        let keep = entry(dir.path(), "big", 5000, 2 * MIN);

        let pruned = prune_dir(dir.path(), 1000, Some(&keep)).unwrap();

        assert_eq!(pruned.removed, 1);
        assert_eq!(names(dir.path()), ["big.cwasm", "big.sum"]);
    }

    #[test]
    fn leftovers_of_interrupted_writes_go_once_stale_and_never_while_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let stale = 2 * STALE;
        for (name, age) in [
            ("crashed.tmp", stale),
            ("crashed.sum.tmp", stale),
            ("orphan.sum", stale),
            ("writing.tmp", Duration::ZERO),
            ("writing.sum", Duration::ZERO),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        }
        entry(dir.path(), "used", 10, stale);

        prune_dir(dir.path(), 1 << 20, None).unwrap();

        assert_eq!(
            names(dir.path()),
            ["used.cwasm", "used.sum", "writing.sum", "writing.tmp"]
        );
    }
}
