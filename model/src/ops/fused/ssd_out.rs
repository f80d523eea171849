//! The SSD's output: `y_diag + exp(cs) y_off + D x` in one pass.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;

use super::{Cb, empty, same_dtype, suffix, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// The SSD scan's output, fused: `y = y_diag + exp(cs) * y_off + D[head] x`
/// per row `r` of `p` values (rows ordered `(b, l, h)`, `p` even), rounded
/// once to `x`'s dtype; `y_diag` f32, `y_off` in `x`'s dtype (a bf16 GEMM's
/// output in bf16 training). One warp per row, reading pairs; the backward's row
/// sums (the `cs` and `D` gradients) need no atomics (deterministic).
const SSD_OUT: &str = r#"
// Two neighbouring values (even index: 8-byte f32 / 4-byte bf16 aligned).
__device__ __forceinline__ float2 ld2(const float* p, long long i) {
    return *reinterpret_cast<const float2*>(p + i);
}
__device__ __forceinline__ float2 ld2(const bf16_t* p, long long i) {
    const unsigned int u = *reinterpret_cast<const unsigned int*>(p + i);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ void st2(float* p, long long i, float a, float b) {
    *reinterpret_cast<float2*>(p + i) = make_float2(a, b);
}
__device__ __forceinline__ void st2(bf16_t* p, long long i, float a, float b) {
    *reinterpret_cast<unsigned int*>(p + i) = pack2(a, b);
}

// Row r's token and head (rows ordered (b, l, h)): a 32-bit division where
// the rows fit (a 64-bit one is a ~70-instruction call).
__device__ __forceinline__ void token_head(long long r, int h, long long& tok, int& hh) {
    if (r < 0x7fffffffLL) {
        const unsigned q = (unsigned)r / (unsigned)h;
        tok = q;
        hh = (int)((unsigned)r - q * (unsigned)h);
    } else {
        tok = r / h;
        hh = (int)(r - tok * h);
    }
}

// One warp per row of p values (p even); rows ordered (b, l, h).
#define ROWS_PER_WARP(r, rows)                                                                   \
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; \
         r += (long long)gridDim.x * (blockDim.x >> 5))

template <typename T>
__device__ void ssd_out_fwd(const float* yd, const T* yo, const float* cs, const T* x,
                            const T* d, T* y, long long rows, int h, int p, long long ldx) {
    const int lane = threadIdx.x & 31;
    ROWS_PER_WARP(r, rows) {
        const float e = expf(cs[r]);
        long long tok;
        int hh;
        token_head(r, h, tok, hh);
        const float dh = ld(d, hh);
        for (int j = 2 * lane; j < p; j += 64) {
            const long long i = r * p + j, xi = tok * ldx + (long long)hh * p + j;
            const float2 a = ld2(yd, i), o = ld2(yo, i), xv = ld2(x, xi);
            st2(y, i, a.x + o.x * e + xv.x * dh, a.y + o.y * e + xv.y * dh);
        }
    }
}

template <typename T>
__device__ void ssd_out_bwd(const T* g, const T* yo, const float* cs, const T* x, const T* d,
                            T* dyo, float* dcs, T* dx, float* dd_rows,
                            long long rows, int h, int p, long long ldx) {
    const int lane = threadIdx.x & 31;
    ROWS_PER_WARP(r, rows) {
        const float e = expf(cs[r]);
        long long tok;
        int hh;
        token_head(r, h, tok, hh);
        const float dh = ld(d, hh);
        float s_cs = 0.0f, s_d = 0.0f;
        for (int j = 2 * lane; j < p; j += 64) {
            const long long i = r * p + j, xi = tok * ldx + (long long)hh * p + j;
            const float2 gv = ld2(g, i), o = ld2(yo, i), xv = ld2(x, xi);
            st2(dyo, i, gv.x * e, gv.y * e);
            st2(dx, i, gv.x * dh, gv.y * dh);
            s_cs += gv.x * o.x + gv.y * o.y;
            s_d += gv.x * xv.x + gv.y * xv.y;
        }
        for (int o = 16; o > 0; o >>= 1) {
            s_cs += __shfl_xor_sync(0xffffffffu, s_cs, o);
            s_d += __shfl_xor_sync(0xffffffffu, s_d, o);
        }
        if (lane == 0) {
            dcs[r] = s_cs * e;
            dd_rows[r] = s_d;
        }
    }
}

// dd[hh] = sum of dd_rows[r] over the rows of head hh, one block per head,
// in a fixed order (deterministic).
extern "C" __global__ void head_sum(const float* dd_rows, float* dd, long long rows, int h) {
    __shared__ float part[256];
    const int hh = blockIdx.x;
    float s = 0.0f;
    for (long long r = hh + (long long)threadIdx.x * h; r < rows; r += (long long)blockDim.x * h)
        s += dd_rows[r];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) dd[hh] = part[0];
}

