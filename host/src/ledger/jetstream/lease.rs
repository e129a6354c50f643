//! Hosts sharing one stream: who is alive, who holds which partition, and who leads.
//!
//! Everything is a key of one KV bucket (`<STREAM>_LEASES`) whose entries expire [`TTL`] after
//! their last write, by the servers' clock:
//! - `host.<hex name>`: a host is alive;
//! - `part.<n>`: which host claims from partition `n` (see `ledger::partition`);
//! - `leader`: which host runs the jobs one host runs for all (reconcile);
//! - `pause`: a host that has the others stop delivering while it reconciles (see
//!   [`Leases::pause_others`]): they give up every partition, as to a host that should hold it,
//!   and take none until the key is gone.
//!
//! A host renews what it holds every [`RENEW`]. One that stops (a crash, a lost connection)
//! loses everything a `TTL` later, and the others take over: failover takes `TTL` plus a tick.
//!
//! Which host *should* hold a partition is decided by rendezvous hashing over the live hosts, so
//! every host computes the same answer without asking anyone, and a host joining or leaving moves
//! only its own share. A host gives up a partition another live host should hold: it stops
//! claiming from it, waits until nothing of it is in flight, then deletes the lease; the taker
//! creates it anew. A taker claims nothing before its fold has caught up with the stream, so it
//! has seen every outcome the previous holder recorded.
//!
//! A holder cut off from NATS stops claiming from its partitions once `TTL - MARGIN` has passed
//! since its last successful renewal began, which is before any other host can take them over. A
//! call already running then runs on to its end (at most the plugin's deadline); its outcome
//! cannot be recorded without NATS, so the next holder delivers that event again (at least once).
//! Should it reach NATS again (or a starved host wake up) after another host took over, neither
//! its outcome nor its kv writes overwrite what the new holder recorded since: each names the
//! version it replaces, and JetStream refuses a stale one (`Inner::mark`, `kv`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{patiently, unavailable, Inner};
use crate::ledger::partition::{score, PartitionSet, PARTITIONS};
use crate::ledger::{HostLeases, LedgerError, Membership};

/// How long a key outlives its last renewal; bounds failover.
pub(super) const TTL: Duration = Duration::from_secs(3);
/// How often a holder renews.
const RENEW: Duration = Duration::from_secs(1);
/// How often a host looks for partitions to take or give up.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// A holder stops claiming this long before its lease could expire on the server.
const MARGIN: Duration = Duration::from_secs(1);

const LEADER: &str = "leader";
const PAUSE: &str = "pause";

fn host_key(name: &str) -> String {
    // Host names are free text; KV keys are not.
    format!("host.{}", super::kv::hex(name.as_bytes()))
}

fn partition_key(partition: usize) -> String {
    format!("part.{partition}")
}

fn partition_of_key(key: &str) -> Option<usize> {
    key.strip_prefix("part.")?
        .parse()
        .ok()
        .filter(|&p| p < PARTITIONS)
}

/// What every key holds: the process that wrote it. A host restarted under the same name is a
/// new process, with a new nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    host: String,
    nonce: u64,
}

/// A key as this host last saw it written.
#[derive(Debug)]
struct Seen {
    holder: Option<Holder>,
    revision: u64,
    at: Instant,
}

impl Seen {
    fn fresh(&self) -> bool {
        self.at.elapsed() < TTL
    }
}

#[derive(Debug)]
struct Held {
    revision: u64,
    /// When the last successful write of it began.
    renewed: Instant,
}

impl Held {
    /// Whether this host may still act on it: past `TTL - MARGIN` since its last renewal began
    /// it is as good as lost, whatever the server says later.
    fn current(&self) -> bool {
        self.renewed.elapsed() < TTL - MARGIN
    }
}

