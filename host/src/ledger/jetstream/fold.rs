//! The JetStream ledger's memory: the stream folded, message by message in sequence order, into
//! the same index the embedded ledger keeps.
//!
//! Every host folds the whole stream, so every host's view converges on the same state; a host
//! changes state only by publishing, and sees its own change when the fold reaches it. What is in
//! flight is the one thing not in the stream (it never is, in any backend).

use std::collections::{BTreeMap, HashMap};

use tracing::warn;

use super::wire::{EventRecord, Mark, Subject, Subjects};
use crate::ledger::delivery::{DeliveryRecord, DeliveryState};
use crate::ledger::index::{lane_key, Index};
use crate::ledger::StoredEvent;

/// At most this many bytes of bodies are cached, whatever the number of events.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, Default)]
pub(super) struct State {
    /// Recent events kept whole, so that claiming them costs no round trip to the stream.
    cache_events: usize,
    pub index: Index,
    /// The records of deliveries that failed or died, by plugin and event id.
    pub records: HashMap<(String, u64), DeliveryRecord>,
    /// The stream sequence of the latest mark of each delivery not yet done, by plugin and event
    /// id (none: the delivery has no mark). Marking an outcome names it, so that a mark this
    /// host's fold had not seen yet, another host's, is not overwritten (see `Inner::mark`).
    pub last_marks: HashMap<(String, u64), u64>,
    /// Recently appended events, by id; the oldest are evicted first.
    cache: BTreeMap<u64, StoredEvent>,
    cache_bytes: usize,
    /// The highest stream sequence folded in.
    pub applied: u64,
}

impl State {
    pub fn new(cache_events: usize) -> Self {
        Self {
            cache_events,
            ..Self::default()
        }
    }

    pub fn cached(&self, id: u64) -> Option<StoredEvent> {
        self.cache.get(&id).cloned()
    }

    fn remember(&mut self, event: StoredEvent) {
        if self.cache_events == 0 {
            return;
        }
        self.cache_bytes += event.body.len();
        self.cache.insert(event.id, event);
        while self.cache.len() > self.cache_events || self.cache_bytes > CACHE_BYTES {
            let Some((_, old)) = self.cache.pop_first() else {
                break;
            };
            self.cache_bytes -= old.body.len();
        }
    }

    /// Folds in one message; returns the plugins that may have something new to claim. A message
    /// that cannot be read is logged and skipped: one bad record must not stop the ledger.
    pub fn apply(
        &mut self,
        subjects: &Subjects,
        seq: u64,
        subject: &str,
        payload: &[u8],
    ) -> Vec<String> {
        self.applied = self.applied.max(seq);
        match subjects.parse(subject) {
            Subject::Event => match serde_json::from_slice::<EventRecord>(payload) {
                Ok(record) => {
                    let (event, plugins) = record.stored(seq);
                    let lane = lane_key(&event.cluster, &event.entity_uuid, seq);
                    for plugin in &plugins {
                        self.index.add_pending(
                            plugin,
                            seq,
                            lane.clone(),
                            event.received_at_ms,
                            None,
                        );
                    }
                    if !plugins.is_empty() {
                        self.remember(event);
                    }
                    plugins
                }
                Err(error) => {
                    warn!(seq, subject, %error, "skipping an event record that cannot be read");
                    Vec::new()
                }
            },
            Subject::Delivery { id, plugin } => match serde_json::from_slice::<Mark>(payload) {
                Ok(mark) => {
                    self.apply_mark(seq, id, plugin, mark);
                    vec![plugin.to_owned()]
                }
                Err(error) => {
                    warn!(seq, subject, %error, "skipping a delivery mark that cannot be read");
                    Vec::new()
                }
            },
            Subject::Other => Vec::new(),
        }
    }

    /// The sequence a new mark of this delivery must find its subject at: its latest mark's, or
    /// 0 for none.
    pub fn last_mark(&self, plugin: &str, id: u64) -> u64 {
        self.last_marks
            .get(&(plugin.to_owned(), id))
            .copied()
            .unwrap_or(0)
    }

    fn apply_mark(&mut self, seq: u64, id: u64, plugin: &str, mark: Mark) {
        let key = (plugin.to_owned(), id);
        // A done or dropped delivery is never claimed again: nothing will name its mark.
        if matches!(mark, Mark::Record { .. }) {
            self.last_marks.insert(key.clone(), seq);
        } else {
            self.last_marks.remove(&key);
        }
        match mark {
            Mark::Done => {
                self.records.remove(&key);
                if self.index.lane_of(id).is_some() {
                    self.index.mark_done(plugin, id);
                } else {
                    self.index.count_delivered(plugin);
                }
            }
            Mark::Dropped => {
                self.records.remove(&key);
                self.index.forget_dead(plugin, id);
            }
            Mark::Record {
                record,
                lane,
                received_at_ms,
            } => match (record.state, record.failure()) {
                (DeliveryState::Dead, _) => {
                    if !self.index.knows(plugin, id) {
                        self.index.add_dead(plugin, id, lane.into(), received_at_ms);
                    } else {
                        self.index.mark_dead(plugin, id);
                    }
                    self.records.insert(key, record);
                }
                (DeliveryState::Pending, failure) => {
                    // A dead letter replayed comes back with a fresh count; a delivery the
                    // index does not know is new (a replay, or one found on open).
                    self.index.revive(plugin, id);
                    if !self.index.knows(plugin, id) {
                        self.index
                            .add_pending(plugin, id, lane.into(), received_at_ms, failure);
                    } else if let Some(failure) = failure {
                        self.index.mark_retry(plugin, id, failure);
                    }
                    if failure.is_some() {
                        self.records.insert(key, record);
                    } else {
                        self.records.remove(&key);
                    }
                }
            },
        }
    }
}
