//! Storage behind the `kv` import, and a per-call session that buffers writes.
//!
//! Writes are buffered so that a call's changes land together, and only
//! when the call returns: a trap or a timeout midway leaves the store as it
//! was, which keeps "what I registered" records honest.
//!
//! Where the data lives is a [`KvBackend`]: by default this host's redb file
//! (one table per plugin); hosts sharing a JetStream ledger share a store in
//! JetStream instead (`ledger::jetstream::kv`), so that a plugin finds its
//! records whichever host runs its next batch.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::failure::FileFailure;

const MAX_KEY_BYTES: usize = 1024;
/// Longest value, unless the backend holds less ([`KvBackend::max_value_bytes`]).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Buffered writes one call may hold, each counted with [`ENTRY_BYTES`].
const MAX_PENDING_BYTES: usize = 64 << 20;
/// Keys one call may read from the store, each counted with
/// [`ENTRY_BYTES`]: their versions are kept, to be checked when it returns.
const MAX_READ_BYTES: usize = 64 << 20;
/// What a buffered write or a recorded read costs the host besides its
/// bytes (a map entry and its allocations): a call of millions of empty
/// writes, or reads of keys that do not exist, is not free.
const ENTRY_BYTES: usize = 64;
/// Keys read from the store at a time for a listing.
const LIST_PAGE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kv storage: {0}")]
    Storage(String),
    /// Optimistic concurrency at work, not a fault: a key the call read was
    /// written since (by another call or host), so its writes were refused
    /// and the newer value stands. Made again, the call reads that value.
    #[error("kv conflict: {0}")]
    Conflict(String),
    #[error("key is {0} bytes; keys are limited to {MAX_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("value is {bytes} bytes; values are limited to {limit}")]
    ValueTooLarge { bytes: usize, limit: usize },
    #[error("this call has buffered over {MAX_PENDING_BYTES} bytes of writes")]
    TooManyWrites,
    #[error(
        "this call has read over {MAX_READ_BYTES} bytes of distinct keys; \
         read fewer per call (the host keeps each one read, to check it when the call returns)"
    )]
    TooManyReads,
    /// A listing would not fit the plugin's memory: the host stops reading
    /// it rather than hold it all first.
    #[error(
        "the keys listed come to over {0} bytes, more than the plugin's memory holds; \
         list them a page at a time (`list-keys-after`)"
    )]
    ListTooLarge(usize),
    /// A `set`, or a call's writes as they are stored, would take the
    /// plugin's store past `limits.kv_mib`; none of it was stored. Writes
    /// that shrink it always pass.
    #[error(
        "the plugin's kv would hold {would} bytes, over its limit of {limit} \
         (`limits.kv_mib`)"
    )]
    OverLimit { would: u64, limit: u64 },
    /// The store refused the writes themselves, as it would each time
    /// (a message over its servers' limit): not a passing outage.
    #[error("the store refused the writes: {0}")]
    Refused(String),
    /// The kv file failed for good (a full disk, an I/O error): redb then
    /// fails every operation until the file is opened again, which checks
    /// and recovers it ([`KvStore::failed`]).
    #[error("the plugins' kv file failed: {0}")]
    FileFailed(String),
}

fn storage(e: impl std::fmt::Display) -> KvError {
    KvError::Storage(e.to_string())
}

/// A redb error, told apart: after a failed write or flush, redb fails
/// every operation (`PreviousIo`) until the file is opened again.
fn redb_error(e: impl Into<redb::Error>) -> KvError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo) => KvError::FileFailed(e.to_string()),
        e => KvError::Storage(e.to_string()),
    }
}

fn table(plugin: &str) -> String {
    format!("plugin:{plugin}")
}

/// Each present key's version in `plugin`'s table (0: not there), so that
/// a call's read can tell whether another call wrote the key since. Every
/// write takes the plugin's next version ([`VERSION_SEQ`]), never one a key
/// had before, so a deleted key's row can go: written again, the key comes
/// back at a version no earlier read of it saw.
fn versions(plugin: &str) -> String {
    format!("versions:{plugin}")
}

/// The last version each plugin's writes took. A plugin missing from it
/// (a store from before it) starts after the highest version it has.
const VERSION_SEQ: TableDefinition<&str, u64> = TableDefinition::new("version-seq");

/// The bytes (keys and values) each plugin's table holds, kept with every
/// write; a plugin missing from it is counted once, from its table.
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");

/// What one record costs against `limits.kv_mib`.
pub(crate) fn record_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

/// The plugin's bytes after a call's writes, `before` them, or the error
/// when they grow it past `limit`.
pub(crate) fn within_limit(before: u64, after: u64, limit: u64) -> Result<u64, KvError> {
    if after > limit && after > before {
        return Err(KvError::OverLimit {
            would: after,
            limit,
        });
    }
    Ok(after)
}

/// Record sizes are bounded far below `i64::MAX`.
fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Where a listing of the keys under `prefix` after `after` starts.
pub(crate) fn start<'k>(prefix: &'k str, after: Option<&'k str>) -> Bound<&'k str> {
    match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    }
}

