//! The loader state: everything a rank needs to continue its token stream,
//! in one small serialisable struct, and the rules for resuming from the
//! states of a previous run, on the same or a different number of ranks.
//!
//! # What is saved
//! A rank's stream is a pure function of:
//! - one [`Cursor`] per owned logical shard per dataset (see `shards.rs`);
//! - the mixture's token counters (`mixture.rs`);
//! - the documents read from disk but not yet handed to the trainer: the
//!   rest of the document being cut into lines (`current`), the shuffle
//!   buffer's lines (`buffer`) and, after a rescale, inherited leftovers
//!   (`replay`).
//!
//! In-flight data is saved as [`Segment`]s, never as tokens: a segment names
//! a document by (dataset, logical shard, global document index) and a token
//! range of the document framed with BOS/EOS. A full 10,000-line buffer is
//! then tens of thousands of segments (about a megabyte of JSON), not 160 MB
//! of tokens, and resuming re-reads them from the data files.
//!
//! # Resuming on the same ranks
//! Each rank takes back its own state; the buffer is rebuilt line by line and
//! the RNG restored, so the batches are bit-identical to an uninterrupted run
//! (no loss jump from an empty buffer, unlike fms-fsdp).
//!
//! # Resuming on a different number of ranks
//! Every logical shard's cursor goes to the shard's new owner. Every in-flight
//! segment of every old rank (partial document, buffered lines, replay) goes
//! to the new owner of the segment's shard, whose packer emits those token
//! ranges first, in document order. Nothing read before the stop is lost and
//! nothing is read twice: the cursors are past the in-flight documents, and
//! the in-flight ranges are exactly the tokens not yet emitted. The mixture
//! counters are pooled and split evenly, so the mixture carries on toward its
//! exact shares. (Batches cannot be bit-identical here: the lines are packed
//! by different ranks.)

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::shards::{Cursor, mix, owned};

pub const STATE_VERSION: u32 = 1;

/// A token range of one framed document (`[bos] + tokens + [eos]`).
/// Serialised as a 5-element array to keep saved buffers small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "[u64; 5]", into = "[u64; 5]")]
pub struct Segment {
    pub dataset: u32,
    pub shard: u32,
    /// Global index of the document in its dataset (file order, row order).
    pub doc: u64,
    pub start: u32,
    pub end: u32,
}

impl From<[u64; 5]> for Segment {
    fn from(a: [u64; 5]) -> Segment {
        Segment {
            dataset: a[0] as u32,
            shard: a[1] as u32,
            doc: a[2],
            start: a[3] as u32,
            end: a[4] as u32,
        }
    }
}

impl From<Segment> for [u64; 5] {
    fn from(s: Segment) -> [u64; 5] {
        [
            s.dataset as u64,
            s.shard as u64,
            s.doc,
            s.start as u64,
            s.end as u64,
        ]
    }
}

/// What a state must agree on with the run resuming it, per dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetLayout {
    pub name: String,
    pub documents: u64,
    /// The block size that defines document order; kept so that a counts
    /// file appearing later cannot change it.
    pub block_docs: u64,
}

/// One rank's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    pub rank: usize,
    pub world: usize,
    pub seed: u64,
    pub logical_shards: usize,
    pub seq_len: usize,
    pub bos_token: Option<u32>,
    pub eos_token: Option<u32>,
    pub datasets: Vec<DatasetLayout>,
    /// `cursors[d][i]` is the cursor of shard `owned(rank).start + i` of dataset d.
    pub cursors: Vec<Vec<Cursor>>,
    /// Framed tokens drawn from each dataset by this rank.
    pub mixture_tokens: Vec<u64>,
    pub current: Option<Segment>,
    pub replay: Vec<Segment>,
    /// Shuffle buffer lines, each as the segments it was cut from.
    pub buffer: Vec<Vec<Segment>>,
    pub shuffle_rng: u64,
    /// Lines handed to the trainer by this rank since the run began.
    pub lines: u64,
}

