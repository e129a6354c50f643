//! The ledger: the durable record of every accepted notification and of its delivery to every
//! subscribed plugin.
//!
//! prismhook promises that a notification it answered 202 for reaches every plugin subscribed to it
//! at least once, in order per entity, across crashes. Everything else in the host may lose its
//! memory at any moment; the ledger is what makes that promise true.
//!
//! [`Ledger`] is the interface the listener, the dispatcher and the admin API use; its types are
//! prismhook's own. [`RedbLedger`] (the `embedded` module, one crash-safe redb file) is its first
//! implementation. A backend keeps these promises, and the behaviour suite in `suite.rs` holds
//! every backend to them:
//!
//! - **Append**: the event and one *pending* delivery per subscribed plugin are stored durably
//!   before [`Ledger::append`] returns; the same notification within the dedupe window is stored
//!   once ([`Appended::Duplicate`]); at its limits the ledger refuses with
//!   [`LedgerError::Backpressure`] rather than accept what it cannot keep.
//! - **Claim**: [`Ledger::claim`] hands a plugin's dispatcher a batch of due deliveries, which are
//!   *in flight* until completed or released. In flight is not durable: after a crash every
//!   delivery that was in flight is pending again (at least once, never lost).
//! - **Order**: per plugin, the events of one entity (cluster + entity uuid) are delivered one
//!   batch at a time in arrival order; a retrying event holds back later events of its own entity
//!   only.
//! - **Complete**: outcomes are stored durably — done, retry (backoff with jitter per
//!   [`RetryPolicy`], at least the plugin's delay) or reject; a delivery that fails too often or
//!   for too long, or is rejected, becomes a *dead letter* an operator can replay or drop.
//! - **Retention**: [`Ledger::prune`] deletes delivered events after the retention period, and
//!   [`Ledger::replay_since`] redelivers what is still retained.
//!
//! # Time
//!
//! Due times are wall-clock milliseconds since the Unix epoch ([`crate::clock`]), because they are
//! stored and must mean the same after a restart; [`Ledger::next_due`] converts them to an
//! [`Instant`] for sleeping.

mod age;
mod delivery;
pub mod embedded;
mod index;
pub mod jetstream;
mod partition;
mod retry;
mod sharded;
#[cfg(test)]
mod suite;
mod wake;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::event::Vm;

pub use embedded::{LedgerOptions, RedbLedger};
pub use index::partition_of_entity;
pub use jetstream::{JetStreamLedger, JetStreamOptions};
pub use partition::{PartitionSet, PARTITIONS};
pub use retry::{Jitter, RetryPolicy};

/// A ledger shared by every part of the host.
pub type SharedLedger = Arc<dyn Ledger>;

/// A notification as a source accepted and decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The endpoint it came from (for Nutanix, the cluster's name).
    pub cluster: String,
    pub event_type: String,
    pub entity_kind: String,
    /// Empty when the notification names no entity; such events are not ordered among themselves.
    pub entity_uuid: String,
    /// Identifies the same notification sent twice within the dedupe window.
    pub dedupe_key: Option<String>,
    pub received_at_ms: u64,
    /// The body exactly as it came.
    pub body: String,
    /// The VM as the source decoded it at ingest; stored so that no attempt parses the body again.
    pub vm: Option<Vm>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Vm>,
}

impl StoredEvent {
    /// What a listing shows of an event the host cannot read: its id, and nothing else. The
    /// error is logged here with the plugin whose listing met it.
    pub(crate) fn unreadable(plugin: &str, id: u64, error: &LedgerError) -> Self {
        tracing::warn!(plugin, event_id = id, %error, "a dead letter's event cannot be read");
        StoredEvent {
            id,
            cluster: String::new(),
            event_type: String::new(),
            entity_kind: String::new(),
            entity_uuid: String::new(),
            received_at_ms: 0,
            body: String::new(),
            vm: None,
        }
    }
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

/// A delivery's reason (a plugin's text or a call's error) is kept to this
/// many bytes: each is stored with the delivery, logged and listed.
pub const MAX_REASON_BYTES: usize = 4096;

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
    /// The host gives up on it without the plugin's word (its plugin was removed for good, its
    /// event cannot be read): dead letter at once, with `reason` as it is and no attempt
    /// counted, since the plugin never had it.
    Abandon {
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

impl DeadLetter {
    /// Where a listing that ends with this letter goes on.
    pub fn cursor(&self) -> DeadLetterCursor {
        DeadLetterCursor {
            plugin: self.plugin.clone(),
            event_id: self.event.id,
        }
    }
}

/// A place in the dead letters' order (by plugin, then event id): a listing
/// from it starts with the letter after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterCursor {
    pub plugin: String,
    pub event_id: u64,
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

impl PluginBacklog {
    /// A plugin the ledger holds nothing for.
    pub fn empty(plugin: &str) -> PluginBacklog {
        PluginBacklog {
            plugin: plugin.to_owned(),
            pending: 0,
            in_flight: 0,
            retrying: 0,
            dead: 0,
            delivered: 0,
            oldest_pending_ms: None,
        }
    }
}

/// Figures about the ledger as a whole, cheap to read (no I/O).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStats {
    /// Pending plus in-flight deliveries over all plugins.
    pub undelivered: u64,
    /// Durable writes (transactions, acknowledged publishes) since open.
    pub commits: u64,
    /// Bytes of storage in use, as compared with the backend's size limit.
    pub bytes: u64,
}

/// One partition's undelivered deliveries, over all plugins: its lag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLag {
    pub partition: usize,
    /// Pending plus in-flight deliveries.
    pub undelivered: u64,
    /// When the oldest of them (by lane head) was received.
    pub oldest_undelivered_ms: Option<u64>,
}