#define SSD_OUT_KERNELS(SUF, T)                                                                   \
extern "C" __global__ void ssd_out_fwd_##SUF(const float* yd, const T* yo, const float* cs,      \
                                             const T* x, const T* d, T* y, long long rows, int h, \
                                             int p, long long ldx) {                              \
    ssd_out_fwd<T>(yd, yo, cs, x, d, y, rows, h, p, ldx);                                         \
}                                                                                                 \
extern "C" __global__ void ssd_out_bwd_##SUF(const T* g, const T* yo, const float* cs,           \
                                             const T* x, const T* d, T* dyo, float* dcs,          \
                                             T* dx, float* dd_rows, long long rows, int h, int p, \
                                             long long ldx) {                                     \
    ssd_out_bwd<T>(g, yo, cs, x, d, dyo, dcs, dx, dd_rows, rows, h, p, ldx);                      \
}
SSD_OUT_KERNELS(f32, float)
SSD_OUT_KERNELS(bf16, bf16_t)
"#;

fn ssd_out_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, SSD_OUT)
}

/// `(rows, h, p)` of the SSD output: `x [.., h, p]`, `d [h]`, `cs` one value
/// per row, `y_diag`/`y_off` as `x`.
fn ssd_out_dims(yd: &T, yo: &T, cs: &T, x: &T, d: &T) -> (usize, usize, usize) {
    let s = x.meta.shape();
    assert!(s.len() >= 2, "ssd_out: x must be [.., h, p]");
    let (h, p) = (s[s.len() - 2], s[s.len() - 1]);
    let n = s.num_elements();
    let rows = n / p.max(1);
    assert_eq!(d.meta.shape().num_elements(), h, "ssd_out: one D per head");
    assert_eq!(yd.meta.shape().num_elements(), n, "ssd_out: y_diag");
    assert_eq!(yo.meta.shape().num_elements(), n, "ssd_out: y_off");
    assert_eq!(cs.meta.shape().num_elements(), rows, "ssd_out: cs");
    assert!(
        p % 2 == 0,
        "ssd_out: rows of {p} values (the kernels read pairs)"
    );
    (rows, h, p)
}

fn f32_dense(t: T) -> T {
    same_dtype(t, DType::F32)
}

/// `y_diag + exp(cs) * y_off + D x` in `x`'s dtype and shape (`y_off` read
/// in `x`'s dtype).
pub fn ssd_out_fwd(yd: T, yo: T, cs: T, x: T, d: T) -> T {
    let dtype = x.dtype;
    let (yd, yo, cs) = (f32_dense(yd), same_dtype(yo, dtype), f32_dense(cs));
    let ((x, ldx), d) = (super::token_rows(x, 2), same_dtype(d, dtype));
    let (rows, h, p) = ssd_out_dims(&yd, &yo, &cs, &x, &d);
    let y = empty(&x, x.meta.shape().to_vec(), dtype);
    if rows * p == 0 {
        return y;
    }
    let device = x.device.index;
    let f = nvrtc::function(
        device,
        "ssd_out",
        &ssd_out_src(),
        &format!("ssd_out_fwd_{}", suffix(dtype)),
    );
    enqueue(
        [&y, &yd, &yo, &cs, &x, &d],
        move |[mut y_p, mut yd_p, mut yo_p, mut cs_p, mut x_p, mut d_p], stream| {
            let (mut r64, mut h32, mut p32, mut ld64) =
                (rows as i64, h as i32, p as i32, ldx as i64);
            let mut params = kernel_args!(yd_p, yo_p, cs_p, x_p, d_p, y_p, r64, h32, p32, ld64);
            // SAFETY: the kernel's signature; y, yd, yo, x `[rows * p]`, cs `[rows]`, d `[h]`.
            unsafe { launch_warp_rows(device, f, rows, stream, &mut params) };
        },
    );
    drop((yd, yo, cs, x, d));
    y
}

