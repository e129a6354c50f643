//! The ledger: the durable record of every accepted notification and of its delivery to every
//! subscribed plugin.
//!
//! prismhook promises that a notification it answered 202 for reaches every plugin subscribed to it
//! at least once, in order per entity, across crashes. Everything else in the host may lose its
//! memory at any moment; the ledger is what makes that promise true, so it is built on a real
//! crash-safe database file (redb) rather than a hand-written log.
//!
//! # How it fits together
//!
//! - **Append** ([`Ledger::append`]): the listener hands over an event and the plugins subscribed to
//!   it. The event and one *pending* delivery per plugin are committed with an fsync before
//!   `append` returns. Concurrent appends share commits: see the `writer` module for the group
//!   commit.
//! - **Claim** ([`Ledger::claim`]): a plugin's dispatcher takes a batch of due deliveries, which
//!   become *in flight*. Claiming works from an in-memory index (the `index` module), rebuilt from
//!   the file on open, and never writes: in-flight is not persisted, because after a crash every
//!   delivery that was in flight must be made again anyway.
//! - **Complete** ([`Ledger::complete`]): the outcomes of a batch — done, retry (exponential backoff
//!   with jitter, see [`RetryPolicy`]) or reject — are committed durably; a delivery that fails too
//!   often or for too long, or is rejected, becomes a *dead letter* for an operator to replay or
//!   drop.
//! - **Order**: per plugin, the events of one entity (cluster + entity uuid) are delivered one batch
//!   at a time in arrival order; a retrying event holds back later events of its own entity only.
//! - **Limits**: `append` refuses with [`LedgerError::Backpressure`] once the backlog or the file
//!   reach their limits — the listener turns that into 503 + `Retry-After` rather than accept what
//!   it cannot keep. [`Ledger::prune`] deletes delivered events after the retention period.
//!
//! # Time
//!
//! Due times are wall-clock milliseconds since the Unix epoch, because they are stored and must mean
//! the same after a restart; [`Ledger::next_due`] converts them to an [`Instant`] for sleeping.

mod index;
mod retry;
mod store;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};

pub use retry::{Jitter, RetryPolicy};

use index::{lane_key, Failure, Index};
use store::{
    event_from_row, DeliveryRecord, DeliveryState, Tables, DELIVERED_PREFIX, DELIVERIES, EVENTS,
    META, NEXT_EVENT_ID,
};
use writer::{Answer, Command, Op, Writer};

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

/// A notification as the listener accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub cluster: String,
    pub event_type: String,
    pub entity_kind: String,
    /// Empty when the notification names no entity; such events are not ordered among themselves.
    pub entity_uuid: String,
    /// Identifies the same notification sent twice (see `LedgerOptions::dedupe_window`).
    pub dedupe_key: Option<String>,
    pub received_at_ms: u64,
    pub body: String,
}

/// A notification as stored, with the id that orders it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Assigned in arrival order, never reused.
    pub id: u64,
    pub cluster: String,
    pub event_type: String,
    pub entity_kind: String,
    pub entity_uuid: String,
    pub received_at_ms: u64,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Appended {
    /// Durably stored, with one pending delivery per subscribed plugin.
    Stored { id: u64, deliveries: usize },
    /// The same notification was stored within the dedupe window as event `id`; nothing stored.
    Duplicate { id: u64 },
}

/// One claimed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event: StoredEvent,
    /// 1-based number of this attempt (failed attempts so far + 1).
    pub attempt: u32,
}

/// What became of a claimed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Try again after the backoff, or after `delay` if the plugin asked for longer.
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    /// Never try again: dead letter at once.
    Reject {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub plugin: String,
    pub event: StoredEvent,
    pub attempts: u32,
    pub reason: String,
    pub died_at_ms: u64,
}

/// One plugin's deliveries at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginBacklog {
    pub plugin: String,
    /// Waiting to be claimed (includes `retrying`).
    pub pending: u64,
    pub in_flight: u64,
    /// Pending deliveries that have failed before.
    pub retrying: u64,
    pub dead: u64,
    /// Done, all time.
    pub delivered: u64,
    /// When the oldest undelivered event (by lane head) was received.
    pub oldest_pending_ms: Option<u64>,
}

