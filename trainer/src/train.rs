//! The training loop. `Trainer::new` builds the sharded state (fresh, from
//! weights, or resumed), `train_step` is one optimizer step over the global
//! batch, `train` runs to the end, logging, evaluating and checkpointing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bamba_data::{DatasetSpec, Loader, LoaderConfig, LoaderState};
use bamba_model::init::InitSource;
use bamba_model::{BambaAutodiffBackend, BambaBackend};
use bamba_model::{BambaConfig, BambaForCausalLM, VarBuilder};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::checkpoint::{self, CheckpointMeta, FileEntry, RankShard, format};
use crate::config::{
    AccumulateGrads, DatasetEntry, Distribute, Precision, ReduceDtype, ResumeMode, TrainConfig,
};
use crate::fsdp::{Layout, Sharded};
use crate::metrics::progress::Progress;
use crate::metrics::wandb::Wandb;
use crate::metrics::{JsonlSink, StepMetrics, default_peak_tflops, logged_steps_up_to, mfu};
use crate::optim::{AdamW, Schedule};
use crate::runtime::Runtime;
use crate::weights::WeightsSource;

/// Exit code of a run stopped by SIGTERM/SIGUSR1 after saving (SLURM requeues it).
pub const PREEMPTED_EXIT_CODE: i32 = 75;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Values per device-to-host read when staging a checkpoint through burn
/// (64 MB of f32, under cubecl's 100 MB limit for pinned staging).
const STAGE_PIECE: usize = 16 << 20;

/// The concatenation of `ts` (1-D f32) on the host: through the backend's
/// fast path where it has one (CUDA: pinned double buffers drained by every
/// core), else read in pieces of at most `piece` values into one vector.
fn stage_to_host<B: BambaBackend>(ts: &[&Tensor<B, 1>], piece: usize) -> Vec<f32> {
    let total = ts.iter().map(|t| t.dims()[0]).sum();
    // Zeroed lazily by the OS: the copy touches each page first.
    let mut fast = vec![0.0f32; total];
    let prims = ts
        .iter()
        .map(|t| (*t).clone().into_primitive().tensor())
        .collect();
    if B::bamba_read_f32(prims, &mut fast) {
        return fast;
    }
    drop(fast);
    let mut out = Vec::with_capacity(total);
    for t in ts {
        let n = t.dims()[0];
        for at in (0..n).step_by(piece) {
            let len = piece.min(n - at);
            let data = (*t).clone().narrow(0, at, len).into_data();
            out.extend_from_slice(data.as_slice::<f32>().expect("f32 state"));
        }
    }
    out
}

pub struct RunSummary {
    pub final_step: u64,
    pub tokens_seen: u64,
    pub preempted: bool,
    pub losses: Vec<(u64, f64)>,
    pub last_checkpoint: Option<PathBuf>,
}

struct PendingSave {
    step: u64,
    meta: CheckpointMeta,
    /// Files written, and the seconds the (background) write took.
    writer: JoinHandle<Result<(Vec<FileEntry>, f64)>>,
    /// Seconds training waited: copying the shards off the device.
    stall_s: f64,
}

/// A step's loss (NaN when skipped), its gradient norm (still on the
/// device; none when skipped) and whether every rank asked to stop.
pub type StepOutcome<B> = (f64, Option<Tensor<Inner<B>, 1>>, bool);

pub struct Trainer<B: BambaAutodiffBackend> {
    pub cfg: TrainConfig,
    pub model_cfg: BambaConfig,
    model: Option<BambaForCausalLM<B>>,
    pub sharded: Sharded<B>,
    opt: AdamW,
    schedule: Schedule,
    loader: Loader,
    rt: Runtime<Inner<B>>,
    device: B::Device,
    accum: u64,
    pub step: u64,
    /// Adam updates applied (bias correction), kept across weights+optimizer resumes.
    opt_step: u64,
    pub tokens_seen: u64,
    skipped: u64,
    consecutive_bad: u32,
    wandb_run_id: Option<String>,
    pending: Option<PendingSave>,
    /// Per-phase step times, when benchmarking (syncs the device at each phase end).
    pub phases: Option<PhaseTimes>,
    /// For the start-up banner: where the weights came from, and the
    /// seconds `new` took.
    weights_from: String,
    ready_s: f64,
}