/// The starting point of one rank, from scratch or from saved states.
#[derive(Debug, Clone, PartialEq)]
pub struct RankStart {
    pub cursors: Vec<Vec<Cursor>>,
    pub mixture_tokens: Vec<u64>,
    pub current: Option<Segment>,
    pub replay: VecDeque<Segment>,
    pub buffer: Vec<Vec<Segment>>,
    pub shuffle_rng: u64,
    pub lines: u64,
    pub block_docs: Vec<u64>,
}

/// The run's side of the comparison with saved states.
pub struct RunShape<'a> {
    pub seed: u64,
    pub logical_shards: usize,
    pub seq_len: usize,
    pub bos_token: Option<u32>,
    pub eos_token: Option<u32>,
    /// Name and document count of each configured dataset.
    pub datasets: &'a [(String, u64)],
}

fn shuffle_seed(seed: u64, rank: usize, generation: u64) -> u64 {
    mix(mix(seed ^ 0x5348_5546) ^ mix(rank as u64) ^ generation)
}

/// A fresh start for `rank`.
pub fn fresh(shape: &RunShape, default_block_docs: &[u64], rank: usize, world: usize) -> RankStart {
    let per = shape.logical_shards / world;
    RankStart {
        cursors: vec![vec![Cursor::default(); per]; shape.datasets.len()],
        mixture_tokens: vec![0; shape.datasets.len()],
        current: None,
        replay: VecDeque::new(),
        buffer: Vec::new(),
        shuffle_rng: shuffle_seed(shape.seed, rank, 0),
        lines: 0,
        block_docs: default_block_docs.to_vec(),
    }
}

/// Where `rank` of `world` starts from the saved states of all ranks of the
/// previous run.
pub fn resume(
    shape: &RunShape,
    rank: usize,
    world: usize,
    states: &[LoaderState],
) -> Result<RankStart> {
    let bad = |m: String| Err(DataError::State(m));
    let Some(first) = states.first() else {
        return bad("no saved states given".into());
    };
    let old_world = first.world;
    if states.len() != old_world {
        return bad(format!(
            "the previous run had {old_world} ranks but {} states were given; pass all of them",
            states.len()
        ));
    }
    let mut by_rank: Vec<Option<&LoaderState>> = vec![None; old_world];
    for s in states {
        if s.version != STATE_VERSION {
            return bad(format!(
                "state version {} (this build reads {STATE_VERSION})",
                s.version
            ));
        }
        if s.world != old_world || s.rank >= old_world || by_rank[s.rank].is_some() {
            return bad(format!(
                "states are not one per rank of one run (rank {} of {})",
                s.rank, s.world
            ));
        }
        check_shape(shape, s)?;
        by_rank[s.rank] = Some(s);
    }
    if !shape.logical_shards.is_multiple_of(world) {
        return bad(format!(
            "{world} ranks do not divide {} logical shards",
            shape.logical_shards
        ));
    }
    // Saved dataset index -> configured index (datasets matched by name).
    let remap: Vec<usize> = first
        .datasets
        .iter()
        .map(|l| {
            shape
                .datasets
                .iter()
                .position(|(n, _)| *n == l.name)
                .unwrap_or(usize::MAX)
        })
        .collect();
    let n = shape.datasets.len();
    let mut block_docs = vec![0; n];
    for (i, l) in first.datasets.iter().enumerate() {
        block_docs[remap[i]] = l.block_docs;
    }
    let re = |s: &Segment| Segment {
        dataset: remap[s.dataset as usize] as u32,
        ..*s
    };

    if old_world == world {
        let Some(s) = by_rank[rank] else {
            unreachable!("every rank checked present")
        };
        let mut cursors = vec![Vec::new(); n];
        let mut mixture_tokens = vec![0; n];
        for (i, c) in s.cursors.iter().enumerate() {
            cursors[remap[i]] = c.clone();
            mixture_tokens[remap[i]] = s.mixture_tokens.get(i).copied().unwrap_or(0);
        }
        return Ok(RankStart {
            cursors,
            mixture_tokens,
            current: s.current.as_ref().map(re),
            replay: s.replay.iter().map(re).collect(),
            buffer: s
                .buffer
                .iter()
                .map(|l| l.iter().map(re).collect())
                .collect(),
            shuffle_rng: s.shuffle_rng,
            lines: s.lines,
            block_docs,
        });
    }

    // Rescale: gather every shard's cursor, then hand each new rank its own.
    let l = shape.logical_shards;
    let mut all: Vec<Vec<Option<Cursor>>> = vec![vec![None; l]; n];
    for s in states {
        let mine = owned(l, s.rank, s.world);
        for (i, cs) in s.cursors.iter().enumerate() {
            if cs.len() != mine.len() {
                return bad(format!(
                    "rank {} saved {} cursors for dataset {i}, expected {}",
                    s.rank,
                    cs.len(),
                    mine.len()
                ));
            }
            for (k, c) in cs.iter().enumerate() {
                all[remap[i]][mine.start + k] = Some(*c);
            }
        }
    }
    let mine = owned(l, rank, world);
    let mut cursors = vec![Vec::with_capacity(mine.len()); n];
    for (d, shard_cursors) in all.iter().enumerate() {
        for s in mine.clone() {
            match shard_cursors[s] {
                Some(c) => cursors[d].push(c),
                None => {
                    return bad(format!(
                        "no saved cursor for shard {s} of dataset `{}`",
                        shape.datasets[d].0
                    ));
                }
            }
        }
    }
    let mut replay: Vec<Segment> = states
        .iter()
        .flat_map(|s| {
            s.current
                .iter()
                .chain(s.replay.iter())
                .chain(s.buffer.iter().flatten())
        })
        .map(re)
        .filter(|seg| mine.contains(&(seg.shard as usize)))
        .collect();
    // Document order makes consecutive re-reads hit the same block.
    replay.sort();
    let mut mixture_tokens = vec![0u64; n];
    let mut lines = 0;
    for s in states {
        for (i, t) in s.mixture_tokens.iter().enumerate() {
            mixture_tokens[remap[i]] += t;
        }
        lines += s.lines;
    }
    for t in &mut mixture_tokens {
        *t /= world as u64;
    }
    Ok(RankStart {
        cursors,
        mixture_tokens,
        current: None,
        replay: replay.into(),
        buffer: Vec::new(),
        shuffle_rng: shuffle_seed(shape.seed, rank, lines.wrapping_add(world as u64)),
        lines: lines / world as u64,
        block_docs,
    })
}