/// What backpressure is protecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Undelivered deliveries over all plugins.
    Backlog,
    /// Bytes used by the database file.
    FileSize,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Backlog => "backlog",
            Resource::FileSize => "file size",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The ledger is full; the caller should ask the sender to come back after `retry_after`.
    #[error("ledger {resource} is at {current} of its limit {limit}; not accepting more")]
    Backpressure {
        resource: Resource,
        current: u64,
        limit: u64,
        /// A hint for `Retry-After`.
        retry_after: Duration,
    },
    #[error("ledger storage failed while {context}")]
    Storage {
        context: String,
        #[source]
        source: redb::Error,
    },
    #[error("ledger I/O failed while {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("ledger is closed")]
    Closed,
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
            source: e.into(),
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    notifiers: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("ledger index lock poisoned")
    }

    fn notifier(&self, plugin: &str) -> Arc<Notify> {
        let mut notifiers = self
            .notifiers
            .lock()
            .expect("ledger notifier lock poisoned");
        if let Some(n) = notifiers.get(plugin) {
            return n.clone();
        }
        notifiers
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    fn read_events(&self, ids: &[u64]) -> Result<Vec<StoredEvent>, LedgerError> {
        let txn = self.db.begin_read().ctx("beginning a read transaction")?;
        let events = txn.open_table(EVENTS).ctx("opening the events table")?;
        ids.iter()
            .map(|&id| {
                let row = events
                    .get(id)
                    .with_ctx(|| format!("reading event {id}"))?
                    .ok_or_else(|| LedgerError::Corrupt {
                        what: format!("event {id}"),
                        detail: "it has deliveries but is missing".into(),
                    })?;
                Ok(event_from_row(id, row.value()))
            })
            .collect()
    }
}

/// Owns the writer thread; the last handle to go stops it and waits for it, so the file is closed
/// by the time the last `Ledger` is dropped and can be reopened at once.
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

/// The durable delivery ledger. Cheap to clone; all clones share one database and writer.
#[derive(Clone)]
pub struct Ledger {
    // Declared first so that it drops first: the writer thread ends before the database closes.
    writer: Arc<WriterHandle>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.shared.opts.path)
            .finish_non_exhaustive()
    }
}

/// The ledger database's page cache.
const LEDGER_CACHE_BYTES: usize = 32 << 20;

