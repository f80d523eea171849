//! Gradients of the [`BambaBackend`] hooks, so that a backend's kernels run
//! in the backward pass too (burn's own autodiff `matmul` would call the
//! inner backend's stock matmul for both gradient GEMMs).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::TensorMetadata;
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};

use super::{BambaBackend, Remake};

/// `C = A B`: `dA = dC B^T`, `dB = A^T dC`, both through the inner hook
/// (the TF32 one when the forward was TF32). An operand stored transposed
/// (`x @ W^T`) gets its gradient in the same layout, `(B dC^T)^T` or
/// `(dC^T A)^T`: the same GEMM, written so that the weight's gradient is
/// row-major like the weight. A product written in f32 from narrower
/// operands (`f32_out`) takes its gradient in the operands' dtype first.
/// The lhs gradient is added by the GEMM into the one registered before it
/// (an input shared by two products: the MLP's gate and up projections),
/// not by a separate add.
#[derive(Debug)]
struct Matmul<C> {
    tf32: bool,
    /// The operands' dtype, where the output is f32 and they are not.
    f32_out: Option<burn::tensor::DType>,
    /// Whether lhs, rhs were stored transposed.
    transposed: [bool; 2],
    checkpoint: std::marker::PhantomData<C>,
}

/// Where a product's backward finds an operand: kept by the checkpointer,
/// or made again from a recipe (see [`Remake`]), reshaped to its shape.
#[derive(Clone, Debug)]
enum Operand<B: burn::tensor::backend::Backend> {
    Kept(NodeId),
    Remade(Remake<B>, burn::tensor::Shape),
}

impl<B: BambaBackend> Operand<B> {
    fn get(self, ckpt: &mut Checkpointer) -> FloatTensor<B> {
        match self {
            Operand::Kept(id) => ckpt.retrieve_node_output(id),
            Operand::Remade(remake, shape) => {
                let t = remake.run();
                // A transposed weight is its own shape already; reshaping a
                // strided view would copy it.
                if t.shape() == shape {
                    t
                } else {
                    B::float_reshape(t, shape)
                }
            }
        }
    }
}

impl<B: BambaBackend, C: CheckpointStrategy> Backward<B, 2> for Matmul<C> {
    type State = (Option<Operand<B>>, Option<Operand<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        // One cast for both gradients of an f32-output product.
        let grad = match self.f32_out {
            Some(d) => B::float_cast(grad, d.into()),
            None => grad,
        };
        let [lhs_t, rhs_t] = self.transposed;
        let acc = if lhs_t || self.tf32 {
            None
        } else {
            take_grad::<B, C, _, 2>(grads, &ops, 0, &grad)
        };
        let (lhs, rhs) = ops.state;
        let lhs: Option<FloatTensor<B>> = lhs.map(|l| l.get(ckpt));
        let rhs: Option<FloatTensor<B>> = rhs.map(|r| r.get(ckpt));
        let mm = if self.tf32 {
            B::bamba_matmul_tf32
        } else {
            B::bamba_matmul
        };
        let t = B::float_transpose;
        let [pl, pr] = ops.parents;
        if let Some(n) = pl {
            let rhs = rhs.expect("rhs saved");
            let g = grad.clone();
            let dl = match (lhs_t, acc) {
                (true, _) => t(mm(rhs, t(g))),
                (false, Some(acc)) => B::bamba_matmul_acc(g, t(rhs), acc),
                (false, None) => mm(g, t(rhs)),
            };
            grads.register::<B>(n.id, dl);
        }
        if let Some(n) = pr {
            let lhs = lhs.expect("lhs saved");
            let dr = if rhs_t {
                t(mm(t(grad), lhs))
            } else {
                mm(t(lhs), grad)
            };
            grads.register::<B>(n.id, dr);
        }
    }
}

/// Fused (gated) RMSNorm: the backward kernel takes the saved inputs and
/// the forward's inverse RMS. Parents: `x`, `w`, and `z` when gated.
#[derive(Debug)]
struct RmsNorm<C>(std::marker::PhantomData<C>);

type NormState<B> = (
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    FloatTensor<B>,
    FloatTensor<B>,
);

impl<B: BambaBackend, C: CheckpointStrategy> Backward<B, 3> for RmsNorm<C> {
    type State = NormState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        // The residual stream's gradient so far (the add after this norm
        // ran its backward first) goes into the kernel, not a separate add.
        let acc = take_grad::<B, C, _, 3>(grads, &ops, 0, &dout);
        let (x, z, w, rstd) = ops.state;
        let w_dtype = w.dtype();
        let (dx, dz, dw) = B::bamba_rms_norm_bwd(dout, x, z, w, rstd, acc);
        let [px, pw, pz] = ops.parents;
        if let Some(n) = px {
            grads.register::<B>(n.id, dx);
        }
        if let Some(n) = pw {
            grads.register::<B>(n.id, B::float_cast(dw, w_dtype.into()));
        }
        if let (Some(n), Some(dz)) = (pz, dz) {
            grads.register::<B>(n.id, dz);
        }
    }
}

