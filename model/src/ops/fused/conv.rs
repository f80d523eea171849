//! Mamba2's causal depthwise conv with SiLU.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;

use super::{Cb, aligned16, empty, same_dtype, suffix, with_rows, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue_opt, launch};

/// Mamba2's causal depthwise conv with SiLU, `[b, l, c]`, weight `[c, 1, k]`:
/// `y[t] = silu(bias + sum_j w[j] x[t - (k-1) + j])`, accumulated in f32 and
/// rounded to the input dtype before the SiLU (as torch's conv then act).
/// Threads walk one channel over a run of steps with the last `k` inputs in
/// registers. Backward is one pass too (walking down): `du` (the gradient
/// before SiLU, recomputed from `x`) stays in registers for `dx`, and each
/// run's weight and bias gradient sums are added after in a fixed order.
const CONV: &str = r#"

// Each thread walks one channel over a run of `steps` time steps, keeping
// the last k inputs in registers: every input is read once (coalesced
// across the channels of a warp), not k times. The loads of PF steps are
// issued together before their outputs are computed, so a thread keeps PF
// loads in flight rather than one.
// x's rows are `ldx` apart (a column slice of a wider tensor reads in place).
// grid (ceil(c / blockDim.x), ceil(l / steps), b)
#define PF 8
// V consecutive channels as f32 (V = 2: one 4-byte bf16 / 8-byte f32 access;
// a warp's row then fills whole cache lines).
__device__ __forceinline__ void ldn(const float* p, long long i, float (&o)[1]) { o[0] = p[i]; }
__device__ __forceinline__ void ldn(const bf16_t* p, long long i, float (&o)[1]) { o[0] = ld(p, i); }
__device__ __forceinline__ void ldn(const float* p, long long i, float (&o)[2]) {
    const float2 v = *reinterpret_cast<const float2*>(p + i);
    o[0] = v.x; o[1] = v.y;
}
__device__ __forceinline__ void ldn(const bf16_t* p, long long i, float (&o)[2]) {
    const unsigned u = *reinterpret_cast<const unsigned*>(p + i);
    o[0] = __uint_as_float(u << 16); o[1] = __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ void stn(float* p, long long i, const float (&v)[1]) { p[i] = v[0]; }
__device__ __forceinline__ void stn(bf16_t* p, long long i, const float (&v)[1]) { st(p, i, v[0]); }
__device__ __forceinline__ void stn(float* p, long long i, const float (&v)[2]) {
    *reinterpret_cast<float2*>(p + i) = make_float2(v[0], v[1]);
}
__device__ __forceinline__ void stn(bf16_t* p, long long i, const float (&v)[2]) {
    *reinterpret_cast<unsigned*>(p + i) = pack2(v[0], v[1]);
}

// Each thread covers V channels (c a multiple of V).
template <typename T, int K, int V>
__device__ void conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, T* __restrict__ y, int l, int c,
                         long long ldx, int steps) {
    const int ch = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (ch >= c) return;
    const long long base = (long long)blockIdx.z * l;
    const int t0 = blockIdx.y * steps, t1 = min(t0 + steps, l);
    float wv[V][K], xw[V][K], bv[V];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        // xw[j] = x[t - (K-1) + j] for the first t; the last slot is filled in the loop.
        const int tt = t0 - (K - 1) + j;
        float xj[V];
        if (j < K - 1 && tt >= 0) ldn(x, (base + tt) * ldx + ch, xj);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            wv[v][j] = ld(w, (long long)(ch + v) * K + j);
            xw[v][j] = (j < K - 1 && tt >= 0) ? xj[v] : 0.0f;
        }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) bv[v] = bias ? ld(bias, ch + v) : 0.0f;
    for (int tb = t0; tb < t1; tb += PF) {
        float xs[PF][V];
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            if (tb + s < t1) ldn(x, (base + tb + s) * ldx + ch, xs[s]);
        }
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            if (tb + s < t1) {
                float out[V];
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    float u = bv[v];
#pragma unroll
                    for (int j = 0; j < K; ++j) {
                        if (j == K - 1) xw[v][j] = xs[s][v];
                        u += wv[v][j] * xw[v][j];
                    }
                    u = rnd(u, T());
                    out[v] = u * sigm(u);
#pragma unroll
                    for (int j = 0; j + 1 < K; ++j) xw[v][j] = xw[v][j + 1];
                }
                stn(y, (base + tb + s) * c + ch, out);
            }
        }
    }
}

