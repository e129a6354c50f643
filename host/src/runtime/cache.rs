//! Compiled components on disk, so restarts and re-drops of a known file
//! skip Cranelift.
//!
//! Entries are keyed by the component's sha256 and the engine's
//! compatibility hash (wasmtime version and settings). Deserializing is
//! `unsafe` in wasmtime because it trusts the bytes, so every entry carries
//! the sha256 of its own contents and is checked before use: a truncated or
//! corrupted entry is recompiled and rewritten, never loaded.

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
        let bytes = std::fs::read(&path).ok()?;
        // Layout: 32 bytes of sha256 over the rest, then the serialized
        // component.
        let (sum, body) = bytes.split_at_checked(32)?;
        if Sha256::digest(body).as_slice() != sum {
            tracing::warn!(path = %path.display(), "compiled-component cache entry is corrupt; recompiling");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: the bytes are exactly what `Component::serialize` wrote
        // for this engine configuration (checked by the key and checksum
        // above); wasmtime additionally checks version and settings.
        match unsafe { Component::deserialize(engine, body) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "compiled-component cache entry unusable ({e}); recompiling");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    pub fn put(&self, sha256: &str, component: &Component) {
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let body = component.serialize()?;
            let mut bytes = Sha256::digest(&body).to_vec();
            bytes.extend_from_slice(&body);
            let path = self.path(sha256);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(tmp, path)?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!("cannot write the compiled-component cache: {e:#}");
        }
    }
}