/// Fused conv + SiLU; parents `x`, `w`, and the bias when there is one.
#[derive(Debug)]
struct Conv1dSilu;

impl<B: BambaBackend> Backward<B, 3> for Conv1dSilu {
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, bias) = ops.state;
        let w_dtype = w.dtype();
        let b_dtype = bias.as_ref().map(|b| b.dtype());
        let dy = grads.consume::<B>(&ops.node);
        let (dx, dw, db) = B::bamba_conv1d_silu_bwd(dy, x, w, bias);
        let [px, pw, pb] = ops.parents;
        if let Some(n) = px {
            grads.register::<B>(n.id, dx);
        }
        if let Some(n) = pw {
            grads.register::<B>(n.id, B::float_cast(dw, w_dtype.into()));
        }
        if let (Some(n), Some(db), Some(dt)) = (pb, db, b_dtype) {
            grads.register::<B>(n.id, B::float_cast(db, dt.into()));
        }
    }
}

/// `grad_seed(y, dy)`: the parent's gradient is `dy` itself.
#[derive(Debug)]
struct GradSeed;

impl<B: BambaBackend> Backward<B, 1> for GradSeed {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        // The upstream gradient is the seed's own (ones): dy replaces it.
        let _ = grads.consume::<B>(&ops.node);
        let [py] = ops.parents;
        if let Some(n) = py {
            grads.register::<B>(n.id, ops.state);
        }
    }
}

/// Fused `dt`; parents `raw`, `bias`.
#[derive(Debug)]
struct DtSoftplus;

impl<B: BambaBackend> Backward<B, 2> for DtSoftplus {
    type State = (FloatTensor<B>, FloatTensor<B>, f64, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (raw, bias, lo, hi) = ops.state;
        let b_dtype = bias.dtype();
        let g = grads.consume::<B>(&ops.node);
        let (draw, dbias) = B::bamba_dt_softplus_bwd(g, raw, bias, lo, hi);
        let [pr, pb] = ops.parents;
        if let Some(n) = pr {
            grads.register::<B>(n.id, draw);
        }
        if let Some(n) = pb {
            grads.register::<B>(n.id, B::float_cast(dbias, b_dtype.into()));
        }
    }
}

/// Fused per-head scale; parents `x`, `a`.
#[derive(Debug)]
struct ScaleHeads;

impl<B: BambaBackend> Backward<B, 2> for ScaleHeads {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, a) = ops.state;
        let a_dtype = a.dtype();
        let g = grads.consume::<B>(&ops.node);
        let (dx, da) = B::bamba_scale_heads_bwd(g, x, a);
        let [px, pa] = ops.parents;
        if let Some(n) = px {
            grads.register::<B>(n.id, dx);
        }
        if let Some(n) = pa {
            grads.register::<B>(n.id, B::float_cast(da, a_dtype.into()));
        }
    }
}

/// Fused chunk cumsum (linear: its backward is the reversed sum); parent `x`.
#[derive(Debug)]
struct ChunkCumsum {
    reverse: bool,
}

impl<B: BambaBackend> Backward<B, 1> for ChunkCumsum {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        if let [Some(n)] = ops.parents {
            grads.register::<B>(n.id, B::bamba_chunk_cumsum(g, !self.reverse));
        }
    }
}

/// Fused end decay; parents `dt`, `cs`.
#[derive(Debug)]
struct EndDecay;

impl<B: BambaBackend> Backward<B, 2> for EndDecay {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (dt, cs) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let (ddt, dcs) = B::bamba_end_decay_bwd(g, dt, cs);
        let [pdt, pcs] = ops.parents;
        if let Some(n) = pdt {
            grads.register::<B>(n.id, ddt);
        }
        if let Some(n) = pcs {
            grads.register::<B>(n.id, dcs);
        }
    }
}

/// Token embedding; parent: the weight. Keeps the ids and the vocab size.
#[derive(Debug)]
struct Embedding;

impl<B: BambaBackend> Backward<B, 1> for Embedding {
    type State = (IntTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (ids, vocab) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let [p] = ops.parents;
        if let Some(n) = p {
            grads.register::<B>(n.id, B::bamba_embedding_bwd(dy, ids, vocab));
        }
    }
}

/// Fused cross-entropy; parent: the logits.
#[derive(Debug)]
struct CrossEntropy;

impl<B: BambaBackend> Backward<B, 1> for CrossEntropy {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse, z) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let [p] = ops.parents;
        if let Some(n) = p {
            grads.register::<B>(n.id, B::bamba_cross_entropy_bwd(g, logits, targets, lse, z));
        }
    }
}

/// Fused causal softmax; parent: the scores. Backward needs only the output.
#[derive(Debug)]
struct CausalSoftmax;

impl<B: BambaBackend> Backward<B, 1> for CausalSoftmax {
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, scale) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let [p] = ops.parents;
        if let Some(n) = p {
            grads.register::<B>(n.id, B::bamba_causal_softmax_bwd(g, probs, scale));
        }
    }
}

