//! Training configuration: YAML in, typed and validated, with `--set`
//! overrides; errors name the file, the key path and the line.

mod load;
mod schema;

pub use load::{ConfigError, load_config, parse_config};
pub use schema::*;

use bamba_model::BambaConfig;

impl TrainConfig {
    /// The model architecture: preset or HF config.json, then `model.hf` fields.
    pub fn model_config(&self) -> Result<BambaConfig, ConfigError> {
        let base = match &self.model.config {
            Some(path) => BambaConfig::from_file(path)
                .map_err(|e| ConfigError::invalid("model.config", e.to_string()))?,
            None => BambaConfig::preset(&self.model.preset).ok_or_else(|| {
                ConfigError::invalid(
                    "model.preset",
                    format!(
                        "unknown preset `{}`; one of {}",
                        self.model.preset,
                        BambaConfig::PRESETS.join(", ")
                    ),
                )
            })?,
        };
        if self.model.hf.is_empty() {
            return Ok(base);
        }
        let mut json = base.to_hf_json();
        let obj = json.as_object_mut().expect("config is an object");
        for (k, v) in &self.model.hf {
            obj.insert(k.clone(), v.clone());
        }
        // Rope overrides at top level must win over the base's rope_parameters.
        if self.model.hf.contains_key("rope_theta")
            || self.model.hf.contains_key("partial_rotary_factor")
        {
            obj.remove("rope_parameters");
        }
        BambaConfig::from_json_str(&BambaConfig::json_text(&json))
            .map_err(|e| ConfigError::invalid("model.hf", e.to_string()))
    }

    /// Sequences per optimizer step over all ranks.
    pub fn global_batch_sequences(&self) -> u64 {
        let t = &self.training;
        t.global_batch_sequences
            .unwrap_or_else(|| t.global_batch_tokens.unwrap_or(0) / self.data.seq_len as u64)
    }

    pub fn tokens_per_step(&self) -> u64 {
        self.global_batch_sequences() * self.data.seq_len as u64
    }

    /// Optimizer steps of the run.
    pub fn total_steps(&self) -> u64 {
        let t = &self.training;
        t.steps.unwrap_or_else(|| {
            t.total_tokens
                .unwrap_or(0)
                .div_ceil(self.tokens_per_step().max(1))
        })
    }

    /// Micro-batches per rank per step; the global batch in tokens does not
    /// depend on the number of ranks.
    pub fn grad_accumulation(&self, world: usize) -> Result<u64, ConfigError> {
        let per_rank = self.global_batch_sequences() as usize;
        let mb = self.training.micro_batch;
        if !per_rank.is_multiple_of(world * mb) {
            return Err(ConfigError::invalid(
                "training.micro_batch",
                format!(
                    "the global batch of {per_rank} sequences does not split into {world} ranks x micro-batches of {mb}"
                ),
            ));
        }
        Ok((per_rank / (world * mb)) as u64)
    }

    pub fn schedule(&self) -> crate::optim::Schedule {
        crate::optim::Schedule {
            peak_lr: self.optimizer.lr,
            final_lr: self.schedule.final_lr,
            warmup_steps: self.schedule.warmup_steps,
            warmup: self.schedule.warmup,
            decay: self.schedule.decay,
            total_steps: self.total_steps(),
        }
    }
}
