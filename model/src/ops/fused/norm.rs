//! RMSNorm, optionally gated (Mamba2's `w * rmsnorm(x * silu(z))`):
//! statistics in f32, the normalised row rounded to the input dtype before
//! the weight multiplies it (HF's order), `rstd` kept for backward.
//!
//! Rows whose width is a multiple of a 16-byte access (and at most 8192
//! bf16 / 4096 f32 values) take the vectorised kernels: the forward keeps
//! the gated row in registers, and the backward sums the weight gradient
//! of each block's rows in registers (a thread's columns are the same in
//! every row), so no second pass re-reads the activations for it. Other
//! shapes take the scalar kernels (one block per row, a separate
//! weight-gradient pass).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{COLSUM, aligned16, empty, norm_grid, suffix, with_rows, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue_opt, launch};

const NORM: &str = r#"

__device__ __forceinline__ float sigmoidf(float z) { return sigm(z); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float s = 0.0f;
    const int warps = blockDim.x >> 5;
    for (int w = 0; w < warps; ++w) s += shared[w];
    return s;
}

template <typename T, typename W>
__device__ void norm_fwd(const T* x, const T* z, const W* w, T* out, float* rstd,
                         long long rows, int d, float eps, long long ldz) {
    __shared__ float shared[32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* zr = z ? z + r * ldz : nullptr;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float g = ld(xr, c);
            if (zr) { float zv = ld(zr, c); g *= zv * sigmoidf(zv); }
            ss += g * g;
        }
        const float rs = rsqrtf(block_sum(ss, shared) / d + eps);
        if (threadIdx.x == 0) rstd[r] = rs;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float g = ld(xr, c);
            if (zr) { float zv = ld(zr, c); g *= zv * sigmoidf(zv); }
            const float n = rnd(g * rs, T());
            st(out + r * d, c, n * ld(w, c));
        }
    }
}

// dx (and dz) of a row: one block per row, as the forward. `dres` (x's
// gradient from its other consumers, when given) is added into dx.
template <typename T, typename W>
__device__ void norm_bwd(const T* dout, const T* x, const T* z, const W* w, const float* rstd,
                         const T* dres, T* dx, T* dz, long long rows, int d, long long ldz) {
    __shared__ float shared[32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = r * d;
        const float rs = rstd[r];
        float dot = 0.0f;  // sum(dn * g)
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float g = ld(x + o, c);
            if (z) { float zv = ld(z + r * ldz, c); g *= zv * sigmoidf(zv); }
            dot += ld(dout + o, c) * ld(w, c) * g;
        }
        const float m = block_sum(dot, shared) * rs * rs / d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            const float xv = ld(x + o, c);
            float g = xv, s = 1.0f, zv = 0.0f, sg = 0.0f;
            if (z) { zv = ld(z + r * ldz, c); sg = sigmoidf(zv); s = zv * sg; g = xv * s; }
            const float dn = ld(dout + o, c) * ld(w, c);
            const float dg = rs * (dn - g * m);
            const float a = dres ? ld(dres + o, c) : 0.0f;
            if (z) {
                st(dx + o, c, dg * s + a);
                st(dz + o, c, dg * xv * sg * (1.0f + zv * (1.0f - sg)));
            } else {
                st(dx + o, c, dg + a);
            }
        }
    }
}

// Weight-gradient partials: grid (ceil(d / blockDim.x), chunks); block y sums
// rows [y * per, (y + 1) * per) of dout * n for its columns into dw_part[y, c].
template <typename T>
__device__ void norm_dw(const T* dout, const T* x, const T* z, const float* rstd,
                        float* dw_part, long long rows, int d, int per, long long ldz) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    const long long r0 = (long long)blockIdx.y * per;
    const long long r1 = min(r0 + per, rows);
    float acc = 0.0f;
    for (long long r = r0; r < r1; ++r) {
        const long long o = r * d;
        float g = ld(x + o, c);
        if (z) { float zv = ld(z + r * ldz, c); g *= zv * sigmoidf(zv); }
        acc += ld(dout + o, c) * rnd(g * rstd[r], T());
    }
    dw_part[(long long)blockIdx.y * d + c] = acc;
}