impl State {
    /// Takes in one entry the watcher reports, seen at `now`. A write already seen is not seen
    /// again: a watcher started anew (by this host, or by the client when its server went away)
    /// reports every key's last write once more, and a lease written long ago, by a host that
    /// died since, must not look freshly renewed.
    fn saw(&mut self, entry: kv::Entry, now: Instant) {
        if self
            .seen
            .get(&entry.key)
            .is_some_and(|seen| seen.revision >= entry.revision)
        {
            return;
        }
        match entry.operation {
            kv::Operation::Put => {
                let seen = Seen {
                    holder: serde_json::from_slice(&entry.value).ok(),
                    revision: entry.revision,
                    at: now,
                };
                self.seen.insert(entry.key, seen);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.seen.remove(&entry.key);
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Every key of the bucket, as the watcher reported it.
    seen: HashMap<String, Seen>,
    /// The keys this host holds. The held partitions it has caught up on and claims from are
    /// the index's `held`.
    held: BTreeMap<String, Held>,
    /// This host's pauses of the others in progress; the `pause` key goes when the last ends.
    pauses: usize,
}

/// This host's part in sharing the stream. The lease task drives it; the ledger reads it.
pub(super) struct Leases {
    kv: kv::Store,
    me: Holder,
    /// A previous process under this host's name, proven dead when this one joined: its
    /// leases are taken back at once instead of waiting for them to expire.
    predecessor: Option<u64>,
    leader: watch::Sender<bool>,
    state: Mutex<State>,
}

impl Leases {
    /// Opens the bucket, announces this host, takes the partitions it should hold that are
    /// free, and starts the lease task. Refuses when a live process already runs under the same
    /// name: two of them would both believe they hold its partitions.
    pub(super) async fn join(
        inner: &Arc<Inner>,
        replicas: usize,
    ) -> Result<(Arc<Leases>, JoinHandle<()>), LedgerError> {
        let (js, stream, host) = (&inner.js, &inner.opts.stream, &inner.opts.client_name);
        let bucket = format!("{stream}_LEASES");
        let kv = patiently(&format!("opening the KV bucket `{bucket}`"), || async {
            let config = kv::Config {
                bucket: bucket.clone(),
                description: "which prismhook host holds which partition of the ledger".into(),
                history: 1,
                max_age: TTL,
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            };
            match js.create_key_value(config).await {
                Ok(kv) => Ok(kv),
                Err(_) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|e| unavailable(format!("opening the KV bucket `{bucket}`"), e)),
            }
        })
        .await?;
        let me = Holder {
            host: host.to_owned(),
            nonce: rand::random(),
        };
        let announce = format!("announcing host `{host}`");
        let (revision, predecessor) =
            patiently(&announce, || announce_host(&kv, &me, stream)).await?;
        let mut state = State::default();
        state.held.insert(
            host_key(host),
            Held {
                revision,
                renewed: Instant::now(),
            },
        );
        let watching = format!("watching the KV bucket `{bucket}`");
        let mut watcher = patiently(&watching, || async {
            kv.watch_with_history(">")
                .await
                .map_err(|e| unavailable(watching.clone(), e))
        })
        .await?;
        let leases = Arc::new(Leases {
            kv,
            me,
            predecessor,
            leader: watch::channel(false).0,
            state: Mutex::new(state),
        });
        leases.catch_up(&mut watcher).await;
        leases.tick(inner).await;
        let task = tokio::spawn(run(leases.clone(), inner.clone(), watcher));
        Ok((leases, task))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("lease state lock poisoned")
    }

    fn value(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.me)
            .expect("a holder serializes")
            .into()
    }

    /// Whether this host leads; changes as leadership moves.
    pub(super) fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Takes in what the watcher reports.
    fn saw(&self, entry: kv::Entry) {
        self.state().saw(entry, Instant::now());
    }

    /// Whether the watcher has stopped reporting: this host's own renewals succeed but do not
    /// come back through it (its consumer died with a server this host is not connected to).
    fn view_is_stale(&self) -> bool {
        let state = self.state();
        let key = host_key(&self.me.host);
        let Some(held) = state.held.get(&key) else {
            return false;
        };
        let seen_at = state.seen.get(&key).map(|s| s.at);
        held.renewed.elapsed() < RENEW * 2
            && seen_at.is_none_or(|at| held.renewed.saturating_duration_since(at) > RENEW * 2)
    }

    /// Reads what the bucket holds now, up to its latest entry.
    async fn catch_up(&self, watcher: &mut kv::Watch) {
        while let Ok(Some(Ok(entry))) =
            tokio::time::timeout(Duration::from_secs(2), watcher.next()).await
        {
            let last = entry.delta == 0;
            self.saw(entry);
            if last {
                break;
            }
        }
    }

    /// The hosts alive now, by name, this one included.
    fn live(state: &State, me: &str) -> BTreeSet<String> {
        let mut live: BTreeSet<String> = state
            .seen
            .iter()
            .filter(|(key, seen)| key.starts_with("host.") && seen.fresh())
            .filter_map(|(_, seen)| seen.holder.as_ref().map(|h| h.host.clone()))
            .collect();
        live.insert(me.to_owned());
        live
    }

    /// The live host that should hold a partition: the same answer on every host that sees the
    /// same live hosts.
    fn owner(partition: usize, live: &BTreeSet<String>) -> Option<&str> {
        live.iter()
            .max_by_key(|host| score(host, partition))
            .map(String::as_str)
    }

    /// Whether a key can be taken, and at which revision (0: create it).
    fn takeable(&self, state: &State, key: &str) -> Option<u64> {
        let seen = match state.seen.get(key) {
            None => return Some(0),
            // Not renewed for a TTL: expired on the server (which reports no expiry), or about to.
            Some(seen) if !seen.fresh() => return Some(0),
            Some(seen) => seen,
        };
        match &seen.holder {
            Some(h) if *h == self.me => Some(seen.revision),
            Some(h) if h.host == self.me.host && Some(h.nonce) == self.predecessor => {
                Some(seen.revision)
            }
            _ => None,
        }
    }

    /// Writes a key this host takes or renews; `revision` 0 creates it.
    async fn write(&self, key: &str, revision: u64) -> Result<u64, WriteError> {
        // A write that takes longer than a renewal period is no use to a lease, and must not
        // hold up the renewal of the others.
        tokio::time::timeout(RENEW, self.try_write(key, revision))
            .await
            .unwrap_or_else(|_| Err(WriteError::Unreachable("timed out".into())))
    }

    async fn try_write(&self, key: &str, revision: u64) -> Result<u64, WriteError> {
        if key == host_key(&self.me.host) {
            // This host's own key is nobody else's (a live namesake was refused at join): written
            // whatever revision it has, which a view that lagged may not know.
            return self
                .kv
                .put(key, self.value())
                .await
                .map_err(|e| WriteError::Unreachable(e.to_string()));
        }
        let refused = if revision == 0 {
            match self.kv.create(key, self.value()).await {
                Ok(revision) => return Ok(revision),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => e.to_string(),
                Err(e) => return Err(WriteError::Unreachable(e.to_string())),
            }
        } else {
            match self.kv.update(key, self.value(), revision).await {
                Ok(revision) => return Ok(revision),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => e.to_string(),
                Err(e) => return Err(WriteError::Unreachable(e.to_string())),
            }
        };
        self.ours_after_all(key, refused).await
    }

    /// Writes `key` as this process, as a renewal whose answer was lost leaves it: stored, at a
    /// revision this host does not know.
    #[cfg(test)]
    pub(super) async fn write_unanswered(&self, key: &str) {
        self.kv
            .put(key, self.value())
            .await
            .expect("the bucket takes it");
    }

    /// After a write refused for its revision: whether the key holds this process's own earlier
    /// write, stored though its answer never came (a renewal that timed out), so that the key is
    /// still this host's, at the revision found. Taken as another host's takeover, a lost answer
    /// would drop a lease nobody else holds, and with the `pause` the reconcile's hold on the
    /// other hosts.
    async fn ours_after_all(&self, key: &str, refused: String) -> Result<u64, WriteError> {
        let revision = match self.kv.entry(key).await {
            Ok(Some(entry))
                if entry.operation == kv::Operation::Put
                    && serde_json::from_slice::<Holder>(&entry.value).ok().as_ref()
                        == Some(&self.me) =>
            {
                entry.revision
            }
            Ok(_) => return Err(WriteError::Taken),
            Err(e) => {
                return Err(WriteError::Unreachable(format!(
                    "{refused}, then reading the key: {e}"
                )))
            }
        };
        // Written again now: the key's time to live runs from the lost
        // write, and the caller counts its hold from this one.
        self.kv
            .update(key, self.value(), revision)
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    WriteError::Taken
                } else {
                    WriteError::Unreachable(e.to_string())
                }
            })
    }

    /// One round: renew, give up, take, and tell the index what to claim from.
    async fn tick(&self, inner: &Inner) {
        // Renew what is due.
        let due: Vec<(String, u64)> = self
            .state()
            .held
            .iter()
            .filter(|(_, h)| h.renewed.elapsed() >= RENEW)
            .map(|(k, h)| (k.clone(), h.revision))
            .collect();
        let started = Instant::now();
        let renewals = join_all(due.iter().map(|(key, rev)| self.write(key, *rev))).await;
        {
            let mut state = self.state();
            for ((key, _), result) in due.into_iter().zip(renewals) {
                match result {
                    // Unless let go meanwhile (a pause that ended, the host leaving).
                    Ok(revision) => {
                        if let Some(held) = state.held.get_mut(&key) {
                            *held = Held {
                                revision,
                                renewed: started,
                            };
                        }
                    }
                    Err(WriteError::Taken) => {
                        warn!(key, "another host took over a lease this host held");
                        state.held.remove(&key);
                    }
                    Err(WriteError::Unreachable(error)) => {
                        warn!(key, %error, "cannot renew a lease; trying again");
                    }
                }
            }
            // The host's own key is not a lease: it is written again below.
            state
                .held
                .retain(|key, h| key.starts_with("host.") || h.current());
        }

        // Decide: what to give up, what to take.
        let (release, take) = {
            let state = self.state();
            let live = Self::live(&state, &self.me.host);
            let paused = self.paused_by_another(&state);
            let mut release = Vec::new();
            let mut take = Vec::new();
            // This host's own key, should it ever be dropped: announced again (written
            // whatever its revision, see `try_write`).
            let me = host_key(&self.me.host);
            if !state.held.contains_key(&me) {
                take.push((me, 0));
            }
            for partition in 0..PARTITIONS {
                let key = partition_key(partition);
                let mine = !paused && Self::owner(partition, &live) == Some(self.me.host.as_str());
                match (state.held.get(&key), mine) {
                    (Some(held), false) => release.push((partition, key, held.revision)),
                    (None, true) => {
                        if let Some(revision) = self.takeable(&state, &key) {
                            take.push((key, revision));
                        }
                    }
                    _ => {}
                }
            }
            if !state.held.contains_key(LEADER) {
                if let Some(revision) = self.takeable(&state, LEADER) {
                    take.push((LEADER.to_owned(), revision));
                }
            }
            (release, take)
        };

        // Giving up: claim nothing more from it, and let it go once nothing of it is in flight.
        let releasing: PartitionSet = release
            .iter()
            .fold(PartitionSet::NONE, |set, (p, ..)| set.with(*p));
        self.serve(inner, |serving| {
            release.iter().fold(serving, |set, (p, ..)| set.without(*p))
        });
        // Concurrently, as the renewals: one at a time, a slow server would hold up the next
        // round's renewals by a second a partition.
        let in_flight = inner.state().index.in_flight_partitions();
        let release: Vec<_> = release
            .into_iter()
            .filter(|(partition, ..)| !in_flight.contains(*partition))
            .collect();
        let deletes = release.iter().map(|(_, key, revision)| {
            let delete = self.kv.delete_expect_revision(key, Some(*revision));
            async move {
                tokio::time::timeout(RENEW, delete)
                    .await
                    .unwrap_or_else(|_| Err(kv::DeleteError::new(kv::DeleteErrorKind::TimedOut)))
            }
        });
        let deleted = join_all(deletes).await;
        for ((partition, key, _), result) in release.into_iter().zip(deleted) {
            match result {
                Ok(()) => {
                    self.state().held.remove(&key);
                    info!(
                        partition,
                        "gave up a partition to the host that should hold it"
                    );
                }
                Err(error) => warn!(partition, %error, "cannot give up a partition; trying again"),
            }
        }

        let started = Instant::now();
        let taken = join_all(take.iter().map(|(key, rev)| self.write(key, *rev))).await;
        let mut gained = PartitionSet::NONE;
        {
            let mut state = self.state();
            for ((key, _), result) in take.into_iter().zip(taken) {
                if let Ok(revision) = result {
                    if let Some(p) = partition_of_key(&key) {
                        gained = gained.with(p);
                    } else if key == LEADER {
                        info!(host = %self.me.host, "this host leads now");
                    }
                    state.held.insert(
                        key,
                        Held {
                            revision,
                            renewed: started,
                        },
                    );
                }
            }
        }

        // Held but not yet served: serve once the fold has everything the previous holder
        // recorded. Partitions this host is giving up stay unserved.
        let serving = inner.state().index.held;
        let waiting: PartitionSet = self
            .state()
            .held
            .keys()
            .filter_map(|k| partition_of_key(k))
            .filter(|&p| !serving.contains(p) && !releasing.contains(p))
            .fold(PartitionSet::NONE, |set, p| set.with(p));
        // Not waited for long: the leases must be renewed meanwhile. What is not caught up
        // with now is tried again next round.
        if !waiting.is_empty() && inner.caught_up(TICK).await.is_ok() {
            self.serve(inner, |serving| {
                waiting.iter().fold(serving, |set, p| set.with(p))
            });
            info!(
                partitions = ?waiting.iter().collect::<Vec<_>>(),
                taken = gained.len(),
                "serving partitions"
            );
        }
        // Lost ones (expired or taken) are not served either.
        self.serve(inner, |serving| {
            let state = self.state();
            serving
                .iter()
                .filter(|&p| state.held.contains_key(&partition_key(p)))
                .fold(PartitionSet::NONE, |set, p| set.with(p))
        });
        let leads = self.state().held.contains_key(LEADER);
        self.leader
            .send_if_modified(|l| std::mem::replace(l, leads) != leads);
    }

    /// Changes the partitions this host claims from (the index's `held`), and wakes the
    /// dispatchers when some became this host's.
    fn serve(&self, inner: &Inner, change: impl FnOnce(PartitionSet) -> PartitionSet) {
        let before = inner.state().index.held;
        let after = change(before);
        if after == before {
            return;
        }
        inner.state().index.held = after;
        if after.iter().any(|p| !before.contains(p)) {
            inner.notifiers.wake_all();
        }
    }

    /// The partitions whose leases this host renewed recently enough to claim from now. The lease
    /// task drops the others from the index's `held` on its next round; a claim does not wait for
    /// that round, which a busy machine can hold back past the lease's end.
    pub(super) fn claimable(&self) -> PartitionSet {
        self.state()
            .held
            .iter()
            .filter(|(_, h)| h.current())
            .filter_map(|(key, _)| partition_of_key(key))
            .fold(PartitionSet::NONE, |set, p| set.with(p))
    }

    /// Whether another process holds the `pause`: this host then serves no partition.
    fn paused_by_another(&self, state: &State) -> bool {
        state
            .seen
            .get(PAUSE)
            .is_some_and(|s| s.fresh() && s.holder.as_ref() != Some(&self.me))
    }

    /// The other hosts that hold a partition, as this host sees the leases.
    fn others_holding(&self, state: &State) -> BTreeSet<String> {
        (0..PARTITIONS)
            .filter_map(|p| state.seen.get(&partition_key(p)))
            .filter(|s| s.fresh())
            .filter_map(|s| s.holder.as_ref())
            .filter(|h| **h != self.me)
            .map(|h| h.host.clone())
            .collect()
    }

    /// Has every other host stop delivering: takes the `pause` key (renewed with the other
    /// leases), then waits until no other host holds a partition, that is until each has
    /// finished what it had in flight and let its partitions go. This host serves on. Fails
    /// after `limit`, the pause undone; a pause another host holds is waited for meanwhile.
    pub(super) async fn pause_others(&self, limit: Duration) -> Result<(), LedgerError> {
        self.state().pauses += 1;
        let paused = self.hold_pause(limit).await;
        if paused.is_err() {
            self.resume_others().await;
        }
        paused
    }

    async fn hold_pause(&self, limit: Duration) -> Result<(), LedgerError> {
        let started = Instant::now();
        loop {
            let (take, others) = {
                let state = self.state();
                let take = (!state.held.contains_key(PAUSE)).then(|| self.takeable(&state, PAUSE));
                (take, self.others_holding(&state))
            };
            match take {
                Some(Some(revision)) => {
                    let began = Instant::now();
                    if let Ok(revision) = self.write(PAUSE, revision).await {
                        let held = Held {
                            revision,
                            renewed: began,
                        };
                        self.state().held.insert(PAUSE.to_owned(), held);
                        info!(host = %self.me.host, "pausing the other hosts");
                        continue;
                    }
                }
                None if others.is_empty() => return Ok(()),
                // Another host's pause (wait for it to end), or still in flight elsewhere.
                _ => {}
            }
            if started.elapsed() >= limit {
                let waiting = if take.is_some() {
                    "another host's pause to end".to_owned()
                } else {
                    format!("{others:?} to finish their deliveries")
                };
                return Err(LedgerError::Unavailable {
                    context: format!("pausing the other hosts: waited {limit:?} for {waiting}"),
                    retry_after: RENEW,
                    source: "the other hosts did not pause in time".into(),
                });
            }
            tokio::time::sleep(TICK / 5).await;
        }
    }

    /// Ends one [`Leases::pause_others`]; the last to end deletes the `pause` key (best effort:
    /// one left behind expires a `TTL` later).
    pub(super) async fn resume_others(&self) {
        let revision = {
            let mut state = self.state();
            state.pauses = state.pauses.saturating_sub(1);
            if state.pauses > 0 {
                return;
            }
            match state.held.remove(PAUSE) {
                Some(held) => held.revision,
                None => return,
            }
        };
        // At the revision this host wrote: a pause of another host's since (this one's had
        // lapsed) is not this host's to end.
        let delete = self.kv.delete_expect_revision(PAUSE, Some(revision));
        match tokio::time::timeout(RENEW, delete).await {
            Ok(Ok(())) => info!(host = %self.me.host, "the other hosts deliver again"),
            Ok(Err(error)) => warn!(%error, "cannot end the pause of the other hosts; it expires"),
            Err(_) => warn!("ending the pause of the other hosts timed out; it expires"),
        }
    }

    /// Gives up at once what nothing is in flight in, so that the other hosts take it over
    /// without waiting for the leases to expire. A partition with a call still running (one that
    /// outlived the shutdown's deadline) is left to expire instead: handed over now, its events
    /// would be delivered again while the call still acts on them. Best effort: what cannot be
    /// deleted expires too.
    pub(super) async fn leave(&self, in_flight: PartitionSet) {
        let held: Vec<(String, u64)> = self
            .state()
            .held
            .iter()
            .filter(|(key, _)| partition_of_key(key).is_none_or(|p| !in_flight.contains(p)))
            .map(|(k, h)| (k.clone(), h.revision))
            .collect();
        if !in_flight.is_empty() {
            warn!(
                partitions = ?in_flight.iter().collect::<Vec<_>>(),
                "calls still running at close: their partitions pass to the other hosts when \
                 the leases expire"
            );
        }
        let deletes = held
            .iter()
            .map(|(key, rev)| self.kv.delete_expect_revision(key, Some(*rev)));
        let _ = tokio::time::timeout(Duration::from_secs(2), join_all(deletes)).await;
        self.state().held.clear();
        self.leader.send_replace(false);
    }

    /// The hosts sharing the stream and what each holds, as this host sees it; the ledger adds
    /// what only its index knows (what this host serves, and the lag).
    pub(super) fn membership(&self) -> Membership {
        let state = self.state();
        let mut hosts: BTreeMap<String, HostLeases> = BTreeMap::new();
        let mut entry = |name: &str, seen_ms_ago: u64| {
            hosts
                .entry(name.to_owned())
                .or_insert_with(|| HostLeases {
                    name: name.to_owned(),
                    me: name == self.me.host,
                    leader: false,
                    partitions: Vec::new(),
                    seen_ms_ago,
                })
                .seen_ms_ago = seen_ms_ago
        };
        for (key, seen) in &state.seen {
            if let (true, true, Some(h)) = (key.starts_with("host."), seen.fresh(), &seen.holder) {
                entry(&h.host, seen.at.elapsed().as_millis() as u64);
            }
        }
        entry(&self.me.host, 0);
        let mut unheld = Vec::new();
        let mut leader = None;
        for partition in 0..PARTITIONS {
            let holder = state
                .seen
                .get(&partition_key(partition))
                .filter(|s| s.fresh())
                .and_then(|s| s.holder.as_ref());
            match holder.and_then(|h| hosts.get_mut(&h.host)) {
                Some(host) => host.partitions.push(partition),
                None => unheld.push(partition),
            }
        }
        if let Some(h) = state
            .seen
            .get(LEADER)
            .filter(|s| s.fresh())
            .and_then(|s| s.holder.as_ref())
        {
            leader = Some(h.host.clone());
            if let Some(host) = hosts.get_mut(&h.host) {
                host.leader = true;
            }
        }
        Membership {
            me: self.me.host.clone(),
            leader,
            hosts: hosts.into_values().collect(),
            unheld,
            serving: Vec::new(),
            lag: Vec::new(),
        }
    }
}

