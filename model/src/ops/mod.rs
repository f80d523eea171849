//! Backend extension: the operations Bamba routes to hand-picked kernels.
//!
//! burn's backends expose one `matmul`; on CUDA its kernels reach a fraction
//! of cuBLAS (and run f32 as TF32), so the model calls [`matmul`] instead,
//! which a backend may override. This is burn's "backend extension" pattern:
//! every backend the project runs on implements [`BambaBackend`] (CPU keeps
//! burn's kernels), `Autodiff<B>` derives the gradients from the inner
//! backend's op (see `autodiff.rs`), and the CUDA backend calls cuBLAS on
//! burn's own device memory (`cublas.rs`).

mod autodiff;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
pub mod fused;
#[cfg(feature = "cuda")]
pub mod nvrtc;
mod pieces;
pub mod reference;
mod remake;
#[cfg(feature = "cuda")]
mod to_host;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, Slice, Tensor, TensorMetadata, TensorPrimitive};

pub use pieces::{
    attention, causal_softmax, chunk_cumsum, conv1d_silu, cross_entropy_rows, dt_softplus,
    embedding, end_decay, rms_norm, rope, scale_heads, scale_rows, ssd_diag, ssd_out,
    ssd_out_chunks, ssd_states, swiglu,
};
pub(crate) use remake::resharded_weight;
pub use remake::{
    Remake, ReshardSlot, Side, group_products, matmul_f32_remade, matmul_remade,
    matmul_remade_both, with_resharded,
};

/// A burn backend with Bamba's kernel hooks. Defaults are burn's own ops.
pub trait BambaBackend: Backend {
    /// `lhs [.., m, k] @ rhs [.., k, n]`, batch dims equal or broadcast as in burn.
    fn bamba_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// [`BambaBackend::bamba_matmul`] where f32 may run as TF32 (10-bit
    /// mantissa products, f32 accumulation): the SSD scan's products in bf16
    /// training, as mamba_ssm's kernels compute them in bf16.
    fn bamba_matmul_tf32(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::bamba_matmul(lhs, rhs)
    }

    /// `acc + lhs @ rhs`: a gradient added to the one registered before it
    /// (an input shared by two products: the MLP's gate and up
    /// projections). A backend may add inside the GEMM.
    fn bamba_matmul_acc(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let product = Self::bamba_matmul(lhs, rhs);
        Self::float_add(acc, product)
    }

    /// [`BambaBackend::bamba_matmul`] (or [`BambaBackend::bamba_matmul_f32`]
    /// with `f32_out`) where an operand with a recipe in `remake` (lhs,
    /// rhs) is made again in backward: autodiff keeps the recipe, not the
    /// operand (see [`Remake`]).
    fn bamba_matmul_remade(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        _remake: [Option<Remake<Self>>; 2],
        f32_out: bool,
    ) -> FloatTensor<Self> {
        if f32_out {
            Self::bamba_matmul_f32(lhs, rhs)
        } else {
            Self::bamba_matmul(lhs, rhs)
        }
    }

    /// [`BambaBackend::bamba_matmul`] of operands of one dtype with the
    /// product in f32 (bf16 operands, f32 accumulation and output: the SSD's
    /// chunk-state products, as mamba_ssm's kernels compute them).
    fn bamba_matmul_f32(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let f32 = |t| Self::float_cast(t, burn::tensor::FloatDType::F32);
        Self::bamba_matmul(f32(lhs), f32(rhs))
    }

    /// The f32 tensors `ts`, concatenated, copied into `out` (their total
    /// length) by a faster path than burn's `into_data` where the backend
    /// has one: `false` (nothing written) where it has none or it failed,
    /// and the caller reads them the plain way.
    fn bamba_read_f32(_ts: Vec<FloatTensor<Self>>, _out: &mut [f32]) -> bool {
        false
    }

    /// `t` for looking up its gradient only: an autodiff backend keeps the
    /// graph node and drops the data (FSDP frees a unit's gathered
    /// parameters after its forward but collects their gradients after its
    /// backward). Elsewhere `t` itself.
    fn bamba_grad_key(t: FloatTensor<Self>) -> FloatTensor<Self> {
        t
    }

    /// Whether the backend has the fused kernels below (`bamba_rms_norm*`);
    /// the model uses burn's ops otherwise.
    fn bamba_fused() -> bool {
        false
    }

