//! The YAML schema of a training run: one struct per section, every knob
//! with a documented default. Unknown keys are errors (`deny_unknown_fields`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::optim::{AdamWConfig, Decay, WarmupShape};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub parallelism: ParallelismSection,
    pub optimizer: AdamWConfig,
    pub schedule: ScheduleSection,
    pub training: TrainingSection,
    pub checkpoint: CheckpointSection,
    pub logging: LoggingSection,
    pub eval: EvalSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `bamba-9b`, `bamba-1b` or `tiny`; ignored when `config` is set.
    pub preset: String,
    /// An HF `config.json` to take the architecture from instead of a preset.
    pub config: Option<PathBuf>,
    /// HF config fields applied on top (e.g. `vocab_size: 128256`).
    pub hf: serde_json::Map<String, serde_json::Value>,
    /// Start from these weights: an HF model directory or a bamba-train
    /// checkpoint step directory. Unset: fresh init from `training.seed`.
    pub init_from: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            config: None,
            hf: Default::default(),
            init_from: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    pub name: String,
    pub path: PathBuf,
    /// Relative share of tokens; weights are normalised over the datasets.
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub datasets: Vec<DatasetEntry>,
    /// Tokens per training sequence (lines hold `seq_len + 1` tokens).
    pub seq_len: usize,
    /// Inserted before each document (none by default).
    pub bos_token: Option<u32>,
    /// Appended after each document: 0 in Bamba's stage 1, 128000 in stage 2.
    pub eos_token: Option<u32>,
    /// Fixed document partition; the rank count must divide it.
    pub logical_shards: usize,
    /// Lines held for shuffling.
    pub shuffle_buffer: usize,
    pub seed: u64,
    /// Token column of tokenized parquet files.
    pub column: String,
    /// Batches prepared ahead by the background thread.
    pub prefetch: usize,
    /// How ranks split the data; see `Distribute`.
    pub distribute: Distribute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Distribute {
    /// Each rank streams its own logical shards (fms-fsdp's way; scales to any size).
    #[default]
    ByShard,
    /// Every rank reads one world-independent stream and keeps its rows of each
    /// global batch: the batches are identical for any rank count, at the cost
    /// of every rank reading all the data (equivalence tests, small runs).
    ByRow,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            datasets: vec![],
            seq_len: 4096,
            bos_token: None,
            eos_token: Some(0),
            logical_shards: 960,
            shuffle_buffer: 10_000,
            seed: 2024,
            column: "input_ids".into(),
            prefetch: 4,
            distribute: Distribute::ByShard,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Full shard: parameters, gradients and optimizer state split over all ranks.
    #[default]
    Fsdp,
    /// Shard inside groups of `shard_group_size` ranks, replicate across groups.
    Hsdp,
    /// Replicate everything; all-reduce gradients.
    Ddp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReduceDtype {
    #[default]
    F32,
    /// fms-fsdp's choice: half the traffic, a little rounding.
    Bf16,
}

/// How gradients add up over a step's micro-batches (`parallelism.accumulate_grads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccumulateGrads {
    /// Reduce-scatter each micro-batch's gradients as its backward ends and
    /// sum this rank's slices in f32 (FSDP2's default): between
    /// micro-batches a rank holds 1/N of the gradients.
    #[default]
    Sharded,
    /// Sum whole gradients over the micro-batches and reduce-scatter once,
    /// after the last (FSDP1's `no_sync`): one collective per unit and
    /// step, but every rank holds the full gradients in f32 (39 GB for
    /// Bamba-9B).
    Full,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelismSection {
    pub strategy: Strategy,
    /// hsdp only: ranks per shard group (usually GPUs per node). 0 = local world size.
    pub shard_group_size: usize,
    /// Fraction of layers whose activations are recomputed in backward.
    pub activation_checkpointing: f64,
    /// The layers not recomputed whole keep only their products' outputs:
    /// the norms', the gated norm's and SwiGLU's outputs are computed again
    /// in backward from what their own gradients keep anyway (torchtitan's
    /// op-level selective checkpointing). About a fifth less activation
    /// memory per layer for one memory-bound kernel per product; lets a
    /// lower `activation_checkpointing` fit.
    pub recompute_elementwise: bool,
    /// With `activation_checkpointing: 0`, run the step layer by layer all
    /// the same (FSDP's per-block units, every layer keeping its graph):
    /// each layer gathered just before its forward, its gradients
    /// reduce-scattered as soon as its backward is done, beside compute
    /// with `overlap_comm`. The whole-model step instead gathers every
    /// parameter at once and holds the whole model's gradients until the
    /// optimizer: fewer collectives, but more memory than a large model
    /// has (Bamba-9B on 2 GPUs). Always so above 0.
    pub per_layer: bool,
    /// Per-layer mode: a layer that keeps its activations (not recomputed)
    /// frees its gathered parameters after its forward and gathers them
    /// again for its backward, as FSDP2's `reshard_after_forward` (its
    /// default too): 0.55 GB less per kept layer of Bamba-9B for one more
    /// all-gather each, beside compute with `overlap_comm`.
    pub reshard_after_forward: bool,
    pub reduce_dtype: ReduceDtype,
    /// With gradient accumulation (more than one micro-batch per rank and
    /// step) under fsdp or hsdp, in the layer-by-layer step: `sharded` or
    /// `full`, see [`AccumulateGrads`]. The whole-model step, which holds
    /// the whole model's gradients during its backward anyway, always sums
    /// full gradients and reduces them once a step (in the compute stream:
    /// a reduce-scatter per micro-batch there would not overlap anything).
    pub accumulate_grads: AccumulateGrads,
    /// Per-layer mode (`per_layer`, or activation_checkpointing > 0): prefetch the next
    /// layer's all-gather and reduce-scatter gradients in a communication
    /// stream beside compute (FSDP's forward/backward prefetch). Holds two
    /// gathered layers at a time. On 2 H200s it gives the same losses as the
    /// serial path and a 4% faster 1B step; `false` runs each collective in
    /// turn in the compute stream.
    pub overlap_comm: bool,
    /// Seconds a collective or rendezvous waits for a peer before failing.
    pub timeout_s: u64,
}

impl ParallelismSection {
    /// Whether a step runs layer by layer (`fsdp/streamed.rs`) rather than
    /// on the whole gathered model.
    pub fn streamed(&self) -> bool {
        self.per_layer || self.activation_checkpointing > 0.0
    }
}

impl Default for ParallelismSection {
    fn default() -> Self {
        Self {
            strategy: Strategy::Fsdp,
            shard_group_size: 0,
            activation_checkpointing: 0.0,
            recompute_elementwise: false,
            per_layer: false,
            reshard_after_forward: true,
            reduce_dtype: ReduceDtype::F32,
            accumulate_grads: AccumulateGrads::Sharded,
            overlap_comm: true,
            timeout_s: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    pub warmup_steps: u64,
    pub warmup: WarmupShape,
    pub decay: Decay,
    pub final_lr: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            warmup_steps: 0,
            warmup: WarmupShape::Linear,
            decay: Decay::Cosine,
            final_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 everywhere (CPU, tests, parity).
    #[default]
    F32,
    /// bf16 compute parameters and activations, f32 master weights and moments.
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// Tokens per optimizer step over all ranks (exclusive with `global_batch_sequences`).
    pub global_batch_tokens: Option<u64>,
    pub global_batch_sequences: Option<u64>,
    /// Sequences per forward/backward on one rank; accumulation is derived.
    pub micro_batch: usize,
    /// Run length in tokens (exclusive with `steps`).
    pub total_tokens: Option<u64>,
    pub steps: Option<u64>,
    /// Max global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    /// Seeds the model init.
    pub seed: u64,
    pub precision: Precision,
    pub device: Device,
    /// Non-finite losses skip the step; this many in a row stop the run.
    pub max_consecutive_nonfinite: u32,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            global_batch_tokens: None,
            global_batch_sequences: None,
            micro_batch: 1,
            total_tokens: None,
            steps: None,
            grad_clip: 1.0,
            seed: 0,
            precision: Precision::F32,
            device: Device::Cpu,
            max_consecutive_nonfinite: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResumeMode {
    /// Weights, optimizer, data loader, step and schedule.
    #[default]
    All,
    WeightsOptimizer,
    /// Weights only, fresh optimizer and data (how stage 2 starts).
    Weights,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    pub output_dir: PathBuf,
    /// Save every N steps (0: only at the end and on preemption).
    pub every_steps: u64,
    /// Keep the newest K checkpoints...
    pub keep_last: usize,
    /// ...plus every step divisible by M as a permanent milestone (0: none).
    pub keep_every: u64,
    /// `auto`: continue from the newest valid checkpoint in `output_dir`;
    /// `never`; or a path to a step directory.
    pub resume: String,
    pub resume_mode: ResumeMode,
    /// Write files in a background thread once the state is off the device.
    pub async_save: bool,
    /// Save when the run reaches its last step (benchmarks turn this off).
    pub save_final: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            output_dir: "out".into(),
            every_steps: 1000,
            keep_last: 3,
            keep_every: 0,
            resume: "auto".into(),
            resume_mode: ResumeMode::All,
            async_save: true,
            save_final: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// A bar on a terminal, log lines otherwise (SLURM logs).
    #[default]
    Auto,
    Bar,
    Lines,
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WandbSection {
    pub project: String,
    pub entity: Option<String>,
    pub name: Option<String>,
    pub group: Option<String>,
    pub tags: Vec<String>,
    /// Defaults to `$WANDB_BASE_URL`, then https://api.wandb.ai.
    pub base_url: Option<String>,
}

impl Default for WandbSection {
    fn default() -> Self {
        Self {
            project: "bamba".into(),
            entity: None,
            name: None,
            group: None,
            tags: vec![],
            base_url: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Log (and write metrics.jsonl) every N steps.
    pub every_steps: u64,
    pub progress: Progress,
    /// Peak bf16 TFLOP/s per device for MFU; unset: 989 on H100/H200.
    pub peak_tflops: Option<f64>,
    pub wandb: Option<WandbSection>,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            every_steps: 10,
            progress: Progress::Auto,
            peak_tflops: None,
            wandb: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N steps (0: never).
    pub every_steps: u64,
    /// Batches of `training.micro_batch` sequences per evaluation.
    pub batches: usize,
    /// Held-out data; its lines never appear in training.
    pub datasets: Vec<DatasetEntry>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every_steps: 0,
            batches: 8,
            datasets: vec![],
        }
    }
}
