//! The JetStream ledger: the same promises as the embedded one, kept in a NATS JetStream stream
//! that several hosts can share and that survives the loss of a minority of its nodes.
//!
//! - **Append** is one publish of the event (with the plugins it is for) and returns after
//!   JetStream's acknowledgement: the stream's leader has stored it and a quorum of its replicas
//!   has it (R3: two of three nodes). `Nats-Msg-Id` carries the dedupe key, so the same
//!   notification posted to several hosts is stored once by JetStream itself.
//! - **Outcomes**, replays and drops are small *marks*, one per delivery (see `wire`); the
//!   stream keeps only the latest mark of each delivery. The marks of one call (a completed
//!   batch, a replay) are stored together, as atomic batches (`batch`), as redb commits them in
//!   one transaction.
//! - **Memory**: every handle folds the stream into the index the embedded ledger uses (`fold`):
//!   first everything retained, on open, then whatever anyone publishes. A call that changed
//!   something returns once its own change has been folded in, so a claim after an append or a
//!   complete sees it, as with redb. Claiming works from that index; event bodies come from a
//!   cache of recent events, else from the stream by sequence (direct get).
//! - **Failure**: a publish JetStream does not acknowledge is
//!   [`LedgerError::Unavailable`] (the listener answers 503 with `Retry-After`); a stream at its
//!   byte limit refuses new messages, which is [`LedgerError::Backpressure`].
//!
//! - **Several hosts** share one stream: each claims from the partitions it holds by lease (see
//!   `lease`), so each entity's events go to one host at a time, in order, and a host's death
//!   moves its partitions to the others. An outcome names the delivery's mark it replaces, so a
//!   host whose lease ran out mid-call cannot overwrite what the next holder recorded.
//!
//! What differs from redb: `delivered` counts the done deliveries the stream still holds plus
//! those done since the handle opened (pruned events take their marks with them), and a dedupe
//! key is forgotten by time alone (JetStream's duplicate window), not by `prune`.

mod batch;
mod fold;
mod follow;
pub mod kv;
mod lease;
mod wire;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use fold::State;
use lease::Leases;
use wire::{EventRecord, Mark, Subjects, RECEIVED};

use crate::clock::now_ms;
use crate::config::NatsSignIn;
use crate::event::matches;
use crate::ledger::age::ByAge;
use crate::ledger::delivery::{
    plan_complete, sort_reads, Change, DeliveryRecord, EventRead, Planned, Standing,
};
use crate::ledger::index::lane_key;
use crate::ledger::partition::partition_of;
use crate::ledger::wake::{instant_of, Notifiers};
use crate::ledger::{
    Appended, BackendError, DeadLetter, DeadLetterCursor, Delivery, Ledger, LedgerError,
    LedgerStats, Membership, NewEvent, Outcome, PartitionSet, PluginBacklog, Resource, RetryPolicy,
    StoredEvent, Wake,
};

/// Where the stream is and the limits the ledger keeps.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// `nats://host:port` (or `tls://`) URLs of any nodes of the cluster.
    pub servers: Vec<String>,
    /// The stream's name; its subjects are the name in lower case, then `.>`.
    pub stream: String,
    /// Copies of every message; `None` = 3 when the cluster has three or more nodes, else 1.
    pub replicas: Option<usize>,
    /// How to sign in; its secrets are never logged.
    pub auth: NatsSignIn,
    /// A CA bundle (PEM) to verify the servers with; setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// The name this host shows in the server's connection list, and holds its leases by:
    /// every host sharing the stream needs its own.
    pub client_name: String,
    /// How long a publish waits for JetStream's acknowledgement.
    pub ack_timeout: Duration,
    pub dedupe_window: Duration,
    /// As in the embedded ledger: undelivered deliveries before appends are refused; 0 = none.
    pub max_backlog: u64,
    /// The stream's byte limit; 0 = none.
    pub max_bytes: u64,
    pub retention: Duration,
    pub retry: RetryPolicy,
    /// Recent events kept in memory so that claiming them costs no round trip; 0 = none.
    pub cache_events: usize,
}

impl JetStreamOptions {
    /// The defaults of [`super::LedgerOptions::new`], on the stream `PRISMHOOK`.
    pub fn new(servers: Vec<String>) -> Self {
        let redb = super::LedgerOptions::new("");
        Self {
            servers,
            stream: "PRISMHOOK".into(),
            replicas: None,
            auth: NatsSignIn::None,
            tls_ca: None,
            client_name: "prismhook".into(),
            ack_timeout: Duration::from_secs(5),
            dedupe_window: redb.dedupe_window,
            max_backlog: redb.max_backlog,
            max_bytes: 0,
            retention: redb.retention,
            retry: redb.retry,
            cache_events: 16_384,
        }
    }
}

/// How long opening waits for a cluster that does not answer yet.
const OPEN_PATIENCE: Duration = Duration::from_secs(30);

/// How long a write waits for the fold to show it before it returns all the same.
const SEEN_SOON: Duration = Duration::from_secs(1);

/// How long a reconcile waits for the other hosts to finish their deliveries and pause.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// How long a sender is asked to wait when the stream cannot be reached.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

fn unavailable(context: impl Into<String>, source: impl Into<BackendError>) -> LedgerError {
    LedgerError::Unavailable {
        context: context.into(),
        retry_after: UNAVAILABLE_RETRY_AFTER,
        source: source.into(),
    }
}