/// Where plugins' records are kept. Reads come from memory or a local file,
/// never from the network: they run inside a plugin's call.
pub trait KvBackend: Send + Sync + 'static {
    fn read(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;

    /// [`KvBackend::read`], with the version of the key it read, for a store
    /// several hosts write: a call that writes a key it read is then stored
    /// only if the key is still at that version (see [`KvBackend::apply`]).
    /// `None`: the backend has one writer and keeps no versions.
    fn read_versioned(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, Option<u64>), KvError> {
        Ok((self.read(plugin, key)?, None))
    }

    /// `plugin`'s keys that start with `prefix` and sort after `after`
    /// (from the first when `None`), in order, at most `limit`.
    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError>;

    /// Makes one call's writes durable together (`None` deletes); returns once
    /// a read on this host sees them. `read` holds the version at which the
    /// call first read each key it read ([`KvBackend::read_versioned`]): a
    /// backend that keeps versions refuses the writes, all of them, when one
    /// of those keys has changed since. They are refused too when they
    /// would take the plugin's keys and values past `limit` bytes
    /// ([`KvError::OverLimit`]; a store several hosts write may pass it by
    /// what their calls write at the same moment). Returns the version each
    /// written key was stored at (none for a backend that keeps no
    /// versions). Blocks: it is called off the async threads.
    fn apply(
        &self,
        plugin: &str,
        writes: BTreeMap<String, Option<Vec<u8>>>,
        read: &BTreeMap<String, u64>,
        limit: u64,
    ) -> Result<BTreeMap<String, u64>, KvError>;

    /// The bytes (keys and values) `plugin`'s keys hold, as `apply` counts
    /// them against its limit.
    fn bytes(&self, plugin: &str) -> Result<u64, KvError>;

    /// Whether a read on this host sees every write this host has stored,
    /// those whose `apply` failed after they were sent included. Cheap: it
    /// is asked before every call.
    fn settled(&self) -> bool {
        true
    }

    /// Blocks until [`KvBackend::settled`], or fails when that cannot be had
    /// in time: a call must not read records older than what it wrote
    /// before, or it would undo what it did then. Off the async threads.
    fn settle(&self) -> Result<(), KvError> {
        Ok(())
    }

    /// The longest value a write can store: a `set` of more is refused at
    /// once, rather than fail the whole call when it returns.
    fn max_value_bytes(&self) -> usize {
        MAX_VALUE_BYTES
    }

    /// Where the store's failure for good is kept; `None`: it cannot fail so.
    fn failure(&self) -> Option<Arc<FileFailure>> {
        None
    }
}

/// The plugins' store, whichever backend keeps it. Cheap to clone.
#[derive(Clone)]
pub struct KvStore {
    backend: Arc<dyn KvBackend>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").finish_non_exhaustive()
    }
}

impl KvStore {
    /// This host's redb file at `path`.
    pub fn open(path: &Path) -> Result<KvStore, KvError> {
        Ok(KvStore::new(Arc::new(RedbKv::open(path)?)))
    }

    pub fn new(backend: Arc<dyn KvBackend>) -> KvStore {
        KvStore { backend }
    }

    /// Returns why, once the store has failed for good (a redb file after
    /// an I/O error); pending for ever if it cannot.
    pub async fn failed(&self) -> String {
        match self.backend.failure() {
            Some(failure) => failure.wait().await,
            None => std::future::pending().await,
        }
    }

    /// Why the store failed for good, if it has.
    pub fn failure(&self) -> Option<String> {
        self.backend.failure()?.get()
    }

    /// Whether a read sees every write this host stored (see
    /// [`KvBackend::settled`]).
    pub fn settled(&self) -> bool {
        self.backend.settled()
    }

    /// Waits, when it must, until a read sees every write this host stored
    /// (see [`KvBackend::settle`]).
    pub async fn settle(&self) -> Result<(), KvError> {
        if self.backend.settled() {
            return Ok(());
        }
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.settle())
            .await
            .map_err(|e| KvError::Storage(e.to_string()))?
    }

    /// A session for one call of `plugin`, whose store may hold `limit`
    /// bytes (`limits.kv_mib`).
    pub fn session(&self, plugin: &str, limit: u64) -> KvSession {
        KvSession {
            store: self.clone(),
            plugin: plugin.to_owned(),
            writes: BTreeMap::new(),
            read: BTreeMap::new(),
            read_bytes: 0,
            committed: BTreeMap::new(),
            pending_bytes: 0,
            limit,
            growth: Growth::default(),
            max_listed_bytes: usize::MAX,
        }
    }

    /// The bytes `plugin`'s keys and values hold (against `limits.kv_mib`).
    pub fn bytes(&self, plugin: &str) -> Result<u64, KvError> {
        self.backend.bytes(plugin)
    }

    /// Everything `plugin` has stored, for operators and tests.
    pub fn dump(&self, plugin: &str) -> Result<BTreeMap<String, Vec<u8>>, KvError> {
        self.backend
            .keys(plugin, "", None, usize::MAX)?
            .into_iter()
            .filter_map(|k| match self.backend.read(plugin, &k) {
                Ok(Some(v)) => Some(Ok((k, v))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            })
            .collect()
    }
}

/// One redb file for all plugins, one table per plugin, with a table of
/// versions beside each: two calls of a plugin run at once (on disjoint
/// entities), and records some VMs share (an address two of them hold)
/// must not lose one call's update to the other's.
struct RedbKv {
    db: Database,
    /// Why the file failed for good, once it has ([`KvError::FileFailed`]).
    failure: Arc<FileFailure>,
}

impl RedbKv {
    /// How many keys of `plugin` have a version kept.
    #[cfg(test)]
    fn versions_kept(&self, plugin: &str) -> usize {
        let txn = self.db.begin_read().unwrap();
        open_read::<u64>(&txn, &versions(plugin))
            .unwrap()
            .map_or(0, |t| {
                redb::ReadableTableMetadata::len(&t).unwrap() as usize
            })
    }

    fn open(path: &Path) -> Result<RedbKv, KvError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(storage)?;
        }
        // Plugins keep small records; redb's default 1 GiB cache would let
        // them grow the host's memory for nothing.
        let db = redb::Builder::new()
            .set_cache_size(16 << 20)
            .create(path)
            .map_err(|e| KvError::Storage(format!("{}: {e}", path.display())))?;
        Ok(RedbKv {
            db,
            failure: Arc::default(),
        })
    }

    /// Runs `op`, and records the first failure that leaves the file
    /// unusable, for the host to stop and be started again
    /// ([`KvStore::failed`]).
    fn latch<T>(&self, op: impl FnOnce() -> Result<T, KvError>) -> Result<T, KvError> {
        let result = op();
        if let Err(e @ KvError::FileFailed(_)) = &result {
            self.failure.record(
                || e.to_string(),
                |why| tracing::error!("{why}; the host stops, to be started again, which checks and recovers the file"),
            );
        }
        result
    }
}

