//! Per-layer FSDP with full activation checkpointing, for models whose
//! gathered parameters, gradients or activations do not fit at once.
//!
//! Forward runs unit by unit without an autodiff graph: all-gather a layer's
//! parameters, run it, keep only its input, free the gathered copy. Backward
//! walks the units in reverse: gather again, recompute the unit's forward
//! from its saved input with the graph on, backpropagate the incoming
//! gradient through it (`grad_seed(y, dy)`, torch's `y.backward(dy)`), add the parameter gradients to the
//! unit's buffer, reduce-scatter them on the last micro-batch, free. Peak
//! memory is one unit's parameters, gradients and activations plus the saved
//! layer inputs (as torchtitan's per-block FSDP with full AC).
//!
//! With an activation-checkpointing fraction `p < 1`, a spread-out share
//! `1 - p` of the layers keep their parameters and graph from the forward
//! instead (no second gather, no recompute), trading memory for speed; at
//! `p = 0` (`parallelism.per_layer`) every layer does: FSDP's per-block
//! units without checkpointing.
//!
//! With `reshard` (FSDP2's `reshard_after_forward`), a kept layer frees its
//! gathered parameters once its forward has run, as a recomputed one does,
//! and gathers them again for its backward: its products keep recipes that
//! read the weights from the new gather (`ReshardSlot`), its small
//! parameters are copies, and only its activations stay.
//!
//! With `overlap`, communication runs beside compute (FSDP's prefetch): the
//! next unit's all-gather starts before the current unit's compute is
//! enqueued, and a unit's reduce-scatter is waited for only after the next
//! unit's backward is enqueued. That holds two gathered units at a time.

use anyhow::{Result, ensure};
use bamba_model::layer::BambaDecoderLayer;
use bamba_model::model::causal_lm_loss;
use bamba_model::ops::{ReshardSlot, grad_seed, matmul, with_resharded};
use bamba_model::rope::rope_tables;
use bamba_model::{BambaAutodiffBackend, BambaForCausalLM};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::{Int, Tensor, TensorPrimitive};

use std::collections::{HashMap, VecDeque};

use super::{Comm, Inner, Pending, SetParams, Sharded};

/// Hands out gathered units in their order of use, the next one's
/// all-gather already in flight when `overlap` is set.
struct Gathers<B: BambaAutodiffBackend> {
    order: VecDeque<usize>,
    next: Option<(usize, Pending<Inner<B>>)>,
    overlap: bool,
}

impl<B: BambaAutodiffBackend> Gathers<B> {
    fn new(order: Vec<usize>, overlap: bool) -> Self {
        Self {
            order: order.into(),
            next: None,
            overlap,
        }
    }

    /// Unit `want`'s parameters by HF name, in the compute dtype.
    fn take(
        &mut self,
        want: usize,
        sharded: &Sharded<B>,
        comm: &dyn Comm<Inner<B>>,
    ) -> Result<SetParams<B>> {
        let full = self.take_flat(want, sharded, comm)?;
        Ok(sharded.unit_params(want, full))
    }

    /// Unit `want`'s gathered flat buffer.
    fn take_flat(
        &mut self,
        want: usize,
        sharded: &Sharded<B>,
        comm: &dyn Comm<Inner<B>>,
    ) -> Result<Tensor<Inner<B>, 1>> {
        let (u, pending) = match self.next.take() {
            Some(p) => p,
            None => {
                let u = self.order.pop_front().expect("a unit left to gather");
                (u, sharded.start_gather(u, comm, self.overlap)?)
            }
        };
        ensure!(u == want, "gather order: expected unit {want}, have {u}");
        if self.overlap
            && let Some(n) = self.order.pop_front()
        {
            self.next = Some((n, sharded.start_gather(n, comm, true)?));
        }
        Ok(pending.wait())
    }
}

