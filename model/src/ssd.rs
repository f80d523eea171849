//! The chunked SSD algorithm of Mamba2 (Dao & Gu 2024, "Transformers are
//! SSMs", listing 1; HF's `torch_forward`), as batched matmuls. Pure math on
//! burn tensors: it runs on any backend and autodiff differentiates it.
//!
//! Per head the recurrence is `h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`,
//! `y_t = C_t h_t`. Inside a chunk of Q steps it is a masked (causal) matrix
//! product; chunk-final states carry across chunks by the same decay.

use crate::ops::{
    BambaBackend, Remake, Side, chunk_cumsum, end_decay, group_products, matmul_f32,
    matmul_f32_remade, reshape_view, scale_heads, scale_rows, ssd_diag, ssd_out, ssd_out_chunks,
    ssd_states,
};
use burn::tensor::{DType, Tensor};

/// `y` of the SSM with its `D x` skip, computed in f32, returned in `x`'s
/// dtype.
///
/// * `x`: `[b, l, h, p]` inputs per head
/// * `dt`: `[b, l, h]` time steps (after softplus and clamp)
/// * `a`: `[h]` negative decay rates (`-exp(A_log)`)
/// * `bm`, `cm`: `[b, l, g, n]`; group `g` serves heads `g*h/G .. (g+1)*h/G`
/// * `d`: `[h]` skip weights
///
/// Any `l` works: the sequence is zero-padded to a multiple of `chunk` and
/// cropped after (padding adds nothing to earlier positions: causal).
///
/// Everything stays in the input's layout, cut into chunks in place
/// (`[b, nc, q, ..]`): a group's heads are one matrix `[q, hg * p]` that
/// its `B` and `C` (`[q, n]`) multiply directly, so no operand is permuted
/// into a per-head copy, and the per-head `[q, q]` decay matrices exist only
/// inside [`ssd_diag`].
///
/// With `remake`, backward makes the decayed inputs (the chunk states'
/// operand) and the entering states' part again instead of keeping them
/// (see [`Remake`]): about a fifth less memory a Mamba layer.
#[allow(clippy::too_many_arguments)]
pub fn ssd_chunked<B: BambaBackend>(
    x: Tensor<B, 4>,
    dt: Tensor<B, 3>,
    a: Tensor<B, 1>,
    bm: Tensor<B, 4>,
    cm: Tensor<B, 4>,
    d: Tensor<B, 1>,
    chunk: usize,
    remake: bool,
) -> Tensor<B, 4> {
    let [b, l, h, p] = x.dims();
    let [_, _, g, n] = bm.dims();
    let hg = h / g;
    let dtype = x.dtype();
    // In bf16 training the chunk products take bf16 operands (B, C, the
    // decayed x, the entering states) with f32 accumulation, as mamba_ssm's
    // kernels do; scores and states come out in f32, the entering states'
    // contribution in bf16. f32 keeps full precision for HF parity.
    let fast = dtype != DType::F32;
    let (bm, cm) = (bm.cast(dtype), cm.cast(dtype));
    let (dt, a) = (dt.cast(DType::F32), a.cast(DType::F32));

    let q = chunk;
    let pad = (q - l % q) % q;
    let nc = (l + pad) / q;

    // Discretise (A dt) and cut into chunks: [b, nc, q, ..]. `x dt` is never
    // stored: dt scales the decay matrix's columns inside `ssd_diag` and the
    // rows' weights of the chunk states, and `x` stays in its own dtype.
    let unpadded = (pad > 0).then(|| x.clone());
    let x = reshape_view(pad_seq(x, pad), [b, nc, q, h, p]);
    // Cumulative log-decay within each chunk.
    let cs = chunk_cumsum(pad_seq(scale_heads(dt.clone(), a), pad).reshape([b, nc, q, h]));
    let dt = pad_seq(dt, pad).reshape([b, nc, q, h]);
    let bm = pad_seq(bm, pad).reshape([b, nc, q, g * n]);
    let cm = pad_seq(cm, pad).reshape([b, nc, q, g * n]);
    // Group `gi`'s B or C, [b, nc, q, n], and its heads' columns of a
    // [b, nc, r, h * p] tensor.
    let group = |t: &Tensor<B, 4>, gi: usize| cols(t.clone(), gi * n, n);
    let heads = |t: &Tensor<B, 4>, gi: usize| cols(t.clone(), gi * hg * p, hg * p);

    // 1. Within each chunk: y_i = sum_{j <= i} exp(cs_i - cs_j) (C_i . B_j) x_j,
    //    with C B^T once per group.
    let scores = per_group(g, 2, |gi| {
        matmul_f32(group(&cm, gi), group(&bm, gi).swap_dims(2, 3)).unsqueeze_dim::<5>(2)
    }); // [b, nc, g, q, q] f32
    let y_diag = ssd_diag(scores, cs.clone(), dt.clone(), x.clone(), fast);

    // 2. The state each chunk leaves behind, from its own inputs only:
    //    sum_j exp(cs_last - cs_j) dt_j B_j x_j^T, per group [b, nc, n, hg * p].
    let cs_last = cs.clone().narrow(2, q - 1, 1); // [b, nc, 1, h]
    let decay = end_decay(dt, cs.clone());
    let x_end = scale_rows(x.clone(), decay.clone()).reshape([b, nc, q, h * p]);
    let states = per_group(g, 3, |gi| {
        let (bt, xe) = (group(&bm, gi).swap_dims(2, 3), heads(&x_end, gi));
        if remake {
            let again = Remake::scale_rows(&x, &decay, gi, g);
            matmul_f32_remade(bt, xe, again, Side::Rhs)
        } else {
            matmul_f32(bt, xe)
        }
    }); // [b, nc, n, h * p] f32
    drop(x_end);

    // 3. Carry states across chunks, per head: the state entering chunk c.
    let entering = ssd_states(
        states.reshape([b, nc, n, h, p]),
        cs_last.reshape([b, nc, h]),
        dtype,
    )
    .reshape([b, nc, n, h * p]);

    // 4. What the entering state contributes: exp(cs_i) C_i . state, added
    //    to the intra-chunk part together with the skip D x.
    let y_off = group_products(cm.clone(), entering.clone(), g).reshape([b, nc, q, h, p]);
    match unpadded {
        Some(x) => ssd_out(y_diag, y_off, cs, x, d),
        // The skip term reads the same view as the products: x's three
        // gradients add up inside the backward kernels.
        None => {
            let again = remake.then(|| Remake::group_products(&cm, &entering, g));
            ssd_out_chunks(y_diag, y_off, cs, x, d, again).reshape([b, l, h, p])
        }
    }
}