/// Tries `attempt` again while it finds the cluster unavailable, for up to [`OPEN_PATIENCE`]: a
/// cluster that has just started, or just lost a node, may still be electing the leaders of its
/// streams, and a host starting then must wait for them rather than fail.
async fn patiently<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LedgerError>>,
{
    let deadline = Instant::now() + OPEN_PATIENCE;
    loop {
        match attempt().await {
            Err(error @ LedgerError::Unavailable { .. }) if Instant::now() < deadline => {
                warn!(%error, "{what}: not available yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

struct Inner {
    opts: JetStreamOptions,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    subjects: Subjects,
    state: Mutex<State>,
    /// The highest sequence folded in, for calls waiting to see their own change.
    applied: watch::Sender<u64>,
    notifiers: Notifiers,
    /// Starts the followers of streams again (after a reconnect, or a stall).
    restarts: Arc<follow::Restarts>,
    /// The plugins' kv mirror and its stream, once [`JetStreamLedger::plugin_kv`] made them.
    kv: OnceLock<(Arc<kv::Mirror>, stream::Stream)>,
    replicas: usize,
    /// Mirrors `state.index.undelivered`, so backpressure checks take no lock.
    undelivered: AtomicU64,
    commits: AtomicU64,
    bytes: AtomicU64,
    closed: AtomicBool,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("ledger state lock poisoned")
    }

    fn ensure_open(&self) -> Result<(), LedgerError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LedgerError::Closed);
        }
        Ok(())
    }
}

/// A mark to store for one delivery; `expect`: the sequence its subject must be at (see
/// [`Inner::mark`]).
struct Marking {
    id: u64,
    plugin: String,
    mark: Mark,
    expect: Option<u64>,
}

impl Marking {
    /// An operator's mark (a replay, a drop): stored whatever the delivery's latest mark is.
    fn unfenced(id: u64, plugin: String, mark: Mark) -> Marking {
        Marking {
            id,
            plugin,
            mark,
            expect: None,
        }
    }
}

impl follow::Fold for Inner {
    fn applied(&self) -> u64 {
        self.state().applied
    }

    /// Folds in one message from the stream and wakes whoever it concerns.
    fn fold(&self, seq: u64, subject: &str, _: Option<&HeaderMap>, payload: &[u8]) {
        let wake = {
            let mut state = self.state();
            let wake = state.apply(&self.subjects, seq, subject, payload);
            self.undelivered
                .store(state.index.undelivered, Ordering::Relaxed);
            wake
        };
        // Woken before the sequence is published: a caller waiting for its own change must not
        // return ahead of the signal that change raises.
        for plugin in wake {
            self.notifiers.wake(&plugin);
        }
        self.applied.send_replace(seq);
    }
}

/// How long asking a stream where its end is may take at least: a round trip to a server far
/// away, short of a lease's renewal period.
const STREAM_INFO_PATIENCE: Duration = Duration::from_millis(750);

impl Inner {
    /// Publishes one message and waits for JetStream to acknowledge it.
    async fn publish(
        &self,
        subject: String,
        message: PublishMessage,
        context: impl FnOnce() -> String,
    ) -> Result<jetstream::publish::PublishAck, LedgerError> {
        // While disconnected the client would buffer the message and send it on reconnect:
        // refused now, it is not stored behind the sender's back later (but for a publish
        // caught in the very moment of the loss, which the dedupe key then collapses).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unavailable(context(), "not connected to any NATS server"));
        }
        let ack = async {
            let pending = self.js.send_publish(subject, message).await?;
            pending.await
        };
        let ack = ack.await.map_err(|error| publish_error(context(), error))?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(ack)
    }

    /// Publishes marks, and waits (a moment) until every one is folded in here. They are stored
    /// in atomic batches, in the order of their events, one batch after the other: what a failure
    /// or a kill leaves stored is all of them, or the marks of the older events, never a later
    /// event's mark without an earlier one's (which would send the earlier event again, alone,
    /// after the later one).
    ///
    /// A mark with `expect` is stored only while its delivery's latest mark is still the one
    /// this host's fold knew (`Nats-Expected-Last-Subject-Sequence`), else its whole batch is
    /// refused as [`LedgerError::Superseded`]. That fences off a host whose lease ran out while
    /// it delivered: the host that took the partition over may have delivered the same events,
    /// and later ones, and marked them done, and a late "retry" from the first host would send
    /// an old event again, alone, after the newer ones.
    async fn mark(&self, mut marks: Vec<Marking>) -> Result<(), LedgerError> {
        marks.sort_by_key(|m| m.id);
        let mut last = 0;
        let mut marks = marks.into_iter().peekable();
        while marks.peek().is_some() {
            let chunk: Vec<_> = marks.by_ref().take(batch::BATCH_MAX).collect();
            let (first, count) = (chunk[0].id, chunk.len());
            let messages = chunk
                .into_iter()
                .map(|m| {
                    let mut headers = HeaderMap::new();
                    if let Some(expect) = m.expect {
                        headers.insert(
                            "Nats-Expected-Last-Subject-Sequence",
                            expect.to_string().as_str(),
                        );
                    }
                    batch::Message {
                        subject: self.subjects.delivery(m.id, &m.plugin),
                        headers,
                        payload: serde_json::to_vec(&m.mark)
                            .expect("a mark always serializes")
                            .into(),
                    }
                })
                .collect();
            let context = || format!("recording {count} deliveries from event {first} on");
            let stored = batch::publish(&self.client, &self.js, self.opts.ack_timeout, messages);
            last = match stored.await {
                Ok(last) => last,
                Err(e) if e.superseded() => {
                    // Whatever the other host recorded is what this host claims from next:
                    // given a moment to arrive, it is not delivered again from here meanwhile.
                    let _ = self.caught_up(SEEN_SOON).await;
                    return Err(LedgerError::Superseded { context: context() });
                }
                Err(e) => {
                    let full = e.stream_full();
                    return Err(full_or_unavailable(context(), full, e));
                }
            };
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        self.seen_soon(last).await
    }

    /// The streams this handle follows, each with how far its follower has got: the ledger's,
    /// and the plugins' kv once [`JetStreamLedger::plugin_kv`] opened it.
    fn followed(&self) -> Vec<(&'static str, &stream::Stream, &watch::Sender<u64>)> {
        let mut followed = vec![("ledger", &self.stream, &self.applied)];
        if let Some((mirror, stream)) = self.kv.get() {
            followed.push(("plugin kv", stream, mirror.progress()));
        }
        followed
    }

    /// Waits, up to `limit` each, until every follower has reached the end of its stream as it
    /// is now. Asking a stream where its end is takes up to `limit` too, and at least
    /// [`STREAM_INFO_PATIENCE`] (a server far away): a stream electing a leader answers no one
    /// meanwhile, and the lease task, which must renew every second, asks.
    async fn caught_up(&self, limit: Duration) -> Result<(), LedgerError> {
        for (what, stream, applied) in self.followed() {
            let context = || format!("reading the {what} stream's state");
            let patience = limit.max(STREAM_INFO_PATIENCE);
            let info = tokio::time::timeout(patience, stream.get_info())
                .await
                .map_err(|_| unavailable(context(), "no answer in time"))?
                .map_err(|e| unavailable(context(), e))?;
            let last = info.state.last_sequence;
            if !follow::reached(what, applied, last, &self.restarts, Some(limit)).await {
                return Err(unavailable(
                    format!("catching up with the {what} stream"),
                    "its follower is behind",
                ));
            }
        }
        Ok(())
    }

    /// Waits a moment for the fold to reach a change this host just had acknowledged, so that
    /// what it does next (a claim) sees it. The change is durable already: a fold that lags
    /// (restarting after its server died) does not turn it into a failure.
    async fn seen_soon(&self, seq: u64) -> Result<(), LedgerError> {
        match tokio::time::timeout(SEEN_SOON, self.folded(seq)).await {
            Ok(folded) => folded,
            Err(_) => {
                debug!(seq, "stored; the fold has not reached it yet");
                Ok(())
            }
        }
    }

    /// Waits until the fold has reached `seq`.
    async fn folded(&self, seq: u64) -> Result<(), LedgerError> {
        if follow::reached("ledger", &self.applied, seq, &self.restarts, None).await {
            Ok(())
        } else {
            Err(LedgerError::Closed)
        }
    }

    /// The stored events of these ids: from the cache, else from the stream.
    /// Each event read, or why it cannot be.
    async fn read_events(&self, ids: &[u64]) -> Vec<EventRead> {
        let cached: Vec<Option<StoredEvent>> = {
            let state = self.state();
            ids.iter().map(|&id| state.cached(id)).collect()
        };
        let reads = ids.iter().zip(cached).map(|(&id, cached)| async move {
            match cached {
                Some(event) => Ok(event),
                None => self.read_event(id).await,
            }
        });
        join_all(reads).await
    }

    async fn read_event(&self, id: u64) -> Result<StoredEvent, LedgerError> {
        let message = self
            .stream
            .direct_get(id)
            .await
            .map_err(|e| match e.kind() {
                // Pruned while a replay marked it again: its delivery has nothing to deliver.
                DirectGetErrorKind::NotFound => LedgerError::missing_event(id),
                _ => unavailable(format!("reading event {id}"), e),
            })?;
        let record: EventRecord =
            serde_json::from_slice(&message.payload).map_err(|e| LedgerError::Corrupt {
                what: format!("event {id}"),
                detail: e.to_string(),
            })?;
        Ok(record.stored(id).0)
    }

    /// Reads every retained event in order (headers only, or whole), until `visit` says stop.
    async fn scan_events(
        &self,
        headers_only: bool,
        mut visit: impl FnMut(u64, &HeaderMap, &[u8]) -> bool,
    ) -> Result<(), LedgerError> {
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects.events(),
                headers_only,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("starting a scan of the events", e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("scanning the events", e))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| unavailable("scanning the events", e))?;
            let info = message
                .info()
                .map_err(|e| unavailable("reading a scanned event's position", e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let empty = HeaderMap::new();
            let headers = message.headers.as_ref().unwrap_or(&empty);
            if !visit(seq, headers, &message.payload) || pending == 0 {
                break;
            }
        }
        Ok(())
    }

    async fn refresh_bytes(&self) -> Result<(), LedgerError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| unavailable("reading the stream's state", e))?;
        self.bytes.store(info.state.bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// Notices a follower that stopped while nobody waits for it (no write of this host's, only
/// other hosts' that it misses): its stream moved on between two looks, and it did not.
#[derive(Debug, Default)]
struct Watchdog {
    /// Where each follower stood at the last look, by name.
    last: HashMap<&'static str, u64>,
}

impl Watchdog {
    const EVERY: Duration = Duration::from_secs(3);

    /// Looks every few seconds until aborted.
    async fn run(mut self, inner: Arc<Inner>) {
        loop {
            tokio::time::sleep(Self::EVERY).await;
            self.look(&inner).await;
        }
    }

    async fn look(&mut self, inner: &Inner) {
        for (what, stream, applied) in inner.followed() {
            let at = *applied.borrow();
            if let Ok(info) = stream.get_info().await {
                let last = info.state.last_sequence;
                if last > at && self.last.get(what) == Some(&at) {
                    inner.restarts.stalled(what, last);
                }
            }
            self.last.insert(what, at);
        }
    }
}

/// Stops the fold and the leases' renewal when the last handle goes.
struct Tail(Mutex<Vec<JoinHandle<()>>>);

impl Tail {
    fn stop(&self) {
        if let Ok(mut tasks) = self.0.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The JetStream ledger. Cheap to clone; clones share one connection and one fold.
#[derive(Clone)]
pub struct JetStreamLedger {
    tail: Arc<Tail>,
    inner: Arc<Inner>,
    leases: Arc<Leases>,
}

impl fmt::Debug for JetStreamLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamLedger")
            .field("servers", &self.inner.opts.servers)
            .field("stream", &self.inner.opts.stream)
            .finish_non_exhaustive()
    }
}

impl JetStreamLedger {
    /// Connects, creates the stream if it is missing (or brings its settings in line), and folds
    /// everything it retains before returning.
    pub async fn open(opts: JetStreamOptions) -> Result<JetStreamLedger, LedgerError> {
        let restarts = Arc::new(follow::Restarts::default());
        let client = connect(&opts, restarts.clone()).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.ack_timeout);
        let replicas = opts.replicas.unwrap_or_else(|| {
            // Every node of a cluster advertises the others' client URLs.
            if client.server_info().connect_urls.len() >= 3 {
                3
            } else {
                1
            }
        });
        let subjects = Subjects::new(&opts.stream.to_lowercase());
        let config = stream::Config {
            name: opts.stream.clone(),
            description: Some("prismhook's ledger: notifications and their deliveries".into()),
            subjects: vec![subjects.all()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_messages_per_subject: 1,
            max_bytes: if opts.max_bytes == 0 {
                -1
            } else {
                opts.max_bytes as i64
            },
            discard: stream::DiscardPolicy::New,
            duplicate_window: opts.dedupe_window,
            allow_direct: true,
            // The marks of one completed batch land together (`Inner::mark`).
            allow_atomic_publish: true,
            ..Default::default()
        };
        let (info, stream) = ensure_stream(&js, config).await?;

        // Nothing is claimed before this host holds partitions by lease.
        let mut state = State::new(opts.cache_events);
        state.index.held = PartitionSet::NONE;
        let inner = Arc::new(Inner {
            bytes: AtomicU64::new(info.state.bytes),
            client,
            js,
            stream,
            subjects,
            state: Mutex::new(state),
            applied: watch::channel(0).0,
            notifiers: Notifiers::default(),
            restarts,
            kv: OnceLock::new(),
            replicas,
            undelivered: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            opts,
        });
        let (ready_tx, ready) = oneshot::channel();
        let fold = tokio::spawn(follow::follow(
            "ledger",
            inner.stream.clone(),
            inner.subjects.all(),
            inner.clone(),
            inner.restarts.subscribe(),
            ready_tx,
        ));
        let tail_tasks = Arc::new(Tail(Mutex::new(vec![fold])));
        ready.await.map_err(|_| LedgerError::Closed)?;
        // With the fold caught up, the first round of leases: a host alone (or the first of
        // several) serves its partitions before `open` returns.
        let (leases, renewal) = Leases::join(&inner, replicas).await?;
        let watchdog = tokio::spawn(Watchdog::default().run(inner.clone()));
        tail_tasks
            .0
            .lock()
            .expect("tail lock")
            .extend([renewal, watchdog]);
        let ledger = JetStreamLedger {
            tail: tail_tasks,
            inner,
            leases,
        };
        let state = ledger.inner.state();
        info!(
            stream = %ledger.inner.opts.stream,
            replicas,
            messages = info.state.messages,
            undelivered = state.index.undelivered,
            events = state.index.events.len(),
            serving = state.index.held.len(),
            "ledger open (JetStream)"
        );
        drop(state);
        Ok(ledger)
    }

    /// The plugins' kv, shared by every host of this stream: creates its stream if missing and
    /// mirrors it here before returning. Call it once.
    pub async fn plugin_kv(&self) -> Result<kv::JetStreamKv, LedgerError> {
        let inner = &self.inner;
        let (config, root) = kv::stream_config(&inner.opts.stream, inner.replicas);
        let filter = config.subjects[0].clone();
        let (_, stream) = ensure_stream(&inner.js, config).await?;
        let mirror = kv::JetStreamKv::mirror(root, inner.restarts.clone());
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(follow::follow(
            "plugin kv",
            stream.clone(),
            filter,
            mirror.clone(),
            inner.restarts.subscribe(),
            ready_tx,
        ));
        self.tail.0.lock().expect("tail lock").push(task);
        ready.await.map_err(|_| LedgerError::Closed)?;
        if inner.kv.set((mirror.clone(), stream.clone())).is_err() {
            warn!("the plugins' kv was opened twice; the second one is not waited for on takeover");
        }
        Ok(kv::JetStreamKv {
            mirror,
            stream,
            written: AtomicU64::new(0),
            unsure: AtomicBool::new(false),
            client: inner.client.clone(),
            js: inner.js.clone(),
            ack_timeout: inner.opts.ack_timeout,
            handle: tokio::runtime::Handle::current(),
        })
    }

    fn check_backlog(&self) -> Result<(), LedgerError> {
        let limit = self.inner.opts.max_backlog;
        let pending = self.inner.undelivered.load(Ordering::Relaxed);
        if limit > 0 && pending >= limit {
            return Err(LedgerError::Backpressure {
                resource: Resource::Backlog,
                current: pending,
                limit,
                retry_after: Duration::from_secs(5),
            });
        }
        Ok(())
    }

    /// Whether a notification JetStream calls a duplicate of event `original` is one by the
    /// ledger's rule: received within the window of the original, while the original is itself
    /// within the window of now. When the original cannot be read (another host stored it a
    /// moment ago and the replica asked has not got it yet), JetStream's word stands.
    async fn is_duplicate(&self, original: u64, received_at_ms: u64) -> bool {
        let window = self.inner.opts.dedupe_window.as_millis() as u64;
        // The original may come from another host: this fold reaches it first.
        let _ =
            tokio::time::timeout(self.inner.opts.ack_timeout, self.inner.folded(original)).await;
        let known = self
            .inner
            .state()
            .index
            .events
            .get(&original)
            .map(|e| e.received_at_ms);
        let received = match known {
            Some(at) => at,
            None => match self.inner.read_event(original).await {
                Ok(e) => e.received_at_ms,
                Err(_) => return true,
            },
        };
        received_at_ms.abs_diff(received) < window && now_ms().saturating_sub(received) < window
    }
}

/// What `complete` reads of each delivery: its record so far, its event's lane and time.
type Known = HashMap<u64, (DeliveryRecord, String, u64)>;

/// Creates the stream, or brings its settings in line, and opens it; patiently, as several hosts
/// starting on a new cluster race to do it while its leaders are still being elected.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<(stream::Info, stream::Stream), LedgerError> {
    let what = format!("creating or updating the stream `{}`", config.name);
    patiently(&what, || async {
        let info = js
            .create_or_update_stream(config.clone())
            .await
            .map_err(|e| unavailable(what.clone(), e))?;
        let stream = js
            .get_stream(&config.name)
            .await
            .map_err(|e| unavailable(format!("opening the stream `{}`", config.name), e))?;
        Ok((info, stream))
    })
    .await
}

async fn connect(
    opts: &JetStreamOptions,
    restarts: Arc<follow::Restarts>,
) -> Result<async_nats::Client, LedgerError> {
    // Only a connection that follows a loss is a reconnect: the first one is not.
    let lost = Arc::new(AtomicBool::new(false));
    let mut connect = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let (restarts, lost) = (restarts.clone(), lost.clone());
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if lost.swap(false, Ordering::AcqRel) {
                            info!("reconnected to NATS");
                            restarts.restart();
                        }
                    }
                    async_nats::Event::Disconnected => {
                        lost.store(true, Ordering::Release);
                        warn!("disconnected from NATS");
                    }
                    other => debug!(event = %other, "NATS connection event"),
                }
            }
        })
        .name(&opts.client_name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(opts.ack_timeout));
    connect = match &opts.auth {
        NatsSignIn::None => connect,
        NatsSignIn::UserPassword { user, password } => {
            connect.user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsSignIn::Token(token) => connect.token(token.expose().to_owned()),
        NatsSignIn::Credentials(path) => {
            connect
                .credentials_file(path)
                .await
                .map_err(|source| LedgerError::Io {
                    context: format!("reading the NATS credentials file {}", path.display()),
                    source,
                })?
        }
    };
    if let Some(ca) = &opts.tls_ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    let servers = opts.servers.join(",");
    connect
        .connect(opts.servers.as_slice())
        .await
        .map_err(|e| unavailable(format!("connecting to NATS at {servers}"), e))
}

