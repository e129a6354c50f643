//! A hash map kept in shards, so that growing it never stalls the ledger.
//!
//! The index holds an entry per undelivered event and per lane (and per retrying delivery), so
//! a firewall down for an hour at 1,000 events/s leaves millions of them. A `HashMap` grows by
//! rehashing every entry at once, and the index grows inside the writer's step that applies a
//! commit, under the index lock: no accept is answered and no plugin claims meanwhile. Measured
//! (BENCHMARKS.md, Durability), one group's apply took 68 ms at 230,000 pending events, 330 ms
//! at 920,000 and 680 ms at 1.8 million. Here each of [`SHARDS`] maps, picked by a hash of the
//! key, grows alone with a 256th of the entries (5.8 ms at 1.8 million); the shard hash is
//! mixed, so that shards fill unevenly and do not all grow in the same group either (sequential
//! ids taken modulo the shard count would fill them, and grow them, in lockstep).

use std::borrow::Borrow;
use std::collections::hash_map::{Entry, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use crate::ledger::partition::{fnv1a, mix};

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

/// Picks a key's shard. A key and every form it is looked up by must pick the same one.
pub(crate) trait ShardKey {
    fn shard(&self) -> usize;
}

fn top_bits(hash: u64) -> usize {
    (mix(hash) >> (u64::BITS - SHARD_BITS)) as usize
}

impl ShardKey for u64 {
    fn shard(&self) -> usize {
        top_bits(*self)
    }
}

impl ShardKey for str {
    fn shard(&self) -> usize {
        top_bits(fnv1a(self.as_bytes()))
    }
}

impl ShardKey for Arc<str> {
    fn shard(&self) -> usize {
        (**self).shard()
    }
}

#[derive(Debug)]
pub(crate) struct Sharded<K, V> {
    shards: Box<[HashMap<K, V>]>,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl<K: Hash + Eq + ShardKey, V> Sharded<K, V> {
    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        self.shards[key.shard()].entry(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.shards[key.shard()].insert(key, value)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ShardKey + ?Sized,
    {
        self.shards[key.shard()].get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ShardKey + ?Sized,
    {
        self.shards[key.shard()].get_mut(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ShardKey + ?Sized,
    {
        self.shards[key.shard()].contains_key(key)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ShardKey + ?Sized,
    {
        self.shards[key.shard()].remove(key)
    }
}

impl<K, V> Sharded<K, V> {
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    #[cfg(test)]
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.shards.iter().flat_map(HashMap::keys)
    }

    #[cfg(test)]
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    /// The shards' sizes, for tests.
    #[cfg(test)]
    fn shard_lens(&self) -> Vec<usize> {
        self.shards.iter().map(HashMap::len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_map_answers_as_one_map_does() {
        let mut map: Sharded<Arc<str>, u32> = Sharded::default();
        let mut reference: HashMap<Arc<str>, u32> = HashMap::new();
        for i in 0..5_000u32 {
            let key: Arc<str> =
                format!("cluster\u{1f}{:08x}", i.wrapping_mul(2_654_435_761)).into();
            assert_eq!(map.insert(key.clone(), i), reference.insert(key, i));
        }
        for i in (0..5_000u32).step_by(3) {
            let key = format!("cluster\u{1f}{:08x}", i.wrapping_mul(2_654_435_761));
            // Looked up by `str` as well as by the `Arc<str>` it was stored under.
            assert_eq!(map.remove(key.as_str()), reference.remove(key.as_str()));
        }
        *map.entry("new".into()).or_insert(0) += 7;
        *reference.entry("new".into()).or_insert(0) += 7;
        assert_eq!(map.len(), reference.len());
        for (key, value) in &reference {
            assert_eq!(map.get(key), Some(value));
            assert!(map.contains_key(key.as_ref()));
        }
        assert_eq!(map.keys().count(), reference.len());
        let mut values: Vec<u32> = map.values().copied().collect();
        let mut expected: Vec<u32> = reference.values().copied().collect();
        values.sort_unstable();
        expected.sort_unstable();
        assert_eq!(values, expected);
        assert!(!map.is_empty());
        assert!(Sharded::<u64, ()>::default().is_empty());
    }

    #[test]
    fn sequential_ids_spread_over_the_shards_unevenly_enough_not_to_grow_together() {
        let mut map: Sharded<u64, ()> = Sharded::default();
        for id in 1..=(SHARDS as u64) * 1_024 {
            map.insert(id, ());
        }
        let lens = map.shard_lens();
        let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
        // Every shard is used, none holds much more than its share...
        assert!(*min > 800 && *max < 1_250, "shard sizes {min}..{max}");
        // ...and they are not all the same size, as `id % SHARDS` would make them: shards that
        // fill in lockstep grow in lockstep, which is the stall this type exists to avoid.
        assert!(max - min > 32, "shard sizes {min}..{max}");
    }
}
