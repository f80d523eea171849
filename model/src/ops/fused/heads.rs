//! Per-head elementwise pieces of the Mamba2 mixer: `dt` softplus and the
//! per-head scales.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{COLSUM, empty, launch_colsum, same_dtype, suffix, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch, launch_flat};

/// Per-head elementwise pieces of the Mamba2 mixer whose parameter
/// gradients burn reduces slowly (one block over all rows): `dt =
/// clamp(softplus(raw + dt_bias))` and `y = x * a[head]` (`A dt`, the `D`
/// skip). The backward kernels sum the per-head gradients without atomics:
/// each block sums a run of rows per element position, then `colsum` adds
/// the blocks and `head_sum_inner` a head's positions, in a fixed order, so
/// the gradients are the same bits on every run.
const HEADS: &str = r#"
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float softplus(float s) { return s > 20.0f ? s : log1pf(__expf(s)); }

// (i / inner) % h, in 32-bit arithmetic when the tensor allows (64-bit division is slow).
__device__ __forceinline__ int head_of(long long i, int inner, int h, long long n) {
    if (n <= 0xffffffffLL) return (int)(((unsigned)i / (unsigned)inner) % (unsigned)h);
    return (int)((i / inner) % h);
}

template <typename T>
__device__ void dt_fwd(const T* raw, const T* bias, float* dt, long long n, int h, float lo, float hi) {
    GRID_STRIDE(i, n) {
        const float s = rnd(ld(raw, i) + ld(bias, head_of(i, 1, h, n)), T());
        // torch clamps a bf16 tensor against limits in its own dtype.
        dt[i] = fminf(fmaxf(rnd(softplus(s), T()), rnd(lo, T())), rnd(hi, T()));
    }
}

// Block blockIdx.x takes rows [blockIdx.x * per, ..) of `rows` rows of h;
// thread e sums its position over those rows in order into part[block, e].
template <typename T>
__device__ void dt_bwd(const float* g, const T* raw, const T* bias, T* draw, float* part,
                       long long rows, int h, float lo, float hi, int per) {
    const long long r0 = (long long)blockIdx.x * per;
    const long long r1 = min(r0 + per, rows);
    for (int e = threadIdx.x; e < h; e += blockDim.x) {
        const float bv = ld(bias, e);
        float acc = 0.0f;
#pragma unroll 4
        for (long long r = r0; r < r1; ++r) {
            const long long i = r * h + e;
            const float s = rnd(ld(raw, i) + bv, T());
            const float sp = rnd(softplus(s), T());
            const bool inside = sp >= rnd(lo, T()) && sp <= rnd(hi, T());
            const float d = inside ? g[i] * sigm(s) : 0.0f;
            st(draw, i, d);
            acc += d;
        }
        part[(long long)blockIdx.x * h + e] = acc;
    }
}

template <typename T>
__device__ void scale_fwd(const T* x, const T* a, T* y, long long n, int h, int inner) {
    GRID_STRIDE(i, n) { st(y, i, ld(x, i) * ld(a, head_of(i, inner, h, n))); }
}

// As dt_bwd, over rows of m = h * inner elements (head e / inner).
template <typename T>
__device__ void scale_bwd(const T* g, const T* x, const T* a, T* dx, float* part,
                          long long rows, int m, int inner, int per) {
    const long long r0 = (long long)blockIdx.x * per;
    const long long r1 = min(r0 + per, rows);
    for (int e = threadIdx.x; e < m; e += blockDim.x) {
        const float av = ld(a, e / inner);
        float acc = 0.0f;
#pragma unroll 4
        for (long long r = r0; r < r1; ++r) {
            const long long i = r * m + e;
            const float gv = ld(g, i);
            st(dx, i, gv * av);
            acc += gv * ld(x, i);
        }
        part[(long long)blockIdx.x * m + e] = acc;
    }
}

// out[j] = sum of sums[j * inner .. (j + 1) * inner), in order.
extern "C" __global__ void head_sum_inner(const float* sums, float* out, int h, int inner) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    float t = 0.0f;
    for (int k = 0; k < inner; ++k) t += sums[(long long)j * inner + k];
    out[j] = t;
}

