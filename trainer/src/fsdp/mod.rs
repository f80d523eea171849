//! FSDP-style sharding applied from outside the model: each rank keeps a
//! `1/N` slice of every unit's flat f32 master weights and AdamW moments;
//! before a step the units are all-gathered into the model (in the compute
//! dtype), after backward the gradients are reduce-scattered back to slices,
//! clipped by the global norm, and each rank updates only its slice.
//!
//! Strategies (fms-fsdp's names): `fsdp` shards over all ranks; `hsdp` shards
//! inside a group and averages the slices across groups; `ddp` holds
//! everything and averages gradients.

pub mod comm;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod nccl;
mod streamed;

use std::collections::HashMap;

use anyhow::{Context, Result};
use bamba_model::BambaAutodiffBackend;
use bamba_model::ParamSource;
use bamba_model::ops::{FlatGrad, GRAD_PARTS_MAX};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

pub use comm::{Comm, Fence, Mirror, Pending, Solo};
pub use layout::{Layout, Unit, overlaps};

use crate::optim::adamw::{AdamW, Moments};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Replica averages (hsdp) a rank lets run at once beside its backward.
const REPLICA_AVERAGES_IN_FLIGHT: usize = 2;

/// One rank's slice of the training state, plus its communicators.
pub struct Sharded<B: BambaAutodiffBackend> {
    pub layout: Layout,
    /// Which slice this rank holds.
    pub shard_rank: usize,
    /// Per unit, `[shard_len]` f32 master weights.
    pub master: Vec<Tensor<Inner<B>, 1>>,
    /// Per unit, the master slice in the compute dtype, when the optimizer
    /// wrote it in its pass (saves a cast before each gather).
    compute_copy: Vec<Option<Tensor<Inner<B>, 1>>>,
    /// Whether to keep `compute_copy` between steps: when the whole model
    /// is gathered anyway (no activation checkpointing), it costs nothing;
    /// with per-layer gathers it would hold a compute copy of every unit.
    pub keep_compute_copy: bool,
    pub moments: Vec<Moments<Inner<B>>>,
    /// Per unit, this rank's element ranges `[start, end)` without weight
    /// decay (a few short runs: norm weights, biases, A_log, D, dt_bias).
    no_decay: Vec<Vec<(usize, usize)>>,
    /// Per unit, gradients summed over this step's micro-batches (full, unsharded).
    /// On one GPU the parameters' own gradients (nothing to reduce).
    grads: Vec<Option<FlatGrad<Inner<B>>>>,
    /// Per unit, this rank's reduced gradient slice, once reduce-scattered.
    reduced: Vec<Option<FlatGrad<Inner<B>>>>,
    /// Per unit (hsdp), the step's slice while it is averaged over the
    /// replicas, possibly still in flight beside the backward.
    replica_mean: Vec<Option<Pending<Inner<B>>>>,
    /// Units whose replica average is in flight, oldest first.
    in_flight: std::collections::VecDeque<usize>,
    /// Compute dtype of the gathered parameters.
    pub compute: DType,
    /// Dtype gradients travel in through reduce-scatter (f32, or bf16 as
    /// fms-fsdp does: half the traffic).
    pub reduce: DType,
    /// One rank in all: gradients need no reduction, so a bf16 model's
    /// gradients stay bf16 up to the optimizer (no f32 buffer to write and
    /// read back; the same values) unless micro-batches are summed.
    pub solo: bool,
    /// Reduce-scatter every micro-batch's gradients and sum the slices
    /// (`accumulate_grads: sharded`), rather than sum full gradients and
    /// reduce once on the last micro-batch.
    pub reduce_each_micro_batch: bool,
    /// Average slices over replicas (hsdp) beside the compute that follows,
    /// where the transport can (`parallelism.overlap_comm`).
    pub overlap_comm: bool,
    device: burn::tensor::Device<Inner<B>>,
}

