//! Logical shards: the fixed partition of every sub-dataset that makes the
//! loader rescalable.
//!
//! Each epoch, a dataset's row groups are put in a seeded pseudo-random order
//! (each keeping its blocks together, in file order, so a row group is decoded
//! front to back once) and logical shard `s` of `L` takes block positions
//! `s*nb/L .. (s+1)*nb/L` of that order: a shard is a random sample of the
//! whole dataset's row groups, different every epoch, and shards differ in
//! size by at most one block.
//! Rank `r` of `W` owns shards `r*L/W .. (r+1)*L/W` of every dataset, so any
//! `W` dividing `L` gives each rank whole shards. A shard's progress is one
//! small [`Cursor`]; nothing else about reading is per rank, which is what
//! lets a saved run continue on a different number of ranks.
//!
//! Orders are computed, never stored: [`permute`] is a keyed bijection on
//! `0..n` (a Feistel network with cycle walking), as fms-fsdp's walk is.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Where a logical shard stands: document `doc` of the `block`-th block the
/// shard owns in `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub block: u64,
    pub doc: u64,
}

/// The shards owned by `rank` out of `world`.
pub fn owned(logical_shards: usize, rank: usize, world: usize) -> Range<usize> {
    let per = logical_shards / world;
    rank * per..(rank + 1) * per
}

/// Positions (in the epoch's block order) owned by `shard`.
pub fn shard_positions(blocks: u64, logical_shards: usize, shard: usize) -> Range<u64> {
    let l = logical_shards as u64;
    let s = shard as u64;
    (s * blocks / l)..((s + 1) * blocks / l)
}

/// splitmix64's finaliser: a cheap, well-mixed 64-bit hash.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable hash of a name, so a dataset's order keys do not depend on its
/// position in the config.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A keyed bijection on `0..n`: the `i`-th element of a shuffled `0..n`.
pub fn permute(i: u64, n: u64, key: u64) -> u64 {
    debug_assert!(i < n);
    if n <= 1 {
        return i;
    }
    // Balanced Feistel on the smallest even bit width covering n; values that
    // land outside 0..n are walked again (under 4 steps on average).
    let bits = 64 - (n - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = i;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = mix(r ^ key.rotate_left(round as u32 * 16) ^ round) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < n {
            return x;
        }
    }
}

/// One epoch's block order of a dataset.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    pub epoch: u64,
    key: u64,
    /// `starts[j]` is the position of the first block of the j-th row group
    /// in this order; one more entry holds the block count.
    starts: Vec<u64>,
}

impl EpochOrder {
    /// `groups` is (first block, block count) per row group, file order.
    pub fn new(groups: &[(u64, u64)], key: u64, epoch: u64) -> EpochOrder {
        let n = groups.len() as u64;
        let mut starts = Vec::with_capacity(groups.len() + 1);
        let mut at = 0;
        for j in 0..n {
            starts.push(at);
            at += groups[permute(j, n, key) as usize].1;
        }
        starts.push(at);
        EpochOrder { epoch, key, starts }
    }

    /// The block at position `p`.
    pub fn block(&self, groups: &[(u64, u64)], p: u64) -> usize {
        let j = self.starts.partition_point(|&s| s <= p) - 1;
        let g = permute(j as u64, groups.len() as u64, self.key) as usize;
        (groups[g].0 + p - self.starts[j]) as usize
    }
}

/// Key of a dataset's row-group order in an epoch.
pub fn epoch_key(seed: u64, dataset: u64, epoch: u64) -> u64 {
    mix(mix(seed ^ dataset) ^ epoch)
}

/// Key of the document order inside one block in one epoch.
pub fn block_key(seed: u64, dataset: u64, epoch: u64, block: u64) -> u64 {
    mix(epoch_key(seed, dataset, epoch) ^ mix(block))
}

/// Picks the shard to read next among a rank's owned shards: the most
/// advanced unfinished one of the lowest epoch. Reading one shard at a time
/// keeps a single block per dataset in memory; preferring the most advanced
/// makes a rank that inherited half-read shards after a rescale finish those
/// first. A pure function of the cursors, so it needs no state of its own.
pub fn pick_shard(cursors: &[Cursor], sizes: &[u64]) -> Option<usize> {
    let live = (0..cursors.len()).filter(|&i| sizes[i] > 0);
    let min_epoch = live.clone().map(|i| cursors[i].epoch).min()?;
    live.filter(|&i| cursors[i].epoch == min_epoch)
        .max_by(|&a, &b| {
            let (ca, cb) = (&cursors[a], &cursors[b]);
            (ca.block, ca.doc)
                .cmp(&(cb.block, cb.doc))
                // Ties go to the lower shard: max_by keeps the last maximum.
                .then(b.cmp(&a))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000] {
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = permute(i, n, 42) as usize;
                assert!(!seen[j], "n={n}: {j} twice");
                seen[j] = true;
            }
        }
        let a: Vec<u64> = (0..100).map(|i| permute(i, 100, 1)).collect();
        let b: Vec<u64> = (0..100).map(|i| permute(i, 100, 2)).collect();
        assert_ne!(a, b, "different keys give different orders");
        assert_ne!(a, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn epoch_order_keeps_row_groups_together() {
        let groups = [(0u64, 3u64), (3, 1), (4, 2), (6, 4)];
        let o = EpochOrder::new(&groups, 9, 0);
        let blocks: Vec<usize> = (0..10).map(|p| o.block(&groups, p)).collect();
        let mut sorted = blocks.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        for w in blocks.windows(2) {
            let same_group = groups.iter().any(|&(f, n)| {
                (f..f + n).contains(&(w[0] as u64)) && (f..f + n).contains(&(w[1] as u64))
            });
            assert!(!same_group || w[1] == w[0] + 1, "{blocks:?}");
        }
    }

    #[test]
    fn shards_partition_blocks_and_ranks_partition_shards() {
        let mut total = 0;
        for s in 0..12 {
            let r = shard_positions(100, 12, s);
            assert!(r.end - r.start >= 8);
            total += r.end - r.start;
        }
        assert_eq!(total, 100);
        assert_eq!(owned(12, 1, 4), 3..6);
        assert_eq!(owned(12, 2, 3), 8..12);
    }

    #[test]
    fn picks_most_advanced_shard_of_lowest_epoch() {
        let c = |epoch, block, doc| Cursor { epoch, block, doc };
        let sizes = [5, 5, 5, 0];
        assert_eq!(
            pick_shard(&[c(0, 0, 0), c(0, 0, 0), c(0, 0, 0), c(0, 0, 0)], &sizes),
            Some(0)
        );
        assert_eq!(
            pick_shard(&[c(0, 0, 0), c(0, 2, 1), c(0, 2, 0), c(0, 0, 0)], &sizes),
            Some(1)
        );
        assert_eq!(
            pick_shard(&[c(1, 0, 0), c(0, 0, 0), c(1, 3, 0), c(0, 9, 0)], &sizes),
            Some(1)
        );
        assert_eq!(pick_shard(&[c(0, 0, 0)], &[0]), None);
    }
}
