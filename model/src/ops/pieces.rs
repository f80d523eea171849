//! The Mamba2 pieces with fused kernels: each runs the backend's kernel
//! where it has one ([`BambaBackend::bamba_fused`]) and burn's ops
//! ([`super::reference`]) elsewhere.

use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::{BambaBackend, reference};

fn float<B: BambaBackend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `w * rmsnorm(x)`, or Mamba2's gated `w * rmsnorm(x * silu(z))`, over the
/// last dim, statistics in f32, output in `x`'s dtype.
pub fn rms_norm<B: BambaBackend>(
    x: Tensor<B, 3>,
    z: Option<Tensor<B, 3>>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let same = x.dtype() == w.dtype() && z.as_ref().is_none_or(|z| z.dtype() == w.dtype());
    if !(B::bamba_fused() && same) {
        return reference::rms_norm(x, z, w, eps);
    }
    let p = |t: Tensor<B, 3>| t.into_primitive().tensor();
    float(B::bamba_rms_norm(
        p(x),
        z.map(p),
        w.into_primitive().tensor(),
        eps,
    ))
}

/// `silu(causal_depthwise_conv(x))`, `x [b, l, c]`, `w [c, 1, k]`.
pub fn conv1d_silu<B: BambaBackend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 3>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 3> {
    if !B::bamba_fused() {
        return reference::conv1d_silu(x, w, bias);
    }
    let x = if x.dtype() == w.dtype() {
        x
    } else {
        x.cast(w.dtype())
    };
    float(B::bamba_conv1d_silu(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
    ))
}

/// Mamba2's time step `clamp(softplus(raw + bias), lo, hi)`, in f32.
pub fn dt_softplus<B: BambaBackend>(
    raw: Tensor<B, 3>,
    bias: Tensor<B, 1>,
    lo: f64,
    hi: f64,
) -> Tensor<B, 3> {
    if !B::bamba_fused() {
        return reference::dt_softplus(raw, bias, lo, hi);
    }
    float(B::bamba_dt_softplus(
        raw.into_primitive().tensor(),
        bias.into_primitive().tensor(),
        lo,
        hi,
    ))
}

/// `x * a[head]` for `x [b, l, h, ..]` and `a [h]`, in `x`'s dtype.
pub fn scale_heads<B: BambaBackend, const D: usize>(
    x: Tensor<B, D>,
    a: Tensor<B, 1>,
) -> Tensor<B, D> {
    if !B::bamba_fused() {
        return reference::scale_heads(x, a);
    }
    float(B::bamba_scale_heads(
        x.into_primitive().tensor(),
        a.into_primitive().tensor(),
    ))
}

/// Prefix sums along dim 2 of `x [b, nc, q, h]` in f32, each chunk on its
/// own (the SSD's cumulative log-decays).
pub fn chunk_cumsum<B: BambaBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    if !B::bamba_fused() {
        return reference::chunk_cumsum(x);
    }
    let x = x.cast(burn::tensor::DType::F32);
    float(B::bamba_chunk_cumsum(x.into_primitive().tensor(), false))
}

/// `dt * exp(cs[.., q - 1, :] - cs)` for `dt`, `cs` `[b, nc, q, h]`, in
/// f32: each step's decay to the end of its chunk, times its dt (the
/// weights of the chunk-final SSD states).
pub fn end_decay<B: BambaBackend>(dt: Tensor<B, 4>, cs: Tensor<B, 4>) -> Tensor<B, 4> {
    let f32 = |t: Tensor<B, 4>| t.cast(burn::tensor::DType::F32);
    let (dt, cs) = (f32(dt), f32(cs));
    if !B::bamba_fused() {
        return reference::end_decay(dt, cs);
    }
    float(B::bamba_end_decay(
        dt.into_primitive().tensor(),
        cs.into_primitive().tensor(),
    ))
}

/// Per-row next-token loss `lse - logits[target] + z * lse^2` in f32, for
/// `logits [rows, vocab]` and `targets [rows]`.
pub fn cross_entropy_rows<B: BambaBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    z: f64,
) -> Tensor<B, 1> {
    if !B::bamba_fused() {
        return reference::cross_entropy_rows(logits, targets, z);
    }
    float(B::bamba_cross_entropy(
        logits.into_primitive().tensor(),
        targets.into_primitive(),
        z,
    ))
}

/// The token embedding `weight[ids]` (`[vocab, d]`, `[b, l]` -> `[b, l, d]`);
/// on fused backends its weight gradient sums each id's rows in position
/// order in one kernel (deterministic; burn's scatter took 1.5 ms per
/// 4096 tokens of a 128k-row table).
pub fn embedding<B: BambaBackend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    if !B::bamba_fused() {
        return burn::tensor::module::embedding(weight, ids);
    }
    float(B::bamba_embedding(
        weight.into_primitive().tensor(),
        ids.into_primitive(),
    ))
}

