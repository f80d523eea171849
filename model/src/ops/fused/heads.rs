//! Per-head elementwise pieces of the Mamba2 mixer: `dt` softplus and the
//! per-head scales.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{empty, same_dtype, suffix, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, grid_for, launch, launch_flat};

/// Per-head elementwise pieces of the Mamba2 mixer whose parameter
/// gradients burn reduces slowly (one block over all rows): `dt =
/// clamp(softplus(raw + dt_bias))` and `y = x * a[head]` (`A dt`, the `D`
/// skip). The backward kernels sum the per-head gradients in shared memory
/// and add each block's sums atomically.
const HEADS: &str = r#"
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float softplus(float s) { return s > 20.0f ? s : log1pf(__expf(s)); }

// (i / inner) % h, in 32-bit arithmetic when the tensor allows (64-bit division is slow).
__device__ __forceinline__ int head_of(long long i, int inner, int h, long long n) {
    if (n <= 0xffffffffLL) return (int)(((unsigned)i / (unsigned)inner) % (unsigned)h);
    return (int)((i / inner) % h);
}

// Adds v to acc[h]; lanes of a warp that share h (inner a multiple of 32) sum first.
__device__ __forceinline__ void head_add(float* acc, int h, float v, bool warp_shared) {
    if (warp_shared) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) atomicAdd(acc + h, v);
    } else {
        atomicAdd(acc + h, v);
    }
}

template <typename T>
__device__ void dt_fwd(const T* raw, const T* bias, float* dt, long long n, int h, float lo, float hi) {
    GRID_STRIDE(i, n) {
        const float s = rnd(ld(raw, i) + ld(bias, head_of(i, 1, h, n)), T());
        // torch clamps a bf16 tensor against limits in its own dtype.
        dt[i] = fminf(fmaxf(rnd(softplus(s), T()), rnd(lo, T())), rnd(hi, T()));
    }
}

template <typename T>
__device__ void dt_bwd(const float* g, const T* raw, const T* bias, T* draw, float* dbias,
                       long long n, int h, float lo, float hi) {
    extern __shared__ float acc[];
    for (int j = threadIdx.x; j < h; j += blockDim.x) acc[j] = 0.0f;
    __syncthreads();
    // Loop bounds equal across the block, so every thread reaches the barriers.
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i0 = (long long)blockIdx.x * blockDim.x; i0 < n; i0 += stride) {
        const long long i = i0 + threadIdx.x;
        if (i < n) {
            const int hh = head_of(i, 1, h, n);
            const float s = rnd(ld(raw, i) + ld(bias, hh), T());
            const float sp = rnd(softplus(s), T());
            const bool inside = sp >= rnd(lo, T()) && sp <= rnd(hi, T());
            const float d = inside ? g[i] / (1.0f + __expf(-s)) : 0.0f;
            st(draw, i, d);
            atomicAdd(acc + hh, d);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < h; j += blockDim.x) atomicAdd(dbias + j, acc[j]);
}

template <typename T>
__device__ void scale_fwd(const T* x, const T* a, T* y, long long n, int h, int inner) {
    GRID_STRIDE(i, n) { st(y, i, ld(x, i) * ld(a, head_of(i, inner, h, n))); }
}

template <typename T>
__device__ void scale_bwd(const T* g, const T* x, const T* a, T* dx, float* da,
                          long long n, int h, int inner) {
    extern __shared__ float acc[];
    for (int j = threadIdx.x; j < h; j += blockDim.x) acc[j] = 0.0f;
    __syncthreads();
    const bool warp_shared = inner % 32 == 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i0 = (long long)blockIdx.x * blockDim.x; i0 < n; i0 += stride) {
        const long long i = i0 + threadIdx.x;
        // Past the end: contribute 0 to keep whole warps in the shuffle.
        const bool in = i < n;
        const int hh = in ? head_of(i, inner, h, n) : 0;
        const float gv = in ? ld(g, i) : 0.0f;
        if (in) st(dx, i, gv * ld(a, hh));
        head_add(acc, hh, in ? gv * ld(x, i) : 0.0f, warp_shared);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < h; j += blockDim.x) atomicAdd(da + j, acc[j]);
}

#define HEAD_KERNELS(SUF, T)                                                                     \
extern "C" __global__ void dt_fwd_##SUF(const T* raw, const T* bias, float* dt, long long n,     \
                                        int h, float lo, float hi) {                              \
    dt_fwd<T>(raw, bias, dt, n, h, lo, hi);                                                       \
}                                                                                                 \
extern "C" __global__ void dt_bwd_##SUF(const float* g, const T* raw, const T* bias, T* draw,    \
                                        float* dbias, long long n, int h, float lo, float hi) {  \
    dt_bwd<T>(g, raw, bias, draw, dbias, n, h, lo, hi);                                           \
}                                                                                                 \
extern "C" __global__ void scale_fwd_##SUF(const T* x, const T* a, T* y, long long n, int h,     \
                                           int inner) {                                           \
    scale_fwd<T>(x, a, y, n, h, inner);                                                           \
}                                                                                                 \
extern "C" __global__ void scale_bwd_##SUF(const T* g, const T* x, const T* a, T* dx, float* da, \
                                           long long n, int h, int inner) {                       \
    scale_bwd<T>(g, x, a, dx, da, n, h, inner);                                                   \
}
HEAD_KERNELS(f32, float)
HEAD_KERNELS(bf16, bf16_t)
"#;

fn heads_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, HEADS)
}