/// Fused rotary embedding; parent: x. Keeps only the tables (the rotation
/// is linear).
#[derive(Debug)]
struct Rope;

impl<B: BambaBackend> Backward<B, 1> for Rope {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let [p] = ops.parents;
        if let Some(n) = p {
            grads.register::<B>(n.id, B::bamba_rope_bwd(g, cos, sin));
        }
    }
}

/// A reshape that may be a view; the gradient is reshaped back.
#[derive(Debug)]
struct ReshapeView;

impl<B: BambaBackend> Backward<B, 1> for ReshapeView {
    type State = burn::tensor::Shape;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        let [p] = ops.parents;
        if let Some(n) = p {
            grads.register::<B>(n.id, B::float_reshape(g, ops.state));
        }
    }
}

/// Flash attention; parents: q, k, v. Keeps its output and row
/// statistics (not the `[l, l]` probabilities).
#[derive(Debug)]
struct FlashAttention;

impl<B: BambaBackend> Backward<B, 3> for FlashAttention {
    #[allow(clippy::type_complexity)]
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, out, lse, scale) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = B::bamba_flash_attention_bwd(g, q, k, v, out, lse, scale);
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(n) = parent {
                grads.register::<B>(n.id, grad);
            }
        }
    }
}

/// Fused SwiGLU; parents: gate, up.
#[derive(Debug)]
struct Swiglu;

impl<B: BambaBackend> Backward<B, 2> for Swiglu {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let (dg, du) = B::bamba_swiglu_bwd(dy, g, u);
        let [pg, pu] = ops.parents;
        if let Some(n) = pg {
            grads.register::<B>(n.id, dg);
        }
        if let Some(n) = pu {
            grads.register::<B>(n.id, du);
        }
    }
}

/// Fused SSD intra-chunk product; parents: scores, log-decays, time
/// steps, inputs.
#[derive(Debug)]
struct SsdDiag<C> {
    tf32: bool,
    strategy: std::marker::PhantomData<C>,
}

impl<B: BambaBackend, C: CheckpointStrategy> Backward<B, 4> for SsdDiag<C> {
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
    );

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        // x's gradient from its other consumers goes into the kernel.
        let acc = take_grad::<B, C, _, 4>(grads, &ops, 3, &dy);
        let (scores, cs, dt, x) = ops.state;
        let (ds, dcs, ddt, dx) = B::bamba_ssd_diag_bwd(dy, scores, cs, dt, x, self.tf32, acc);
        let [ps, pc, pd, px] = ops.parents;
        for (parent, grad) in [(ps, ds), (pc, dcs), (pd, ddt), (px, dx)] {
            if let Some(n) = parent {
                grads.register::<B>(n.id, grad);
            }
        }
    }
}

/// Fused SSD state recurrence; parents: chunk states, log-decays. Keeps
/// its own output (the backward reads the entering states).
#[derive(Debug)]
struct SsdStates;

impl<B: BambaBackend> Backward<B, 2> for SsdStates {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, e) = ops.state;
        let de = grads.consume::<B>(&ops.node);
        let (ds, da) = B::bamba_ssd_states_bwd(de, a, e);
        let [ps, pa] = ops.parents;
        for (parent, grad) in [(ps, ds), (pa, da)] {
            if let Some(n) = parent {
                grads.register::<B>(n.id, grad);
            }
        }
    }
}

/// Fused row scale; parents: x, s.
#[derive(Debug)]
struct ScaleRows<C>(std::marker::PhantomData<C>);

impl<B: BambaBackend, C: CheckpointStrategy> Backward<B, 2> for ScaleRows<C> {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        // x's gradient from its other consumers goes into the kernel.
        let acc = take_grad::<B, C, _, 2>(grads, &ops, 0, &g);
        let (x, s) = ops.state;
        let (dx, ds) = B::bamba_scale_rows_bwd(g, x, s, acc);
        let [px, ps] = ops.parents;
        for (parent, grad) in [(px, dx), (ps, ds)] {
            if let Some(n) = parent {
                grads.register::<B>(n.id, grad);
            }
        }
    }
}

/// Fused SSD output; parents: y_diag, y_off, cs, x, d.
#[derive(Debug)]
struct SsdOut;

/// `y_off` as kept, or its recipe and shape.
#[derive(Clone, Debug)]
enum YOff<B: burn::tensor::backend::Backend> {
    Kept(FloatTensor<B>),
    Remade(Remake<B>, burn::tensor::Shape),
}

impl<B: BambaBackend> Backward<B, 5> for SsdOut {
    /// `(y_off, cs, x, d)`.
    type State = (YOff<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (yo, cs, x, d) = ops.state;
        let yo = match yo {
            YOff::Kept(t) => t,
            YOff::Remade(remake, shape) => B::float_reshape(remake.run(), shape),
        };
        let g = grads.consume::<B>(&ops.node);
        let (dyd, dyo, dcs, dx, dd) = B::bamba_ssd_out_bwd(g, yo, cs.clone(), x, d);
        let dcs = B::float_reshape(dcs, cs.shape());
        for (parent, grad) in ops.parents.into_iter().zip([dyd, dyo, dcs, dx, dd]) {
            if let Some(n) = parent {
                grads.register::<B>(n.id, grad);
            }
        }
    }
}

