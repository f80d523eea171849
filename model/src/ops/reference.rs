//! The fused pieces written with burn's ops: what runs on backends without
//! the kernels (CPU), and what the kernels are checked against
//! (`bamba-train bench --kernels`).

use burn::tensor::activation::{silu, softmax, softplus};
use burn::tensor::{Bool, DType, Int, Tensor};

use super::BambaBackend;

/// `x * rsqrt(mean(x^2) + eps)` over the last dim.
fn rms<B: BambaBackend>(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let var = x.clone().powi_scalar(2).mean_dim(2);
    x * (var + eps).sqrt().recip()
}

/// See [`super::rms_norm`]: computed in f32, cast back before the weight
/// multiplies it (HF's order).
pub fn rms_norm<B: BambaBackend>(
    x: Tensor<B, 3>,
    z: Option<Tensor<B, 3>>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 3> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let x = match z {
        Some(z) => x * silu(z.cast(DType::F32)),
        None => x,
    };
    rms(x, eps).cast(dtype) * w.unsqueeze::<3>()
}

/// See [`super::conv1d_silu`]. As `k` shifted multiply-adds on the
/// `[b, l, c]` layout rather than a grouped convolution: the same math,
/// elementwise both ways (burn 0.21's CUDA depthwise-conv backward took 2 s
/// per layer at 4k tokens).
pub fn conv1d_silu<B: BambaBackend>(
    x: Tensor<B, 3>,
    w: Tensor<B, 3>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 3> {
    let [b, l, c] = x.dims();
    let k = w.dims()[2];
    let w = w.reshape([c, k]);
    let pad = Tensor::<B, 3>::zeros([b, k - 1, c], &x.device()).cast(x.dtype());
    let xp = Tensor::cat(vec![pad, x], 1);
    let tap = |j: usize| xp.clone().narrow(1, j, l) * w.clone().narrow(1, j, 1).reshape([1, 1, c]);
    let mut y = tap(0);
    for j in 1..k {
        y = y + tap(j);
    }
    let y = match bias {
        Some(bias) => y + bias.reshape([1, 1, c]),
        None => y,
    };
    silu(y)
}

/// See [`super::dt_softplus`].
pub fn dt_softplus<B: BambaBackend>(
    raw: Tensor<B, 3>,
    bias: Tensor<B, 1>,
    lo: f64,
    hi: f64,
) -> Tensor<B, 3> {
    let h = bias.dims()[0];
    let s = raw + bias.reshape([1, 1, h]);
    // torch's bf16 softplus computes in f32 and rounds once.
    let dtype = s.dtype();
    let dt = softplus(s.cast(DType::F32), 1.0).cast(dtype);
    // (0, inf) is HF's "no limit"; softplus is already > 0.
    let dt = if lo > 0.0 || hi.is_finite() {
        dt.clamp(lo, hi)
    } else {
        dt
    };
    dt.cast(DType::F32)
}

/// See [`super::scale_heads`].
pub fn scale_heads<B: BambaBackend, const D: usize>(
    x: Tensor<B, D>,
    a: Tensor<B, 1>,
) -> Tensor<B, D> {
    let mut shape = [1; D];
    shape[2] = a.dims()[0];
    let dtype = x.dtype();
    (x * a.reshape(shape)).cast(dtype)
}

/// See [`super::end_decay`].
pub fn end_decay<B: BambaBackend>(dt: Tensor<B, 4>, cs: Tensor<B, 4>) -> Tensor<B, 4> {
    let q = cs.dims()[2];
    dt * (cs.clone().narrow(2, q - 1, 1) - cs).exp()
}

/// See [`super::chunk_cumsum`].
pub fn chunk_cumsum<B: BambaBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.cast(DType::F32).cumsum(2)
}

/// Row-wise `log(sum(exp(x)))` of `[rows, v]`, shifted by the row max for range.
pub fn logsumexp<B: BambaBackend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1).detach();
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// See [`super::cross_entropy_rows`]: in f32 on an upcast copy of the logits.
pub fn cross_entropy_rows<B: BambaBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    z: f64,
) -> Tensor<B, 1> {
    let [rows, _] = logits.dims();
    let logits = logits.cast(DType::F32);
    let lse = logsumexp(logits.clone());
    let picked = logits.gather(1, targets.reshape([rows, 1]));
    let loss = lse.clone() - picked;
    let loss = if z > 0.0 {
        loss + lse.powi_scalar(2) * z
    } else {
        loss
    };
    loss.reshape([rows])
}

