//! The dedupe window, held in memory.
//!
//! A dedupe key names what a notification says, so a table keyed by it put every new key on a
//! page of its own: each commit rewrote one random page of that table per event, plus an entry in
//! a second table by time for prune to find it, and those were most of what an append cost
//! beyond the event itself. Like nats-server's duplicate window, the keys seen within the window
//! are now found in memory. The file keeps each key beside its event (`event_keys`, written in id
//! order like the events); the window is read back from the newest of them on open.
//!
//! Memory holds only a 64-bit fingerprint of each key (from a hash keyed at random when the
//! ledger opens) and the id of the event that carried it: about 20 bytes an event, whatever the
//! key's length. A fingerprint that matches only names a candidate; the writer reads that event's
//! key and time from `event_keys` before it calls a notification a duplicate, so two keys that
//! share a fingerprint are never confused.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

pub(super) struct Window {
    keys: RandomState,
    /// Fingerprint → the last event that carried a key with it.
    seen: HashMap<u64, u64, BuildHasherDefault<Fingerprinted>>,
    /// What the open transaction changed, with what it replaced, so that a transaction that does
    /// not commit leaves no key behind.
    undo: Vec<(u64, Option<u64>)>,
}

impl Window {
    pub fn new() -> Self {
        Self {
            keys: RandomState::new(),
            seen: HashMap::default(),
            undo: Vec::new(),
        }
    }

    /// The event that last carried a key with the same fingerprint as `key`, if any.
    pub fn candidate(&self, key: &str) -> Option<u64> {
        self.seen.get(&self.keys.hash_one(key)).copied()
    }

    /// Records that event `id` carries `key`, as the file already holds it (reading the window
    /// back on open): there is no transaction to undo it with.
    pub fn recall(&mut self, key: &str, id: u64) {
        self.seen.insert(self.keys.hash_one(key), id);
    }

    /// Records that event `id` carries `key`, as part of the open transaction.
    pub fn insert(&mut self, key: &str, id: u64) {
        let fingerprint = self.keys.hash_one(key);
        let before = self.seen.insert(fingerprint, id);
        self.undo.push((fingerprint, before));
    }

    /// Keeps what the open transaction recorded: it committed.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// Forgets what the open transaction recorded: it did not commit.
    pub fn abort(&mut self) {
        while let Some((fingerprint, before)) = self.undo.pop() {
            match before {
                Some(id) => self.seen.insert(fingerprint, id),
                None => self.seen.remove(&fingerprint),
            };
        }
    }

    /// Forgets keys carried last by events before `first_kept` (ids follow arrival, so these are
    /// the ones older than the window); returns how many.
    pub fn expire(&mut self, first_kept: u64) -> usize {
        let before = self.seen.len();
        self.seen.retain(|_, id| *id >= first_kept);
        if self.seen.capacity() > 4 * self.seen.len().max(1024) {
            // A burst's table would otherwise stay allocated at its peak.
            self.seen.shrink_to_fit();
        }
        before - self.seen.len()
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }
}

/// The map's keys are fingerprints from a keyed hash already: hashing them again is wasted work.
#[derive(Default)]
struct Fingerprinted(u64);

impl Hasher for Fingerprinted {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_after_a_commit_and_gone_after_an_abort() {
        let mut w = Window::new();
        w.insert("a", 1);
        w.commit();
        w.insert("b", 2);
        w.insert("a", 3);
        assert_eq!(w.candidate("a"), Some(3));
        w.abort();
        assert_eq!(w.candidate("a"), Some(1));
        assert_eq!(w.candidate("b"), None);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_recalled_key_outlives_an_abort() {
        let mut w = Window::new();
        w.recall("a", 1);
        w.insert("a", 2);
        w.abort();
        assert_eq!(w.candidate("a"), Some(1));
    }

    #[test]
    fn expiry_forgets_only_keys_last_carried_by_events_before_the_first_kept() {
        let mut w = Window::new();
        for id in 0..2000u64 {
            w.insert(&format!("k{id}"), id);
        }
        w.insert("k0", 1600);
        w.commit();
        assert_eq!(w.expire(1500), 1499);
        assert_eq!(w.candidate("k1499"), None);
        assert_eq!(w.candidate("k1500"), Some(1500));
        assert_eq!(w.candidate("k0"), Some(1600));
        assert_eq!(w.len(), 501);
    }
}
