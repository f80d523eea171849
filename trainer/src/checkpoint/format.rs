//! The on-disk format of a checkpoint step directory and its integrity checks.
//!
//! ```text
//! step_<N>/meta.json                 CheckpointMeta
//! step_<N>/shard_<s>.safetensors     <unit>.master / .exp_avg / .exp_avg_sq, f32 [shard_len]
//! step_<N>/loader_<r>.json           data loader state of world rank r
//! step_<N>/manifest.json             sha256 and size of every file above
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// 2: parameters aligned in the flat buffers (`align`); 1 (still read): packed.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: u64,
    pub tokens_seen: u64,
    /// Ranks of the run that wrote it, and how many slices each unit was cut into.
    pub world_size: usize,
    pub shards: usize,
    pub strategy: String,
    /// `(unit name, real elements)`: a reader checks it builds the same units.
    pub units: Vec<(String, usize)>,
    /// Alignment of parameters in the flat buffers (`fsdp::Layout::align`);
    /// absent in format 1, which packed them (1).
    #[serde(default = "packed")]
    pub align: usize,
    pub skipped_steps: u64,
    pub wandb_run_id: Option<String>,
    /// The effective config of the run, as YAML.
    pub config_yaml: String,
    /// The model architecture, HF config.json text.
    pub model_config: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<FileEntry>,
}

/// One shard's slice of every unit: master weights and both moments, each
/// state one flat vector with the units back to back (as they come off the
/// device), so staging a checkpoint copies each value once.
pub struct RankShard {
    /// Unit names and their shard lengths, in order.
    pub units: Vec<(String, usize)>,
    /// [`STATE_NAMES`], each the concatenation of every unit's slice.
    pub states: [Vec<f32>; 3],
}

impl RankShard {
    /// From per-unit slices (tests and tools; training stages flat vectors).
    pub fn from_units(units: Vec<(String, [Vec<f32>; 3])>) -> Self {
        let mut states: [Vec<f32>; 3] = Default::default();
        let units = units
            .into_iter()
            .map(|(name, values)| {
                let len = values[0].len();
                for (state, v) in states.iter_mut().zip(values) {
                    assert_eq!(v.len(), len, "unit {name}: states of different lengths");
                    state.extend(v);
                }
                (name, len)
            })
            .collect();
        Self { units, states }
    }
}

pub const STATE_NAMES: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// Writes `bytes` to `dir/name`, fsynced; returns its manifest entry. The
/// sha256 is computed on another thread while the file is written.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let (written, sha256) = std::thread::scope(|s| {
        let hash = s.spawn(|| hex(&Sha256::digest(bytes)));
        let written = File::create(&path)
            .with_context(|| format!("creating {}", path.display()))
            .and_then(|mut f| {
                f.write_all(bytes)
                    .and_then(|_| f.sync_all())
                    .with_context(|| format!("writing {}", path.display()))
            });
        (written, hash.join().expect("sha256 thread"))
    });
    written?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        sha256,
    })
}

pub fn shard_file(shard: usize) -> String {
    format!("shard_{shard}.safetensors")
}

pub fn loader_file(rank: usize) -> String {
    format!("loader_{rank}.json")
}

/// Serializes a shard's slices as safetensors (little-endian f32, copied
/// once, into the file image).
pub fn encode_shard(shard: &RankShard) -> Result<Vec<u8>> {
    let total: usize = shard.units.iter().map(|u| u.1).sum();
    if let Some(state) = shard.states.iter().find(|s| s.len() != total) {
        bail!(
            "checkpoint shard: a state holds {} values, its units {total}",
            state.len()
        );
    }
    let mut views = vec![];
    let mut at = 0;
    for (unit, len) in &shard.units {
        for (kind, values) in STATE_NAMES.iter().zip(&shard.states) {
            views.push((
                format!("{unit}.{kind}"),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![*len],
                    le_bytes(&values[at..at + len]),
                )?,
            ));
        }
        at += len;
    }
    Ok(safetensors::serialize(views, None)?)
}

#[cfg(not(target_endian = "little"))]
compile_error!("checkpoint shards are written as the host's f32 bytes: little-endian hosts only");

/// The bytes of `values` as safetensors stores them (little-endian).
fn le_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte is a valid u8; the length covers the slice.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// Rank 0, after every rank wrote its files into the temporary directory:
/// writes meta and manifest, fsyncs, renames into place, moves `latest`.
pub fn finalize(
    tmp: &Path,
    final_dir: &Path,
    meta: &CheckpointMeta,
    mut files: Vec<FileEntry>,
) -> Result<()> {
    files.push(write_file(
        tmp,
        "meta.json",
        serde_json::to_string_pretty(meta)?.as_bytes(),
    )?);
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest { files };
    write_file(
        tmp,
        "manifest.json",
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    sync_dir(tmp)?;
    if final_dir.exists() {
        // Re-saving the same step (e.g. after a resume): replace it only now that the new one is complete.
        // Renamed away first, so a crash never leaves it half-deleted under its final name.
        super::remove_step_dir(final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(tmp, final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    let parent = final_dir.parent().expect("step dir has a parent");
    sync_dir(parent)?;
    let latest_tmp = parent.join("latest.tmp");
    let name = final_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    std::fs::write(&latest_tmp, name)
        .and_then(|_| File::open(&latest_tmp)?.sync_all())
        .with_context(|| format!("writing {}", latest_tmp.display()))?;
    std::fs::rename(&latest_tmp, parent.join("latest"))
        .with_context(|| format!("renaming {} into place", latest_tmp.display()))?;
    sync_dir(parent)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

/// Every file in the manifest exists with its size and checksum.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest: Manifest = read_json(&dir.join("manifest.json"))?;
    if !manifest.files.iter().any(|f| f.name == "meta.json") {
        bail!("manifest lists no meta.json");
    }
    for f in &manifest.files {
        let path = dir.join(&f.name);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("{} is missing", path.display()))?
            .len();
        if len != f.bytes {
            bail!(
                "{}: {} bytes, the manifest says {} (truncated?)",
                path.display(),
                len,
                f.bytes
            );
        }
        let mut hasher = Sha256::new();
        let mut file = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hex(&hasher.finalize()) != f.sha256 {
            bail!(
                "{}: checksum mismatch (the file was altered or corrupted)",
                path.display()
            );
        }
    }
    Ok(())
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn packed() -> usize {
    1
}

pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let meta: CheckpointMeta = read_json(&dir.join("meta.json"))?;
    if !(1..=FORMAT_VERSION).contains(&meta.format_version) {
        bail!(
            "{}: checkpoint format {} (this build reads formats 1 to {FORMAT_VERSION})",
            dir.display(),
            meta.format_version
        );
    }
    Ok(meta)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name -> file map of a directory's manifest (used in tests and tools).
pub fn manifest_map(dir: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let m: Manifest = read_json(&dir.join("manifest.json"))?;
    Ok(m.files.into_iter().map(|f| (f.name.clone(), f)).collect())
}
