//! Cross-entropy (with z-loss) straight from the logits.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{empty, norm_grid, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// Cross-entropy per row straight from the logits (bf16 or f32, never
/// copied to f32): `lse - logits[target] + z * lse^2`, one block per row
/// with an online max/sum. Backward writes `g * (softmax * (1 + 2 z lse) -
/// onehot(target))` in the logits' dtype.
const XENT: &str = r#"

#define NEG_INF __int_as_float(0xff800000)

// Combines (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == NEG_INF) return;
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

// Row loss and lse from each thread's (max, sum of exp) pair: lanes, then
// warps through `sm`, `ss` in a fixed order.
template <typename T>
__device__ __forceinline__ void row_loss(float m, float s, float* sm, float* ss, const T* x,
                                         int t, float* loss, float* lse_out, float z) {
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
        const float lse = M + logf(S);
        *loss = lse - ld(x, t) + z * lse * lse;
        *lse_out = lse;
    }
}

template <typename T>
__device__ void xent_fwd(const T* logits, const int* targets, float* loss, float* lse_out,
                         long long rows, int v, float z) {
    __shared__ float sm[32], ss[32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* x = logits + r * v;
        float m = NEG_INF, s = 0.0f;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float xv = ld(x, j);
            if (xv > m) { s = s * __expf(m - xv) + 1.0f; m = xv; } else { s += __expf(xv - m); }
        }
        row_loss(m, s, sm, ss, x, targets[r], loss + r, lse_out + r, z);
    }
}

template <typename T>
__device__ void xent_bwd(const float* g, const T* logits, const int* targets, const float* lse,
                         T* dlogits, long long rows, int v, float z) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* x = logits + r * v;
        const float gr = g[r], l = lse[r], scale = gr * (1.0f + 2.0f * z * l);
        const int t = targets[r];
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float p = __expf(ld(x, j) - l);
            st(dlogits + r * v, j, scale * p - (j == t ? gr : 0.0f));
        }
    }
}

// The same with 16-byte loads (v a multiple of Pack<T>::V, rows 16-byte
// aligned): the scalar loop's 2-byte loads and per-element rescaling left
// it at a third of the memory bandwidth. Per pack: its max, then one merge.
template <typename T>
__device__ void xent_fwd_v(const T* __restrict__ logits, const int* __restrict__ targets,
                           float* __restrict__ loss, float* __restrict__ lse_out, long long rows,
                           int v, float z) {
    const int V = Pack<T>::V, np = v / V;
    __shared__ float sm[32], ss[32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* x = logits + r * v;
        float m = NEG_INF, s = 0.0f;
#pragma unroll 4
        for (int j = threadIdx.x; j < np; j += blockDim.x) {
            float xv[V];
            Pack<T>::load(x, (long long)j * V, xv);
            float pm = xv[0];
#pragma unroll
            for (int e = 1; e < V; ++e) pm = fmaxf(pm, xv[e]);
            if (pm == NEG_INF) continue;
            float ps = 0.0f;
#pragma unroll
            for (int e = 0; e < V; ++e) ps += __expf(xv[e] - pm);
            lse_merge(m, s, pm, ps);
        }
        row_loss(m, s, sm, ss, x, targets[r], loss + r, lse_out + r, z);
    }
}

template <typename T>
__device__ void xent_bwd_v(const float* __restrict__ g, const T* __restrict__ logits,
                           const int* __restrict__ targets, const float* __restrict__ lse,
                           T* __restrict__ dlogits, long long rows, int v, float z) {
    const int V = Pack<T>::V, np = v / V;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = r * v;
        const float gr = g[r], l = lse[r], scale = gr * (1.0f + 2.0f * z * l);
        const int t = targets[r];
#pragma unroll 4
        for (int j = threadIdx.x; j < np; j += blockDim.x) {
            float xv[V];
            Pack<T>::load(logits, o + (long long)j * V, xv);
#pragma unroll
            for (int e = 0; e < V; ++e)
                xv[e] = scale * __expf(xv[e] - l) - (j * V + e == t ? gr : 0.0f);
            Pack<T>::store(dlogits, o + (long long)j * V, xv);
        }
    }
}