enum WriteError {
    /// Someone else holds it.
    Taken,
    Unreachable(String),
}

/// Writes this host's key; returns its revision and the nonce of the process it replaces, if a
/// process of the same name left its key behind. Refuses when that process still renews it.
async fn announce_host(
    kv: &kv::Store,
    me: &Holder,
    stream: &str,
) -> Result<(u64, Option<u64>), LedgerError> {
    let host = &me.host;
    let value: bytes::Bytes = serde_json::to_vec(me).expect("a holder serializes").into();
    let key = host_key(host);
    match kv.create(&key, value.clone()).await {
        Ok(revision) => Ok((revision, None)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            // Either a process of this name that crashed (its key lives on until it expires) or
            // one that runs: only the second renews it meanwhile.
            let before = entry(kv, &key).await?;
            tokio::time::sleep(RENEW * 3 / 2).await;
            let after = entry(kv, &key).await?;
            if let (Some(before), Some(after)) = (&before, &after) {
                if before.1 != after.1 && after.0.as_ref() != Some(me) {
                    return Err(LedgerError::InUse {
                        what: format!("host name `{host}` on stream `{stream}`"),
                        holder: host.to_owned(),
                        hint: "another running prismhook uses this `instance` name; give \
                               every host a name of its own"
                            .into(),
                    });
                }
            }
            let predecessor = after.and_then(|(holder, _)| holder).map(|h| h.nonce);
            let revision = kv
                .put(&key, value)
                .await
                .map_err(|e| unavailable(format!("announcing host `{host}`"), e))?;
            Ok((revision, predecessor.filter(|&n| n != me.nonce)))
        }
        Err(e) => Err(unavailable(format!("announcing host `{host}`"), e)),
    }
}

