//! Partitions: how hosts that share one ledger split the work between them.
//!
//! Every lane (an entity's queue of events, see `index`) belongs to one of [`PARTITIONS`]
//! partitions by a hash of its key, and a host claims only from the partitions it holds. Since
//! all the events of one entity are in one lane, per-entity order holds across hosts; since
//! every host computes the same partition for the same lane, the hash must never depend on the
//! build (so not `std`'s `DefaultHasher`, whose algorithm is unspecified): it is FNV-1a.

/// Partitions per ledger. Fixed, because every host must agree on it: it bounds how many hosts
/// share the work usefully, far beyond the three to five a deployment runs.
pub const PARTITIONS: usize = 32;

/// The partition of a lane.
pub(crate) fn partition_of(lane: &str) -> usize {
    (mix(fnv1a(lane.as_bytes())) % PARTITIONS as u64) as usize
}

/// How much `host` wants `partition`: the host with the highest score over the live hosts holds
/// it (rendezvous hashing), so every host computes the same owner, and a host joining or
/// leaving moves only its own share.
pub(crate) fn score(host: &str, partition: usize) -> u64 {
    mix(fnv1a(host.as_bytes()) ^ mix(partition as u64 + 1))
}

/// FNV-1a, 64 bits: stable across builds and platforms, and good enough to spread entity uuids.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// SplitMix64's finalizer: FNV-1a alone leaves similar inputs (`a`, `b`) with similar high bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A set of partitions, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSet(u64);

impl PartitionSet {
    pub const ALL: PartitionSet = PartitionSet((1 << PARTITIONS) - 1);
    pub const NONE: PartitionSet = PartitionSet(0);

    pub fn contains(self, partition: usize) -> bool {
        partition < PARTITIONS && self.0 & (1 << partition) != 0
    }

    pub fn with(self, partition: usize) -> PartitionSet {
        assert!(partition < PARTITIONS, "partition {partition} out of range");
        PartitionSet(self.0 | (1 << partition))
    }

    pub fn without(self, partition: usize) -> PartitionSet {
        PartitionSet(self.0 & !(1 << partition))
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..PARTITIONS).filter(move |&p| self.contains(p))
    }

    /// The partitions in both.
    pub fn and(self, other: PartitionSet) -> PartitionSet {
        PartitionSet(self.0 & other.0)
    }
}

impl Default for PartitionSet {
    /// A host alone holds everything.
    fn default() -> Self {
        PartitionSet::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_of_a_lane_is_the_same_in_every_build() {
        // Pinned values: a change here would split an entity's events between two hosts
        // during a rolling upgrade.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(partition_of("lab\u{1f}vm-1"), 4);
    }

    #[test]
    fn entities_spread_over_every_partition() {
        let mut seen = PartitionSet::NONE;
        for i in 0..1000 {
            seen = seen.with(partition_of(&format!("lab\u{1f}{i:08x}-uuid")));
        }
        assert_eq!(seen, PartitionSet::ALL);
    }

    #[test]
    fn a_set_adds_removes_and_lists_partitions() {
        let set = PartitionSet::NONE.with(3).with(31).with(3);
        assert_eq!(set.iter().collect::<Vec<_>>(), [3, 31]);
        assert_eq!(set.without(3).len(), 1);
        assert!(!set.contains(32) && set.without(31).without(3).is_empty());
    }
}