// Backward in one pass, walking a run of steps downwards: du = dy * silu'(u)
// (u recomputed from x), dx[t] = sum_j w[j] du[t + (K-1) - j] from the last
// K du in registers (the run first computes the K-1 du above its end), and
// per-run weight and bias gradient sums written to `dwp [runs, c, K]`,
// `dbp [runs, c]` (summed after in a fixed order: deterministic). Loads
// are issued PF steps at a time, as in the forward; V channels per thread.
// grid (ceil(c / (V blockDim.x)), ceil(l / steps), b)
template <typename T, int K, int V>
__device__ void conv_bwd(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, const T* __restrict__ dy,
                         T* __restrict__ dx, float* __restrict__ dwp, float* __restrict__ dbp,
                         int l, int c, long long ldx, int steps) {
    const int ch = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (ch >= c) return;
    const long long base = (long long)blockIdx.z * l;
    const int t0 = blockIdx.y * steps, t1 = min(t0 + steps, l);
    const long long run = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    float wv[V][K], xw[V][K], dus[V][K], acc[V][K], bv[V], accb[V];
    const int top = min(t1 + K - 1, l) - 1;  // the highest step whose du we need
#pragma unroll
    for (int j = 0; j < K; ++j) {
        // xw[j] = x[top - (K-1) + j]; slot 0 is filled in the loop.
        const int tt = top - (K - 1) + j;
        float xj[V];
        if (j >= 1 && tt >= 0) ldn(x, (base + tt) * ldx + ch, xj);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            wv[v][j] = ld(w, (long long)(ch + v) * K + j);
            acc[v][j] = 0.0f;
            dus[v][j] = 0.0f;  // du[t + j]; zero past the end
            xw[v][j] = (j >= 1 && tt >= 0) ? xj[v] : 0.0f;
        }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
        bv[v] = bias ? ld(bias, ch + v) : 0.0f;
        accb[v] = 0.0f;
    }
    for (int tb = top; tb >= t0; tb -= PF) {
        float xs[PF][V], dys[PF][V];
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            const int t = tb - s, first = t - (K - 1);
#pragma unroll
            for (int v = 0; v < V; ++v) xs[s][v] = dys[s][v] = 0.0f;
            if (t >= t0 && first >= 0) ldn(x, (base + first) * ldx + ch, xs[s]);
            if (t >= t0) ldn(dy, (base + t) * c + ch, dys[s]);
        }
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            const int t = tb - s;
            if (t >= t0) {
                float out[V];
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    xw[v][0] = xs[s][v];
                    float u = bv[v];
#pragma unroll
                    for (int j = 0; j < K; ++j) u += wv[v][j] * xw[v][j];
                    u = rnd(u, T());
                    const float sg = sigm(u);
                    const float d = dys[s][v] * sg * (1.0f + u * (1.0f - sg));
#pragma unroll
                    for (int j = K - 1; j > 0; --j) dus[v][j] = dus[v][j - 1];
                    dus[v][0] = d;
                    float sum = 0.0f;
#pragma unroll
                    for (int j = 0; j < K; ++j) sum += wv[v][j] * dus[v][(K - 1) - j];
                    out[v] = sum;
                    if (t < t1) {
#pragma unroll
                        for (int j = 0; j < K; ++j) acc[v][j] += d * xw[v][j];
                        accb[v] += d;
                    }
#pragma unroll
                    for (int j = K - 1; j > 0; --j) xw[v][j] = xw[v][j - 1];
                }
                if (t < t1) stn(dx, (base + t) * c + ch, out);
            }
        }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
        for (int j = 0; j < K; ++j) dwp[(run * c + ch + v) * K + j] = acc[v][j];
        if (dbp) dbp[run * c + ch + v] = accb[v];
    }
}

