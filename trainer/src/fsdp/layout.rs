//! How parameters are grouped and split: FSDP "units" (one per decoder layer,
//! plus the embeddings and the head), each a flat buffer of its parameters in
//! checkpoint order, padded to a multiple of the shard count so every rank
//! holds an equal slice. Any parameter shape and any world size work.
//!
//! Parameters start at multiples of [`ALIGN`] elements (512 bytes in bf16,
//! CUDA's allocation alignment), and slices are multiples of it too: burn
//! can then view a gathered weight in place instead of copying it out.

use bamba_model::BambaConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlot {
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset of the parameter inside its unit's flat buffer.
    pub offset: usize,
    pub numel: usize,
}

/// Elements a parameter's offset (and a shard's length) is a multiple of.
pub const ALIGN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    pub params: Vec<ParamSlot>,
    /// Real elements (without padding).
    pub numel: usize,
    /// Extent of the parameters, gaps between them included.
    pub len: usize,
    /// Elements per shard: `ceil(len / shards)`, rounded up to the alignment.
    pub shard_len: usize,
}

impl Unit {
    pub fn padded(&self, shards: usize) -> usize {
        self.shard_len * shards
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub units: Vec<Unit>,
    /// Ranks a unit is split over (world size for fsdp, group size for hsdp, 1 for ddp).
    pub shards: usize,
    /// Parameter offsets and shard lengths are multiples of this (1: packed
    /// densely, as checkpoints of format 1 are).
    pub align: usize,
}

impl Layout {
    pub fn new(cfg: &BambaConfig, shards: usize) -> Self {
        Self::build(cfg.parameter_shapes(), shards, ALIGN)
    }

    /// The same parameters split over `shards` with another alignment (to
    /// read a checkpoint written by another run).
    pub fn with(&self, shards: usize, align: usize) -> Self {
        let params = self
            .units
            .iter()
            .flat_map(|u| u.params.iter().map(|p| (p.name.clone(), p.shape.clone())));
        Self::build(params, shards, align)
    }

    fn build(
        params: impl IntoIterator<Item = (String, Vec<usize>)>,
        shards: usize,
        align: usize,
    ) -> Self {
        let align = align.max(1);
        let unit_of = |name: &str| -> String {
            match name.strip_prefix("model.layers.") {
                Some(rest) => format!("layers.{}", rest.split('.').next().unwrap_or_default()),
                None if name.starts_with("model.embed_tokens") => "embed".into(),
                None => "head".into(),
            }
        };
        let mut units: Vec<Unit> = vec![];
        for (name, shape) in params {
            let u = unit_of(&name);
            if units.last().map(|x| x.name != u).unwrap_or(true) {
                units.push(Unit {
                    name: u,
                    params: vec![],
                    numel: 0,
                    len: 0,
                    shard_len: 0,
                });
            }
            let unit = units.last_mut().expect("pushed above");
            let numel = shape.iter().product();
            let offset = unit.len.next_multiple_of(align);
            unit.params.push(ParamSlot {
                name,
                shape,
                offset,
                numel,
            });
            unit.numel += numel;
            unit.len = offset + numel;
        }
        for u in &mut units {
            u.shard_len = u.len.div_ceil(shards).next_multiple_of(align);
        }
        Self {
            units,
            shards,
            align,
        }
    }

    /// Elements this rank holds over all units (padding included).
    pub fn shard_numel(&self) -> usize {
        self.units.iter().map(|u| u.shard_len).sum()
    }

    pub fn total_numel(&self) -> usize {
        self.units.iter().map(|u| u.numel).sum()
    }
}

/// The pieces of parameters that fall inside `[start, start + len)` of a unit's
/// flat buffer: `(slot, offset within the parameter, offset within the range, count)`.
pub fn overlaps(
    unit: &Unit,
    start: usize,
    len: usize,
) -> impl Iterator<Item = (&ParamSlot, usize, usize, usize)> {
    let end = start + len;
    unit.params.iter().filter_map(move |p| {
        let (a, b) = (p.offset.max(start), (p.offset + p.numel).min(end));
        (a < b).then(|| (p, a - p.offset, a - start, b - a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_layout_packs_parameters_back_to_back() {
        let cfg = BambaConfig::tiny();
        let l = Layout::new(&cfg, 3).with(3, 1);
        for u in &l.units {
            assert_eq!(u.len, u.numel);
            assert_eq!(u.shard_len, u.numel.div_ceil(3));
            let mut at = 0;
            for p in &u.params {
                assert_eq!(p.offset, at);
                at += p.numel;
            }
        }
    }

    #[test]
    fn units_cover_every_parameter_once_for_any_world() {
        let cfg = BambaConfig::bamba_9b();
        for shards in [1, 2, 3, 7, 8, 192] {
            let l = Layout::new(&cfg, shards);
            assert_eq!(l.units.len(), cfg.num_hidden_layers + 2);
            assert_eq!(l.total_numel() as u64, cfg.num_parameters());
            for u in &l.units {
                assert!(u.padded(shards) >= u.len && u.len >= u.numel);
                assert!(u.padded(shards) - u.len < shards * ALIGN);
                assert_eq!(u.shard_len % ALIGN, 0);
                for p in &u.params {
                    assert_eq!(p.offset % ALIGN, 0, "{}", p.name);
                }
                let covered: usize = (0..shards)
                    .flat_map(|r| overlaps(u, r * u.shard_len, u.shard_len).map(|o| o.3))
                    .sum();
                assert_eq!(covered, u.numel);
            }
        }
    }
}