/// Hosts sharing one ledger, and how they split its work, as one of them sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The host that answers.
    pub me: String,
    /// The host that runs the jobs one host runs for all (reconcile), if any holds the lease.
    pub leader: Option<String>,
    /// Every live host, by name.
    pub hosts: Vec<HostLeases>,
    /// Partitions no live host holds at this moment (moving from one host to another).
    pub unheld: Vec<usize>,
    /// Partitions this host claims from.
    pub serving: Vec<usize>,
    /// Every partition's lag, from this host's view of the ledger.
    pub lag: Vec<PartitionLag>,
}

/// One live host of a [`Membership`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLeases {
    pub name: String,
    /// The host that answers.
    pub me: bool,
    pub leader: bool,
    /// The partitions whose leases it holds.
    pub partitions: Vec<usize>,
    /// How long ago it last renewed its presence.
    pub seen_ms_ago: u64,
}

/// Why [`Ledger::wait_for_work`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something was appended, completed, released or replayed for the plugin.
    Signalled,
    /// A delivery's retry time came.
    Due,
    /// Neither, within the limit.
    TimedOut,
}

/// What backpressure is protecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Undelivered deliveries over all plugins.
    Backlog,
    /// Bytes of storage.
    Storage,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Backlog => "backlog",
            Resource::Storage => "storage",
        })
    }
}

/// A backend's own error, kept as the source of a [`LedgerError`] without naming its type.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

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
    /// The storage cannot be reached (a NATS cluster without quorum, a connection that is down):
    /// nothing was stored, and the sender should come back after `retry_after`.
    #[error("ledger storage is unavailable while {context}")]
    Unavailable {
        context: String,
        retry_after: Duration,
        #[source]
        source: BackendError,
    },
    #[error("ledger storage failed while {context}")]
    Storage {
        context: String,
        #[source]
        source: BackendError,
    },
    #[error("ledger I/O failed while {context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    /// Another host dispatches from this ledger (see the JetStream backend's owner guard).
    #[error("ledger {what} is in use by `{holder}`; {hint}")]
    InUse {
        what: String,
        holder: String,
        hint: String,
    },
    /// Outcomes not stored because this host's lease on their partition ran out while it
    /// delivered them (another host may have recorded them first, or claimed them again): the
    /// host that took over delivers them from what it recorded.
    #[error("ledger refused {context}: another host holds those deliveries now")]
    Superseded { context: String },
    /// A replay filled the backlog to its limit: what it queued stays queued.
    #[error(
        "replayed {replayed} event(s), then stopped at the backlog limit of {limit} deliveries; \
         once they drain, replay again since {}",
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(*resume_since_ms))
    )]
    ReplayStopped {
        replayed: u64,
        limit: u64,
        /// When the first event not replayed was received.
        resume_since_ms: u64,
    },
    /// An event larger than the storage takes in one record (on JetStream, one message of the
    /// NATS servers' `max_payload`): refused, as it would be each time.
    #[error("the event's record is {bytes} bytes, over the {limit} bytes {what}")]
    TooLarge {
        bytes: usize,
        limit: usize,
        /// What the limit is, in the operator's words.
        what: &'static str,
    },
    #[error("ledger is closed")]
    Closed,
}

impl LedgerError {
    /// An event whose deliveries outlived it, which no read can bring back.
    pub(crate) fn missing_event(id: u64) -> LedgerError {
        LedgerError::Corrupt {
            what: format!("event {id}"),
            detail: "it has deliveries but is missing".into(),
        }
    }
}

