//! The in-memory view of every undelivered delivery, so that claiming work never scans the database.
//!
//! Every backend keeps one. The backend's storage is the source of truth; the index is rebuilt
//! from it on open and is only changed (a) after the storage holds the change (a redb commit, a
//! JetStream acknowledgement), and (b) by `claim`/`release`, which only move deliveries between
//! *pending* and *in flight* — a state that is deliberately never stored, because after a crash
//! every in-flight delivery must be delivered again anyway (at least once).
//!
//! Per plugin, undelivered events are kept in *lanes*, one per entity (cluster + entity uuid),
//! each a queue of event ids in arrival order. Each lane belongs to a partition (see
//! `partition`), and within its partition it is in exactly one of three places:
//! - `ready`, keyed by its head event id, when nothing of it is in flight and its head is due;
//! - `waiting`, keyed by (due time, head id), when its head waits for a retry time;
//! - nowhere, while some of its events are in flight, or when it is empty (then it is removed).
//!
//! Claiming is then a k-way merge in id order over the ready lanes of the partitions this host
//! holds: take the lane with the smallest head, then keep taking whichever of the ready heads or
//! the next events of already-taken lanes has the smallest id. That gives per-entity order (a
//! lane with anything in flight is never offered), fairness between entities (global arrival
//! order), and batches that mix entities and may hold several consecutive events of one. A
//! host alone holds every partition; hosts sharing a ledger hold disjoint sets of them.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use crate::ledger::partition::{partition_of, PartitionSet, PARTITIONS};
use crate::ledger::sharded::Sharded;
use crate::ledger::{DeadLetterCursor, PartitionLag, PluginBacklog};

/// Identifies a lane: the entity whose events must stay in order.
pub(crate) type LaneKey = Arc<str>;

/// The lane of an event. Events without an entity uuid have no order to keep, so each gets a lane
/// of its own instead of queueing behind every other such event of its cluster.
pub(crate) fn lane_key(cluster: &str, entity_uuid: &str, id: u64) -> LaneKey {
    if entity_uuid.is_empty() {
        format!("\u{1f}{id}").into()
    } else {
        format!("{cluster}\u{1f}{entity_uuid}").into()
    }
}

/// The partition an entity's events fall in (for tools and benchmarks; the ledger works from
/// lanes).
pub fn partition_of_entity(cluster: &str, entity_uuid: &str) -> usize {
    partition_of(&lane_key(cluster, entity_uuid, 0))
}

/// What the index remembers of an event while any plugin still has a delivery of it
/// (pending, in flight or dead). Events absent from the map are fully delivered and may be pruned.
#[derive(Debug)]
pub(crate) struct EventInfo {
    pub lane: LaneKey,
    pub received_at_ms: u64,
    /// Deliveries of this event that are pending, in flight or dead, over all plugins.
    pub outstanding: u32,
}

/// A delivery that has failed before: how often, and when it may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    pub attempts: u32,
    pub due_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Idle,
    Ready(u64),
    Waiting(u64, u64),
}

#[derive(Debug)]
struct Lane {
    /// Undelivered, not dead, ascending ids; while the lane has something in flight, those ids
    /// are a prefix of the queue.
    queue: VecDeque<u64>,
    in_flight: usize,
    slot: Slot,
    partition: usize,
}

/// One partition's schedulable lanes.
#[derive(Debug, Default)]
struct Part {
    ready: BTreeMap<u64, LaneKey>,
    waiting: BTreeMap<(u64, u64), LaneKey>,
    /// The heads in `waiting`, by id, so that the oldest is found without walking every lane.
    waiting_heads: BTreeSet<u64>,
    /// Undelivered ids queued in this partition's lanes (ready, waiting, in flight or idle).
    undelivered: u64,
}

#[derive(Debug)]
pub(crate) struct PluginIndex {
    lanes: Sharded<LaneKey, Lane>,
    parts: Box<[Part]>,
    in_flight: HashSet<u64>,
    /// Deliveries that have failed at least once and are not done or dead.
    failed: Sharded<u64, Failure>,
    dead: BTreeSet<u64>,
    /// Done deliveries, all time (persisted in the meta table).
    pub delivered: u64,
}

impl Default for PluginIndex {
    fn default() -> Self {
        PluginIndex {
            lanes: Sharded::default(),
            parts: (0..PARTITIONS).map(|_| Part::default()).collect(),
            in_flight: HashSet::new(),
            failed: Sharded::default(),
            dead: BTreeSet::new(),
            delivered: 0,
        }
    }
}