    /// `w * rmsnorm(x)`, or Mamba2's gated `w * rmsnorm(x * silu(z))`, over
    /// the last dim, statistics in f32, in `x`'s dtype (`z`, `w` the same).
    /// Only called when [`BambaBackend::bamba_fused`].
    fn bamba_rms_norm(
        x: FloatTensor<Self>,
        z: Option<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        Self::bamba_rms_norm_fwd(x, z, w, eps).0
    }

    /// The forward kernel: the output and the f32 `[rows]` inverse RMS.
    fn bamba_rms_norm_fwd(
        _x: FloatTensor<Self>,
        _z: Option<FloatTensor<Self>>,
        _w: FloatTensor<Self>,
        _eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused RMSNorm (bamba_fused() is false)")
    }

    /// The backward kernel: `(dx, dz, dw)`; `dw` in f32. `acc`, when given,
    /// is added into `dx` (`x`'s gradient from its other consumers: the
    /// residual stream's, which would otherwise cost a separate add).
    fn bamba_rms_norm_bwd(
        _dout: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _z: Option<FloatTensor<Self>>,
        _w: FloatTensor<Self>,
        _rstd: FloatTensor<Self>,
        _acc: Option<FloatTensor<Self>>,
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        FloatTensor<Self>,
    ) {
        unimplemented!("this backend has no fused RMSNorm (bamba_fused() is false)")
    }

