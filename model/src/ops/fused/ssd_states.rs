//! The SSD's chunk-to-chunk state recurrence and per-row scales.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;

use super::{Cb, aligned16, empty, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, enqueue_opt, grid_for, launch, launch_flat};

/// The chunk-to-chunk recurrence of the SSD states and a per-row scale,
/// in the scan's own layout (no per-head copies).
const SSD_AUX: &str = r#"
// entering[c] = exp(a[c-1]) entering[c-1] + S[c-1], entering[0] = 0, with
// S, entering [b, nc, n, h, p] and a [b, nc, h]. grid (b * h, ceil(n p / 256)):
// one thread per element of a head's n x p state, walking the chunks. The
// recurrence runs in f32; entering is stored in TE (bf16 in bf16 training:
// the operand of the bf16 product with C, as mamba_ssm's state passing
// writes it in C's dtype).
template <typename TE>
__device__ void ssd_states_fwd(const float* __restrict__ S, const float* __restrict__ a,
                               TE* __restrict__ E, int nc, int n, int h, int p)
{
    const int hh = (int)(blockIdx.x % (unsigned)h);
    const long long bi = blockIdx.x / (unsigned)h;
    const int e = blockIdx.y * 256 + threadIdx.x;
    if (e >= n * p) return;
    const int ni = e / p, pi = e - ni * p;
    const long long plane = (long long)n * h * p;
    const long long off = bi * nc * plane + ((long long)ni * h + hh) * p + pi;
    float st_ = 0.0f;
    for (int c = 0; c < nc; ++c) {
        const long long i = off + c * plane;
        st(E, i, st_);
        st_ = __expf(a[(bi * nc + c) * h + hh]) * st_ + S[i];
    }
}

// Backward, with G[c] the whole gradient of entering[c]:
//   dS[c] = G[c+1],  da[c] = exp(a[c]) sum(G[c+1] o entering[c]),
//   G[c] = dE[c] + exp(a[c]) G[c+1].
// da's sums go per block to part [b, ceil(n p / 256), nc, h], added after
// in a fixed order. 256 threads. dE and E in TE, dS f32.
template <typename TE>
__device__ void ssd_states_bwd(const TE* __restrict__ dE, const float* __restrict__ a,
                               const TE* __restrict__ E, float* __restrict__ dS,
                               float* __restrict__ part, int nc, int n, int h, int p)
{
    __shared__ float warp_sums[8];
    const int hh = (int)(blockIdx.x % (unsigned)h);
    const long long bi = blockIdx.x / (unsigned)h;
    const int e = blockIdx.y * 256 + threadIdx.x;
    const bool valid = e < n * p;
    const int ni = e / p, pi = e - ni * p;
    const long long plane = (long long)n * h * p;
    const long long off = bi * nc * plane + ((long long)ni * h + hh) * p + pi;
    float gnext = 0.0f;
    for (int c = nc - 1; c >= 0; --c) {
        const long long i = off + c * plane;
        const float ea = __expf(a[(bi * nc + c) * h + hh]);
        float v = 0.0f;
        if (valid) {
            dS[i] = gnext;
            v = gnext * ld(E, i);
        }
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
        __syncthreads();
        if (threadIdx.x == 0) {
            float t = 0.0f;
            for (int w = 0; w < 8; ++w) t += warp_sums[w];
            part[((bi * gridDim.y + blockIdx.y) * nc + c) * h + hh] = ea * t;
        }
        __syncthreads();
        if (valid) gnext = ld(dE, i) + ea * gnext;
    }
}

#define SSD_STATES(SUF, TE)                                                                       \
extern "C" __global__ void ssd_states_fwd_##SUF(const float* S, const float* a, TE* E, int nc,   \
                                                int n, int h, int p)                             \
{ ssd_states_fwd<TE>(S, a, E, nc, n, h, p); }                                                    \
extern "C" __global__ void ssd_states_bwd_##SUF(const TE* dE, const float* a, const TE* E,       \
                                                float* dS, float* part, int nc, int n, int h,    \
                                                int p)                                           \
{ ssd_states_bwd<TE>(dE, a, E, dS, part, nc, n, h, p); }
SSD_STATES(f32, float)
SSD_STATES(bf16, bf16_t)