impl<B: BambaAutodiffBackend> Sharded<B> {
    /// This rank's slices, read from `source` by HF name (only the slice is kept).
    pub fn new(
        layout: Layout,
        shard_rank: usize,
        source: &dyn ParamSource,
        decays: impl Fn(&str) -> bool,
        compute: DType,
        device: &burn::tensor::Device<Inner<B>>,
    ) -> Result<Self> {
        let rank = shard_rank;
        let (mut master, mut moments) = (vec![], vec![]);
        for unit in &layout.units {
            let start = rank * unit.shard_len;
            let mut values = vec![0f32; unit.shard_len];
            for (slot, at, to, n) in overlaps(unit, start, unit.shard_len) {
                let v = source
                    .load_range(&slot.name, &slot.shape, at, n)
                    .with_context(|| format!("loading {}", slot.name))?;
                values[to..to + n].copy_from_slice(&v);
            }
            master.push(flat(values, device));
            moments.push(Moments::zeros(unit.shard_len, device));
        }
        Ok(Self::with_state(
            layout, shard_rank, master, moments, &decays, compute, device,
        ))
    }

    /// Restores slices read from a checkpoint (`[master, exp_avg, exp_avg_sq]`
    /// per unit); with `with_moments` false the optimizer starts fresh.
    pub fn from_slices(
        layout: Layout,
        shard_rank: usize,
        slices: Vec<[Vec<f32>; 3]>,
        with_moments: bool,
        decays: impl Fn(&str) -> bool,
        compute: DType,
        device: &burn::tensor::Device<Inner<B>>,
    ) -> Result<Self> {
        let (mut master, mut moments) = (vec![], vec![]);
        for (unit, [m, a, s]) in layout.units.iter().zip(slices) {
            anyhow::ensure!(
                m.len() == unit.shard_len,
                "unit {}: slice of {} values, expected {}",
                unit.name,
                m.len(),
                unit.shard_len
            );
            master.push(flat(m, device));
            moments.push(if with_moments {
                Moments {
                    exp_avg: flat(a, device),
                    exp_avg_sq: flat(s, device),
                }
            } else {
                Moments::zeros(unit.shard_len, device)
            });
        }
        Ok(Self::with_state(
            layout, shard_rank, master, moments, &decays, compute, device,
        ))
    }

    /// The slices `master` and `moments` with their decay masks, no gradients yet.
    fn with_state(
        layout: Layout,
        shard_rank: usize,
        master: Vec<Tensor<Inner<B>, 1>>,
        moments: Vec<Moments<Inner<B>>>,
        decays: &dyn Fn(&str) -> bool,
        compute: DType,
        device: &burn::tensor::Device<Inner<B>>,
    ) -> Self {
        let no_decay = layout
            .units
            .iter()
            .map(|u| no_decay_ranges(u, shard_rank, decays))
            .collect();
        let units = layout.units.len();
        let none = vec![None; units];
        Self {
            compute_copy: none.clone(),
            keep_compute_copy: false,
            layout,
            shard_rank,
            master,
            moments,
            no_decay,
            reduced: (0..units).map(|_| None).collect(),
            replica_mean: (0..units).map(|_| None).collect(),
            in_flight: Default::default(),
            grads: (0..units).map(|_| None).collect(),
            compute,
            reduce: DType::F32,
            solo: false,
            reduce_each_micro_batch: false,
            overlap_comm: false,
            device: device.clone(),
        }
    }

    /// All-gathers every unit and puts the full parameters into `model`.
    pub fn gather_into<M: Module<B>>(
        &self,
        model: M,
        shard_comm: &dyn Comm<Inner<B>>,
    ) -> Result<M> {
        let mut setter = SetParams::<B>::new();
        for (i, unit) in self.layout.units.iter().enumerate() {
            let full = shard_comm.all_gather(self.compute_shard(i))?;
            for p in &unit.params {
                setter.insert(&p.name, full.clone().narrow(0, p.offset, p.numel), &p.shape);
            }
        }
        let model = model.map(&mut setter);
        anyhow::ensure!(
            setter.values.is_empty(),
            "model lacks parameters {:?}",
            setter.values.keys().collect::<Vec<_>>()
        );
        Ok(model)
    }