    /// `silu(causal_depthwise_conv(x))`, `x [b, l, c]`, `w [c, 1, k]`, in
    /// `x`'s dtype. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_conv1d_silu(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        Self::bamba_conv1d_silu_fwd(x, w, bias)
    }

    fn bamba_conv1d_silu_fwd(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused conv (bamba_fused() is false)")
    }

    /// `(dx, dw, db)`, the last two in f32.
    fn bamba_conv1d_silu_bwd(
        _dy: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _bias: Option<FloatTensor<Self>>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
    ) {
        unimplemented!("this backend has no fused conv (bamba_fused() is false)")
    }

    /// Mamba2's time step, `clamp(softplus(raw + bias), lo, hi)` in f32, for
    /// `raw [b, l, h]` and `bias [h]`. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_dt_softplus(
        raw: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        lo: f64,
        hi: f64,
    ) -> FloatTensor<Self> {
        Self::bamba_dt_softplus_fwd(raw, bias, lo, hi)
    }

    fn bamba_dt_softplus_fwd(
        _raw: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _lo: f64,
        _hi: f64,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused dt (bamba_fused() is false)")
    }

    /// `(draw, dbias)`, the bias gradient in f32.
    fn bamba_dt_softplus_bwd(
        _grad: FloatTensor<Self>,
        _raw: FloatTensor<Self>,
        _bias: FloatTensor<Self>,
        _lo: f64,
        _hi: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused dt (bamba_fused() is false)")
    }

    /// `x * a[head]` for `x [b, l, h, ..]`, `a [h]`, in `x`'s dtype. Only
    /// called when [`BambaBackend::bamba_fused`].
    fn bamba_scale_heads(x: FloatTensor<Self>, a: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::bamba_scale_heads_fwd(x, a)
    }

    fn bamba_scale_heads_fwd(_x: FloatTensor<Self>, _a: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused per-head scale (bamba_fused() is false)")
    }

    /// `(dx, da)`, `da` in f32.
    fn bamba_scale_heads_bwd(
        _grad: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _a: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused per-head scale (bamba_fused() is false)")
    }

    /// Prefix sums along dim 2 of `x [b, nc, q, h]` in f32 (each chunk on
    /// its own), suffix sums when `reverse`. Only called when
    /// [`BambaBackend::bamba_fused`].
    fn bamba_chunk_cumsum(_x: FloatTensor<Self>, _reverse: bool) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused chunk cumsum (bamba_fused() is false)")
    }

    /// `dt * exp(cs[.., q - 1, :] - cs)` for `dt`, `cs` `[b, nc, q, h]` in
    /// f32. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_end_decay(dt: FloatTensor<Self>, cs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::bamba_end_decay_fwd(dt, cs)
    }

    fn bamba_end_decay_fwd(_dt: FloatTensor<Self>, _cs: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused end decay (bamba_fused() is false)")
    }

    /// `(ddt, dcs)` in f32.
    fn bamba_end_decay_bwd(
        _grad: FloatTensor<Self>,
        _dt: FloatTensor<Self>,
        _cs: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused end decay (bamba_fused() is false)")
    }

    /// Per-row `lse(logits) - logits[target] + z * lse^2` in f32, `logits
    /// [rows, vocab]`, `targets [rows]`. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        z: f64,
    ) -> FloatTensor<Self> {
        Self::bamba_cross_entropy_fwd(logits, targets, z).0
    }

    /// The per-row loss and `lse`.
    fn bamba_cross_entropy_fwd(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _z: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused cross-entropy (bamba_fused() is false)")
    }

    /// `dlogits` for the per-row upstream gradient.
    fn bamba_cross_entropy_bwd(
        _grad: FloatTensor<Self>,
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _lse: FloatTensor<Self>,
        _z: f64,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused cross-entropy (bamba_fused() is false)")
    }

    /// Causal softmax of attention scores `[.., l, l]` scaled by `scale`, in
    /// the scores' dtype. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        Self::bamba_causal_softmax_fwd(scores, scale)
    }

    fn bamba_causal_softmax_fwd(_scores: FloatTensor<Self>, _scale: f64) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused softmax (bamba_fused() is false)")
    }

    /// `dscores` from `dprobs` and the forward's output.
    fn bamba_causal_softmax_bwd(
        _dprobs: FloatTensor<Self>,
        _probs: FloatTensor<Self>,
        _scale: f64,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused softmax (bamba_fused() is false)")
    }

    /// Rotary embeddings of `x [b, l, heads, d]` by `cos`/`sin [l, rd]`
    /// (f32 tables, no gradient), in `x`'s dtype. Only called when
    /// [`BambaBackend::bamba_fused`].
    fn bamba_rope(
        _x: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused rope (bamba_fused() is false)")
    }

    /// `dx` from `dy`: the rotation transposed.
    fn bamba_rope_bwd(
        _dy: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused rope (bamba_fused() is false)")
    }

    /// Whether [`BambaBackend::bamba_flash_attention`] serves bf16 heads of
    /// `head_dim` (the eager softmax path runs otherwise).
    fn bamba_flash_head_dim(_head_dim: usize) -> bool {
        false
    }

    /// Causal attention `softmax(q k^T * scale) v` with grouped KV heads,
    /// without the `[l, l]` matrix: `q [b, l, hq, d]`, `k`, `v [b, l, hk, d]`
    /// in bf16 -> `[b, l, hq, d]`. Only called when
    /// [`BambaBackend::bamba_flash_head_dim`] is true.
    fn bamba_flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::bamba_flash_attention_fwd(q, k, v, scale).0
    }

    /// `(out, lse)`: the output and the per-row log-sum-exp its backward reads.
    fn bamba_flash_attention_fwd(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no flash attention")
    }

    /// `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn bamba_flash_attention_bwd(
        _dout: FloatTensor<Self>,
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no flash attention")
    }

    /// The token embedding `weight[ids]`: `[vocab, d]`, `[b, l]` -> `[b, l, d]`.
    /// Only called when [`BambaBackend::bamba_fused`] (its autodiff takes the
    /// weight gradient from [`BambaBackend::bamba_embedding_bwd`]).
    fn bamba_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        Self::embedding(weight, ids)
    }

    /// The weight gradient `[vocab, d]` of [`BambaBackend::bamba_embedding`]
    /// for the upstream `dy [b, l, d]`: row `v` sums, in position order, the
    /// rows of `dy` whose id is `v` (deterministic: no atomics).
    fn bamba_embedding_bwd(
        _dy: FloatTensor<Self>,
        _ids: IntTensor<Self>,
        _vocab: usize,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused embedding (bamba_fused() is false)")
    }

    /// SwiGLU's `silu(g) * u`, in `g`'s dtype. Only called when
    /// [`BambaBackend::bamba_fused`].
    fn bamba_swiglu(g: FloatTensor<Self>, u: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::bamba_swiglu_fwd(g, u)
    }

    fn bamba_swiglu_fwd(_g: FloatTensor<Self>, _u: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused SwiGLU (bamba_fused() is false)")
    }

    /// `(dg, du)`.
    fn bamba_swiglu_bwd(
        _dy: FloatTensor<Self>,
        _g: FloatTensor<Self>,
        _u: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused SwiGLU (bamba_fused() is false)")
    }

    /// The SSD's intra-chunk product `y [b, nc, q, h, p]` in f32:
    /// `y_i = sum_{j <= i} exp(cs_i - cs_j) S[g(h)]_{ij} dt_j x_j` per chunk
    /// and head, from scores `C B^T` `S [b, nc, g, q, q]`, cumulative
    /// log-decays `cs [b, nc, q, h]` and time steps `dt [b, nc, q, h]` (f32),
    /// and `x [b, nc, q, h, p]` (f32 or bf16, read as it is); the products as
    /// TF32 when `tf32`. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_ssd_diag(
        scores: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        dt: FloatTensor<Self>,
        x: FloatTensor<Self>,
        tf32: bool,
    ) -> FloatTensor<Self> {
        Self::bamba_ssd_diag_fwd(scores, cs, dt, x, tf32)
    }

    fn bamba_ssd_diag_fwd(
        _scores: FloatTensor<Self>,
        _cs: FloatTensor<Self>,
        _dt: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _tf32: bool,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused SSD scan (bamba_fused() is false)")
    }

    /// `(dscores, dcs, ddt, dx)`, `dx` in `x`'s dtype (plus `acc`, x's
    /// gradient from its other consumers, when given).
    #[allow(clippy::type_complexity)]
    fn bamba_ssd_diag_bwd(
        _dy: FloatTensor<Self>,
        _scores: FloatTensor<Self>,
        _cs: FloatTensor<Self>,
        _dt: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _tf32: bool,
        _acc: Option<FloatTensor<Self>>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unimplemented!("this backend has no fused SSD scan (bamba_fused() is false)")
    }

    /// The SSD state entering each chunk, `E [b, nc, n, h, p]`: `E_0 = 0`,
    /// `E_c = exp(a_{c-1}) E_{c-1} + S_{c-1}` from the chunks' own states
    /// `S [b, nc, n, h, p]` and log-decays `a [b, nc, h]`, computed in f32
    /// and stored in `out`. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_ssd_states(
        s: FloatTensor<Self>,
        a: FloatTensor<Self>,
        out: DType,
    ) -> FloatTensor<Self> {
        Self::bamba_ssd_states_fwd(s, a, out)
    }

    fn bamba_ssd_states_fwd(
        _s: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _out: DType,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused SSD scan (bamba_fused() is false)")
    }

    /// `(ds, da)` from the upstream gradient, `a` and the forward's output
    /// (`ds` in f32).
    fn bamba_ssd_states_bwd(
        _de: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _e: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused SSD scan (bamba_fused() is false)")
    }

    /// `x * s[.., None]` in f32, `s` (f32) shaped as `x` without its last
    /// dim; `x` f32 or bf16. Only called when [`BambaBackend::bamba_fused`].
    fn bamba_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::bamba_scale_rows_fwd(x, s)
    }

    fn bamba_scale_rows_fwd(_x: FloatTensor<Self>, _s: FloatTensor<Self>) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused row scale (bamba_fused() is false)")
    }

    /// `(dx, ds)`: `dx` in `x`'s dtype (plus `acc`, x's gradient from its
    /// other consumers, when given), `ds` in f32.
    fn bamba_scale_rows_bwd(
        _g: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _s: FloatTensor<Self>,
        _acc: Option<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unimplemented!("this backend has no fused row scale (bamba_fused() is false)")
    }

    /// The SSD scan's output `y_diag + exp(cs) * y_off + D[head] x`, in
    /// `x`'s dtype (`x [.., h, p]`, `p` even, `cs` one value per row of `p`).
    /// Only called when [`BambaBackend::bamba_fused`].
    fn bamba_ssd_out(
        y_diag: FloatTensor<Self>,
        y_off: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::bamba_ssd_out_fwd(y_diag, y_off, cs, x, d)
    }

    /// [`BambaBackend::bamba_ssd_out`] where `y_off` is `remake`'s output
    /// (reshaped): autodiff keeps the recipe, not `y_off`.
    fn bamba_ssd_out_remade(
        y_diag: FloatTensor<Self>,
        y_off: FloatTensor<Self>,
        cs: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
        _remake: Remake<Self>,
    ) -> FloatTensor<Self> {
        Self::bamba_ssd_out(y_diag, y_off, cs, x, d)
    }

    fn bamba_ssd_out_fwd(
        _y_diag: FloatTensor<Self>,
        _y_off: FloatTensor<Self>,
        _cs: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _d: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unimplemented!("this backend has no fused SSD output (bamba_fused() is false)")
    }

    /// `(dy_diag, dy_off, dcs, dx, dd)`. `dy_diag` may be the output
    /// gradient as it is, in `x`'s dtype (exact: `y_diag` adds in unscaled);
    /// [`Self::bamba_ssd_diag_bwd`] takes `dy` in f32 or `x`'s dtype.
    #[allow(clippy::type_complexity)]
    fn bamba_ssd_out_bwd(
        _g: FloatTensor<Self>,
        _y_off: FloatTensor<Self>,
        _cs: FloatTensor<Self>,
        _x: FloatTensor<Self>,
        _d: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        unimplemented!("this backend has no fused SSD output (bamba_fused() is false)")
    }

    /// `t[.., start .. start + len, ..]` along `dim`. Under autodiff its
    /// gradient is added into that slice of the parent's gradient, so the
    /// splits of one tensor (the Mamba mixer's `in_proj` output) cost one
    /// zero-filled gradient instead of one each plus their sum.
    fn bamba_narrow(
        t: FloatTensor<Self>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> FloatTensor<Self> {
        Self::float_slice(t.clone(), &narrow_slices(&t.shape(), dim, start, len))
    }

    /// `t` reshaped; a backend may return a view where burn's reshape would
    /// copy (the last dim of a column slice split in two: the Mamba mixer's
    /// `x` inside the conv output). Gradients flow as through a reshape.
    fn bamba_reshape_view(t: FloatTensor<Self>, shape: burn::tensor::Shape) -> FloatTensor<Self> {
        Self::float_reshape(t, shape)
    }

    /// Zeros in row-major (unpitched) storage: the gradient buffer that
    /// [`Self::bamba_add_narrow`] fills in place. (cubecl pads the rows of
    /// `float_zeros` to 256 bytes, so a bf16 `[.., 8512]` buffer would not
    /// be contiguous, and every slice would copy it.)
    fn bamba_zeros(
        shape: burn::tensor::Shape,
        device: &burn::tensor::Device<Self>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        Self::float_zeros(shape, device, dtype.into())
    }

    /// `full` with `part` added into `full.narrow(dim, start, part.dims[dim])`:
    /// the gradient of a narrow, accumulated into its parent's gradient
    /// (several slices of one tensor share one gradient buffer).
    fn bamba_add_narrow(
        full: FloatTensor<Self>,
        part: FloatTensor<Self>,
        dim: usize,
        start: usize,
    ) -> FloatTensor<Self> {
        let slices = narrow_slices(&full.shape(), dim, start, part.shape()[dim]);
        let sum = Self::float_add(Self::float_slice(full.clone(), &slices), part);
        Self::float_slice_assign(full, &slices, sum)
    }

    /// A `[1]` tensor whose gradient with respect to `y` is `dy` (a given
    /// upstream gradient): `grad_seed(y, dy).backward()` backpropagates `dy`
    /// through `y`'s graph, as torch's `y.backward(dy)`. Its value is
    /// `sum(y * dy)`, which autodiff backends skip (nothing reads it), so
    /// the layer-by-layer backward pays no product and no reduction.
    fn bamba_grad_seed(y: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        let flat = |t: FloatTensor<Self>| {
            let n = t.shape().num_elements();
            Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(Self::float_reshape(
                t,
                [n].into(),
            )))
        };
        let (y, dy) = (flat(y), flat(dy));
        (y * dy).sum().into_primitive().tensor()
    }

    /// `[1]`: the sum of squares of a flat `[len]` tensor given as pieces
    /// at offsets (zeros between), in f32 (gradient norms).
    fn bamba_sum_squares(parts: Vec<(FloatTensor<Self>, usize)>, len: usize) -> FloatTensor<Self> {
        let x = Self::bamba_pack(parts, len, None, DType::F32);
        let x = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(x));
        x.powi_scalar(2).sum().into_primitive().tensor()
    }

    /// Whether the last two dims of `t` lie transposed in memory (a
    /// `transpose()` view of a row-major matrix). The GEMM backward then
    /// writes that operand's gradient in the same layout, so a linear
    /// layer's weight gradient comes out `[out, in]` row-major, as the
    /// weight, and flattens without a copy.
    fn bamba_transposed(_t: &FloatTensor<Self>) -> bool {
        false
    }

    /// `acc + zeros [len]` with each `(part, offset)` added at its offset:
    /// gathering a unit's parameter gradients (any float dtype, any shape,
    /// read flat) into its flat buffer in one pass per part. The sum is f32;
    /// without `acc` the buffer is `dtype` (bf16 only for bf16 parts: a copy).
    fn bamba_pack(
        parts: Vec<(FloatTensor<Self>, usize)>,
        len: usize,
        acc: Option<FloatTensor<Self>>,
        dtype: DType,
    ) -> FloatTensor<Self> {
        let device = parts
            .first()
            .map(|(p, _)| Self::float_device(p))
            .or_else(|| acc.as_ref().map(Self::float_device))
            .expect("pack: nothing to pack");
        let dtype = if acc.is_some() { DType::F32 } else { dtype };
        let mut out = acc
            .map(|a| Self::float_cast(a, DType::F32.into()))
            .unwrap_or_else(|| Self::float_zeros([len].into(), &device, dtype.into()));
        for (part, offset) in parts {
            let n = part.shape().num_elements();
            let part = Self::float_reshape(Self::float_cast(part, dtype.into()), [n].into());
            let range = [Slice::new(offset as isize, Some((offset + n) as isize), 1)];
            let sum = Self::float_add(Self::float_slice(out.clone(), &range), part);
            out = Self::float_slice_assign(out, &range, sum);
        }
        out
    }

    /// One AdamW update of flat f32 tensors in a single pass, where the
    /// backend has a kernel for it (`None`: the caller runs the tensor ops):
    /// `[param, exp_avg, exp_avg_sq]`, and the new parameter in bf16 when
    /// the state asks for it.
    #[allow(clippy::type_complexity)]
    fn bamba_adamw(
        _state: AdamWState<Self>,
        _hyper: &AdamWHyper,
    ) -> Option<([FloatTensor<Self>; 3], Option<FloatTensor<Self>>)> {
        None
    }
}