// out[j] = sum over rows of part[row, j], rows in order.
__device__ void colsum(const float* part, float* out, int rows, long long d) {
    const long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (j >= d) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += part[r * d + j];
    out[j] = s;
}
extern "C" __global__ void conv_colsum(const float* part, float* out, int rows, long long d) {
    colsum(part, out, rows, d);
}

// Tiled kernels, where every row of x and dy starts on 16 bytes: a block
// copies its tile (S steps plus the window's halo, 512 bytes of channels:
// 256 bf16 / 128 f32) into shared memory in one go of 16-byte cp.async
// copies, then each thread walks its V channels down the tile. The
// per-thread walk above keeps only 8 steps of loads in flight at 25%
// occupancy and spends most of its instructions on per-load 64-bit address
// math and bounds tests (ncu: 26% of DRAM bandwidth in the backward).
// Rows outside [0, l) and channels past c are copied as zeros.
#define CT_BYTES 512
#define CONV_TILE 32  // steps per block (CONV_TILE on the host)
template <typename T>
struct ConvTile {
    static constexpr int CT = CT_BYTES / sizeof(T);  // channels per block
    static constexpr int V = CT / 128;              // channels per thread (128 threads)
    static constexpr int E = 16 / sizeof(T);        // channels per copy
};

// Rows r0 .. r0 + rows of src (rows `ld` apart, batch rows from `base`) at
// channels ch0 .. ch0 + CT into sm [rows][CT].
template <typename T>
__device__ __forceinline__ void conv_tile_copy(T* sm, const T* __restrict__ src, long long ld,
                                               long long base, int r0, int rows, int l, int ch0,
                                               int c) {
    constexpr int CT = ConvTile<T>::CT, E = ConvTile<T>::E, CPR = CT / E;
    for (int i = threadIdx.x; i < rows * CPR; i += blockDim.x) {
        const int r = i / CPR, ch = ch0 + (i % CPR) * E, t = r0 + r;
        const bool ok = t >= 0 && t < l && ch < c;
        cp16(sm + i * E, ok ? src + (base + t) * ld + ch : src, ok);
    }
}

template <typename T, int K>
__device__ __forceinline__ void conv_weights(const T* __restrict__ w, const T* __restrict__ bias,
                                             int ch, int c, float (&wv)[ConvTile<T>::V][K],
                                             float (&bv)[ConvTile<T>::V]) {
#pragma unroll
    for (int v = 0; v < ConvTile<T>::V; ++v) {
        const bool in = ch + v < c;
#pragma unroll
        for (int j = 0; j < K; ++j) wv[v][j] = in ? ld(w, (long long)(ch + v) * K + j) : 0.0f;
        bv[v] = in && bias ? ld(bias, ch + v) : 0.0f;
    }
}

// The window's first K - 1 inputs (tile rows 0 .. K - 2) at column `col`.
template <typename T, int K>
__device__ __forceinline__ void conv_window(const T* sx, int col, float (&xw)[ConvTile<T>::V][K]) {
    constexpr int CT = ConvTile<T>::CT, V = ConvTile<T>::V;
#pragma unroll
    for (int j = 0; j + 1 < K; ++j) {
        float xj[V];
        ldn(sx, j * CT + col, xj);
#pragma unroll
        for (int v = 0; v < V; ++v) xw[v][j] = xj[v];
    }
}

