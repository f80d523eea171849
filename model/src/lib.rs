//! Bamba, the Mamba2/attention hybrid language model, in burn.
//!
//! The model is pure math over burn tensors, generic over the backend; module
//! and field names are HF transformers' names, so a parameter's path in the
//! module tree *is* its name in an HF checkpoint. Sharding, precision and
//! checkpointing wrap it from outside (see the `bamba-train` crate).

pub mod attention;
pub mod config;
pub mod error;
pub mod hf;
pub mod init;
pub mod layer;
pub mod linear;
pub mod mamba2;
pub mod mlp;
pub mod model;
pub mod norm;
pub mod ops;
pub mod params;
pub mod rope;
pub mod ssd;

use std::path::Path;

pub use config::BambaConfig;
pub use error::ModelError;
pub use hf::{HfCheckpoint, NamedTensor, SaveDtype};
pub use model::{BambaForCausalLM, causal_lm_loss, hf_causal_lm_loss};
pub use ops::{BambaAutodiffBackend, BambaBackend};
pub use params::{ParamSource, VarBuilder};

impl<B: BambaBackend> BambaForCausalLM<B> {
    /// A freshly initialised model (mamba_ssm's pretraining init), reproducible from `seed`.
    pub fn init(cfg: &BambaConfig, seed: u64, device: &B::Device) -> Result<Self, ModelError> {
        let source = init::InitSource { cfg, seed };
        Self::new(&VarBuilder::new(&source, device), cfg)
    }

    /// Loads an HF checkpoint directory (`config.json` + safetensors).
    pub fn from_hf_dir(
        dir: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<(Self, BambaConfig), ModelError> {
        let dir = dir.as_ref();
        let cfg = BambaConfig::from_file(dir.join("config.json"))?;
        let ckpt = HfCheckpoint::open(dir)?;
        ckpt.verify(&cfg)?;
        Ok((Self::new(&VarBuilder::new(&ckpt, device), &cfg)?, cfg))
    }

    /// Writes this model as an HF checkpoint directory.
    pub fn save_hf(
        &self,
        dir: impl AsRef<Path>,
        cfg: &BambaConfig,
        dtype: SaveDtype,
        max_shard_bytes: usize,
    ) -> Result<(), ModelError> {
        hf::save_hf(
            dir.as_ref(),
            cfg,
            &hf::named_tensors(self),
            dtype,
            max_shard_bytes,
        )
    }
}