fn publish_error(context: String, error: jetstream::context::PublishError) -> LedgerError {
    let full = batch::api_error(&error)
        .is_some_and(|(code, description)| batch::stream_full(code, &description));
    full_or_unavailable(context, full, error)
}

/// JetStream refuses new messages on a full stream (`batch::stream_full`): the stream is at
/// the limit the operator set, which is backpressure. Anything else means the stream cannot be
/// reached now.
fn full_or_unavailable(
    context: String,
    full: bool,
    error: impl Into<BackendError> + fmt::Display,
) -> LedgerError {
    if full {
        return LedgerError::Backpressure {
            resource: Resource::Storage,
            current: 0,
            limit: 0,
            retry_after: Duration::from_secs(30),
        };
    }
    unavailable(context, error)
}

/// A dedupe key as the `Nats-Msg-Id` header that carries it: as it is when a header can carry
/// it, else its hash. A line break in a header value would panic the client, and the key is
/// the caller's text.
fn msg_id(key: String) -> String {
    const MAX: usize = 256;
    if key.len() <= MAX && key.bytes().all(|b| b.is_ascii_graphic()) {
        return key;
    }
    use sha2::{Digest, Sha256};
    format!("sha256:{}", kv::hex(&Sha256::digest(key.as_bytes())))
}

#[async_trait]
impl Ledger for JetStreamLedger {
    async fn append(
        &self,
        event: NewEvent,
        mut plugins: Vec<String>,
    ) -> Result<Appended, LedgerError> {
        self.inner.ensure_open()?;
        self.check_backlog()?;
        plugins.sort_unstable();
        plugins.dedup();
        let deliveries = plugins.len();
        let (dedupe_key, received_at_ms) = (event.dedupe_key.map(msg_id), event.received_at_ms);
        // The event moves into the record: its body is not copied on the way.
        let record = EventRecord {
            cluster: event.cluster,
            event_type: event.event_type,
            entity_kind: event.entity_kind,
            entity_uuid: event.entity_uuid,
            received_at_ms,
            body: event.body,
            vm: event.vm,
            plugins,
        };
        let payload: bytes::Bytes = serde_json::to_vec(&record)
            .expect("an event record always serializes")
            .into();
        // Sent, it would be refused by the client (over `max_payload`), and again each time the
        // sender retried: the sender is told now, and the operator what to raise.
        let limit = batch::payload_room(&self.inner.client);
        if payload.len() > limit {
            return Err(LedgerError::TooLarge {
                bytes: payload.len(),
                limit,
                what: "one message of the NATS servers carries (their max_payload, less room for \
                       headers)",
            });
        }
        let message = |msg_id: Option<String>| {
            let m = PublishMessage::build()
                .payload(payload.clone())
                .header(RECEIVED, received_at_ms.to_string());
            match msg_id {
                Some(id) => m.message_id(id),
                None => m,
            }
        };
        let context = || {
            format!(
                "storing a {} event of {}",
                record.event_type, record.cluster
            )
        };
        let mut ack = self
            .inner
            .publish(
                self.inner.subjects.new_event(),
                message(dedupe_key.clone()),
                context,
            )
            .await?;
        if ack.duplicate {
            if self.is_duplicate(ack.sequence, received_at_ms).await {
                return Ok(Appended::Duplicate { id: ack.sequence });
            }
            // JetStream still remembers the key, but the ledger's window has passed: a new
            // notification, under a key of its own.
            let key = dedupe_key.map(|k| format!("{k}@{received_at_ms}"));
            ack = self
                .inner
                .publish(self.inner.subjects.new_event(), message(key), context)
                .await?;
            if ack.duplicate {
                return Ok(Appended::Duplicate { id: ack.sequence });
            }
        }
        self.inner.seen_soon(ack.sequence).await?;
        Ok(Appended::Stored {
            id: ack.sequence,
            deliveries,
        })
    }