/// The durable delivery ledger, as every part of the host uses it.
///
/// Implementations are shared (`Arc<dyn Ledger>`) and called concurrently from many tasks. Every
/// method that changes state durably is async; the synchronous ones read memory only.
#[async_trait]
pub trait Ledger: Send + Sync + fmt::Debug + 'static {
    /// Durably stores the event with one pending delivery per plugin in `plugins` (duplicates
    /// ignored), then returns. Refuses with [`LedgerError::Backpressure`] at the ledger's limits;
    /// a notification within the dedupe window of an equal one is [`Appended::Duplicate`].
    async fn append(&self, event: NewEvent, plugins: Vec<String>) -> Result<Appended, LedgerError>;

    /// Claims up to `max` due deliveries for `plugin`, in event id order, and marks them in flight.
    ///
    /// An entity with anything in flight for this plugin, or whose earliest undelivered event
    /// waits for a retry time, contributes nothing; a free entity may contribute several
    /// consecutive due events. Cancellation-safe: a claim whose future is dropped is undone.
    async fn claim(&self, plugin: &str, max: usize) -> Result<Vec<Delivery>, LedgerError>;

    /// Durably records the outcomes of claimed deliveries. Outcomes for deliveries that are not in
    /// flight for `plugin` are ignored. A done that follows, in the same results, an event of its
    /// entity that will be retried goes back to pending uncounted, so that it comes again after
    /// the retried one. Must not race with [`Ledger::release`] of the same ids.
    async fn complete(&self, plugin: &str, results: Vec<(u64, Outcome)>)
        -> Result<(), LedgerError>;

    /// Returns claimed, unfinished deliveries to pending without counting an attempt (at
    /// shutdown, at reload, for events a batch did not try).
    async fn release(&self, plugin: &str, ids: &[u64]) -> Result<(), LedgerError>;

    /// When `plugin` next has something to claim: `None` when nothing is pending (in flight does
    /// not count), a time not after now when something is due.
    fn next_due(&self, plugin: &str) -> Option<Instant>;

    /// Waits, for at most `limit`, until something may have become claimable for `plugin`: an
    /// append, completion, release or replay for it, or a retry time. A signal raised after the
    /// last [`Ledger::claim`] and before this call is not lost.
    async fn wait_for_work(&self, plugin: &str, limit: Duration) -> Wake;

    /// Dead letters by plugin and event id, optionally of one plugin only, from the one after
    /// `after`; at most `limit`. A letter dropped while it is read is left out, so fewer than
    /// `limit` does not mean there are no more; none does.
    async fn dead_letters(
        &self,
        plugin: Option<&str>,
        after: Option<&DeadLetterCursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LedgerError>;

    /// Dead letters (of one plugin, and/or some events) become pending again with a fresh attempt
    /// count. Returns how many.
    async fn replay_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError>;

    /// Deletes dead letters (of one plugin, and/or some events). Returns how many.
    async fn drop_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError>;

    /// Gives `plugin` a pending delivery of every retained event received at or after `since_ms`
    /// whose type one of `subscriptions` covers (`VM.ON`, `VM.*`, `*`), that it has no delivery
    /// of yet. Returns how many.
    async fn replay_since(
        &self,
        plugin: &str,
        since_ms: u64,
        subscriptions: &[String],
    ) -> Result<u64, LedgerError>;

    /// Every plugin that has or had deliveries, by name, from the ledger's in-memory view.
    fn backlog(&self) -> Result<Vec<PluginBacklog>, LedgerError>;

    /// Whole-ledger figures, from memory.
    fn stats(&self) -> LedgerStats;

    /// The hosts sharing this ledger and what each holds; `None` for a ledger of one host.
    fn membership(&self) -> Option<Membership> {
        None
    }

    /// Whether this host leads, that is runs the jobs one host runs for all; it changes as
    /// leadership moves between hosts. The only host of a ledger always leads.
    fn leadership(&self) -> watch::Receiver<bool> {
        watch::channel(true).1
    }

    /// Has every other host sharing this ledger stop delivering (each finishes what it has in
    /// flight and claims nothing more), waiting until they have and until this host has read
    /// everything they stored (outcomes, plugins' kv); this host goes on. Until
    /// [`Ledger::resume_others`]. Reconcile lists an inventory and hands it to the plugins under
    /// it, so that no host applies an event the listing would then undo. A ledger of one host
    /// has no others.
    async fn pause_others(&self) -> Result<(), LedgerError> {
        Ok(())
    }

    /// Ends one [`Ledger::pause_others`]; the others deliver again once every pause has ended.
    async fn resume_others(&self) {}

    /// Deletes events past the retention period whose deliveries are all done, and dedupe keys
    /// older than the dedupe window. Returns how many events were deleted. Call it on a timer.
    async fn prune(&self) -> Result<u64, LedgerError>;

    /// Proves the storage is reachable and readable, for readiness.
    async fn check(&self) -> Result<(), LedgerError>;

    /// Resolves, with why, once the storage has failed in a way only
    /// opening it again mends; the host then stops, for its supervisor to
    /// start it again. Backends that recover by themselves never resolve.
    async fn failed(&self) -> String {
        std::future::pending().await
    }

    /// Lets queued writes finish and stops the backend; later calls on any handle fail with
    /// [`LedgerError::Closed`].
    async fn close(&self) -> Result<(), LedgerError>;
}