// Sums along q of x [bc, q, h] (f32) within each chunk bc, per column:
// prefix sums, or suffix sums when `rev` (the backward of either is the
// other). grid (bc, ceil(h / CC_COLS)), 256 threads: CC_COLS columns x
// CC_RUNS runs of q / CC_RUNS rows, each summed in order and then offset by
// the earlier runs' totals (a fixed order: reproducible). 16 x 16: four
// times the blocks and a quarter of the serial chain of 64 x 4 (one block
// per chunk for 64 heads, 8 us a call).
#define CC_COLS 16
#define CC_RUNS 16
extern "C" __global__ void chunk_cumsum(const float* __restrict__ x, float* __restrict__ y,
                                        int q, int h, int rev)
{
    __shared__ float tot[CC_RUNS][CC_COLS];
    const int col = threadIdx.x % CC_COLS, s = threadIdx.x / CC_COLS;
    const int c = blockIdx.y * CC_COLS + col;
    const long long base = (long long)blockIdx.x * q * h + c;
    const int len = (q + CC_RUNS - 1) / CC_RUNS, r0 = min(q, s * len), r1 = min(q, r0 + len);
    float acc = 0.0f;
    if (c < h)
        for (int k = r0; k < r1; ++k) acc += x[base + (long long)(rev ? q - 1 - k : k) * h];
    tot[s][col] = acc;
    __syncthreads();
    if (c >= h) return;
    acc = 0.0f;
    for (int k = 0; k < s; ++k) acc += tot[k][col];
    for (int k = r0; k < r1; ++k) {
        const long long i = base + (long long)(rev ? q - 1 - k : k) * h;
        acc += x[i];
        y[i] = acc;
    }
}

// y = x * s[row] for x [rows, p] (f32 or bf16), s [rows] f32, rounded to
// x's dtype (bf16 training: the operand of a bf16 GEMM, as mamba_ssm's
// chunk-state kernel rounds it). Rows come in tokens of h: row r of x at
// (r / h) * ldx + (r % h) * p.
template <typename T>
__device__ void scale_rows_fwd(const T* __restrict__ x, const float* __restrict__ s,
                               T* __restrict__ y, long long n, int p, int h, long long ldx)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = n <= 0xffffffffLL ? (long long)((unsigned)i / (unsigned)p) : i / p;
        const long long xi = (r / h) * ldx + (r % h) * p + (i - r * p);
        st(y, i, ld(x, xi) * s[r]);
    }
}

// dx = g * s[row] (in x's dtype), ds[row] = sum over the row of g * x (g
// in x's dtype too): one warp per row.
template <typename T>
__device__ void scale_rows_bwd(const T* __restrict__ g, const T* __restrict__ x,
                               const float* __restrict__ s, const T* __restrict__ acc,
                               T* __restrict__ dx, float* __restrict__ ds, long long rows, int p,
                               int h, long long ldx)
{
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += warps) {
        const float sr = s[r];
        const long long xr = (r / h) * ldx + (r % h) * p;
        float sum = 0.0f;
        for (int k = threadIdx.x & 31; k < p; k += 32) {
            const long long i = r * p + k;
            const float gi = ld(g, i);
            st(dx, i, gi * sr + (acc ? ld(acc, i) : 0.0f));
            sum += gi * ld(x, xr + k);
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if ((threadIdx.x & 31) == 0) ds[r] = sum;
    }
}

// The same, vectorised (16-byte accesses of x, p a multiple of V = Pack<T>::V
// with p / V a power of two up to 32, ldx of V, x 16-byte aligned): one
// thread per pack, 32-bit index arithmetic (rows * p < 2^32).
template <typename T>
__device__ void scale_rows_fwd_v(const T* __restrict__ x, const float* __restrict__ s,
                                 T* __restrict__ y, unsigned packs, int p, int h,
                                 long long ldx)
{
    const int V = Pack<T>::V;
    const unsigned pr = (unsigned)(p / V);  // packs per row
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x) {
        const unsigned r = i / pr, c = (i - r * pr) * V;
        const long long xi = (long long)(r / (unsigned)h) * ldx + (r % (unsigned)h) * p + c;
        float v[V];
        Pack<T>::load(x, xi, v);
        const float sr = s[r];
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] *= sr;
        Pack<T>::store(y, (long long)i * V, v);
    }
}