/// Attention probabilities `softmax(scores * scale)` over keys `j <= i` for
/// `scores [b, heads, l, l]`, computed in f32, in the scores' dtype.
pub fn causal_softmax<B: BambaBackend>(scores: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    if !B::bamba_fused() {
        return reference::causal_softmax(scores, scale);
    }
    float(B::bamba_causal_softmax(
        scores.into_primitive().tensor(),
        scale,
    ))
}

/// Rotary embeddings (GPT-NeoX's rotate_half) of `x [b, l, heads, d]` on
/// its first `rd` dims, by `cos`/`sin [l, rd]` (f32, from `rope_tables`).
pub fn rope<B: BambaBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    if !B::bamba_fused() {
        return reference::rope(x, cos, sin);
    }
    float(B::bamba_rope(
        x.into_primitive().tensor(),
        cos.into_primitive().tensor(),
        sin.into_primitive().tensor(),
    ))
}

/// Causal attention with grouped KV heads: `q [b, l, hq, d]`,
/// `k`, `v [b, l, hk, d]` -> `[b, l, hq, d]`, `softmax(q k^T * scale) v`
/// over keys `j <= i`. Flash attention where the backend has it for this
/// dtype and head dim; else HF's eager path (scores, f32 softmax, product).
pub fn attention<B: BambaBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let d = q.dims()[3];
    let bf16 = [&q, &k, &v]
        .iter()
        .all(|t| t.dtype() == burn::tensor::DType::BF16);
    if B::bamba_fused() && bf16 && B::bamba_flash_head_dim(d) {
        let p = |t: Tensor<B, 4>| t.into_primitive().tensor();
        return float(B::bamba_flash_attention(p(q), p(k), p(v), scale));
    }
    reference::attention_with(q, k, v, scale, causal_softmax)
}

/// SwiGLU's gate `silu(g) * u` (the MLP's `act(gate_proj(x)) * up_proj(x)`).
pub fn swiglu<B: BambaBackend>(g: Tensor<B, 3>, u: Tensor<B, 3>) -> Tensor<B, 3> {
    if !(B::bamba_fused() && g.dtype() == u.dtype()) {
        return reference::swiglu(g, u);
    }
    float(B::bamba_swiglu(
        g.into_primitive().tensor(),
        u.into_primitive().tensor(),
    ))
}

/// The SSD's intra-chunk product `y [b, nc, q, h, p]` in f32:
/// `y_i = sum_{j <= i} exp(cs_i - cs_j) S[g(h)]_{ij} dt_j x_j` per chunk and
/// head, from the group scores `C B^T` `S [b, nc, g, q, q]`, the cumulative
/// log-decays `cs [b, nc, q, h]`, the time steps `dt [b, nc, q, h]` and
/// `x [b, nc, q, h, p]`; the products may run as TF32 when `tf32` (bf16
/// training). Fused backends read `x` as it is (bf16 stays bf16) and fold
/// `dt` into the decay matrix: `x dt` is never stored, its gradients come
/// out of the same kernels.
pub fn ssd_diag<B: BambaBackend>(
    scores: Tensor<B, 5>,
    cs: Tensor<B, 4>,
    dt: Tensor<B, 4>,
    x: Tensor<B, 5>,
    tf32: bool,
) -> Tensor<B, 5> {
    if !B::bamba_fused() {
        return reference::ssd_diag(scores, cs, dt, x);
    }
    let p = |t: burn::tensor::TensorPrimitive<B>| t.tensor();
    let f32 = burn::tensor::DType::F32;
    let x = match x.dtype() {
        burn::tensor::DType::F32 | burn::tensor::DType::BF16 => x,
        _ => x.cast(f32),
    };
    float(B::bamba_ssd_diag(
        p(scores.cast(f32).into_primitive()),
        p(cs.cast(f32).into_primitive()),
        p(dt.cast(f32).into_primitive()),
        p(x.into_primitive()),
        tf32,
    ))
}

/// The SSD state entering each chunk (see [`BambaBackend::bamba_ssd_states`]):
/// `S [b, nc, n, h, p]`, `a [b, nc, h]` -> `[b, nc, n, h, p]`, computed in
/// f32 and stored in `out` (bf16 training: the operand of a bf16 product).
pub fn ssd_states<B: BambaBackend>(
    s: Tensor<B, 5>,
    a: Tensor<B, 3>,
    out: burn::tensor::DType,
) -> Tensor<B, 5> {
    if !B::bamba_fused() {
        return reference::ssd_states(s, a).cast(out);
    }
    let f32 = burn::tensor::DType::F32;
    float(B::bamba_ssd_states(
        s.cast(f32).into_primitive().tensor(),
        a.cast(f32).into_primitive().tensor(),
        out,
    ))
}