// grid (ceil(c / CT), ceil(l / S), b), 128 threads.
template <typename T, int K, int S>
__device__ void conv_fwd_tile(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ bias, T* __restrict__ y, int l, int c,
                              long long ldx) {
    constexpr int CT = ConvTile<T>::CT, V = ConvTile<T>::V, R = S + K - 1;
    __shared__ __align__(16) T sx[R * CT];
    const int ch0 = blockIdx.x * CT, t0 = blockIdx.y * S;
    const long long base = (long long)blockIdx.z * l;
    conv_tile_copy(sx, x, ldx, base, t0 - (K - 1), R, l, ch0, c);
    cp_commit();
    const int col = threadIdx.x * V, ch = ch0 + col;
    float wv[V][K], bv[V], xw[V][K];
    conv_weights<T, K>(w, bias, ch, c, wv, bv);
    cp_wait<0>();
    __syncthreads();
    if (ch >= c) return;
    conv_window<T, K>(sx, col, xw);
    T* yp = y + (base + t0) * c + ch;
    const int n = min(S, l - t0);
#pragma unroll 8
    for (int s = 0; s < n; ++s) {
        float xs[V], out[V];
        ldn(sx, (s + K - 1) * CT + col, xs);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            xw[v][K - 1] = xs[v];
            float u = bv[v];
#pragma unroll
            for (int j = 0; j < K; ++j) u += wv[v][j] * xw[v][j];
            u = rnd(u, T());
            out[v] = u * sigm(u);
#pragma unroll
            for (int j = 0; j + 1 < K; ++j) xw[v][j] = xw[v][j + 1];
        }
        stn(yp, 0, out);
        yp += c;
    }
}

// Backward over steps t0 .. t0 + S, walking up: du at t0 .. t0 + S + K - 2
// (du = dy silu'(u), u recomputed), dx[t] = sum_j w[j] du[t + (K-1) - j]
// once du[t + K - 1] is known; the weight and bias gradient sums of the
// block's own steps go to dwp [runs, c, K] and dbp [runs, c] as in the
// per-thread walk (summed after, in order).
template <typename T, int K, int S>
__device__ void conv_bwd_tile(const T* __restrict__ x, const T* __restrict__ w,
                              const T* __restrict__ bias, const T* __restrict__ dy,
                              T* __restrict__ dx, float* __restrict__ dwp,
                              float* __restrict__ dbp, int l, int c, long long ldx) {
    constexpr int CT = ConvTile<T>::CT, V = ConvTile<T>::V;
    constexpr int RX = S + 2 * (K - 1), RD = S + K - 1;
    __shared__ __align__(16) T sx[RX * CT];
    __shared__ __align__(16) T sd[RD * CT];
    const int ch0 = blockIdx.x * CT, t0 = blockIdx.y * S;
    const long long base = (long long)blockIdx.z * l;
    conv_tile_copy(sx, x, ldx, base, t0 - (K - 1), RX, l, ch0, c);
    conv_tile_copy(sd, dy, (long long)c, base, t0, RD, l, ch0, c);
    cp_commit();
    const int col = threadIdx.x * V, ch = ch0 + col;
    float wv[V][K], bv[V], xw[V][K], dus[V][K], acc[V][K], accb[V];
    conv_weights<T, K>(w, bias, ch, c, wv, bv);
#pragma unroll
    for (int v = 0; v < V; ++v) {
        accb[v] = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) acc[v][j] = dus[v][j] = 0.0f;
    }
    cp_wait<0>();
    __syncthreads();
    if (ch >= c) return;
    conv_window<T, K>(sx, col, xw);
    T* dxp = dx + (base + t0) * c + ch;
    const int n = min(S, l - t0);  // dx rows this block writes
    // Step i is t0 + i; rows past l hold zeros (dy = 0 there, so du = 0).
#pragma unroll
    for (int i = 0; i < S + K - 1; ++i) {
        float xs[V], ds[V], out[V];
        ldn(sx, (i + K - 1) * CT + col, xs);
        ldn(sd, i * CT + col, ds);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            xw[v][K - 1] = xs[v];
            float u = bv[v];
#pragma unroll
            for (int j = 0; j < K; ++j) u += wv[v][j] * xw[v][j];
            u = rnd(u, T());
            const float sg = sigm(u);
            const float d = ds[v] * sg * (1.0f + u * (1.0f - sg));
#pragma unroll
            for (int j = 0; j + 1 < K; ++j) dus[v][j] = dus[v][j + 1];
            dus[v][K - 1] = d;  // dus[j] = du[t0 + i - (K-1) + j]
            if (i < S) {
#pragma unroll
                for (int j = 0; j < K; ++j) acc[v][j] += d * xw[v][j];
                accb[v] += d;
            }
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < K; ++j) sum += wv[v][j] * dus[v][K - 1 - j];
            out[v] = sum;
