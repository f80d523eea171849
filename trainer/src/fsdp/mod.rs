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

use std::collections::HashMap;

use anyhow::{Context, Result};
use bamba_model::ParamSource;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

pub use comm::{Comm, Solo};
pub use layout::{Layout, Unit, overlaps};

use crate::optim::adamw::{AdamW, Moments};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// One rank's slice of the training state, plus its communicators.
pub struct Sharded<B: AutodiffBackend> {
    pub layout: Layout,
    /// Which slice this rank holds.
    pub shard_rank: usize,
    /// Per unit, `[shard_len]` f32 master weights.
    pub master: Vec<Tensor<Inner<B>, 1>>,
    pub moments: Vec<Moments<Inner<B>>>,
    /// Per unit, 1 where weight decay applies, 0 elsewhere (and on padding).
    decay: Vec<Tensor<Inner<B>, 1>>,
    /// Per unit, gradients summed over this step's micro-batches (full, unsharded).
    grads: Vec<Option<Tensor<Inner<B>, 1>>>,
    /// Compute dtype of the gathered parameters.
    pub compute: DType,
    device: burn::tensor::Device<Inner<B>>,
}

impl<B: AutodiffBackend> Sharded<B> {
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
        let mut cache: HashMap<String, Vec<f32>> = HashMap::new();
        for unit in &layout.units {
            let start = rank * unit.shard_len;
            let mut values = vec![0f32; unit.shard_len];
            for (slot, at, to, n) in overlaps(unit, start, unit.shard_len) {
                if !cache.contains_key(&slot.name) {
                    let v = source
                        .load(&slot.name, &slot.shape)
                        .with_context(|| format!("loading {}", slot.name))?;
                    cache.insert(slot.name.clone(), v);
                }
                values[to..to + n].copy_from_slice(&cache[&slot.name][at..at + n]);
            }
            cache.clear();
            master.push(flat(values, device));
            moments.push(Moments::zeros(unit.shard_len, device));
        }
        let decay = decay_masks(&layout, shard_rank, &decays)
            .into_iter()
            .map(|m| flat(m, device))
            .collect();
        let grads = vec![None; layout.units.len()];
        Ok(Self {
            layout,
            shard_rank,
            master,
            moments,
            decay,
            grads,
            compute,
            device: device.clone(),
        })
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
        let masks = decay_masks(&layout, shard_rank, &decays);
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
        let decay = masks.into_iter().map(|m| flat(m, device)).collect();
        let grads = vec![None; layout.units.len()];
        Ok(Self {
            layout,
            shard_rank,
            master,
            moments,
            decay,
            grads,
            compute,
            device: device.clone(),
        })
    }

    /// All-gathers every unit and puts the full parameters into `model`.
    pub fn gather_into<M: Module<B>>(
        &self,
        model: M,
        shard_comm: &dyn Comm<Inner<B>>,
    ) -> Result<M> {
        let mut values = HashMap::new();
        for (unit, shard) in self.layout.units.iter().zip(&self.master) {
            let full = shard_comm.all_gather(shard.clone().cast(self.compute))?;
            for p in &unit.params {
                values.insert(p.name.clone(), full.clone().narrow(0, p.offset, p.numel));
            }
        }
        let mut setter = SetParams::<B> {
            path: vec![],
            values,
        };
        let model = model.map(&mut setter);
        anyhow::ensure!(
            setter.values.is_empty(),
            "model lacks parameters {:?}",
            setter.values.keys().collect::<Vec<_>>()
        );
        Ok(model)
    }

    /// Adds this micro-batch's gradients (already scaled by 1/accumulation).
    pub fn accumulate<M: Module<B>>(&mut self, model: &M, grads: &B::Gradients) {
        let mut collect = CollectGrads::<B> {
            path: vec![],
            grads,
            out: HashMap::new(),
        };
        model.visit(&mut collect);
        for (i, unit) in self.layout.units.iter().enumerate() {
            let padded = unit.padded(self.layout.shards);
            let mut parts: Vec<Tensor<Inner<B>, 1>> = unit
                .params
                .iter()
                .map(|p| match collect.out.remove(&p.name) {
                    Some(g) => g.cast(DType::F32),
                    None => Tensor::zeros([p.numel], &self.device),
                })
                .collect();
            if padded > unit.numel {
                parts.push(Tensor::zeros([padded - unit.numel], &self.device));
            }
            let g = Tensor::cat(parts, 0);
            self.grads[i] = Some(match self.grads[i].take() {
                Some(acc) => acc + g,
                None => g,
            });
        }
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
        for (i, unit) in self.layout.units.iter().enumerate() {
            let full = self.grads[i]
                .take()
                .unwrap_or_else(|| Tensor::zeros([unit.padded(self.layout.shards)], &self.device));
            let mut shard = shard_comm.reduce_scatter_mean(full)?;
            if replicate_comm.size() > 1 {
                shard = replicate_comm.all_reduce_mean(shard)?;
            }
            shards.push(shard);
        }
        // Replicas hold identical slices: the norm sums over the shard group only.
        let local = shards
            .iter()
            .map(|g| g.clone().powi_scalar(2).sum())
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
        for (i, grad) in shards.into_iter().enumerate() {
            let grad = match &coef {
                Some(c) => grad * c.clone(),
                None => grad,
            };
            let moments = std::mem::replace(&mut self.moments[i], Moments::zeros(0, &self.device));
            let (p, m) = opt.update(
                self.master[i].clone(),
                grad,
                moments,
                Some(&self.decay[i]),
                lr,
                step,
            );
            self.master[i] = p;
            self.moments[i] = m;
        }
        Ok(norm)
    }

    /// Drops gradients of a step that is skipped (non-finite loss).
    pub fn discard_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }

    /// Bytes of parameters, gradients slices and optimizer state this rank keeps between steps.
    pub fn resident_bytes(&self) -> usize {
        // master + two moments, f32
        3 * 4 * self.layout.shard_numel()
    }
}

/// Per unit, this rank's 0/1 weight-decay mask (padding 0).
fn decay_masks(layout: &Layout, shard_rank: usize, decays: &dyn Fn(&str) -> bool) -> Vec<Vec<f32>> {
    layout
        .units
        .iter()
        .map(|unit| {
            let mut mask = vec![0f32; unit.shard_len];
            for (slot, _, to, n) in overlaps(unit, shard_rank * unit.shard_len, unit.shard_len) {
                mask[to..to + n].fill(if decays(&slot.name) { 1.0 } else { 0.0 });
            }
            mask
        })
        .collect()
}

fn flat<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Replaces each parameter by its gathered value (by HF name), as a fresh leaf.
struct SetParams<B: AutodiffBackend> {
    path: Vec<String>,
    values: HashMap<String, Tensor<Inner<B>, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for SetParams<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let (id, old, mapper) = param.consume();
        let Some(flat) = self.values.remove(&name) else {
            return Param::from_mapped_value(id, old, mapper);
        };
        let value = Tensor::<B, D>::from_inner(flat.reshape(old.dims())).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Each parameter's gradient, flattened, by HF name.
struct CollectGrads<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: &'a B::Gradients,
    out: HashMap<String, Tensor<Inner<B>, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.grad(self.grads) {
            let n = g.shape().num_elements();
            self.out.insert(self.path.join("."), g.reshape([n]));
        }
    }
}
