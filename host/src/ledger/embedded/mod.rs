//! The embedded ledger: one redb file, crash-safe, for a single host.
//!
//! - **Append**: the event and one *pending* delivery per plugin are committed with an fsync
//!   before `append` returns. Concurrent appends share commits: see the `writer` module for the
//!   group commit.
//! - **Claim**: claiming works from an in-memory index (the `index` module), rebuilt from the file
//!   on open, and never writes: in-flight is not persisted, because after a crash every delivery
//!   that was in flight must be made again anyway.
//! - **Complete**, replays, drops and pruning go through the same writer thread, each as an
//!   operation with its own typed answer.
//! - **Dedupe**: the window of keys is held in memory (the `window` module), each key stored beside
//!   its event and read back on open.
//! - **Limits**: besides the backlog, the file's size (`max_file_bytes`); the file never shrinks by
//!   itself, so it is compacted on open when over the limit.
//! - **Older files** are converted to the current layout when opened (the `convert` module).

mod convert;
mod store;
mod window;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::ledger::delivery::{sort_reads, EventRead};
use crate::ledger::index::{lane_key, Index};
use crate::ledger::wake::{instant_of, Notifiers};
use store::{
    event_from_row, DeliveryRecord, DeliveryState, Tables, DELIVERED_PREFIX, DELIVERIES, EVENTS,
    EVENT_KEYS, META, NEXT_EVENT_ID,
};
use window::Window;
use writer::{Chunk, Command, Job, Op, ReplayChunk, Writer};

use crate::clock::now_ms;
use crate::failure::FileFailure;
use crate::ledger::{
    Appended, DeadLetter, DeadLetterCursor, Delivery, Ledger, LedgerError, LedgerStats, NewEvent,
    Outcome, PluginBacklog, Resource, RetryPolicy, StoredEvent, Wake,
};

/// Where the ledger lives and the limits it keeps.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// The database file; its directory is created if missing.
    pub path: PathBuf,
    /// An event whose dedupe key was seen this recently is stored once.
    pub dedupe_window: Duration,
    /// `append` refuses once this many deliveries (pending or in flight, all plugins) are
    /// undelivered; 0 = unlimited.
    pub max_backlog: u64,
    /// `append` refuses once the file uses this many bytes; 0 = unlimited.
    pub max_file_bytes: u64,
    /// Fully delivered events are kept this long (for `replay_since`), then pruned.
    pub retention: Duration,
    pub retry: RetryPolicy,
}

impl LedgerOptions {
    /// The defaults: 10 min dedupe window, 1,000,000 deliveries of backlog, no file limit,
    /// 24 h retention, [`RetryPolicy::default`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            dedupe_window: Duration::from_secs(10 * 60),
            max_backlog: 1_000_000,
            max_file_bytes: 0,
            retention: Duration::from_secs(24 * 60 * 60),
            retry: RetryPolicy::default(),
        }
    }
}

/// Adds what the ledger was doing to a redb error.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, LedgerError>;
    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, LedgerError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &str) -> Result<T, LedgerError> {
        self.with_ctx(|| context.to_owned())
    }

    fn with_ctx(self, context: impl FnOnce() -> String) -> Result<T, LedgerError> {
        self.map_err(|e| LedgerError::Storage {
            context: context(),
            source: Box::new(e.into()),
        })
    }
}