/// A layer that keeps its graph from forward to backward.
struct Kept<B: BambaAutodiffBackend> {
    /// The layer as it ran, or with `reshard` only its parameters' graph
    /// nodes (enough to collect their gradients).
    layer: BambaDecoderLayer<B>,
    x: Tensor<B, 3>,
    y: Tensor<B, 3>,
    /// With `reshard`: where backward puts the layer's new gather.
    slot: Option<ReshardSlot>,
}

/// A module with each parameter's data dropped and its autodiff node kept.
struct GradKeys;

impl<B: BambaAutodiffBackend> ModuleMapper<B> for GradKeys {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        let key = B::bamba_grad_key(t.into_primitive().tensor());
        Param::from_mapped_value(
            id,
            Tensor::from_primitive(TensorPrimitive::Float(key)),
            mapper,
        )
    }
}

impl<B: BambaAutodiffBackend> Sharded<B> {
    fn unit_index(&self, name: &str) -> Result<usize> {
        self.layout
            .units
            .iter()
            .position(|u| u.name == name)
            .ok_or_else(|| anyhow::anyhow!("layout has no unit {name}"))
    }

    /// Starts gathering unit `i` in the compute dtype (beside compute if `overlap`).
    fn start_gather(
        &self,
        i: usize,
        comm: &dyn Comm<Inner<B>>,
        overlap: bool,
    ) -> Result<Pending<Inner<B>>> {
        let shard = self.compute_shard(i);
        if overlap {
            comm.start_all_gather(shard)
        } else {
            comm.all_gather(shard).map(Pending::ready)
        }
    }

    /// Unit `i`'s parameters by HF name, from its gathered flat buffer.
    fn unit_params(&self, i: usize, full: Tensor<Inner<B>, 1>) -> SetParams<B> {
        let unit = &self.layout.units[i];
        let mut set = SetParams::new();
        for p in &unit.params {
            set.insert(&p.name, full.clone().narrow(0, p.offset, p.numel), &p.shape);
        }
        set
    }

    /// [`Self::unit_params`] for a layer resharded after forward: its
    /// matrices listed with `slot` (see [`SetParams`]).
    fn unit_params_resharded(
        &self,
        i: usize,
        full: Tensor<Inner<B>, 1>,
        slot: &ReshardSlot,
    ) -> SetParams<B> {
        let mut set = self.unit_params(i, full);
        let offsets = self.layout.units[i]
            .params
            .iter()
            .map(|p| (p.name.clone(), p.offset))
            .collect();
        set.reshard = Some(super::Reshard {
            slot: slot.clone(),
            offsets,
            weights: HashMap::new(),
        });
        set
    }