    /// `model` with its gathered parameters dropped (stale once the
    /// optimizer steps; the next step gathers again), so that their memory
    /// is free for the update.
    pub fn release<M: Module<B>>(&self, model: M) -> M {
        SetParams::<B>::free(model)
    }

    /// Unit `i`'s slice in the compute dtype, ready to all-gather.
    fn compute_shard(&self, i: usize) -> Tensor<Inner<B>, 1> {
        match &self.compute_copy[i] {
            Some(c) => c.clone(),
            None => self.master[i].clone().cast(self.compute),
        }
    }

    /// Adds this micro-batch's gradients (already scaled by 1/accumulation).
    pub fn accumulate<M: Module<B>>(&mut self, model: &M, grads: &B::Gradients) {
        let mut found = collect_grads::<B, M>(model, "", grads);
        for i in 0..self.layout.units.len() {
            self.add_unit_grads(i, &mut found);
        }
    }

    /// Adds the gradients in `found` (flat, by HF name) of unit `i`'s
    /// parameters into its f32 buffer, in one pass per parameter; on one
    /// GPU the first micro-batch's gradients are kept where they are.
    fn add_unit_grads(&mut self, i: usize, found: &mut HashMap<String, Tensor<Inner<B>, 1>>) {
        let unit = &self.layout.units[i];
        let parts: Vec<_> = unit
            .params
            .iter()
            .filter_map(|p| found.remove(&p.name).map(|g| (g, p.offset)))
            .collect();
        if parts.is_empty() {
            return;
        }
        let padded = unit.padded(self.layout.shards);
        // bf16 gradients packed as bf16 when they would be cast to bf16 for
        // the reduction anyway, or need none; a sum over micro-batches is f32.
        let bf16 = (self.reduce == DType::BF16 || self.solo)
            && parts.iter().all(|(g, _)| g.dtype() == DType::BF16);
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let one_dtype = parts.iter().all(|(g, _)| g.dtype() == parts[0].0.dtype());
        self.grads[i] = Some(match self.grads[i].take() {
            None if self.solo && one_dtype && parts.len() <= GRAD_PARTS_MAX => {
                FlatGrad::Parts { parts, len: padded }
            }
            acc => {
                let acc = acc.map(FlatGrad::into_buffer);
                FlatGrad::Buffer(bamba_model::ops::pack(parts, padded, acc, dtype))
            }
        });
    }

