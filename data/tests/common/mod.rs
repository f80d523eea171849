//! Synthetic datasets whose token ids say which document and position they
//! come from, so tests can count exactly what the loader emitted.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bamba_data::counts::Counts;
use bamba_data::shards::mix;
use bamba_data::tokenize::writer::{ShardWriter, WriterOptions};
use bamba_data::{DatasetSpec, Loader, LoaderConfig};

/// Below every document token, so framing tokens are told apart.
pub const EOS: u32 = 7;
pub const BOS: u32 = 8;
pub const FIRST_TOKEN: u32 = 1000;

/// `n` documents of 1..=60 tokens, each token id used once, from `*next`.
pub fn docs(n: usize, salt: u64, next: &mut u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = 1 + (mix(salt ^ i as u64) % 60) as u32;
            let d: Vec<u32> = (*next..*next + len).collect();
            *next += len;
            d
        })
        .collect()
}

/// Writes `docs` as small-row-group parquet shards plus a counts file.
pub fn write_parquet(dir: &Path, docs: &[Vec<u32>]) {
    let opts = WriterOptions {
        shard_tokens: 4000,
        row_group_tokens: 700,
        ..Default::default()
    };
    let mut w = ShardWriter::new(dir, "part", opts).unwrap();
    for d in docs {
        w.push(d).unwrap();
    }
    let files = w.finish().unwrap();
    Counts {
        version: 1,
        column: "input_ids".into(),
        files,
    }
    .write(dir)
    .unwrap();
}

pub struct Corpus {
    pub dir: tempfile::TempDir,
    pub specs: Vec<DatasetSpec>,
    /// Every document token, each exactly once.
    pub tokens: BTreeMap<u32, usize>,
    /// Token id ranges per dataset.
    pub ranges: Vec<(u32, u32)>,
}

/// Two parquet datasets (`a` 700 docs, `b` 400 docs, weights 2:1).
pub fn corpus() -> Corpus {
    let dir = tempfile::tempdir().unwrap();
    let mut next = FIRST_TOKEN;
    let mut specs = Vec::new();
    let mut tokens = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, n, w) in [("a", 700, 2.0), ("b", 400, 1.0)] {
        let path: PathBuf = dir.path().join(name);
        let lo = next;
        let ds = docs(n, name.len() as u64 * 31 + n as u64, &mut next);
        for t in ds.iter().flatten() {
            tokens.insert(*t, 1);
        }
        ranges.push((lo, next));
        write_parquet(&path, &ds);
        specs.push(DatasetSpec {
            name: name.into(),
            path,
            weight: w,
        });
    }
    Corpus {
        dir,
        specs,
        tokens,
        ranges,
    }
}

pub fn config(specs: &[DatasetSpec]) -> LoaderConfig {
    LoaderConfig {
        datasets: specs.to_vec(),
        seq_len: 31,
        bos_token: Some(BOS),
        eos_token: Some(EOS),
        logical_shards: 12,
        shuffle_buffer: 40,
        seed: 1234,
        prefetch: 3,
        block_tokens: 300,
        ..Default::default()
    }
}

/// Takes `n` batches of `batch` lines from every loader (ranks in lockstep,
/// as in training) and returns the tokens.
pub fn take(loaders: &mut [Loader], n: usize, batch: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); loaders.len()];
    for _ in 0..n {
        for (r, l) in loaders.iter_mut().enumerate() {
            out[r].extend(l.next_batch(batch).unwrap());
        }
    }
    out
}

/// Serialises states through JSON as a checkpoint would.
pub fn save(loaders: &[Loader]) -> Vec<bamba_data::LoaderState> {
    loaders
        .iter()
        .map(|l| serde_json::from_str(&serde_json::to_string(&l.state()).unwrap()).unwrap())
        .collect()
}

pub fn resume(cfg: &LoaderConfig, world: usize, states: &[bamba_data::LoaderState]) -> Vec<Loader> {
    (0..world)
        .map(|r| Loader::resume(cfg.clone(), r, world, states).unwrap())
        .collect()
}

pub fn fresh(cfg: &LoaderConfig, world: usize) -> Vec<Loader> {
    (0..world)
        .map(|r| Loader::new(cfg.clone(), r, world).unwrap())
        .collect()
}
