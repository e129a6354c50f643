//! The single writer thread and its group commit.
//!
//! redb allows one write transaction at a time and every durable commit costs an fsync, so
//! one fsync per webhook would cap the listener at the disk's flush rate. Instead every change goes
//! through one channel to one dedicated thread, which takes whatever has queued up while the
//! previous commit was flushing — up to [`MAX_GROUP`] appends and completions — stages them all in
//! one transaction, commits once, and only then updates the in-memory index and answers each caller.
//! Under load the batch size adapts by itself: the longer a flush takes, the more requests wait for
//! the next one. Nobody is answered before their change is on disk.
//!
//! Operator actions (replays, drops) and pruning run alone in their own transactions; the ones that
//! scan events (`replay_since`, `prune`) do so in chunks of [`CHUNK`] events, so that a day of
//! history does not hold up appends for long.
//!
//! If a grouped transaction fails, its requests are retried one transaction each, so a request that
//! cannot be stored fails alone instead of taking its neighbours down with it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redb::{Durability, ReadableTable};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::index::{lane_key, Failure, LaneKey};
use super::store::{delivered_key, DeliveryRecord, DeliveryState, Tables, NEXT_EVENT_ID};
use super::{now_ms, Appended, Ctx, LedgerError, NewEvent, Outcome, Shared};

/// Most requests committed in one transaction.
pub(super) const MAX_GROUP: usize = 256;
/// Most events examined by one chunk of a replay or prune.
pub(super) const CHUNK: usize = 4096;

pub(super) enum Op {
    Append {
        event: NewEvent,
        plugins: Vec<String>,
    },
    Complete {
        plugin: String,
        results: Vec<(u64, Outcome)>,
    },
    ReplayDead {
        plugin: Option<String>,
        ids: Option<Vec<u64>>,
    },
    DropDead {
        plugin: Option<String>,
        ids: Option<Vec<u64>>,
    },
    ReplaySince {
        plugin: String,
        since_ms: u64,
        event_types: Option<Vec<String>>,
        after: Option<u64>,
    },
    PruneEvents {
        cutoff_ms: u64,
        after: Option<u64>,
    },
    PruneDedupe {
        cutoff_ms: u64,
    },
    /// Recomputes the bytes the file really uses (after prune freed pages inside it).
    MeasureFile,
}

impl Op {
    fn groupable(&self) -> bool {
        matches!(self, Op::Append { .. } | Op::Complete { .. })
    }
}

pub(super) enum Answer {
    Appended(Appended),
    Done,
    Count(u64),
    /// One chunk of a long operation: what it did, and where the next chunk starts (None = done).
    Chunk {
        count: u64,
        resume: Option<u64>,
    },
}

pub(super) type Reply = oneshot::Sender<Result<Answer, LedgerError>>;

pub(super) enum Command {
    Run { op: Op, reply: Reply },
    Close { reply: oneshot::Sender<()> },
}

/// What a staged operation will change in memory once its transaction has committed.
enum Effect {
    Stored {
        id: u64,
        lane: LaneKey,
        received_at_ms: u64,
        plugins: Vec<String>,
    },
    Duplicate {
        id: u64,
    },
    Completed {
        plugin: String,
        changes: Vec<(u64, Change)>,
    },
    Revived(Vec<(String, u64)>),
    Dropped(Vec<(String, u64)>),
    Added {
        plugin: String,
        events: Vec<(u64, LaneKey, u64)>,
        resume: Option<u64>,
    },
    Chunk {
        count: u64,
        resume: Option<u64>,
    },
    Nothing,
}

enum Change {
    Done,
    Retry(Failure),
    Dead,
    /// Back to pending as it was, no attempt counted: see `stage_complete`.
    HeldBack,
}