async fn entry(kv: &kv::Store, key: &str) -> Result<Option<(Option<Holder>, u64)>, LedgerError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| unavailable(format!("reading `{key}` of the leases"), e))?;
    Ok(entry
        .filter(|e| e.operation == kv::Operation::Put)
        .map(|e| (serde_json::from_slice(&e.value).ok(), e.revision)))
}

/// The lease task: follows the bucket and ticks until the ledger closes.
async fn run(leases: Arc<Leases>, inner: Arc<Inner>, watcher: kv::Watch) {
    let mut watcher = Some(watcher);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = async {
            match watcher.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            entry = next => match entry {
                Some(Ok(entry)) => leases.saw(entry),
                Some(Err(error)) => {
                    warn!(%error, "the view of the leases was interrupted; resuming");
                    watcher = None;
                }
                None => watcher = None,
            },
            _ = tick.tick() => {
                if watcher.is_some() && leases.view_is_stale() {
                    warn!("the view of the leases stopped; watching them again");
                    watcher = None;
                }
                if watcher.is_none() {
                    // Keys stay as last seen: a lease seen fresh stays so until its TTL,
                    // which errs on the side of not taking what may still be held. What the
                    // new watcher reports again is not news (`State::saw`).
                    watcher = leases.kv.watch_with_history(">").await.ok();
                }
                leases.tick(&inner).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_computes_the_same_owner_and_a_leaving_host_moves_only_its_share() {
        let three: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let two: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let mut counts = HashMap::new();
        for p in 0..PARTITIONS {
            let owner = Leases::owner(p, &three).unwrap();
            *counts.entry(owner).or_insert(0) += 1;
            if owner != "c" {
                assert_eq!(Leases::owner(p, &two), Some(owner), "partition {p} moved");
            }
        }
        assert_eq!(counts.len(), 3, "every host gets a share: {counts:?}");
        assert!(counts.values().all(|&n| n >= 5), "{counts:?}");
    }

    fn entry(key: &str, revision: u64, operation: kv::Operation) -> kv::Entry {
        let holder = Holder {
            host: "b".into(),
            nonce: 7,
        };
        kv::Entry {
            bucket: "PRISMHOOK_LEASES".into(),
            key: key.into(),
            value: serde_json::to_vec(&holder).unwrap().into(),
            revision,
            delta: 0,
            created: async_nats::datetime::parse_rfc3339("2026-12-05T00:00:00Z").unwrap(),
            operation,
            seen_current: true,
        }
    }

    /// A watcher started again reports the last write of every key once more: a dead host's
    /// lease keeps the age it had, so the others take it over on time.
    #[test]
    fn a_lease_reported_again_by_a_new_watcher_does_not_look_renewed() {
        let mut state = State::default();
        let written = Instant::now() - TTL;
        state.saw(entry("part.3", 10, kv::Operation::Put), written);
        assert!(!state.seen["part.3"].fresh());

        state.saw(entry("part.3", 10, kv::Operation::Put), Instant::now());
        assert!(
            !state.seen["part.3"].fresh(),
            "the same write, reported again"
        );
        state.saw(entry("part.3", 11, kv::Operation::Put), Instant::now());
        assert!(state.seen["part.3"].fresh(), "a renewal");

        // A delete reported again after the key was written anew does not undo the new write.
        state.saw(entry("part.3", 12, kv::Operation::Delete), Instant::now());
        assert!(!state.seen.contains_key("part.3"));
        state.saw(entry("part.3", 13, kv::Operation::Put), Instant::now());
        state.saw(entry("part.3", 12, kv::Operation::Delete), Instant::now());
        assert_eq!(state.seen["part.3"].revision, 13);
    }
}