/// What every handle and the writer thread share.
struct Shared {
    db: Database,
    opts: LedgerOptions,
    index: Mutex<Index>,
    /// Mirrors `index.undelivered`, so backpressure checks take no lock.
    total_pending: AtomicU64,
    /// What backpressure compares with `max_file_bytes`.
    file_bytes: AtomicU64,
    commits: AtomicU64,
    pub(super) notifiers: Notifiers,
    /// Why the file cannot be written any more, once it cannot.
    failure: FileFailure,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("ledger index lock poisoned")
    }

    /// Why the file is unwritable, if `error` made it so (recorded the first
    /// time) or it was already.
    pub(super) fn failed_for_good(&self, error: &LedgerError) -> Option<String> {
        let io = matches!(
            error,
            LedgerError::Storage { source, .. }
                if matches!(source.downcast_ref::<redb::Error>(), Some(redb::Error::Io(_) | redb::Error::PreviousIo))
        );
        if io {
            self.failure.record(
                || prismhook_core::text::error_chain(error),
                |why| error!(error = %why, "the ledger's file failed; nothing more is accepted until the host is restarted, which checks and recovers the file"),
            );
        }
        self.failure.get()
    }

    /// What a caller hears once the file has failed.
    pub(super) fn unavailable(&self) -> Option<LedgerError> {
        self.failure.get().as_deref().map(unavailable_because)
    }

    /// Each event read, or why it cannot be; the outer error is a read that could not start.
    fn read_events(&self, ids: &[u64]) -> Result<Vec<EventRead>, LedgerError> {
        let txn = self.db.begin_read().ctx("beginning a read transaction")?;
        let events = txn.open_table(EVENTS).ctx("opening the events table")?;
        Ok(ids
            .iter()
            .map(|&id| {
                let row = events
                    .get(id)
                    .with_ctx(|| format!("reading event {id}"))?
                    .ok_or_else(|| LedgerError::missing_event(id))?;
                event_from_row(id, row.value())
            })
            .collect())
    }

    /// The dead letters named, with their events; letters dropped meanwhile are left out.
    fn read_dead_letters(
        &self,
        targets: Vec<(String, u64)>,
    ) -> Result<Vec<DeadLetter>, LedgerError> {
        let txn = self.db.begin_read().ctx("beginning a read transaction")?;
        let deliveries = txn
            .open_table(DELIVERIES)
            .ctx("opening the deliveries table")?;
        let events = txn.open_table(EVENTS).ctx("opening the events table")?;
        let mut letters = Vec::with_capacity(targets.len());
        for (plugin, id) in targets {
            let record = match deliveries
                .get((plugin.as_str(), id))
                .with_ctx(|| format!("reading the delivery of event {id} to `{plugin}`"))?
            {
                Some(bytes) => DeliveryRecord::decode(&plugin, id, bytes.value())?,
                None => continue, // dropped meanwhile
            };
            if record.state != DeliveryState::Dead {
                continue; // replayed meanwhile
            }
            // A letter whose event is gone is still listed: leaving it out
            // would hide it, and a page of such letters would end the list.
            let event = match events.get(id).with_ctx(|| format!("reading event {id}"))? {
                Some(row) => event_from_row(id, row.value()),
                None => Err(LedgerError::missing_event(id)),
            };
            letters.push(DeadLetter {
                event: event.unwrap_or_else(|error| StoredEvent::unreadable(&plugin, id, &error)),
                attempts: record.attempts,
                reason: record.reason.unwrap_or_default(),
                died_at_ms: record.died_at_ms.unwrap_or_default(),
                plugin,
            });
        }
        Ok(letters)
    }
}

/// Makes the entry of the file at `path` in its directory durable.
fn sync_dir(path: &Path) -> Result<(), LedgerError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LedgerError::Io {
            context: format!("flushing the directory {}", dir.display()),
            source,
        })
}

/// The sender is asked to come back: to this host once restarted, or to
/// another.
pub(super) fn unavailable_because(why: &str) -> LedgerError {
    LedgerError::Unavailable {
        context: "writing its file, which failed until the host restarts".into(),
        retry_after: Duration::from_secs(5),
        source: Box::new(std::io::Error::other(why.to_owned())),
    }
}

/// Owns the writer thread; the last handle to go stops it and waits for it, so the file is closed
/// by the time the last `RedbLedger` is dropped and can be reopened at once.
struct WriterHandle {
    tx: Option<mpsc::Sender<Command>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WriterHandle {
    fn sender(&self) -> &mpsc::Sender<Command> {
        self.tx.as_ref().expect("the sender lives until drop")
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.get_mut().ok().and_then(Option::take) {
            let _ = thread.join();
        }
    }
}

/// The embedded ledger. Cheap to clone; all clones share one database and writer.
#[derive(Clone)]
pub struct RedbLedger {
    // Declared first so that it drops first: the writer thread ends before the database closes.
    writer: Arc<WriterHandle>,
    shared: Arc<Shared>,
}

impl fmt::Debug for RedbLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbLedger")
            .field("path", &self.shared.opts.path)
            .finish_non_exhaustive()
    }
}