impl KvBackend for RedbKv {
    fn read(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.latch(|| {
            let txn = self.db.begin_read().map_err(redb_error)?;
            value_in(&txn, plugin, key)
        })
    }

    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        self.latch(|| {
            let txn = self.db.begin_read().map_err(redb_error)?;
            let Some(table) = open_read::<&[u8]>(&txn, &table(plugin))? else {
                return Ok(Vec::new());
            };
            let mut keys = Vec::new();
            let range = (start(prefix, after), Bound::Unbounded);
            for entry in table.range::<&str>(range).map_err(redb_error)? {
                if keys.len() >= limit {
                    break;
                }
                let (k, _) = entry.map_err(redb_error)?;
                let k = k.value();
                if !k.starts_with(prefix) {
                    break;
                }
                keys.push(k.to_owned());
            }
            Ok(keys)
        })
    }

    fn bytes(&self, plugin: &str) -> Result<u64, KvError> {
        self.latch(|| {
            let txn = self.db.begin_read().map_err(redb_error)?;
            let counted = match txn.open_table(USAGE) {
                Ok(usage) => usage.get(plugin).map_err(redb_error)?.map(|b| b.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(redb_error(e)),
            };
            if let Some(bytes) = counted {
                return Ok(bytes);
            }
            match open_read::<&[u8]>(&txn, &table(plugin))? {
                Some(table) => count_bytes(table.iter().map_err(redb_error)?),
                None => Ok(0),
            }
        })
    }

    fn read_versioned(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, Option<u64>), KvError> {
        self.latch(|| {
            let txn = self.db.begin_read().map_err(redb_error)?;
            let version = match open_read::<u64>(&txn, &versions(plugin))? {
                Some(t) => t.get(key).map_err(redb_error)?.map_or(0, |v| v.value()),
                None => 0,
            };
            Ok((value_in(&txn, plugin, key)?, Some(version)))
        })
    }

    /// Refuses all of a call's writes when a key it read was written since
    /// (by another call of the plugin): checked and written in one
    /// transaction, so of two calls only the first to return is stored;
    /// the other is made again and reads what the first wrote. A key the
    /// call wrote without reading it is simply written.
    fn apply(
        &self,
        plugin: &str,
        writes: BTreeMap<String, Option<Vec<u8>>>,
        read: &BTreeMap<String, u64>,
        limit: u64,
    ) -> Result<BTreeMap<String, u64>, KvError> {
        self.latch(|| {
            let (table_name, versions_name) = (table(plugin), versions(plugin));
            let mut stored = BTreeMap::new();
            let txn = self.db.begin_write().map_err(redb_error)?;
            {
                let def: TableDefinition<&str, u64> = TableDefinition::new(&versions_name);
                let mut versions = txn.open_table(def).map_err(redb_error)?;
                for (k, seen) in read {
                    let now = versions
                        .get(k.as_str())
                        .map_err(redb_error)?
                        .map_or(0, |v| v.value());
                    if now != *seen {
                        // Dropped without a commit: nothing of the call is stored.
                        return Err(KvError::Conflict(format!(
                            "`{k}` was written by another call since this one read it"
                        )));
                    }
                }
                let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&table_name);
                let mut table = txn.open_table(def).map_err(redb_error)?;
                let mut usage = txn.open_table(USAGE).map_err(redb_error)?;
                let mut seqs = txn.open_table(VERSION_SEQ).map_err(redb_error)?;
                let mut seq = match seqs.get(plugin).map_err(redb_error)? {
                    Some(seq) => seq.value(),
                    None => versions
                        .iter()
                        .map_err(redb_error)?
                        .map(|row| row.map(|(_, v)| v.value()).map_err(redb_error))
                        .try_fold(0, |most, v| v.map(|v| most.max(v)))?,
                };
                let before = match usage.get(plugin).map_err(redb_error)? {
                    Some(bytes) => bytes.value(),
                    None => count_bytes(table.iter().map_err(redb_error)?)?,
                };
                let mut after = before;
                for (k, v) in &writes {
                    let old = match v {
                        Some(v) => {
                            after += record_bytes(k, v);
                            table.insert(k.as_str(), v.as_slice())
                        }
                        None => table.remove(k.as_str()),
                    }
                    .map_err(redb_error)?;
                    match old {
                        Some(old) => after = after.saturating_sub(record_bytes(k, old.value())),
                        // A delete of what is not there changes nothing (but
                        // for the row a store from before kept of a key deleted
                        // then, which goes).
                        None if v.is_none() => {
                            versions.remove(k.as_str()).map_err(redb_error)?;
                            continue;
                        }
                        None => {}
                    }
                    if v.is_none() {
                        // Not there: version 0, and no row left behind.
                        versions.remove(k.as_str()).map_err(redb_error)?;
                        stored.insert(k.clone(), 0);
                        continue;
                    }
                    seq += 1;
                    versions.insert(k.as_str(), seq).map_err(redb_error)?;
                    stored.insert(k.clone(), seq);
                }
                seqs.insert(plugin, seq).map_err(redb_error)?;
                // Dropped without a commit when over: nothing is stored.
                let after = within_limit(before, after, limit)?;
                usage.insert(plugin, after).map_err(redb_error)?;
            }
            txn.commit().map_err(redb_error)?;
            Ok(stored)
        })
    }

    fn failure(&self) -> Option<Arc<FileFailure>> {
        Some(self.failure.clone())
    }
}

/// What a plugin's table holds, counted row by row: a store written before
/// the `usage` table was.
fn count_bytes<'a>(
    rows: impl Iterator<
        Item = Result<
            (
                redb::AccessGuard<'a, &'static str>,
                redb::AccessGuard<'a, &'static [u8]>,
            ),
            redb::StorageError,
        >,
    >,
) -> Result<u64, KvError> {
    rows.map(|row| {
        let (k, v) = row.map_err(redb_error)?;
        Ok(record_bytes(k.value(), v.value()))
    })
    .sum()
}

/// Table `name` as `txn` sees it, or `None` when it was never made (a
/// plugin that has written nothing yet).
fn open_read<V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    name: &str,
) -> Result<Option<redb::ReadOnlyTable<&'static str, V>>, KvError> {
    match txn.open_table(TableDefinition::<&str, V>::new(name)) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(redb_error(e)),
    }
}