/// Launches `f` with a warp per row: blocks of 8 warps, grid-stride past
/// a few waves.
///
/// # Safety
/// As [`launch`]: `params` match `f`'s signature.
unsafe fn launch_warp_rows(
    device: usize,
    f: nvrtc::Kernel,
    rows: usize,
    stream: nvrtc::Stream,
    params: &mut [*mut std::ffi::c_void],
) {
    let grid = (rows.div_ceil(8).clamp(1, 132 * 64) as u32, 1, 1);
    // SAFETY: forwarded from the caller.
    unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, params) }
}

/// `(dy_diag, dy_off, dcs, dx, dd)`: `dy_diag` is the output gradient
/// itself in `x`'s dtype (no copy: `y_diag` adds in unscaled), `dy_off`
/// and `dx` in `x`'s dtype, the rest f32.
pub fn ssd_out_bwd(g: T, yo: T, cs: T, x: T, d: T) -> (T, T, T, T, T) {
    let dtype = x.dtype;
    let (yo, cs) = (same_dtype(yo, dtype), f32_dense(cs));
    let ((x, ldx), d, g) = (
        super::token_rows(x, 2),
        same_dtype(d, dtype),
        same_dtype(g, dtype),
    );
    let (rows, h, p) = ssd_out_dims(&yo, &yo, &cs, &x, &d);
    let shape = x.meta.shape().to_vec();
    let dyo = empty(&x, shape.clone(), dtype);
    let dx = empty(&x, shape.clone(), dtype);
    let dcs = empty(&x, cs.meta.shape().to_vec(), DType::F32);
    let dd_rows = empty(&x, vec![rows], DType::F32);
    let dd = empty(&x, vec![h], DType::F32);
    if rows * p > 0 {
        let device = x.device.index;
        let f = nvrtc::function(
            device,
            "ssd_out",
            &ssd_out_src(),
            &format!("ssd_out_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&g, &yo, &cs, &x, &d, &dyo, &dcs, &dx, &dd_rows],
            move |[
                mut g_p,
                mut yo_p,
                mut cs_p,
                mut x_p,
                mut d_p,
                mut dyo_p,
                mut dcs_p,
                mut dx_p,
                mut dd_p,
            ],
                  stream| {
                let (mut r64, mut h32, mut p32) = (rows as i64, h as i32, p as i32);
                let mut ld64 = ldx as i64;
                let mut params = kernel_args!(
                    g_p, yo_p, cs_p, x_p, d_p, dyo_p, dcs_p, dx_p, dd_p, r64, h32, p32, ld64
                );
                // SAFETY: the kernel's signature; a warp per row, 8 rows per block.
                unsafe { launch_warp_rows(device, f, rows, stream, &mut params) };
            },
        );
        let sum = nvrtc::function(device, "ssd_out", &ssd_out_src(), "head_sum");
        enqueue([&dd_rows, &dd], move |[mut rows_p, mut dd_p], stream| {
            let (mut r64, mut h32) = (rows as i64, h as i32);
            let mut params = kernel_args!(rows_p, dd_p, r64, h32);
            // SAFETY: the kernel's signature; a block of 256 threads per head.
            unsafe {
                launch(
                    device,
                    sum,
                    (h as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
        });
    } else {
        drop(dd);
        let dyd = Cb::float_reshape(g, shape.into());
        return (dyd, dyo, dcs, dx, zeros_f32(&x, vec![h]));
    }
    drop((yo, cs, x, d, dd_rows));
    (Cb::float_reshape(g, shape.into()), dyo, dcs, dx, dd)
}