impl PluginIndex {
    /// Pending plus in-flight deliveries.
    fn undelivered(&self) -> u64 {
        self.parts.iter().map(|part| part.undelivered).sum()
    }

    /// Queues a delivery in its lane; returns whether it was not queued already.
    fn enqueue(&mut self, id: u64, lane: &LaneKey) -> bool {
        let entry = self.lanes.entry(lane.clone()).or_insert_with(|| Lane {
            queue: VecDeque::new(),
            in_flight: 0,
            slot: Slot::Idle,
            partition: partition_of(lane),
        });
        // Appends arrive in id order; only replays insert in the middle.
        match entry.queue.back() {
            Some(&last) if last > id => {
                let at = entry.queue.partition_point(|&x| x < id);
                if entry.queue.get(at) == Some(&id) {
                    return false;
                }
                entry.queue.insert(at, id);
            }
            Some(&last) if last == id => return false,
            _ => entry.queue.push_back(id),
        }
        self.parts[entry.partition].undelivered += 1;
        if entry.in_flight == 0 {
            self.reschedule(lane);
        }
        true
    }

    /// Puts a lane back where it belongs after its head or in-flight count changed.
    fn reschedule(&mut self, key: &LaneKey) {
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        let part = &mut self.parts[lane.partition];
        match lane.slot {
            Slot::Idle => {}
            Slot::Ready(head) => {
                part.ready.remove(&head);
            }
            Slot::Waiting(due, head) => {
                part.waiting.remove(&(due, head));
                part.waiting_heads.remove(&head);
            }
        }
        lane.slot = Slot::Idle;
        if lane.in_flight > 0 {
            return;
        }
        let Some(&head) = lane.queue.front() else {
            self.lanes.remove(key);
            return;
        };
        match self.failed.get(&head) {
            Some(f) if f.due_at_ms > 0 => {
                part.waiting.insert((f.due_at_ms, head), key.clone());
                part.waiting_heads.insert(head);
                lane.slot = Slot::Waiting(f.due_at_ms, head);
            }
            _ => {
                part.ready.insert(head, key.clone());
                lane.slot = Slot::Ready(head);
            }
        }
    }

    /// Moves lanes whose retry time has come from `waiting` to `ready`.
    fn promote(&mut self, now_ms: u64, held: PartitionSet) {
        for p in held.iter() {
            let part = &mut self.parts[p];
            while let Some(entry) = part.waiting.first_entry() {
                let (due, head) = *entry.key();
                if due > now_ms {
                    break;
                }
                let key = entry.remove();
                part.waiting_heads.remove(&head);
                if let Some(lane) = self.lanes.get_mut(&key) {
                    lane.slot = Slot::Ready(head);
                }
                part.ready.insert(head, key);
            }
        }
    }

    /// The smallest ready head over the held partitions, with its partition.
    fn first_ready(&self, held: PartitionSet) -> Option<(u64, usize)> {
        held.iter()
            .filter_map(|p| {
                self.parts[p]
                    .ready
                    .first_key_value()
                    .map(|(&id, _)| (id, p))
            })
            .min()
    }

    fn is_due(&self, id: u64, now_ms: u64) -> bool {
        self.failed.get(&id).is_none_or(|f| f.due_at_ms <= now_ms)
    }

