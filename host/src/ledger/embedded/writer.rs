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
//!
//! Each operation is a type of its own ([`Op`]) with its own effect and answer, so a caller gets
//! exactly the reply its request promises: a [`Job`] pairs an operation with its typed reply
//! channel, and the writer only ever sees jobs through the [`AnyJob`] trait.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use redb::{Durability, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::store::{
    delivered_key, encode_vm, DeliveryRecord, DeliveryState, Tables, NEXT_EVENT_ID,
};
use super::window::Window;
use super::{unavailable_because, Ctx, Shared};
use crate::clock::now_ms;
use crate::event::matches;
use crate::ledger::age::ByAge;
use crate::ledger::delivery::{plan_complete, Change, Planned, Standing};
use crate::ledger::index::{lane_key, Index, LaneKey};
use crate::ledger::{Appended, LedgerError, NewEvent, Outcome};

/// Most requests committed in one transaction.
pub(super) const MAX_GROUP: usize = 256;
/// Most events examined by one chunk of a replay or prune.
pub(super) const CHUNK: usize = 4096;

pub(super) type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

pub(super) enum Command {
    Run(Box<dyn AnyJob>),
    Close { reply: oneshot::Sender<()> },
}

/// What one operation may touch while its transaction is open.
pub(super) struct Stage<'a, 't> {
    pub shared: &'a Shared,
    pub txn: &'t WriteTransaction,
    pub tables: &'a mut Tables<'t>,
    /// Counters that become real only if the transaction commits.
    pub next_id: &'a mut u64,
    pub delivered: &'a mut BTreeMap<String, u64>,
    pub rng: &'a mut rand::rngs::ThreadRng,
    /// The dedupe window; what a transaction records in it is undone if it does not commit.
    pub window: &'a mut Window,
    pub now: u64,
}

/// What an operation's effect may change once its transaction has committed.
pub(super) struct Apply<'a> {
    pub shared: &'a Shared,
    pub index: &'a mut Index,
    /// Plugins to signal once the index lock is released.
    pub wake: &'a mut Vec<String>,
}

/// One kind of change to the ledger.
pub(super) trait Op: Send + 'static {
    /// What the transaction did, to be applied to memory once it committed.
    type Effect: Send + 'static;
    /// What the caller is told.
    type Answer: Send + 'static;
    /// Whether it may share a transaction with others (the hot-path operations).
    const GROUPABLE: bool = false;

    fn stage(&self, s: &mut Stage) -> Result<Self::Effect, LedgerError>;
    fn apply(effect: Self::Effect, a: &mut Apply) -> Self::Answer;
}

/// An operation with the channel its answer goes to.
pub(super) struct Job<O: Op> {
    op: O,
    reply: Reply<O::Answer>,
}

/// Where the caller waits for an operation's answer.
pub(super) type Answer<T> = oneshot::Receiver<Result<T, LedgerError>>;

/// Events a replay matched, as (event id, lane, received at), and where the
/// next chunk resumes.
/// The deliveries to add, where the next chunk starts, and when the first
/// event left out for want of room was received.
type ReplayMatches = (Vec<(u64, LaneKey, u64)>, Option<u64>, Option<u64>);

impl<O: Op> Job<O> {
    pub fn boxed(op: O) -> (Box<dyn AnyJob>, Answer<O::Answer>) {
        let (reply, answer) = oneshot::channel();
        (Box::new(Job { op, reply }), answer)
    }
}

/// A job whose changes are staged in the open transaction.
struct Staged<O: Op> {
    job: Job<O>,
    effect: O::Effect,
}

/// A job as the writer handles it, whatever its operation.
pub(super) trait AnyJob: Send {
    fn groupable(&self) -> bool;
    /// Stages the job's changes; on failure the job comes back with the error.
    #[allow(clippy::type_complexity)]
    fn stage(
        self: Box<Self>,
        s: &mut Stage,
    ) -> Result<Box<dyn StagedJob>, (Box<dyn AnyJob>, LedgerError)>;
    fn fail(self: Box<Self>, error: LedgerError);
}

/// A staged job: applied once its transaction commits, or abandoned (to be tried again alone)
/// when the transaction does not.
pub(super) trait StagedJob: Send {
    /// Applies the effect to memory and returns the answer to send, which is sent only once every
    /// job of the transaction is applied: a caller then reads figures (`stats`) that include it.
    fn apply(self: Box<Self>, a: &mut Apply) -> Box<dyn FnOnce() + Send>;
    fn abandon(self: Box<Self>) -> Box<dyn AnyJob>;
}