/// The ledger database's page cache.
const LEDGER_CACHE_BYTES: usize = 32 << 20;

impl RedbLedger {
    /// Opens (or creates) the ledger file and rebuilds the in-memory index from it. Deliveries that
    /// were in flight when the process last stopped are pending again.
    ///
    /// Blocking (it reads every undelivered delivery): call it at startup or from `spawn_blocking`.
    /// Fails if another process has the file open.
    pub fn open(opts: LedgerOptions) -> Result<RedbLedger, LedgerError> {
        let path = opts.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Io {
                context: format!("creating {}", dir.display()),
                source,
            })?;
        }
        // redb caches up to 1 GiB per database by default, and a steady
        // stream of 5 KB notifications would fill it; what is read back
        // (recent events, claimed soon after they arrive) fits in far less.
        let mut db = redb::Builder::new()
            .set_cache_size(LEDGER_CACHE_BYTES)
            .create(&path)
            .with_ctx(|| format!("opening {}", path.display()))?;
        convert::convert(&db)?;
        let txn = db.begin_write().ctx("beginning a write transaction")?;
        Tables::create(&txn)?;
        txn.commit().ctx("creating the tables")?;
        // The file's own fsyncs do not make its name durable: a power cut
        // could take a new file, and every event answered 202 in it. Every
        // open, not only the one that made it: that one may have died first.
        sync_dir(&path)?;

        if opts.max_file_bytes > 0 && file_len(&path) > opts.max_file_bytes {
            // The file never shrinks by itself; this is the one moment nothing else uses it.
            match db.compact() {
                Ok(_) => {
                    info!(path = %path.display(), bytes = file_len(&path), "compacted the ledger")
                }
                Err(error) => warn!(path = %path.display(), %error, "could not compact the ledger"),
            }
        }

        let (index, next_id) = rebuild(&db)?;
        let window = recall_window(&db, opts.dedupe_window)?;
        let counts = (index.undelivered, index.events.len());
        let shared = Arc::new(Shared {
            db,
            total_pending: AtomicU64::new(index.undelivered),
            file_bytes: AtomicU64::new(file_len(&path)),
            index: Mutex::new(index),
            opts,
            commits: AtomicU64::new(0),
            notifiers: Notifiers::default(),
            failure: FileFailure::default(),
        });
        info!(
            path = %path.display(),
            undelivered = counts.0,
            events = counts.1,
            next_id,
            dedupe_keys = window.len(),
            "ledger open"
        );

        let (tx, rx) = mpsc::channel(4 * writer::MAX_GROUP);
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || Writer::new(writer_shared, next_id, window).run(rx))
            .map_err(|source| LedgerError::Io {
                context: "starting the ledger writer thread".into(),
                source,
            })?;
        Ok(RedbLedger {
            writer: Arc::new(WriterHandle {
                tx: Some(tx),
                thread: Mutex::new(Some(thread)),
            }),
            shared,
        })
    }

    /// Runs one operation on the writer thread and waits for its answer.
    async fn run<O: Op>(&self, op: O) -> Result<O::Answer, LedgerError> {
        let (job, answer) = Job::boxed(op);
        self.writer
            .sender()
            .send(Command::Run(job))
            .await
            .map_err(|_| LedgerError::Closed)?;
        answer.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs a chunked operation until it says it is done; returns the sum of its counts.
    async fn run_chunks<C, O: Op<Answer = Chunk<C>>>(
        &self,
        mut op: impl FnMut(Option<C>) -> O,
    ) -> Result<u64, LedgerError> {
        let mut total = 0;
        let mut after = None;
        loop {
            let chunk = self.run(op(after)).await?;
            total += chunk.count;
            match chunk.resume {
                Some(resume) => after = Some(resume),
                None => return Ok(total),
            }
        }
    }

    fn check_limits(&self) -> Result<(), LedgerError> {
        let opts = &self.shared.opts;
        let pending = self.shared.total_pending.load(Ordering::Relaxed);
        if opts.max_backlog > 0 && pending >= opts.max_backlog {
            return Err(LedgerError::Backpressure {
                resource: Resource::Backlog,
                current: pending,
                limit: opts.max_backlog,
                retry_after: Duration::from_secs(5),
            });
        }
        let bytes = self.shared.file_bytes.load(Ordering::Relaxed);
        if opts.max_file_bytes > 0 && bytes >= opts.max_file_bytes {
            return Err(LedgerError::Backpressure {
                resource: Resource::Storage,
                current: bytes,
                limit: opts.max_file_bytes,
                retry_after: Duration::from_secs(30),
            });
        }
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.opts.path
    }
}

