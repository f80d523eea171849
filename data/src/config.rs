//! What the trainer tells the loader: the sub-datasets with their weights and
//! the packing, sharding and shuffling knobs. Plain data with documented
//! defaults; all checking that needs no file I/O happens in `validate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// One sub-dataset: a directory searched recursively for `.parquet` and
/// `.arrow` files, and its share of the token stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub name: String,
    pub path: PathBuf,
    /// Relative weight; shares are `weight / sum(weights)` of *tokens*.
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub datasets: Vec<DatasetSpec>,
    /// Tokens a model sees per sequence; lines hold `seq_len + 1`.
    pub seq_len: usize,
    /// Put before every document (none by default).
    pub bos_token: Option<u32>,
    /// Put after every document: 0 in Bamba's stage 1, 128000 in stage 2.
    pub eos_token: Option<u32>,
    /// Fixed for the life of a run: any rank count dividing it can resume.
    /// Bamba used 960 (divisible by 1..6, 8, 10, 12, 15, 16, 20, 24, ...).
    pub logical_shards: usize,
    /// Packed lines held for shuffling (fms-fsdp and Bamba: 10,000).
    pub shuffle_buffer: usize,
    pub seed: u64,
    /// Token column of parquet files (IPC files fall back to `tokens`).
    pub column: String,
    /// Packed lines the background thread keeps ready ahead of the trainer.
    pub prefetch: usize,
    /// Upper bound on the tokens read from disk at once per sub-dataset;
    /// smaller blocks mean less memory, larger ones fewer reads.
    pub block_tokens: u64,
    /// `None` streams forever (training). `Some(n)` ends after every document
    /// was read n times: the last partial line is padded with EOS (or 0) and
    /// `next_batch` then fails with `DataError::Exhausted` (tests, evaluation).
    pub epochs: Option<u64>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            datasets: Vec::new(),
            seq_len: 4096,
            bos_token: None,
            eos_token: Some(0),
            logical_shards: 960,
            shuffle_buffer: 10_000,
            seed: 0,
            column: "input_ids".into(),
            prefetch: 64,
            block_tokens: 1 << 20,
            epochs: None,
        }
    }
}

impl LoaderConfig {
    /// Checks everything that needs no file access.
    pub fn validate(&self, rank: usize, world: usize) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(m));
        if self.datasets.is_empty() {
            return bad("no datasets".into());
        }
        if self.seq_len == 0 {
            return bad("seq_len must be at least 1".into());
        }
        if self.logical_shards == 0 {
            return bad("logical_shards must be at least 1".into());
        }
        if world == 0 || rank >= world {
            return bad(format!("rank {rank} is not in a world of {world}"));
        }
        if !self.logical_shards.is_multiple_of(world) {
            return bad(format!(
                "{world} ranks cannot share {} logical shards: the rank count must divide it",
                self.logical_shards
            ));
        }
        if self.block_tokens == 0 {
            return bad("block_tokens must be at least 1".into());
        }
        if self.epochs == Some(0) {
            return bad("epochs must be at least 1 (or unset to stream forever)".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for d in &self.datasets {
            if !names.insert(d.name.as_str()) {
                return Err(DataError::Weights(format!(
                    "dataset `{}` is listed twice",
                    d.name
                )));
            }
            if !(d.weight.is_finite() && d.weight > 0.0) {
                return Err(DataError::Weights(format!(
                    "dataset `{}` has weight {}; weights must be finite and positive",
                    d.name, d.weight
                )));
            }
        }
        Ok(())
    }
}

/// Builds the dataset list for a root holding one directory per sub-dataset
/// (Dolma's and fms-fsdp's layout), failing when a weight names a directory
/// that is not there or a directory has no weight: a silently dropped
/// sub-dataset would change the mixture for the whole run.
pub fn datasets_from_root(
    root: &Path,
    weights: &BTreeMap<String, f64>,
) -> Result<Vec<DatasetSpec>> {
    let entries = std::fs::read_dir(root).map_err(|e| DataError::io(root, e))?;
    let mut dirs = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(root, e))?;
        if entry.path().is_dir() {
            dirs.insert(
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            );
        }
    }
    let missing: Vec<_> = weights
        .keys()
        .filter(|k| !dirs.contains_key(*k))
        .cloned()
        .collect();
    let unweighted: Vec<_> = dirs
        .keys()
        .filter(|k| !weights.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() || !unweighted.is_empty() {
        return Err(DataError::Weights(format!(
            "under {}: weights for missing directories [{}], directories without a weight [{}]",
            root.display(),
            missing.join(", "),
            unweighted.join(", ")
        )));
    }
    Ok(dirs
        .into_iter()
        .map(|(name, path)| DatasetSpec {
            weight: weights[&name],
            name,
            path,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(weights: &[f64]) -> LoaderConfig {
        LoaderConfig {
            datasets: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| DatasetSpec {
                    name: format!("d{i}"),
                    path: PathBuf::from("."),
                    weight: w,
                })
                .collect(),
            logical_shards: 12,
            ..Default::default()
        }
    }

    #[test]
    fn world_must_divide_logical_shards() {
        assert!(cfg(&[1.0]).validate(0, 3).is_ok());
        let e = cfg(&[1.0]).validate(0, 5).unwrap_err().to_string();
        assert!(e.contains("divide"), "{e}");
        assert!(cfg(&[1.0]).validate(3, 3).is_err());
    }

    #[test]
    fn weights_must_be_positive() {
        assert!(cfg(&[1.0, 0.0]).validate(0, 1).is_err());
        assert!(cfg(&[1.0, f64::NAN]).validate(0, 1).is_err());
    }

    #[test]
    fn root_weights_must_match_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let w = |kv: &[(&str, f64)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let ok = datasets_from_root(dir.path(), &w(&[("a", 1.0), ("b", 2.0)])).unwrap();
        assert_eq!(ok.len(), 2);
        let e = datasets_from_root(dir.path(), &w(&[("a", 1.0), ("c", 2.0)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[c]") && e.contains("[b]"), "{e}");
    }
}