/// See [`super::causal_softmax`] (HF's eager attention: scale in the
/// scores' dtype, softmax in f32, cast back).
pub fn causal_softmax<B: BambaBackend>(scores: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
    let [b, h, l, _] = scores.dims();
    let dtype = scores.dtype();
    let scores = scores * scale;
    // burn's tril_mask is true above the diagonal: exactly the future keys.
    let future = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &scores.device())
        .unsqueeze::<4>()
        .expand([b, h, l, l]);
    // The mask is -inf, so rows never see the future.
    softmax(
        scores.cast(DType::F32).mask_fill(future, f32::NEG_INFINITY),
        3,
    )
    .cast(dtype)
}

/// See [`super::rope`]: HF's `apply_rotary_pos_emb` (tables cast to x's
/// dtype, the products and the sum in it).
pub fn rope<B: BambaBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [_, _, _, hd] = x.dims();
    let [l, rd] = cos.dims();
    let dtype = x.dtype();
    let table = |t: Tensor<B, 2>| t.reshape([1, l, 1, rd]).cast(dtype);
    let (cos, sin) = (table(cos), table(sin));
    let rot = x.clone().narrow(3, 0, rd);
    let rotated = rot.clone() * cos + rotate_half(rot) * sin;
    if rd == hd {
        rotated
    } else {
        Tensor::cat(vec![rotated, x.narrow(3, rd, hd - rd)], 3)
    }
}

/// `[x1, x2] -> [-x2, x1]` over the last dim.
fn rotate_half<B: BambaBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, d);
    let x2 = x.narrow(3, d, d);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// See [`super::attention`]: HF's eager attention with `softmax` for the
/// probabilities (this module's, or the fused one in [`super::attention`]).
pub fn attention_with<B: BambaBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    softmax: impl Fn(Tensor<B, 4>, f64) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let rep = q.dims()[2] / k.dims()[2];
    let heads = |t: Tensor<B, 4>| t.swap_dims(1, 2);
    let (k, v) = (repeat_kv(heads(k), rep), repeat_kv(heads(v), rep));
    let probs = softmax(super::matmul(heads(q), k.swap_dims(2, 3)), scale);
    super::matmul(probs, v).swap_dims(1, 2)
}

/// See [`super::attention`].
pub fn attention<B: BambaBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    attention_with(q, k, v, scale, causal_softmax)
}

/// `[b, kv, l, d] -> [b, kv * rep, l, d]`, each KV head serving `rep` query heads.
fn repeat_kv<B: BambaBackend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, kv, l, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, rep, l, d])
        .reshape([b, kv * rep, l, d])
}

/// `out[.., i, j] = x[j+1] + .. + x[i]` for `j <= i`, `-inf` above the
/// diagonal: the log-decay from step `j` to step `i`. As a difference of one
/// cumulative sum (one pass over `[.., t, t]`) rather than HF's cumsum of the
/// masked `[.., t, t]` expansion, which costs `t` passes on the GPU; in f32 the
/// difference stays within the parity tolerances (tests/parity.rs).
pub fn segsum<B: BambaBackend, const D: usize, const D2: usize>(x: Tensor<B, D>) -> Tensor<B, D2> {
    let mut shape = [0; D2];
    shape[..D].copy_from_slice(&x.dims());
    let t = shape[D - 1];
    shape[D] = t;
    let device = x.device();
    let upper = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device)
        .unsqueeze::<D2>()
        .expand(shape);
    let cs = x.cumsum(D - 1);
    let to = cs.clone().unsqueeze_dim::<D2>(D); // [.., i, 1]
    let from = cs.unsqueeze_dim::<D2>(D - 1); // [.., 1, j]
    (to - from).mask_fill(upper, f32::NEG_INFINITY)
}

/// See [`super::swiglu`].
pub fn swiglu<B: BambaBackend>(g: Tensor<B, 3>, u: Tensor<B, 3>) -> Tensor<B, 3> {
    silu(g) * u
}