/// What one fused AdamW update reads: parameter, gradient, the two moments,
/// where weight decay does not apply, and an optional `[1]` gradient scale
/// (the clipping coefficient, kept on the device).
pub struct AdamWState<B: Backend> {
    pub param: FloatTensor<B>,
    /// The gradient as `(piece, offset)`: one flat buffer at 0, or the
    /// parameters' own gradients where they lie (zeros between).
    pub grad: Vec<(FloatTensor<B>, usize)>,
    pub exp_avg: FloatTensor<B>,
    pub exp_avg_sq: FloatTensor<B>,
    /// Element ranges `[start, end)` without weight decay (at most
    /// [`NO_DECAY_MAX`]); everything else decays.
    pub no_decay: Vec<(usize, usize)>,
    pub grad_scale: Option<FloatTensor<B>>,
    /// Also write the new parameter rounded to bf16 (the compute copy FSDP
    /// gathers), saving a separate cast pass over the f32 weights.
    pub bf16_copy: bool,
}

/// How many no-decay ranges a fused AdamW launch takes (kernel arguments).
pub const NO_DECAY_MAX: usize = 16;

/// How many gradient pieces the fused AdamW and sum of squares read in
/// place (kernel arguments; more are packed into one buffer first).
pub const GRAD_PARTS_MAX: usize = 16;