    /// Takes up to `max` due deliveries in id order and marks them in flight; returns each id
    /// with the 1-based number of the attempt about to be made.
    fn claim(&mut self, now_ms: u64, max: usize, held: PartitionSet) -> Vec<(u64, u32)> {
        self.promote(now_ms, held);
        let mut out = Vec::new();
        // Next candidate of each lane already taken in this claim, by id, with its queue position.
        let mut frontier: BTreeMap<u64, (LaneKey, usize)> = BTreeMap::new();
        while out.len() < max {
            let ready = self.first_ready(held);
            let take_ready = match (ready, frontier.first_key_value()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((r, _)), Some((f, _))) => r < *f,
            };
            let (id, key, pos) = if let (true, Some((_, p))) = (take_ready, ready) {
                let (id, key) = self.parts[p].ready.pop_first().expect("checked non-empty");
                (id, key, 0)
            } else {
                let (id, (key, pos)) = frontier.pop_first().expect("checked non-empty");
                (id, key, pos)
            };
            let lane = self.lanes.get_mut(&key).expect("a scheduled lane exists");
            debug_assert_eq!(lane.queue.get(pos), Some(&id));
            lane.slot = Slot::Idle;
            lane.in_flight += 1;
            let next = lane.queue.get(pos + 1).copied();
            self.in_flight.insert(id);
            let attempt = self.failed.get(&id).map_or(0, |f| f.attempts) + 1;
            out.push((id, attempt));
            if let Some(next) = next.filter(|&n| self.is_due(n, now_ms)) {
                frontier.insert(next, (key, pos + 1));
            }
        }
        out
    }

    /// Ends an in-flight delivery (if it was in flight) and returns whether it was.
    fn land(&mut self, id: u64, lane: &LaneKey) -> bool {
        let was = self.in_flight.remove(&id);
        if was {
            if let Some(l) = self.lanes.get_mut(lane) {
                l.in_flight = l.in_flight.saturating_sub(1);
            }
        }
        was
    }

    /// Removes a delivery from its lane; returns whether it was there.
    fn dequeue(&mut self, id: u64, lane: &LaneKey) -> bool {
        let Some(l) = self.lanes.get_mut(lane) else {
            return false;
        };
        match l.queue.binary_search(&id) {
            Ok(at) => {
                l.queue.remove(at);
                self.parts[l.partition].undelivered -= 1;
                true
            }
            Err(_) => false,
        }
    }

    fn settle(&mut self, lane: &LaneKey) {
        if self.lanes.get(lane).is_some_and(|l| l.in_flight == 0) {
            self.reschedule(lane);
        }
    }

    /// The earliest time something of this plugin is claimable: `Some(0)` when something is due
    /// now, `None` when nothing is waiting (in-flight lanes are not counted: completing them
    /// signals the notifier).
    fn next_due_ms(&self, held: PartitionSet) -> Option<u64> {
        let mut due = None;
        for p in held.iter() {
            let part = &self.parts[p];
            if !part.ready.is_empty() {
                return Some(0);
            }
            if let Some(&(at, _)) = part.waiting.keys().next() {
                due = Some(due.map_or(at, |d: u64| d.min(at)));
            }
        }
        due
    }

    /// Per partition, the smallest id at the head of a lane. A lane with nothing in flight is
    /// ready or waiting under its head; one with something in flight is found from those
    /// deliveries. So this reads the partitions' first entries and the lanes of what is in
    /// flight, not every lane: `/metrics` asks on every scrape, under the index lock, and a
    /// backlog can be millions of lanes.
    fn oldest_heads(&self, events: &Sharded<u64, EventInfo>) -> Vec<Option<u64>> {
        let mut heads: Vec<Option<u64>> = self
            .parts
            .iter()
            .map(|part| {
                let ready = part.ready.keys().next();
                ready
                    .into_iter()
                    .chain(part.waiting_heads.first())
                    .copied()
                    .min()
            })
            .collect();
        for id in &self.in_flight {
            let Some(lane) = events.get(id).and_then(|e| self.lanes.get(&e.lane)) else {
                continue;
            };
            if let Some(&head) = lane.queue.front() {
                let oldest = &mut heads[lane.partition];
                *oldest = Some(oldest.map_or(head, |o| o.min(head)));
            }
        }
        heads
    }

    fn backlog(&self, plugin: &str, events: &Sharded<u64, EventInfo>) -> PluginBacklog {
        // Ids follow arrival, so the smallest head is the oldest undelivered event.
        let oldest_pending_ms = self
            .oldest_heads(events)
            .into_iter()
            .flatten()
            .min()
            .and_then(|id| events.get(&id))
            .map(|e| e.received_at_ms);
        PluginBacklog {
            plugin: plugin.to_owned(),
            pending: self.undelivered() - self.in_flight.len() as u64,
            in_flight: self.in_flight.len() as u64,
            // Counted from the few in flight, not by walking every failed delivery (with a
            // firewall down, that is every one).
            retrying: (self.failed.len()
                - self
                    .in_flight
                    .iter()
                    .filter(|id| self.failed.contains_key(*id))
                    .count()) as u64,
            dead: self.dead.len() as u64,
            delivered: self.delivered,
            oldest_pending_ms,
        }
    }
}

/// Every plugin's lanes plus the events they refer to.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub plugins: BTreeMap<String, PluginIndex>,
    pub events: Sharded<u64, EventInfo>,
    /// Pending plus in-flight deliveries over all plugins (what backpressure limits).
    pub undelivered: u64,
    /// The partitions this host claims from; all of them unless it shares the ledger.
    pub held: PartitionSet,
}