impl Ledger {
    /// Opens (or creates) the ledger file and rebuilds the in-memory index from it. Deliveries that
    /// were in flight when the process last stopped are pending again.
    ///
    /// Blocking (it reads every undelivered delivery): call it at startup or from `spawn_blocking`.
    /// Fails if another process has the file open.
    pub fn open(opts: LedgerOptions) -> Result<Ledger, LedgerError> {
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
        let txn = db.begin_write().ctx("beginning a write transaction")?;
        drop(Tables::open(&txn)?);
        txn.commit().ctx("creating the tables")?;

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
        let counts = (index.undelivered, index.events.len());
        let shared = Arc::new(Shared {
            db,
            total_pending: AtomicU64::new(index.undelivered),
            file_bytes: AtomicU64::new(file_len(&path)),
            index: Mutex::new(index),
            opts,
            commits: AtomicU64::new(0),
            notifiers: Mutex::new(HashMap::new()),
        });
        info!(path = %path.display(), undelivered = counts.0, events = counts.1, next_id, "ledger open");

        let (tx, rx) = mpsc::channel(4 * writer::MAX_GROUP);
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || Writer::new(writer_shared, next_id).run(rx))
            .map_err(|source| LedgerError::Io {
                context: "starting the ledger writer thread".into(),
                source,
            })?;
        Ok(Ledger {
            writer: Arc::new(WriterHandle {
                tx: Some(tx),
                thread: Mutex::new(Some(thread)),
            }),
            shared,
        })
    }

    async fn run(&self, op: Op) -> Result<Answer, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .sender()
            .send(Command::Run { op, reply })
            .await
            .map_err(|_| LedgerError::Closed)?;
        answer.await.map_err(|_| LedgerError::Closed)?
    }

    /// Durably stores the event with one pending delivery per plugin in `plugins` (duplicates
    /// ignored), then returns. Concurrent calls share one transaction and one fsync.
    ///
    /// Refuses with [`LedgerError::Backpressure`] once the backlog or the file reach their limits;
    /// a notification within the dedupe window of an equal one is [`Appended::Duplicate`].
    pub async fn append(
        &self,
        event: NewEvent,
        mut plugins: Vec<String>,
    ) -> Result<Appended, LedgerError> {
        self.check_limits()?;
        plugins.sort_unstable();
        plugins.dedup();
        match self.run(Op::Append { event, plugins }).await? {
            Answer::Appended(appended) => Ok(appended),
            _ => unreachable!("an append answers Appended"),
        }
    }

    fn check_limits(&self) -> Result<(), LedgerError> {
        let opts = &self.shared.opts;
        let pending = self.total_pending();
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
                resource: Resource::FileSize,
                current: bytes,
                limit: opts.max_file_bytes,
                retry_after: Duration::from_secs(30),
            });
        }
        Ok(())
    }

    /// Claims up to `max` due deliveries for `plugin`, in event id order, and marks them in flight.
    ///
    /// An entity (cluster + entity uuid) with anything in flight for this plugin, or whose earliest
    /// undelivered event waits for a retry time, contributes nothing; a free entity may contribute
    /// several consecutive due events. Nothing is written: in-flight deliveries are pending again
    /// after a restart. Cancellation-safe: if the future is dropped before it returns, the claim is
    /// undone.
    pub async fn claim(&self, plugin: &str, max: usize) -> Result<Vec<Delivery>, LedgerError> {
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
        let read = tokio::task::spawn_blocking(move || shared.read_events(&ids)).await;
        match read {
            Ok(Ok(events)) => {
                guard.ids.clear();
                Ok(events
                    .into_iter()
                    .zip(claimed)
                    .map(|(event, (_, attempt))| Delivery { event, attempt })
                    .collect())
            }
            Ok(Err(error)) => Err(error),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Records the outcomes of claimed deliveries in one durable transaction: done → delivered;
    /// retry → due again after the backoff (at least the plugin's delay), or dead once the policy's
    /// attempts or age are used up; reject → dead at once. Outcomes for deliveries that are not in
    /// flight for `plugin` are ignored with a warning.
    ///
    /// A done that follows, in the same results, an event of its entity that will be retried is
    /// not delivered yet: it goes back to pending without counting an attempt and comes again
    /// after the retried one, so a retrying event holds back the later events of its entity even
    /// when they shared its batch.
    ///
    /// Must not race with [`Ledger::release`] of the same ids.
    pub async fn complete(
        &self,
        plugin: &str,
        results: Vec<(u64, Outcome)>,
    ) -> Result<(), LedgerError> {
        if results.is_empty() {
            return Ok(());
        }
        self.run(Op::Complete {
            plugin: plugin.to_owned(),
            results,
        })
        .await
        .map(drop)
    }

    /// Returns claimed, unfinished deliveries to pending without counting an attempt (at shutdown
    /// or reload). Only memory changes, so this is cheap and immediate.
    pub async fn release(&self, plugin: &str, ids: &[u64]) -> Result<(), LedgerError> {
        if self.shared.index().release(plugin, ids) > 0 {
            self.shared.notifier(plugin).notify_one();
        }
        Ok(())
    }

    /// When `plugin` next has something to claim: `None` when nothing is pending (in-flight
    /// deliveries do not count — completing them signals the notifier), a time not after now when
    /// something is due.
    pub fn next_due(&self, plugin: &str) -> Option<Instant> {
        let due = self.shared.index().next_due_ms(plugin)?;
        let wait = due.saturating_sub(now_ms());
        Some(Instant::now() + Duration::from_millis(wait))
    }

    /// Signalled (with a stored permit, `notify_one`) whenever something may have become claimable
    /// for `plugin`: appends, completions, releases and replays. One dispatcher per plugin should
    /// wait on it, then `claim`, then sleep until [`Ledger::next_due`] or the next signal.
    pub fn notifier(&self, plugin: &str) -> Arc<Notify> {
        self.shared.notifier(plugin)
    }

    /// Dead letters, by plugin and event id, optionally of one plugin only.
    pub fn dead_letters(
        &self,
        plugin: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LedgerError> {
        let targets: Vec<(String, u64)> = self
            .shared
            .index()
            .dead(plugin, None)
            .into_iter()
            .take(limit)
            .collect();
        let txn = self
            .shared
            .db
            .begin_read()
            .ctx("beginning a read transaction")?;
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
            let Some(row) = events.get(id).with_ctx(|| format!("reading event {id}"))? else {
                continue;
            };
            letters.push(DeadLetter {
                event: event_from_row(id, row.value()),
                attempts: record.attempts,
                reason: record.reason.unwrap_or_default(),
                died_at_ms: record.died_at_ms.unwrap_or_default(),
                plugin,
            });
        }
        Ok(letters)
    }

    /// Dead letters (of one plugin, and/or some events) become pending again with a fresh attempt
    /// count. Returns how many.
    pub async fn replay_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        let op = Op::ReplayDead {
            plugin: plugin.map(str::to_owned),
            ids: event_ids.map(<[u64]>::to_vec),
        };
        match self.run(op).await? {
            Answer::Count(n) => Ok(n),
            _ => unreachable!("replay_dead answers Count"),
        }
    }

    /// Deletes dead letters (of one plugin, and/or some events). Returns how many.
    pub async fn drop_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        let op = Op::DropDead {
            plugin: plugin.map(str::to_owned),
            ids: event_ids.map(<[u64]>::to_vec),
        };
        match self.run(op).await? {
            Answer::Count(n) => Ok(n),
            _ => unreachable!("drop_dead answers Count"),
        }
    }

    /// Gives `plugin` a pending delivery of every retained event received at or after `since_ms`
    /// (optionally only of some event types) that it has no delivery of yet: events it has been
    /// delivered already, and events from before it was subscribed. Returns how many.
    pub async fn replay_since(
        &self,
        plugin: &str,
        since_ms: u64,
        event_types: Option<&[String]>,
    ) -> Result<u64, LedgerError> {
        let mut total = 0;
        let mut after = None;
        loop {
            let op = Op::ReplaySince {
                plugin: plugin.to_owned(),
                since_ms,
                event_types: event_types.map(<[String]>::to_vec),
                after,
            };
            match self.run(op).await? {
                Answer::Chunk { count, resume } => {
                    total += count;
                    match resume {
                        Some(resume) => after = Some(resume),
                        None => break,
                    }
                }
                _ => unreachable!("replay_since answers Chunk"),
            }
        }
        info!(plugin, since_ms, replayed = total, "replayed events");
        Ok(total)
    }

    /// Every plugin that has or had deliveries since the file was created, by name.
    pub fn backlog(&self) -> Result<Vec<PluginBacklog>, LedgerError> {
        Ok(self
            .shared
            .index()
            .counts()
            .into_iter()
            .map(|(plugin, c)| PluginBacklog {
                plugin,
                pending: c.pending,
                in_flight: c.in_flight,
                retrying: c.retrying,
                dead: c.dead,
                delivered: c.delivered,
                oldest_pending_ms: c.oldest_pending_ms,
            })
            .collect())
    }

    /// Pending plus in-flight deliveries over all plugins; a relaxed atomic load.
    pub fn total_pending(&self) -> u64 {
        self.shared.total_pending.load(Ordering::Relaxed)
    }

    /// Write transactions committed since open (group commit makes this far fewer than requests).
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// The bytes of file in use, as compared with `max_file_bytes`.
    pub fn file_bytes(&self) -> u64 {
        self.shared.file_bytes.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.shared.opts.path
    }

    /// Deletes events received before the retention period whose deliveries are all done (or that
    /// had none), and dedupe keys older than the dedupe window, in bounded transactions. Returns
    /// how many events were deleted. Call it on a timer.
    pub async fn prune(&self) -> Result<u64, LedgerError> {
        let now = now_ms();
        let opts = &self.shared.opts;
        let cutoff_ms = now.saturating_sub(opts.retention.as_millis() as u64);
        let mut pruned = 0;
        let mut after = None;
        loop {
            match self.run(Op::PruneEvents { cutoff_ms, after }).await? {
                Answer::Chunk { count, resume } => {
                    pruned += count;
                    match resume {
                        Some(resume) => after = Some(resume),
                        None => break,
                    }
                }
                _ => unreachable!("prune answers Chunk"),
            }
        }
        let cutoff_ms = now.saturating_sub(opts.dedupe_window.as_millis() as u64);
        let mut expired_keys = 0;
        loop {
            match self.run(Op::PruneDedupe { cutoff_ms }).await? {
                Answer::Chunk { count, resume } => {
                    expired_keys += count;
                    if resume.is_none() {
                        break;
                    }
                }
                _ => unreachable!("prune answers Chunk"),
            }
        }
        if opts.max_file_bytes > 0 && self.file_bytes() >= opts.max_file_bytes {
            // The file does not shrink, but the pages freed inside it are reused: measure them so
            // that backpressure lifts once there is room again.
            self.run(Op::MeasureFile).await?;
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

    /// Lets queued writes finish, stops the writer and closes the file if this was the last handle.
    /// Other handles' later calls fail with [`LedgerError::Closed`].
    pub async fn close(self) -> Result<(), LedgerError> {
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
        let Ledger { writer, shared } = self;
        drop(writer);
        match Arc::try_unwrap(shared) {
            Ok(shared) => shared.db.close().ctx("closing the database"),
            Err(_) => Ok(()),
        }
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
            self.shared.notifier(self.plugin).notify_one();
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
            let record = DeliveryRecord::decode(plugin, id, value.value())?;
            let (lane, received_at_ms) = match index.events.get(&id) {
                Some(info) => (info.lane.clone(), info.received_at_ms),
                None => match events.get(id).with_ctx(|| format!("reading event {id}"))? {
                    Some(row) => {
                        let (received_at_ms, cluster, _, _, entity_uuid, _) = row.value();
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
                    let failure = (record.attempts > 0).then_some(Failure {
                        attempts: record.attempts,
                        due_at_ms: record.due_at_ms,
                    });
                    index.add_pending(plugin, id, lane, received_at_ms, failure);
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
    if !orphans.is_empty() {
        warn!(
            count = orphans.len(),
            "deleting deliveries whose event is missing"
        );
        let txn = db.begin_write().ctx("beginning a write transaction")?;
        {
            let mut tables = Tables::open(&txn)?;
            for (plugin, id) in &orphans {
                tables.remove_record(plugin, *id)?;
            }
        }
        txn.commit().ctx("deleting orphaned deliveries")?;
    }
    Ok((index, next_id))
}

#[cfg(test)]
mod tests;