/// Seconds spent in each phase of the steps timed so far (`bamba-train bench`).
///
/// Phases (in step order): `gather`; `forward`, `backward` and
/// `accumulate` (flattening gradients into the per-unit buffers), or, when
/// streamed, `streamed_forward_backward` (per-layer gathers and
/// reduce-scatters interleave with compute, so they are timed together);
/// `optimizer` (reduce-scatter, clipping and AdamW on the local shard).
#[derive(Debug, Default, Clone)]
pub struct PhaseTimes {
    /// Wall time of each phase, the device synchronised at its end.
    pub wall: std::collections::BTreeMap<&'static str, f64>,
    /// The part of it the host spent enqueueing the phase's work: near the
    /// wall time, the phase waits on the host (launch overhead), not the GPU.
    pub host: std::collections::BTreeMap<&'static str, f64>,
    mark: Option<Instant>,
}

fn loader_config(cfg: &TrainConfig, datasets: &[DatasetEntry]) -> LoaderConfig {
    let d = &cfg.data;
    LoaderConfig {
        datasets: datasets
            .iter()
            .map(|e| DatasetSpec {
                name: e.name.clone(),
                path: e.path.clone(),
                weight: e.weight,
            })
            .collect(),
        seq_len: d.seq_len,
        bos_token: d.bos_token,
        eos_token: d.eos_token,
        logical_shards: d.logical_shards,
        shuffle_buffer: d.shuffle_buffer,
        seed: d.seed,
        column: d.column.clone(),
        prefetch: d.prefetch.max(1) * cfg.training.micro_batch,
        ..Default::default()
    }
}

/// The loader's (rank, world): by-row runs read one stream on every rank.
fn data_rank(cfg: &TrainConfig, rank: usize, world: usize) -> (usize, usize) {
    match cfg.data.distribute {
        Distribute::ByShard => (rank, world),
        Distribute::ByRow => (0, 1),
    }
}