// Vectorised rows (`Pack`, in the prelude): d % V == 0, thread t owning
// packs t, t + blockDim.x, ... (at most NV of them).
//
// g = x (or x silu(z)) for one pack; s = silu(z) (1 ungated), sg = sigmoid(z).
template <typename T>
__device__ __forceinline__ void gate_pack(const T* x, const T* z, long long i, long long iz,
                                          float* xv, float* g, float* s, float* sg, float* zv) {
    const int V = Pack<T>::V;
    Pack<T>::load(x, i, xv);
    if (z) {
        Pack<T>::load(z, iz, zv);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            sg[e] = sigmoidf(zv[e]);
            s[e] = zv[e] * sg[e];
            g[e] = xv[e] * s[e];
        }
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) { g[e] = xv[e]; s[e] = 1.0f; sg[e] = 0.0f; zv[e] = 0.0f; }
    }
}

// Forward, one row per block at a time; the gated row stays in registers
// between the statistics and the output.
template <typename T, int NV>
__device__ void norm_fwd_v(const T* __restrict__ x, const T* __restrict__ z,
                           const T* __restrict__ w, T* __restrict__ out,
                           float* __restrict__ rstd, long long rows, int d, float eps,
                           long long ldz) {
    const int V = Pack<T>::V;
    __shared__ float shared[32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = r * d;
        float g[NV][V];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * V;
            if (c < d) {
                float xv[V], s[V], sg[V], zv[V];
                gate_pack(x, z, o + c, r * ldz + c, xv, g[k], s, sg, zv);
#pragma unroll
                for (int e = 0; e < V; ++e) ss += g[k][e] * g[k][e];
            }
        }
        const float rs = rsqrtf(block_sum(ss, shared) / d + eps);
        if (threadIdx.x == 0) rstd[r] = rs;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * V;
            if (c < d) {
                float wv[V], n[V];
                Pack<T>::load(w, c, wv);
#pragma unroll
                for (int e = 0; e < V; ++e) n[e] = rnd(g[k][e] * rs, T()) * wv[e];
                Pack<T>::store(out, o + c, n);
            }
        }
    }
}

