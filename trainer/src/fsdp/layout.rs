//! How parameters are grouped and split: FSDP "units" (one per decoder layer,
//! plus the embeddings and the head), each a flat buffer of its parameters in
//! checkpoint order, padded to a multiple of the shard count so every rank
//! holds an equal slice. Any parameter shape and any world size work.

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    pub name: String,
    pub params: Vec<ParamSlot>,
    /// Real elements (without padding).
    pub numel: usize,
    /// Elements per shard: `ceil(numel / shards)`.
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
}

impl Layout {
    pub fn new(cfg: &BambaConfig, shards: usize) -> Self {
        let unit_of = |name: &str| -> String {
            match name.strip_prefix("model.layers.") {
                Some(rest) => format!("layers.{}", rest.split('.').next().unwrap_or_default()),
                None if name.starts_with("model.embed_tokens") => "embed".into(),
                None => "head".into(),
            }
        };
        let mut units: Vec<Unit> = vec![];
        for (name, shape) in cfg.parameter_shapes() {
            let u = unit_of(&name);
            if units.last().map(|x| x.name != u).unwrap_or(true) {
                units.push(Unit {
                    name: u,
                    params: vec![],
                    numel: 0,
                    shard_len: 0,
                });
            }
            let unit = units.last_mut().expect("pushed above");
            let numel = shape.iter().product();
            unit.params.push(ParamSlot {
                name,
                shape,
                offset: unit.numel,
                numel,
            });
            unit.numel += numel;
        }
        for u in &mut units {
            u.shard_len = u.numel.div_ceil(shards);
        }
        Self { units, shards }
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
    fn units_cover_every_parameter_once_for_any_world() {
        let cfg = BambaConfig::bamba_9b();
        for shards in [1, 2, 3, 7, 8, 192] {
            let l = Layout::new(&cfg, shards);
            assert_eq!(l.units.len(), cfg.num_hidden_layers + 2);
            assert_eq!(l.total_numel() as u64, cfg.num_parameters());
            for u in &l.units {
                assert!(u.padded(shards) >= u.numel && u.padded(shards) - u.numel < shards);
                let covered: usize = (0..shards)
                    .flat_map(|r| overlaps(u, r * u.shard_len, u.shard_len).map(|o| o.3))
                    .sum();
                assert_eq!(covered, u.numel);
            }
        }
    }
}