impl<B: BambaAutodiffBackend> Trainer<B> {
    /// Builds the run: resumes from `resume_from` if given, else starts from
    /// `model.init_from` weights or a seeded init.
    pub fn new(
        cfg: TrainConfig,
        rt: Runtime<Inner<B>>,
        device: B::Device,
        resume_from: Option<PathBuf>,
    ) -> Result<Self> {
        let started = Instant::now();
        let model_cfg = cfg.model_config()?;
        let accum = cfg.grad_accumulation(rt.world)?;
        let layout = Layout::new(&model_cfg, rt.shard_comm.size());
        let shard_rank = rt.shard_comm.rank();
        let compute = match cfg.training.precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
        let opt = AdamW {
            cfg: cfg.optimizer.clone(),
        };
        let decays = |n: &str| opt.cfg.decays(n);
        let inner_dev: burn::tensor::Device<Inner<B>> = device.clone();

        let resume = match &resume_from {
            Some(dir) => Some((dir.clone(), format::read_meta(dir)?)),
            None => None,
        };
        let weights_from = match (&resume, &cfg.model.init_from) {
            (Some((dir, _)), _) => format!("checkpoint {}", dir.display()),
            (None, Some(from)) => format!("model.init_from {}", from.display()),
            (None, None) => format!("a seeded init (training.seed {})", cfg.training.seed),
        };
        let sharded = match (&resume, &cfg.model.init_from) {
            (Some((dir, meta)), _) => {
                let slices = checkpoint::reshard::read_slices(dir, meta, &layout, shard_rank)?;
                let with_moments = cfg.checkpoint.resume_mode != ResumeMode::Weights;
                Sharded::from_slices(
                    layout,
                    shard_rank,
                    slices,
                    with_moments,
                    decays,
                    compute,
                    &inner_dev,
                )?
            }
            (None, Some(from)) => {
                let source = WeightsSource::open(from, &model_cfg)?;
                Sharded::new(
                    layout,
                    shard_rank,
                    source.as_source(),
                    decays,
                    compute,
                    &inner_dev,
                )?
            }
            (None, None) => {
                let source = InitSource {
                    cfg: &model_cfg,
                    seed: cfg.training.seed,
                };
                Sharded::new(layout, shard_rank, &source, decays, compute, &inner_dev)?
            }
        };

        let mut sharded = sharded;
        sharded.keep_compute_copy = !cfg.parallelism.streamed();
        sharded.reduce = match cfg.parallelism.reduce_dtype {
            ReduceDtype::F32 => DType::F32,
            ReduceDtype::Bf16 => DType::BF16,
        };
        sharded.solo = rt.world == 1;
        sharded.overlap_comm = cfg.parallelism.overlap_comm;
        // Slices summed over micro-batches only where they are slices (a
        // ddp rank's "slice" is everything: one all-reduce per step is less)
        // and where the reduce-scatters run beside the backward (layer by
        // layer); the whole-model step holds full gradients anyway.
        sharded.reduce_each_micro_batch = cfg.parallelism.accumulate_grads
            == AccumulateGrads::Sharded
            && rt.shard_comm.size() > 1
            && accum > 1
            && cfg.parallelism.streamed();
        let model = BambaForCausalLM::<B>::new(&VarBuilder::placeholders(&device), &model_cfg)?
            .remade_inputs(cfg.parallelism.recompute_elementwise);
        let lcfg = loader_config(&cfg, &cfg.data.datasets);
        let (drank, dworld) = data_rank(&cfg, rt.rank, rt.world);
        let (mut step, mut opt_step, mut tokens_seen, mut skipped, mut wandb_run_id) =
            (0, 0, 0, 0, None);
        let loader = match &resume {
            Some((dir, meta)) if cfg.checkpoint.resume_mode == ResumeMode::All => {
                let states = (0..meta.world_size)
                    .map(|r| format::read_json::<LoaderState>(&dir.join(format::loader_file(r))))
                    .collect::<Result<Vec<_>>>()?;
                step = meta.step;
                opt_step = meta.step - meta.skipped_steps;
                tokens_seen = meta.tokens_seen;
                skipped = meta.skipped_steps;
                wandb_run_id = meta.wandb_run_id.clone();
                let states = if cfg.data.distribute == Distribute::ByRow {
                    states[..1].to_vec()
                } else {
                    states
                };
                Loader::resume(lcfg, drank, dworld, &states)?
            }
            Some((_, meta)) if cfg.checkpoint.resume_mode == ResumeMode::WeightsOptimizer => {
                opt_step = meta.step - meta.skipped_steps;
                Loader::new(lcfg, drank, dworld)?
            }
            _ => Loader::new(lcfg, drank, dworld)?,
        };
        let schedule = cfg.schedule();
        Ok(Self {
            cfg,
            model_cfg,
            model: Some(model),
            sharded,
            opt,
            schedule,
            loader,
            rt,
            device,
            accum,
            step,
            opt_step,
            tokens_seen,
            skipped,
            consecutive_bad: 0,
            wandb_run_id,
            pending: None,
            phases: None,
            weights_from,
            ready_s: started.elapsed().as_secs_f64(),
        })
    }

    /// The start-up banner's lines (see [`crate::banner`]).
    pub fn banner(&self) -> Vec<String> {
        crate::banner::lines(&crate::banner::RunFacts {
            cfg: &self.cfg,
            model: &self.model_cfg,
            world: self.rt.world,
            shard_ranks: self.rt.shard_comm.size(),
            accum: self.accum,
            state: self.sharded.state_bytes(),
            total_steps: self.cfg.total_steps(),
            start_step: self.step,
            weights_from: self.weights_from.clone(),
            ready_s: self.ready_s,
        })
    }