// A row's 16-byte packs as loaded (x, z, dout, dres), unpacked when used.
__device__ __forceinline__ void unpack(uint4 r, float* v, float) {
    v[0] = __uint_as_float(r.x); v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z); v[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ void unpack(uint4 r, float* v, bf16_t) {
    const unsigned u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(u[k] << 16);
        v[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
    }
}
template <int NV>
struct RowPacks {
    uint4 x[NV], z[NV], d[NV], a[NV];
};

// Backward over rows [blockIdx.x * per, ..): dx (and dz) per row, and the
// weight gradient of the block's rows summed in registers (a thread's
// columns are the same in every row) into dw_part[blockIdx.x, :]. A row's
// packs stay in registers between its two passes, and (PRE) the next row's
// loads are in flight during this row's block sum and stores: one row at a
// time per block left the loop waiting on memory. G, R: whether z and dres
// are given (fewer live registers than testing the pointers at run time).
template <typename T, int NV, bool PRE, bool G, bool R>
__device__ void norm_bwd_v(const T* __restrict__ dout, const T* __restrict__ x,
                           const T* __restrict__ z, const T* __restrict__ w,
                           const float* __restrict__ rstd, const T* __restrict__ dres,
                           T* __restrict__ dx,
                           T* __restrict__ dz, float* __restrict__ dw_part, long long rows,
                           int d, int per, long long ldz) {
    const int V = Pack<T>::V;
    __shared__ float shared[32];
    float acc[NV][V];
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[k][e] = 0.0f;
    const long long r0 = (long long)blockIdx.x * per;
    const long long r1 = min(r0 + per, rows);
    auto fetch = [&](long long r, RowPacks<NV>& rp) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * V;
            if (c < d) {
                rp.x[k] = *reinterpret_cast<const uint4*>(x + r * d + c);
                rp.d[k] = *reinterpret_cast<const uint4*>(dout + r * d + c);
                if (G) rp.z[k] = *reinterpret_cast<const uint4*>(z + r * ldz + c);
                if (R) rp.a[k] = *reinterpret_cast<const uint4*>(dres + r * d + c);
            }
        }
    };
    RowPacks<NV> cur, nxt;
    if (r0 < r1) fetch(r0, cur);
    for (long long r = r0; r < r1; ++r) {
        const long long o = r * d;
        const float rs = rstd[r];
        float dot = 0.0f;  // sum(dn * g)
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * V;
            if (c < d) {
                float xv[V], zv[V], dv[V], wv[V];
                Pack<T>::load(w, c, wv);  // (L1 hits: cheaper than registers)
                unpack(cur.x[k], xv, T());
                unpack(cur.d[k], dv, T());
                if (G) unpack(cur.z[k], zv, T());
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float g = G ? xv[e] * (zv[e] * sigmoidf(zv[e])) : xv[e];
                    dot += dv[e] * wv[e] * g;
                }
            }
        }
        if (PRE && r + 1 < r1) fetch(r + 1, nxt);
        const float m = block_sum(dot, shared) * rs * rs / d;
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * V;
            if (c < d) {
                float xv[V], zv[V], dv[V], av[V], wv[V], ox[V], oz[V];
                Pack<T>::load(w, c, wv);
                unpack(cur.x[k], xv, T());
                unpack(cur.d[k], dv, T());
                if (G) unpack(cur.z[k], zv, T());
                if (R) unpack(cur.a[k], av, T());
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    float s = 1.0f, sg = 0.0f;
                    if (G) { sg = sigmoidf(zv[e]); s = zv[e] * sg; }
                    const float g = xv[e] * s;
                    const float dg = rs * (dv[e] * wv[e] - g * m);
                    ox[e] = dg * s + (R ? av[e] : 0.0f);
                    if (G) oz[e] = dg * xv[e] * sg * (1.0f + zv[e] * (1.0f - sg));
                    acc[k][e] += dv[e] * rnd(g * rs, T());
                }
                Pack<T>::store(dx, o + c, ox);
                if (G) Pack<T>::store(dz, o + c, oz);
            }
        }
        if (r + 1 < r1) {
            if (PRE) cur = nxt;
            else fetch(r + 1, cur);
        }
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * V;
        if (c < d)
#pragma unroll
            for (int e = 0; e < V; ++e) dw_part[(long long)blockIdx.x * d + c + e] = acc[k][e];
    }
}