// p / V lanes per row: dx = g * s[row] (+ acc), ds[row] by shuffles within
// the lanes.
template <typename T>
__device__ void scale_rows_bwd_v(const T* __restrict__ g, const T* __restrict__ x,
                                 const float* __restrict__ s, const T* __restrict__ acc,
                                 T* __restrict__ dx,
                                 float* __restrict__ ds, unsigned packs, int p, int h,
                                 long long ldx)
{
    const int V = Pack<T>::V;
    const unsigned pr = (unsigned)(p / V);
    const unsigned stride = gridDim.x * blockDim.x;
    // Warp-uniform trip count: every lane joins the shuffles.
    for (unsigned base = blockIdx.x * blockDim.x + (threadIdx.x & ~31u); base < packs; base += stride) {
        const unsigned i = base + (threadIdx.x & 31);
        float sum = 0.0f;
        unsigned r = 0;
        if (i < packs) {
            r = i / pr;
            const unsigned c = (i - r * pr) * V;
            const long long xi = (long long)(r / (unsigned)h) * ldx + (r % (unsigned)h) * p + c;
            float gv[V], xv[V], av[V];
            Pack<T>::load(g, (long long)i * V, gv);
            Pack<T>::load(x, xi, xv);
            if (acc) Pack<T>::load(acc, (long long)i * V, av);
            const float sr = s[r];
#pragma unroll
            for (int e = 0; e < V; ++e) {
                sum += gv[e] * xv[e];
                gv[e] = gv[e] * sr + (acc ? av[e] : 0.0f);
            }
            Pack<T>::store(dx, (long long)i * V, gv);
        }
        for (unsigned o = 1; o < pr; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (i < packs && i % pr == 0) ds[r] = sum;
    }
}

#define SCALE_ROWS(SUF, T)                                                                     \
extern "C" __global__ void scale_rows_fwd_##SUF(const T* x, const float* s, T* y,               \
                                                long long n, int p, int h, long long ldx) {     \
    scale_rows_fwd<T>(x, s, y, n, p, h, ldx);                                                   \
}                                                                                               \
extern "C" __global__ void scale_rows_bwd_##SUF(const T* g, const T* x, const float* s,          \
                                                const T* acc, T* dx, float* ds, long long rows, \
                                                int p, int h, long long ldx) {                  \
    scale_rows_bwd<T>(g, x, s, acc, dx, ds, rows, p, h, ldx);                                   \
}                                                                                               \
extern "C" __global__ void scale_rows_fwd_v_##SUF(const T* x, const float* s, T* y,             \
                                                  unsigned packs, int p, int h, long long ldx) { \
    scale_rows_fwd_v<T>(x, s, y, packs, p, h, ldx);                                             \
}                                                                                               \
extern "C" __global__ void scale_rows_bwd_v_##SUF(const T* g, const T* x, const float* s,       \
                                                  const T* acc, T* dx, float* ds, unsigned packs, \
                                                  int p, int h, long long ldx) {                \
    scale_rows_bwd_v<T>(g, x, s, acc, dx, ds, packs, p, h, ldx);                                \
}
// The decay from each step to its chunk's end, times the step's dt:
// w[i] = dt[i] exp(cs[q-1] - cs[i]) per column of [bc, q, h] (f32), the
// weights of the chunk-final states. Flat, grid-stride.
extern "C" __global__ void end_decay_fwd(const float* __restrict__ dt, const float* __restrict__ cs,
                                         float* __restrict__ w, long long n, int q, int h) {
    const long long qh = (long long)q * h;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long last = (i / qh) * qh + (long long)(q - 1) * h + i % h;
        w[i] = dt[i] * expf(cs[last] - cs[i]);
    }
}