/// `(h, inner)`: dim 2 of `x` holds the heads; `inner` elements follow each.
fn head_layout(x: &T, a: &T) -> (usize, usize, usize) {
    let s = x.meta.shape();
    assert!(s.len() >= 3, "per-head op: x must be [b, l, h, ..]");
    let h = s[2];
    assert_eq!(
        a.meta.shape().num_elements(),
        h,
        "per-head op: one parameter per head"
    );
    assert!(h <= 8192, "per-head op: {h} heads");
    (s.num_elements(), h, s[3..].iter().product())
}

/// `clamp(softplus(raw + bias), lo, hi)` in f32, `raw [b, l, h]`.
pub fn dt_softplus_fwd(raw: T, bias: T, lo: f64, hi: f64) -> T {
    let dtype = raw.dtype;
    let (raw, bias) = (into_contiguous(raw), same_dtype(bias, dtype));
    let (n, h, _) = head_layout(&raw, &bias);
    let dt = empty(&raw, raw.meta.shape().to_vec(), DType::F32);
    if n == 0 {
        return dt;
    }
    let device = raw.device.index;
    let f = nvrtc::function(
        device,
        "heads",
        &heads_src(),
        &format!("dt_fwd_{}", suffix(dtype)),
    );
    enqueue(
        [&dt, &raw, &bias],
        move |[mut dt_p, mut r_p, mut b_p], stream| {
            let (mut n64, mut h32, mut lo32, mut hi32) = (n as i64, h as i32, lo as f32, hi as f32);
            let mut params = kernel_args!(r_p, b_p, dt_p, n64, h32, lo32, hi32);
            // SAFETY: the kernel's signature; raw, dt `[n]`, bias `[h]`.
            unsafe { launch_flat(device, f, n, stream, &mut params) };
        },
    );
    drop((raw, bias));
    dt
}

/// `(draw, dbias)`; `dbias` in f32.
pub fn dt_softplus_bwd(g: T, raw: T, bias: T, lo: f64, hi: f64) -> (T, T) {
    let dtype = raw.dtype;
    let (raw, bias) = (into_contiguous(raw), same_dtype(bias, dtype));
    let g = same_dtype(g, DType::F32);
    let (n, h, _) = head_layout(&raw, &bias);
    let draw = empty(&raw, raw.meta.shape().to_vec(), dtype);
    let dbias = zeros_f32(&raw, vec![h]);
    if n > 0 {
        let device = raw.device.index;
        let f = nvrtc::function(
            device,
            "heads",
            &heads_src(),
            &format!("dt_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&draw, &g, &raw, &bias, &dbias],
            move |[mut d_p, mut g_p, mut r_p, mut b_p, mut db_p], stream| {
                let (mut n64, mut h32, mut lo32, mut hi32) =
                    (n as i64, h as i32, lo as f32, hi as f32);
                let mut params = kernel_args!(g_p, r_p, b_p, d_p, db_p, n64, h32, lo32, hi32);
                // SAFETY: as in the forward; `h` floats of shared memory.
                unsafe {
                    launch(
                        device,
                        f,
                        grid_for(n, 256),
                        (256, 1, 1),
                        (h * 4) as u32,
                        stream,
                        &mut params,
                    )
                };
            },
        );
    }
    drop((g, raw, bias));
    (draw, dbias)
}

/// `x * a[head]`, `x [b, l, h, ..]`, in `x`'s dtype.
pub fn scale_heads_fwd(x: T, a: T) -> T {
    let dtype = x.dtype;
    let (x, a) = (into_contiguous(x), same_dtype(a, dtype));
    let (n, h, inner) = head_layout(&x, &a);
    let y = empty(&x, x.meta.shape().to_vec(), dtype);
    if n == 0 {
        return y;
    }
    let device = x.device.index;
    let f = nvrtc::function(
        device,
        "heads",
        &heads_src(),
        &format!("scale_fwd_{}", suffix(dtype)),
    );
    enqueue([&y, &x, &a], move |[mut y_p, mut x_p, mut a_p], stream| {
        let (mut n64, mut h32, mut in32) = (n as i64, h as i32, inner as i32);
        let mut params = kernel_args!(x_p, a_p, y_p, n64, h32, in32);
        // SAFETY: the kernel's signature; x, y `[n]`, a `[h]`.
        unsafe { launch_flat(device, f, n, stream, &mut params) };
    });
    drop((x, a));
    y
}

/// `(dx, da)`; `da` in f32.
pub fn scale_heads_bwd(g: T, x: T, a: T) -> (T, T) {
    let dtype = x.dtype;
    let (x, a, g) = (
        into_contiguous(x),
        same_dtype(a, dtype),
        same_dtype(g, dtype),
    );
    let (n, h, inner) = head_layout(&x, &a);
    let dx = empty(&x, x.meta.shape().to_vec(), dtype);
    let da = zeros_f32(&x, vec![h]);
    if n > 0 {
        let device = x.device.index;
        let f = nvrtc::function(
            device,
            "heads",
            &heads_src(),
            &format!("scale_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&dx, &g, &x, &a, &da],
            move |[mut dx_p, mut g_p, mut x_p, mut a_p, mut da_p], stream| {
                let (mut n64, mut h32, mut in32) = (n as i64, h as i32, inner as i32);
                let mut params = kernel_args!(g_p, x_p, a_p, dx_p, da_p, n64, h32, in32);
                // SAFETY: as in the forward; `h` floats of shared memory.
                unsafe {
                    launch(
                        device,
                        f,
                        grid_for(n, 256),
                        (256, 1, 1),
                        (h * 4) as u32,
                        stream,
                        &mut params,
                    )
                };
            },
        );
    }
    drop((g, x, a));
    (dx, da)
}