/// A slice whose gradient is added into the parent's gradient in place:
/// the parent's first slice allocates it zero-filled, later ones (other
/// slices of the same tensor) write their part into it.
/// burn's autodiff tensor (its module is private; the alias reaches it).
type NodeKey<B, C> = FloatTensor<Autodiff<B, C>>;

#[derive(Debug)]
struct Narrow<C>(std::marker::PhantomData<C>);

/// The gradient registered so far for parent `i` of `ops`, taken out of
/// `grads` (to be added inside a kernel and registered again as part of its
/// output).
fn take_grad<B: BambaBackend, C: CheckpointStrategy, S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    i: usize,
    like: &FloatTensor<B>,
) -> Option<FloatTensor<B>> {
    let node = ops.parents[i].as_ref()?;
    // `Gradients::remove` looks the node up by its id; the primitive is unused.
    let key = NodeKey::<B, C> {
        primitive: like.clone(),
        node: node.clone(),
        rc: std::sync::Arc::new(node.id),
    };
    grads.remove::<B>(&key)
}

impl<B: BambaBackend, C: CheckpointStrategy> Backward<B, 1> for Narrow<C> {
    /// `(dim, start, parent shape)`.
    type State = (usize, usize, burn::tensor::Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let Some(parent) = ops.parents[0].clone() else {
            return;
        };
        // Every slice adds into the one buffer (in place where the backend can).
        let full = take_grad::<B, C, _, 1>(grads, &ops, 0, &grad);
        let (dim, start, shape) = ops.state;
        let full =
            full.unwrap_or_else(|| B::bamba_zeros(shape, &B::float_device(&grad), grad.dtype()));
        grads.register::<B>(parent.id, B::bamba_add_narrow(full, grad, dim, start));
    }
}

impl<B: BambaBackend, C: CheckpointStrategy> BambaBackend for Autodiff<B, C> {
    fn bamba_fused() -> bool {
        B::bamba_fused()
    }

    fn bamba_conv1d_silu(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let b_node = bias
            .as_ref()
            .map_or_else(|| x.node.clone(), |b| b.node.clone());
        let prep = Conv1dSilu
            .prepare::<C>([x.node.clone(), w.node.clone(), b_node])
            .compute_bound()
            .stateful();
        let (xp, wp, bp) = (x.primitive, w.primitive, bias.map(|b| b.primitive));
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_conv1d_silu_fwd(xp.clone(), wp.clone(), bp.clone());
                prep.finish((xp, wp, bp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_conv1d_silu(xp, wp, bp)),
        }
    }

    fn bamba_dt_softplus(
        raw: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        lo: f64,
        hi: f64,
    ) -> FloatTensor<Self> {
        let prep = DtSoftplus
            .prepare::<C>([raw.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful();
        let (rp, bp) = (raw.primitive, bias.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_dt_softplus_fwd(rp.clone(), bp.clone(), lo, hi);
                prep.finish((rp, bp, lo, hi), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_dt_softplus(rp, bp, lo, hi)),
        }
    }

    fn bamba_scale_heads(x: FloatTensor<Self>, a: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = ScaleHeads
            .prepare::<C>([x.node.clone(), a.node.clone()])
            .compute_bound()
            .stateful();
        let (xp, ap) = (x.primitive, a.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_scale_heads_fwd(xp.clone(), ap.clone());
                prep.finish((xp, ap), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_scale_heads(xp, ap)),
        }
    }

    fn bamba_chunk_cumsum(x: FloatTensor<Self>, reverse: bool) -> FloatTensor<Self> {
        ChunkCumsum { reverse }
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateless(B::bamba_chunk_cumsum(x.primitive, reverse))
    }

    fn bamba_end_decay(dt: FloatTensor<Self>, cs: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = EndDecay
            .prepare::<C>([dt.node.clone(), cs.node.clone()])
            .compute_bound()
            .stateful();
        let (dtp, csp) = (dt.primitive, cs.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_end_decay_fwd(dtp.clone(), csp.clone());
                prep.finish((dtp, csp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_end_decay(dtp, csp)),
        }
    }

    fn bamba_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        let vocab = weight.shape()[0];
        let prep = Embedding
            .prepare::<C>([weight.node.clone()])
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_embedding(weight.primitive, ids.clone());
                prep.finish((ids, vocab), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_embedding(weight.primitive, ids)),
        }
    }

    fn bamba_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        z: f64,
    ) -> FloatTensor<Self> {
        let prep = CrossEntropy
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful();
        let lp = logits.primitive;
        match prep {
            OpsKind::Tracked(prep) => {
                let (loss, lse) = B::bamba_cross_entropy_fwd(lp.clone(), targets.clone(), z);
                prep.finish((lp, targets, lse, z), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_cross_entropy(lp, targets, z)),
        }
    }

    fn bamba_causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let prep = CausalSoftmax
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful();
        let sp = scores.primitive;
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_causal_softmax_fwd(sp, scale);
                prep.finish((out.clone(), scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_causal_softmax(sp, scale)),
        }
    }