#[async_trait]
impl Ledger for RedbLedger {
    /// Concurrent calls share one transaction and one fsync.
    async fn append(&self, event: NewEvent, plugins: Vec<String>) -> Result<Appended, LedgerError> {
        self.check_limits()?;
        self.run(writer::Append::new(event, plugins)).await
    }

    /// Claiming works from memory and never writes.
    async fn claim(&self, plugin: &str, max: usize) -> Result<Vec<Delivery>, LedgerError> {
        let claimed = self.shared.index().claim(plugin, now_ms(), max);
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // If this future is dropped while the events are read, the claim must not stay in flight
        // until the next restart.
        let mut guard = Unclaim {
            shared: &self.shared,
            plugin,
            ids: claimed.iter().map(|&(id, _)| id).collect(),
        };
        let shared = self.shared.clone();
        let ids = guard.ids.clone();
        let reads = match tokio::task::spawn_blocking(move || shared.read_events(&ids)).await {
            Ok(reads) => reads?,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let (deliveries, unreadable) = sort_reads(plugin, claimed, reads)?;
        // Until these are settled, the guard releases the whole claim if anything fails.
        self.complete(plugin, unreadable).await?;
        guard.ids.clear();
        Ok(deliveries)
    }

    async fn complete(
        &self,
        plugin: &str,
        results: Vec<(u64, Outcome)>,
    ) -> Result<(), LedgerError> {
        if results.is_empty() {
            return Ok(());
        }
        self.run(writer::Complete {
            plugin: plugin.to_owned(),
            results,
        })
        .await
    }

    /// Only memory changes, so this is cheap and immediate.
    async fn release(&self, plugin: &str, ids: &[u64]) -> Result<(), LedgerError> {
        if self.shared.index().release(plugin, ids) > 0 {
            self.shared.notifiers.wake(plugin);
        }
        Ok(())
    }

    fn next_due(&self, plugin: &str) -> Option<Instant> {
        self.shared.index().next_due_ms(plugin).map(instant_of)
    }

    async fn wait_for_work(&self, plugin: &str, limit: Duration) -> Wake {
        let due = self.shared.index().next_due_ms(plugin);
        self.shared.notifiers.wait(plugin, due, limit).await
    }

    async fn dead_letters(
        &self,
        plugin: Option<&str>,
        after: Option<&DeadLetterCursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LedgerError> {
        let targets = self.shared.index().dead_page(plugin, after, limit);
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.read_dead_letters(targets))
            .await
            .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
    }

    async fn replay_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        self.run_chunks(|after| writer::ReplayDead {
            plugin: plugin.map(str::to_owned),
            ids: event_ids.map(<[u64]>::to_vec),
            after,
        })
        .await
    }