#pragma unroll
            for (int j = 0; j + 1 < K; ++j) xw[v][j] = xw[v][j + 1];
        }
        // dx at step i - (K-1), once its K du are known.
        if (i >= K - 1 && i - (K - 1) < n) stn(dxp, (long long)(i - (K - 1)) * c, out);
    }
    const long long run = (long long)blockIdx.z * gridDim.y + blockIdx.y;
#pragma unroll
    for (int v = 0; v < V; ++v) {
        if (ch + v < c) {
#pragma unroll
            for (int j = 0; j < K; ++j) dwp[(run * c + ch + v) * K + j] = acc[v][j];
            if (dbp) dbp[run * c + ch + v] = accb[v];
        }
    }
}

// One entry per kernel width K (compile-time: the register windows are
// indexed statically).
// Names: conv_{fwd,bwd}{K}[v2|t]_{dtype}, v2 with two channels per thread,
// t tiled.
#define CONV_KERNELS_V(SUF, T, K, V, VN)                                                         \
extern "C" __global__ void conv_fwd##K##VN##_##SUF(const T* x, const T* w, const T* bias, T* y, \
                                                   int l, int c, long long ldx, int steps) {    \
    conv_fwd<T, K, V>(x, w, bias, y, l, c, ldx, steps);                                         \
}                                                                                               \
extern "C" __global__ void conv_bwd##K##VN##_##SUF(const T* x, const T* w, const T* bias,      \
        const T* dy, T* dx, float* dwp, float* dbp, int l, int c, long long ldx, int steps) {  \
    conv_bwd<T, K, V>(x, w, bias, dy, dx, dwp, dbp, l, c, ldx, steps);                          \
}
// The tiled kernels: conv_{fwd,bwd}{K}t_{dtype}.
#define CONV_KERNELS_T(SUF, T, K)                                                                \
extern "C" __global__ void __launch_bounds__(128) conv_fwd##K##t_##SUF(const T* x, const T* w,   \
        const T* bias, T* y, int l, int c, long long ldx) {                                      \
    conv_fwd_tile<T, K, CONV_TILE>(x, w, bias, y, l, c, ldx);                                \
}                                                                                                \
extern "C" __global__ void __launch_bounds__(128) conv_bwd##K##t_##SUF(const T* x, const T* w,   \
        const T* bias, const T* dy, T* dx, float* dwp, float* dbp, int l, int c, long long ldx) { \
    conv_bwd_tile<T, K, CONV_TILE>(x, w, bias, dy, dx, dwp, dbp, l, c, ldx);                 \
}
#define CONV_KERNELS(SUF, T, K) \
    CONV_KERNELS_V(SUF, T, K, 1, ) CONV_KERNELS_V(SUF, T, K, 2, v2) CONV_KERNELS_T(SUF, T, K)
#define CONV_WIDTHS(SUF, T) \
    CONV_KERNELS(SUF, T, 1) CONV_KERNELS(SUF, T, 2) CONV_KERNELS(SUF, T, 3) CONV_KERNELS(SUF, T, 4) \
    CONV_KERNELS(SUF, T, 5) CONV_KERNELS(SUF, T, 6) CONV_KERNELS(SUF, T, 7) CONV_KERNELS(SUF, T, 8)
CONV_WIDTHS(f32, float)
CONV_WIDTHS(bf16, bf16_t)
"#;

/// Steps of the sequence one thread walks: forward, and backward (whose
/// per-run weight gradient sums are then added in order).
const CONV_STEPS_FWD: usize = 32;
const CONV_STEPS_BWD: usize = 64;
const CONV_THREADS: u32 = 128;

/// Steps per block of the tiled kernels, and their bytes of channels per
/// block (`CONV_TILE`, `CT_BYTES` in the source).
const CONV_TILE: usize = 32;
const CONV_TILE_BYTES: usize = 512;

/// One launch's walk over the sequence: the kernel, its grid (channels
/// across x, runs of `steps` across y, the batch across z), and whether it
/// is tiled (whose signature has no `steps`).
struct Walk {
    kernel: String,
    grid: (u32, u32, u32),
    steps: usize,
    tiled: bool,
}