#define NORM_KERNELS(SUF, T, W)                                                              \
extern "C" __global__ void norm_fwd_##SUF(const T* x, const T* z, const W* w, T* out,        \
        float* rstd, long long rows, int d, float eps, long long ldz) {                       \
    norm_fwd<T, W>(x, z, w, out, rstd, rows, d, eps, ldz);                                    \
}                                                                                             \
extern "C" __global__ void norm_bwd_##SUF(const T* dout, const T* x, const T* z, const W* w,  \
                                          const float* rstd, const T* dres, T* dx, T* dz,     \
                                          long long rows, int d, long long ldz) {             \
    norm_bwd<T, W>(dout, x, z, w, rstd, dres, dx, dz, rows, d, ldz);                          \
}                                                                                             \
extern "C" __global__ void norm_dw_##SUF(const T* dout, const T* x, const T* z,               \
                                         const float* rstd, float* dw_part, long long rows,   \
                                         int d, int per, long long ldz) {                     \
    norm_dw<T>(dout, x, z, rstd, dw_part, rows, d, per, ldz);                                 \
}
NORM_KERNELS(f32, float, float)
NORM_KERNELS(bf16, bf16_t, bf16_t)
// Blocks of up to TH threads, at least MINB of them per SM: one pack per
// thread at 64 registers (2048 bf16 rows: 1024 threads per SM, where 72
// registers held 768 and reached 44% of DRAM bandwidth); two or four packs
// at 256 threads, 128 registers (two rows' packs in flight); the widest
// rows hold one row at a time.
#define NORM_BWD_V(SUF, T, NV, TH, MINB, PRE, GR, G, R)                                      \
extern "C" __global__ void __launch_bounds__(TH, MINB) norm_bwd_v##NV##GR##_##SUF(            \
    const T* dout, const T* x, const T* z, const T* w, const float* rstd, const T* dres,       \
    T* dx, T* dz, float* dw_part, long long rows, int d, int per, long long ldz) {            \
    norm_bwd_v<T, NV, PRE, G, R>(dout, x, z, w, rstd, dres, dx, dz, dw_part, rows, d, per,     \
                                 ldz);                                                        \
}
// Backward names: norm_bwd_v{NV}[g][r]_{dtype}, g gated, r a residual gradient.
#define NORM_V(SUF, T, NV, TH, MINB, PRE)                                                     \
extern "C" __global__ void __launch_bounds__(TH) norm_fwd_v##NV##_##SUF(                      \
    const T* x, const T* z, const T* w, T* out, float* rstd, long long rows, int d, float eps,  \
    long long ldz) {                                                                          \
    norm_fwd_v<T, NV>(x, z, w, out, rstd, rows, d, eps, ldz);                                 \
}                                                                                             \
NORM_BWD_V(SUF, T, NV, TH, MINB, PRE, , false, false)                                         \
NORM_BWD_V(SUF, T, NV, TH, MINB, PRE, g, true, false)                                         \
NORM_BWD_V(SUF, T, NV, TH, MINB, PRE, r, false, true)                                         \
NORM_BWD_V(SUF, T, NV, TH, MINB, PRE, gr, true, true)
NORM_V(f32, float, 1, 512, 2, true)
NORM_V(f32, float, 2, 256, 2, true)
NORM_V(f32, float, 4, 256, 2, false)
NORM_V(bf16, bf16_t, 1, 512, 2, true)
NORM_V(bf16, bf16_t, 2, 256, 2, true)
NORM_V(bf16, bf16_t, 4, 256, 2, false)
"#;

const NORM_THREADS: u32 = 256;
/// Most threads of a one-pack-per-thread block. (512, the v1 kernels'
/// `TH`, was slower for the gated 4096-wide rows than two packs per thread
/// at 256: 69 against 64 us backward, 31 against 27 forward on an H200.)
const NORM_WIDE_THREADS: usize = 256;
/// Rows summed per weight-gradient partial (scalar path).
const NORM_DW_ROWS: usize = 64;
/// Blocks of the vectorised backward (each a run of rows; a constant, so
/// the weight-gradient sums do not depend on the GPU). Its rows run one
/// after another (two block-wide sums each): 8 blocks per SM of a 132-SM
/// GPU keep more rows in flight than 4 did, for 2 MB more partials.
const NORM_BWD_BLOCKS: usize = 1056;

fn norm_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, COLSUM, NORM)
}

/// The gate `z` with its row stride (`d` when there is none).
fn gate_rows(z: Option<T>, d: usize) -> (Option<T>, usize) {
    match z.map(with_rows) {
        Some((z, ld)) => (Some(z), ld),
        None => (None, d),
    }
}

/// Packs per thread of the vectorised kernels and their threads per block,
/// for rows of `d` and a gate whose rows are `ldz` apart (None: the scalar
/// kernels). Rows of up to 256 packs take one per thread (whole warps).
fn packs(d: usize, dtype: DType, z: Option<&T>, ldz: usize) -> Option<(usize, u32)> {
    let v = 16 / dtype.size();
    if d == 0 || !d.is_multiple_of(v) || !ldz.is_multiple_of(v) || !z.is_none_or(aligned16) {
        return None;
    }
    let n = d / v;
    if n <= NORM_WIDE_THREADS {
        return Some((1, n.next_multiple_of(32) as u32));
    }
    match n.div_ceil(NORM_THREADS as usize) {
        2 => Some((2, NORM_THREADS)),
        3 | 4 => Some((4, NORM_THREADS)),
        _ => None,
    }
}