/// Per-transaction state that only becomes real if the transaction commits.
struct Staged {
    next_id: u64,
    delivered: BTreeMap<String, u64>,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    next_id: u64,
    last_file_len: u64,
    rng: rand::rngs::ThreadRng,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, next_id: u64) -> Self {
        let last_file_len = shared.file_bytes.load(Ordering::Relaxed);
        Self {
            shared,
            next_id,
            last_file_len,
            rng: rand::rng(),
        }
    }

    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut held = None;
        loop {
            let command = match held.take() {
                Some(command) => command,
                None => match rx.blocking_recv() {
                    Some(command) => command,
                    None => break,
                },
            };
            let (op, reply) = match command {
                Command::Close { reply } => {
                    let _ = reply.send(());
                    break;
                }
                Command::Run { op, reply } => (op, reply),
            };
            let mut batch = vec![(op, reply)];
            if batch[0].0.groupable() {
                while batch.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Command::Run { op, reply }) if op.groupable() => batch.push((op, reply)),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            self.commit(batch);
        }
        debug!("ledger writer stopped");
    }

    fn commit(&mut self, batch: Vec<(Op, Reply)>) {
        let ops: Vec<&Op> = batch.iter().map(|(op, _)| op).collect();
        match self.transact(&ops) {
            Ok(effects) => {
                let answers = self.apply(effects);
                for ((_, reply), answer) in batch.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(error) if batch.len() > 1 => {
                warn!(%error, requests = batch.len(), "group commit failed; retrying its requests one by one");
                for request in batch {
                    self.commit(vec![request]);
                }
            }
            Err(error) => {
                let (_, reply) = batch.into_iter().next().expect("one request");
                let _ = reply.send(Err(error));
            }
        }
    }

    /// Stages `ops` in one durable transaction and commits it.
    fn transact(&mut self, ops: &[&Op]) -> Result<Vec<Effect>, LedgerError> {
        let shared = self.shared.clone();
        let mut txn = shared
            .db
            .begin_write()
            .ctx("beginning a write transaction")?;
        txn.set_durability(Durability::Immediate)
            .ctx("asking for an immediate-durability commit")?;
        if let [Op::MeasureFile] = ops {
            let stats = txn.stats().ctx("measuring the database")?;
            txn.abort().ctx("ending the measuring transaction")?;
            let used = stats.allocated_pages() * stats.page_size() as u64;
            debug!(used, "measured ledger file use");
            shared.file_bytes.store(used, Ordering::Relaxed);
            return Ok(vec![Effect::Nothing]);
        }
        let now = now_ms();
        let mut staged = Staged {
            next_id: self.next_id,
            delivered: BTreeMap::new(),
        };
        let effects = {
            let mut tables = Tables::open(&txn)?;
            let effects = ops
                .iter()
                .map(|op| self.stage(&mut tables, &mut staged, op, now))
                .collect::<Result<Vec<_>, _>>()?;
            for (plugin, done) in &staged.delivered {
                let key = delivered_key(plugin);
                let total = tables
                    .meta
                    .get(key.as_str())
                    .ctx("reading a delivered count")?
                    .map_or(0, |v| v.value());
                tables
                    .meta
                    .insert(key.as_str(), total + done)
                    .ctx("writing a delivered count")?;
            }
            effects
        };
        txn.commit().ctx("committing")?;
        self.next_id = staged.next_id;
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.track_file_size();
        Ok(effects)
    }

    fn stage(
        &mut self,
        t: &mut Tables,
        staged: &mut Staged,
        op: &Op,
        now: u64,
    ) -> Result<Effect, LedgerError> {
        match op {
            Op::Append { event, plugins } => stage_append(t, staged, event, plugins, self.window()),
            Op::Complete { plugin, results } => {
                self.stage_complete(t, staged, plugin, results, now)
            }
            Op::ReplayDead { plugin, ids } => {
                let targets = self.shared.index().dead(plugin.as_deref(), ids.as_deref());
                let mut revived = Vec::new();
                for (plugin, id) in targets {
                    match t.record(&plugin, id)? {
                        Some(record) if record.state == DeliveryState::Dead => {
                            t.put_record(&plugin, id, &DeliveryRecord::default())?;
                            revived.push((plugin, id));
                        }
                        _ => {}
                    }
                }
                Ok(Effect::Revived(revived))
            }
            Op::DropDead { plugin, ids } => {
                let targets = self.shared.index().dead(plugin.as_deref(), ids.as_deref());
                for (plugin, id) in &targets {
                    t.remove_record(plugin, *id)?;
                }
                Ok(Effect::Dropped(targets))
            }
            Op::ReplaySince {
                plugin,
                since_ms,
                event_types,
                after,
            } => stage_replay_since(t, plugin, *since_ms, event_types.as_deref(), *after),
            Op::PruneEvents { cutoff_ms, after } => {
                self.stage_prune_events(t, staged, *cutoff_ms, *after)
            }
            Op::PruneDedupe { cutoff_ms } => stage_prune_dedupe(t, *cutoff_ms),
            Op::MeasureFile => Ok(Effect::Nothing),
        }
    }

    fn window(&self) -> u64 {
        self.shared.opts.dedupe_window.as_millis() as u64
    }

    fn stage_complete(
        &mut self,
        t: &mut Tables,
        staged: &mut Staged,
        plugin: &str,
        results: &[(u64, Outcome)],
        now: u64,
    ) -> Result<Effect, LedgerError> {
        let (in_flight, lanes): (Vec<bool>, Vec<Option<LaneKey>>) = {
            let index = self.shared.index();
            results
                .iter()
                .map(|(id, _)| (index.is_in_flight(plugin, *id), index.lane_of(*id)))
                .unzip()
        };
        let policy = self.shared.opts.retry.clone();
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        // Entities with an event in these results that will be retried. A batch may carry several
        // consecutive events of one entity; when an earlier one is to be retried, a later one the
        // plugin says is done must not count as delivered ahead of it (the retry would then reach
        // the plugin after it, and a stale state would win). It goes back to pending, uncounted,
        // and comes again after the retry.
        let mut retrying: HashSet<LaneKey> = HashSet::new();
        let mut order: Vec<usize> = (0..results.len()).collect();
        order.sort_by_key(|&i| results[i].0);
        for i in order {
            let (id, outcome) = &results[i];
            let (id, in_flight, lane) = (*id, in_flight[i], &lanes[i]);
            if !in_flight || !seen.insert(id) {
                warn!(
                    plugin,
                    event_id = id,
                    "ignoring an outcome for a delivery that is not in flight"
                );
                continue;
            }
            let Some(mut record) = t.record(plugin, id)? else {
                warn!(
                    plugin,
                    event_id = id,
                    "ignoring an outcome for a delivery with no record"
                );
                continue;
            };
            let held = lane.as_ref().is_some_and(|l| retrying.contains(l));
            if held && matches!(outcome, Outcome::Done) {
                debug!(
                    plugin,
                    event_id = id,
                    "held back: an earlier event of its entity will be retried"
                );
                changes.push((id, Change::HeldBack));
                continue;
            }
            let attempts = record.attempts + 1;
            let change = match outcome {
                Outcome::Done => {
                    t.remove_record(plugin, id)?;
                    *staged.delivered.entry(plugin.to_owned()).or_default() += 1;
                    Change::Done
                }
                Outcome::Reject { reason } => {
                    warn!(
                        plugin,
                        event_id = id,
                        attempt = attempts,
                        reason,
                        "delivery rejected; it is a dead letter"
                    );
                    record.die(attempts, format!("rejected: {reason}"), now);
                    t.put_record(plugin, id, &record)?;
                    Change::Dead
                }
                Outcome::Retry { reason, delay } => {
                    let first = record.first_failure_ms.unwrap_or(now);
                    let age = Duration::from_millis(now.saturating_sub(first));
                    let verdict = if attempts >= policy.max_attempts.max(1) {
                        Some(format!("gave up after {attempts} attempts: {reason}"))
                    } else if age >= policy.max_age {
                        Some(format!(
                            "gave up after {:.1}s of retries: {reason}",
                            age.as_secs_f64()
                        ))
                    } else {
                        None
                    };
                    if let Some(verdict) = verdict {
                        warn!(
                            plugin,
                            event_id = id,
                            attempt = attempts,
                            reason = verdict,
                            "delivery is a dead letter"
                        );
                        record.die(attempts, verdict, now);
                        t.put_record(plugin, id, &record)?;
                        Change::Dead
                    } else {
                        let previous = record.last_delay_ms.map(Duration::from_millis);
                        let backoff = policy.backoff(attempts, previous, &mut self.rng);
                        let wait = backoff.max(delay.unwrap_or_default());
                        let due_at_ms = now + wait.as_millis() as u64;
                        debug!(
                            plugin,
                            event_id = id,
                            attempt = attempts,
                            reason,
                            wait_ms = wait.as_millis() as u64,
                            "delivery will be retried"
                        );
                        record.attempts = attempts;
                        record.first_failure_ms = Some(first);
                        record.last_delay_ms = Some(backoff.as_millis() as u64);
                        record.due_at_ms = due_at_ms;
                        record.reason = Some(reason.clone());
                        t.put_record(plugin, id, &record)?;
                        retrying.extend(lane.clone());
                        Change::Retry(Failure {
                            attempts,
                            due_at_ms,
                        })
                    }
                }
            };
            changes.push((id, change));
        }
        Ok(Effect::Completed {
            plugin: plugin.to_owned(),
            changes,
        })
    }

    fn stage_prune_events(
        &self,
        t: &mut Tables,
        staged: &Staged,
        cutoff_ms: u64,
        after: Option<u64>,
    ) -> Result<Effect, LedgerError> {
        let start = after.map_or(0, |a| a + 1);
        let mut candidates = Vec::new();
        let mut resume = None;
        for (examined, row) in t.events.range(start..).ctx("scanning events")?.enumerate() {
            let (key, value) = row.ctx("reading an event")?;
            let id = key.value();
            // Ids follow arrival, so the first event young enough to keep ends the scan.
            if value.value().0 >= cutoff_ms {
                break;
            }
            candidates.push(id);
            if examined + 1 >= CHUNK {
                resume = Some(id);
                break;
            }
        }
        let victims: Vec<u64> = {
            let index = self.shared.index();
            candidates
                .into_iter()
                .filter(|id| !index.events.contains_key(id))
                .collect()
        };
        for id in &victims {
            t.events
                .remove(id)
                .with_ctx(|| format!("deleting event {id}"))?;
        }
        if !victims.is_empty() {
            // On open the next id is one past the last event; once the last event may be gone,
            // the counter must be on disk so that ids are never reused.
            t.meta
                .insert(NEXT_EVENT_ID, staged.next_id)
                .ctx("writing the next event id")?;
        }
        Ok(Effect::Chunk {
            count: victims.len() as u64,
            resume,
        })
    }

    /// Updates the in-memory index after a commit and turns each effect into its caller's answer.
    fn apply(&mut self, effects: Vec<Effect>) -> Vec<Answer> {
        let mut wake: Vec<String> = Vec::new();
        let mut index = self.shared.index();
        let answers = effects
            .into_iter()
            .map(|effect| match effect {
                Effect::Stored {
                    id,
                    lane,
                    received_at_ms,
                    plugins,
                } => {
                    for plugin in &plugins {
                        index.add_pending(plugin, id, lane.clone(), received_at_ms, None);
                    }
                    let deliveries = plugins.len();
                    wake.extend(plugins);
                    Answer::Appended(Appended::Stored { id, deliveries })
                }
                Effect::Duplicate { id } => Answer::Appended(Appended::Duplicate { id }),
                Effect::Completed { plugin, changes } => {
                    for (id, change) in changes {
                        match change {
                            Change::Done => index.mark_done(&plugin, id),
                            Change::Retry(failure) => index.mark_retry(&plugin, id, failure),
                            Change::Dead => index.mark_dead(&plugin, id),
                            Change::HeldBack => {
                                index.release(&plugin, &[id]);
                            }
                        }
                    }
                    wake.push(plugin);
                    Answer::Done
                }
                Effect::Revived(revived) => {
                    for (plugin, id) in &revived {
                        index.revive(plugin, *id);
                        wake.push(plugin.clone());
                    }
                    Answer::Count(revived.len() as u64)
                }
                Effect::Dropped(dropped) => {
                    for (plugin, id) in &dropped {
                        index.forget_dead(plugin, *id);
                    }
                    Answer::Count(dropped.len() as u64)
                }
                Effect::Added {
                    plugin,
                    events,
                    resume,
                } => {
                    let count = events.len() as u64;
                    for (id, lane, received_at_ms) in events {
                        index.add_pending(&plugin, id, lane, received_at_ms, None);
                    }
                    if count > 0 {
                        wake.push(plugin);
                    }
                    Answer::Chunk { count, resume }
                }
                Effect::Chunk { count, resume } => Answer::Chunk { count, resume },
                Effect::Nothing => Answer::Done,
            })
            .collect();
        self.shared
            .total_pending
            .store(index.undelivered, Ordering::Relaxed);
        drop(index);
        wake.sort_unstable();
        wake.dedup();
        for plugin in &wake {
            self.shared.notifier(plugin).notify_one();
        }
        answers
    }

    /// Keeps the figure backpressure compares with `max_file_bytes` current. Growth is taken at
    /// once; after prune has measured the space really in use, that lower figure stands until the
    /// file grows again.
    fn track_file_size(&mut self) {
        let Ok(len) = std::fs::metadata(&self.shared.opts.path).map(|m| m.len()) else {
            return;
        };
        if len > self.last_file_len || len < self.shared.file_bytes.load(Ordering::Relaxed) {
            self.shared.file_bytes.store(len, Ordering::Relaxed);
        }
        self.last_file_len = len;
    }
}