fn check_shape(shape: &RunShape, s: &LoaderState) -> Result<()> {
    let mut diffs = Vec::new();
    if s.seed != shape.seed {
        diffs.push(format!("seed {} vs {}", s.seed, shape.seed));
    }
    if s.logical_shards != shape.logical_shards {
        diffs.push(format!(
            "logical_shards {} vs {}",
            s.logical_shards, shape.logical_shards
        ));
    }
    if s.seq_len != shape.seq_len {
        diffs.push(format!("seq_len {} vs {}", s.seq_len, shape.seq_len));
    }
    if (s.bos_token, s.eos_token) != (shape.bos_token, shape.eos_token) {
        diffs.push(format!(
            "bos/eos {:?}/{:?} vs {:?}/{:?}",
            s.bos_token, s.eos_token, shape.bos_token, shape.eos_token
        ));
    }
    let saved: BTreeMap<&str, u64> = s
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.documents))
        .collect();
    let now: BTreeMap<&str, u64> = shape
        .datasets
        .iter()
        .map(|(n, d)| (n.as_str(), *d))
        .collect();
    if saved != now {
        diffs.push(format!("datasets (name: documents) {saved:?} vs {now:?}"));
    }
    if s.cursors.len() != s.datasets.len() {
        diffs.push("cursor table does not match the dataset list".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(DataError::State(format!(
            "rank {}'s saved state differs from this run (saved vs now): {}. A new stage starts a fresh loader; the data must not change mid-stage",
            s.rank,
            diffs.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_serialise_as_arrays() {
        let s = Segment {
            dataset: 1,
            shard: 2,
            doc: 3,
            start: 4,
            end: 5,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "[1,2,3,4,5]");
        assert_eq!(serde_json::from_str::<Segment>(&j).unwrap(), s);
    }
}