/// A unit's flat gradient `[len]`: one buffer, or its parameters' own
/// gradients at their offsets (zeros between), which the fused optimizer
/// reads where they lie: on one GPU nothing needs a flat buffer.
#[derive(Clone)]
pub enum FlatGrad<B: Backend> {
    Buffer(Tensor<B, 1>),
    Parts {
        parts: Vec<(Tensor<B, 1>, usize)>,
        len: usize,
    },
}

impl<B: BambaBackend> FlatGrad<B> {
    pub fn len(&self) -> usize {
        match self {
            Self::Buffer(t) => t.dims()[0],
            Self::Parts { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As one buffer: the parts packed (bf16 if they all are, else f32).
    pub fn into_buffer(self) -> Tensor<B, 1> {
        match self {
            Self::Buffer(t) => t,
            Self::Parts { parts, len } => {
                let bf16 = !parts.is_empty() && parts.iter().all(|p| p.0.dtype() == DType::BF16);
                pack(
                    parts,
                    len,
                    None,
                    if bf16 { DType::BF16 } else { DType::F32 },
                )
            }
        }
    }

    /// `(piece, offset)` primitives and the length.
    pub fn into_parts(self) -> (Vec<(FloatTensor<B>, usize)>, usize) {
        let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
        match self {
            Self::Buffer(t) => {
                let len = t.dims()[0];
                (vec![(prim(t), 0)], len)
            }
            Self::Parts { parts, len } => {
                (parts.into_iter().map(|(t, o)| (prim(t), o)).collect(), len)
            }
        }
    }

    /// `[1]`: the sum of squares, in f32.
    pub fn sum_squares(&self) -> Tensor<B, 1> {
        let (parts, len) = self.clone().into_parts();
        Tensor::from_primitive(TensorPrimitive::Float(B::bamba_sum_squares(parts, len)))
    }
}

/// AdamW's scalars for one step, bias corrections folded in.
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    /// `lr / (1 - beta1^t)`
    pub lr_bc1: f64,
    /// `1 / sqrt(1 - beta2^t)`
    pub inv_sqrt_bc2: f64,
    pub eps: f64,
    /// `lr * weight_decay`
    pub lr_wd: f64,
}

/// A training backend: autodiff over a [`BambaBackend`], itself one too, so
/// that both the tracked model and its `valid()` copy use the hooks.
pub trait BambaAutodiffBackend: AutodiffBackend<InnerBackend: BambaBackend> + BambaBackend {}

impl<B> BambaAutodiffBackend for B
where
    B: AutodiffBackend + BambaBackend,
    B::InnerBackend: BambaBackend,
{
}

/// Matrix product through the backend's GEMM hook (see [`BambaBackend`]).
/// Operands of different dtypes (bf16 activations meeting the f32 parts of
/// the SSD scan) are multiplied in f32, as PyTorch's type promotion would.
pub fn matmul<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    let (lhs, rhs) = if lhs.dtype() != rhs.dtype() {
        (lhs.cast(DType::F32), rhs.cast(DType::F32))
    } else {
        (lhs, rhs)
    };
    let out = B::bamba_matmul(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`matmul`] with the product in f32 (see [`BambaBackend::bamba_matmul_f32`]):
/// bf16 operands stay bf16; f32 ones multiply in full precision.
pub fn matmul_f32<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    if lhs.dtype() != rhs.dtype() || lhs.dtype() == DType::F32 {
        return matmul(lhs.cast(DType::F32), rhs.cast(DType::F32));
    }
    let out = B::bamba_matmul_f32(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// [`matmul`] in f32 that may run as TF32 (see [`BambaBackend::bamba_matmul_tf32`]).
pub fn matmul_tf32<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    let (lhs, rhs) = (lhs.cast(DType::F32), rhs.cast(DType::F32));
    let out = B::bamba_matmul_tf32(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The sum of squares of a flat tensor, `[1]`, in f32.
pub fn sum_squares<B: BambaBackend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    FlatGrad::Buffer(x).sum_squares()
}

/// `acc + zeros [len]` with each `(part, offset)` added flat at its offset,
/// in f32; without `acc`, a `dtype` buffer (see [`BambaBackend::bamba_pack`]).
pub fn pack<B: BambaBackend, const D: usize>(
    parts: Vec<(Tensor<B, D>, usize)>,
    len: usize,
    acc: Option<Tensor<B, 1>>,
    dtype: DType,
) -> Tensor<B, 1> {
    for (p, offset) in &parts {
        assert!(
            offset + p.shape().num_elements() <= len,
            "pack: a part of {:?} at {offset} overruns {len}",
            p.dims()
        );
    }
    let parts = parts
        .into_iter()
        .map(|(p, o)| (p.into_primitive().tensor(), o))
        .collect();
    let acc = acc.map(|a| {
        assert_eq!(a.dims(), [len], "pack: accumulator length");
        a.into_primitive().tensor()
    });
    Tensor::from_primitive(TensorPrimitive::Float(B::bamba_pack(
        parts, len, acc, dtype,
    )))
}

impl BambaBackend for burn::backend::Flex {
    fn bamba_transposed(t: &FloatTensor<Self>) -> bool {
        let l = t.layout();
        let (shape, strides) = (l.shape(), l.strides());
        let d = shape.num_dims();
        d >= 2 && shape[d - 2] > 1 && shape[d - 1] > 1 && strides[d - 2] == 1 && strides[d - 1] > 1
    }
}

/// The slices of `narrow(dim, start, len)` on a tensor of `shape`.
pub(crate) fn narrow_slices(shape: &Shape, dim: usize, start: usize, len: usize) -> Vec<Slice> {
    (0..shape.num_dims())
        .map(|d| {
            if d == dim {
                Slice::new(start as isize, Some((start + len) as isize), 1)
            } else {
                Slice::new(0, Some(shape[d] as isize), 1)
            }
        })
        .collect()
}

/// A `[1]` tensor whose backward sends `dy` into `y`'s graph (see
/// [`BambaBackend::bamba_grad_seed`]): `grad_seed(y, dy).backward()`.
pub fn grad_seed<B: BambaBackend, const D: usize>(
    y: Tensor<B, D>,
    dy: Tensor<B, D>,
) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(B::bamba_grad_seed(
        y.into_primitive().tensor(),
        dy.into_primitive().tensor(),
    )))
}

/// [`Tensor::narrow`] through [`BambaBackend::bamba_narrow`] (one gradient
/// buffer shared by all the slices of a tensor).
pub fn narrow<B: BambaBackend, const D: usize>(
    t: Tensor<B, D>,
    dim: usize,
    start: usize,
    len: usize,
) -> Tensor<B, D> {
    assert!(
        dim < D && start + len <= t.dims()[dim],
        "narrow({dim}, {start}, {len}) of {:?}",
        t.dims()
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::bamba_narrow(
        t.into_primitive().tensor(),
        dim,
        start,
        len,
    )))
}

