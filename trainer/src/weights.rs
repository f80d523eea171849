//! Where `model.init_from` weights come from: an HF model directory, or a
//! bamba-train checkpoint (a step directory, or an output directory: its
//! newest valid step), read as full parameters by HF name.

use std::path::Path;

use anyhow::{Context, Result};
use bamba_model::{BambaConfig, HfCheckpoint, ParamSource};

use crate::checkpoint::{self, format};
use crate::fsdp::Layout;

/// Initial weights from `model.init_from`: an HF directory, or a bamba-train
/// checkpoint (a step directory, or an output directory: its newest valid step).
pub enum WeightsSource {
    Hf(HfCheckpoint),
    Checkpoint(CheckpointWeights),
}

impl WeightsSource {
    pub fn open(path: &Path, cfg: &BambaConfig) -> Result<Self> {
        if path.join("config.json").exists() {
            let ckpt = HfCheckpoint::open(path)?;
            ckpt.verify(cfg)?;
            return Ok(Self::Hf(ckpt));
        }
        let dir = if path.join("meta.json").exists() {
            format::verify(path).with_context(|| format!("model.init_from {}", path.display()))?;
            path.to_path_buf()
        } else {
            checkpoint::newest_valid(path, &mut |w| eprintln!("warning: {w}"))
                .with_context(|| format!("model.init_from {}: no HF model, checkpoint, or valid checkpoint under checkpoints/", path.display()))?
        };
        Ok(Self::Checkpoint(CheckpointWeights::read(&dir, cfg)?))
    }

    pub fn as_source(&self) -> &dyn ParamSource {
        match self {
            Self::Hf(h) => h,
            Self::Checkpoint(c) => c,
        }
    }
}

/// Full parameters rebuilt from a checkpoint's master slices.
pub struct CheckpointWeights {
    params: std::collections::HashMap<String, Vec<f32>>,
}

impl CheckpointWeights {
    fn read(dir: &Path, cfg: &BambaConfig) -> Result<Self> {
        let meta = format::read_meta(dir)?;
        let layout = Layout::new(cfg, 1);
        let slices = checkpoint::reshard::read_slices(dir, &meta, &layout, 0)?;
        let mut params = std::collections::HashMap::new();
        for (unit, [master, _, _]) in layout.units.iter().zip(slices) {
            for p in &unit.params {
                params.insert(
                    p.name.clone(),
                    master[p.offset..p.offset + p.numel].to_vec(),
                );
            }
        }
        Ok(Self { params })
    }
}

impl ParamSource for CheckpointWeights {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, bamba_model::ModelError> {
        let v = self
            .params
            .get(name)
            .ok_or_else(|| bamba_model::ModelError::tensor(name, "not in the checkpoint"))?;
        if v.len() != shape.iter().product::<usize>() {
            return Err(bamba_model::ModelError::tensor(
                name,
                format!(
                    "{} values in the checkpoint, shape {shape:?} needs more",
                    v.len()
                ),
            ));
        }
        Ok(v.clone())
    }
}