    fn batch_tensors(
        &self,
        lines: Vec<u32>,
        rows: usize,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let seq = self.cfg.data.seq_len;
        let ids: Vec<i32> = lines.into_iter().map(|t| t as i32).collect();
        let all =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, seq + 1]), &self.device);
        (all.clone().narrow(1, 0, seq), all.narrow(1, 1, seq))
    }

    /// One optimizer step over the global batch. Returns the global mean loss
    /// (NaN if the step was skipped) and whether every rank asked to stop.
    /// Processes in the run.
    pub fn world(&self) -> usize {
        self.rt.world
    }

    /// Bytes of training state this rank keeps between steps, by kind.
    pub fn state_bytes(&self) -> crate::fsdp::StateBytes {
        self.sharded.state_bytes()
    }

    pub fn is_rank0(&self) -> bool {
        self.rt.rank == 0
    }

    /// Parameter elements the model holds between steps: one a parameter
    /// once released (the shards are what persists), all of them while
    /// gathered.
    pub fn resident_param_elements(&self) -> usize {
        self.model.as_ref().map_or(0, |m| m.num_params())
    }

    /// Whether `flag` holds on any rank (an all-reduce: every rank gets the
    /// same answer, so they take the same branch).
    pub fn any_rank(&self, flag: bool) -> Result<bool> {
        let t = Tensor::<Inner<B>, 1>::from_data(
            TensorData::new(vec![flag as u8 as f32], [1]),
            &self.device.clone(),
        );
        let sum = self.rt.world_comm.all_reduce_sum(t)?;
        Ok(sum
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32")[0]
            > 0.0)
    }

    /// This process's device index on its node.
    pub fn local_rank(&self) -> usize {
        self.rt.local_rank
    }

    /// Waits until the device has run everything enqueued so far.
    pub fn sync(&self) {
        let _ = B::sync(&self.device);
    }

    /// Ends phase `name` when profiling: waits for the device, adds the
    /// times (host enqueue and wall) since the previous phase ended.
    fn phase(&mut self, name: &'static str) {
        if let Some(p) = &mut self.phases {
            let enqueued = Instant::now();
            let _ = B::sync(&self.device);
            let now = Instant::now();
            let start = p.mark.unwrap_or(enqueued);
            *p.host.entry(name).or_default() += (enqueued - start).as_secs_f64();
            *p.wall.entry(name).or_default() += (now - start).as_secs_f64();
            p.mark = Some(now);
        }
    }

    pub fn train_step(&mut self, stop_requested: bool) -> Result<StepOutcome<B>> {
        if let Some(p) = &mut self.phases {
            let _ = B::sync(&self.device);
            p.mark = Some(Instant::now());
        }
        // Streamed: per-layer gathers inside the step (fsdp/streamed.rs);
        // otherwise the whole model is gathered once per step.
        let ac = self.cfg.parallelism.activation_checkpointing;
        let streamed = self.cfg.parallelism.streamed();
        let mut model = self.model.take().expect("model present between steps");
        if !streamed {
            model = self.sharded.gather_into(model, &*self.rt.shard_comm)?;
        }
        let mb = self.cfg.training.micro_batch;
        let mut loss_sum: Option<Tensor<Inner<B>, 1>> = None;
        // By-row: draw the whole global batch, keep this rank's contiguous rows.
        let mut global = match self.cfg.data.distribute {
            Distribute::ByRow => {
                let rows = self.cfg.global_batch_sequences() as usize;
                let line = self.cfg.data.seq_len + 1;
                let all = self.loader.next_batch(rows)?;
                let per_rank = rows / self.rt.world;
                Some(
                    all[self.rt.rank * per_rank * line..(self.rt.rank + 1) * per_rank * line]
                        .to_vec(),
                )
            }
            Distribute::ByShard => None,
        };
        for k in 0..self.accum {
            let lines = match &mut global {
                Some(rows) => rows.drain(..mb * (self.cfg.data.seq_len + 1)).collect(),
                None => self.loader.next_batch(mb)?,
            };
            let (inputs, targets) = self.batch_tensors(lines, mb);
            self.phase("gather");
            let l = if streamed {
                let l = self.sharded.streamed_step(
                    &mut model,
                    inputs,
                    targets,
                    1.0 / self.accum as f64,
                    k + 1 == self.accum,
                    ac,
                    self.cfg.parallelism.overlap_comm,
                    self.cfg.parallelism.reshard_after_forward,
                    &*self.rt.shard_comm,
                    &*self.rt.replicate_comm,
                )?;
                self.phase("streamed_forward_backward");
                l
            } else {
                crate::memtrace::mark(|| "gathered".into());
                let loss = model.loss(inputs, targets) / self.accum as f64;
                crate::memtrace::mark(|| "forward done".into());
                self.phase("forward");
                let grads = loss.backward();
                crate::memtrace::mark(|| "backward done".into());
                self.phase("backward");
                self.sharded.accumulate(&model, &grads);
                crate::memtrace::mark(|| "accumulated".into());
                self.phase("accumulate");
                loss.inner()
            };
            let l = l.cast(DType::F32);
            loss_sum = Some(match loss_sum {
                Some(s) => s + l,
                None => l,
            });
        }
        self.model = Some(if !streamed {
            self.sharded.release(model)
        } else {
            model
        });
        self.step += 1;
        self.tokens_seen += self.cfg.tokens_per_step();

        // One small all-reduce decides, for every rank alike: the loss, stop, and save progress.
        let save_done = self
            .pending
            .as_ref()
            .map(|p| p.writer.is_finished())
            .unwrap_or(true);
        let flags = Tensor::<Inner<B>, 1>::from_data(
            TensorData::new(
                vec![0.0f32, stop_requested as u8 as f32, save_done as u8 as f32],
                [3],
            ),
            &self.device.clone(),
        );
        let packed = Tensor::cat(
            vec![
                loss_sum.expect("accum >= 1").cast(DType::F32),
                flags.narrow(0, 1, 2),
            ],
            0,
        );
        let reduced: Vec<f32> = self
            .rt
            .world_comm
            .all_reduce_sum(packed)?
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        let loss = reduced[0] as f64 / self.rt.world as f64;
        let stop = reduced[1] > 0.0;
        if reduced[2] as usize == self.rt.world {
            self.complete_pending_save()?;
        }

        if !loss.is_finite() {
            self.sharded.discard_grads();
            self.skipped += 1;
            self.consecutive_bad += 1;
            if self.consecutive_bad > self.cfg.training.max_consecutive_nonfinite {
                bail!(
                    "step {}: the loss was not finite {} times in a row (limit training.max_consecutive_nonfinite = {}); stopping",
                    self.step,
                    self.consecutive_bad,
                    self.cfg.training.max_consecutive_nonfinite
                );
            }
            return Ok((f64::NAN, None, stop));
        }
        self.consecutive_bad = 0;
        self.opt_step += 1;
        let lr = self.schedule.lr(self.step);
        let (shard, replicate) = (&*self.rt.shard_comm, &*self.rt.replicate_comm);
        let norm = self.sharded.step(
            &self.opt,
            lr,
            self.opt_step,
            self.cfg.training.grad_clip,
            shard,
            replicate,
        )?;
        crate::memtrace::mark(|| "optimizer".into());
        self.phase("optimizer");
        Ok((loss, Some(norm), stop))
    }

    /// Mean loss over `eval.batches` micro-batches of the held-out sets.
    pub fn evaluate(&mut self) -> Result<f64> {
        let lcfg = loader_config(&self.cfg, &self.cfg.eval.datasets);
        let (drank, dworld) = data_rank(&self.cfg, self.rt.rank, self.rt.world);
        let mut loader = Loader::new(lcfg, drank, dworld)?;
        let model = self
            .sharded
            .gather_into(self.model.take().expect("model"), &*self.rt.shard_comm)?;
        let valid = model.valid();
        let mb = self.cfg.training.micro_batch;
        let mut total = 0.0;
        for _ in 0..self.cfg.eval.batches {
            let lines = loader.next_batch(mb)?;
            let (inputs, targets) = self.batch_tensors(lines, mb);
            let loss = valid.loss(inputs.inner(), targets.inner());
            let l = self.rt.world_comm.all_reduce_mean(loss.cast(DType::F32))?;
            total += l.into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0] as f64;
        }
        // Back to what a step leaves: the shards alone. (A streamed step
        // never replaces the model's own parameters, so a full copy kept
        // here would stay resident, and stale, for the rest of the run.)
        drop(valid);
        self.model = Some(self.sharded.release(model));
        // The whole-model gather left pages that a streamed step's per-layer
        // sizes leave idle (exclusive pages serve one size class; `bucketed`
        // keeps them for many steps): give them back to the driver now.
        B::memory_cleanup(&self.device);
        Ok(total / self.cfg.eval.batches.max(1) as f64)
    }

    /// Starts a checkpoint of the current step: state is copied off the device
    /// now; files are written in the background (or now if `async_save` is off).
    pub fn save(&mut self) -> Result<PathBuf> {
        self.complete_pending_save_blocking()?;
        let t0 = Instant::now();
        let out = self.cfg.checkpoint.output_dir.clone();
        let tmp = checkpoint::tmp_step_dir(&out, self.step);
        if self.rt.rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .with_context(|| format!("removing stale {}", tmp.display()))?;
            }
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        }
        self.rt.control.barrier()?;
        let shard = if self.rt.replicate_comm.rank() == 0 {
            Some(self.host_shard())
        } else {
            None
        };
        let loader_state = serde_json::to_vec(&self.loader.state())?;
        let (rank, shard_rank) = (self.rt.rank, self.rt.shard_comm.rank());
        let tmp_w = tmp.clone();
        let write = move || -> Result<(Vec<FileEntry>, f64)> {
            let t = Instant::now();
            let mut files = vec![format::write_file(
                &tmp_w,
                &format::loader_file(rank),
                &loader_state,
            )?];
            if let Some(shard) = shard {
                files.push(format::write_shard(
                    &tmp_w,
                    &format::shard_file(shard_rank),
                    &shard,
                )?);
            }
            Ok((files, t.elapsed().as_secs_f64()))
        };
        let stall_s = t0.elapsed().as_secs_f64();
        let meta = self.meta();
        let writer = if self.cfg.checkpoint.async_save {
            std::thread::spawn(write)
        } else {
            let result = write();
            std::thread::spawn(move || result)
        };
        self.pending = Some(PendingSave {
            step: self.step,
            meta,
            writer,
            stall_s,
        });
        if !self.cfg.checkpoint.async_save {
            self.complete_pending_save_blocking()?;
        }
        Ok(checkpoint::step_dir(&out, self.step))
    }

    /// This rank's state on the host, each state in one vector
    /// ([`stage_to_host`]). On CUDA the backend copies through two pinned
    /// buffers drained by every core: the 1B config's 23 GB in 1.6 s on an
    /// H200, where burn's reads (64 MB pieces through cubecl's pinned pool;
    /// larger ones go through pageable memory, slower still) took 8.5 s.
    fn host_shard(&self) -> RankShard {
        let sh = &self.sharded;
        let host = |ts: Vec<&Tensor<Inner<B>, 1>>| stage_to_host(&ts, STAGE_PIECE);
        RankShard {
            units: sh
                .layout
                .units
                .iter()
                .map(|u| (u.name.clone(), u.shard_len))
                .collect(),
            states: [
                host(sh.master.iter().collect()),
                host(sh.moments.iter().map(|m| &m.exp_avg).collect()),
                host(sh.moments.iter().map(|m| &m.exp_avg_sq).collect()),
            ],
        }
    }

    fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            tokens_seen: self.tokens_seen,
            world_size: self.rt.world,
            shards: self.rt.shard_comm.size(),
            strategy: format!("{:?}", self.cfg.parallelism.strategy).to_lowercase(),
            units: self
                .sharded
                .layout
                .units
                .iter()
                .map(|u| (u.name.clone(), u.numel))
                .collect(),
            align: self.sharded.layout.align,
            skipped_steps: self.skipped,
            wandb_run_id: self.wandb_run_id.clone(),
            config_yaml: serde_norway::to_string(&self.cfg).unwrap_or_default(),
            model_config: self.model_cfg.to_hf_json_string(),
        }
    }

    /// Collective: every rank joins its writer, rank 0 seals the checkpoint.
    fn complete_pending_save(&mut self) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let (files, write_s) = p
            .writer
            .join()
            .map_err(|_| anyhow::anyhow!("checkpoint writer panicked"))??;
        if self.rt.rank == 0 {
            // Rank 0's own files: every rank writes a similar share in parallel.
            let bytes: u64 = files.iter().map(|f| f.bytes).sum();
            eprintln!(
                "checkpoint step {}: training stalled {:.2} s (shards copied off the device); rank 0 wrote {:.2} GB in {:.2} s ({:.2} GB/s) in the background",
                p.step,
                p.stall_s,
                bytes as f64 / 1e9,
                write_s,
                bytes as f64 / 1e9 / write_s.max(1e-9)
            );
        }
        let all = self
            .rt
            .control
            .all_gather_bytes(&serde_json::to_vec(&files)?)?;
        if self.rt.rank == 0 {
            let mut entries = vec![];
            for bytes in all {
                entries.extend(serde_json::from_slice::<Vec<FileEntry>>(&bytes)?);
            }
            let out = &self.cfg.checkpoint.output_dir;
            format::finalize(
                &checkpoint::tmp_step_dir(out, p.step),
                &checkpoint::step_dir(out, p.step),
                &p.meta,
                entries,
            )?;
            checkpoint::prune(
                out,
                self.cfg.checkpoint.keep_last,
                self.cfg.checkpoint.keep_every,
                p.step,
            )?;
        }
        self.rt.control.barrier()
    }

    fn complete_pending_save_blocking(&mut self) -> Result<()> {
        self.complete_pending_save()
    }

    fn eval_due(&self, step: u64) -> bool {
        self.cfg.eval.every_steps > 0 && step.is_multiple_of(self.cfg.eval.every_steps)
    }

    /// Whether `step` writes a metrics row (evaluation steps always do).
    fn row_due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.cfg.logging.every_steps) || step == total || self.eval_due(step)
    }

    /// Rank 0, `logging.wandb` set: the W&B run, continuing the checkpoint's
    /// run id at the history row after the last one logged up to the
    /// resumed step. Never fails: W&B problems only warn.
    fn start_wandb(&mut self, total: u64) -> Option<Wandb> {
        let section = self
            .cfg
            .logging
            .wandb
            .as_ref()
            .filter(|_| self.rt.rank == 0)?;
        let offset = match &self.wandb_run_id {
            Some(_) if self.step > 0 => {
                logged_steps_up_to(&self.cfg.checkpoint.output_dir, self.step).unwrap_or_else(
                    || (1..=self.step).filter(|s| self.row_due(*s, total)).count() as u64,
                )
            }
            _ => 0,
        };
        let mut config = serde_json::to_value(&self.cfg).unwrap_or_default();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("world_size".into(), self.rt.world.into());
        }
        let w = Wandb::start(section, self.wandb_run_id.clone(), offset, config)?;
        self.wandb_run_id = Some(w.run_id().to_string());
        Some(w)
    }

    /// Runs to the configured end (or a stop signal), logging and checkpointing.
    pub fn train(&mut self, stop: Arc<AtomicBool>) -> Result<RunSummary> {
        let total = self.cfg.total_steps();
        let progress = Progress::new(self.cfg.logging.progress, self.rt.rank, self.step, total);
        let mut sink = if self.rt.rank == 0 {
            Some(JsonlSink::open(&self.cfg.checkpoint.output_dir)?)
        } else {
            None
        };
        let wandb = self.start_wandb(total);
        let flops = self.model_cfg.flops_per_token(self.cfg.data.seq_len);
        let peak = self.cfg.logging.peak_tflops.unwrap_or_else(|| {
            default_peak_tflops(&crate::backend::device_name(
                self.cfg.training.device,
                self.rt.local_rank,
            ))
        });
        let memory = crate::backend::memory_probe(self.cfg.training.device, self.rt.local_rank);
        let mut losses = vec![];
        let mut last_ckpt = None;
        let mut preempted = false;
        let mut window = (Instant::now(), self.tokens_seen, self.step);
        if self.rt.rank == 0 {
            for line in self.banner() {
                progress.println(&line);
            }
        }
        if self.rt.rank == 0 && self.step > 0 {
            progress.println(&format!(
                "resumed at step {} ({} tokens seen)",
                self.step, self.tokens_seen
            ));
        }
        while self.step < total {
            let (loss, norm, stop_now) = self.train_step(stop.load(Ordering::SeqCst))?;
            if loss.is_finite() {
                losses.push((self.step, loss));
            } else if self.rt.rank == 0 {
                progress.println(&format!(
                    "step {}: non-finite loss, step skipped ({} so far)",
                    self.step, self.skipped
                ));
            }
            let eval_now = self.eval_due(self.step);
            let log_now = self.row_due(self.step, total);
            let mut row = None;
            if log_now {
                let (t0, tok0, step0) = window;
                let dt = t0.elapsed().as_secs_f64();
                let tps = (self.tokens_seen - tok0) as f64 / dt;
                let per_dev = tps / self.rt.world as f64;
                let grad_norm = norm
                    .map(|n| n.into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0] as f64)
                    .unwrap_or(f64::NAN);
                let mut m = StepMetrics {
                    step: self.step,
                    tokens: self.tokens_seen,
                    loss,
                    lr: self.schedule.lr(self.step),
                    grad_norm,
                    tokens_per_s: tps,
                    tokens_per_s_per_device: per_dev,
                    mfu: mfu(flops, per_dev, peak),
                    step_time_s: dt / (self.step - step0) as f64,
                    memory_bytes: memory(),
                    skipped_steps: self.skipped,
                    ..Default::default()
                };
                if eval_now {
                    let el = self.evaluate()?;
                    m.eval_loss = Some(el);
                    m.eval_ppl = Some(el.exp());
                }
                if let Some(s) = &mut sink {
                    s.write(&m)?;
                }
                if let Some(w) = &wandb {
                    w.log(self.step, &m);
                }
                row = Some(m);
                window = (Instant::now(), self.tokens_seen, self.step);
            }
            progress.update(self.step, row.as_ref());
            let every = self.cfg.checkpoint.every_steps;
            if stop_now {
                last_ckpt = Some(self.save()?);
                self.complete_pending_save_blocking()?;
                progress.println(&format!(
                    "stop requested: saved step {} and exiting",
                    self.step
                ));
                preempted = true;
                break;
            }
            if (every > 0 && self.step.is_multiple_of(every))
                || (self.step == total && self.cfg.checkpoint.save_final)
            {
                last_ckpt = Some(self.save()?);
            }
        }
        self.complete_pending_save_blocking()?;
        progress.finish();
        // On an error return above, dropping `wandb` finishes the run with exit code 1.
        if let Some(w) = wandb {
            w.finish(if preempted { PREEMPTED_EXIT_CODE } else { 0 });
        }
        Ok(RunSummary {
            final_step: self.step,
            tokens_seen: self.tokens_seen,
            preempted,
            losses,
            last_checkpoint: last_ckpt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn staging_reads_pieces_in_order() {
        let dev = Default::default();
        let a = Tensor::<Flex, 1>::from_floats([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &dev);
        let b = Tensor::<Flex, 1>::from_floats([7.0, 8.0], &dev);
        let want: Vec<f32> = (0..9).map(|i| i as f32).collect();
        for piece in [1, 3, 7, 100] {
            assert_eq!(stage_to_host(&[&a, &b], piece), want, "piece {piece}");
        }
    }
}