    /// Reduces gradients to slices, clips by the global norm and steps AdamW.
    /// Returns the pre-clip global gradient norm, still on the device.
    pub fn step(
        &mut self,
        opt: &AdamW,
        lr: f64,
        step: u64,
        clip: f64,
        shard_comm: &dyn Comm<Inner<B>>,
        replicate_comm: &dyn Comm<Inner<B>>,
    ) -> Result<Tensor<Inner<B>, 1>> {
        let mut shards = Vec::with_capacity(self.layout.units.len());
        let units = self.layout.units.len();
        for i in 0..units {
            let reduced = self.reduced[i].is_some() || self.replica_mean[i].is_some();
            if self.grads[i].is_some() || !reduced {
                self.reduce_unit(i, shard_comm, replicate_comm)?;
            }
        }
        // Collected once all are started: each unit's replica average ran
        // beside the next one's reduce-scatter.
        for i in 0..units {
            shards.push(match self.replica_mean[i].take() {
                Some(mean) => FlatGrad::Buffer(mean.wait()),
                None => self.reduced[i].take().expect("reduced above"),
            });
        }
        self.in_flight.clear();
        // Replicas hold identical slices: the norm sums over the shard group only.
        let local = shards
            .iter()
            .map(FlatGrad::sum_squares)
            .reduce(|a, b| a + b)
            .expect("at least one unit");
        let norm = shard_comm.all_reduce_sum(local)?.sqrt();
        let coef = if clip > 0.0 {
            Some(
                (norm.clone() + 1e-6)
                    .recip()
                    .mul_scalar(clip)
                    .clamp_max(1.0),
            )
        } else {
            None
        };
        // Moments move through the update (no placeholder: a zero-size
        // tensor is an invalid kernel launch on CUDA).
        let all_moments = std::mem::take(&mut self.moments);
        let bf16_copy = self.keep_compute_copy && self.compute == DType::BF16;
        let masters = std::mem::take(&mut self.master);
        for (i, ((grad, moments), master)) in
            shards.into_iter().zip(all_moments).zip(masters).enumerate()
        {
            // Dropped first: the update may reuse its memory.
            self.compute_copy[i] = None;
            let (p, m, copy) = opt.update(
                master,
                grad,
                moments,
                &self.no_decay[i],
                coef.as_ref(),
                lr,
                step,
                bf16_copy,
            );
            self.master.push(p);
            self.compute_copy[i] = copy;
            self.moments.push(m);
        }
        Ok(norm)
    }

    /// Reduce-scatters unit `i`'s summed gradients to this rank's slice (and
    /// averages it over replicas), freeing the full buffer.
    fn reduce_unit(
        &mut self,
        i: usize,
        shard_comm: &dyn Comm<Inner<B>>,
        replicate_comm: &dyn Comm<Inner<B>>,
    ) -> Result<()> {
        let pending = self.start_reduce(i, shard_comm, false)?;
        self.finish_reduce(i, pending, true, replicate_comm)
    }

    /// Starts unit `i`'s reduce-scatter; with `overlap` it runs beside what
    /// is enqueued next. On one GPU there is nothing to reduce (`None`).
    fn start_reduce(
        &mut self,
        i: usize,
        shard_comm: &dyn Comm<Inner<B>>,
        overlap: bool,
    ) -> Result<Option<Pending<Inner<B>>>> {
        let zeros = || {
            let len = self.layout.units[i].padded(self.layout.shards);
            FlatGrad::Buffer(Tensor::zeros([len], &self.device))
        };
        let full = self.grads[i].take();
        if self.solo {
            self.reduced[i] = Some(full.unwrap_or_else(zeros));
            return Ok(None);
        }
        let full = full.unwrap_or_else(zeros).into_buffer().cast(self.reduce);
        Ok(Some(if overlap {
            shard_comm.start_reduce_scatter_mean(full)?
        } else {
            Pending::ready(shard_comm.reduce_scatter_mean(full)?)
        }))
    }

    /// Takes unit `i`'s reduce-scattered slice and adds it to the step's;
    /// on the step's `last` micro-batch an hsdp rank then averages the sum
    /// over the replicas: once a step, not once a micro-batch (FSDP2's
    /// `set_requires_all_reduce(False)` on the others), and beside the
    /// compute that follows with `overlap_comm` (FSDP2's all-reduce stream),
    /// [`REPLICA_AVERAGES_IN_FLIGHT`] units at a time.
    fn finish_reduce(
        &mut self,
        i: usize,
        pending: Option<Pending<Inner<B>>>,
        last: bool,
        replicate_comm: &dyn Comm<Inner<B>>,
    ) -> Result<()> {
        let Some(pending) = pending else {
            return Ok(());
        };
        let shard = pending.wait();
        // f32 or bf16: the norm and AdamW read either. A later micro-batch's
        // slice (`reduce_each_micro_batch`) adds to the earlier ones in f32.
        let sum = match self.reduced[i].take() {
            Some(acc) => acc.into_buffer().cast(DType::F32) + shard.cast(DType::F32),
            None => shard,
        };
        if last && replicate_comm.size() > 1 {
            self.replica_mean[i] = Some(if self.overlap_comm {
                replicate_comm.start_all_reduce_mean(sum)?
            } else {
                Pending::ready(replicate_comm.all_reduce_mean(sum)?)
            });
            // An average in flight holds its input and output slices: at
            // most two units' worth (the older ones finished long ago, so
            // the compute stream's wait costs nothing).
            self.in_flight.push_back(i);
            while self.in_flight.len() > REPLICA_AVERAGES_IN_FLIGHT {
                let j = self.in_flight.pop_front().expect("non-empty");
                if let Some(mean) = self.replica_mean[j].take() {
                    self.reduced[j] = Some(FlatGrad::Buffer(mean.wait()));
                }
            }
        } else {
            self.reduced[i] = Some(FlatGrad::Buffer(sum));
        }
        Ok(())
    }