/// Tiled where every row of `ts` (x, and dy in backward) starts on 16
/// bytes, else a thread per one or two channels walking `steps`.
#[allow(clippy::too_many_arguments)]
fn conv_walk(
    dir: &str,
    steps: usize,
    b: usize,
    l: usize,
    c: usize,
    k: usize,
    ldx: usize,
    dtype: DType,
    ts: &[&T],
) -> Walk {
    let e = 16 / dtype.size();
    let (tiled, per_block, steps, vn) =
        if c.is_multiple_of(e) && ldx.is_multiple_of(e) && ts.iter().all(|t| aligned16(t)) {
            (true, CONV_TILE_BYTES / dtype.size(), CONV_TILE, "t")
        } else {
            let v = conv_pack(c, ldx, ts);
            (
                false,
                CONV_THREADS as usize * v,
                steps,
                if v == 2 { "v2" } else { "" },
            )
        };
    Walk {
        kernel: format!("conv_{dir}{k}{vn}_{}", suffix(dtype)),
        grid: (
            c.div_ceil(per_block) as u32,
            l.div_ceil(steps) as u32,
            b as u32,
        ),
        steps,
        tiled,
    }
}

/// The launch arguments `p` as the walk's kernel takes them: the tiled
/// ones have no trailing `steps`.
fn walk_args<'a>(
    walk: &Walk,
    p: &'a mut [*mut std::ffi::c_void],
) -> &'a mut [*mut std::ffi::c_void] {
    let n = p.len() - usize::from(walk.tiled);
    &mut p[..n]
}

/// Channels per thread: 2 (paired accesses) where every row starts on a
/// pair, else 1.
fn conv_pack(c: usize, ldx: usize, ts: &[&T]) -> usize {
    let paired = |t: &&T| {
        t.handle
            .offset_start
            .unwrap_or(0)
            .is_multiple_of(2 * t.dtype.size() as u64)
    };
    if c.is_multiple_of(2) && ldx.is_multiple_of(2) && ts.iter().all(paired) {
        2
    } else {
        1
    }
}

fn conv_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, nvrtc::MMA, CONV)
}

fn conv_dims(x: &T, w: &T) -> (usize, usize, usize, usize) {
    let s = x.meta.shape();
    assert_eq!(s.len(), 3, "fused conv: x must be [b, l, c]");
    let (b, l, c) = (s[0], s[1], s[2]);
    let ws = w.meta.shape();
    let k = ws[ws.len() - 1];
    assert_eq!(
        ws.num_elements(),
        c * k,
        "fused conv: weight must be [c, 1, k]"
    );
    assert!(
        (1..=8).contains(&k),
        "fused conv: kernel width {k} not in 1..=8"
    );
    (b, l, c, k)
}

/// `silu(causal_conv(x))`.
pub fn conv1d_silu_fwd(x: T, w: T, bias: Option<T>) -> T {
    let (b, l, c, k) = conv_dims(&x, &w);
    let dtype = x.dtype;
    let ((x, ldx), w) = (with_rows(x), same_dtype(w, dtype));
    let bias = bias.map(|t| same_dtype(t, dtype));
    let y = empty(&x, vec![b, l, c], dtype);
    let n = b * l * c;
    if n == 0 {
        return y;
    }
    let device = x.device.index;
    let walk = conv_walk("fwd", CONV_STEPS_FWD, b, l, c, k, ldx, dtype, &[&x]);
    let f = nvrtc::function(device, "conv", &conv_src(), &walk.kernel);
    enqueue_opt(
        [Some(&y), Some(&x), Some(&w), bias.as_ref()],
        move |[mut y_p, mut x_p, mut w_p, mut b_p], stream| {
            let (mut l32, mut c32, mut ld64) = (l as i32, c as i32, ldx as i64);
            let mut steps = walk.steps as i32;
            let mut params = kernel_args!(x_p, w_p, b_p, y_p, l32, c32, ld64, steps);
            // SAFETY: the kernel's signature; y `[b, l, c]`, x the same with rows `ldx` apart, w `[c, k]`, bias `[c]`.
            unsafe {
                launch(
                    device,
                    f,
                    walk.grid,
                    (CONV_THREADS, 1, 1),
                    0,
                    stream,
                    walk_args(&walk, &mut params),
                )
            };
        },
    );
    drop((x, w, bias));
    y
}

