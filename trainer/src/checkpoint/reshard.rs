//! Reading a checkpoint's slices for any number of shards: the slice
//! `[r * len, (r + 1) * len)` of a unit's flat buffer is assembled from
//! whichever old shard files cover it, so 4 ranks resume on 2, 1 on 4, etc.

use std::path::Path;

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::format::{CheckpointMeta, STATE_NAMES, shard_file};
use crate::fsdp::Layout;

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

    let mut out = vec![];
    for unit in &layout.units {
        let old_len = unit.numel.div_ceil(meta.shards);
        let (start, len) = (shard * unit.shard_len, unit.shard_len);
        let mut slices: [Vec<f32>; 3] = Default::default();
        for (k, kind) in STATE_NAMES.iter().enumerate() {
            let mut v = vec![0f32; len];
            // Only real elements are copied; padding stays zero.
            let end = (start + len).min(unit.numel);
            let mut pos = start;
            while pos < end {
                let old = pos / old_len;
                let take = (end - pos).min((old + 1) * old_len - pos);
                let name = format!("{}.{kind}", unit.name);
                let t = parsed[old]
                    .tensor(&name)
                    .with_context(|| format!("{}: tensor {name}", files[old].0.display()))?;
                let off = pos - old * old_len;
                let bytes = &t.data()[off * 4..(off + take) * 4];
                for (dst, b) in v[pos - start..pos - start + take]
                    .iter_mut()
                    .zip(bytes.chunks_exact(4))
                {
                    *dst = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                pos += take;
            }
            slices[k] = v;
        }
        out.push(slices);
    }
    Ok(out)
}