fn stage_append(
    t: &mut Tables,
    staged: &mut Staged,
    event: &NewEvent,
    plugins: &[String],
    window_ms: u64,
) -> Result<Effect, LedgerError> {
    let id = staged.next_id;
    if let Some(key) = event.dedupe_key.as_deref() {
        let seen = t
            .dedupe
            .get(key)
            .ctx("looking up a dedupe key")?
            .map(|v| v.value());
        if let Some((original, at_ms)) = seen {
            if event.received_at_ms.saturating_sub(at_ms) < window_ms {
                return Ok(Effect::Duplicate { id: original });
            }
            t.dedupe_by_time
                .remove((at_ms, key))
                .ctx("deleting an expired dedupe key")?;
        }
        t.dedupe
            .insert(key, (id, event.received_at_ms))
            .ctx("writing a dedupe key")?;
        t.dedupe_by_time
            .insert((event.received_at_ms, key), ())
            .ctx("writing a dedupe key")?;
    }
    staged.next_id += 1;
    t.events
        .insert(
            id,
            (
                event.received_at_ms,
                event.cluster.as_str(),
                event.event_type.as_str(),
                event.entity_kind.as_str(),
                event.entity_uuid.as_str(),
                event.body.as_str(),
            ),
        )
        .with_ctx(|| format!("writing event {id}"))?;
    let pending = DeliveryRecord::default().encode();
    for plugin in plugins {
        t.deliveries
            .insert((plugin.as_str(), id), pending.as_slice())
            .with_ctx(|| format!("writing the delivery of event {id} to `{plugin}`"))?;
    }
    Ok(Effect::Stored {
        id,
        lane: lane_key(&event.cluster, &event.entity_uuid, id),
        received_at_ms: event.received_at_ms,
        plugins: plugins.to_vec(),
    })
}

