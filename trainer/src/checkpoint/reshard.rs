//! Reading a checkpoint's slices for any number of shards: the slice
//! `[r * len, (r + 1) * len)` of a unit's flat buffer is assembled from
//! whichever old shard files cover it, so 4 ranks resume on 2, 1 on 4, etc.
//! Parameters are copied one by one, so the checkpoint's own alignment
//! (format 1 packed them densely) may differ from this build's.

use std::path::Path;

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::format::{CheckpointMeta, STATE_NAMES, shard_file};
use crate::fsdp::{Layout, overlaps};

/// This shard's slices `[master, exp_avg, exp_avg_sq]` per unit, in the new layout.
pub fn read_slices(
    dir: &Path,
    meta: &CheckpointMeta,
    layout: &Layout,
    shard: usize,
) -> Result<Vec<[Vec<f32>; 3]>> {
    let units: Vec<(String, usize)> = layout
        .units
        .iter()
        .map(|u| (u.name.clone(), u.numel))
        .collect();
    if units != meta.units {
        bail!(
            "{}: the checkpoint's parameter layout differs from this model's (different architecture?)",
            dir.display()
        );
    }
    let files = (0..meta.shards)
        .map(|s| {
            let path = dir.join(shard_file(s));
            let f = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // Safety: checkpoint files are immutable once written.
            let map =
                unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
            Ok((path, map))
        })
        .collect::<Result<Vec<_>>>()?;
    let parsed = files
        .iter()
        .map(|(p, m)| {
            SafeTensors::deserialize(m)
                .with_context(|| format!("{}: not valid safetensors", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;

    // Where each parameter lies in the checkpoint's own flat buffers.
    let old = layout.with(meta.shards, meta.align);
    for ou in &old.units {
        for (s, p) in parsed.iter().enumerate() {
            for kind in STATE_NAMES {
                let name = format!("{}.{kind}", ou.name);
                let path = files[s].0.display();
                let t = p
                    .tensor(&name)
                    .with_context(|| format!("{path}: tensor {name}"))?;
                if t.data().len() != ou.shard_len * 4 {
                    bail!(
                        "{path}: tensor {name} holds {} bytes, expected {} f32 values (truncated, or another layout)",
                        t.data().len(),
                        ou.shard_len
                    );
                }
            }
        }
    }

    let mut out = vec![];
    for (unit, ou) in layout.units.iter().zip(&old.units) {
        let (start, len) = (shard * unit.shard_len, unit.shard_len);
        let mut slices: [Vec<f32>; 3] = Default::default();
        for (k, kind) in STATE_NAMES.iter().enumerate() {
            // Only real elements are copied; gaps and padding stay zero.
            let mut v = vec![0f32; len];
            let name = format!("{}.{kind}", unit.name);
            for (slot, at, to, n) in overlaps(unit, start, len) {
                let from = ou
                    .params
                    .iter()
                    .find(|p| p.name == slot.name)
                    .expect("same parameters in both layouts");
                let (mut pos, mut dst, mut left) = (from.offset + at, to, n);
                while left > 0 {
                    let s = pos / ou.shard_len;
                    let off = pos - s * ou.shard_len;
                    let take = left.min(ou.shard_len - off);
                    let t = parsed[s].tensor(&name).expect("checked above");
                    let bytes = &t.data()[off * 4..(off + take) * 4];
                    for (d, b) in v[dst..dst + take].iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    (pos, dst, left) = (pos + take, dst + take, left - take);
                }
            }
            slices[k] = v;
        }
        out.push(slices);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format::{RankShard, encode_shard};
    use bamba_model::BambaConfig;

    /// Element `e` of parameter `pi`, state `k`: distinct everywhere.
    fn value(pi: usize, e: usize, k: usize) -> f32 {
        (k * 1_000_000 + pi * 10_000 + e) as f32
    }

    /// Writes `layout`'s shards with [`value`]s (zeros in gaps and padding).
    fn write(dir: &Path, layout: &Layout) {
        for s in 0..layout.shards {
            let units = layout
                .units
                .iter()
                .map(|u| {
                    let states = std::array::from_fn(|k| {
                        let mut v = vec![0f32; u.shard_len];
                        for (slot, at, to, n) in overlaps(u, s * u.shard_len, u.shard_len) {
                            let pi = u.params.iter().position(|p| p.name == slot.name).unwrap();
                            for i in 0..n {
                                v[to + i] = value(pi, at + i, k);
                            }
                        }
                        v
                    });
                    (u.name.clone(), states)
                })
                .collect();
            let bytes = encode_shard(&RankShard::from_units(units)).unwrap();
            std::fs::write(dir.join(shard_file(s)), bytes).unwrap();
        }
    }

    fn meta(layout: &Layout, version: u32) -> CheckpointMeta {
        CheckpointMeta {
            format_version: version,
            step: 1,
            tokens_seen: 0,
            world_size: layout.shards,
            shards: layout.shards,
            strategy: "fsdp".into(),
            units: layout
                .units
                .iter()
                .map(|u| (u.name.clone(), u.numel))
                .collect(),
            align: layout.align,
            skipped_steps: 0,
            wandb_run_id: None,
            config_yaml: String::new(),
            model_config: String::new(),
        }
    }

    /// Format 1 (packed, 2 shards) and format 2 (aligned, 4 shards) both
    /// read into this build's aligned layout on 3 shards, every value at its
    /// parameter's new place and zeros elsewhere.
    #[test]
    fn checkpoints_of_either_alignment_read_into_any_shard_count() {
        let cfg = BambaConfig::tiny();
        let new = Layout::new(&cfg, 3);
        for (old, version) in [(new.with(2, 1), 1), (Layout::new(&cfg, 4), 2)] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), &old);
            let meta = meta(&old, version);
            for shard in 0..3 {
                let slices = read_slices(dir.path(), &meta, &new, shard).unwrap();
                for (u, states) in new.units.iter().zip(&slices) {
                    for (k, v) in states.iter().enumerate() {
                        let mut want = vec![0f32; u.shard_len];
                        for (slot, at, to, n) in overlaps(u, shard * u.shard_len, u.shard_len) {
                            let pi = u.params.iter().position(|p| p.name == slot.name).unwrap();
                            for i in 0..n {
                                want[to + i] = value(pi, at + i, k);
                            }
                        }
                        assert_eq!(
                            v, &want,
                            "unit {} state {k} shard {shard} (v{version})",
                            u.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_truncated_shard_tensor_is_named() {
        let cfg = BambaConfig::tiny();
        let layout = Layout::new(&cfg, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut short = layout.clone();
        short.units[0].shard_len -= 1;
        write(dir.path(), &short);
        let err = read_slices(dir.path(), &meta(&layout, 2), &layout, 0).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("shard_0.safetensors") && msg.contains("embed.master"),
            "{msg}"
        );
    }
}