/// Forward: `(out, rstd)`; `x`, `z` `[.., d]` of one dtype, `w` `[d]` of the same.
pub fn rms_norm_fwd(x: T, z: Option<T>, w: T, eps: f64) -> (T, T) {
    let shape = x.meta.shape().to_vec();
    let d = *shape.last().expect("a norm over the last dim");
    let rows = shape.iter().product::<usize>() / d.max(1);
    let dtype = x.dtype;
    assert!(
        z.as_ref().is_none_or(|z| z.dtype == dtype) && w.dtype == dtype,
        "fused RMSNorm: mixed dtypes"
    );
    let (x, w) = (into_contiguous(x), into_contiguous(w));
    let (z, ldz) = gate_rows(z, d);
    let out = empty(&x, shape, dtype);
    let rstd = empty(&x, vec![rows], DType::F32);
    if rows == 0 || d == 0 {
        return (out, rstd);
    }
    let device = x.device.index;
    let sfx = suffix(dtype);
    let nv = packs(d, dtype, z.as_ref(), ldz);
    let name = match nv {
        Some((nv, _)) => format!("norm_fwd_v{nv}_{sfx}"),
        None => format!("norm_fwd_{sfx}"),
    };
    let threads = nv.map_or(NORM_THREADS, |(_, t)| t);
    // The vectorised forward: one block per row (rows in a grid-stride loop
    // waited on their block's sums one after another: latency-bound).
    let grid = match nv {
        Some(_) => (rows.min(i32::MAX as usize) as u32, 1, 1),
        None => norm_grid(rows),
    };
    let f = nvrtc::function(device, "norm", &norm_src(), &name);
    enqueue_opt(
        [Some(&out), Some(&x), Some(&w), Some(&rstd), z.as_ref()],
        move |[mut out_p, mut x_p, mut w_p, mut r_p, mut z_p], stream| {
            let (mut rows64, mut d32, mut eps32) = (rows as i64, d as i32, eps as f32);
            let mut ldz64 = ldz as i64;
            let mut params = kernel_args!(x_p, z_p, w_p, out_p, r_p, rows64, d32, eps32, ldz64);
            // SAFETY: both kernels' signature; contiguous buffers of `rows * d`
            // (`d` for w, `rows` for rstd), 16-byte aligned rows for the vectorised one.
            unsafe { launch(device, f, grid, (threads, 1, 1), 0, stream, &mut params) };
        },
    );
    drop((x, z, w));
    (out, rstd)
}