    async fn drop_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        self.run_chunks(|after| writer::DropDead {
            plugin: plugin.map(str::to_owned),
            ids: event_ids.map(<[u64]>::to_vec),
            after,
        })
        .await
    }

    /// Scans in chunks, so that appends are not held up for long.
    async fn replay_since(
        &self,
        plugin: &str,
        since_ms: u64,
        subscriptions: &[String],
    ) -> Result<u64, LedgerError> {
        // Nothing queued yet: the backlog may be full, or the file.
        self.check_limits()?;
        let max_backlog = self.shared.opts.max_backlog;
        let mut total = 0;
        let mut after = None;
        loop {
            let pending = self.shared.total_pending.load(Ordering::Relaxed);
            let ReplayChunk { chunk, full_at } = self
                .run(writer::ReplaySince {
                    plugin: plugin.to_owned(),
                    since_ms,
                    subscriptions: subscriptions.to_vec(),
                    // None left stops the replay at its next match.
                    room: match max_backlog {
                        0 => u64::MAX,
                        limit => limit.saturating_sub(pending),
                    },
                    after,
                })
                .await?;
            total += chunk.count;
            if let Some(resume_since_ms) = full_at {
                let full = LedgerError::ReplayStopped {
                    replayed: total,
                    limit: max_backlog,
                    resume_since_ms,
                };
                info!(plugin, since_ms, "{full}");
                return Err(full);
            }
            match chunk.resume {
                Some(resume) => after = Some(resume),
                None => break,
            }
        }
        info!(plugin, since_ms, replayed = total, "replayed events");
        Ok(total)
    }

    fn backlog(&self) -> Result<Vec<PluginBacklog>, LedgerError> {
        Ok(self.shared.index().backlog())
    }

    fn stats(&self) -> LedgerStats {
        LedgerStats {
            undelivered: self.shared.total_pending.load(Ordering::Relaxed),
            commits: self.shared.commits.load(Ordering::Relaxed),
            bytes: self.shared.file_bytes.load(Ordering::Relaxed),
        }
    }

    /// In bounded transactions.
    async fn prune(&self) -> Result<u64, LedgerError> {
        let now = now_ms();
        let opts = &self.shared.opts;
        let cutoff_ms = now.saturating_sub(opts.retention.as_millis() as u64);
        let pruned = self
            .run_chunks(|after| writer::PruneEvents { cutoff_ms, after })
            .await?;
        let cutoff_ms = now.saturating_sub(opts.dedupe_window.as_millis() as u64);
        let expired_keys = self
            .run_chunks(|_| writer::PruneDedupe { cutoff_ms })
            .await?;
        if opts.max_file_bytes > 0 && self.stats().bytes >= opts.max_file_bytes {
            // The file does not shrink, but the pages freed inside it are reused: measure them so
            // that backpressure lifts once there is room again.
            self.run(writer::MeasureFile).await?;
        }
        if pruned > 0 || expired_keys > 0 {
            info!(
                events = pruned,
                dedupe_keys = expired_keys,
                "pruned the ledger"
            );
        }
        Ok(pruned)
    }

    /// A read transaction proves the file is open and readable.
    async fn check(&self) -> Result<(), LedgerError> {
        if self.writer.sender().is_closed() {
            return Err(LedgerError::Closed);
        }
        if let Some(failed) = self.shared.unavailable() {
            return Err(failed);
        }
        self.shared
            .db
            .begin_read()
            .ctx("beginning a read transaction")
            .map(drop)
    }

    async fn failed(&self) -> String {
        self.shared.failure.wait().await
    }

    /// Stops the writer once queued writes are done. The file closes when the last handle is
    /// dropped (the writer thread holds none after it stops).
    async fn close(&self) -> Result<(), LedgerError> {
        let (reply, done) = oneshot::channel();
        if self
            .writer
            .sender()
            .send(Command::Close { reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
        let thread = self.writer.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

/// Releases a claim that did not reach its caller.
struct Unclaim<'a> {
    shared: &'a Shared,
    plugin: &'a str,
    ids: Vec<u64>,
}

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.shared.index().release(self.plugin, &self.ids);
            self.shared.notifiers.wake(self.plugin);
        }
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Reads every delivery record into a fresh index; returns it with the next event id.
fn rebuild(db: &Database) -> Result<(Index, u64), LedgerError> {
    let mut index = Index::default();
    let mut orphans = Vec::new();
    let mut spoilt = Vec::new();
    let next_id = {
        let txn = db.begin_read().ctx("beginning a read transaction")?;
        let events = txn.open_table(EVENTS).ctx("opening the events table")?;
        let deliveries = txn
            .open_table(DELIVERIES)
            .ctx("opening the deliveries table")?;
        let meta = txn.open_table(META).ctx("opening the meta table")?;

        for row in meta.range(DELIVERED_PREFIX..).ctx("reading counters")? {
            let (key, value) = row.ctx("reading a counter")?;
            let Some(plugin) = key.value().strip_prefix(DELIVERED_PREFIX) else {
                break;
            };
            index.know_plugin(plugin, value.value());
        }

        for row in deliveries.iter().ctx("reading deliveries")? {
            let (key, value) = row.ctx("reading a delivery")?;
            let (plugin, id) = key.value();
            // One record spoilt on disk must not keep the host from starting:
            // its event is delivered again (at least once), from a record
            // written anew below, which every later read of it needs.
            let record = DeliveryRecord::decode(plugin, id, value.value()).unwrap_or_else(|error| {
                error!(plugin, event_id = id, %error, "a delivery's record cannot be read; the event is delivered again");
                spoilt.push((plugin.to_owned(), id));
                DeliveryRecord::default()
            });
            let (lane, received_at_ms) = match index.events.get(&id) {
                Some(info) => (info.lane.clone(), info.received_at_ms),
                None => match events.get(id).with_ctx(|| format!("reading event {id}"))? {
                    Some(row) => {
                        let (received_at_ms, cluster, _, _, entity_uuid, _, _) = row.value();
                        (lane_key(cluster, entity_uuid, id), received_at_ms)
                    }
                    None => {
                        orphans.push((plugin.to_owned(), id));
                        continue;
                    }
                },
            };
            match record.state {
                DeliveryState::Pending => {
                    index.add_pending(plugin, id, lane, received_at_ms, record.failure());
                }
                DeliveryState::Dead => index.add_dead(plugin, id, lane, received_at_ms),
            }
        }

        let stored = meta
            .get(NEXT_EVENT_ID)
            .ctx("reading the next event id")?
            .map_or(1, |v| v.value());
        let after_last = events
            .last()
            .ctx("reading the last event")?
            .map_or(1, |(k, _)| k.value() + 1);
        stored.max(after_last).max(1)
    };
    if !orphans.is_empty() || !spoilt.is_empty() {
        if !orphans.is_empty() {
            warn!(
                count = orphans.len(),
                "deleting deliveries whose event is missing"
            );
        }
        let txn = db.begin_write().ctx("beginning a write transaction")?;
        {
            let mut tables = Tables::open(&txn)?;
            for (plugin, id) in &orphans {
                tables.remove_record(plugin, *id)?;
            }
            for (plugin, id) in &spoilt {
                tables.put_record(plugin, *id, &DeliveryRecord::default())?;
            }
        }
        txn.commit()
            .ctx("deleting orphaned deliveries and mending spoilt ones")?;
    }
    Ok((index, next_id))
}

/// The dedupe window as the file last knew it: every key stored within `window` of now.
fn recall_window(db: &Database, window: Duration) -> Result<Window, LedgerError> {
    let cutoff_ms = now_ms().saturating_sub(window.as_millis() as u64);
    let txn = db.begin_read().ctx("beginning a read transaction")?;
    let keys = txn
        .open_table(EVENT_KEYS)
        .ctx("opening the event_keys table")?;
    let mut recalled = Window::new();
    // In id order, so a key stored again later replaces its earlier event, as it did when stored.
    for row in keys.iter().ctx("reading dedupe keys")? {
        let (id, value) = row.ctx("reading a dedupe key")?;
        let (at_ms, key) = value.value();
        if at_ms >= cutoff_ms {
            recalled.recall(key, id.value());
        }
    }
    Ok(recalled)
}

#[cfg(test)]
mod tests;