/// [`ssd_out`] in the chunked layout: `x` and the output `[b, nc, q, h, p]`
/// (nothing padded to crop). The scan passes the same `x` view as to its
/// products, so that x's three gradients add up inside their kernels.
///
/// With `again` (how `y_off` was made), backward makes `y_off` again
/// instead of keeping it.
pub fn ssd_out_chunks<B: BambaBackend>(
    y_diag: Tensor<B, 5>,
    y_off: Tensor<B, 5>,
    cs: Tensor<B, 4>,
    x: Tensor<B, 5>,
    d: Tensor<B, 1>,
    again: Option<super::Remake<B>>,
) -> Tensor<B, 5> {
    let [b, nc, q, h, p] = x.dims();
    if !B::bamba_fused() || p % 2 != 0 {
        let x = x.reshape([b, nc * q, h, p]);
        return reference::ssd_out(y_diag, y_off, cs, x, d).reshape([b, nc, q, h, p]);
    }
    let f32 = burn::tensor::DType::F32;
    let prim =
        |t: Tensor<B, 5>, dtype: burn::tensor::DType| t.cast(dtype).into_primitive().tensor();
    let dtype = x.dtype();
    // A remade y_off must come back as the kernel read it: in x's dtype.
    let again = again.filter(|_| y_off.dtype() == dtype);
    let (yd, yo) = (prim(y_diag, f32), prim(y_off, dtype));
    let cs = cs.cast(f32).into_primitive().tensor();
    let (x, d) = (x.into_primitive().tensor(), d.into_primitive().tensor());
    float(match again {
        Some(r) => B::bamba_ssd_out_remade(yd, yo, cs, x, d, r),
        None => B::bamba_ssd_out(yd, yo, cs, x, d),
    })
}

/// The SSD's output `y [b, l, h, p]` in `x`'s dtype: the intra-chunk part
/// `y_diag` (f32) plus the entering states' part `exp(cs) y_off` (`y_off`
/// read in `x`'s dtype; both `[b, nc, q, h, p]`, `cs [b, nc, q, h]`; chunks padded past `l` are
/// cropped), plus the skip `D[h] x` (`x [b, l, h, p]`). One pass on fused
/// backends, instead of five.
pub fn ssd_out<B: BambaBackend>(
    y_diag: Tensor<B, 5>,
    y_off: Tensor<B, 5>,
    cs: Tensor<B, 4>,
    x: Tensor<B, 4>,
    d: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let [_, l, _, p] = x.dims();
    // (The kernels read pairs: an odd head size takes the reference path.)
    if !B::bamba_fused() || p % 2 != 0 {
        return reference::ssd_out(y_diag, y_off, cs, x, d);
    }
    let f32 = burn::tensor::DType::F32;
    let rows = |t: Tensor<B, 5>, dtype: burn::tensor::DType| {
        reference::unchunk::<B, 5, 4>(t.cast(dtype), l)
    };
    let dtype = x.dtype();
    float(B::bamba_ssd_out(
        rows(y_diag, f32).into_primitive().tensor(),
        rows(y_off, dtype).into_primitive().tensor(),
        reference::unchunk::<B, 4, 3>(cs.cast(f32), l)
            .into_primitive()
            .tensor(),
        x.into_primitive().tensor(),
        d.into_primitive().tensor(),
    ))
}

/// `x * s[.., None]` in `x`'s dtype (the product in f32, rounded once), `s`
/// shaped as `x` without its last dim (a per-row scale with its reduction
/// fused into the backward). In bf16 training the result is a bf16 GEMM
/// operand, as in mamba_ssm's chunk-state kernel.
pub fn scale_rows<B: BambaBackend, const D: usize, const D1: usize>(
    x: Tensor<B, D>,
    s: Tensor<B, D1>,
) -> Tensor<B, D> {
    if !B::bamba_fused() {
        return reference::scale_rows(x, s);
    }
    let f32 = burn::tensor::DType::F32;
    let x = match x.dtype() {
        burn::tensor::DType::F32 | burn::tensor::DType::BF16 => x,
        _ => x.cast(f32),
    };
    float(B::bamba_scale_rows(
        x.into_primitive().tensor(),
        s.cast(f32).into_primitive().tensor(),
    ))
}