// Backward: with e = exp(cs[q-1] - cs[i]) and t = g dt e, ddt = g e and
// dcs[i] = -t, except the last row, which every row's e depends on:
// dcs[q-1] = sum over the other rows of t (its own -t and +t cancel).
// grid (bc, ceil(h / CC_COLS)), 512 threads: CC_COLS columns x ED_RUNS
// runs (at chunk_cumsum's 16 runs, 16 rows of three dependent loads each
// took 20 us a call), the runs' sums added in a fixed order.
#define ED_RUNS 32
extern "C" __global__ void __launch_bounds__(512) end_decay_bwd(
    const float* __restrict__ g, const float* __restrict__ dt, const float* __restrict__ cs,
    float* __restrict__ ddt, float* __restrict__ dcs, int q, int h) {
    __shared__ float tot[ED_RUNS][CC_COLS];
    const int col = threadIdx.x % CC_COLS, s = threadIdx.x / CC_COLS;
    const int c = blockIdx.y * CC_COLS + col;
    const long long base = (long long)blockIdx.x * q * h + c;
    const int len = (q + ED_RUNS - 1) / ED_RUNS, r0 = min(q, s * len), r1 = min(q, r0 + len);
    float acc = 0.0f;
    if (c < h) {
        const float cl = cs[base + (long long)(q - 1) * h];
        for (int k = r0; k < r1; ++k) {
            const long long i = base + (long long)k * h;
            const float e = expf(cl - cs[i]), gi = g[i];
            ddt[i] = gi * e;
            if (k < q - 1) {
                const float t = gi * dt[i] * e;
                dcs[i] = -t;
                acc += t;
            }
        }
    }
    tot[s][col] = acc;
    __syncthreads();
    if (c >= h || !(r0 <= q - 1 && q - 1 < r1)) return;
    float sum = 0.0f;
    for (int k = 0; k < ED_RUNS; ++k) sum += tot[k][col];
    dcs[base + (long long)(q - 1) * h] = sum;
}

SCALE_ROWS(f32, float)
SCALE_ROWS(bf16, bf16_t)
"#;

fn aux_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, SSD_AUX)
}

/// `(b, nc, n, h, p)` of the state recurrence's operands.
fn states_dims(s: &T, a: &T) -> (usize, usize, usize, usize, usize) {
    let (ss, sa) = (s.meta.shape(), a.meta.shape());
    assert!(
        ss.len() == 5 && sa.len() == 3,
        "SSD states: S [b, nc, n, h, p], a [b, nc, h]"
    );
    assert_eq!(&sa[..], &[ss[0], ss[1], ss[3]], "SSD states: a shape");
    (ss[0], ss[1], ss[2], ss[3], ss[4])
}