#define HEAD_KERNELS(SUF, T)                                                                     \
extern "C" __global__ void dt_fwd_##SUF(const T* raw, const T* bias, float* dt, long long n,     \
                                        int h, float lo, float hi) {                              \
    dt_fwd<T>(raw, bias, dt, n, h, lo, hi);                                                       \
}                                                                                                 \
extern "C" __global__ void dt_bwd_##SUF(const float* g, const T* raw, const T* bias, T* draw,    \
        float* part, long long rows, int h, float lo, float hi, int per) {                        \
    dt_bwd<T>(g, raw, bias, draw, part, rows, h, lo, hi, per);                                    \
}                                                                                                 \
extern "C" __global__ void scale_fwd_##SUF(const T* x, const T* a, T* y, long long n, int h,     \
                                           int inner) {                                           \
    scale_fwd<T>(x, a, y, n, h, inner);                                                           \
}                                                                                                 \
extern "C" __global__ void scale_bwd_##SUF(const T* g, const T* x, const T* a, T* dx,          \
        float* part, long long rows, int m, int inner, int per) {                                 \
    scale_bwd<T>(g, x, a, dx, part, rows, m, inner, per);                                         \
}
HEAD_KERNELS(f32, float)
HEAD_KERNELS(bf16, bf16_t)
"#;

fn heads_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, COLSUM, HEADS)
}

/// Blocks of the per-head backward kernels (a constant: the sums' order
/// must not depend on the GPU).
const HEAD_PARTS: usize = 264;

/// `(per, parts)`: rows per block and blocks for `rows` rows.
fn head_parts(rows: usize) -> (usize, usize) {
    let per = rows.div_ceil(HEAD_PARTS).max(1);
    (per, rows.div_ceil(per).max(1))
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
    if n == 0 {
        return (draw, zeros_f32(&raw, vec![h]));
    }
    let rows = n / h;
    let (per, parts) = head_parts(rows);
    let part = empty(&raw, vec![parts * h], DType::F32);
    let dbias = empty(&raw, vec![h], DType::F32);
    let device = raw.device.index;
    let src = heads_src();
    let f = nvrtc::function(device, "heads", &src, &format!("dt_bwd_{}", suffix(dtype)));
    let f_sum = nvrtc::function(device, "heads", &src, "colsum");
    enqueue(
        [&draw, &g, &raw, &bias, &part, &dbias],
        move |[mut d_p, mut g_p, mut r_p, mut b_p, mut part_p, db_p], stream| {
            let (mut rows64, mut h32, mut lo32, mut hi32, mut per32) =
                (rows as i64, h as i32, lo as f32, hi as f32, per as i32);
            let mut params =
                kernel_args!(g_p, r_p, b_p, d_p, part_p, rows64, h32, lo32, hi32, per32);
            // SAFETY: the kernels' signatures; raw, g, draw `[rows, h]`, bias and
            // dbias `[h]`, part `[parts, h]`.
            unsafe {
                launch(
                    device,
                    f,
                    (parts as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    stream,
                    &mut params,
                );
                launch_colsum(device, f_sum, stream, part_p, db_p, parts, h);
            }
        },
    );
    drop((g, raw, bias, part));
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
    if n == 0 {
        return (dx, zeros_f32(&x, vec![h]));
    }
    let m = h * inner;
    let rows = n / m;
    let (per, parts) = head_parts(rows);
    let part = empty(&x, vec![parts * m], DType::F32);
    // Per position, then per head (the same buffer when a head is one position).
    let sums = empty(&x, vec![m], DType::F32);
    let da = if inner == 1 {
        sums.clone()
    } else {
        empty(&x, vec![h], DType::F32)
    };
    let device = x.device.index;
    let src = heads_src();
    let f = nvrtc::function(
        device,
        "heads",
        &src,
        &format!("scale_bwd_{}", suffix(dtype)),
    );
    let f_sum = nvrtc::function(device, "heads", &src, "colsum");
    let f_heads = nvrtc::function(device, "heads", &src, "head_sum_inner");
    enqueue(
        [&dx, &g, &x, &a, &part, &sums, &da],
        move |[
            mut dx_p,
            mut g_p,
            mut x_p,
            mut a_p,
            mut part_p,
            mut s_p,
            mut da_p,
        ],
              stream| {
            let (mut rows64, mut m32, mut in32, mut per32, mut h32) =
                (rows as i64, m as i32, inner as i32, per as i32, h as i32);
            let mut params = kernel_args!(g_p, x_p, a_p, dx_p, part_p, rows64, m32, in32, per32);
            let mut heads = kernel_args!(s_p, da_p, h32, in32);
            // SAFETY: the kernels' signatures; g, x, dx `[rows, m]`, a and da `[h]`,
            // part `[parts, m]`, sums `[m]`.
            unsafe {
                launch(
                    device,
                    f,
                    (parts as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    stream,
                    &mut params,
                );
                launch_colsum(device, f_sum, stream, part_p, s_p, parts, m);
                if inner > 1 {
                    launch(
                        device,
                        f_heads,
                        (h.div_ceil(128) as u32, 1, 1),
                        (128, 1, 1),
                        0,
                        stream,
                        &mut heads,
                    );
                }
            }
        },
    );
    drop((g, x, a, part));
    (dx, da)
}