    fn bamba_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = Rope
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful();
        let (cp, sp) = (cos.primitive, sin.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_rope(x.primitive, cp.clone(), sp.clone());
                prep.finish((cp, sp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_rope(x.primitive, cp, sp)),
        }
    }

    fn bamba_flash_head_dim(head_dim: usize) -> bool {
        B::bamba_flash_head_dim(head_dim)
    }

    fn bamba_flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let prep = FlashAttention
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful();
        let (qp, kp, vp) = (q.primitive, k.primitive, v.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, lse) =
                    B::bamba_flash_attention_fwd(qp.clone(), kp.clone(), vp.clone(), scale);
                prep.finish((qp, kp, vp, out.clone(), lse, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_flash_attention(qp, kp, vp, scale)),
        }
    }

    fn bamba_swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = Swiglu
            .prepare::<C>([g.node.clone(), u.node.clone()])
            .compute_bound()
            .stateful();
        let (gp, up) = (g.primitive, u.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_swiglu_fwd(gp.clone(), up.clone());
                prep.finish((gp, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_swiglu(gp, up)),
        }
    }

    fn bamba_ssd_diag(
        scores: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        dt: FloatTensor<Self>,
        x: FloatTensor<Self>,
        tf32: bool,
    ) -> FloatTensor<Self> {
        let prep = (SsdDiag::<C> {
            tf32,
            strategy: std::marker::PhantomData,
        })
        .prepare::<C>([
            scores.node.clone(),
            cs.node.clone(),
            dt.node.clone(),
            x.node.clone(),
        ])
        .compute_bound()
        .stateful();
        let (sp, cp, dp, xp) = (scores.primitive, cs.primitive, dt.primitive, x.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out =
                    B::bamba_ssd_diag_fwd(sp.clone(), cp.clone(), dp.clone(), xp.clone(), tf32);
                prep.finish((sp, cp, dp, xp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_ssd_diag(sp, cp, dp, xp, tf32)),
        }
    }

    fn bamba_ssd_states(
        s: FloatTensor<Self>,
        a: FloatTensor<Self>,
        out: burn::tensor::DType,
    ) -> FloatTensor<Self> {
        let prep = SsdStates
            .prepare::<C>([s.node.clone(), a.node.clone()])
            .compute_bound()
            .stateful();
        let (sp, ap) = (s.primitive, a.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let e = B::bamba_ssd_states_fwd(sp, ap.clone(), out);
                prep.finish((ap, e.clone()), e)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_ssd_states(sp, ap, out)),
        }
    }

    fn bamba_ssd_out(
        y_diag: FloatTensor<Self>,
        y_off: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked_ssd_out::<B, C>(y_diag, y_off, cs, x, d, None)
    }

    fn bamba_ssd_out_remade(
        y_diag: FloatTensor<Self>,
        y_off: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
        remake: Remake<Self>,
    ) -> FloatTensor<Self> {
        let remake = remake.map(|t: FloatTensor<Self>| t.primitive);
        tracked_ssd_out::<B, C>(y_diag, y_off, cs, x, d, Some(remake))
    }

    fn bamba_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = ScaleRows::<C>(std::marker::PhantomData)
            .prepare::<C>([x.node.clone(), s.node.clone()])
            .compute_bound()
            .stateful();
        let (xp, sp) = (x.primitive, s.primitive);
        match prep {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_scale_rows_fwd(xp.clone(), sp.clone());
                prep.finish((xp, sp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_scale_rows(xp, sp)),
        }
    }

    fn bamba_narrow(
        t: FloatTensor<Self>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> FloatTensor<Self> {
        let shape = t.shape();
        match Narrow::<C>(std::marker::PhantomData)
            .prepare::<C>([t.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::bamba_narrow(t.primitive, dim, start, len);
                prep.finish((dim, start, shape), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_narrow(t.primitive, dim, start, len)),
        }
    }

    fn bamba_reshape_view(t: FloatTensor<Self>, shape: burn::tensor::Shape) -> FloatTensor<Self> {
        let input = t.shape();
        match ReshapeView
            .prepare::<C>([t.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(input, B::bamba_reshape_view(t.primitive, shape)),
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_reshape_view(t.primitive, shape)),
        }
    }

    fn bamba_grad_seed(y: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        assert_eq!(y.shape(), dy.shape(), "grad_seed: dy must have y's shape");
        let zero = B::float_zeros([1].into(), &B::float_device(&y.primitive), y.dtype().into());
        match GradSeed
            .prepare::<C>([y.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(dy.primitive, zero),
            OpsKind::UnTracked(prep) => prep.finish(zero),
        }
    }

    fn bamba_rms_norm(
        x: FloatTensor<Self>,
        z: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        // An untracked stand-in for the absent gate keeps one op of three parents.
        let z_node = z
            .as_ref()
            .map_or_else(|| x.node.clone(), |z| z.node.clone());
        let prep = RmsNorm::<C>(std::marker::PhantomData)
            .prepare::<C>([x.node.clone(), w.node.clone(), z_node])
            .compute_bound()
            .stateful();
        let (xp, wp, zp) = (x.primitive, w.primitive, z.map(|z| z.primitive));
        match prep {
            OpsKind::Tracked(prep) => {
                let (out, rstd) = B::bamba_rms_norm_fwd(xp.clone(), zp.clone(), wp.clone(), eps);
                prep.finish((xp, zp, wp, rstd), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bamba_rms_norm(xp, zp, wp, eps)),
        }
    }

    fn bamba_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_matmul::<B, C>(lhs, rhs, Gemm::Plain)
    }

    fn bamba_matmul_tf32(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_matmul::<B, C>(lhs, rhs, Gemm::Tf32)
    }

    fn bamba_matmul_f32(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_matmul::<B, C>(lhs, rhs, Gemm::F32Out)
    }

    fn bamba_matmul_remade(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        remake: [Option<Remake<Self>>; 2],
        f32_out: bool,
    ) -> FloatTensor<Self> {
        let remake = remake.map(|r| r.map(|r| r.map(|t: FloatTensor<Self>| t.primitive)));
        let gemm = if f32_out { Gemm::F32Out } else { Gemm::Plain };
        tracked_matmul_with::<B, C>(lhs, rhs, gemm, remake)
    }

    fn bamba_grad_key(mut t: FloatTensor<Self>) -> FloatTensor<Self> {
        let p = &t.primitive;
        let shape = burn::tensor::Shape::from(vec![1; p.shape().num_dims()]);
        // The same node, a one-element stand-in for the data.
        t.primitive = B::float_zeros(shape, &B::float_device(p), p.dtype().into());
        t
    }
}

/// The tracked SSD output; with `remake`, backward makes `y_off` again
/// from it instead of keeping it.
fn tracked_ssd_out<B: BambaBackend, C: CheckpointStrategy>(
    y_diag: FloatTensor<Autodiff<B, C>>,
    y_off: FloatTensor<Autodiff<B, C>>,
    cs: FloatTensor<Autodiff<B, C>>,
    x: FloatTensor<Autodiff<B, C>>,
    d: FloatTensor<Autodiff<B, C>>,
    remake: Option<Remake<B>>,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = SsdOut
        .prepare::<C>([
            y_diag.node.clone(),
            y_off.node.clone(),
            cs.node.clone(),
            x.node.clone(),
            d.node.clone(),
        ])
        .compute_bound()
        .stateful();
    let yo_shape = y_off.shape();
    let (ydp, yop, csp, xp, dp) = (
        y_diag.primitive,
        y_off.primitive,
        cs.primitive,
        x.primitive,
        d.primitive,
    );
    match prep {
        OpsKind::Tracked(prep) => {
            let out = B::bamba_ssd_out_fwd(ydp, yop.clone(), csp.clone(), xp.clone(), dp.clone());
            let yo = match remake {
                Some(r) => YOff::Remade(r, yo_shape),
                None => YOff::Kept(yop),
            };
            prep.finish((yo, csp, xp, dp), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::bamba_ssd_out(ydp, yop, csp, xp, dp)),
    }
}

/// Which GEMM hook a tracked product runs.
#[derive(Clone, Copy, PartialEq)]
enum Gemm {
    Plain,
    Tf32,
    F32Out,
}

fn tracked_matmul<B: BambaBackend, C: CheckpointStrategy>(
    lhs: FloatTensor<Autodiff<B, C>>,
    rhs: FloatTensor<Autodiff<B, C>>,
    gemm: Gemm,
) -> FloatTensor<Autodiff<B, C>> {
    tracked_matmul_with::<B, C>(lhs, rhs, gemm, [None, None])
}

/// A tracked product; backward makes an operand with a recipe in `remake`
/// (lhs, rhs) again from it instead of keeping it.
fn tracked_matmul_with<B: BambaBackend, C: CheckpointStrategy>(
    lhs: FloatTensor<Autodiff<B, C>>,
    rhs: FloatTensor<Autodiff<B, C>>,
    gemm: Gemm,
    remake: [Option<Remake<B>>; 2],
) -> FloatTensor<Autodiff<B, C>> {
    let mm = match gemm {
        Gemm::Plain => B::bamba_matmul,
        Gemm::Tf32 => B::bamba_matmul_tf32,
        Gemm::F32Out => B::bamba_matmul_f32,
    };
    let tf32 = gemm == Gemm::Tf32;
    let dtype = lhs.primitive.dtype();
    let f32_out = (gemm == Gemm::F32Out && dtype != burn::tensor::DType::F32).then_some(dtype);
    {
        let (ls, rs) = (lhs.shape(), rhs.shape());
        let batch = |s: &burn::tensor::Shape| s[..s.len() - 2].to_vec();
        if batch(&ls) != batch(&rs) {
            // Broadcast batch dims: burn's op sums the gradient over them.
            if gemm == Gemm::F32Out {
                let f32 = |t| Autodiff::<B, C>::float_cast(t, burn::tensor::FloatDType::F32);
                return Autodiff::<B, C>::float_matmul(f32(lhs), f32(rhs));
            }
            return Autodiff::<B, C>::float_matmul(lhs, rhs);
        }
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        let transposed = [
            B::bamba_transposed(&lhs.primitive),
            B::bamba_transposed(&rhs.primitive),
        ];
        match (Matmul::<C> {
            tf32,
            f32_out,
            transposed,
            checkpoint: std::marker::PhantomData,
        })
        .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // Each gradient needs only the *other* operand.
                let [lhs_again, rhs_again] = remake;
                let lhs_state = rhs_tracked.then(|| match lhs_again {
                    Some(r) => Operand::Remade(r, lhs.shape()),
                    None => Operand::Kept(prep.checkpoint(&lhs)),
                });
                let rhs_state = lhs_tracked.then(|| match rhs_again {
                    Some(r) => Operand::Remade(r, rhs.shape()),
                    None => Operand::Kept(prep.checkpoint(&rhs)),
                });
                let out = mm(lhs.primitive, rhs.primitive);
                prep.finish((lhs_state, rhs_state), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(mm(lhs.primitive, rhs.primitive)),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    type B = Autodiff<Flex>;

    /// Slices of one tensor (overlapping, and beside a use of the whole
    /// tensor) get the same gradient as through burn's own `narrow`.
    #[test]
    fn narrow_gradients_accumulate_like_burns() {
        let dev = Default::default();
        let x0 = Tensor::<Flex, 3>::random([2, 5, 9], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<B, 3>::random([2, 5, 9], Distribution::Normal(0.0, 1.0), &dev);
        let grad = |ours: bool| {
            let x = Tensor::<B, 3>::from_inner(x0.clone()).require_grad();
            let cut = |t: Tensor<B, 3>, start, len| {
                if ours {
                    crate::ops::narrow(t, 2, start, len)
                } else {
                    t.narrow(2, start, len)
                }
            };
            let y = (cut(x.clone(), 0, 4) * 2.0).sum()
                + (cut(x.clone(), 3, 6).exp()).sum()
                + (cut(x.clone(), 8, 1) * cut(x.clone(), 0, 1)).sum()
                + (x.clone() * w.clone()).sum();
            let g = y.backward();
            x.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap()
        };
        let (ours, burns) = (grad(true), grad(false));
        for (a, b) in ours.iter().zip(&burns) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
    /// `x @ W^T` with both operands stored transposed: gradients equal
    /// burn's matmul, and each comes out in its operand's own layout (the
    /// weight's row-major, so flattening it needs no copy).
    #[test]
    fn transposed_operands_get_gradients_in_their_layout() {
        let dev = Default::default();
        let x0 = Tensor::<Flex, 2>::random([7, 5], Distribution::Normal(0.0, 1.0), &dev);
        let w0 = Tensor::<Flex, 2>::random([3, 7], Distribution::Normal(0.0, 1.0), &dev);
        let g0 = Tensor::<Flex, 2>::random([5, 3], Distribution::Normal(0.0, 1.0), &dev);
        let run = |ours: bool| {
            let xs = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
            let w = Tensor::<B, 2>::from_inner(w0.clone()).require_grad();
            let (x, wt) = (xs.clone().transpose(), w.clone().transpose());
            let y = if ours {
                crate::ops::matmul(x, wt)
            } else {
                x.matmul(wt)
            };
            let grads = (y * Tensor::from_inner(g0.clone())).sum().backward();
            (xs.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let ((xa, wa), (xb, wb)) = (run(true), run(false));
        let strides = |t: &Tensor<Flex, 2>| {
            t.clone()
                .into_primitive()
                .tensor()
                .layout()
                .strides()
                .to_vec()
        };
        assert_eq!(strides(&wa), vec![7, 1], "weight gradient row-major");
        assert_eq!(
            strides(&xa),
            vec![5, 1],
            "input gradient in its storage layout"
        );
        let close = |a: Vec<f32>, b: Vec<f32>| {
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
        };
        close(
            xa.into_data().to_vec().unwrap(),
            xb.into_data().to_vec().unwrap(),
        );
        close(
            wa.into_data().to_vec().unwrap(),
            wb.into_data().to_vec().unwrap(),
        );
    }

    /// An input shared by two products (the MLP's gate and up projections)
    /// and an elementwise use: its gradient, added into the one registered
    /// before by the second product's GEMM, is burn's.
    #[test]
    fn a_shared_input_accumulates_its_gradient_like_burns() {
        let dev = Default::default();
        let x0 = Tensor::<Flex, 2>::random([6, 5], Distribution::Normal(0.0, 1.0), &dev);
        let w0 = Tensor::<Flex, 2>::random([4, 5], Distribution::Normal(0.0, 1.0), &dev);
        let u0 = Tensor::<Flex, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &dev);
        let run = |ours: bool| {
            let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
            let w = Tensor::<B, 2>::from_inner(w0.clone()).require_grad();
            let u = Tensor::<B, 2>::from_inner(u0.clone());
            let mm = |a: Tensor<B, 2>, b: Tensor<B, 2>| {
                if ours {
                    crate::ops::matmul(a, b)
                } else {
                    a.matmul(b)
                }
            };
            let y = mm(x.clone(), w.clone().transpose()).exp().sum()
                + mm(x.clone(), u.transpose()).powf_scalar(2.0).sum()
                + (x.clone() * 3.0).sum();
            let grads = y.backward();
            (x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let ((xa, wa), (xb, wb)) = (run(true), run(false));
        for (a, b) in [(xa, xb), (wa, wb)] {
            let (a, b) = (
                a.into_data().to_vec::<f32>().unwrap(),
                b.into_data().to_vec::<f32>().unwrap(),
            );
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    /// `grad_seed(y, dy).backward()` gives the gradients of
    /// `sum(y * dy).backward()`, through a graph with a shared input.
    #[test]
    fn grad_seed_backpropagates_dy() {
        let dev = Default::default();
        let x0 = Tensor::<Flex, 2>::random([4, 6], Distribution::Normal(0.0, 1.0), &dev);
        let w0 = Tensor::<Flex, 2>::random([6, 3], Distribution::Normal(0.0, 1.0), &dev);
        let g0 = Tensor::<Flex, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &dev);
        let run = |seed: bool| {
            let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
            let w = Tensor::<B, 2>::from_inner(w0.clone()).require_grad();
            let y = crate::ops::matmul(x.clone().tanh(), w.clone()) + x.clone().narrow(1, 0, 3);
            let dy = Tensor::from_inner(g0.clone());
            let grads = if seed {
                crate::ops::grad_seed(y, dy).backward()
            } else {
                (y * dy).sum().backward()
            };
            let v = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
            (v(x.grad(&grads).unwrap()), v(w.grad(&grads).unwrap()))
        };
        let ((xa, wa), (xb, wb)) = (run(true), run(false));
        for (a, b) in xa.iter().chain(&wa).zip(xb.iter().chain(&wb)) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// A Linear whose FSDP unit is resharded after forward keeps no weight
    /// in its product: backward reads it from the slot that the wrapper
    /// fills (here with the weight doubled, to see that it does), next to a
    /// remade input; the weight's own gradient does not need it.
    #[test]
    fn a_resharded_weight_is_read_from_its_slot_in_backward() {
        use crate::linear::Linear;
        use crate::ops::{Remake, ReshardSlot, with_resharded};
        use burn::module::Param;
        use std::collections::HashMap;

        let dev = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let w0 = Tensor::<Flex, 2>::random([3, 4], normal, &dev);
        let n0 = Tensor::<Flex, 1>::random([4], normal, &dev);
        let x0 = Tensor::<Flex, 3>::random([2, 5, 4], normal, &dev);
        let run = |reshard: bool, doubled: bool| {
            let lin = Linear::<B> {
                weight: Param::from_tensor(Tensor::from_inner(w0.clone()).require_grad()),
                bias: None,
            };
            let x = Tensor::<B, 3>::from_inner(x0.clone()).require_grad();
            let norm_w = Tensor::<B, 1>::from_inner(n0.clone());
            // The input is an RMSNorm's output, made again in backward too.
            let h = crate::ops::rms_norm(x.clone(), None, norm_w.clone(), 1e-6);
            let again = Remake::rms_norm(&x, None, &norm_w, 1e-6);
            let slot = ReshardSlot::new();
            let y = if reshard {
                let weights = HashMap::from([(lin.weight.id, (slot.clone(), 0))]);
                with_resharded(weights, || lin.forward_remade(h, Some(again)))
            } else {
                lin.forward_remade(h, Some(again))
            };
            let scale = if doubled { 2.0 } else { 1.0 };
            slot.fill::<Flex>((w0.clone() * scale).reshape([12]).into_primitive().tensor());
            let grads = (y.clone() * y.detach()).sum().backward();
            let v = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
            let dw = lin
                .weight
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            (v(x.grad(&grads).unwrap()), dw)
        };
        let (dx, dw) = run(false, false);
        for (doubled, k) in [(false, 1.0), (true, 2.0)] {
            let (dx2, dw2) = run(true, doubled);
            for (a, b) in dx2.iter().zip(&dx) {
                assert!(
                    (a - k * b).abs() <= 1e-5 * b.abs().max(1.0),
                    "dx: {a} vs {k} * {b}"
                );
            }
            assert_eq!(
                dw2, dw,
                "the weight's gradient reads the input, not the weight"
            );
        }
    }
}