#define XENT_KERNELS(SUF, T)                                                                  \
extern "C" __global__ void xent_fwd_##SUF(const T* logits, const int* targets, float* loss,  \
                                          float* lse, long long rows, int v, float z) {      \
    xent_fwd<T>(logits, targets, loss, lse, rows, v, z);                                      \
}                                                                                             \
extern "C" __global__ void xent_bwd_##SUF(const float* g, const T* logits, const int* targets,\
                                          const float* lse, T* dlogits, long long rows, int v,\
                                          float z) {                                          \
    xent_bwd<T>(g, logits, targets, lse, dlogits, rows, v, z);                                \
}                                                                                             \
extern "C" __global__ void xent_fwd_v_##SUF(const T* logits, const int* targets, float* loss,\
                                            float* lse, long long rows, int v, float z) {    \
    xent_fwd_v<T>(logits, targets, loss, lse, rows, v, z);                                    \
}                                                                                             \
extern "C" __global__ void xent_bwd_v_##SUF(const float* g, const T* logits,                 \
                                            const int* targets, const float* lse,            \
                                            T* dlogits, long long rows, int v, float z) {    \
    xent_bwd_v<T>(g, logits, targets, lse, dlogits, rows, v, z);                              \
}
XENT_KERNELS(f32, float)
XENT_KERNELS(bf16, bf16_t)
"#;

fn xent_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, XENT)
}

/// The kernel `base` for these logits: the 16-byte-load one (`_v`) where
/// rows are whole packs and aligned.
fn xent_kernel(base: &str, logits: &T, v: usize) -> String {
    let dtype = logits.dtype;
    let vec = v.is_multiple_of(16 / dtype.size()) && super::aligned16(logits);
    format!("{base}{}_{}", if vec { "_v" } else { "" }, suffix(dtype))
}

fn xent_dims(logits: &T, targets: &T) -> (usize, usize) {
    let s = logits.meta.shape();
    assert_eq!(
        s.len(),
        2,
        "fused cross-entropy: logits must be [rows, vocab]"
    );
    assert_eq!(
        targets.meta.shape().num_elements(),
        s[0],
        "fused cross-entropy: one target per row"
    );
    assert_eq!(
        targets.dtype,
        DType::I32,
        "fused cross-entropy: i32 targets"
    );
    (s[0], s[1])
}

/// Per row `(loss, lse)`, both f32 `[rows]`.
pub fn cross_entropy_fwd(logits: T, targets: T, z: f64) -> (T, T) {
    let (rows, v) = xent_dims(&logits, &targets);
    let (logits, targets) = (into_contiguous(logits), into_contiguous(targets));
    let loss = empty(&logits, vec![rows], DType::F32);
    let lse = empty(&logits, vec![rows], DType::F32);
    if rows == 0 {
        return (loss, lse);
    }
    let device = logits.device.index;
    let f = nvrtc::function(
        device,
        "xent",
        &xent_src(),
        &xent_kernel("xent_fwd", &logits, v),
    );
    enqueue(
        [&loss, &logits, &targets, &lse],
        move |[mut loss_p, mut x_p, mut t_p, mut lse_p], stream| {
            let (mut rows64, mut v32, mut z32) = (rows as i64, v as i32, z as f32);
            let mut params = kernel_args!(x_p, t_p, loss_p, lse_p, rows64, v32, z32);
            // SAFETY: the kernel's signature; logits `[rows, v]`, the rest `[rows]`.
            unsafe {
                launch(
                    device,
                    f,
                    norm_grid(rows),
                    (512, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
        },
    );
    drop((logits, targets));
    (loss, lse)
}

/// `dlogits` in the logits' dtype, for the per-row upstream gradient `g`.
pub fn cross_entropy_bwd(g: T, logits: T, targets: T, lse: T, z: f64) -> T {
    let (rows, v) = xent_dims(&logits, &targets);
    let dtype = logits.dtype;
    let (logits, targets) = (into_contiguous(logits), into_contiguous(targets));
    let (g, lse) = (same_dtype(g, DType::F32), into_contiguous(lse));
    let dx = empty(&logits, vec![rows, v], dtype);
    if rows > 0 {
        let device = logits.device.index;
        let f = nvrtc::function(
            device,
            "xent",
            &xent_src(),
            &xent_kernel("xent_bwd", &logits, v),
        );
        enqueue(
            [&dx, &g, &logits, &targets, &lse],
            move |[mut dx_p, mut g_p, mut x_p, mut t_p, mut lse_p], stream| {
                let (mut rows64, mut v32, mut z32) = (rows as i64, v as i32, z as f32);
                let mut params = kernel_args!(g_p, x_p, t_p, lse_p, dx_p, rows64, v32, z32);
                // SAFETY: as in the forward; `dx` `[rows, v]`.
                unsafe {
                    launch(
                        device,
                        f,
                        norm_grid(rows),
                        (512, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                };
            },
        );
    }
    drop((g, logits, targets, lse));
    dx
}