/// `(dx, dw, db)` of [`conv1d_silu_fwd`]; `dw` `[c, 1, k]` and `db` in f32.
pub fn conv1d_silu_bwd(dy: T, x: T, w: T, bias: Option<T>) -> (T, T, Option<T>) {
    let (b, l, c, k) = conv_dims(&x, &w);
    let dtype = x.dtype;
    let ((x, ldx), w, dy) = (with_rows(x), same_dtype(w, dtype), same_dtype(dy, dtype));
    let bias = bias.map(|t| same_dtype(t, dtype));
    let n = b * l * c;
    let walk = conv_walk("bwd", CONV_STEPS_BWD, b, l, c, k, ldx, dtype, &[&x, &dy]);
    let runs = b * l.div_ceil(walk.steps);
    // Flat: a [c, 1, k] allocation may pad its rows (k = 3), the kernel writes `ch * k + j`.
    // Every element is written by the column sums (zeros when there are no runs).
    let sums = |d: usize| {
        if n > 0 {
            empty(&x, vec![d], DType::F32)
        } else {
            zeros_f32(&x, vec![d])
        }
    };
    let dw = sums(c * k);
    let db = bias.as_ref().map(|_| sums(c));
    let dx = empty(&x, vec![b, l, c], dtype);
    if n > 0 {
        let dwp = empty(&x, vec![runs, c * k], DType::F32);
        let dbp = bias.as_ref().map(|_| empty(&x, vec![runs, c], DType::F32));
        let device = x.device.index;
        let src = conv_src();
        let f = nvrtc::function(device, "conv", &src, &walk.kernel);
        let f_sum = nvrtc::function(device, "conv", &src, "conv_colsum");
        let (mut l32, mut c32, mut ld64) = (l as i32, c as i32, ldx as i64);
        let (mut steps, mut runs32) = (walk.steps as i32, runs as i32);
        let (mut ck64, mut c64) = ((c * k) as i64, c as i64);
        let has_bias = bias.is_some();
        enqueue_opt(
            [
                Some(&x),
                Some(&w),
                bias.as_ref(),
                Some(&dy),
                Some(&dx),
                Some(&dwp),
                dbp.as_ref(),
                Some(&dw),
                db.as_ref(),
            ],
            move |[
                mut x_p,
                mut w_p,
                mut b_p,
                mut dy_p,
                mut dx_p,
                mut dwp_p,
                mut dbp_p,
                mut dw_p,
                mut db_p,
            ],
                  stream| {
                let mut p1 = kernel_args!(
                    x_p, w_p, b_p, dy_p, dx_p, dwp_p, dbp_p, l32, c32, ld64, steps
                );
                let mut p2 = kernel_args!(dwp_p, dw_p, runs32, ck64);
                let mut p3 = kernel_args!(dbp_p, db_p, runs32, c64);
                let cols = |d: usize| (d.div_ceil(256) as u32, 1, 1);
                // SAFETY: the kernels' signatures; x, dy, dx `[b, l, c]`, w
                // `[c, k]`, bias `[c]`, the run sums `[runs, c * k]` and `[runs, c]`.
                unsafe {
                    launch(
                        device,
                        f,
                        walk.grid,
                        (CONV_THREADS, 1, 1),
                        0,
                        stream,
                        walk_args(&walk, &mut p1),
                    );
                    launch(device, f_sum, cols(c * k), (256, 1, 1), 0, stream, &mut p2);
                    if has_bias {
                        launch(device, f_sum, cols(c), (256, 1, 1), 0, stream, &mut p3);
                    }
                }
            },
        );
        drop((dwp, dbp));
    }
    drop((x, w, dy, bias));
    (dx, Cb::float_reshape(dw, [c, 1, k].into()), db)
}
