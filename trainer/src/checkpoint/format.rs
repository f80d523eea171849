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
    write_parts(dir, name, &[bytes])
}

/// [`write_file`] of the concatenation of `parts`, without building it.
pub fn write_parts(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<FileEntry> {
    let path = dir.join(name);
    let (written, sha256) = std::thread::scope(|s| {
        let hash = s.spawn(|| {
            let mut h = Sha256::new();
            parts.iter().for_each(|p| h.update(p));
            hex(&h.finalize())
        });
        let written = File::create(&path)
            .with_context(|| format!("creating {}", path.display()))
            .and_then(|mut f| {
                parts
                    .iter()
                    .try_for_each(|p| f.write_all(p))
                    .and_then(|_| f.sync_all())
                    .with_context(|| format!("writing {}", path.display()))
            });
        (written, hash.join().expect("sha256 thread"))
    });
    written?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: parts.iter().map(|p| p.len() as u64).sum(),
        sha256,
    })
}

pub fn shard_file(shard: usize) -> String {
    format!("shard_{shard}.safetensors")
}

pub fn loader_file(rank: usize) -> String {
    format!("loader_{rank}.json")
}

/// A shard as the pieces of its safetensors file, in order: the length and
/// header that `safetensors::serialize` writes (tensors by name, data
/// offsets in that order), then each slice's little-endian f32 bytes,
/// borrowed from the shard.
fn shard_parts(shard: &RankShard) -> Result<(Vec<u8>, Vec<&[u8]>)> {
    use safetensors::tensor::{Metadata, TensorInfo};
    let total: usize = shard.units.iter().map(|u| u.1).sum();
    if let Some(state) = shard.states.iter().find(|s| s.len() != total) {
        bail!(
            "checkpoint shard: a state holds {} values, its units {total}",
            state.len()
        );
    }
    let mut slices = vec![];
    let mut at = 0;
    for (unit, len) in &shard.units {
        for (kind, values) in STATE_NAMES.iter().zip(&shard.states) {
            slices.push((format!("{unit}.{kind}"), &values[at..at + len]));
        }
        at += len;
    }
    slices.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offset = 0;
    let infos = slices
        .iter()
        .map(|(name, v)| {
            let n = std::mem::size_of_val(*v);
            offset += n;
            let info = TensorInfo {
                dtype: safetensors::Dtype::F32,
                shape: vec![v.len()],
                data_offsets: (offset - n, offset),
            };
            (name.clone(), info)
        })
        .collect();
    let mut header = serde_json::to_string(&Metadata::new(None, infos)?)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend(header);
    Ok((head, slices.into_iter().map(|(_, v)| le_bytes(v)).collect()))
}

/// The shard's safetensors file image (tests and tools; training streams
/// it with [`write_shard`]).
pub fn encode_shard(shard: &RankShard) -> Result<Vec<u8>> {
    let (head, data) = shard_parts(shard)?;
    Ok([&head[..]]
        .into_iter()
        .chain(data)
        .collect::<Vec<_>>()
        .concat())
}

/// Writes the shard to `dir/name` as safetensors straight from its states
/// (a file-sized image in memory would double a rank's host memory during
/// a checkpoint: 58 GB per rank for Bamba-9B on two GPUs).
pub fn write_shard(dir: &Path, name: &str, shard: &RankShard) -> Result<FileEntry> {
    let (head, data) = shard_parts(shard)?;
    let parts: Vec<&[u8]> = [&head[..]].into_iter().chain(data).collect();
    write_parts(dir, name, &parts)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shard() -> RankShard {
        let v = |k: usize, n: usize| (0..n).map(|i| (k * 100 + i) as f32 * 0.5).collect();
        // Names out of order, a unit sorting between another's states.
        RankShard::from_units(vec![
            ("layers.1".into(), [v(1, 3), v(2, 3), v(3, 3)]),
            ("embed".into(), [v(4, 5), v(5, 5), v(6, 5)]),
            ("layers.10".into(), [v(7, 1), v(8, 1), v(9, 1)]),
        ])
    }

    /// The streamed file is byte for byte what `safetensors::serialize`
    /// writes, and its manifest entry hashes those bytes.
    #[test]
    fn streamed_shard_equals_safetensors_serialize() {
        let sh = shard();
        let mut views = vec![];
        let mut at = 0;
        for (unit, len) in &sh.units {
            for (kind, values) in STATE_NAMES.iter().zip(&sh.states) {
                views.push((
                    format!("{unit}.{kind}"),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        vec![*len],
                        le_bytes(&values[at..at + len]),
                    )
                    .unwrap(),
                ));
            }
            at += len;
        }
        let want = safetensors::serialize(views, None).unwrap();
        assert_eq!(encode_shard(&sh).unwrap(), want);

        let dir = tempfile::tempdir().unwrap();
        let entry = write_shard(dir.path(), "shard_0.safetensors", &sh).unwrap();
        let got = std::fs::read(dir.path().join("shard_0.safetensors")).unwrap();
        assert_eq!(got, want);
        assert_eq!(entry.bytes, want.len() as u64);
        assert_eq!(entry.sha256, hex(&Sha256::digest(&want)));
        let read = safetensors::SafeTensors::deserialize(&got).unwrap();
        assert_eq!(read.tensor("embed.exp_avg").unwrap().shape(), &[5]);
    }

    #[test]
    fn shard_with_short_state_is_refused() {
        let mut sh = shard();
        sh.states[1].pop();
        let err = encode_shard(&sh).unwrap_err().to_string();
        assert!(err.contains("a state holds 8 values, its units 9"), "{err}");
    }
}