    /// Drops gradients of a step that is skipped (non-finite loss).
    pub fn discard_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.reduced.iter_mut().for_each(|g| *g = None);
        self.replica_mean.iter_mut().for_each(|g| *g = None);
        self.in_flight.clear();
    }

    /// Bytes of state this rank keeps between steps, by kind: f32 master
    /// weights and the two f32 AdamW moments.
    pub fn state_bytes(&self) -> StateBytes {
        let shard = 4 * self.layout.shard_numel();
        StateBytes {
            master: shard,
            moments: 2 * shard,
        }
    }
}

/// See [`Sharded::state_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StateBytes {
    pub master: usize,
    pub moments: usize,
}

/// The element ranges of `unit`'s slice on `shard_rank` whose parameters
/// get no weight decay, adjacent runs merged. Padding is zero and stays
/// zero, so whether it decays does not matter.
fn no_decay_ranges(
    unit: &Unit,
    shard_rank: usize,
    decays: &dyn Fn(&str) -> bool,
) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for (slot, _, to, n) in overlaps(unit, shard_rank * unit.shard_len, unit.shard_len) {
        if n == 0 || decays(&slot.name) {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.1 == to => last.1 = to + n,
            _ => ranges.push((to, to + n)),
        }
    }
    ranges
}

fn flat<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Replaces parameters by gathered values (by HF name) as fresh tracked
/// leaves; parameters without a value are left as they are.
struct SetParams<B: BambaAutodiffBackend> {
    path: Vec<String>,
    values: HashMap<String, (Tensor<Inner<B>, 1>, Vec<usize>)>,
    /// Map every parameter to a 1-element placeholder instead (frees memory).
    free: bool,
    /// The one buffer every placeholder views.
    placeholder: Option<Tensor<B, 1>>,
    /// Reshard after forward: matrices stay views of the gathered buffer
    /// and are listed here with their slot and offset (their products make
    /// them again in backward); the rest are copied out of it, so that no
    /// view keeps the buffer alive past the forward.
    reshard: Option<Reshard>,
}

struct Reshard {
    slot: bamba_model::ops::ReshardSlot,
    offsets: HashMap<String, usize>,
    weights: HashMap<burn::module::ParamId, (bamba_model::ops::ReshardSlot, usize)>,
}

impl<B: BambaAutodiffBackend> SetParams<B> {
    fn new() -> Self {
        Self {
            path: vec![],
            values: HashMap::new(),
            free: false,
            placeholder: None,
            reshard: None,
        }
    }

    fn insert(&mut self, name: &str, flat: Tensor<Inner<B>, 1>, shape: &[usize]) {
        self.values.insert(name.to_string(), (flat, shape.to_vec()));
    }

    /// Sets the values under `prefix` (the module's own HF path) into `module`.
    fn apply<M: Module<B>>(&mut self, module: M, prefix: &str) -> M {
        self.path = prefix.split('.').map(String::from).collect();
        let m = module.map(self);
        self.path.clear();
        m
    }