    async fn claim(&self, plugin: &str, max: usize) -> Result<Vec<Delivery>, LedgerError> {
        self.inner.ensure_open()?;
        let claimable = self.leases.claimable();
        let claimed = self
            .inner
            .state()
            .index
            .claim_within(plugin, now_ms(), max, claimable);
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // If this future is dropped while the events are read, the claim must not stay in flight.
        let mut guard = Unclaim {
            inner: &self.inner,
            plugin,
            ids: claimed.iter().map(|&(id, _)| id).collect(),
        };
        let reads = self.inner.read_events(&guard.ids).await;
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
        self.inner.ensure_open()?;
        if results.is_empty() {
            return Ok(());
        }
        // Where each delivery stands, its record so far, its event's lane and time, and its
        // latest mark. While a delivery is in flight here, this host's fold has folded no mark
        // of it since the claim (any mark lands it): a newer one is another host's.
        let (standing, mut known, fences): (Vec<Standing>, Known, HashMap<u64, u64>) = {
            let state = self.inner.state();
            let index = &state.index;
            let standing = results
                .iter()
                .map(|(id, _)| (index.is_in_flight(plugin, *id), index.lane_of(*id)))
                .collect();
            let fences = results
                .iter()
                .map(|(id, _)| (*id, state.last_mark(plugin, *id)))
                .collect();
            let known = results
                .iter()
                .filter_map(|(id, _)| {
                    let event = index.events.get(id)?;
                    let record = state
                        .records
                        .get(&(plugin.to_owned(), *id))
                        .cloned()
                        .unwrap_or_default();
                    Some((*id, (record, event.lane.to_string(), event.received_at_ms)))
                })
                .collect();
            (standing, known, fences)
        };
        // A delivery nobody has marked yet has no mark to fence on: a host whose lease lapsed
        // while it delivered (cut off from NATS, paused) could mark it after the host that took
        // the partition over claimed it again with the VM's later events, and put the VM's
        // events out of order. Outcomes are stored only while this host holds their partitions.
        let claimable = self.leases.claimable();
        let lapsed = standing
            .iter()
            .filter(|(in_flight, lane)| {
                *in_flight
                    && lane
                        .as_ref()
                        .is_some_and(|l| !claimable.contains(partition_of(l)))
            })
            .count();
        if lapsed > 0 {
            return Err(LedgerError::Superseded {
                context: format!(
                    "the outcomes of {lapsed} deliveries in partitions whose lease this host no \
                     longer holds"
                ),
            });
        }
        let record_of = |id: u64| Ok(known.get(&id).map(|(record, ..)| record.clone()));
        let planned = plan_complete(
            plugin,
            &results,
            &standing,
            record_of,
            &self.inner.opts.retry,
            now_ms(),
            &mut rand::rng(),
        )?;
        let mut held = Vec::new();
        let mut marks = Vec::with_capacity(planned.len());
        for Planned { id, change, record } in planned {
            let mark = match (change, record) {
                (Change::HeldBack, _) => {
                    held.push(id);
                    continue;
                }
                (Change::Done, _) => Mark::Done,
                (_, Some(record)) => {
                    let (_, lane, received_at_ms) =
                        known.remove(&id).expect("a planned delivery was known");
                    Mark::Record {
                        record,
                        lane,
                        received_at_ms,
                    }
                }
                (_, None) => unreachable!("a retry or a dead letter always has a record"),
            };
            marks.push(Marking {
                id,
                plugin: plugin.to_owned(),
                mark,
                expect: Some(fences[&id]),
            });
        }
        let result = self.inner.mark(marks).await;
        if !held.is_empty() {
            self.inner.state().index.release(plugin, &held);
        }
        self.inner.notifiers.wake(plugin);
        result
    }

    async fn release(&self, plugin: &str, ids: &[u64]) -> Result<(), LedgerError> {
        if self.inner.state().index.release(plugin, ids) > 0 {
            self.inner.notifiers.wake(plugin);
        }
        Ok(())
    }

    /// Of the partitions [`JetStreamLedger::claim`] takes from: those whose lease is current.
    fn next_due(&self, plugin: &str) -> Option<Instant> {
        let claimable = self.leases.claimable();
        let index = &self.inner.state().index;
        index.next_due_ms_within(plugin, claimable).map(instant_of)
    }

    async fn wait_for_work(&self, plugin: &str, limit: Duration) -> Wake {
        let claimable = self.leases.claimable();
        let (due, lapsing) = {
            let index = &self.inner.state().index;
            let due = index.next_due_ms_within(plugin, claimable);
            (due, index.next_due_ms(plugin) != due)
        };
        // Work due in a partition whose lease is lapsing (held, no longer renewed in time: NATS
        // is out of reach) cannot be claimed, and is not due here; the lease comes back or goes
        // on the lease task's next round, which wakes no one when it comes back. Looking again
        // after that round, instead of as soon as it is due, keeps a worker from spinning.
        let limit = if lapsing {
            limit.min(lease::TICK)
        } else {
            limit
        };
        self.inner.notifiers.wait(plugin, due, limit).await
    }