/// Columns `start .. start + len` of the last dim; the whole tensor as is
/// (a full-width `narrow` would cost a zero-filled gradient in backward).
fn cols<B: BambaBackend>(t: Tensor<B, 4>, start: usize, len: usize) -> Tensor<B, 4> {
    if start == 0 && len == t.dims()[3] {
        t
    } else {
        crate::ops::narrow(t, 3, start, len)
    }
}

/// `f(group)` for each group, concatenated along `dim` (one group: as is).
fn per_group<B: BambaBackend, const D: usize>(
    g: usize,
    dim: usize,
    f: impl Fn(usize) -> Tensor<B, D>,
) -> Tensor<B, D> {
    if g == 1 {
        return f(0);
    }
    Tensor::cat((0..g).map(f).collect(), dim)
}

/// Zero-pads dim 1 (the sequence) by `pad` steps.
fn pad_seq<B: BambaBackend, const D: usize>(x: Tensor<B, D>, pad: usize) -> Tensor<B, D> {
    if pad == 0 {
        return x;
    }
    let mut shape = x.dims();
    shape[1] = pad;
    let zeros = Tensor::<B, D>::zeros(shape, &x.device()).cast(x.dtype());
    Tensor::cat(vec![x, zeros], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    /// The recurrence stepped one token at a time, in f64 on the host.
    fn sequential(
        x: &[f32],
        dt: &[f32],
        a: &[f32],
        bm: &[f32],
        cm: &[f32],
        skip: &[f32],
        dims: [usize; 6],
    ) -> Vec<f64> {
        let [b, l, h, p, g, n] = dims;
        let mut y = vec![0f64; b * l * h * p];
        for bi in 0..b {
            for hi in 0..h {
                let gi = hi / (h / g);
                let mut state = vec![0f64; p * n];
                for t in 0..l {
                    let d = dt[(bi * l + t) * h + hi] as f64;
                    let decay = (d * a[hi] as f64).exp();
                    for pi in 0..p {
                        let xv = x[((bi * l + t) * h + hi) * p + pi] as f64;
                        let mut acc = 0.0;
                        for ni in 0..n {
                            let bv = bm[((bi * l + t) * g + gi) * n + ni] as f64;
                            let cv = cm[((bi * l + t) * g + gi) * n + ni] as f64;
                            let s = &mut state[pi * n + ni];
                            *s = decay * *s + d * bv * xv;
                            acc += cv * *s;
                        }
                        y[((bi * l + t) * h + hi) * p + pi] = acc + skip[hi] as f64 * xv;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn chunked_scan_equals_the_recurrence_for_any_length() {
        let dev = Default::default();
        let (b, h, p, g, n) = (2, 4, 3, 2, 5);
        for (l, chunk) in [(13, 4), (16, 4), (3, 8), (1, 4)] {
            let x = Tensor::<B, 4>::random([b, l, h, p], Distribution::Normal(0.0, 1.0), &dev);
            let dt = Tensor::<B, 3>::random([b, l, h], Distribution::Uniform(0.01, 0.5), &dev);
            let a = Tensor::<B, 1>::random([h], Distribution::Uniform(-4.0, -0.5), &dev);
            let bm = Tensor::<B, 4>::random([b, l, g, n], Distribution::Normal(0.0, 1.0), &dev);
            let cm = Tensor::<B, 4>::random([b, l, g, n], Distribution::Normal(0.0, 1.0), &dev);
            let d = Tensor::<B, 1>::random([h], Distribution::Normal(0.0, 1.0), &dev);
            let v = |t: TensorData| t.to_vec::<f32>().unwrap();
            let want = sequential(
                &v(x.to_data()),
                &v(dt.to_data()),
                &v(a.to_data()),
                &v(bm.to_data()),
                &v(cm.to_data()),
                &v(d.to_data()),
                [b, l, h, p, g, n],
            );
            let got = v(ssd_chunked(x, dt, a, bm, cm, d, chunk, false).into_data());
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-4, "l={l} chunk={chunk}: max error {err}");
        }
    }
}