    /// `module` with every parameter replaced by a placeholder.
    fn free<M: Module<B>>(module: M) -> M {
        let mut s = Self::new();
        s.free = true;
        module.map(&mut s)
    }
}

impl<B: BambaAutodiffBackend> ModuleMapper<B> for SetParams<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = param.consume();
        if self.free {
            let device = old.device();
            let one = self
                .placeholder
                .get_or_insert_with(|| Tensor::zeros([1], &device))
                .clone();
            return Param::from_mapped_value(id, one.reshape([1; D]), mapper);
        }
        let name = self.path.join(".");
        let Some((flat, shape)) = self.values.remove(&name) else {
            return Param::from_mapped_value(id, old, mapper);
        };
        let shape: [usize; D] = shape.try_into().expect("layout shape matches the module");
        let flat = match &mut self.reshard {
            Some(r) if D == 2 => {
                r.weights.insert(id, (r.slot.clone(), r.offsets[&name]));
                flat
            }
            // A fresh buffer (the zeros take the sum in place).
            Some(_) => flat.zeros_like() + flat,
            None => flat,
        };
        let value = Tensor::<B, D>::from_inner(flat.reshape(shape)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// The gradients of `module`'s parameters, flattened, by HF name (`prefix` is
/// the module's own path; empty for the whole model).
fn collect_grads<B: BambaAutodiffBackend, M: Module<B>>(
    module: &M,
    prefix: &str,
    grads: &B::Gradients,
) -> HashMap<String, Tensor<Inner<B>, 1>> {
    let mut c = CollectGrads::<B> {
        path: prefix
            .split('.')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        grads,
        out: HashMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// Each parameter's gradient, flattened, by HF name.
struct CollectGrads<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a B::Gradients,
    out: HashMap<String, Tensor<Inner<B>, 1>>,
}

impl<B: BambaAutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.grad(self.grads) {
            let n = g.shape().num_elements();
            // In the parameter's dtype, as torch's `.grad`: a fused backward
            // may hand a bf16 weight an f32 gradient (norms, D, dt_bias).
            let dtype = param.val().dtype();
            let g = if g.dtype() == dtype { g } else { g.cast(dtype) };
            self.out.insert(self.path.join("."), g.reshape([n]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::adamw::AdamWConfig;
    use bamba_model::BambaConfig;

    /// Each unit's no-decay ranges cover exactly the elements of its
    /// no-decay parameters on that rank, in a few runs; the embedding and
    /// LM head have none.
    #[test]
    fn no_decay_ranges_are_per_rank_exact_and_few() {
        let decays = |n: &str| AdamWConfig::default().decays(n);
        for (cfg, ranks) in [(BambaConfig::tiny(), 3), (BambaConfig::bamba_9b(), 2)] {
            let layout = Layout::new(&cfg, ranks);
            for rank in 0..ranks {
                for unit in &layout.units {
                    let ranges = no_decay_ranges(unit, rank, &decays);
                    let mut want = vec![false; unit.shard_len];
                    for (slot, _, to, n) in overlaps(unit, rank * unit.shard_len, unit.shard_len) {
                        want[to..to + n].fill(!decays(&slot.name));
                    }
                    let mut got = vec![false; unit.shard_len];
                    for &(lo, hi) in &ranges {
                        assert!(lo < hi, "{}: empty range", unit.name);
                        got[lo..hi].fill(true);
                    }
                    assert_eq!(got, want, "{} on rank {rank}", unit.name);
                    assert!(
                        ranges.len() <= bamba_model::ops::NO_DECAY_MAX,
                        "{}: {} ranges",
                        unit.name,
                        ranges.len()
                    );
                }
            }
            assert!(
                layout
                    .units
                    .iter()
                    .any(|u| no_decay_ranges(u, 0, &decays).is_empty())
            );
        }
    }
}