/// Every partition, nothing undelivered.
fn no_lag() -> Vec<PartitionLag> {
    (0..PARTITIONS)
        .map(|partition| PartitionLag {
            partition,
            undelivered: 0,
            oldest_undelivered_ms: None,
        })
        .collect()
}

impl Index {
    fn plugin(&mut self, name: &str) -> &mut PluginIndex {
        if !self.plugins.contains_key(name) {
            self.plugins.insert(name.to_owned(), PluginIndex::default());
        }
        self.plugins.get_mut(name).expect("just inserted")
    }

    /// The lane of a known event, or a new entry for it.
    fn hold(&mut self, id: u64, lane: LaneKey, received_at_ms: u64) -> LaneKey {
        let info = self.events.entry(id).or_insert(EventInfo {
            lane,
            received_at_ms,
            outstanding: 0,
        });
        info.outstanding += 1;
        info.lane.clone()
    }

    fn let_go(&mut self, id: u64) {
        if let Some(info) = self.events.get_mut(&id) {
            info.outstanding = info.outstanding.saturating_sub(1);
            if info.outstanding == 0 {
                self.events.remove(&id);
            }
        }
    }

    pub fn lane_of(&self, id: u64) -> Option<LaneKey> {
        self.events.get(&id).map(|e| e.lane.clone())
    }

    /// A new pending delivery (append, replay, or rebuilt on open with its earlier failures).
    pub fn add_pending(
        &mut self,
        plugin: &str,
        id: u64,
        lane: LaneKey,
        received_at_ms: u64,
        failure: Option<Failure>,
    ) {
        let lane = self.hold(id, lane, received_at_ms);
        let p = self.plugin(plugin);
        if let Some(f) = failure {
            p.failed.insert(id, f);
        }
        if p.enqueue(id, &lane) {
            self.undelivered += 1;
        }
    }

    /// A dead letter found on open.
    pub fn add_dead(&mut self, plugin: &str, id: u64, lane: LaneKey, received_at_ms: u64) {
        self.hold(id, lane, received_at_ms);
        self.plugin(plugin).dead.insert(id);
    }

    /// Makes sure a plugin shows up in the backlog, with its all-time delivered count.
    pub fn know_plugin(&mut self, plugin: &str, delivered: u64) {
        self.plugin(plugin).delivered = delivered;
    }

    pub fn claim(&mut self, plugin: &str, now_ms: u64, max: usize) -> Vec<(u64, u32)> {
        self.claim_within(plugin, now_ms, max, PartitionSet::ALL)
    }

    /// [`Index::claim`] from the held partitions that are also in `within`.
    pub fn claim_within(
        &mut self,
        plugin: &str,
        now_ms: u64,
        max: usize,
        within: PartitionSet,
    ) -> Vec<(u64, u32)> {
        let held = self.held.and(within);
        match self.plugins.get_mut(plugin) {
            Some(p) if max > 0 => p.claim(now_ms, max, held),
            _ => Vec::new(),
        }
    }

    pub fn is_in_flight(&self, plugin: &str, id: u64) -> bool {
        self.plugins
            .get(plugin)
            .is_some_and(|p| p.in_flight.contains(&id))
    }

    /// Puts in-flight deliveries back to pending, as they were; returns how many were in flight.
    pub fn release(&mut self, plugin: &str, ids: &[u64]) -> usize {
        let lanes: Vec<_> = ids.iter().map(|&id| (id, self.lane_of(id))).collect();
        let Some(p) = self.plugins.get_mut(plugin) else {
            return 0;
        };
        let mut released = 0;
        for (id, lane) in lanes {
            let Some(lane) = lane else { continue };
            if p.land(id, &lane) {
                released += 1;
                p.settle(&lane);
            }
        }
        released
    }

    pub fn mark_done(&mut self, plugin: &str, id: u64) {
        let Some(lane) = self.lane_of(id) else { return };
        let p = self.plugin(plugin);
        p.land(id, &lane);
        p.failed.remove(&id);
        let removed = p.dequeue(id, &lane);
        p.delivered += 1;
        p.settle(&lane);
        if removed {
            self.undelivered -= 1;
            self.let_go(id);
        }
    }

    pub fn mark_retry(&mut self, plugin: &str, id: u64, failure: Failure) {
        let Some(lane) = self.lane_of(id) else { return };
        let p = self.plugin(plugin);
        p.land(id, &lane);
        p.failed.insert(id, failure);
        p.settle(&lane);
    }

