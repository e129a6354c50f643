//! Moves due deliveries from the ledger into plugins, and outcomes back.
//!
//! Per plugin, a few workers claim batches from the ledger (which keeps
//! per-entity order: an entity is never in two batches at once), call the
//! plugin version that is current when the batch starts, and record the
//! outcomes. A failed call (trap, timeout, memory) counts as retry for the
//! whole batch; repeated failures quarantine the plugin, pausing its
//! deliveries (they stay queued) with a growing pause.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::clock::{doubled, now_ms};
use crate::event::Vm;
use crate::ledger::{
    Delivery, LedgerError, Outcome as LedgerOutcome, SharedLedger, Wake, MAX_REASON_BYTES,
};
use crate::registry::Registry;
use crate::runtime::bindings::{self, Event, Outcome, Retry};
use crate::runtime::feed::{Feed, FeedSender, Inventory};
use crate::runtime::{CallError, KvFailure, Plugin, VmClusters};
use crate::source::{InventoryError, InventorySink, Listing, Reconciled};
use crate::telemetry::HandleDurations;
use prismhook_core::text::{one_line, truncate};

const QUARANTINE_MAX_PAUSE: Duration = Duration::from_secs(600);
/// Calls in a row failed by a kv conflict ([`KvFailure::Conflict`]: their
/// writes lost a race) that are made again at no cost to their events'
/// attempts. Hosts of a cluster writing the same keys race now and then,
/// and the call made again reads the winner's write; a longer run costs
/// attempts like any failed call, with their backoff, so nothing loops hot.
const FREE_KV_CONFLICTS: u32 = 3;
/// How long a worker waits to claim again after the ledger failed to record
/// its batch's outcomes, or the kv store to take its writes; it doubles while
/// they keep failing, up to [`UNRECORDED_MAX_PAUSE`].
const UNRECORDED_PAUSE: Duration = Duration::from_secs(1);
/// A store that fails for good (a kv file on a failed disk) costs the
/// plugin's target one call in this long, not one a second.
const UNRECORDED_MAX_PAUSE: Duration = Duration::from_secs(30);
/// How many of the plugin's deadlines isolating a failed batch may take.
/// Each event that fails alone can take a whole deadline (a firewall that
/// drops traffic, a guest that loops): without a bound, one batch of 256
/// would hold its worker for 257 deadlines. Past it, the events not yet
/// tried alone share the batch's failure, with its backoff.
const ISOLATION_DEADLINES: u32 = 2;

#[derive(Debug, Clone)]
pub struct DispatchOptions {
    pub batch_max: usize,
    pub batch_window: Duration,
    /// Batches of one plugin that may run at once (on disjoint entities).
    pub workers_per_plugin: usize,
    /// Failed calls in a row that quarantine a plugin.
    pub quarantine_after: u32,
    /// The first quarantine pause; it doubles with every further failure.
    pub quarantine_pause: Duration,
    /// Where each `handle` call's duration goes, for the metrics histogram.
    pub handle_durations: Option<HandleDurations>,
}

/// Deliveries to a plugin paused after repeated failed calls; they stay
/// queued and resume after `until_ms`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantine {
    pub reason: String,
    pub until_ms: u64,
}

/// Per-plugin delivery counts since start, for status and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub calls: u64,
    pub failed_calls: u64,
    pub delivered: u64,
    pub retried: u64,
    pub rejected: u64,
    /// Rejections whose reason starts with a `[code]`, by code (at most
    /// [`MAX_REJECT_CODES`] of them; later codes count as `other`).
    #[serde(skip)]
    pub rejected_by_code: BTreeMap<String, u64>,
    pub consecutive_failures: u32,
    pub quarantines: u32,
    /// Calls failed by a kv conflict (counted in `failed_calls` too).
    pub kv_conflicts: u64,
    #[serde(skip)]
    pub kv_conflicts_in_a_row: u32,
    #[serde(skip)]
    pub handle_time: Duration,
}

#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: SharedLedger,
    registry: Registry,
    opts: DispatchOptions,
    counters: Mutex<BTreeMap<String, Counters>>,
    /// Kept here, not in the registry: a quarantine changes which batches
    /// run, not which plugins are loaded or what they subscribe to.
    quarantined: Mutex<HashMap<String, Quarantine>>,
    /// The load each plugin's failures in a row and quarantine are about: a
    /// new version (a new file or new settings) starts with a clean record,
    /// however it came (replaced in place, or removed and added again).
    records_of: Mutex<HashMap<String, Plugin>>,
    /// Batches of a plugin share its lock; a reconcile takes it alone, so
    /// the plugin's kv is never rewritten by both at once.
    locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    stop: watch::Sender<bool>,
}

impl Inner {
    /// `name`'s quarantine, if `load` is what it is about.
    fn quarantine_of(&self, name: &str, load: &Plugin) -> Option<Quarantine> {
        self.record_is_of(name, load);
        self.quarantined
            .lock()
            .expect("quarantine lock")
            .get(name)
            .cloned()
    }