/// The SSD's masked intra-chunk matrix `M [b, h, nc, q, q]`,
/// `exp(cs_i - cs_j) S[g(h)]_{ij}` for `j <= i`, else 0, from `cs [b, h, nc, q]`
/// and the group scores `S [b, nc, g, q, q]`: the decay as one cumulative-sum
/// difference, masked, exponentiated, times the scores broadcast over the
/// group's heads.
pub fn masked_decay<B: BambaBackend>(cs: Tensor<B, 4>, scores: Tensor<B, 5>) -> Tensor<B, 5> {
    let [b, h, nc, q] = cs.dims();
    let g = scores.dims()[2];
    let upper = Tensor::<B, 2, Bool>::tril_mask([q, q], 0, &cs.device())
        .unsqueeze::<5>()
        .expand([b, h, nc, q, q]);
    let to = cs.clone().unsqueeze_dim::<5>(4); // [.., i, 1]
    let from = cs.unsqueeze_dim::<5>(3); // [.., 1, j]
    let decay = (to - from).mask_fill(upper, f32::NEG_INFINITY).exp();
    let scores = scores.permute([0, 2, 1, 3, 4]).unsqueeze_dim::<6>(2); // [b, g, 1, nc, q, q]
    (decay.reshape([b, g, h / g, nc, q, q]) * scores).reshape([b, h, nc, q, q])
}

/// See [`super::ssd_diag`]: the masked matrix per head, then a batched product.
pub fn ssd_diag<B: BambaBackend>(
    scores: Tensor<B, 5>,
    cs: Tensor<B, 4>,
    dt: Tensor<B, 4>,
    x: Tensor<B, 5>,
) -> Tensor<B, 5> {
    let x = scale_rows_f32(x, dt);
    let m = masked_decay(cs.permute([0, 3, 1, 2]), scores); // [b, h, nc, q, q]
    crate::ops::matmul(m, x.permute([0, 3, 1, 2, 4])).permute([0, 2, 3, 1, 4])
}

/// See [`super::ssd_states`]: the recurrence as one product per head with
/// the chunk-to-chunk decay matrix (`segsum`), as HF's `torch_forward`.
pub fn ssd_states<B: BambaBackend>(s: Tensor<B, 5>, a: Tensor<B, 3>) -> Tensor<B, 5> {
    let [b, nc, n, h, p] = s.dims();
    let device = s.device();
    let s = Tensor::cat(
        vec![
            Tensor::zeros([b, h, 1, n * p], &device),
            s.permute([0, 3, 1, 2, 4]).reshape([b, h, nc, n * p]),
        ],
        2,
    );
    let a = Tensor::cat(
        vec![Tensor::zeros([b, h, 1], &device), a.swap_dims(1, 2)],
        2,
    );
    let decay = segsum::<B, 3, 4>(a).exp(); // [b, h, nc + 1, nc + 1]
    crate::ops::matmul(decay, s)
        .narrow(2, 0, nc)
        .reshape([b, h, nc, n, p])
        .permute([0, 2, 3, 1, 4])
}

/// See [`super::scale_rows`].
pub fn scale_rows<B: BambaBackend, const D: usize, const D1: usize>(
    x: Tensor<B, D>,
    s: Tensor<B, D1>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    scale_rows_f32(x, s).cast(dtype)
}

/// `x * s[.., None]` in f32.
fn scale_rows_f32<B: BambaBackend, const D: usize, const D1: usize>(
    x: Tensor<B, D>,
    s: Tensor<B, D1>,
) -> Tensor<B, D> {
    x.cast(DType::F32) * s.cast(DType::F32).unsqueeze_dim::<D>(D1)
}

/// See [`super::ssd_out`].
pub fn ssd_out<B: BambaBackend>(
    y_diag: Tensor<B, 5>,
    y_off: Tensor<B, 5>,
    cs: Tensor<B, 4>,
    x: Tensor<B, 4>,
    d: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let y = y_diag.cast(DType::F32) + scale_rows_f32(y_off, cs.exp());
    unchunk(y, x.dims()[1]).cast(x.dtype()) + scale_heads(x, d)
}

/// `[b, nc, q, ..]` chunks as `[b, nc * q, ..]`, cropped to the first `l`
/// steps (the scan pads the sequence to whole chunks).
pub fn unchunk<B: BambaBackend, const D: usize, const D1: usize>(
    t: Tensor<B, D>,
    l: usize,
) -> Tensor<B, D1> {
    let s = t.dims();
    let mut shape = [0; D1];
    shape[0] = s[0];
    shape[1] = s[1] * s[2];
    shape[2..].copy_from_slice(&s[3..]);
    let t = t.reshape(shape);
    if shape[1] > l { t.narrow(1, 0, l) } else { t }
}