/// `plugin`'s value of `key` as `txn` sees it.
fn value_in(
    txn: &redb::ReadTransaction,
    plugin: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, KvError> {
    match open_read::<&[u8]>(txn, &table(plugin))? {
        Some(t) => Ok(t.get(key).map_err(redb_error)?.map(|v| v.value().to_vec())),
        None => Ok(None),
    }
}

/// One call's view of its plugin's store: reads see the call's own writes.
pub struct KvSession {
    store: KvStore,
    plugin: String,
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// The version of each key when this call first read it from the store
    /// (for backends that keep versions): its writes are stored only if
    /// those keys are unchanged, so that what it wrote from what it read
    /// cannot overwrite another host's write in between.
    read: BTreeMap<String, u64>,
    /// What `read` holds, against [`MAX_READ_BYTES`].
    read_bytes: usize,
    /// The version each key stored by `kv.commit` in this call was stored
    /// at, for a later write of it.
    committed: BTreeMap<String, u64>,
    pending_bytes: usize,
    limit: u64,
    growth: Growth,
    /// What a listing may come to ([`KvSession::listing_at_most`]).
    max_listed_bytes: usize,
}

/// What a call's writes do to the plugin's bytes, so that a `set` that
/// would take its store past `limits.kv_mib` is refused there, where the
/// plugin sees which write it was, rather than with all of the call's
/// writes when it returns. Counted cheaply while the writes are far from
/// the limit, exactly (a read of each key's stored size) only near it.
#[derive(Debug, Default)]
struct Growth {
    /// The store's bytes when the call first wrote (or since `kv.commit`).
    base: Option<u64>,
    /// What the values set could add at most: their records' bytes.
    most: u64,
    /// Once `base + most` passes the limit: the writes' exact change.
    exact: Option<i64>,
    /// The store's bytes when `exact` was last counted from it.
    counted_at: Option<u64>,
}

/// What one buffered write (`None`: a delete) holds against the limit.
fn write_bytes(key: &str, value: Option<&[u8]>) -> u64 {
    value.map_or(0, |v| record_bytes(key, v))
}

impl KvSession {
    /// Refuses a listing whose keys come to more than `bytes`
    /// ([`KvError::ListTooLarge`]): the plugin's memory, which could not
    /// take it anyway.
    pub fn listing_at_most(mut self, bytes: usize) -> KvSession {
        self.max_listed_bytes = bytes;
        self
    }

    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        let (value, version) = self.store.backend.read_versioned(&self.plugin, key)?;
        if let (Some(version), false) = (version, self.read.contains_key(key)) {
            let read_bytes = self.read_bytes + key.len() + ENTRY_BYTES;
            if read_bytes > MAX_READ_BYTES {
                return Err(KvError::TooManyReads);
            }
            self.read_bytes = read_bytes;
            self.read.insert(key.to_owned(), version);
        }
        Ok(value)
    }

    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), KvError> {
        let limit = self.store.backend.max_value_bytes();
        if value.len() > limit {
            return Err(KvError::ValueTooLarge {
                bytes: value.len(),
                limit,
            });
        }
        self.buffer(key, Some(value))
    }

    pub fn delete(&mut self, key: String) -> Result<(), KvError> {
        self.buffer(key, None)
    }

    fn buffer(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::KeyTooLong(key.len()));
        }
        // What is buffered: a key written again replaces its entry.
        let size = |value: Option<&Vec<u8>>| ENTRY_BYTES + key.len() + value.map_or(0, Vec::len);
        let replaced = self.writes.get(&key).map_or(0, |v| size(v.as_ref()));
        let pending = self.pending_bytes - replaced + size(value.as_ref());
        if pending > MAX_PENDING_BYTES {
            return Err(KvError::TooManyWrites);
        }
        let new = write_bytes(&key, value.as_deref());
        let exact = self.growth_with(&key, new)?;
        self.pending_bytes = pending;
        self.growth.most += new;
        self.growth.exact = exact;
        self.writes.insert(key, value);
        Ok(())
    }

    /// The writes' exact change to the store's bytes with `key` written to
    /// hold `new` bytes (`None` while they are far from the limit), or
    /// [`KvError::OverLimit`] when that would grow the store past it.
    ///
    /// Other calls change the store meanwhile, so the running count may be
    /// stale: a write it finds over the limit is refused only once the
    /// store, read again, says so too.
    fn growth_with(&mut self, key: &str, new: u64) -> Result<Option<i64>, KvError> {
        let mut base = match self.growth.base {
            Some(base) => base,
            None => *self
                .growth
                .base
                .insert(self.store.backend.bytes(&self.plugin)?),
        };
        let mut so_far = match self.growth.exact {
            Some(delta) => delta,
            None if base.saturating_add(self.growth.most + new) <= self.limit => return Ok(None),
            None => {
                let exact = self.growth_now()?;
                self.growth.exact = Some(exact);
                self.growth.counted_at = Some(base);
                exact
            }
        };
        let mut read_again = false;
        loop {
            let delta = so_far + signed(new) - signed(self.buffered_or_stored(key)?);
            match within_limit(base, base.saturating_add_signed(delta), self.limit) {
                Ok(_) => return Ok(Some(delta)),
                Err(over) if read_again => return Err(over),
                // Read again, and kept even when this write is refused: the
                // writes before it stand.
                Err(over) => {
                    let now = self.store.backend.bytes(&self.plugin)?;
                    // The store's bytes as they were at the exact count:
                    // it is taken to stand (the call's writes are held to
                    // the limit exactly when they are stored), and a
                    // plugin retrying a refused `set` does not have every
                    // buffered key read again each time.
                    if self.growth.counted_at == Some(now) {
                        return Err(over);
                    }
                    base = *self.growth.base.insert(now);
                    so_far = self.growth_now()?;
                    self.growth.exact = Some(so_far);
                    self.growth.counted_at = Some(now);
                    read_again = true;
                }
            }
        }
    }

    /// What the buffered writes change of the store as it is now.
    fn growth_now(&self) -> Result<i64, KvError> {
        let mut delta = 0;
        for (k, v) in &self.writes {
            delta += signed(write_bytes(k, v.as_deref())) - signed(self.stored_bytes(k)?);
        }
        Ok(delta)
    }

    /// What `key` holds as the call would leave it so far.
    fn buffered_or_stored(&self, key: &str) -> Result<u64, KvError> {
        match self.writes.get(key) {
            Some(v) => Ok(write_bytes(key, v.as_deref())),
            None => self.stored_bytes(key),
        }
    }

    /// What `key` holds in the store, as the limit counts it.
    fn stored_bytes(&self, key: &str) -> Result<u64, KvError> {
        let value = self.store.backend.read(&self.plugin, key)?;
        Ok(write_bytes(key, value.as_deref()))
    }

    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        self.list_keys_after(prefix, None, usize::MAX)
    }

    /// At most `limit` keys under `prefix` after `after`, the stored ones
    /// merged with the call's buffered writes. Fewer than `limit` only when
    /// there are no more, even where the call deleted a whole stored page.
    pub fn list_keys_after(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        let mut bytes = 0;
        let mut cursor = after.map(str::to_owned);
        while keys.len() < limit {
            // Read from the store a bounded page at a time, so that the host
            // never holds more of a listing than the plugin could take.
            let want = (limit - keys.len()).min(LIST_PAGE);
            let from = keys.len();
            let stored = self
                .store
                .backend
                .keys(&self.plugin, prefix, cursor.as_deref(), want)?;
            // The stored page covers the keys up to its last one, or all
            // the rest when it came back short: buffered writes apply there.
            // Merged as two sorted runs, stopping at `want`: a call that
            // wrote the whole store (a first reconcile) must not walk all of
            // its writes for every page.
            let upper = (stored.len() >= want)
                .then(|| stored.last().cloned())
                .flatten();
            let lower = start(prefix, cursor.as_deref()).map(str::to_owned);
            let to = upper.clone().map_or(Bound::Unbounded, Bound::Included);
            let mut writes = self
                .writes
                .range::<String, _>((lower, to))
                .take_while(|(k, _)| k.starts_with(prefix))
                .peekable();
            let mut stored = stored.into_iter().peekable();
            while keys.len() < limit {
                let from_writes = match (stored.peek(), writes.peek()) {
                    (None, None) => break,
                    (Some(k), Some((w, _))) => w.as_str() <= k.as_str(),
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                };
                if !from_writes {
                    keys.push(stored.next().expect("peeked"));
                    continue;
                }
                let (key, value) = writes.next().expect("peeked");
                if stored.peek() == Some(key) {
                    stored.next();
                }
                if value.is_some() {
                    keys.push(key.clone());
                }
            }
            // Each key with its `String`: millions of short keys are not
            // their bytes alone, to the host or to the plugin.
            bytes += keys[from..]
                .iter()
                .map(|k| k.len() + std::mem::size_of::<String>())
                .sum::<usize>();
            if bytes > self.max_listed_bytes {
                return Err(KvError::ListTooLarge(self.max_listed_bytes));
            }
            match upper {
                Some(upper) => cursor = Some(upper),
                None => break,
            }
        }
        Ok(keys)
    }

    pub fn has_writes(&self) -> bool {
        !self.writes.is_empty()
    }

    /// Makes the writes so far durable now, in one transaction, on the
    /// blocking pool (`kv.commit`); what is written after stays buffered,
    /// to be committed or discarded with the call. On failure the writes
    /// stay buffered too.
    pub async fn commit_now(&mut self) -> Result<(), KvError> {
        if self.writes.is_empty() {
            // Whatever other calls stored meanwhile counts from here on.
            self.growth = Growth::default();
            return Ok(());
        }
        let (backend, plugin) = (self.store.backend.clone(), self.plugin.clone());
        let (writes, limit) = (self.writes.clone(), self.limit);
        let fence = fence(self.read.clone(), &self.committed, &self.writes);
        let stored =
            tokio::task::spawn_blocking(move || backend.apply(&plugin, writes, &fence, limit))
                .await
                .map_err(storage)??;
        // The backend reads back what it applied (a JetStream host's
        // mirror shows a write before `apply` returns). The keys written are
        // this call's own now: a later write of them expects the version
        // stored, and is refused if another call wrote them since.
        self.writes.clear();
        for (key, version) in stored {
            if self.read.remove(&key).is_some() {
                self.read_bytes = self.read_bytes.saturating_sub(key.len() + ENTRY_BYTES);
            }
            self.committed.insert(key, version);
        }
        self.pending_bytes = 0;
        self.growth = Growth::default();
        Ok(())
    }

    /// Makes the call's writes durable in one transaction.
    pub fn commit(self) -> Result<(), KvError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let fence = fence(self.read, &self.committed, &self.writes);
        self.store
            .backend
            .apply(&self.plugin, self.writes, &fence, self.limit)
            .map(drop)
    }
}