    async fn dead_letters(
        &self,
        plugin: Option<&str>,
        after: Option<&DeadLetterCursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, LedgerError> {
        self.inner.ensure_open()?;
        let targets: Vec<(String, u64, DeliveryRecord)> = {
            let state = self.inner.state();
            state
                .index
                .dead_page(plugin, after, limit)
                .into_iter()
                .filter_map(|(p, id)| {
                    let record = state.records.get(&(p.clone(), id))?.clone();
                    Some((p, id, record))
                })
                .collect()
        };
        let ids: Vec<u64> = targets.iter().map(|(_, id, _)| *id).collect();
        let reads = self.inner.read_events(&ids).await;
        targets
            .into_iter()
            .zip(reads)
            .map(|((plugin, id, record), read)| {
                let event = match read {
                    Ok(event) => event,
                    Err(error @ LedgerError::Corrupt { .. }) => {
                        StoredEvent::unreadable(&plugin, id, &error)
                    }
                    Err(error) => return Err(error),
                };
                Ok(DeadLetter {
                    plugin,
                    event,
                    attempts: record.attempts,
                    reason: record.reason.unwrap_or_default(),
                    died_at_ms: record.died_at_ms.unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn replay_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        self.inner.ensure_open()?;
        let marks: Vec<Marking> = {
            let state = self.inner.state();
            state
                .index
                .dead(plugin, event_ids, None, usize::MAX)
                .into_iter()
                .filter_map(|(plugin, id)| {
                    let event = state.index.events.get(&id)?;
                    let mark = Mark::Record {
                        record: DeliveryRecord::default(),
                        lane: event.lane.to_string(),
                        received_at_ms: event.received_at_ms,
                    };
                    Some(Marking::unfenced(id, plugin, mark))
                })
                .collect()
        };
        let count = marks.len() as u64;
        self.inner.mark(marks).await?;
        Ok(count)
    }

    async fn drop_dead(
        &self,
        plugin: Option<&str>,
        event_ids: Option<&[u64]>,
    ) -> Result<u64, LedgerError> {
        self.inner.ensure_open()?;
        let marks: Vec<Marking> = self
            .inner
            .state()
            .index
            .dead(plugin, event_ids, None, usize::MAX)
            .into_iter()
            .map(|(plugin, id)| Marking::unfenced(id, plugin, Mark::Dropped))
            .collect();
        let count = marks.len() as u64;
        self.inner.mark(marks).await?;
        Ok(count)
    }

    async fn replay_since(
        &self,
        plugin: &str,
        since_ms: u64,
        subscriptions: &[String],
    ) -> Result<u64, LedgerError> {
        self.inner.ensure_open()?;
        let mut wanted = Vec::new();
        let mut unreadable = 0u64;
        self.inner
            .scan_events(false, |id, _, payload| {
                match serde_json::from_slice::<EventRecord>(payload) {
                    Ok(e) => {
                        let typed = subscriptions.iter().any(|s| matches(s, &e.event_type));
                        if e.received_at_ms >= since_ms && typed {
                            wanted.push((id, e.cluster, e.entity_uuid, e.received_at_ms));
                        }
                    }
                    Err(_) => unreadable += 1,
                }
                true
            })
            .await?;
        if unreadable > 0 {
            warn!(
                plugin,
                unreadable, "replay skipped events that cannot be read"
            );
        }
        let limit = self.inner.opts.max_backlog;
        let pending = self.inner.undelivered.load(Ordering::Relaxed);
        let room = match limit {
            0 => usize::MAX,
            limit => usize::try_from(limit.saturating_sub(pending)).unwrap_or(usize::MAX),
        };
        if room == 0 {
            self.check_backlog()?;
        }
        let mut full_at = None;
        let marks: Vec<Marking> = {
            let state = self.inner.state();
            let mut unknown: Vec<_> = wanted
                .into_iter()
                .filter(|(id, ..)| !state.index.knows(plugin, *id))
                .collect();
            if let Some((.., received_at_ms)) = unknown.get(room) {
                full_at = Some(*received_at_ms);
                unknown.truncate(room);
            }
            unknown
                .into_iter()
                .map(|(id, cluster, entity_uuid, received_at_ms)| {
                    let mark = Mark::Record {
                        record: DeliveryRecord::default(),
                        lane: lane_key(&cluster, &entity_uuid, id).to_string(),
                        received_at_ms,
                    };
                    Marking::unfenced(id, plugin.to_owned(), mark)
                })
                .collect()
        };
        let count = marks.len() as u64;
        self.inner.mark(marks).await?;
        if let Some(resume_since_ms) = full_at {
            let full = LedgerError::ReplayStopped {
                replayed: count,
                limit,
                resume_since_ms,
            };
            info!(plugin, since_ms, "{full}");
            return Err(full);
        }
        info!(plugin, since_ms, replayed = count, "replayed events");
        Ok(count)
    }

    fn backlog(&self) -> Result<Vec<PluginBacklog>, LedgerError> {
        Ok(self.inner.state().index.backlog())
    }

    fn stats(&self) -> LedgerStats {
        LedgerStats {
            undelivered: self.inner.undelivered.load(Ordering::Relaxed),
            commits: self.inner.commits.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    fn membership(&self) -> Option<Membership> {
        let mut membership = self.leases.membership();
        let state = self.inner.state();
        membership.serving = state.index.held.iter().collect();
        membership.lag = state.index.lag();
        Some(membership)
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leases.leadership()
    }

    async fn pause_others(&self) -> Result<(), LedgerError> {
        self.leases.pause_others(PAUSE_LIMIT).await?;
        // What the others stored before they stopped (their last outcomes, their plugins' kv
        // writes) is read here before this host goes on alone: a reconcile reading older
        // records would have its writes refused, or undo theirs.
        if let Err(error) = self.inner.caught_up(PAUSE_LIMIT).await {
            self.leases.resume_others().await;
            return Err(error);
        }
        Ok(())
    }

    async fn resume_others(&self) {
        self.leases.resume_others().await
    }

    /// Deletes retained events past the retention period that nothing is waiting for, with
    /// their delivery marks. Ids follow arrival, so the scan stops at the first young event.
    async fn prune(&self) -> Result<u64, LedgerError> {
        self.inner.ensure_open()?;
        let now = now_ms();
        let cutoff_ms = now.saturating_sub(self.inner.opts.retention.as_millis() as u64);
        let mut old = Vec::new();
        let mut by_age = ByAge::new(now, cutoff_ms);
        self.inner
            .scan_events(true, |id, headers, _| {
                let received = headers
                    .get(RECEIVED)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap_or(0);
                by_age.read_on(id, received, &mut old)
            })
            .await?;
        let victims: Vec<u64> = {
            let state = self.inner.state();
            old.into_iter()
                .filter(|id| !state.index.events.contains_key(id))
                .collect()
        };
        // The event goes first. A prune stopped between the two steps (a
        // crash, NATS out of reach) then leaves done marks of an event that
        // is gone, which a fold counts as delivered; the other order left an
        // event without its marks, which every host folding the stream from
        // the start took for undelivered and delivered again, after newer
        // events of its VM.
        for &id in &victims {
            self.inner
                .stream
                .delete_message(id)
                .await
                .map_err(|e| unavailable(format!("deleting event {id}"), e))?;
            self.inner
                .stream
                .purge()
                .filter(self.inner.subjects.deliveries_of(id))
                .await
                .map_err(|e| unavailable(format!("deleting the deliveries of event {id}"), e))?;
        }
        self.inner.refresh_bytes().await?;
        if !victims.is_empty() {
            info!(events = victims.len(), "pruned the ledger");
        }
        debug!(pruned = victims.len(), "prune done");
        Ok(victims.len() as u64)
    }

    /// A round trip to the stream proves the cluster answers.
    async fn check(&self) -> Result<(), LedgerError> {
        self.inner.ensure_open()?;
        self.inner.refresh_bytes().await
    }

    /// Stops the fold and flushes the connection; other handles get [`LedgerError::Closed`].
    async fn close(&self) -> Result<(), LedgerError> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.tail.stop();
        let in_flight = self.inner.state().index.in_flight_partitions();
        self.leases.leave(in_flight).await;
        if let Err(error) = self.inner.client.flush().await {
            warn!(%error, "flushing the NATS connection at close");
        }
        Ok(())
    }
}

/// Releases a claim that did not reach its caller.
struct Unclaim<'a> {
    inner: &'a Inner,
    plugin: &'a str,
    ids: Vec<u64>,
}

impl Drop for Unclaim<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.inner.state().index.release(self.plugin, &self.ids);
            self.inner.notifiers.wake(self.plugin);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use crate::ledger::partition_of_entity;
    use crate::ledger::suite::the_unreadable_middle_event_is_a_dead_letter;
    use crate::ledger::PARTITIONS;
    use crate::runtime::kv_store::{KvError, KvSession, KvStore};

    fn named(nats: &prismhook_sim::nats::Nats, name: &str) -> JetStreamOptions {
        JetStreamOptions {
            client_name: name.into(),
            ..JetStreamOptions::new(nats.urls())
        }
    }

    fn serving(ledger: &JetStreamLedger) -> Vec<usize> {
        ledger.membership().unwrap().serving
    }

    /// Waits (up to `limit`) until `done` holds, checking every 50 ms; returns how long it took.
    async fn within(limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < limit, "not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed()
    }

    fn event(entity: usize) -> NewEvent {
        NewEvent {
            cluster: "lab".into(),
            event_type: "VM.UPDATE".into(),
            entity_kind: "vm".into(),
            entity_uuid: format!("vm-{entity}"),
            dedupe_key: None,
            received_at_ms: now_ms(),
            body: "{}".into(),
            vm: None,
        }
    }

    /// `count` events of one entity for plugin `p`; their ids.
    async fn append_events(ledger: &JetStreamLedger, entity: usize, count: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..count {
            match ledger
                .append(event(entity), vec!["p".into()])
                .await
                .unwrap()
            {
                Appended::Stored { id, .. } => ids.push(id),
                other => panic!("not stored: {other:?}"),
            }
        }
        ids
    }

    #[tokio::test]
    async fn a_live_hosts_name_is_refused_to_a_second_process_and_a_crashed_hosts_is_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let first = JetStreamLedger::open(named(&nats, "prismhook a"))
            .await
            .unwrap();
        let refused = JetStreamLedger::open(named(&nats, "prismhook a"))
            .await
            .unwrap_err();
        assert!(matches!(&refused, LedgerError::InUse { .. }), "{refused}");
        assert!(
            refused.to_string().contains("host name `prismhook a`"),
            "{refused}"
        );
        drop(first); // as by a crash: its keys stay until they expire
        let again = JetStreamLedger::open(named(&nats, "prismhook a"))
            .await
            .unwrap();
        assert_eq!(serving(&again).len(), PARTITIONS, "taken back at once");
        assert!(*again.leadership().borrow(), "it leads again");
    }

    /// Commits a call's kv writes off the async threads, as the runtime does.
    async fn commit(session: KvSession) -> Result<(), KvError> {
        tokio::task::spawn_blocking(move || session.commit())
            .await
            .unwrap()
    }

    /// Hosts `a` and `b` on one single-node NATS, each with the plugins' kv.
    struct TwoHosts {
        a: JetStreamLedger,
        b: JetStreamLedger,
        kv_a: KvStore,
        kv_b: KvStore,
        nats: prismhook_sim::nats::Nats,
        _dir: tempfile::TempDir,
    }

    async fn two_hosts() -> TwoHosts {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let b = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        let kv_a = KvStore::new(Arc::new(a.plugin_kv().await.unwrap()));
        let kv_b = KvStore::new(Arc::new(b.plugin_kv().await.unwrap()));
        TwoHosts {
            a,
            b,
            kv_a,
            kv_b,
            nats,
            _dir: dir,
        }
    }

    /// `limits.kv_mib` on a shared kv: each host counts what its mirror holds, so a call on the
    /// other host is held to what the first one wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugins_kv_limit_holds_across_the_hosts_and_shrinking_always_passes() {
        // Every part held to the end: dropping the NATS handle stops the server.
        let TwoHosts {
            a: _a,
            b,
            kv_a,
            kv_b,
            nats: _nats,
            _dir,
        } = two_hosts().await;
        let write = |kv: &KvStore, limit: u64, key: &str, len: Option<usize>| {
            let mut s = kv.session("fw", limit);
            let buffered = match len {
                Some(len) => s.set(key.into(), vec![b'x'; len]),
                None => s.delete(key.into()),
            };
            async move {
                buffered?;
                commit(s).await
            }
        };
        write(&kv_a, 100, "a", Some(60)).await.unwrap();
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let e = write(&kv_b, 100, "b", Some(40)).await.unwrap_err();
        assert!(
            matches!(
                e,
                KvError::OverLimit {
                    would: 102,
                    limit: 100
                }
            ),
            "{e}"
        );
        assert_eq!(
            kv_b.dump("fw").unwrap().len(),
            1,
            "nothing of it was stored"
        );
        // A value replaced counts the difference; a delete frees its bytes, on either host.
        write(&kv_b, 100, "a", Some(90)).await.unwrap();
        write(&kv_b, 100, "a", None).await.unwrap();
        write(&kv_b, 100, "b", Some(90)).await.unwrap();
        assert!(write(&kv_b, 50, "b", Some(95)).await.is_err());
        write(&kv_b, 50, "b", Some(80)).await.unwrap();
        assert_eq!(kv_b.bytes("fw").unwrap(), 81);
    }

    /// A value is held at `set` to what one message of the servers' `max_payload` carries
    /// with a write's headers, and a value of that size is stored: the plugin learns of a
    /// value too large at once, not from every call failing when it returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_value_too_large_for_a_message_is_refused_at_set_and_the_largest_is_stored() {
        let hosts = two_hosts().await;
        let limit = hosts.a.inner.client.max_payload() - 1024;
        assert!(limit < crate::runtime::kv_store::MAX_VALUE_BYTES, "{limit}");
        let mut s = hosts.kv_a.session("fw", u64::MAX);
        let e = s.set("big".into(), vec![b'x'; limit + 1]).unwrap_err();
        assert!(
            matches!(e, KvError::ValueTooLarge { bytes, limit: l } if bytes == limit + 1 && l == limit),
            "{e}"
        );
        // The largest goes in an atomic batch, whose headers are the most a write has.
        s.set("largest".into(), vec![b'x'; limit]).unwrap();
        s.set("small".into(), vec![b'y'; 8]).unwrap();
        commit(s).await.unwrap();
        let stored = hosts.kv_a.dump("fw").unwrap();
        assert_eq!(stored["largest"].len(), limit);
        assert!(!stored.contains_key("big"));

        // Past the check, a message over `max_payload` reads as too large (the plugin's
        // doing), not as a store that is down.
        let inner = &hosts.a.inner;
        let over = batch::Message {
            subject: "prismhook_kv.over".into(),
            headers: HeaderMap::new(),
            payload: vec![0; inner.client.max_payload() + 1].into(),
        };
        let e = batch::publish(&inner.client, &inner.js, Duration::from_secs(2), vec![over])
            .await
            .unwrap_err();
        assert!(e.too_large() && !e.superseded(), "{e}");
    }

    /// A call is held to the keys it read and does not write (as far as its host has read the
    /// other's write) and to the keys a `kv.commit` of its stored, when it writes them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_is_held_to_what_it_read_and_to_what_it_committed_across_the_hosts() {
        let TwoHosts {
            a,
            b,
            kv_a,
            kv_b,
            nats: _nats,
            _dir,
        } = two_hosts().await;
        let mut x = kv_a.session("fw", u64::MAX);
        assert_eq!(x.get("owner/10.0.0.5").unwrap(), None);
        let mut y = kv_b.session("fw", u64::MAX);
        y.set("owner/10.0.0.5".into(), b"vm-b".to_vec()).unwrap();
        commit(y).await.unwrap();
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        // Written from what x read of the owner, which is no longer so.
        x.set("vm/vm-2".into(), b"10.0.0.5".to_vec()).unwrap();
        let e = commit(x).await.unwrap_err();
        assert!(matches!(e, KvError::Conflict(_)), "{e}");
        assert!(!kv_a.dump("fw").unwrap().contains_key("vm/vm-2"));

        let mut x = kv_a.session("fw", u64::MAX);
        x.set("ip/1".into(), b"vm-a".to_vec()).unwrap();
        x.commit_now().await.unwrap();
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let mut y = kv_b.session("fw", u64::MAX);
        assert_eq!(y.get("ip/1").unwrap().as_deref(), Some(&b"vm-a"[..]));
        y.set("ip/1".into(), b"vm-a,vm-b".to_vec()).unwrap();
        commit(y).await.unwrap();
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        x.set("ip/1".into(), b"vm-a,vm-c".to_vec()).unwrap();
        let e = commit(x).await.unwrap_err();
        assert!(matches!(e, KvError::Conflict(_)), "{e}");
        assert_eq!(kv_a.dump("fw").unwrap()["ip/1"], b"vm-a,vm-b");

        // Unwritten by others, a committed key is written again as often as the call likes.
        let mut z = kv_a.session("fw", u64::MAX);
        for n in 0..3u8 {
            z.set("ip/2".into(), vec![n]).unwrap();
            z.commit_now().await.unwrap();
        }
        z.set("ip/2".into(), vec![9]).unwrap();
        commit(z).await.unwrap();
        assert_eq!(kv_a.dump("fw").unwrap()["ip/2"], vec![9]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_kv_is_the_same_on_every_host_and_a_calls_writes_land_together() {
        let TwoHosts {
            a,
            b,
            kv_a,
            kv_b,
            nats,
            _dir,
        } = two_hosts().await;

        let mut s = kv_a.session("fw", u64::MAX);
        s.set("vm/1".into(), b"10.0.0.1".to_vec()).unwrap();
        s.set("vm/2".into(), b"10.0.0.2".to_vec()).unwrap();
        assert!(
            kv_b.dump("fw").unwrap().is_empty(),
            "nothing before the commit"
        );
        commit(s).await.unwrap();
        // Read-your-writes on the writing host, at once.
        assert_eq!(kv_a.dump("fw").unwrap().len(), 2);
        // The other host, once it has read the stream that far (as it does before serving a
        // partition it takes over).
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        assert_eq!(kv_b.dump("fw").unwrap(), kv_a.dump("fw").unwrap());

        // A delete on one host is one on the other; other plugins' keys are their own.
        let mut s = kv_b.session("fw", u64::MAX);
        s.delete("vm/1".into()).unwrap();
        commit(s).await.unwrap();
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        assert_eq!(
            kv_a.session("fw", u64::MAX).list_keys("vm/").unwrap(),
            ["vm/2"]
        );
        assert!(kv_a.dump("other").unwrap().is_empty());

        // More writes than one atomic batch holds, and a key and value of any bytes.
        let mut s = kv_a.session("fw", u64::MAX);
        for i in 0..2_500 {
            s.set(format!("ip/{i}"), vec![i as u8; 16]).unwrap();
        }
        s.set("odd key .*> é".into(), vec![0, 255]).unwrap();
        commit(s).await.unwrap();
        let session = kv_a.session("fw", u64::MAX);
        let all = session.list_keys("ip/").unwrap();
        assert_eq!(all.len(), 2_500);
        let first = session.list_keys_after("ip/", None, 1_000).unwrap();
        let second = session.list_keys_after("ip/", first.last().map(String::as_str), 1_000);
        let second = second.unwrap();
        let last = session.list_keys_after("ip/", second.last().map(String::as_str), 1_000);
        assert_eq!(
            [first, second, last.unwrap()].concat(),
            all,
            "pages of the mirror"
        );
        drop(session);
        // A deleted key's tombstone is not a key of a page.
        assert_eq!(
            kv_a.session("fw", u64::MAX)
                .list_keys_after("vm/", None, 1)
                .unwrap(),
            ["vm/2"]
        );

        // Deletes of keys never written (or deleted already) store nothing: each would be a
        // tombstone kept for good.
        let stored = || async {
            let (_, stream) = a.inner.kv.get().expect("the kv is open");
            stream.clone().get_info().await.unwrap().state.messages
        };
        let before = stored().await;
        let mut s = kv_a.session("fw", u64::MAX);
        for i in 0..100 {
            s.delete(format!("never/{i}")).unwrap();
        }
        s.delete("vm/1".into()).unwrap();
        commit(s).await.unwrap();
        assert_eq!(stored().await, before);

        // A host that starts later mirrors it all before it serves anything.
        let c = JetStreamLedger::open(named(&nats, "c")).await.unwrap();
        let kv_c = KvStore::new(Arc::new(c.plugin_kv().await.unwrap()));
        let everything = kv_c.dump("fw").unwrap();
        assert_eq!(everything.len(), 2_502);
        assert_eq!(everything["odd key .*> é"], vec![0, 255]);
        assert_eq!(everything, kv_a.dump("fw").unwrap());
    }

    /// A call writes from what it read: when another host wrote one of those keys after the
    /// read, the call's writes are refused, even once this host's mirror shows the other write,
    /// and the other write stands. A key written without being read is not held to that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_read_a_key_another_host_wrote_since_cannot_overwrite_it() {
        let h = two_hosts().await;
        let (a, b, kv_a, kv_b) = (&h.a, &h.b, &h.kv_a, &h.kv_b);
        let mut s = kv_a.session("fw", u64::MAX);
        s.set("changes/vm-1".into(), b"CREATE".to_vec()).unwrap();
        commit(s).await.unwrap();
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();

        // A call on `a` reads the record (and one key that does not exist yet)...
        let mut slow = kv_a.session("fw", u64::MAX);
        assert_eq!(
            slow.get("changes/vm-1").unwrap().as_deref(),
            Some(&b"CREATE"[..])
        );
        assert_eq!(slow.get("changes/vm-2").unwrap(), None);
        // ...while `b` appends to it, and `a`'s mirror shows that before the call ends.
        let mut s = kv_b.session("fw", u64::MAX);
        s.set("changes/vm-1".into(), b"CREATE\nON".to_vec())
            .unwrap();
        commit(s).await.unwrap();
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        slow.set("changes/vm-1".into(), b"CREATE\nOFF".to_vec())
            .unwrap();
        slow.set("instance".into(), b"a".to_vec()).unwrap();
        let refused = commit(slow).await.unwrap_err();
        assert!(
            matches!(refused, KvError::Conflict(_))
                && refused
                    .to_string()
                    .contains("a key the call read was written since"),
            "a conflict, which the dispatcher makes again: {refused}"
        );
        let mut now = kv_a.session("fw", u64::MAX);
        assert_eq!(
            now.get("changes/vm-1").unwrap().as_deref(),
            Some(&b"CREATE\nON"[..]),
            "the newer write stands"
        );
        assert_eq!(
            now.get("instance").unwrap(),
            None,
            "none of the call's writes"
        );

        // A key read as missing is held to that too; keys written unread are not held at all.
        let mut reader = kv_a.session("fw", u64::MAX);
        assert_eq!(reader.get("changes/vm-2").unwrap(), None);
        let mut s = kv_b.session("fw", u64::MAX);
        s.set("changes/vm-2".into(), b"CREATE".to_vec()).unwrap();
        commit(s).await.unwrap();
        reader.set("changes/vm-2".into(), b"OFF".to_vec()).unwrap();
        assert!(
            matches!(commit(reader).await, Err(KvError::Conflict(_))),
            "created since it was read"
        );
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let mut blind = kv_a.session("fw", u64::MAX);
        blind
            .set("changes/vm-2".into(), b"DELETE".to_vec())
            .unwrap();
        commit(blind).await.unwrap();
        assert_eq!(
            kv_a.session("fw", u64::MAX)
                .get("changes/vm-2")
                .unwrap()
                .as_deref(),
            Some(&b"DELETE"[..])
        );

        // A key read and then deleted is held to what was read, even when this host's mirror
        // already shows it gone: another host's delete since refuses the call's other writes.
        let mut reader = kv_a.session("fw", u64::MAX);
        assert!(reader.get("changes/vm-2").unwrap().is_some());
        // `b` deletes what it has read `a` write (else its own delete is refused).
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let mut s = kv_b.session("fw", u64::MAX);
        s.delete("changes/vm-2".into()).unwrap();
        commit(s).await.unwrap();
        a.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        reader.delete("changes/vm-2".into()).unwrap();
        reader.set("ips/10.0.0.9".into(), b"vm-2".to_vec()).unwrap();
        assert!(
            matches!(commit(reader).await, Err(KvError::Conflict(_))),
            "deleted by another host since it was read"
        );
        assert_eq!(
            kv_a.session("fw", u64::MAX).get("ips/10.0.0.9").unwrap(),
            None
        );
    }

    /// An event refused by a stream at the size the operator set is backpressure (the sender
    /// is told to come back), not a store that cannot be reached; the limit lifted, it is
    /// stored.
    #[tokio::test]
    async fn an_event_a_full_stream_refuses_is_backpressure_until_it_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let ledger = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        append_events(&ledger, 1, 2).await;
        let info = ledger.inner.stream.clone().info().await.unwrap().clone();
        let (unlimited, mut config) = (info.config.clone(), info.config);
        config.max_messages = i64::try_from(info.state.messages).unwrap();
        let js = &ledger.inner.js;
        js.update_stream(config).await.unwrap();
        let refused = ledger.append(event(2), vec!["p".into()]).await.unwrap_err();
        assert!(
            matches!(
                refused,
                LedgerError::Backpressure {
                    resource: Resource::Storage,
                    ..
                }
            ),
            "a full stream is backpressure: {refused}"
        );
        js.update_stream(unlimited).await.unwrap();
        append_events(&ledger, 2, 1).await;
    }