/// `t` reshaped to `shape`, as a view where the backend can make one (see
/// [`BambaBackend::bamba_reshape_view`]).
pub fn reshape_view<B: BambaBackend, const D: usize, const D2: usize>(
    t: Tensor<B, D>,
    shape: [usize; D2],
) -> Tensor<B, D2> {
    assert_eq!(
        t.shape().num_elements(),
        shape.iter().product::<usize>(),
        "reshape_view of {:?} to {shape:?}",
        t.dims()
    );
    Tensor::from_primitive(TensorPrimitive::Float(B::bamba_reshape_view(
        t.into_primitive().tensor(),
        shape.into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn pack_places_parts_zeroes_gaps_and_accumulates() {
        let dev = Default::default();
        let a = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &dev);
        let b = Tensor::<Flex, 2>::from_floats([[5.0, 6.0]], &dev);
        let packed = pack(vec![(b.clone(), 6), (a.clone(), 1)], 9, None, DType::F32);
        let want = [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 5.0, 6.0, 0.0];
        assert_eq!(packed.to_data().to_vec::<f32>().unwrap(), want);
        let twice = pack(
            vec![(a.clone(), 1), (b.clone(), 6)],
            9,
            Some(packed),
            DType::BF16,
        );
        assert_eq!(twice.dtype(), DType::F32, "a sum is f32");
        let want2: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert_eq!(twice.to_data().to_vec::<f32>().unwrap(), want2);
        // A bf16 buffer of bf16 parts: a copy, the same values.
        let (a, b) = (a.cast(DType::BF16), b.cast(DType::BF16));
        let lp = pack(vec![(a, 1), (b, 6)], 9, None, DType::BF16);
        assert_eq!(lp.dtype(), DType::BF16);
        assert_eq!(lp.cast(DType::F32).to_data().to_vec::<f32>().unwrap(), want);
    }

    /// A gradient given as pieces (gaps read as zeros) is the packed buffer:
    /// the same values, the same sum of squares.
    #[test]
    fn flat_grad_parts_read_as_their_packed_buffer() {
        let dev = Default::default();
        let a = Tensor::<Flex, 1>::from_floats([1.0, -2.0, 3.0], &dev);
        let b = Tensor::<Flex, 1>::from_floats([0.5, 4.0], &dev);
        let parts = FlatGrad::Parts {
            parts: vec![(b.clone(), 6), (a.clone(), 1)],
            len: 9,
        };
        assert_eq!(parts.len(), 9);
        let want = [0.0, 1.0, -2.0, 3.0, 0.0, 0.0, 0.5, 4.0, 0.0];
        let ss: f32 = parts.sum_squares().into_scalar();
        assert_eq!(ss, want.iter().map(|v| v * v).sum::<f32>());
        let buf = parts.into_buffer();
        assert_eq!(buf.to_data().to_vec::<f32>().unwrap(), want);
        let ss2: f32 = FlatGrad::Buffer(buf).sum_squares().into_scalar();
        assert_eq!(ss, ss2);
    }
}