/// The state entering each chunk, in `out` (f32 or bf16) from f32 `s`.
pub fn ssd_states_fwd(s: T, a: T, out: DType) -> T {
    let (b, nc, n, h, p) = states_dims(&s, &a);
    let (s, a) = (same_dtype(s, DType::F32), same_dtype(a, DType::F32));
    let kernel = match out {
        DType::BF16 => "ssd_states_fwd_bf16",
        _ => "ssd_states_fwd_f32",
    };
    let out_dtype = if out == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    let out = empty(&s, vec![b * nc * n * h * p], out_dtype);
    if b * nc * n * h * p > 0 {
        let device = s.device.index;
        let f = nvrtc::function(device, "ssd_aux", &aux_src(), kernel);
        enqueue(
            [&out, &s, &a],
            move |[mut o_p, mut s_p, mut a_p], stream| {
                let (mut nc32, mut n32, mut h32, mut p32) =
                    (nc as i32, n as i32, h as i32, p as i32);
                let mut params = kernel_args!(s_p, a_p, o_p, nc32, n32, h32, p32);
                let grid = ((b * h) as u32, (n * p).div_ceil(256) as u32, 1);
                // SAFETY: the kernel's signature; contiguous f32 of the checked shapes.
                unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    let shape = s.meta.shape().clone();
    drop((s, a));
    Cb::float_reshape(out, shape)
}

/// `(ds, da)` of [`ssd_states_fwd`], from its output `e` (f32 or bf16;
/// `de` in the same dtype); `ds` f32.
pub fn ssd_states_bwd(de: T, a: T, e: T) -> (T, T) {
    let (b, nc, n, h, p) = states_dims(&e, &a);
    let te = if e.dtype == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    let kernel = match te {
        DType::BF16 => "ssd_states_bwd_bf16",
        _ => "ssd_states_bwd_f32",
    };
    let (de, a, e) = (
        same_dtype(de, te),
        same_dtype(a, DType::F32),
        same_dtype(e, te),
    );
    let ds = empty(&e, vec![b * nc * n * h * p], DType::F32);
    let splits = (n * p).div_ceil(256);
    let part = empty(&e, vec![b * splits * nc * h], DType::F32);
    if b * nc * n * h * p > 0 {
        let device = e.device.index;
        let f = nvrtc::function(device, "ssd_aux", &aux_src(), kernel);
        enqueue(
            [&ds, &de, &a, &e, &part],
            move |[mut ds_p, mut de_p, mut a_p, mut e_p, mut part_p], stream| {
                let (mut nc32, mut n32, mut h32, mut p32) =
                    (nc as i32, n as i32, h as i32, p as i32);
                let mut params = kernel_args!(de_p, a_p, e_p, ds_p, part_p, nc32, n32, h32, p32);
                let grid = ((b * h) as u32, splits as u32, 1);
                // SAFETY: the kernel's signature; `part` holds every block's sums.
                unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    let da = Cb::float_sum_dim(Cb::float_reshape(part, [b, splits, nc * h].into()), 1);
    let da = Cb::float_reshape(da, a.meta.shape().clone());
    let shape = e.meta.shape().clone();
    drop((de, a, e));
    (Cb::float_reshape(ds, shape), da)
}

/// `(rows, p)` of a row scale: `s` is `x` without its last dim.
fn rows_dims(x: &T, s: &T) -> (usize, usize) {
    let (xs, ss) = (x.meta.shape(), s.meta.shape());
    assert!(
        xs.len() == ss.len() + 1 && xs[..ss.len()] == ss[..],
        "row scale: x {xs:?} and s {ss:?}"
    );
    (ss.num_elements(), xs[xs.len() - 1])
}

/// The rows per token of `x [.., h, p]` as [`token_rows`](super::token_rows) reads it.
fn heads_of(x: &T) -> usize {
    let s = x.meta.shape();
    if s.len() >= 2 {
        s[s.len() - 2].max(1)
    } else {
        1
    }
}

/// Elements per 16-byte access of the vectorised row-scale kernels, where
/// `x` (rows of `p`, tokens `ldx` apart) and `others` allow them: `p / v`
/// lanes a power of two up to 32, 16-byte aligned, 32-bit indices.
fn scale_pack(x: &T, p: usize, ldx: usize, n: usize, others: &[&T]) -> Option<usize> {
    let v = 16 / x.dtype.size();
    let lanes = p / v.max(1);
    let ok = p.is_multiple_of(v)
        && lanes.is_power_of_two()
        && lanes <= 32
        && ldx.is_multiple_of(v)
        && n < u32::MAX as usize
        && aligned16(x)
        && others.iter().all(|t| aligned16(t));
    ok.then_some(v)
}

/// `x * s[.., None]` in `x`'s dtype (the product in f32, rounded once).
pub fn scale_rows_fwd(x: T, s: T) -> T {
    let (rows, p) = rows_dims(&x, &s);
    let ((x, ldx), s) = (super::token_rows(x, 1), same_dtype(s, DType::F32));
    let h = heads_of(&x);
    let n = rows * p;
    let y = empty(&x, vec![n], x.dtype);
    if n > 0 {
        let device = x.device.index;
        let vec = scale_pack(&x, p, ldx, n, &[]);
        let kind = if vec.is_some() { "v_" } else { "" };
        let f = nvrtc::function(
            device,
            "ssd_aux",
            &aux_src(),
            &format!("scale_rows_fwd_{kind}{}", suffix(x.dtype)),
        );
        enqueue([&y, &x, &s], move |[mut y_p, mut x_p, mut s_p], stream| {
            let (mut p32, mut h32, mut ld64) = (p as i32, h as i32, ldx as i64);
            match vec {
                Some(v) => {
                    let mut packs = (n / v) as u32;
                    let mut params = kernel_args!(x_p, s_p, y_p, packs, p32, h32, ld64);
                    // SAFETY: the kernel's signature; x, y `[n]` in packs of
                    // `v`, s `[rows]`, alignment checked by `scale_pack`.
                    unsafe { launch_flat(device, f, n / v, stream, &mut params) };
                }
                None => {
                    let mut n64 = n as i64;
                    let mut params = kernel_args!(x_p, s_p, y_p, n64, p32, h32, ld64);
                    // SAFETY: the kernel's signature; x, y `[n]`, s `[rows]`.
                    unsafe { launch_flat(device, f, n, stream, &mut params) };
                }
            }
        });
    }
    let shape = x.meta.shape().clone();
    drop((x, s));
    Cb::float_reshape(y, shape)
}

/// `(dx, ds)`: `dx` in `x`'s dtype (plus `acc`, x's gradient from its other
/// consumers, when given), `ds` in f32; `g` is read in `x`'s dtype.
pub fn scale_rows_bwd(g: T, x: T, s: T, acc: Option<T>) -> (T, T) {
    let (rows, p) = rows_dims(&x, &s);
    let ((x, ldx), s) = (super::token_rows(x, 1), same_dtype(s, DType::F32));
    let g = same_dtype(g, x.dtype);
    let acc = acc.map(|a| same_dtype(a, x.dtype));
    if let Some(a) = &acc {
        assert_eq!(
            a.meta.shape().num_elements(),
            rows * p,
            "row scale: x's gradient"
        );
    }
    let h = heads_of(&x);
    let dx = empty(&x, vec![rows * p], x.dtype);
    let ds = empty(&x, vec![rows], DType::F32);
    let n = rows * p;
    if n > 0 {
        let device = x.device.index;
        let others: Vec<&T> = [Some(&g), acc.as_ref()].into_iter().flatten().collect();
        let vec = scale_pack(&x, p, ldx, n, &others);
        let kind = if vec.is_some() { "v_" } else { "" };
        let f = nvrtc::function(
            device,
            "ssd_aux",
            &aux_src(),
            &format!("scale_rows_bwd_{kind}{}", suffix(x.dtype)),
        );
        enqueue_opt(
            [
                Some(&dx),
                Some(&g),
                Some(&x),
                Some(&s),
                Some(&ds),
                acc.as_ref(),
            ],
            move |[mut dx_p, mut g_p, mut x_p, mut s_p, mut ds_p, mut a_p], stream| {
                let (mut p32, mut h32, mut ld64) = (p as i32, h as i32, ldx as i64);
                match vec {
                    Some(v) => {
                        let mut packs = (n / v) as u32;
                        let mut params =
                            kernel_args!(g_p, x_p, s_p, a_p, dx_p, ds_p, packs, p32, h32, ld64);
                        // SAFETY: the kernel's signature; `p / v` lanes per row,
                        // alignment checked by `scale_pack`.
                        unsafe { launch_flat(device, f, n / v, stream, &mut params) };
                    }
                    None => {
                        let mut r64 = rows as i64;
                        let mut params =
                            kernel_args!(g_p, x_p, s_p, a_p, dx_p, ds_p, r64, p32, h32, ld64);
                        // SAFETY: the kernel's signature; one warp per row (8 per block).
                        unsafe {
                            launch(
                                device,
                                f,
                                grid_for(rows * 32, 256),
                                (256, 1, 1),
                                0,
                                stream,
                                &mut params,
                            )
                        };
                    }
                }
            },
        );
    }
    let (xs, ss) = (x.meta.shape().clone(), s.meta.shape().clone());
    drop((g, x, s, acc));
    (Cb::float_reshape(dx, xs), Cb::float_reshape(ds, ss))
}

/// Prefix sums along dim 2 of `x [b, nc, q, h]` (f32), within each chunk;
/// suffix sums when `reverse`.
pub fn chunk_cumsum(x: T, reverse: bool) -> T {
    let shape = x.meta.shape().to_vec();
    assert_eq!(shape.len(), 4, "chunk cumsum: x [b, nc, q, h]");
    let (bc, q, h) = (shape[0] * shape[1], shape[2], shape[3]);
    let x = same_dtype(x, DType::F32);
    let y = empty(&x, shape, DType::F32);
    if bc * q * h > 0 {
        let device = x.device.index;
        let f = nvrtc::function(device, "ssd_aux", &aux_src(), "chunk_cumsum");
        enqueue([&y, &x], move |[mut y_p, mut x_p], stream| {
            let (mut q32, mut h32, mut rev) = (q as i32, h as i32, reverse as i32);
            let mut params = kernel_args!(x_p, y_p, q32, h32, rev);
            let grid = (bc as u32, h.div_ceil(16) as u32, 1); // CC_COLS
            // SAFETY: the kernel's signature; x, y `[bc, q, h]` contiguous.
            unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
        });
    }
    drop(x);
    y
}

/// `dt * exp(cs[.., q - 1, :] - cs)` for `dt`, `cs` `[b, nc, q, h]` (f32):
/// each step's decay to its chunk's end, times its dt.
pub fn end_decay_fwd(dt: T, cs: T) -> T {
    let shape = cs.meta.shape().to_vec();
    assert_eq!(shape.len(), 4, "end decay: cs [b, nc, q, h]");
    let (q, h) = (shape[2], shape[3]);
    let (dt, cs) = (same_dtype(dt, DType::F32), same_dtype(cs, DType::F32));
    let w = empty(&cs, shape.clone(), DType::F32);
    let n: usize = shape.iter().product();
    if n > 0 {
        let device = cs.device.index;
        let f = nvrtc::function(device, "ssd_aux", &aux_src(), "end_decay_fwd");
        enqueue(
            [&w, &dt, &cs],
            move |[mut w_p, mut dt_p, mut cs_p], stream| {
                let (mut n64, mut q32, mut h32) = (n as i64, q as i32, h as i32);
                let mut params = kernel_args!(dt_p, cs_p, w_p, n64, q32, h32);
                // SAFETY: the kernel's signature; dt, cs, w `[n]` contiguous.
                unsafe { launch_flat(device, f, n, stream, &mut params) };
            },
        );
    }
    drop((dt, cs));
    w
}

/// `(ddt, dcs)` of [`end_decay_fwd`].
pub fn end_decay_bwd(g: T, dt: T, cs: T) -> (T, T) {
    let shape = cs.meta.shape().to_vec();
    let (bc, q, h) = (shape[0] * shape[1], shape[2], shape[3]);
    let f32 = |t: T| same_dtype(t, DType::F32);
    let (g, dt, cs) = (f32(g), f32(dt), f32(cs));
    let ddt = empty(&cs, shape.clone(), DType::F32);
    let dcs = empty(&cs, shape, DType::F32);
    if bc * q * h > 0 {
        let device = cs.device.index;
        let f = nvrtc::function(device, "ssd_aux", &aux_src(), "end_decay_bwd");
        enqueue(
            [&ddt, &dcs, &g, &dt, &cs],
            move |[mut ddt_p, mut dcs_p, mut g_p, mut dt_p, mut cs_p], stream| {
                let (mut q32, mut h32) = (q as i32, h as i32);
                let mut params = kernel_args!(g_p, dt_p, cs_p, ddt_p, dcs_p, q32, h32);
                let grid = (bc as u32, h.div_ceil(16) as u32, 1); // CC_COLS
                // SAFETY: the kernel's signature; all `[bc, q, h]` contiguous.
                unsafe { launch(device, f, grid, (512, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    drop((g, dt, cs));
    (ddt, dcs)
}