impl<O: Op> AnyJob for Job<O> {
    fn groupable(&self) -> bool {
        O::GROUPABLE
    }

    fn stage(
        self: Box<Self>,
        s: &mut Stage,
    ) -> Result<Box<dyn StagedJob>, (Box<dyn AnyJob>, LedgerError)> {
        match self.op.stage(s) {
            Ok(effect) => Ok(Box::new(Staged { job: *self, effect })),
            Err(error) => Err((self, error)),
        }
    }

    fn fail(self: Box<Self>, error: LedgerError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<O: Op> StagedJob for Staged<O> {
    fn apply(self: Box<Self>, a: &mut Apply) -> Box<dyn FnOnce() + Send> {
        let answer = O::apply(self.effect, a);
        let reply = self.job.reply;
        Box::new(move || {
            let _ = reply.send(Ok(answer));
        })
    }

    fn abandon(self: Box<Self>) -> Box<dyn AnyJob> {
        Box::new(self.job)
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    next_id: u64,
    window: Window,
    last_file_len: u64,
    rng: rand::rngs::ThreadRng,
}

impl Writer {
    pub fn new(shared: Arc<Shared>, next_id: u64, window: Window) -> Self {
        let last_file_len = shared.file_bytes.load(Ordering::Relaxed);
        Self {
            shared,
            next_id,
            window,
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
            let first = match command {
                Command::Close { reply } => {
                    let _ = reply.send(());
                    break;
                }
                Command::Run(job) => job,
            };
            let mut batch = vec![first];
            if batch[0].groupable() {
                while batch.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Command::Run(job)) if job.groupable() => batch.push(job),
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

    fn commit(&mut self, batch: Vec<Box<dyn AnyJob>>) {
        let size = batch.len();
        let result = self.transact(batch);
        match &result {
            Ok(_) => self.window.commit(),
            Err(_) => self.window.abort(),
        }
        match result {
            Ok(staged) => self.apply(staged),
            Err((jobs, error)) => match self.shared.failed_for_good(&error) {
                // One by one would fail alike.
                Some(why) => {
                    for job in jobs {
                        job.fail(unavailable_because(&why));
                    }
                }
                None if size > 1 => {
                    warn!(%error, requests = size, "group commit failed; retrying its requests one by one");
                    for job in jobs {
                        self.commit(vec![job]);
                    }
                }
                None => {
                    if let Some(job) = jobs.into_iter().next() {
                        job.fail(error);
                    }
                }
            },
        }
    }

    /// Stages `jobs` in one durable transaction and commits it. On failure every job comes back
    /// unanswered, with the error.
    #[allow(clippy::type_complexity)]
    fn transact(
        &mut self,
        jobs: Vec<Box<dyn AnyJob>>,
    ) -> Result<Vec<Box<dyn StagedJob>>, (Vec<Box<dyn AnyJob>>, LedgerError)> {
        let shared = self.shared.clone();
        if let Some(failed) = shared.unavailable() {
            return Err((jobs, failed));
        }
        let txn = match begin(&shared) {
            Ok(txn) => txn,
            Err(error) => return Err((jobs, error)),
        };
        let mut next_id = self.next_id;
        let mut delivered = BTreeMap::new();
        let staged = {
            let mut tables = match Tables::open(&txn) {
                Ok(tables) => tables,
                Err(error) => return Err((jobs, error)),
            };
            let mut stage = Stage {
                shared: &shared,
                txn: &txn,
                tables: &mut tables,
                next_id: &mut next_id,
                delivered: &mut delivered,
                rng: &mut self.rng,
                window: &mut self.window,
                now: now_ms(),
            };
            let mut staged: Vec<Box<dyn StagedJob>> = Vec::with_capacity(jobs.len());
            let mut jobs = jobs.into_iter();
            while let Some(job) = jobs.next() {
                match job.stage(&mut stage) {
                    Ok(done) => staged.push(done),
                    Err((failed, error)) => {
                        let mut back = abandon(staged);
                        back.push(failed);
                        back.extend(jobs);
                        return Err((back, error));
                    }
                }
            }
            if let Err(error) = write_delivered(stage.tables, stage.delivered) {
                return Err((abandon(staged), error));
            }
            staged
        };
        if let Err(error) = txn.commit().ctx("committing") {
            return Err((abandon(staged), error));
        }
        self.next_id = next_id;
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.track_file_size();
        Ok(staged)
    }

    /// Updates the in-memory index after a commit, wakes the plugins with new work, and answers
    /// each caller.
    fn apply(&mut self, staged: Vec<Box<dyn StagedJob>>) {
        let mut wake: Vec<String> = Vec::new();
        let mut index = self.shared.index();
        let mut apply = Apply {
            shared: &self.shared,
            index: &mut index,
            wake: &mut wake,
        };
        let answers: Vec<_> = staged
            .into_iter()
            .map(|job| job.apply(&mut apply))
            .collect();
        self.shared
            .total_pending
            .store(index.undelivered, Ordering::Relaxed);
        drop(index);
        // Wake before answering: a caller that waits for work right after its call returns
        // must find this transaction's signal already raised, not have it arrive mid-wait.
        wake.sort_unstable();
        wake.dedup();
        for plugin in &wake {
            self.shared.notifiers.wake(plugin);
        }
        for answer in answers {
            answer();
        }
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

fn abandon(staged: Vec<Box<dyn StagedJob>>) -> Vec<Box<dyn AnyJob>> {
    staged.into_iter().map(StagedJob::abandon).collect()
}

fn begin(shared: &Shared) -> Result<WriteTransaction, LedgerError> {
    let mut txn = shared
        .db
        .begin_write()
        .ctx("beginning a write transaction")?;
    txn.set_durability(Durability::Immediate)
        .ctx("asking for an immediate-durability commit")?;
    Ok(txn)
}

fn write_delivered(t: &mut Tables, delivered: &BTreeMap<String, u64>) -> Result<(), LedgerError> {
    for (plugin, done) in delivered {
        let key = delivered_key(plugin);
        let total = t
            .meta
            .get(key.as_str())
            .ctx("reading a delivered count")?
            .map_or(0, |v| v.value());
        t.meta
            .insert(key.as_str(), total + done)
            .ctx("writing a delivered count")?;
    }
    Ok(())
}

/// One chunk of a long operation: what it did, and where the next chunk starts (`None` = done):
/// after an event id, or after a (plugin, event id) for dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk<C = u64> {
    pub count: u64,
    pub resume: Option<C>,
}

/// Where the chunk after `read` starts: after its last row when it was a whole [`CHUNK`].
fn resume_after<C: Clone>(read: &[C]) -> Option<C> {
    (read.len() >= CHUNK)
        .then(|| read.last().cloned())
        .flatten()
}

/// An event to store. What can be worked out before the writer takes it (the decoded VM's
/// encoding, the lane) is, since every moment the writer spends per event delays a whole group.
pub(super) struct Append {
    event: NewEvent,
    vm: Option<Vec<u8>>,
    /// `None` for an event without an entity, whose lane is named by its id, not known yet.
    lane: Option<LaneKey>,
    plugins: Vec<String>,
}

impl Append {
    pub fn new(mut event: NewEvent, mut plugins: Vec<String>) -> Self {
        plugins.sort_unstable();
        plugins.dedup();
        let vm = event.vm.take().as_ref().map(encode_vm);
        let lane = (!event.entity_uuid.is_empty())
            .then(|| lane_key(&event.cluster, &event.entity_uuid, 0));
        Self {
            event,
            vm,
            lane,
            plugins,
        }
    }
}

pub(super) enum Appending {
    Stored {
        id: u64,
        lane: LaneKey,
        received_at_ms: u64,
        plugins: Vec<String>,
    },
    Duplicate {
        id: u64,
    },
}

impl Op for Append {
    type Effect = Appending;
    type Answer = Appended;
    const GROUPABLE: bool = true;

    fn stage(&self, s: &mut Stage) -> Result<Appending, LedgerError> {
        let window_ms = s.shared.opts.dedupe_window.as_millis() as u64;
        stage_append(s, self, window_ms)
    }

    fn apply(effect: Appending, a: &mut Apply) -> Appended {
        match effect {
            Appending::Stored {
                id,
                lane,
                received_at_ms,
                plugins,
            } => {
                for plugin in &plugins {
                    a.index
                        .add_pending(plugin, id, lane.clone(), received_at_ms, None);
                }
                let deliveries = plugins.len();
                a.wake.extend(plugins);
                Appended::Stored { id, deliveries }
            }
            Appending::Duplicate { id } => Appended::Duplicate { id },
        }
    }
}

pub(super) struct Complete {
    pub plugin: String,
    pub results: Vec<(u64, Outcome)>,
}

impl Op for Complete {
    type Effect = (String, Vec<(u64, Change)>);
    type Answer = ();
    const GROUPABLE: bool = true;

    fn stage(&self, s: &mut Stage) -> Result<Self::Effect, LedgerError> {
        let changes = stage_complete(s, &self.plugin, &self.results)?;
        Ok((self.plugin.clone(), changes))
    }

    fn apply((plugin, changes): Self::Effect, a: &mut Apply) {
        for (id, change) in changes {
            match change {
                Change::Done => a.index.mark_done(&plugin, id),
                Change::Retry(failure) => a.index.mark_retry(&plugin, id, failure),
                Change::Dead => a.index.mark_dead(&plugin, id),
                Change::HeldBack => {
                    a.index.release(&plugin, &[id]);
                }
            }
        }
        a.wake.push(plugin);
    }
}

/// Dead letters (of one plugin and/or some events) back to pending.
pub(super) struct ReplayDead {
    pub plugin: Option<String>,
    pub ids: Option<Vec<u64>>,
    /// The last letter of the chunk before.
    pub after: Option<(String, u64)>,
}

/// [`CHUNK`] letters at a time, so that a million of them do not hold up
/// the appends for one long transaction; each chunk starts after the last
/// letter of the one before, whether it was revived or not (its event gone,
/// its record not dead).
impl Op for ReplayDead {
    type Effect = (Vec<(String, u64)>, Option<(String, u64)>);
    type Answer = Chunk<(String, u64)>;

    fn stage(&self, s: &mut Stage) -> Result<Self::Effect, LedgerError> {
        let (targets, next) = {
            let index = s.shared.index();
            let targets = index.dead(
                self.plugin.as_deref(),
                self.ids.as_deref(),
                self.after.as_ref(),
                CHUNK,
            );
            let next = resume_after(&targets);
            // A letter whose event is gone has nothing to deliver: it stays
            // a letter, listed as unreadable, until dropped.
            let live: Vec<_> = targets
                .into_iter()
                .filter(|(_, id)| index.lane_of(*id).is_some())
                .collect();
            (live, next)
        };
        let mut revived = Vec::new();
        for (plugin, id) in targets {
            match s.tables.record(&plugin, id)? {
                Some(record) if record.state == DeliveryState::Dead => {
                    s.tables
                        .put_record(&plugin, id, &DeliveryRecord::default())?;
                    revived.push((plugin, id));
                }
                _ => {}
            }
        }
        Ok((revived, next))
    }

    fn apply((revived, resume): Self::Effect, a: &mut Apply) -> Chunk<(String, u64)> {
        for (plugin, id) in &revived {
            a.index.revive(plugin, *id);
            a.wake.push(plugin.clone());
        }
        Chunk {
            count: revived.len() as u64,
            resume,
        }
    }
}

/// Dead letters (of one plugin and/or some events) deleted.
pub(super) struct DropDead {
    pub plugin: Option<String>,
    pub ids: Option<Vec<u64>>,
    pub after: Option<(String, u64)>,
}

/// In chunks, as [`ReplayDead`].
impl Op for DropDead {
    type Effect = Vec<(String, u64)>;
    type Answer = Chunk<(String, u64)>;

    fn stage(&self, s: &mut Stage) -> Result<Self::Effect, LedgerError> {
        let targets = s.shared.index().dead(
            self.plugin.as_deref(),
            self.ids.as_deref(),
            self.after.as_ref(),
            CHUNK,
        );
        for (plugin, id) in &targets {
            s.tables.remove_record(plugin, *id)?;
        }
        Ok(targets)
    }

    fn apply(dropped: Self::Effect, a: &mut Apply) -> Chunk<(String, u64)> {
        for (plugin, id) in &dropped {
            a.index.forget_dead(plugin, *id);
        }
        Chunk {
            count: dropped.len() as u64,
            resume: resume_after(&dropped),
        }
    }
}

/// One chunk of `replay_since`.
pub(super) struct ReplaySince {
    pub plugin: String,
    pub since_ms: u64,
    pub subscriptions: Vec<String>,
    /// The most deliveries this chunk may add: the room left under the
    /// backlog limit.
    pub room: u64,
    pub after: Option<u64>,
}

impl Op for ReplaySince {
    type Effect = (String, ReplayMatches);
    type Answer = ReplayChunk;

    fn stage(&self, s: &mut Stage) -> Result<Self::Effect, LedgerError> {
        let matches = stage_replay_since(
            s.tables,
            &self.plugin,
            self.since_ms,
            &self.subscriptions,
            self.room,
            self.after,
        )?;
        Ok((self.plugin.clone(), matches))
    }

    fn apply((plugin, (events, resume, full_at)): Self::Effect, a: &mut Apply) -> ReplayChunk {
        let count = events.len() as u64;
        for (id, lane, received_at_ms) in events {
            a.index.add_pending(&plugin, id, lane, received_at_ms, None);
        }
        if count > 0 {
            a.wake.push(plugin);
        }
        ReplayChunk {
            chunk: Chunk { count, resume },
            full_at,
        }
    }
}

/// A chunk of `replay_since`, and when the first event it left out for
/// want of room was received.
pub(super) struct ReplayChunk {
    pub chunk: Chunk,
    pub full_at: Option<u64>,
}

/// One chunk of pruning delivered events past retention.
pub(super) struct PruneEvents {
    pub cutoff_ms: u64,
    pub after: Option<u64>,
}

impl Op for PruneEvents {
    type Effect = Chunk;
    type Answer = Chunk;

    fn stage(&self, s: &mut Stage) -> Result<Chunk, LedgerError> {
        stage_prune_events(s, self.cutoff_ms, self.after)
    }

    fn apply(chunk: Chunk, _: &mut Apply) -> Chunk {
        chunk
    }
}

/// One chunk of forgetting dedupe keys older than the window.
pub(super) struct PruneDedupe {
    pub cutoff_ms: u64,
}

impl Op for PruneDedupe {
    type Effect = Chunk;
    type Answer = Chunk;

    fn stage(&self, s: &mut Stage) -> Result<Chunk, LedgerError> {
        stage_prune_dedupe(s, self.cutoff_ms)
    }

    fn apply(chunk: Chunk, _: &mut Apply) -> Chunk {
        chunk
    }
}

/// Recomputes the bytes the file really uses (after prune freed pages inside it).
pub(super) struct MeasureFile;

impl Op for MeasureFile {
    type Effect = u64;
    type Answer = ();

    fn stage(&self, s: &mut Stage) -> Result<u64, LedgerError> {
        let stats = s.txn.stats().ctx("measuring the database")?;
        Ok(stats.allocated_pages() * stats.page_size() as u64)
    }

    fn apply(used: u64, a: &mut Apply) {
        debug!(used, "measured ledger file use");
        a.shared.file_bytes.store(used, Ordering::Relaxed);
    }
}

fn stage_append(s: &mut Stage, append: &Append, window_ms: u64) -> Result<Appending, LedgerError> {
    let Append {
        event,
        vm,
        lane,
        plugins,
    } = append;
    let t = &mut *s.tables;
    let id = *s.next_id;
    if let Some(key) = event.dedupe_key.as_deref() {
        if let Some(candidate) = s.window.candidate(key) {
            let stored = t
                .event_keys
                .get(candidate)
                .with_ctx(|| format!("reading the dedupe key of event {candidate}"))?;
            if let Some(stored) = stored {
                let (at_ms, stored_key) = stored.value();
                if stored_key == key && event.received_at_ms.saturating_sub(at_ms) < window_ms {
                    return Ok(Appending::Duplicate { id: candidate });
                }
            }
        }
        t.event_keys
            .insert(id, (event.received_at_ms, key))
            .with_ctx(|| format!("writing the dedupe key of event {id}"))?;
        s.window.insert(key, id);
    }
    *s.next_id += 1;
    t.events
        .insert(
            id,
            (
                event.received_at_ms,
                event.cluster.as_str(),
                event.event_type.as_str(),
                event.entity_kind.as_str(),
                event.entity_uuid.as_str(),
                vm.as_deref(),
                event.body.as_str(),
            ),
        )
        .with_ctx(|| format!("writing event {id}"))?;
    let pending = DeliveryRecord::PENDING;
    for plugin in plugins {
        t.deliveries
            .insert((plugin.as_str(), id), pending)
            .with_ctx(|| format!("writing the delivery of event {id} to `{plugin}`"))?;
    }
    Ok(Appending::Stored {
        id,
        lane: lane
            .clone()
            .unwrap_or_else(|| lane_key(&event.cluster, &event.entity_uuid, id)),
        received_at_ms: event.received_at_ms,
        plugins: plugins.to_vec(),
    })
}

fn stage_complete(
    s: &mut Stage,
    plugin: &str,
    results: &[(u64, Outcome)],
) -> Result<Vec<(u64, Change)>, LedgerError> {
    let standing: Vec<Standing> = {
        let index = s.shared.index();
        results
            .iter()
            .map(|(id, _)| (index.is_in_flight(plugin, *id), index.lane_of(*id)))
            .collect()
    };
    let policy = s.shared.opts.retry.clone();
    let planned = plan_complete(
        plugin,
        results,
        &standing,
        |id| s.tables.record(plugin, id),
        &policy,
        s.now,
        s.rng,
    )?;
    let t = &mut *s.tables;
    let mut changes = Vec::with_capacity(planned.len());
    for Planned { id, change, record } in planned {
        match (&change, record) {
            (Change::HeldBack, _) => {}
            (Change::Done, _) => {
                t.remove_record(plugin, id)?;
                *s.delivered.entry(plugin.to_owned()).or_default() += 1;
            }
            (_, Some(record)) => t.put_record(plugin, id, &record)?,
            (_, None) => unreachable!("a retry or a dead letter always has a record"),
        }
        changes.push((id, change));
    }
    Ok(changes)
}

fn stage_prune_events(
    s: &mut Stage,
    cutoff_ms: u64,
    after: Option<u64>,
) -> Result<Chunk, LedgerError> {
    let t = &mut *s.tables;
    let start = after.map_or(0, |a| a + 1);
    let mut candidates = Vec::new();
    let mut by_age = ByAge::new(s.now, cutoff_ms);
    let mut resume = None;
    for (examined, row) in t.events.range(start..).ctx("scanning events")?.enumerate() {
        let (key, value) = row.ctx("reading an event")?;
        let id = key.value();
        if !by_age.read_on(id, value.value().0, &mut candidates) {
            break;
        }
        if examined + 1 >= CHUNK {
            resume = Some(id);
            break;
        }
    }
    let victims: Vec<u64> = {
        let index = s.shared.index();
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
            .insert(NEXT_EVENT_ID, *s.next_id)
            .ctx("writing the next event id")?;
    }
    Ok(Chunk {
        count: victims.len() as u64,
        resume,
    })
}

fn stage_replay_since(
    t: &mut Tables,
    plugin: &str,
    since_ms: u64,
    subscriptions: &[String],
    room: u64,
    after: Option<u64>,
) -> Result<ReplayMatches, LedgerError> {
    let start = after.map_or(0, |a| a + 1);
    let mut matching = Vec::new();
    let mut resume = None;
    for (examined, row) in t.events.range(start..).ctx("scanning events")?.enumerate() {
        let (key, value) = row.ctx("reading an event")?;
        let id = key.value();
        let (received_at_ms, cluster, event_type, _, entity_uuid, _, _) = value.value();
        let wanted = subscriptions.iter().any(|s| matches(s, event_type));
        if received_at_ms >= since_ms && wanted {
            matching.push((id, lane_key(cluster, entity_uuid, id), received_at_ms));
        }
        if examined + 1 >= CHUNK {
            resume = Some(id);
            break;
        }
    }
    let mut added: Vec<(u64, LaneKey, u64)> = Vec::new();
    for (id, lane, received_at_ms) in matching {
        // Pending, in flight or dead already: nothing to replay.
        if t.record(plugin, id)?.is_some() {
            continue;
        }
        if added.len() as u64 >= room {
            return Ok((added, None, Some(received_at_ms)));
        }
        t.put_record(plugin, id, &DeliveryRecord::default())?;
        added.push((id, lane, received_at_ms));
    }
    Ok((added, resume, None))
}

fn stage_prune_dedupe(s: &mut Stage, cutoff_ms: u64) -> Result<Chunk, LedgerError> {
    // Keys are written in id order, so the first young enough to keep ends the scan.
    let mut expired = Vec::new();
    let mut by_age = ByAge::new(s.now, cutoff_ms);
    for row in s.tables.event_keys.iter().ctx("scanning dedupe keys")? {
        // Rows stamped ahead are read on past, however many: a chunk that
        // stopped among them would start at them again, and never reach
        // the old keys behind them.
        if expired.len() >= CHUNK {
            break;
        }
        let (id, value) = row.ctx("reading a dedupe key")?;
        if !by_age.read_on(id.value(), value.value().0, &mut expired) {
            break;
        }
    }
    let first_kept = by_age.first_kept();
    for id in &expired {
        s.tables
            .event_keys
            .remove(id)
            .with_ctx(|| format!("deleting the dedupe key of event {id}"))?;
    }
    let more = expired.len() >= CHUNK && first_kept.is_none();
    if !more {
        s.window.expire(first_kept.unwrap_or(*s.next_id));
    }
    Ok(Chunk {
        count: expired.len() as u64,
        resume: more.then_some(0),
    })
}