    /// One micro-batch, unit by unit. Returns the (scaled) loss; gradients go
    /// to the unit buffers, reduce-scattered when `last` or with
    /// `reduce_each_micro_batch` (else no communication for the earlier
    /// micro-batches of an accumulation).
    #[allow(clippy::too_many_arguments)]
    pub fn streamed_step(
        &mut self,
        model: &mut BambaForCausalLM<B>,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        scale: f64,
        last: bool,
        checkpoint_fraction: f64,
        overlap: bool,
        reshard: bool,
        shard_comm: &dyn Comm<Inner<B>>,
        replicate_comm: &dyn Comm<Inner<B>>,
    ) -> Result<Tensor<Inner<B>, 1>> {
        let n_layers = model.model.layers.len();
        let embed = self.unit_index("embed")?;
        let head = self.unit_index("head")?;
        let layer_units: Vec<usize> = (0..n_layers)
            .map(|i| self.unit_index(&format!("layers.{i}")))
            .collect::<Result<_>>()?;
        let tied = model.lm_head.is_none();
        // Reduce-scatter this micro-batch's gradients now (the last, or every
        // one when slices are summed), or keep adding to the full buffers.
        let reduce = last || self.reduce_each_micro_batch;
        let l = inputs.dims()[1];
        let m = &mut model.model;
        // Layer i is recomputed when the fraction's count steps up at i.
        let recompute = |i: usize| {
            let p = checkpoint_fraction.clamp(0.0, 1.0);
            ((i + 1) as f64 * p).floor() > (i as f64 * p).floor()
        };
        // Every gather of the step, in order: forward, then backward's recomputes.
        let mut order = vec![embed];
        order.extend(&layer_units);
        order.push(head);
        order.extend(
            (0..n_layers)
                .rev()
                .filter(|&i| recompute(i) || reshard)
                .map(|i| layer_units[i]),
        );
        if !tied {
            order.push(embed);
        }
        let mut gathers = Gathers::<B>::new(order, overlap);
        let mut reduces: VecDeque<(usize, Option<Pending<Inner<B>>>)> = VecDeque::new();

        // Forward without a graph, keeping each layer's input.
        let mut set = gathers.take(embed, self, shard_comm)?;
        m.embed_tokens = set.apply(m.embed_tokens.clone(), "model.embed_tokens");
        let mut h = m.embed_tokens.valid().forward(inputs.clone().inner());
        if !tied {
            m.embed_tokens = SetParams::<B>::free(m.embed_tokens.clone());
        }
        let rope_inner = rope_tables(l, m.rotary_dim, m.rope_theta, &h.device());
        let rope = (
            Tensor::<B, 4>::from_inner(rope_inner.0.clone()),
            Tensor::<B, 4>::from_inner(rope_inner.1.clone()),
        );
        let mut saved = Vec::with_capacity(n_layers + 1);
        let mut kept = Vec::with_capacity(n_layers);
        for (i, &u) in layer_units.iter().enumerate() {
            let full = gathers.take_flat(u, self, shard_comm)?;
            let name = format!("model.layers.{i}");
            if recompute(i) {
                let layer = self.unit_params(u, full).apply(m.layers[i].clone(), &name);
                let next = layer.valid().forward(h.clone(), &rope_inner);
                saved.push(Some(h));
                kept.push(None);
                h = next;
            } else {
                let x = Tensor::<B, 3>::from_inner(h).require_grad();
                let (layer, y, slot) = if reshard {
                    let slot = ReshardSlot::new();
                    let mut set = self.unit_params_resharded(u, full, &slot);
                    let layer = set.apply(m.layers[i].clone(), &name);
                    let weights = set.reshard.take().expect("resharded").weights;
                    let y = with_resharded(weights, || layer.forward(x.clone(), &rope));
                    (layer.map(&mut GradKeys), y, Some(slot))
                } else {
                    let layer = self.unit_params(u, full).apply(m.layers[i].clone(), &name);
                    let y = layer.forward(x.clone(), &rope);
                    (layer, y, None)
                };
                h = y.clone().inner();
                saved.push(None);
                kept.push(Some(Kept { layer, x, y, slot }));
            }
            crate::memtrace::mark(|| {
                format!(
                    "forward {i} ({})",
                    if recompute(i) { "recomputed" } else { "kept" }
                )
            });
        }
        saved.push(Some(h));
        crate::memtrace::mark(|| "forward done".into());

        // Head: final norm, LM head (or the tied embedding), loss.
        let mut set = gathers.take(head, self, shard_comm)?;
        let final_norm = set.apply(m.final_layernorm.clone(), "model.final_layernorm");
        let lm_head = model.lm_head.clone().map(|h| set.apply(h, "lm_head"));
        let last_h = saved.pop().flatten().expect("the last layer's output");
        let x = Tensor::<B, 3>::from_inner(last_h).require_grad();
        let y = final_norm.forward(x.clone());
        let logits = match &lm_head {
            Some(h) => h.forward(y),
            None => {
                let [b, l, d] = y.dims();
                let w = m.embed_tokens.weight.val();
                let v = w.dims()[0];
                matmul(y.reshape([b * l, d]), w.transpose()).reshape([b, l, v])
            }
        };
        let loss = causal_lm_loss(logits, targets, model.z_loss_coefficient) * scale;
        crate::memtrace::mark(|| "head forward".into());
        let grads = loss.backward();
        crate::memtrace::mark(|| "head backward".into());
        let mut dy = x.grad(&grads).expect("the head's input is tracked");
        self.add_module_grads(head, &final_norm, "model.final_layernorm", &grads);
        if let Some(h) = &lm_head {
            self.add_module_grads(head, h, "lm_head", &grads);
        }
        if tied {
            self.add_module_grads(embed, &m.embed_tokens, "model.embed_tokens", &grads);
        }
        drop((final_norm, lm_head, grads));
        if reduce {
            reduces.push_back((head, self.start_reduce(head, shard_comm, overlap)?));
        }

        // Layers in reverse: recompute with the graph (or use the kept one),
        // backpropagate dy.
        for (i, &u) in layer_units.iter().enumerate().rev() {
            let name = format!("model.layers.{i}");
            let input = saved.pop().expect("one per layer");
            let (layer, x, y, slot) = match kept.pop().expect("one per layer") {
                Some(Kept { layer, x, y, slot }) => {
                    if let Some(slot) = &slot {
                        let full = gathers.take_flat(u, self, shard_comm)?;
                        slot.fill::<Inner<B>>(full.into_primitive().tensor());
                    }
                    (layer, x, y, slot)
                }
                None => {
                    let mut set = gathers.take(u, self, shard_comm)?;
                    let layer = set.apply(m.layers[i].clone(), &name);
                    let input = input.expect("saved for a recomputed layer");
                    let x = Tensor::<B, 3>::from_inner(input).require_grad();
                    let y = layer.forward(x.clone(), &rope);
                    (layer, x, y, None)
                }
            };
            crate::memtrace::mark(|| format!("backward {i}: graph ready"));
            let grads = grad_seed(y, Tensor::from_inner(dy)).backward();
            if let Some(slot) = slot {
                slot.clear();
            }
            crate::memtrace::mark(|| format!("backward {i}: gradients"));
            dy = x.grad(&grads).expect("the layer's input is tracked");
            self.add_module_grads(u, &layer, &name, &grads);
            drop((layer, grads));
            if reduce {
                reduces.push_back((u, self.start_reduce(u, shard_comm, overlap)?));
                // The previous unit's reduce-scatter ran beside this backward.
                while reduces.len() > 1 || !overlap {
                    let Some((r, p)) = reduces.pop_front() else {
                        break;
                    };
                    self.finish_reduce(r, p, last, replicate_comm)?;
                }
            }
        }

        // Embedding: its gradient is dy scattered onto the looked-up rows.
        if !tied {
            let mut set = gathers.take(embed, self, shard_comm)?;
            m.embed_tokens = set.apply(m.embed_tokens.clone(), "model.embed_tokens");
        }
        let e = m.embed_tokens.forward(inputs);
        let grads = grad_seed(e, Tensor::from_inner(dy)).backward();
        self.add_module_grads(embed, &m.embed_tokens, "model.embed_tokens", &grads);
        m.embed_tokens = SetParams::<B>::free(m.embed_tokens.clone());
        if reduce {
            reduces.push_back((embed, self.start_reduce(embed, shard_comm, overlap)?));
        }
        for (r, p) in reduces {
            self.finish_reduce(r, p, last, replicate_comm)?;
        }
        crate::memtrace::mark(|| "step done".into());
        ensure!(saved.is_empty(), "every saved activation is consumed");
        ensure!(
            gathers.order.is_empty() && gathers.next.is_none(),
            "every gather is used"
        );
        Ok(loss.inner())
    }

    /// Adds the gradients of `module`'s parameters (paths under `prefix`) to unit `i`.
    fn add_module_grads<M: Module<B>>(
        &mut self,
        i: usize,
        module: &M,
        prefix: &str,
        grads: &B::Gradients,
    ) {
        let mut found = super::collect_grads::<B, M>(module, prefix, grads);
        self.add_unit_grads(i, &mut found);
    }
}