    pub fn mark_dead(&mut self, plugin: &str, id: u64) {
        let Some(lane) = self.lane_of(id) else { return };
        let p = self.plugin(plugin);
        p.land(id, &lane);
        p.failed.remove(&id);
        let removed = p.dequeue(id, &lane);
        p.dead.insert(id);
        p.settle(&lane);
        if removed {
            self.undelivered -= 1;
        }
    }

    /// Dead → pending with a fresh attempt count.
    pub fn revive(&mut self, plugin: &str, id: u64) {
        let Some(lane) = self.lane_of(id) else { return };
        let p = self.plugin(plugin);
        if !p.dead.remove(&id) {
            return;
        }
        if p.enqueue(id, &lane) {
            self.undelivered += 1;
        }
    }

    pub fn forget_dead(&mut self, plugin: &str, id: u64) {
        if self.plugin(plugin).dead.remove(&id) {
            self.let_go(id);
        }
    }

    /// Dead letters by plugin and id, optionally narrowed to one plugin and/or some event ids.
    /// Up to `limit` of them, in (plugin, id) order, from the one after `after`.
    pub fn dead(
        &self,
        plugin: Option<&str>,
        ids: Option<&[u64]>,
        after: Option<&(String, u64)>,
        limit: usize,
    ) -> Vec<(String, u64)> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let wanted: Option<HashSet<u64>> = ids.map(|ids| ids.iter().copied().collect());
        let from = after.map_or(Unbounded, |(p, _)| Included(p.as_str()));
        self.plugins
            .range::<str, _>((from, Unbounded))
            .filter(|(name, _)| plugin.is_none_or(|p| p == name.as_str()))
            .flat_map(|(name, p)| {
                let ids = match after {
                    Some((a, id)) if a == name => p.dead.range((Excluded(*id), Unbounded)),
                    _ => p.dead.range(..),
                };
                ids.filter(|id| wanted.as_ref().is_none_or(|w| w.contains(id)))
                    .map(move |&id| (name.clone(), id))
            })
            .take(limit)
            .collect()
    }

    /// Up to `limit` dead letters (plugin, event id) in that order, of `plugin` or all, from
    /// the one after `after`.
    pub fn dead_page(
        &self,
        plugin: Option<&str>,
        after: Option<&DeadLetterCursor>,
        limit: usize,
    ) -> Vec<(String, u64)> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let from = after.map_or(Unbounded, |a| Included(a.plugin.as_str()));
        self.plugins
            .range::<str, _>((from, Unbounded))
            .filter(|(name, _)| plugin.is_none_or(|p| p == name.as_str()))
            .flat_map(|(name, p)| {
                let ids = match after {
                    Some(a) if a.plugin == *name => p.dead.range((Excluded(a.event_id), Unbounded)),
                    _ => p.dead.range(..),
                };
                ids.map(move |&id| (name.clone(), id))
            })
            .take(limit)
            .collect()
    }

    /// Whether `plugin` has a delivery of event `id` that is pending, in flight or dead.
    pub fn knows(&self, plugin: &str, id: u64) -> bool {
        let Some(p) = self.plugins.get(plugin) else {
            return false;
        };
        if p.dead.contains(&id) || p.in_flight.contains(&id) {
            return true;
        }
        self.events
            .get(&id)
            .and_then(|e| p.lanes.get(&e.lane))
            .is_some_and(|l| l.queue.binary_search(&id).is_ok())
    }

    /// Counts a done delivery of an event the index no longer holds (a done found on open after
    /// every other delivery of its event was done too).
    pub fn count_delivered(&mut self, plugin: &str) {
        self.plugin(plugin).delivered += 1;
    }

    pub fn next_due_ms(&self, plugin: &str) -> Option<u64> {
        self.next_due_ms_within(plugin, PartitionSet::ALL)
    }

    /// [`Index::next_due_ms`] in the held partitions that are also in `within`.
    pub fn next_due_ms_within(&self, plugin: &str, within: PartitionSet) -> Option<u64> {
        self.plugins
            .get(plugin)
            .and_then(|p| p.next_due_ms(self.held.and(within)))
    }

    /// The partitions with a delivery in flight (for any plugin).
    pub fn in_flight_partitions(&self) -> PartitionSet {
        self.plugins
            .values()
            .flat_map(|p| p.in_flight.iter())
            .filter_map(|id| self.events.get(id))
            .fold(PartitionSet::NONE, |set, e| set.with(partition_of(&e.lane)))
    }

    /// Undelivered deliveries (over all plugins) per partition, with the oldest one's time.
    pub fn lag(&self) -> Vec<PartitionLag> {
        let mut lag = no_lag();
        for p in self.plugins.values() {
            let heads = p.oldest_heads(&self.events);
            for ((entry, part), head) in lag.iter_mut().zip(p.parts.iter()).zip(heads) {
                entry.undelivered += part.undelivered;
                // Ids follow arrival, so the smallest head is the partition's oldest event.
                if let Some(at) = head
                    .and_then(|id| self.events.get(&id))
                    .map(|e| e.received_at_ms)
                {
                    let oldest = entry.oldest_undelivered_ms.get_or_insert(at);
                    *oldest = (*oldest).min(at);
                }
            }
        }
        lag
    }

    /// Every plugin's counts, by name.
    pub fn backlog(&self) -> Vec<PluginBacklog> {
        self.plugins
            .iter()
            .map(|(name, p)| p.backlog(name, &self.events))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lane(name: &str) -> LaneKey {
        lane_key("c1", name, 0)
    }

    fn ids(claimed: &[(u64, u32)]) -> Vec<u64> {
        claimed.iter().map(|&(id, _)| id).collect()
    }

    #[test]
    fn a_claim_merges_lanes_in_id_order_and_takes_consecutive_events_of_one_lane() {
        let mut index = Index::default();
        for (id, entity) in [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "c"), (6, "b")] {
            index.add_pending("p", id, lane(entity), id, None);
        }
        assert_eq!(ids(&index.claim("p", 0, 10)), [1, 2, 3, 4, 5, 6]);
        assert_eq!(index.claim("p", 0, 10), []);
    }

    #[test]
    fn a_lane_with_anything_in_flight_offers_nothing_until_it_lands() {
        let mut index = Index::default();
        for (id, entity) in [(1, "a"), (2, "b"), (3, "a")] {
            index.add_pending("p", id, lane(entity), id, None);
        }
        assert_eq!(ids(&index.claim("p", 0, 1)), [1]);
        assert_eq!(ids(&index.claim("p", 0, 10)), [2]);
        index.mark_done("p", 1);
        assert_eq!(ids(&index.claim("p", 0, 10)), [3]);
    }

    #[test]
    fn a_released_delivery_comes_back_first_with_the_same_attempt_number() {
        let mut index = Index::default();
        index.add_pending("p", 1, lane("a"), 1, None);
        index.add_pending("p", 2, lane("a"), 2, None);
        assert_eq!(index.claim("p", 0, 10), [(1, 1), (2, 1)]);
        assert_eq!(index.release("p", &[1, 2]), 2);
        assert_eq!(index.claim("p", 0, 10), [(1, 1), (2, 1)]);
    }

    #[test]
    fn a_retrying_head_waits_for_its_time_and_holds_back_only_its_lane() {
        let mut index = Index::default();
        for (id, entity) in [(1, "a"), (2, "a"), (3, "b")] {
            index.add_pending("p", id, lane(entity), id, None);
        }
        assert_eq!(ids(&index.claim("p", 0, 1)), [1]);
        index.mark_retry(
            "p",
            1,
            Failure {
                attempts: 1,
                due_at_ms: 100,
            },
        );
        assert_eq!(index.next_due_ms("p"), Some(0));
        assert_eq!(ids(&index.claim("p", 50, 10)), [3]);
        assert_eq!(index.next_due_ms("p"), Some(100));
        assert_eq!(index.claim("p", 99, 10), []);
        assert_eq!(index.claim("p", 100, 10), [(1, 2), (2, 1)]);
    }

    #[test]
    fn dead_letters_leave_the_lane_and_revive_in_order() {
        let mut index = Index::default();
        for id in [1, 2, 3] {
            index.add_pending("p", id, lane("a"), id, None);
        }
        assert_eq!(ids(&index.claim("p", 0, 1)), [1]);
        index.mark_dead("p", 1);
        assert_eq!(index.undelivered, 2);
        assert_eq!(ids(&index.claim("p", 0, 1)), [2]);
        index.revive("p", 1);
        assert_eq!(index.undelivered, 3);
        index.mark_done("p", 2);
        assert_eq!(ids(&index.claim("p", 0, 10)), [1, 3]);
        let counts = &index.backlog()[0];
        assert_eq!((counts.in_flight, counts.pending, counts.dead), (2, 0, 0));
    }

    /// What `backlog` reported before it read heads: the earliest time over every lane's head.
    fn oldest_by_walking_every_lane(index: &Index, plugin: &str) -> Option<u64> {
        index.plugins[plugin]
            .lanes
            .values()
            .filter_map(|l| l.queue.front())
            .filter_map(|id| index.events.get(id).map(|e| e.received_at_ms))
            .min()
    }

    /// What `lag` reported before it kept counts per partition and read heads.
    fn lag_by_walking_every_lane(index: &Index) -> Vec<PartitionLag> {
        let mut lag = no_lag();
        for p in index.plugins.values() {
            for lane in p.lanes.values() {
                let entry = &mut lag[lane.partition];
                entry.undelivered += lane.queue.len() as u64;
                let head = lane.queue.front().and_then(|id| index.events.get(id));
                if let Some(at) = head.map(|e| e.received_at_ms) {
                    let oldest = entry.oldest_undelivered_ms.get_or_insert(at);
                    *oldest = (*oldest).min(at);
                }
            }
        }
        lag
    }

    #[test]
    fn the_oldest_pending_time_is_read_from_heads_whether_ready_waiting_or_in_flight() {
        let mut index = Index::default();
        // Ids follow arrival; received 1000 + id.
        for (id, name) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b"), (6, "d")] {
            index.add_pending("p", id, lane(name), 1_000 + id, None);
        }
        let oldest = |index: &Index| {
            for part in index.plugins["p"].parts.iter() {
                let heads: BTreeSet<u64> = part.waiting.keys().map(|&(_, head)| head).collect();
                assert_eq!(heads, part.waiting_heads);
            }
            let backlog = &index.backlog()[0];
            let p = &index.plugins["p"];
            let retrying = p.failed.keys().filter(|id| !p.in_flight.contains(id));
            assert_eq!(backlog.retrying, retrying.count() as u64);
            let reported = backlog.oldest_pending_ms;
            assert_eq!(reported, oldest_by_walking_every_lane(index, "p"));
            assert_eq!(index.lag(), lag_by_walking_every_lane(index));
            reported
        };
        assert_eq!(oldest(&index), Some(1_001));
        // In flight: lane a's head is 1, claimed with 2 and 3.
        assert_eq!(ids(&index.claim("p", 0, 3)), [1, 2, 3]);
        assert_eq!(oldest(&index), Some(1_001));
        // Waiting for a retry.
        let failure = Failure {
            attempts: 1,
            due_at_ms: 500,
        };
        index.mark_retry("p", 1, failure);
        assert_eq!(oldest(&index), Some(1_001));
        // Dead letters are not pending: lane a's head becomes 3 (in flight).
        index.mark_done("p", 2);
        index.claim("p", 500, 10);
        index.mark_dead("p", 1);
        assert_eq!(oldest(&index), Some(1_003));
        index.mark_retry("p", 3, failure);
        index.mark_done("p", 4);
        index.mark_done("p", 5);
        index.mark_done("p", 6);
        assert_eq!(oldest(&index), Some(1_003));
        // Promoted from waiting to ready, claimed (retrying and in flight at once), then done:
        // nothing pending is left.
        assert_eq!(ids(&index.claim("p", 500, 10)), [3]);
        assert_eq!(oldest(&index), Some(1_003));
        index.mark_done("p", 3);
        assert_eq!(oldest(&index), None);
        // A revived dead letter is pending again, older than anything else.
        index.add_pending("p", 7, lane("e"), 1_007, None);
        index.revive("p", 1);
        assert_eq!(oldest(&index), Some(1_001));
    }

    #[test]
    fn an_event_is_outstanding_until_every_plugin_is_done_with_it() {
        let mut index = Index::default();
        index.add_pending("p", 1, lane("a"), 1, None);
        index.add_pending("q", 1, lane("a"), 1, None);
        index.claim("p", 0, 1);
        index.mark_done("p", 1);
        assert!(index.events.contains_key(&1));
        index.claim("q", 0, 1);
        index.mark_dead("q", 1);
        assert!(index.events.contains_key(&1));
        index.forget_dead("q", 1);
        assert!(!index.events.contains_key(&1));
        assert_eq!(index.undelivered, 0);
    }

    #[test]
    fn a_host_claims_and_waits_only_for_the_partitions_it_holds() {
        let mut index = Index::default();
        // Two entities in different partitions.
        let a = lane("a");
        let b = (0..)
            .map(|i| lane(&format!("b{i}")))
            .find(|l| partition_of(l) != partition_of(&a))
            .unwrap();
        index.add_pending("p", 1, a.clone(), 1, None);
        index.add_pending("p", 2, b.clone(), 2, None);
        index.held = PartitionSet::NONE.with(partition_of(&b));
        assert_eq!(ids(&index.claim("p", 0, 10)), [2]);
        assert_eq!(index.next_due_ms("p"), None, "a's partition is not ours");
        assert!(index.in_flight_partitions().contains(partition_of(&b)));
        assert!(!index.in_flight_partitions().contains(partition_of(&a)));
        index.held = index.held.with(partition_of(&a));
        assert_eq!(index.next_due_ms("p"), Some(0));
        assert_eq!(ids(&index.claim("p", 0, 10)), [1]);
        let lag = index.lag();
        assert_eq!(lag[partition_of(&a)].undelivered, 1);
        assert_eq!(lag[partition_of(&a)].oldest_undelivered_ms, Some(1));
        assert_eq!(lag.iter().map(|l| l.undelivered).sum::<u64>(), 2);
    }

    #[test]
    fn events_without_an_entity_do_not_wait_for_each_other() {
        let mut index = Index::default();
        index.add_pending("p", 1, lane_key("c1", "", 1), 1, None);
        index.add_pending("p", 2, lane_key("c1", "", 2), 2, None);
        assert_eq!(ids(&index.claim("p", 0, 1)), [1]);
        assert_eq!(ids(&index.claim("p", 0, 1)), [2]);
    }

    #[test]
    fn random_schedules_never_break_per_entity_order_or_lose_a_delivery() {
        use rand::{rngs::StdRng, Rng, SeedableRng};

        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut index = Index::default();
            let mut lanes: HashMap<u64, LaneKey> = HashMap::new();
            let mut alive: BTreeSet<u64> = BTreeSet::new(); // pending or in flight
            let mut in_flight: BTreeSet<u64> = BTreeSet::new();
            let mut attempts: HashMap<u64, u32> = HashMap::new();
            let (mut now, mut next_id) = (0u64, 1u64);

            for step in 0..1200 {
                let finishing = step >= 900;
                match rng.random_range(0..10) {
                    0..=2 if !finishing => {
                        let lane = lane(&format!("e{}", rng.random_range(0..5)));
                        index.add_pending("p", next_id, lane.clone(), now, None);
                        lanes.insert(next_id, lane);
                        alive.insert(next_id);
                        next_id += 1;
                    }
                    3..=5 => {
                        let batch = index.claim("p", now, rng.random_range(1..6));
                        for (pos, &(id, attempt)) in batch.iter().enumerate() {
                            assert!(alive.contains(&id) && !in_flight.contains(&id));
                            assert_eq!(attempt, attempts.get(&id).copied().unwrap_or(0) + 1);
                            let earlier_in_batch: Vec<u64> =
                                batch[..pos].iter().map(|&(i, _)| i).collect();
                            for &other in alive.iter().filter(|&&o| lanes[&o] == lanes[&id]) {
                                // Nothing else of the lane is in flight, and everything before it
                                // is earlier in this very batch.
                                assert!(!in_flight.contains(&other), "seed {seed}");
                                if other < id {
                                    assert!(earlier_in_batch.contains(&other), "seed {seed}");
                                }
                            }
                        }
                        in_flight.extend(batch.iter().map(|&(id, _)| id));
                    }
                    6..=8 if !in_flight.is_empty() => {
                        let id = *in_flight
                            .iter()
                            .nth(rng.random_range(0..in_flight.len()))
                            .unwrap();
                        in_flight.remove(&id);
                        match if finishing { 0 } else { rng.random_range(0..4) } {
                            0 | 1 => {
                                index.mark_done("p", id);
                                alive.remove(&id);
                            }
                            2 => {
                                let n = attempts.entry(id).or_default();
                                *n += 1;
                                let failure = Failure {
                                    attempts: *n,
                                    due_at_ms: now + rng.random_range(1..50),
                                };
                                index.mark_retry("p", id, failure);
                            }
                            _ => {
                                index.release("p", &[id]);
                            }
                        }
                    }
                    _ => now += rng.random_range(0..20),
                }
                assert_eq!(index.undelivered, alive.len() as u64, "seed {seed}");
            }
            // Drain: everything left is eventually claimable and deliverable.
            for _ in 0..10_000 {
                if alive.is_empty() {
                    break;
                }
                now += 10;
                for id in in_flight.split_off(&0) {
                    index.mark_done("p", id);
                    alive.remove(&id);
                }
                in_flight.extend(index.claim("p", now, 10).into_iter().map(|(id, _)| id));
            }
            assert!(alive.is_empty(), "seed {seed}: {alive:?} never delivered");
            assert!(index.events.is_empty());
        }
    }
}