    /// The marks of a completed batch are stored together: when the stream has room for only
    /// one of them, none is stored, and the entity's events come back whole and in order —
    /// not the later ones done and an earlier one sent again after them.
    #[tokio::test]
    async fn a_batch_whose_marks_cannot_all_be_stored_leaves_none_behind() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let ledger = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let ids = append_events(&ledger, 7, 3).await;
        let claim = || async {
            let batch = ledger.claim("p", 10).await.unwrap();
            batch.iter().map(|d| d.event.id).collect::<Vec<u64>>()
        };
        assert_eq!(claim().await, ids);

        // Room for one more message in the stream.
        let info = ledger.inner.stream.clone().info().await.unwrap().clone();
        let (unlimited, mut config) = (info.config.clone(), info.config);
        config.max_messages = i64::try_from(info.state.messages).unwrap() + 1;
        let js = &ledger.inner.js;
        js.update_stream(config.clone()).await.unwrap();
        let done = ids.iter().map(|&id| (id, Outcome::Done)).collect();
        let refused = ledger.complete("p", done).await.unwrap_err();
        assert!(
            matches!(refused, LedgerError::Backpressure { .. }),
            "a full stream is backpressure: {refused}"
        );
        js.update_stream(unlimited).await.unwrap();

        let backlog = ledger.backlog().unwrap();
        assert_eq!(
            (backlog[0].delivered, backlog[0].in_flight),
            (0, 3),
            "{backlog:?}"
        );
        ledger.release("p", &ids).await.unwrap();
        assert_eq!(claim().await, ids, "the whole batch again, in order");
        // A stopped host's ledger says the same: nothing was stored behind the error.
        ledger.close().await.unwrap();
        let reopened = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let backlog = reopened.backlog().unwrap();
        assert_eq!(
            (backlog[0].pending, backlog[0].delivered),
            (3, 0),
            "{backlog:?}"
        );
    }

    /// What a prune stopped after its first step leaves (the event deleted,
    /// its done marks not yet) is delivered to nobody by a host that folds
    /// the stream from the start.
    #[tokio::test]
    async fn a_prune_stopped_halfway_delivers_nothing_again() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let ledger = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let ids = append_events(&ledger, 1, 2).await;
        assert_eq!(ledger.claim("p", 10).await.unwrap().len(), 2);
        ledger
            .complete("p", vec![(ids[0], Outcome::Done)])
            .await
            .unwrap();
        ledger.release("p", &ids[1..]).await.unwrap();
        ledger.inner.stream.delete_message(ids[0]).await.unwrap();
        ledger.close().await.unwrap();

        let reopened = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        let claimed: Vec<u64> = reopened
            .claim("p", 10)
            .await
            .unwrap()
            .iter()
            .map(|d| d.event.id)
            .collect();
        assert_eq!(claimed, [ids[1]], "only the event never delivered");
        let backlog = reopened.backlog().unwrap();
        assert_eq!(
            (backlog[0].delivered, backlog[0].dead),
            (1, 0),
            "{backlog:?}"
        );
    }

    /// A prune racing a replay can leave a delivery whose event is gone; it used to fail every
    /// claim of its plugin, so nothing after it was delivered again.
    #[tokio::test]
    async fn a_delivery_whose_event_is_gone_is_a_dead_letter_and_the_others_are_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let opts = JetStreamOptions {
            cache_events: 0,
            ..named(&nats, "a")
        };
        let ledger = JetStreamLedger::open(opts).await.unwrap();
        let mut ids = append_events(&ledger, 1, 1).await;
        ids.extend(append_events(&ledger, 2, 1).await);
        ids.extend(append_events(&ledger, 3, 1).await);
        ledger.inner.stream.delete_message(ids[1]).await.unwrap();

        the_unreadable_middle_event_is_a_dead_letter(&ledger, "p", &ids).await;
        let letters = ledger.dead_letters(Some("p"), None, 10).await.unwrap();
        assert!(letters[0].reason.contains("missing"), "{letters:?}");
        assert_eq!(ledger.drop_dead(Some("p"), None).await.unwrap(), 1);
    }

    /// A host whose lease ran out while it delivered (starved, or cut off from NATS) must not
    /// overwrite what the host that took the partition over recorded: its late "retry" of an
    /// entity's oldest event would send that event again, alone, after the newer ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcomes_of_a_host_that_lost_the_partition_do_not_undo_the_new_holders() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let ids = append_events(&a, 7, 3).await;
        let claimed = a.claim("p", 10).await.unwrap();
        assert_eq!(claimed.iter().map(|d| d.event.id).collect::<Vec<_>>(), ids);

        // `a` stalls: it folds and renews nothing more. The host that takes over delivers the
        // three events and records them done.
        a.tail.stop();
        let b = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        let done = ids
            .iter()
            .map(|&id| Marking {
                id,
                plugin: "p".into(),
                mark: Mark::Done,
                expect: Some(0),
            })
            .collect();
        b.inner.mark(done).await.unwrap();

        // Then `a`'s call ends: the first two events failed (two marks: an atomic batch), the
        // third waits behind them.
        let retry = || Outcome::Retry {
            reason: "the firewall timed out".into(),
            delay: None,
        };
        let results = vec![
            (ids[0], retry()),
            (ids[1], retry()),
            (ids[2], Outcome::Done),
        ];
        let late = a.complete("p", results).await.unwrap_err();
        assert!(matches!(late, LedgerError::Superseded { .. }), "{late}");
        assert!(late.to_string().contains("another host holds"), "{late}");

        // Every host, and one that starts now, sees the three done and nothing to send again.
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let c = JetStreamLedger::open(named(&nats, "c")).await.unwrap();
        for host in [&b, &c] {
            let backlog = host.backlog().unwrap();
            assert_eq!(
                (backlog[0].pending, backlog[0].delivered),
                (0, 3),
                "{backlog:?}"
            );
        }
    }

    /// A delivery nobody has marked yet has no mark to fence a late outcome on: the host whose
    /// lease lapsed must not store one once another host may have claimed it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_whose_lease_lapsed_stores_no_outcome_of_a_delivery_nobody_marked() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        let ids = append_events(&a, 7, 1).await;
        assert_eq!(a.claim("p", 10).await.unwrap().len(), 1);

        a.tail.stop();
        let b = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        let partition = partition_of(&lane_key("lab", "vm-7", 0));
        within(Duration::from_secs(30), || serving(&b).contains(&partition)).await;
        let retry = Outcome::Retry {
            reason: "the firewall timed out".into(),
            delay: None,
        };
        let late = a.complete("p", vec![(ids[0], retry)]).await.unwrap_err();
        assert!(matches!(late, LedgerError::Superseded { .. }), "{late}");
        assert!(late.to_string().contains("no longer holds"), "{late}");

        // Nothing was stored: the new holder delivers the event as it found it.
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let claimed = b.claim("p", 10).await.unwrap();
        assert_eq!(claimed.iter().map(|d| d.event.id).collect::<Vec<_>>(), ids);
        assert_eq!(claimed[0].attempt, 1, "no failure was recorded");
    }

    /// A host cut off from NATS stops claiming once its leases lapse, before its lease task gives
    /// the partitions up: its workers must then wait, not find the work due, claim nothing and
    /// look again at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_waits_while_its_leases_lapse_instead_of_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let mut nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        append_events(&a, 7, 1).await;
        assert!(a.next_due("p").is_some_and(|t| t <= Instant::now()));

        nats.nodes[0].kill();
        within(Duration::from_secs(10), || a.leases.claimable().is_empty()).await;
        assert_eq!(a.next_due("p"), None, "nothing this host may claim is due");
        // A dispatcher's worker, for a second: claim, and when nothing came, wait for work.
        let (mut rounds, mut lapsing) = (0, 0);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            assert!(a.claim("p", 10).await.unwrap().is_empty());
            lapsing += usize::from(!a.inner.state().index.held.is_empty());
            a.wait_for_work("p", Duration::from_secs(1)).await;
            rounds += 1;
        }
        assert!(
            lapsing > 0,
            "the leases were given up before the worker looked"
        );
        assert!(rounds <= 8, "{rounds} rounds in a second");
    }

    #[tokio::test]
    async fn hosts_split_the_partitions_and_a_dead_hosts_share_moves_to_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = JetStreamLedger::open(named(&nats, "a")).await.unwrap();
        assert_eq!(serving(&a).len(), PARTITIONS);
        for entity in 0..200 {
            a.append(event(entity), vec!["p".into()]).await.unwrap();
        }
        let b = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        let c = JetStreamLedger::open(named(&nats, "c")).await.unwrap();
        let hosts = [&a, &b, &c];
        // Shared out: disjoint, complete, and each host gets a share.
        within(Duration::from_secs(10), || {
            let shares: Vec<Vec<usize>> = hosts.iter().map(|h| serving(h)).collect();
            shares.iter().all(|s| !s.is_empty())
                && shares.iter().map(Vec::len).sum::<usize>() == PARTITIONS
        })
        .await;
        let mut all: Vec<usize> = hosts.iter().flat_map(|h| serving(h)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..PARTITIONS).collect::<Vec<_>>());
        let view = b.membership().unwrap();
        assert_eq!(view.hosts.len(), 3, "{view:?}");
        assert_eq!(view.leader.as_deref(), Some("a"));
        assert!(view.unheld.is_empty(), "{view:?}");
        assert_eq!(view.lag.iter().map(|l| l.undelivered).sum::<u64>(), 200);

        // Each host claims only its own partitions' events: together, every event once.
        let mut claimed = Vec::new();
        for host in hosts {
            let batch = host.claim("p", 1000).await.unwrap();
            claimed.extend(batch.iter().map(|d| d.event.id));
            let results = batch.iter().map(|d| (d.event.id, Outcome::Done)).collect();
            host.complete("p", results).await.unwrap();
        }
        claimed.sort_unstable();
        claimed.dedup();
        assert_eq!(claimed.len(), 200);

        // `a` dies holding its leases: `b` and `c` take its partitions and the lead.
        let dead: Vec<usize> = serving(&a);
        drop(a);
        for entity in 0..200 {
            b.append(event(entity), vec!["p".into()]).await.unwrap();
        }
        let took = within(Duration::from_secs(10), || {
            serving(&b).len() + serving(&c).len() == PARTITIONS
        })
        .await;
        assert!(took < Duration::from_secs(6), "failover took {took:?}");
        within(Duration::from_secs(5), || {
            *b.leadership().borrow() || *c.leadership().borrow()
        })
        .await;
        assert!(dead
            .iter()
            .all(|p| serving(&b).contains(p) || serving(&c).contains(p)));
        let mut claimed = 0;
        for host in [&b, &c] {
            let batch = host.claim("p", 1000).await.unwrap();
            claimed += batch.len();
            let results = batch.iter().map(|d| (d.event.id, Outcome::Done)).collect();
            host.complete("p", results).await.unwrap();
        }
        assert_eq!(claimed, 200, "every new event is claimed by one of the two");

        // A host that closes with nothing in flight gives its share up at once.
        c.close().await.unwrap();
        let took = within(Duration::from_secs(5), || serving(&b).len() == PARTITIONS).await;
        assert!(took < Duration::from_secs(2), "handover took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_that_pauses_the_others_waits_for_their_deliveries_in_flight_and_they_resume_after(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let nats = prismhook_sim::nats::Nats::single(dir.path()).await.unwrap();
        let a = Arc::new(JetStreamLedger::open(named(&nats, "a")).await.unwrap());
        let b = JetStreamLedger::open(named(&nats, "b")).await.unwrap();
        within(Duration::from_secs(10), || {
            !serving(&a).is_empty()
                && !serving(&b).is_empty()
                && serving(&a).len() + serving(&b).len() == PARTITIONS
        })
        .await;
        let mine = serving(&a);
        for entity in 0..100 {
            a.append(event(entity), vec!["p".into()]).await.unwrap();
        }
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let in_flight = b.claim("p", 1000).await.unwrap();
        assert!(!in_flight.is_empty());

        // `b` has deliveries in flight: the pause waits for them.
        let pausing = tokio::spawn({
            let a = a.clone();
            async move { a.pause_others().await }
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!pausing.is_finished(), "paused with deliveries in flight");
        assert!(serving(&b).is_empty(), "a paused host claims nothing more");
        let done = in_flight
            .iter()
            .map(|d| (d.event.id, Outcome::Done))
            .collect();
        b.complete("p", done).await.unwrap();
        pausing.await.unwrap().unwrap();
        let view = a.membership().unwrap();
        assert!(
            view.hosts.iter().all(|h| h.me || h.partitions.is_empty()),
            "{view:?}"
        );
        assert_eq!(
            serving(&a),
            mine,
            "the pausing host serves on, and only its own"
        );
        assert!(b.claim("p", 1000).await.unwrap().is_empty());

        // A second pause from another host waits for the first to end.
        let refused = b.leases.pause_others(Duration::from_millis(500)).await;
        assert!(
            matches!(refused, Err(LedgerError::Unavailable { .. })),
            "{refused:?}"
        );

        a.resume_others().await;
        within(Duration::from_secs(5), || {
            serving(&a).len() + serving(&b).len() == PARTITIONS && !serving(&b).is_empty()
        })
        .await;
        assert_eq!(serving(&a), mine);
    }

    /// A host that closes while a call outlived the shutdown's deadline keeps that call's
    /// partition until its lease expires: handed over at once, its events would be delivered
    /// again while the call still acts on them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_closing_with_calls_in_flight_hands_their_partitions_over_only_when_its_lease_expires(
    ) {
        let h = two_hosts().await;
        let (a, b) = (&h.a, &h.b);
        within(Duration::from_secs(10), || {
            !serving(a).is_empty()
                && !serving(b).is_empty()
                && serving(a).len() + serving(b).len() == PARTITIONS
        })
        .await;
        for entity in 0..200 {
            a.append(event(entity), vec!["p".into()]).await.unwrap();
        }
        b.inner.caught_up(OPEN_PATIENCE).await.unwrap();
        let running = b.claim("p", 2).await.unwrap();
        assert!(!running.is_empty());
        let running_ids: BTreeSet<u64> = running.iter().map(|d| d.event.id).collect();
        let busy: BTreeSet<usize> = running
            .iter()
            .map(|d| partition_of_entity(&d.event.cluster, &d.event.entity_uuid))
            .collect();
        let idle: Vec<usize> = serving(b)
            .into_iter()
            .filter(|p| !busy.contains(p))
            .collect();
        assert!(
            !idle.is_empty(),
            "b holds a partition with nothing in flight"
        );

        b.close().await.unwrap();
        within(Duration::from_secs(5), || {
            idle.iter().all(|p| serving(a).contains(p))
        })
        .await;
        let claimed = a.claim("p", 1000).await.unwrap();
        assert!(
            claimed.iter().all(|d| !running_ids.contains(&d.event.id)),
            "a delivers what b's running call holds"
        );
        let done = claimed
            .iter()
            .map(|d| (d.event.id, Outcome::Done))
            .collect();
        a.complete("p", done).await.unwrap();

        // Once the lease has expired the call's events are delivered again: at least once.
        within(Duration::from_secs(10), || serving(a).len() == PARTITIONS).await;
        let again: BTreeSet<u64> = a
            .claim("p", 1000)
            .await
            .unwrap()
            .iter()
            .map(|d| d.event.id)
            .collect();
        assert!(running_ids.is_subset(&again), "{running_ids:?} {again:?}");
    }

    /// A renewal stored without its answer reaching this host (a timeout) is not taken for
    /// another host's takeover: the `pause` a reconcile holds outlives it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_stored_without_its_answer_keeps_the_pause() {
        let h = two_hosts().await;
        let (a, b) = (&h.a, &h.b);
        within(Duration::from_secs(10), || {
            !serving(a).is_empty() && !serving(b).is_empty()
        })
        .await;
        a.pause_others().await.unwrap();
        assert!(serving(b).is_empty());
        a.leases.write_unanswered("pause").await;
        // Past the TTL: a pause this host had given up would have expired by then.
        let until = Instant::now() + lease::TTL * 2;
        while Instant::now() < until {
            assert!(
                serving(b).is_empty(),
                "the other host delivers during the pause"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a.resume_others().await;
        within(Duration::from_secs(10), || !serving(b).is_empty()).await;
    }

    /// What the others wrote to the plugins' kv before they stopped is what the pausing host
    /// reads next (its reconcile's writes would be refused, or undo theirs, otherwise): the
    /// pause ends only once its mirror shows it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_ends_once_the_pausing_host_has_read_the_others_last_kv_writes() {
        // The server and the other fields live to the end of the test.
        let h = two_hosts().await;
        let (b, kv_a, kv_b) = (&h.b, &h.kv_a, &h.kv_b);
        let a = Arc::new(h.a);
        within(Duration::from_secs(10), || {
            !serving(&a).is_empty() && !serving(b).is_empty()
        })
        .await;
        // `a`'s mirror is held behind while `b` writes, as a follower that lost its server is.
        let (mirror, _) = a.inner.kv.get().expect("the kv is open");
        let held = mirror.hold();
        let mut s = kv_b.session("fw", u64::MAX);
        s.set("vm/lab/1".into(), b"10.0.0.1".to_vec()).unwrap();
        commit(s).await.unwrap();

        let pausing = tokio::spawn({
            let a = a.clone();
            async move { a.pause_others().await }
        });
        within(Duration::from_secs(10), || serving(b).is_empty()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !pausing.is_finished(),
            "paused before the others' last writes were read"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(30), pausing)
            .await
            .expect("the pause ends once the mirror has caught up")
            .unwrap()
            .unwrap();
        assert_eq!(
            kv_a.session("fw", u64::MAX)
                .get("vm/lab/1")
                .unwrap()
                .as_deref(),
            Some(&b"10.0.0.1"[..])
        );
        a.resume_others().await;
    }
}
