//! Causal softmax of attention scores.

use burn_cubecl::kernel::into_contiguous;

use super::{empty, norm_grid, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// Causal softmax of attention scores `[.., l, l]` (query rows, key
/// columns), one block per row: `softmax(rnd(s * scale))` over keys `j <= i`
/// in f32 (the scaled scores rounded to their dtype first, as HF's eager
/// attention scales in bf16), zeros above the diagonal, probabilities
/// rounded to the scores' dtype. Backward: `scale * p * (dp - sum(dp * p))`.
const SOFTMAX: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == NEG_INF) return;
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

template <typename T>
__device__ void softmax_fwd(const T* scores, T* probs, long long rows, int l, float scale) {
    __shared__ float sm[32], ss[32], stats[2];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int i = (int)(r % l);
        const T* x = scores + r * l;
        float m = NEG_INF, s = 0.0f;
        for (int j = threadIdx.x; j <= i; j += blockDim.x) {
            const float xv = rnd(ld(x, j) * scale, T());
            if (xv > m) { s = s * __expf(m - xv) + 1.0f; m = xv; } else { s += __expf(xv - m); }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        __syncthreads();
        if (lane == 0) { sm[warp] = m; ss[warp] = s; }
        __syncthreads();
        if (threadIdx.x == 0) {
            float M = sm[0], S = ss[0];
            for (int w = 1; w < (int)(blockDim.x >> 5); ++w) lse_merge(M, S, sm[w], ss[w]);
            stats[0] = M;
            stats[1] = 1.0f / S;
        }
        __syncthreads();
        const float M = stats[0], inv = stats[1];
        for (int j = threadIdx.x; j < l; j += blockDim.x) {
            const float p = j <= i ? __expf(rnd(ld(x, j) * scale, T()) - M) * inv : 0.0f;
            st(probs + r * l, j, p);
        }
    }
}

template <typename T>
__device__ void softmax_bwd(const T* dprobs, const T* probs, T* dscores, long long rows, int l, float scale) {
    __shared__ float part[32], total;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int i = (int)(r % l);
        const long long o = r * l;
        float dot = 0.0f;
        for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += ld(dprobs + o, j) * ld(probs + o, j);
        for (int k = 16; k > 0; k >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, k);
        __syncthreads();
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = dot;
        __syncthreads();
        if (threadIdx.x == 0) {
            float t = 0.0f;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
            total = t;
        }
        __syncthreads();
        const float d = total;
        for (int j = threadIdx.x; j < l; j += blockDim.x) {
            const float g = j <= i ? scale * ld(probs + o, j) * (ld(dprobs + o, j) - d) : 0.0f;
            st(dscores + o, j, g);
        }
    }
}

#define SOFTMAX_KERNELS(SUF, T)                                                               \
extern "C" __global__ void softmax_fwd_##SUF(const T* s, T* p, long long rows, int l,        \
                                             float scale) {                                   \
    softmax_fwd<T>(s, p, rows, l, scale);                                                     \
}                                                                                             \
extern "C" __global__ void softmax_bwd_##SUF(const T* dp, const T* p, T* ds, long long rows,  \
                                             int l, float scale) {                            \
    softmax_bwd<T>(dp, p, ds, rows, l, scale);                                                \
}
SOFTMAX_KERNELS(f32, float)
SOFTMAX_KERNELS(bf16, bf16_t)
"#;

fn softmax_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, SOFTMAX)
}

fn square_rows(t: &T) -> (usize, usize) {
    let s = t.meta.shape();
    let d = s.len();
    assert!(
        d >= 2 && s[d - 1] == s[d - 2],
        "causal softmax: scores must be [.., l, l]"
    );
    let l = s[d - 1];
    (s.num_elements() / l.max(1), l)
}

/// Causal softmax probabilities, in the scores' dtype.
pub fn causal_softmax_fwd(scores: T, scale: f64) -> T {
    let (rows, l) = square_rows(&scores);
    let dtype = scores.dtype;
    let scores = into_contiguous(scores);
    let probs = empty(&scores, scores.meta.shape().to_vec(), dtype);
    if rows == 0 {
        return probs;
    }
    let device = scores.device.index;
    let f = nvrtc::function(
        device,
        "softmax",
        &softmax_src(),
        &format!("softmax_fwd_{}", suffix(dtype)),
    );
    enqueue([&probs, &scores], move |[mut p_p, mut s_p], stream| {
        let (mut rows64, mut l32, mut sc) = (rows as i64, l as i32, scale as f32);
        let mut params = kernel_args!(s_p, p_p, rows64, l32, sc);
        // SAFETY: the kernel's signature; both `[rows, l]`.
        unsafe {
            launch(
                device,
                f,
                norm_grid(rows),
                (256, 1, 1),
                0,
                stream,
                &mut params,
            )
        };
    });
    drop(scores);
    probs
}

/// `dscores` from `dprobs` and the forward's probabilities.
pub fn causal_softmax_bwd(dprobs: T, probs: T, scale: f64) -> T {
    let (rows, l) = square_rows(&probs);
    let dtype = probs.dtype;
    let (dprobs, probs) = (same_dtype(dprobs, dtype), into_contiguous(probs));
    let ds = empty(&probs, probs.meta.shape().to_vec(), dtype);
    if rows > 0 {
        let device = probs.device.index;
        let f = nvrtc::function(
            device,
            "softmax",
            &softmax_src(),
            &format!("softmax_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&ds, &dprobs, &probs],
            move |[mut ds_p, mut dp_p, mut p_p], stream| {
                let (mut rows64, mut l32, mut sc) = (rows as i64, l as i32, scale as f32);
                let mut params = kernel_args!(dp_p, p_p, ds_p, rows64, l32, sc);
                // SAFETY: as in the forward.
                unsafe {
                    launch(
                        device,
                        f,
                        norm_grid(rows),
                        (256, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                };
            },
        );
    }
    drop((dprobs, probs));
    ds
}
