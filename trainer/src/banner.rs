//! What a run is about to do, printed once by rank 0 before its first step
//! (torchtitan logs the same facts at start-up): the model, how it is
//! parallelised, the batch arithmetic, the state a rank holds, the data,
//! and where the run starts and ends.

use crate::config::{AccumulateGrads, Distribute, Strategy, TrainConfig};
use crate::fsdp::StateBytes;
use crate::metrics::progress::human;
use bamba_model::BambaConfig;

/// The facts of a run that its config alone does not give.
pub struct RunFacts<'a> {
    pub cfg: &'a TrainConfig,
    pub model: &'a BambaConfig,
    pub world: usize,
    /// Ranks that share one copy of the state (fsdp: all; ddp: 1).
    pub shard_ranks: usize,
    /// Micro-batches a rank runs per step.
    pub accum: u64,
    pub state: StateBytes,
    pub total_steps: u64,
    /// The step the run starts after (0 unless resumed).
    pub start_step: u64,
    /// Where the weights come from: a checkpoint, `model.init_from`, or a seed.
    pub weights_from: String,
    /// Seconds from start to the first step (state built or loaded).
    pub ready_s: f64,
}

pub fn lines(f: &RunFacts) -> Vec<String> {
    let (c, m) = (f.cfg, f.model);
    let ranks = |n: usize| format!("{n} rank{}", if n == 1 { "" } else { "s" });
    let attn = m.attn_layer_indices.len();
    let precision = format!("{:?}", c.training.precision).to_lowercase();
    let p = &c.parallelism;
    let strategy = match p.strategy {
        Strategy::Fsdp => format!("fsdp over {}", ranks(f.world)),
        Strategy::Hsdp => format!(
            "hsdp over {} (shard groups of {})",
            ranks(f.world),
            f.shard_ranks
        ),
        Strategy::Ddp => format!("ddp over {}", ranks(f.world)),
    };
    let step_kind = if !p.streamed() {
        "whole-model step".to_string()
    } else {
        let mut s = format!(
            "layer by layer, {}% of layers recomputed",
            (100.0 * p.activation_checkpointing).round()
        );
        if p.recompute_elementwise {
            s += ", elementwise outputs made again";
        }
        if p.reshard_after_forward {
            s += ", resharded after forward";
        }
        s
    };
    let accumulation = match (f.accum, p.accumulate_grads) {
        (1, _) => String::new(),
        (_, AccumulateGrads::Sharded) if f.shard_ranks > 1 => ", gradient slices summed".into(),
        _ => ", full gradients summed".into(),
    };
    let gb = |b: usize| b as f64 / 1e9;
    let names: Vec<&str> = c.data.datasets.iter().map(|d| d.name.as_str()).collect();
    let shown = if names.len() > 4 {
        format!("{}, ... ({} in all)", names[..4].join(", "), names.len())
    } else {
        names.join(", ")
    };
    let every = c.checkpoint.every_steps;
    let saves = if every > 0 {
        format!("a checkpoint every {every} steps")
    } else {
        "no periodic checkpoints".into()
    };
    let mut out = vec![
        format!(
            "model: {} ({} parameters), {} layers ({} Mamba2, {attn} attention), hidden {}, vocab {}, {precision} on {}",
            match &c.model.config {
                Some(path) => path.display().to_string(),
                None => c.model.preset.clone(),
            },
            human(m.num_parameters() as f64),
            m.num_hidden_layers,
            m.num_hidden_layers - attn,
            m.hidden_size,
            m.vocab_size,
            format!("{:?}", c.training.device).to_lowercase(),
        ),
        format!("parallelism: {strategy}; {step_kind}"),
        format!(
            "batch: {} sequences x {} tokens = {} tokens a step ({} x {} micro-batch{} x {}{accumulation})",
            c.global_batch_sequences(),
            c.data.seq_len,
            c.tokens_per_step(),
            ranks(f.world),
            f.accum,
            if f.accum == 1 { "" } else { "es" },
            c.training.micro_batch,
        ),
        format!(
            "state: {:.2} GB a rank (f32 weights {:.2}, AdamW moments {:.2})",
            gb(f.state.master + f.state.moments),
            gb(f.state.master),
            gb(f.state.moments),
        ),
        format!(
            "data: {shown}; {} logical shards, {}",
            c.data.logical_shards,
            match c.data.distribute {
                Distribute::ByShard => "each rank its own shards",
                Distribute::ByRow => "every rank the same stream",
            }
        ),
        format!(
            "run: steps {} to {} ({} tokens), {saves} in {}; weights from {}; ready in {:.1} s",
            f.start_step + 1,
            f.total_steps,
            human((f.total_steps * c.tokens_per_step()) as f64),
            c.checkpoint.output_dir.display(),
            f.weights_from,
            f.ready_s,
        ),
    ];
    if c.training.device == crate::config::Device::Cuda {
        // Measured on an H200 with Bamba-9B: 61 s for the first step of a
        // fresh machine's first run, 3 s in the next process.
        out.push(
            "step 1 compiles the GPU kernels: up to a minute on a fresh machine, seconds once the driver has cached them".into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stage 1 on one node of 8 and on the original 24 nodes of 8: the
    /// arithmetic a user checks before a 2T-token run.
    #[test]
    fn stage1_reads_as_it_runs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let cfg = crate::config::load_config(&root.join("stage1.yaml"), &[]).unwrap();
        let model = cfg.model_config().unwrap();
        for (world, parallelism, batch) in [
            (
                8,
                "hsdp over 8 ranks (shard groups of 8); layer by layer, 25% of layers recomputed",
                "(8 ranks x 24 micro-batches x 2, gradient slices summed)",
            ),
            (
                192,
                "hsdp over 192 ranks (shard groups of 8)",
                "(192 ranks x 1 micro-batch x 2)",
            ),
        ] {
            let facts = RunFacts {
                cfg: &cfg,
                model: &model,
                world,
                shard_ranks: 8,
                accum: cfg.grad_accumulation(world).unwrap(),
                state: StateBytes {
                    master: 4_890_123_264,
                    moments: 9_780_246_528,
                },
                total_steps: cfg.total_steps(),
                start_step: 0,
                weights_from: "a seeded init (seed 0)".into(),
                ready_s: 41.0,
            };
            let text = lines(&facts).join("\n");
            for want in [
                "bamba-9b (9.78B parameters), 32 layers (29 Mamba2, 3 attention), hidden 4096",
                parallelism,
                "384 sequences x 4096 tokens = 1572864 tokens a step",
                batch,
                "state: 14.67 GB a rank",
                "cc_en_head, cc_en_middle, cc_en_tail, falcon, ... (19 in all); 960 logical shards",
                "run: steps 1 to 1271566 (2.00T tokens)",
                "a checkpoint every 1000 steps in out/stage1",
            ] {
                assert!(text.contains(want), "{want:?} not in\n{text}");
            }
        }
    }
}