/// Backward: `(dx, dz, dw)` (dz when gated; dw in f32, `[d]`, before the
/// cast to `w`'s dtype the caller does). `acc` (x's gradient from its other
/// consumers) is added into `dx`.
pub fn rms_norm_bwd(
    dout: T,
    x: T,
    z: Option<T>,
    w: T,
    rstd: T,
    acc: Option<T>,
) -> (T, Option<T>, T) {
    let shape = x.meta.shape().to_vec();
    let d = *shape.last().expect("a norm over the last dim");
    let rows = shape.iter().product::<usize>() / d.max(1);
    let dtype = x.dtype;
    let cast = |t: T| {
        into_contiguous(if t.dtype == dtype {
            t
        } else {
            burn_cubecl::kernel::cast(t, dtype)
        })
    };
    let dout = cast(dout);
    let acc = acc.map(cast);
    let (x, w, rstd) = (
        into_contiguous(x),
        into_contiguous(w),
        into_contiguous(rstd),
    );
    let (z, ldz) = gate_rows(z, d);
    let dx = empty(&x, shape.clone(), dtype);
    let dz = z.as_ref().map(|_| empty(&x, shape, dtype));
    let nv = packs(d, dtype, z.as_ref(), ldz).filter(|_| acc.as_ref().is_none_or(aligned16));
    // Weight gradient: one partial row per run of rows, then summed in order.
    let per = match nv {
        Some(_) => rows.div_ceil(NORM_BWD_BLOCKS).max(1),
        None => NORM_DW_ROWS,
    };
    let parts = rows.div_ceil(per).max(1);
    let threads = nv.map_or(NORM_THREADS, |(_, t)| t);
    let dw_part = empty(&x, vec![parts, d], DType::F32);
    // Every column is written by `colsum` (zeros when there are no rows).
    let dw = if rows > 0 {
        empty(&x, vec![d], DType::F32)
    } else {
        zeros_f32(&x, vec![d])
    };
    if rows > 0 && d > 0 {
        let device = x.device.index;
        let src = norm_src();
        let sfx = suffix(dtype);
        let (f, f_dw) = match nv {
            Some((nv, _)) => (
                nvrtc::function(
                    device,
                    "norm",
                    &src,
                    &format!(
                        "norm_bwd_v{nv}{}{}_{sfx}",
                        if z.is_some() { "g" } else { "" },
                        if acc.is_some() { "r" } else { "" }
                    ),
                ),
                None,
            ),
            None => (
                nvrtc::function(device, "norm", &src, &format!("norm_bwd_{sfx}")),
                Some(nvrtc::function(
                    device,
                    "norm",
                    &src,
                    &format!("norm_dw_{sfx}"),
                )),
            ),
        };
        let f_sum = nvrtc::function(device, "norm", &src, "colsum");
        enqueue_opt(
            [
                Some(&dx),
                Some(&dout),
                Some(&x),
                Some(&w),
                Some(&rstd),
                z.as_ref(),
                dz.as_ref(),
                Some(&dw_part),
                Some(&dw),
                acc.as_ref(),
            ],
            move |[
                mut dx_p,
                mut dy_p,
                mut x_p,
                mut w_p,
                mut r_p,
                mut z_p,
                mut dz_p,
                mut part_p,
                mut dw_p,
                mut acc_p,
            ],
                  stream| {
                let (mut rows64, mut d32) = (rows as i64, d as i32);
                let (mut per32, mut parts32, mut ldz64) = (per as i32, parts as i32, ldz as i64);
                let mut sum = kernel_args!(part_p, dw_p, parts32, d32);
                // SAFETY: the kernels' signatures; `[rows, d]` tensors (16-byte
                // aligned rows for the vectorised one), `dw_part` `[parts, d]`, `dw` `[d]`.
                unsafe {
                    match f_dw {
                        None => {
                            let mut p = kernel_args!(
                                dy_p, x_p, z_p, w_p, r_p, acc_p, dx_p, dz_p, part_p, rows64, d32,
                                per32, ldz64
                            );
                            launch(
                                device,
                                f,
                                (parts as u32, 1, 1),
                                (threads, 1, 1),
                                0,
                                stream,
                                &mut p,
                            );
                        }
                        Some(f_dw) => {
                            let mut p1 = kernel_args!(
                                dy_p, x_p, z_p, w_p, r_p, acc_p, dx_p, dz_p, rows64, d32, ldz64
                            );
                            let mut p2 = kernel_args!(
                                dy_p, x_p, z_p, r_p, part_p, rows64, d32, per32, ldz64
                            );
                            launch(
                                device,
                                f,
                                norm_grid(rows),
                                (NORM_THREADS, 1, 1),
                                0,
                                stream,
                                &mut p1,
                            );
                            let cols = d.div_ceil(256) as u32;
                            launch(
                                device,
                                f_dw,
                                (cols, parts as u32, 1),
                                (256, 1, 1),
                                0,
                                stream,
                                &mut p2,
                            );
                        }
                    }
                    let blocks = d.div_ceil(32) as u32;
                    launch(
                        device,
                        f_sum,
                        (blocks, 1, 1),
                        (32, 32, 1),
                        0,
                        stream,
                        &mut sum,
                    );
                }
            },
        );
    }
    drop((dout, x, z, w, rstd, dw_part, acc));
    (dx, dz, dw)
}
