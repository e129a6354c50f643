//! Compiled components on disk, so restarts and re-drops of a known file
//! skip Cranelift.
//!
//! Entries are keyed by the component's sha256 and the engine's
//! compatibility hash (wasmtime version and settings). Deserializing is
//! `unsafe` in wasmtime because it trusts the bytes, so every entry has the
//! sha256 of its contents beside it (`.sum`) and is checked before use: a
//! truncated or corrupted entry is recompiled and rewritten, never loaded.
//!
//! Entries are mapped, not read: the compiled code of a Python or
//! JavaScript plugin is 40-odd MB, of which a plugin touches a small part,
//! and only touched pages of a mapped file take memory.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

pub struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
}

impl ComponentCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> ComponentCache {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        ComponentCache {
            dir,
            engine_key: format!("{:016x}", h.finish()),
        }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        let sum = std::fs::read(path.with_extension("sum")).ok()?;
        let intact = file_sha256(&path).is_ok_and(|actual| actual.as_slice() == sum.as_slice());
        if !intact {
            tracing::warn!(path = %path.display(), "compiled-component cache entry is corrupt or incomplete; recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        map(engine, &path)
    }

    /// Writes `component` as the entry for `sha256` and returns it mapped
    /// from there, so that from now on only its pages in use take memory;
    /// `None` when it could not be written (the caller keeps its copy).
    pub fn put(&self, engine: &Engine, sha256: &str, component: &Component) -> Option<Component> {
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
            Ok(()) => map(engine, &path),
            Err(e) => {
                tracing::warn!("cannot write the compiled-component cache: {e:#}");
                None
            }
        }
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