    /// Makes `load` what `name`'s record is about. A new version starts
    /// with a clean record: the failures that quarantined the one it
    /// replaces are not its own.
    fn record_is_of(&self, name: &str, load: &Plugin) {
        let previous = self
            .records_of
            .lock()
            .expect("records lock")
            .insert(name.to_owned(), load.clone());
        if previous.is_none_or(|p| p.same_load(load)) {
            return;
        }
        if let Some(c) = self.counters.lock().expect("counters lock").get_mut(name) {
            c.consecutive_failures = 0;
        }
        if self
            .quarantined
            .lock()
            .expect("quarantine lock")
            .remove(name)
            .is_some()
        {
            tracing::info!(plugin = %name, "out of quarantine: a new version serves");
        }
    }

    fn lock_for(&self, plugin: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.locks
            .lock()
            .expect("locks lock")
            .entry(plugin.to_owned())
            .or_default()
            .clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("plugin `{0}` is not loaded")]
    NotLoaded(String),
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Dispatcher {
    pub fn new(ledger: SharedLedger, registry: Registry, opts: DispatchOptions) -> Dispatcher {
        Dispatcher {
            inner: Arc::new(Inner {
                ledger,
                registry,
                opts,
                counters: Mutex::default(),
                quarantined: Mutex::default(),
                records_of: Mutex::default(),
                locks: Mutex::default(),
                stop: watch::channel(false).0,
            }),
        }
    }

    pub fn counters(&self) -> BTreeMap<String, Counters> {
        self.inner.counters.lock().expect("counters lock").clone()
    }

    /// Plugins whose deliveries are paused, by name.
    pub fn quarantined(&self) -> BTreeMap<String, Quarantine> {
        let all = self.inner.quarantined.lock().expect("quarantine lock");
        all.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Runs until [`Dispatcher::stop`]: keeps workers running for every
    /// loaded plugin, starting them when a plugin appears. Returns once
    /// every worker has finished its batch in hand.
    pub async fn run(&self) {
        let mut changes = self.inner.registry.watch();
        let mut stop = self.inner.stop.subscribe();
        let mut running: HashMap<String, usize> = HashMap::new();
        let mut workers = JoinSet::new();
        // Which plugin each worker serves and since when, to count it out
        // however it ends.
        let mut serving: HashMap<tokio::task::Id, (String, Instant)> = HashMap::new();
        let mut restarts: HashMap<String, Restart> = HashMap::new();
        loop {
            let now = Instant::now();
            for (name, entry) in self.inner.registry.snapshot().iter() {
                if entry.plugin.is_none() || restarts.get(name).is_some_and(|r| r.at > now) {
                    continue;
                }
                let n = running.entry(name.clone()).or_default();
                while *n < self.inner.opts.workers_per_plugin {
                    *n += 1;
                    let inner = self.inner.clone();
                    let name = name.clone();
                    let span = tracing::info_span!("worker", plugin = %name);
                    let task = workers.spawn(worker(inner, name.clone()).instrument(span));
                    serving.insert(task.id(), (name, now));
                }
            }
            let next_restart = restarts.values().map(|r| r.at).filter(|&at| at > now).min();
            tokio::select! {
                _ = changes.changed() => {}
                Some(done) = workers.join_next_with_id() => {
                    let id = match &done {
                        Ok((id, ())) => *id,
                        Err(e) => e.id(),
                    };
                    let (name, started) = serving.remove(&id).unwrap_or_else(|| (String::new(), now));
                    if let Err(e) = done {
                        // A bug, not the plugin's doing (a plugin's trap is
                        // an error, not a panic). Another worker takes its
                        // place after a pause that grows while the bug
                        // recurs, rather than at once, in a loop that would
                        // spin a core and fill the log.
                        let restart = restarts.entry(name.clone()).or_insert_with(Restart::new);
                        restart.failed(started);
                        tracing::error!(plugin = %name, "a delivery worker ended: {e}; another starts in {:?}", restart.delay);
                    }
                    if let Some(n) = running.get_mut(&name) { *n -= 1; }
                }
                _ = sleep_until_some(next_restart) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        while workers.join_next().await.is_some() {}
    }

    /// A plugin to hand an inventory to, once it reads its own kv writes;
    /// the caller holds its lock exclusively, so no batch of it runs
    /// meanwhile.
    async fn reconciling(&self, plugin: &str) -> Result<Plugin, DispatchError> {
        let Some(p) = self.inner.registry.get(plugin).and_then(|e| e.plugin) else {
            return Err(DispatchError::NotLoaded(plugin.to_owned()));
        };
        p.settle_kv()
            .await
            .map_err(|e| CallError::kv(plugin.to_owned(), &e))?;
        Ok(p)
    }

    /// Moves the queued deliveries of plugins that have been gone from the
    /// plugins directory for longer than `after` to the dead letters, with
    /// the reason, so that a plugin removed for good does not hold a backlog
    /// (and the backpressure limit) forever; they can still be replayed.
    /// `gone_since` remembers, between calls, when each was first seen gone.
    /// Returns how many deliveries expired.
    pub async fn expire_removed(
        &self,
        gone_since: &mut HashMap<String, Instant>,
        after: Duration,
    ) -> Result<u64, LedgerError> {
        let ledger = &self.inner.ledger;
        let loaded = self.inner.registry.snapshot();
        let now = Instant::now();
        let mut expired = 0;
        let mut still_gone = HashMap::new();
        for b in ledger.backlog()? {
            // A plugin whose file is there but failed to load is not gone:
            // the reload task tries it again, or the operator fixes it.
            if b.pending == 0 || loaded.contains_key(&b.plugin) {
                continue;
            }
            let since = gone_since.get(&b.plugin).copied().unwrap_or(now);
            still_gone.insert(b.plugin.clone(), since);
            if now.duration_since(since) < after {
                continue;
            }
            let reason = format!(
                "plugin `{}` was removed more than {} ago (delivery.removed_plugin_expiry)",
                b.plugin,
                humantime::format_duration(after)
            );
            let mut n = 0;
            // Checked again before each chunk: a plugin loaded meanwhile
            // keeps what is left.
            while self.inner.registry.get(&b.plugin).is_none() {
                // Only due deliveries are claimable; ones waiting for a retry
                // time expire at a later sweep.
                let batch = ledger.claim(&b.plugin, 1024).await?;
                if batch.is_empty() {
                    break;
                }
                let ids: Vec<u64> = batch.iter().map(|d| d.event.id).collect();
                let results = ids
                    .iter()
                    .map(|&id| {
                        (
                            id,
                            LedgerOutcome::Abandon {
                                reason: reason.clone(),
                            },
                        )
                    })
                    .collect();
                if let Err(e) = ledger.complete(&b.plugin, results).await {
                    // Claimed and not completed, they would stay in flight
                    // until a restart, their entities with them.
                    if let Err(again) = ledger.release(&b.plugin, &ids).await {
                        tracing::error!(plugin = %b.plugin, "releasing deliveries after a failed expiry: {again}");
                    }
                    return Err(e);
                }
                n += ids.len() as u64;
            }
            if n > 0 {
                tracing::warn!(plugin = %b.plugin, deliveries = n, "{reason}: its queued deliveries moved to the dead letters");
            }
            expired += n;
        }
        *gone_since = still_gone;
        Ok(expired)
    }

    /// Asks workers to stop after their batch in hand.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }
}

/// When a plugin's worker that ended by a panic is started again.
#[derive(Debug)]
struct Restart {
    at: Instant,
    delay: Duration,
    /// Panics in a row, each within [`WORKER_RESTART_MAX`] of its start.
    times: u32,
}

const WORKER_RESTART_FIRST: Duration = Duration::from_secs(1);
const WORKER_RESTART_MAX: Duration = Duration::from_secs(60);

impl Restart {
    fn new() -> Self {
        Restart {
            at: Instant::now(),
            delay: Duration::ZERO,
            times: 0,
        }
    }

    /// A worker started at `started` panicked: the pause doubles while
    /// workers keep panicking soon after they start.
    fn failed(&mut self, started: Instant) {
        if started.elapsed() >= WORKER_RESTART_MAX {
            self.times = 0;
        }
        self.delay = doubled(WORKER_RESTART_FIRST, self.times, WORKER_RESTART_MAX);
        self.times = self.times.saturating_add(1);
        self.at = Instant::now() + self.delay;
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn worker(inner: Arc<Inner>, name: String) {
    let mut stop = inner.stop.subscribe();
    let mut changes = inner.registry.watch();
    let mut unrecorded_in_a_row = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(entry) = inner.registry.get(&name) else {
            return;
        };
        let Some(plugin) = entry.plugin else { return };
        if let Some(q) = inner.quarantine_of(&name, &plugin) {
            let wait = Duration::from_millis(q.until_ms.saturating_sub(now_ms()));
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                    // A new version may serve, which the quarantine was not for.
                    Ok(()) = changes.changed() => {}
                }
                continue;
            }
        }

        // Before claiming, not between the claim and the call: a host's
        // claim holds only as long as its lease.
        if let Err(e) = plugin.settle_kv().await {
            tracing::warn!(plugin = %name, "waiting to claim: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let mut batch = match inner.ledger.claim(&name, inner.opts.batch_max).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(plugin = %name, "cannot claim deliveries: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            // The ledger keeps a signal raised since the claim, so nothing
            // appended meanwhile waits for the hour.
            let woke = tokio::select! {
                woke = inner.ledger.wait_for_work(&name, Duration::from_secs(3600)) => woke,
                _ = stop.changed() => continue,
            };
            if woke == Wake::Signalled && !inner.opts.batch_window.is_zero() {
                // Something arrived: give a burst a moment to gather into
                // one batch.
                tokio::time::sleep(inner.opts.batch_window).await;
            }
            continue;
        }
        if batch.len() < inner.opts.batch_max && !inner.opts.batch_window.is_zero() {
            tokio::time::sleep(inner.opts.batch_window).await;
            // Guarded as the delivery is: a panic here would end the worker
            // with the batch in hand claimed until a restart.
            let more = AssertUnwindSafe(
                inner
                    .ledger
                    .claim(&name, inner.opts.batch_max - batch.len()),
            )
            .catch_unwind()
            .await;
            match more {
                Ok(Ok(more)) => batch.extend(more),
                Ok(Err(_)) => {}
                Err(panic) => {
                    tracing::error!(plugin = %name, "claiming more for the batch panicked: {}", panic_text(&*panic));
                }
            }
        }
        let ids: Vec<u64> = batch.iter().map(|d| d.event.id).collect();
        // The version that serves when the batch starts: one loaded (or a
        // removal) while the claim and the window ran takes the batch, not
        // the version read before them. Code swapped in for the same load
        // (Cranelift's for Winch's) is the same version.
        let serving = inner.registry.get(&name).and_then(|e| e.plugin);
        if !serving.is_some_and(|p| p.same_load(&plugin)) {
            if let Err(e) = inner.ledger.release(&name, &ids).await {
                tracing::error!(plugin = %name, "cannot release a batch for the version reloaded meanwhile: {e}");
            }
            continue;
        }
        let delivering = AssertUnwindSafe(deliver(&inner, &name, &plugin, entry.coalesce, batch));
        let recorded = match delivering.catch_unwind().await {
            Ok(recorded) => recorded,
            Err(panic) => settle_after_panic(&inner, &name, &ids, panic_text(&*panic)).await,
        };
        if recorded {
            unrecorded_in_a_row = 0;
        } else {
            // Pending again, claimed at once they would be handed to the
            // plugin again and again, its work done for nothing each time,
            // for as long as the ledger cannot record or the kv store take
            // writes (a NATS stream electing a leader takes seconds).
            let pause = doubled(UNRECORDED_PAUSE, unrecorded_in_a_row, UNRECORDED_MAX_PAUSE);
            unrecorded_in_a_row += 1;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// What a worker does with a batch whose delivery panicked (a bug in the
/// host, or in a host import the plugin called): the batch's events are
/// retried with backoff like a failed call's, so they are neither stuck in
/// flight until a restart nor handed over again at once to the same bug.
/// Returns whether the ledger recorded it, as [`deliver`] does.
async fn settle_after_panic(inner: &Inner, name: &str, ids: &[u64], what: String) -> bool {
    tracing::error!(plugin = %name, events = ids.len(), "delivering a batch panicked: {what}; its events will be retried");
    let retry = LedgerOutcome::Retry {
        reason: truncate(
            format!("the host failed while delivering the batch: {what}"),
            MAX_REASON_BYTES,
        ),
        delay: None,
    };
    let results = ids.iter().map(|&id| (id, retry.clone())).collect();
    match inner.ledger.complete(name, results).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(plugin = %name, "cannot record the panicked batch; releasing it: {e}");
            if let Err(e) = inner.ledger.release(name, ids).await {
                tracing::error!(plugin = %name, "cannot release it either: {e}");
            }
            false
        }
    }
}

/// A panic's message, when it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Hands `batch` to the plugin and records the outcomes; false when the
/// deliveries are pending again for want of the host's storage: the ledger
/// could not record the outcomes, or the kv store take the call's writes.
async fn deliver(
    inner: &Inner,
    name: &str,
    plugin: &crate::runtime::Plugin,
    coalesce: bool,
    batch: Vec<Delivery>,
) -> bool {
    // With coalescing, each entity's newest event stands for its older
    // ones in the batch, and they share its outcome. Events that name no
    // entity are about nothing in common (the ledger gives each a lane of
    // its own): each stands for itself.
    let representative: Vec<usize> = if coalesce {
        fn entity(d: &Delivery) -> Option<(&str, &str)> {
            let e = &d.event;
            (!e.entity_uuid.is_empty()).then_some((e.cluster.as_str(), e.entity_uuid.as_str()))
        }
        let mut last: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, d) in batch.iter().enumerate() {
            if let Some(key) = entity(d) {
                last.insert(key, i);
            }
        }
        batch
            .iter()
            .enumerate()
            .map(|(i, d)| entity(d).map_or(i, |key| last[&key]))
            .collect()
    } else {
        (0..batch.len()).collect()
    };
    let sent: Vec<usize> = (0..batch.len())
        .filter(|&i| representative[i] == i)
        .collect();
    let events: Vec<Event> = sent.iter().map(|&i| to_event(&batch[i])).collect();
    let clusters = Arc::new(vm_clusters(
        sent.iter().filter_map(|&i| batch[i].event.vm.as_ref()),
    ));

    let lock = inner.lock_for(name);
    let shared = lock.read().await;
    let started = Instant::now();
    let conflicts_free = inner
        .counters
        .lock()
        .expect("counters lock")
        .get(name)
        .is_none_or(|c| c.kv_conflicts_in_a_row < FREE_KV_CONFLICTS);
    let (sent_outcomes, failure) =
        handle_isolating(plugin, &events, clusters, conflicts_free).await;
    let elapsed = started.elapsed();
    drop(shared);
    if let Some(h) = &inner.opts.handle_durations {
        h.observe(name, elapsed);
    }

    let by_index: HashMap<usize, &Option<LedgerOutcome>> =
        sent.iter().copied().zip(sent_outcomes.iter()).collect();
    let mut release = Vec::new();
    let mut tried = Vec::new();
    let mut outcomes = Vec::new();
    for (i, (d, r)) in batch.iter().zip(&representative).enumerate() {
        match by_index[r] {
            // Superseded by its entity's newest event, handed over in its
            // stead: done, whatever that one's answer, which alone carries
            // the VM's state on. Sharing a retry, it would count attempts
            // and could die without ever being handed over.
            Some(_) if *r != i => {
                tried.push(d);
                outcomes.push(LedgerOutcome::Done);
            }
            Some(o) => {
                tried.push(d);
                outcomes.push(o.clone());
            }
            None => release.push(d.event.id),
        }
    }
    if !release.is_empty() {
        if let Err(e) = inner.ledger.release(name, &release).await {
            tracing::error!(plugin = %name, "cannot release untried deliveries: {e}");
        }
    }
    let batch = tried;
    let ids: Vec<u64> = batch.iter().map(|d| d.event.id).collect();
    for (d, o) in batch.iter().zip(&outcomes) {
        match o {
            LedgerOutcome::Done => tracing::debug!(
                plugin = %name, event_id = d.event.id, cluster = %d.event.cluster,
                event_type = %d.event.event_type, entity = %d.event.entity_uuid, attempt = d.attempt, "delivered"
            ),
            LedgerOutcome::Retry { reason, .. } => tracing::info!(
                plugin = %name, event_id = d.event.id, cluster = %d.event.cluster,
                event_type = %d.event.event_type, entity = %d.event.entity_uuid, attempt = d.attempt, "retry: {}", one_line(reason)
            ),
            LedgerOutcome::Reject { reason } => tracing::warn!(
                plugin = %name, event_id = d.event.id, cluster = %d.event.cluster,
                event_type = %d.event.event_type, entity = %d.event.entity_uuid, attempt = d.attempt, "rejected: {}", one_line(reason)
            ),
            // A plugin's answer is never the host's giving up.
            LedgerOutcome::Abandon { .. } => {}
        }
    }
    count(inner, name, plugin, failure.as_ref(), &outcomes, elapsed);
    if ids.is_empty() {
        let store_down = matches!(
            failure,
            Some(CallError::Kv {
                failure: KvFailure::Unavailable,
                ..
            })
        );
        return !store_down;
    }
    let results: Vec<(u64, LedgerOutcome)> = ids.iter().copied().zip(outcomes).collect();
    let Err(e) = inner.ledger.complete(name, results).await else {
        return true;
    };
    // Pending again, to be delivered again once the ledger can record
    // outcomes (at least once, never lost). Left in flight, they would hold
    // their entities back until a restart: a NATS cluster electing a leader
    // fails a few completes, then answers again.
    let superseded = matches!(e, LedgerError::Superseded { .. });
    if superseded {
        tracing::warn!(plugin = %name, events = ids.len(), "outcomes dropped: {e}");
    } else {
        tracing::error!(plugin = %name, events = ids.len(), "cannot record outcomes; they will be delivered again: {e}");
    }
    if let Err(e) = inner.ledger.release(name, &ids).await {
        tracing::error!(plugin = %name, "cannot release the deliveries either: {e}");
    }
    // Superseded: another host holds them now, and has recorded more.
    superseded
}

/// Calls `handle` with the whole batch; if the call itself fails (trap,
/// timeout, memory), delivers the events one at a time instead, so that one
/// poison event cannot hold the healthy events of its batch hostage. Events
/// after a failed one of the same entity, or one the plugin asked to retry,
/// are not tried, to keep that entity's order. Isolating takes at most [`ISOLATION_DEADLINES`] of
/// the plugin's deadlines: the events it leaves untried get the batch's
/// failure. Returns one outcome per event and the first call error.
/// `None` marks an event that was not tried and must be released.
///
/// A call that failed for the host's kv is not the events' doing, so none is
/// tried alone: a kv conflict leaves them all untried when `conflicts_free`
/// (the worker's next claim waits until this host has read the write it was
/// behind, and the call made again reads it), and so does a store that did
/// not take the writes (the worker waits for it); writes the store refused
/// (the plugin's kv full) retry them all.
async fn handle_isolating(
    plugin: &crate::runtime::Plugin,
    events: &[Event],
    clusters: Arc<VmClusters>,
    conflicts_free: bool,
) -> (Vec<Option<LedgerOutcome>>, Option<CallError>) {
    // A trap's message is the guest's panic text, as long as it likes.
    let retry = |e: &CallError| LedgerOutcome::Retry {
        reason: truncate(e.to_string(), MAX_REASON_BYTES),
        delay: None,
    };
    let error = match plugin.handle_in(events, clusters.clone()).await {
        Ok(outcomes) => return (outcomes.iter().map(|o| Some(to_ledger(o))).collect(), None),
        Err(e) => e,
    };
    match &error {
        CallError::Kv {
            failure: KvFailure::Conflict,
            ..
        } if conflicts_free => {
            tracing::info!(plugin = %plugin.name(), events = events.len(), "made again: {error}");
            return (vec![None; events.len()], Some(error));
        }
        // Counted as attempts, a store electing a leader for longer than
        // the retries' backoff would make dead letters of healthy events.
        CallError::Kv {
            failure: KvFailure::Unavailable,
            ..
        } => {
            tracing::warn!(plugin = %plugin.name(), events = events.len(), "made again once the kv store takes writes: {error}");
            return (vec![None; events.len()], Some(error));
        }
        _ => {}
    }
    // A trap's message is the guest's panic text: one line in the log.
    tracing::warn!(plugin = %plugin.name(), events = events.len(), error_kind = error.kind(), "{}", one_line(&error.to_string()));
    if events.len() == 1 || matches!(error, CallError::Kv { .. }) {
        return (vec![Some(retry(&error)); events.len()], Some(error));
    }
    let deadline = plugin.limits().deadline;
    let budget = deadline * ISOLATION_DEADLINES;
    let isolating = Instant::now();
    let mut blocked: std::collections::HashSet<(String, String)> = Default::default();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut out_of_time = 0;
    for event in events {
        let entity = (event.cluster.clone(), event.entity_uuid.clone());
        if blocked.contains(&entity) {
            // Not tried: it goes back to the queue without costing an
            // attempt, behind the failed event of its entity.
            outcomes.push(None);
            continue;
        }
        // A call alone may take its whole deadline: it starts only if that
        // much is left of the budget, which then holds.
        if isolating.elapsed() + deadline > budget {
            out_of_time += 1;
            outcomes.push(Some(LedgerOutcome::Retry {
                reason: truncate(
                    format!("not tried alone: isolating its batch's failure took {budget:?}; the batch: {error}"),
                    MAX_REASON_BYTES,
                ),
                delay: None,
            }));
            continue;
        }
        match plugin
            .handle_in(std::slice::from_ref(event), clusters.clone())
            .await
        {
            Ok(o) => {
                let outcome = to_ledger(&o[0]);
                // Asked to be tried again later, it holds its entity's later
                // events back as a failed call does: handed over now, they
                // would reach the plugin before it.
                if matches!(outcome, LedgerOutcome::Retry { .. }) && !event.entity_uuid.is_empty() {
                    blocked.insert(entity);
                }
                outcomes.push(Some(outcome));
            }
            Err(e) => {
                tracing::warn!(plugin = %plugin.name(), error_kind = e.kind(), "isolated: {}", one_line(&e.to_string()));
                outcomes.push(Some(retry(&e)));
                // Events without an entity each have a lane of their own:
                // none waits behind another.
                if !event.entity_uuid.is_empty() {
                    blocked.insert(entity);
                }
            }
        }
    }
    if out_of_time > 0 {
        tracing::warn!(plugin = %plugin.name(), events = out_of_time, "not tried alone: isolating the batch's failure took its budget of {budget:?}; they are retried");
    }
    (outcomes, Some(error))
}

/// Distinct reject codes counted per plugin: a plugin cannot make metrics
/// series without bound.
pub const MAX_REJECT_CODES: usize = 32;

/// The code a plugin put before a rejection's reason, as in
/// `[registered-ip-limit] the firewall …`: lower case letters, digits and
/// `-`, at most 32 of them.
pub fn reject_code(reason: &str) -> Option<&str> {
    let rest = reason.strip_prefix('[')?;
    let code = &rest[..rest.find(']')?];
    let valid = !code.is_empty()
        && code.len() <= 32
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(code)
}

fn count(
    inner: &Inner,
    name: &str,
    load: &Plugin,
    failure: Option<&CallError>,
    outcomes: &[LedgerOutcome],
    elapsed: Duration,
) {
    inner.record_is_of(name, load);
    let quarantine = {
        let mut all = inner.counters.lock().expect("counters lock");
        let c = all.entry(name.to_owned()).or_default();
        c.calls += 1;
        c.handle_time += elapsed;
        for o in outcomes {
            match o {
                LedgerOutcome::Done => c.delivered += 1,
                LedgerOutcome::Retry { .. } => c.retried += 1,
                LedgerOutcome::Reject { reason } => {
                    c.rejected += 1;
                    if let Some(code) = reject_code(reason) {
                        let known = c.rejected_by_code.contains_key(code);
                        let code = if known || c.rejected_by_code.len() < MAX_REJECT_CODES {
                            code
                        } else {
                            "other"
                        };
                        *c.rejected_by_code.entry(code.to_owned()).or_default() += 1;
                    }
                }
                LedgerOutcome::Abandon { .. } => {}
            }
        }
        let (after, first_pause) = (inner.opts.quarantine_after, inner.opts.quarantine_pause);
        match failure {
            None => {
                c.consecutive_failures = 0;
                c.kv_conflicts_in_a_row = 0;
                None
            }
            // The host's kv failed the call, not the plugin: no step
            // towards a quarantine, which would pause the plugin beyond
            // the store's recovery.
            Some(CallError::Kv { failure, .. }) => {
                c.failed_calls += 1;
                if *failure == KvFailure::Conflict {
                    c.kv_conflicts += 1;
                    c.kv_conflicts_in_a_row += 1;
                } else {
                    c.kv_conflicts_in_a_row = 0;
                }
                None
            }
            Some(e) => {
                c.failed_calls += 1;
                c.kv_conflicts_in_a_row = 0;
                c.consecutive_failures += 1;
                (c.consecutive_failures >= after).then(|| {
                    c.quarantines += 1;
                    let pause = doubled(
                        first_pause,
                        c.consecutive_failures - after,
                        QUARANTINE_MAX_PAUSE,
                    );
                    // A trap's text names the guest's own functions: one
                    // line, bounded, as a plugin's reasons are.
                    (
                        truncate(one_line(&e.to_string()).into_owned(), MAX_REASON_BYTES),
                        pause,
                    )
                })
            }
        }
    };
    let mut quarantined = inner.quarantined.lock().expect("quarantine lock");
    if let Some((reason, pause)) = quarantine {
        tracing::warn!(plugin = %name, pause_s = pause.as_secs(), "quarantined after {} failed calls in a row: {reason}", inner.opts.quarantine_after);
        let until_ms = now_ms() + pause.as_millis() as u64;
        quarantined.insert(name.to_owned(), Quarantine { reason, until_ms });
    } else if failure.is_none() && quarantined.remove(name).is_some() {
        tracing::info!(plugin = %name, "out of quarantine");
    }
}

/// A plugin's outcome as the ledger keeps it. Reasons are the plugin's own
/// text, stored with the delivery, logged and shown by `dlq list`: they are
/// cut to [`MAX_REASON_BYTES`].
fn to_ledger(o: &Outcome) -> LedgerOutcome {
    match o {
        Outcome::Done => LedgerOutcome::Done,
        Outcome::Retry(Retry { reason, delay_ms }) => LedgerOutcome::Retry {
            reason: truncate(reason.clone(), MAX_REASON_BYTES),
            delay: delay_ms.map(Duration::from_millis),
        },
        Outcome::Reject(reason) => LedgerOutcome::Reject {
            reason: truncate(reason.clone(), MAX_REASON_BYTES),
        },
    }
}

/// Which Nutanix cluster each VM belongs to, where its source said.
fn vm_clusters<'a>(vms: impl IntoIterator<Item = &'a Vm>) -> VmClusters {
    vms.into_iter()
        .filter_map(|vm| Some((&vm.uuid, vm.cluster_name.as_ref()?)))
        .collect()
}

/// The WIT view of a stored event: the VM its source decoded at ingest, and
/// the body as it came.
pub fn to_event(d: &Delivery) -> Event {
    let e = &d.event;
    Event {
        id: e.id.to_string(),
        cluster: e.cluster.clone(),
        event_type: e.event_type.clone(),
        entity_kind: e.entity_kind.clone(),
        entity_uuid: e.entity_uuid.clone(),
        attempt: d.attempt,
        received_at_ms: e.received_at_ms,
        body: e.body.clone(),
        vm: e.vm.as_ref().map(bindings::Vm::from),
    }
}

/// Every plugin that keeps state about VMs (it subscribes to `VM.UPDATE`
/// or `VM.ON`) is handed the inventory. The other hosts sharing the ledger
/// pause, then this host's batches of those plugins finish and wait, and
/// only then is the inventory read: whatever was applied before is in it,
/// and whatever arrives later is delivered after the hand-over.
#[async_trait]
impl InventorySink for Dispatcher {
    async fn reconcile(
        &self,
        endpoint: &str,
        listing: Listing<'_>,
    ) -> Result<Reconciled, InventoryError> {
        let mut plugins: Vec<String> = self
            .inner
            .registry
            .snapshot()
            .iter()
            .filter(|(_, e)| e.subscribes_to("VM.UPDATE") || e.subscribes_to("VM.ON"))
            .map(|(name, _)| name.clone())
            .collect();
        // In one order, so that two reconciles (of two clusters) never hold
        // each a lock the other waits for.
        plugins.sort();
        self.inner
            .ledger
            .pause_others()
            .await
            .map_err(|e| InventoryError::Pause(e.to_string()))?;
        let mut exclusive = Vec::new();
        for name in &plugins {
            exclusive.push(self.inner.lock_for(name).write_owned().await);
        }
        let done = self.hand_over(endpoint, &plugins, listing).await;
        drop(exclusive);
        self.inner.ledger.resume_others().await;
        done
    }
}

impl Dispatcher {
    /// Plugins that take the inventory a page at a time are handed each
    /// page as the listing reads it, all at once, the listing waiting for
    /// the slowest; the others get the whole list once it is read, and only
    /// for them does the host hold it.
    async fn hand_over(
        &self,
        cluster: &str,
        plugins: &[String],
        listing: Listing<'_>,
    ) -> Result<Reconciled, InventoryError> {
        let mut done = Reconciled::default();
        let (mut fed, mut whole) = (Vec::new(), Vec::new());
        for name in plugins {
            match self.reconciling(name).await {
                Ok(p) if p.is_paged() => fed.push((name, p)),
                Ok(p) => whole.push((name, p)),
                Err(e) => report(&mut done, cluster, name, None, Err(e)),
            }
        }
        let mut feeds = Vec::new();
        let calls = futures_util::future::join_all(fed.iter().map(|(name, p)| {
            let (feed, inventory) = Inventory::fed();
            feeds.push(feed);
            async move { (*name, p.reconcile_fed(cluster, inventory).await) }
        }));
        let read = read_into(cluster, listing, feeds, !whole.is_empty());
        let (Listed { read, pages, count }, mut results) = tokio::join!(read, calls);
        if let Err(e) = read {
            for (name, result) in results {
                let ended = result.err();
                tracing::debug!(%cluster, plugin = %name, ?ended, "reconcile ended with the listing");
            }
            return Err(InventoryError::Listing(e));
        }
        if !whole.is_empty() {
            // The fed calls have ended and let go of the pages, so this
            // moves the VMs rather than copying them.
            let all: Vec<Vm> = pages.into_iter().flat_map(Arc::unwrap_or_clone).collect();
            // Which Nutanix cluster each VM belongs to, once for every plugin.
            let clusters = Arc::new(vm_clusters(all.iter()));
            let all = Arc::new(all);
            for (name, p) in whole {
                let result = p.reconcile(cluster, all.clone(), clusters.clone()).await;
                results.push((name, result));
            }
        }
        for (name, result) in results {
            report(
                &mut done,
                cluster,
                name,
                Some(count),
                result.map_err(Into::into),
            );
        }
        Ok(done)
    }
}

/// What reading a listing into the feeds came to.
struct Listed {
    /// Whether the listing reached its end.
    read: anyhow::Result<()>,
    /// Every page, when asked to keep them (for plugins that take the
    /// list): shared with the feeds, not copied.
    pages: Vec<Arc<Vec<Vm>>>,
    count: usize,
}

/// Reads `listing` to its end and sends each page to every feed, then the
/// end or the listing's error; keeps the pages too when `keep`.
async fn read_into(
    cluster: &str,
    mut listing: Listing<'_>,
    feeds: Vec<FeedSender>,
    keep: bool,
) -> Listed {
    let (mut pages, mut count) = (Vec::new(), 0);
    let read = loop {
        let (item, end) = match listing.next().await {
            Some(Ok(page)) => {
                count += page.len();
                let page = Arc::new(page);
                if keep {
                    pages.push(page.clone());
                }
                (Feed::Page(page), Ok(false))
            }
            Some(Err(e)) => (Feed::Failed(format!("{e:#}").into()), Err(e)),
            None => {
                tracing::info!(%cluster, vms = count, "inventory listed");
                (Feed::End, Ok(true))
            }
        };
        for feed in &feeds {
            // A call that ended early (a refused `init`, a trap) has
            // dropped its end: nothing more to give it.
            let _ = feed.send(item.clone()).await;
        }
        match end {
            Ok(false) => continue,
            Ok(true) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    Listed { read, pages, count }
}

/// Adds one plugin's reconcile to the lines, and logs it.
fn report(
    done: &mut Reconciled,
    cluster: &str,
    name: &str,
    vms: Option<usize>,
    result: Result<Result<String, String>, DispatchError>,
) {
    match result {
        Ok(Ok(summary)) => {
            tracing::info!(%cluster, plugin = %name, vms, "reconciled: {summary}");
            done.lines.push(format!("{name}: {summary}"));
        }
        Ok(Err(reason)) => {
            tracing::warn!(%cluster, plugin = %name, "reconcile refused: {reason}");
            done.lines.push(format!("{name}: failed: {reason}"));
            done.failed += 1;
        }
        Err(e) => {
            tracing::warn!(%cluster, plugin = %name, "reconcile failed: {e}");
            done.lines.push(format!("{name}: failed: {e}"));
            done.failed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reject_code;

    #[test]
    fn a_rejections_code_is_its_bracketed_prefix_when_well_formed() {
        assert_eq!(
            reject_code("[registered-ip-limit] the firewall is full"),
            Some("registered-ip-limit")
        );
        for none in [
            "no code",
            "[] empty",
            "[Upper] case",
            "[spaces are] not codes",
            "[unclosed",
            "[a-code-that-is-much-longer-than-thirty-two] x",
        ] {
            assert_eq!(reject_code(none), None, "{none}");
        }
    }
}