fn stage_replay_since(
    t: &mut Tables,
    plugin: &str,
    since_ms: u64,
    event_types: Option<&[String]>,
    after: Option<u64>,
) -> Result<Effect, LedgerError> {
    let start = after.map_or(0, |a| a + 1);
    let mut matching = Vec::new();
    let mut resume = None;
    for (examined, row) in t.events.range(start..).ctx("scanning events")?.enumerate() {
        let (key, value) = row.ctx("reading an event")?;
        let id = key.value();
        let (received_at_ms, cluster, event_type, _, entity_uuid, _) = value.value();
        let wanted = event_types.is_none_or(|types| types.iter().any(|t| t == event_type));
        if received_at_ms >= since_ms && wanted {
            matching.push((id, lane_key(cluster, entity_uuid, id), received_at_ms));
        }
        if examined + 1 >= CHUNK {
            resume = Some(id);
            break;
        }
    }
    let mut added = Vec::new();
    for (id, lane, received_at_ms) in matching {
        // Pending, in flight or dead already: nothing to replay.
        if t.record(plugin, id)?.is_none() {
            t.put_record(plugin, id, &DeliveryRecord::default())?;
            added.push((id, lane, received_at_ms));
        }
    }
    Ok(Effect::Added {
        plugin: plugin.to_owned(),
        events: added,
        resume,
    })
}

fn stage_prune_dedupe(t: &mut Tables, cutoff_ms: u64) -> Result<Effect, LedgerError> {
    let mut expired = Vec::new();
    for row in t
        .dedupe_by_time
        .range(..(cutoff_ms, ""))
        .ctx("scanning dedupe keys")?
    {
        let (key, _) = row.ctx("reading a dedupe key")?;
        let (at_ms, dedupe_key) = key.value();
        expired.push((at_ms, dedupe_key.to_owned()));
        if expired.len() >= CHUNK {
            break;
        }
    }
    for (at_ms, key) in &expired {
        t.dedupe_by_time
            .remove((*at_ms, key.as_str()))
            .ctx("deleting an expired dedupe key")?;
        // The key may have been stored again since; only its own entry goes.
        let current = t
            .dedupe
            .get(key.as_str())
            .ctx("reading a dedupe key")?
            .map(|v| v.value().1);
        if current == Some(*at_ms) {
            t.dedupe
                .remove(key.as_str())
                .ctx("deleting an expired dedupe key")?;
        }
    }
    let count = expired.len() as u64;
    Ok(Effect::Chunk {
        count,
        resume: (expired.len() >= CHUNK).then_some(0),
    })
}
