//! The chunked SSD algorithm of Mamba2 (Dao & Gu 2024, "Transformers are
//! SSMs", listing 1; HF's `torch_forward`), as batched matmuls. Pure math on
//! burn tensors: it runs on any backend and autodiff differentiates it.
//!
//! Per head the recurrence is `h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`,
//! `y_t = C_t h_t`. Inside a chunk of Q steps it is a masked (causal) matrix
//! product; chunk-final states carry across chunks by the same decay.

use crate::ops::{BambaBackend, masked_decay, matmul, matmul_tf32, scale_heads, segsum_exp};
use burn::tensor::{DType, Tensor};

/// `y` of the SSM (without the `D x` skip), computed in f32.
///
/// * `x`: `[b, l, h, p]` inputs per head
/// * `dt`: `[b, l, h]` time steps (after softplus and clamp)
/// * `a`: `[h]` negative decay rates (`-exp(A_log)`)
/// * `bm`, `cm`: `[b, l, g, n]`; group `g` serves heads `g*h/G .. (g+1)*h/G`
///
/// Any `l` works: the sequence is zero-padded to a multiple of `chunk` and
/// cropped after (padding adds nothing to earlier positions: causal).
pub fn ssd_chunked<B: BambaBackend>(
    x: Tensor<B, 4>,
    dt: Tensor<B, 3>,
    a: Tensor<B, 1>,
    bm: Tensor<B, 4>,
    cm: Tensor<B, 4>,
    chunk: usize,
) -> Tensor<B, 4> {
    let [b, l, h, p] = x.dims();
    let [_, _, g, n] = bm.dims();
    let hg = h / g;
    let dtype = x.dtype();
    // bf16 training multiplies in TF32 (mamba_ssm's kernels use bf16 here);
    // f32 keeps full precision for HF parity.
    let fast = dtype != DType::F32;
    let f32 = |t: Tensor<B, 4>| t.cast(DType::F32);
    let (x, bm, cm) = (f32(x), f32(bm), f32(cm));
    let (dt, a) = (dt.cast(DType::F32), a.cast(DType::F32));

    let q = chunk;
    let pad = (q - l % q) % q;
    let nc = (l + pad) / q;

    // Discretise: x dt and A dt.
    let x = x * dt.clone().unsqueeze_dim::<4>(3);
    let adt = scale_heads(dt, a);

    // Heads and chunks become batch dims: x, A dt per head as [b, h, chunk,
    // step, ..]; B and C stay per group, [b, chunk, group, step, n], and
    // meet the heads of their group as one wider matrix [.., step, hg * p]
    // (no copy of B and C per head).
    let x = pad_seq(x, pad)
        .reshape([b, nc, q, h, p])
        .permute([0, 3, 1, 2, 4]); // [b, h, nc, q, p]
    let adt = pad_seq(adt, pad)
        .reshape([b, nc, q, h])
        .permute([0, 3, 1, 2]); // [b, h, nc, q]
    let per_group = |t: Tensor<B, 4>| -> Tensor<B, 5> {
        pad_seq(t, pad)
            .reshape([b, nc, q, g, n])
            .permute([0, 1, 3, 2, 4])
    };
    let (bm, cm) = (per_group(bm), per_group(cm)); // [b, nc, g, q, n]
    // [b, h, nc, r, p] <-> [b, nc, g, r, hg * p]
    let to_groups = |t: Tensor<B, 5>, r: usize| -> Tensor<B, 5> {
        t.reshape([b, g, hg, nc, r, p])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, nc, g, r, hg * p])
    };
    let to_heads = |t: Tensor<B, 5>, r: usize| -> Tensor<B, 5> {
        t.reshape([b, nc, g, r, hg, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, h, nc, r, p])
    };

    let a_cumsum = adt.cumsum(3); // [b, h, nc, q]

    // 1. Within each chunk: (C B^T o L) x, L the causal decay matrix; C B^T
    //    once per group, broadcast over the group's heads.
    let scores = mm(cm.clone(), bm.clone().swap_dims(3, 4), fast); // [b, nc, g, q, q]
    let masked = masked_decay(a_cumsum.clone(), scores); // [b, h, nc, q, q]
    let y_diag = mm(masked, x.clone(), fast); // [b, h, nc, q, p]

    // 2. The state each chunk leaves behind, from its own inputs only.
    let a_last = a_cumsum.clone().narrow(3, q - 1, 1); // [b, h, nc, 1]
    let decay_to_end = (a_last.clone() - a_cumsum.clone()).exp();
    let x_end = to_groups(x * decay_to_end.unsqueeze_dim::<5>(4), q);
    let states = to_heads(mm(bm.swap_dims(3, 4), x_end, fast), n); // [b, h, nc, n, p]

    // 3. Carry states across chunks: the state entering chunk c.
    let device = states.device();
    let states = Tensor::cat(
        vec![
            Tensor::zeros([b, h, 1, n * p], &device),
            states.reshape([b, h, nc, n * p]),
        ],
        2,
    );
    let chunk_a = Tensor::cat(
        vec![
            Tensor::zeros([b, h, 1], &device),
            a_last.reshape([b, h, nc]),
        ],
        2,
    );
    let chunk_decay = segsum_exp::<B, 3, 4>(chunk_a); // [b, h, nc+1, nc+1]
    let carried = mm(chunk_decay, states, fast);
    let entering = carried.narrow(2, 0, nc).reshape([b, h, nc, n, p]);

    // 4. What the entering state contributes to each step of the chunk.
    let y_off =
        to_heads(mm(cm, to_groups(entering, n), fast), q) * a_cumsum.exp().unsqueeze_dim::<5>(4);

    (y_diag + y_off)
        .permute([0, 2, 3, 1, 4])
        .reshape([b, nc * q, h, p])
        .narrow(1, 0, l)
        .cast(dtype)
}

/// `a @ b`, as TF32 when `fast`.
fn mm<B: BambaBackend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    fast: bool,
) -> Tensor<B, D> {
    if fast {
        matmul_tf32(a, b)
    } else {
        matmul(a, b)
    }
}

/// Zero-pads dim 1 (the sequence) by `pad` steps.
fn pad_seq<B: BambaBackend, const D: usize>(x: Tensor<B, D>, pad: usize) -> Tensor<B, D> {
    if pad == 0 {
        return x;
    }
    let mut shape = x.dims();
    shape[1] = pad;
    let zeros = Tensor::zeros(shape, &x.device());
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
                        y[((bi * l + t) * h + hi) * p + pi] = acc;
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
            let v = |t: TensorData| t.to_vec::<f32>().unwrap();
            let want = sequential(
                &v(x.to_data()),
                &v(dt.to_data()),
                &v(a.to_data()),
                &v(bm.to_data()),
                &v(cm.to_data()),
                [b, l, h, p, g, n],
            );
            let got = v(ssd_chunked(x, dt, a, bm, cm, chunk).into_data());
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-4, "l={l} chunk={chunk}: max error {err}");
        }
    }
}