/// The versions a call's writes are stored against: those of the keys it
/// read, and of the keys it writes again after a `kv.commit` stored them
/// (at the version stored then, unless it read them again since).
fn fence(
    mut read: BTreeMap<String, u64>,
    committed: &BTreeMap<String, u64>,
    writes: &BTreeMap<String, Option<Vec<u8>>>,
) -> BTreeMap<String, u64> {
    for key in writes.keys() {
        if let Some(&version) = committed.get(key) {
            read.entry(key.clone()).or_insert(version);
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(store: &KvStore, limit: u64, writes: &[(&str, Option<usize>)]) -> Result<(), KvError> {
        let mut s = store.session("p", limit);
        for &(k, len) in writes {
            match len {
                Some(len) => s.set(k.into(), vec![b'x'; len])?,
                None => s.delete(k.into())?,
            }
        }
        s.commit()
    }

    #[test]
    fn a_calls_reads_and_writes_are_held_to_what_the_host_keeps_of_them_however_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        // Keys that do not exist are read all the same, and kept.
        let mut s = store.session("p", u64::MAX);
        let read = (0..)
            .take_while(|i| s.get(&format!("{i:01024}")).is_ok())
            .count();
        assert_eq!(read, MAX_READ_BYTES / (1024 + ENTRY_BYTES));
        let one_more = format!("{:01024}", read);
        assert!(matches!(s.get(&one_more), Err(KvError::TooManyReads)));
        assert!(
            s.get(&format!("{:01024}", 0)).is_ok(),
            "a key read before is read again"
        );

        // Empty writes of short keys cost the host their entries.
        let mut s = store.session("p", u64::MAX);
        let written = (0..)
            .take_while(|i| s.set(format!("{i:08}"), Vec::new()).is_ok())
            .count();
        assert_eq!(written, MAX_PENDING_BYTES / (8 + ENTRY_BYTES));
    }

    #[test]
    fn deleting_keys_that_were_never_written_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(RedbKv::open(&dir.path().join("kv.redb")).unwrap());
        let store = KvStore::new(kv.clone());
        let mut s = store.session("p", u64::MAX);
        s.set("kept".into(), b"1".to_vec()).unwrap();
        s.set("gone".into(), b"1".to_vec()).unwrap();
        s.commit().unwrap();
        let mut s = store.session("p", u64::MAX);
        for i in 0..1000 {
            s.delete(format!("never/{i}")).unwrap();
        }
        s.delete("gone".into()).unwrap();
        s.commit().unwrap();
        assert_eq!(store.dump("p").unwrap().len(), 1);
        // Neither `gone` nor the thousand keys never written keep a version.
        assert_eq!(kv.versions_kept("p"), 1);
    }

    /// A store from before the plugin's version sequence: its first write
    /// takes a version past every one the store has, so a read of a key at
    /// its old version still tells that the key changed.
    #[test]
    fn versions_in_a_store_from_before_the_sequence_are_never_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(RedbKv::open(&dir.path().join("kv.redb")).unwrap());
        {
            // As the old per-key counters left it: `a` written three times,
            // `b` once.
            let txn = kv.db.begin_write().unwrap();
            {
                let mut values = txn
                    .open_table(TableDefinition::<&str, &[u8]>::new(&table("p")))
                    .unwrap();
                let mut versions = txn
                    .open_table(TableDefinition::<&str, u64>::new(&versions("p")))
                    .unwrap();
                for (key, version) in [("a", 3), ("b", 1)] {
                    values.insert(key, b"old".as_slice()).unwrap();
                    versions.insert(key, version).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = KvStore::new(kv);
        let mut reader = store.session("p", u64::MAX);
        assert_eq!(reader.get("b").unwrap().as_deref(), Some(&b"old"[..]));
        let mut writer = store.session("p", u64::MAX);
        writer.set("b".into(), b"new".to_vec()).unwrap();
        writer.commit().unwrap();
        reader.set("b".into(), b"from old".to_vec()).unwrap();
        assert!(matches!(reader.commit(), Err(KvError::Conflict(_))));
        assert_eq!(store.dump("p").unwrap()["b"], b"new");
    }

    #[test]
    fn writes_that_would_take_a_plugins_kv_past_its_limit_are_refused_whole_and_shrinking_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        // Keys count too: "a" + 60 bytes.
        write(&store, 100, &[("a", Some(60))]).unwrap();
        assert_eq!(store.bytes("p").unwrap(), 61);
        let e = write(&store, 100, &[("b", Some(10)), ("c", Some(30))]).unwrap_err();
        assert!(
            matches!(
                e,
                KvError::OverLimit {
                    would: 103,
                    limit: 100
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("`limits.kv_mib`"), "{e}");
        assert_eq!(
            store.dump("p").unwrap().len(),
            1,
            "nothing of it was stored"
        );
        // Replacing a value counts the difference, a delete frees its bytes.
        write(&store, 100, &[("a", Some(90))]).unwrap();
        write(&store, 100, &[("a", None), ("b", Some(50))]).unwrap();
        assert_eq!(store.bytes("p").unwrap(), 51);
        // Under a limit lowered below what it holds, only shrinking passes.
        write(&store, 10, &[("b", Some(40))]).unwrap();
        assert!(write(&store, 10, &[("b", Some(45))]).is_err());
        // Other plugins have their own.
        let mut q = store.session("q", 100);
        q.set("a".into(), vec![0; 90]).unwrap();
        q.commit().unwrap();
    }

    #[test]
    fn the_set_that_would_pass_the_limit_is_refused_there_and_the_calls_other_writes_stand() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        write(&store, 100, &[("a", Some(40)), ("b", Some(30))]).unwrap();
        let mut s = store.session("p", 100);
        s.set("c".into(), vec![0; 20]).unwrap();
        // 72 stored + 21 buffered: 11 more bytes would be 104.
        let e = s.set("d".into(), vec![0; 10]).unwrap_err();
        assert!(
            matches!(
                e,
                KvError::OverLimit {
                    would: 104,
                    limit: 100
                }
            ),
            "{e}"
        );
        // Near the limit, writes are counted exactly: replacing a stored
        // value by one as long, or shrinking, passes; a delete makes room.
        s.set("a".into(), vec![1; 40]).unwrap();
        s.set("b".into(), vec![1; 5]).unwrap();
        s.set("d".into(), vec![0; 10]).unwrap();
        s.delete("c".into()).unwrap();
        s.set("e".into(), vec![0; 30]).unwrap();
        assert!(s.set("e".into(), vec![0; 45]).is_err(), "104 bytes");
        s.commit().unwrap();
        let kv = store.dump("p").unwrap();
        assert_eq!(kv.keys().collect::<Vec<_>>(), ["a", "b", "d", "e"]);
        assert_eq!(kv["e"].len(), 30, "the refused value was not buffered");
        assert_eq!(store.bytes("p").unwrap(), 41 + 6 + 11 + 31);
    }

    #[test]
    fn two_calls_each_within_the_limit_are_held_to_it_together_when_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        write(&store, 100, &[("a", Some(60))]).unwrap();
        let (mut x, mut y) = (store.session("p", 100), store.session("p", 100));
        x.set("x".into(), vec![0; 29]).unwrap();
        y.set("y".into(), vec![0; 29]).unwrap();
        x.commit().unwrap();
        let e = y.commit().unwrap_err();
        assert!(matches!(e, KvError::OverLimit { would: 121, .. }), "{e}");
    }

    #[tokio::test]
    async fn after_kv_commit_the_limit_counts_from_what_is_stored_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", 100);
        s.set("a".into(), vec![0; 59]).unwrap();
        s.commit_now().await.unwrap();
        // What was made durable is the base now, not a write of this call.
        s.set("a".into(), vec![0; 19]).unwrap();
        s.set("b".into(), vec![0; 59]).unwrap();
        assert!(s.set("c".into(), vec![0; 59]).is_err());
        s.commit().unwrap();
        assert_eq!(store.bytes("p").unwrap(), 20 + 60);
    }

    #[test]
    fn a_set_the_store_has_made_room_for_since_the_call_began_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        write(&store, 200, &[("a", Some(40)), ("b", Some(18))]).unwrap();
        let mut x = store.session("p", 200);
        x.set("a".into(), vec![0; 40]).unwrap();
        // Another call frees 41 bytes while this one runs.
        write(&store, 200, &[("a", None)]).unwrap();
        // 60 bytes when the call began, 19 now: 19 + 41 + 100 fits.
        x.set("c".into(), vec![0; 99]).unwrap();
        x.commit().unwrap();
        assert_eq!(store.bytes("p").unwrap(), 160);
    }

    #[test]
    fn a_key_written_over_and_over_counts_once_against_the_calls_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        // 100 MiB written, 1 MiB buffered.
        for i in 0..100u8 {
            s.set("summary".into(), vec![i; MAX_VALUE_BYTES]).unwrap();
        }
        s.commit().unwrap();
        assert_eq!(store.dump("p").unwrap()["summary"][0], 99);
    }

    #[tokio::test]
    async fn a_key_kv_commit_stored_is_not_written_again_over_another_calls_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut x = store.session("p", u64::MAX);
        assert_eq!(x.get("ip/1").unwrap(), None);
        x.set("ip/1".into(), b"vm-a".to_vec()).unwrap();
        x.commit_now().await.unwrap();
        // Another call reads what x stored and adds to it.
        let mut y = store.session("p", u64::MAX);
        assert_eq!(y.get("ip/1").unwrap().as_deref(), Some(&b"vm-a"[..]));
        y.set("ip/1".into(), b"vm-a,vm-b".to_vec()).unwrap();
        y.commit().unwrap();
        // x writes the key again from what it knew: that would lose vm-b.
        x.set("ip/1".into(), b"vm-a,vm-c".to_vec()).unwrap();
        assert!(matches!(x.commit(), Err(KvError::Conflict(_))));
        assert_eq!(store.dump("p").unwrap()["ip/1"], b"vm-a,vm-b");

        // Nobody wrote it since: the call writes it again as often as it likes.
        let mut z = store.session("p", u64::MAX);
        z.set("ip/2".into(), b"1".to_vec()).unwrap();
        z.commit_now().await.unwrap();
        z.set("ip/2".into(), b"2".to_vec()).unwrap();
        z.commit_now().await.unwrap();
        z.set("ip/2".into(), b"3".to_vec()).unwrap();
        z.commit().unwrap();
        assert_eq!(store.dump("p").unwrap()["ip/2"], b"3");
    }

    #[test]
    fn a_store_written_before_the_limit_existed_is_counted_from_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let store = KvStore::open(&path).unwrap();
        write(&store, u64::MAX, &[("a", Some(60)), ("b", Some(20))]).unwrap();
        drop(store);
        // As an older release left it: the records, no usage row.
        {
            let db = Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(USAGE).unwrap().remove("p").unwrap();
            txn.commit().unwrap();
        }
        let store = KvStore::open(&path).unwrap();
        assert_eq!(store.bytes("p").unwrap(), 82);
        let e = write(&store, 100, &[("c", Some(20))]).unwrap_err();
        assert!(matches!(e, KvError::OverLimit { would: 103, .. }), "{e}");
        write(&store, 100, &[("c", Some(15))]).unwrap();
        assert_eq!(store.bytes("p").unwrap(), 98);
        assert_eq!(store.bytes("never-wrote").unwrap(), 0);
    }

    #[test]
    fn of_two_calls_that_read_and_write_one_key_only_the_first_to_return_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        // Two batches on disjoint VMs that share an address's record.
        let (mut a, mut b) = (store.session("p", u64::MAX), store.session("p", u64::MAX));
        assert_eq!(a.get("ip/10.0.0.5").unwrap(), None);
        assert_eq!(b.get("ip/10.0.0.5").unwrap(), None);
        a.set("ip/10.0.0.5".into(), b"vm-a".to_vec()).unwrap();
        b.set("ip/10.0.0.5".into(), b"vm-b".to_vec()).unwrap();
        a.commit().unwrap();
        assert!(matches!(b.commit(), Err(KvError::Conflict(_))));
        // Made again, the second call reads the first one's write.
        let mut b = store.session("p", u64::MAX);
        let both = [b.get("ip/10.0.0.5").unwrap().unwrap(), b",vm-b".to_vec()].concat();
        b.set("ip/10.0.0.5".into(), both).unwrap();
        b.commit().unwrap();
        assert_eq!(store.dump("p").unwrap()["ip/10.0.0.5"], b"vm-a,vm-b");
    }

    #[test]
    fn a_key_deleted_and_written_again_is_still_a_change_and_blind_writes_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut first = store.session("p", u64::MAX);
        first.set("k".into(), b"1".to_vec()).unwrap();
        first.commit().unwrap();
        let mut reader = store.session("p", u64::MAX);
        assert_eq!(reader.get("k").unwrap(), Some(b"1".to_vec()));
        let mut other = store.session("p", u64::MAX);
        other.delete("k".into()).unwrap();
        other.commit().unwrap();
        let mut again = store.session("p", u64::MAX);
        again.set("k".into(), b"1".to_vec()).unwrap();
        again.commit().unwrap();
        // Same value as it read, but written twice since: refused.
        reader.set("k".into(), b"2".to_vec()).unwrap();
        assert!(matches!(reader.commit(), Err(KvError::Conflict(_))));
        // A call that never read the key writes it.
        let mut blind = store.session("p", u64::MAX);
        blind.set("k".into(), b"3".to_vec()).unwrap();
        blind.commit().unwrap();
        assert_eq!(store.dump("p").unwrap()["k"], b"3");
        // Plugins do not see each other's versions.
        let mut q = store.session("q", u64::MAX);
        assert_eq!(q.get("k").unwrap(), None);
        q.set("k".into(), b"q".to_vec()).unwrap();
        q.commit().unwrap();
    }

    #[tokio::test]
    async fn writes_committed_mid_call_stay_when_the_rest_of_the_call_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        s.set("vm/a".into(), b"1".to_vec()).unwrap();
        s.commit_now().await.unwrap();
        assert_eq!(s.get("vm/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.list_keys("vm/").unwrap(), ["vm/a"]);
        s.set("vm/b".into(), b"2".to_vec()).unwrap();
        s.delete("vm/a".into()).unwrap();
        drop(s); // the call failed: what came after the commit goes
        let mut after = store.session("p", u64::MAX);
        assert_eq!(after.get("vm/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(after.get("vm/b").unwrap(), None);
    }

    #[test]
    fn writes_are_invisible_to_others_until_committed_and_durable_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        s.set("vm/a".into(), b"1".to_vec()).unwrap();
        assert_eq!(s.get("vm/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.session("p", u64::MAX).get("vm/a").unwrap(), None);
        s.commit().unwrap();
        drop(store);
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        assert_eq!(
            store.session("p", u64::MAX).get("vm/a").unwrap(),
            Some(b"1".to_vec())
        );
        assert_eq!(store.session("other", u64::MAX).get("vm/a").unwrap(), None);
    }

    #[test]
    fn a_dropped_session_leaves_the_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        s.set("k".into(), b"v".to_vec()).unwrap();
        drop(s);
        assert_eq!(store.session("p", u64::MAX).get("k").unwrap(), None);
    }

    #[test]
    fn list_keys_merges_stored_and_buffered_keys_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        for k in ["vm/a", "vm/b", "ip/1"] {
            s.set(k.into(), vec![]).unwrap();
        }
        s.commit().unwrap();
        let mut s = store.session("p", u64::MAX);
        s.delete("vm/a".into()).unwrap();
        s.set("vm/c".into(), vec![]).unwrap();
        assert_eq!(s.list_keys("vm/").unwrap(), vec!["vm/b", "vm/c"]);
    }

    #[test]
    fn a_listing_larger_than_the_plugins_memory_is_refused_not_held_and_pages_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        for i in 0..25_000 {
            s.set(format!("vm/{i:06}"), Vec::new()).unwrap();
        }
        s.commit().unwrap();
        // 25,000 keys of 9 bytes: 225,000 bytes, against 100,000.
        let s = store.session("p", u64::MAX).listing_at_most(100_000);
        let e = s.list_keys("vm/").unwrap_err();
        assert!(matches!(e, KvError::ListTooLarge(100_000)), "{e}");
        assert!(e.to_string().contains("`list-keys-after`"), "{e}");
        // Whole, across the store's pages of 10,000, when it fits.
        let all = store.session("p", u64::MAX).list_keys("vm/").unwrap();
        assert_eq!(all.len(), 25_000);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let page = s.list_keys_after("vm/", Some("vm/012345"), 1_000).unwrap();
        assert_eq!((page.len(), page[0].as_str()), (1_000, "vm/012346"));
    }

    /// Every page of `list_keys_after` with `limit`, in order.
    fn pages(s: &KvSession, prefix: &str, limit: usize) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list_keys_after(prefix, after.as_deref(), limit).unwrap();
            let last = page.len() < limit;
            after = page.last().cloned().or(after);
            pages.push(page);
            if last {
                return pages;
            }
        }
    }

    #[test]
    fn pages_of_keys_are_full_until_the_last_and_together_are_list_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = KvStore::open(&dir.path().join("kv.redb")).unwrap();
        let mut s = store.session("p", u64::MAX);
        for k in ["ip/1", "vm/a", "vm/b", "vm/c", "vm/d", "vm/e", "w"] {
            s.set(k.into(), vec![]).unwrap();
        }
        s.commit().unwrap();
        // The call deletes a whole stored page (a, b) and keys between
        // pages, and adds keys inside and past the stored ones.
        let mut s = store.session("p", u64::MAX);
        for k in ["vm/a", "vm/b", "vm/d"] {
            s.delete(k.into()).unwrap();
        }
        for k in ["vm/bb", "vm/z", "x"] {
            s.set(k.into(), vec![]).unwrap();
        }
        let all = s.list_keys("vm/").unwrap();
        assert_eq!(all, ["vm/bb", "vm/c", "vm/e", "vm/z"]);
        for limit in 1..=6 {
            let pages = pages(&s, "vm/", limit);
            let (last, full) = pages.split_last().unwrap();
            assert!(full.iter().all(|p| p.len() == limit), "{limit}: {pages:?}");
            assert!(last.len() < limit, "{limit}: {pages:?}");
            assert_eq!(pages.concat(), all, "limit {limit}");
        }
        assert_eq!(
            s.list_keys_after("vm/", Some("a"), 2).unwrap(),
            ["vm/bb", "vm/c"],
            "an `after` before the prefix starts at the prefix"
        );
        assert!(s
            .list_keys_after("vm/", Some("vm/z"), 2)
            .unwrap()
            .is_empty());
        assert!(s.list_keys_after("vm/", None, 0).unwrap().is_empty());
        s.commit().unwrap();
        let s = store.session("p", u64::MAX);
        assert_eq!(pages(&s, "vm/", 3).concat(), all, "the same once stored");

        // Nothing stored yet: every key comes from the call's writes.
        let mut fresh = store.session("q", u64::MAX);
        for k in ["vm/3", "vm/1", "vm/2", "w"] {
            fresh.set(k.into(), vec![]).unwrap();
        }
        assert_eq!(
            pages(&fresh, "vm/", 2),
            [["vm/1", "vm/2"].as_slice(), &["vm/3"]]
        );
    }
}
