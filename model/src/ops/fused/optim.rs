//! AdamW in one pass over the f32 master weights and moments, and the
//! gradient norm's sum of squares (no float atomics: reproducible).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{empty, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, grid_for, launch, launch_flat};
use crate::ops::{AdamWHyper, GRAD_PARTS_MAX, NO_DECAY_MAX};

// p_lp (optional): the new parameter rounded to bf16, the copy FSDP gathers.
const ADAMW: &str = r#"
// The outputs may be the inputs (updated in place: each element is read
// before it is written, by the same thread), hence no __restrict__ on them.
// Four elements per thread and pass (16-byte accesses) where aligned.
struct AdamW {
    float c, b1, b2, lr_bc1, inv_sqrt_bc2, eps, lr_wd;
    __device__ __forceinline__ void operator()(float& p, float g, float& m, float& v,
                                               bool decays) const {
        g *= c;
        // Decoupled weight decay first, as torch.optim.AdamW.
        if (decays) p *= 1.0f - lr_wd;
        m = b1 * m + (1.0f - b1) * g;
        v = b2 * v + (1.0f - b2) * g * g;
        p = p - m / (sqrtf(v) * inv_sqrt_bc2 + eps) * lr_bc1;
    }
};

// The element ranges [lo, hi) without weight decay (norm weights, biases,
// A_log, D, dt_bias: a few short runs per unit), passed by value: a 0/1
// mask in memory would be one more f32 read per parameter and step.
#define ND_MAX 16
struct NoDecay {
    long long lo[ND_MAX], hi[ND_MAX];
    int n;
    __device__ __forceinline__ bool decays(long long i) const {
        for (int k = 0; k < n; ++k)
            if (i >= lo[k] && i < hi[k]) return false;
        return true;
    }
    // Whether elements [i, i + 4) all decay, through a cursor k over the
    // ranges (sorted, disjoint; a thread's i only grows): one test per four
    // elements in the common case, where decays() tests every range for
    // each element.
    __device__ __forceinline__ bool all_decay4(long long i, int& k) const {
        while (k < n && hi[k] <= i) ++k;
        return k == n || lo[k] >= i + 4;
    }
};

__device__ __forceinline__ bool aligned(const void* p, unsigned long long bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

// Four consecutive elements as f32 (p + 4i aligned to 4 elements).
__device__ __forceinline__ float4 ld4(const float* p, long long i) {
    return ((const float4*)p)[i];
}
__device__ __forceinline__ float4 ld4(const bf16_t* p, long long i) {
    const uint2 w = ((const uint2*)p)[i];
    return make_float4(bf16_to_f32(w.x & 0xffffu), bf16_to_f32(w.x >> 16),
                       bf16_to_f32(w.y & 0xffffu), bf16_to_f32(w.y >> 16));
}

// A unit's flat gradient [n] as up to GP_MAX pieces (sorted, disjoint;
// zeros between): its parameters' own gradient tensors where they lie, or
// one flat buffer. vec: every offset, length and address allows 4-wide reads.
#define GP_MAX 16
struct Parts {
    const void* g[GP_MAX];
    long long off[GP_MAX], n[GP_MAX];
    int count, vec;
};

// The gradient at increasing element indices (a cursor over the parts).
template <typename G>
struct GradAt {
    const Parts& ps;
    int k;
    __device__ __forceinline__ GradAt(const Parts& p) : ps(p), k(0) {}
    __device__ __forceinline__ bool seek(long long i) {
        while (k < ps.count && i >= ps.off[k] + ps.n[k]) ++k;
        return k < ps.count && i >= ps.off[k];
    }
    __device__ __forceinline__ float one(long long i) {
        return seek(i) ? ld((const G*)ps.g[k], i - ps.off[k]) : 0.0f;
    }
    // Elements 4 i4 .. 4 i4 + 3 (one part or one gap: ps.vec).
    __device__ __forceinline__ float4 four(long long i4) {
        return seek(4 * i4) ? ld4((const G*)ps.g[k] + (4 * i4 - ps.off[k]), 0)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
};

// G: the gradient's dtype (f32, or bf16 straight from a bf16 model on one
// GPU: half the gradient traffic, same values).
template <typename G>
__device__ __forceinline__ void adamw(
    const float* p, const Parts& gp, const float* m, const float* v,
    const NoDecay& nd, const float* __restrict__ scale,
    float* p_out, float* m_out, float* v_out, bf16_t* __restrict__ p_lp, long long n,
    float b1, float b2, float lr_bc1, float inv_sqrt_bc2, float eps, float lr_wd)
{
    const AdamW f{scale ? scale[0] : 1.0f, b1, b2, lr_bc1, inv_sqrt_bc2, eps, lr_wd};
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const bool vec = gp.vec && aligned(p, 16) && aligned(m, 16) && aligned(v, 16) &&
                     aligned(p_out, 16) && aligned(m_out, 16) && aligned(v_out, 16) &&
                     aligned(p_lp, 8);
    const long long n4 = vec ? n / 4 : 0;
    GradAt<G> g4(gp);
    int kc = 0;  // the no-decay cursor
    for (long long i = tid; i < n4; i += stride) {
        float4 pp = ((const float4*)p)[i], gg = g4.four(i);
        float4 mm = ((const float4*)m)[i], vv = ((const float4*)v)[i];
        const bool all = nd.all_decay4(4 * i, kc);
        f(pp.x, gg.x, mm.x, vv.x, all || nd.decays(4 * i));
        f(pp.y, gg.y, mm.y, vv.y, all || nd.decays(4 * i + 1));
        f(pp.z, gg.z, mm.z, vv.z, all || nd.decays(4 * i + 2));
        f(pp.w, gg.w, mm.w, vv.w, all || nd.decays(4 * i + 3));
        ((float4*)p_out)[i] = pp;
        ((float4*)m_out)[i] = mm;
        ((float4*)v_out)[i] = vv;
        if (p_lp) {
            uint2 lo;
            lo.x = pack2(pp.x, pp.y);
            lo.y = pack2(pp.z, pp.w);
            ((uint2*)p_lp)[i] = lo;
        }
    }
    GradAt<G> g1(gp);
    for (long long i = 4 * n4 + tid; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        f(pi, g1.one(i), mi, vi, nd.decays(i));
        p_out[i] = pi;
        m_out[i] = mi;
        v_out[i] = vi;
        if (p_lp) p_lp[i] = f32_to_bf16(pi);
    }
}

#define ADAMW_KERNEL(NAME, G)                                                                  \
    extern "C" __global__ void NAME(                                                           \
        const float* p, const Parts gp, const float* m, const float* v,                        \
        const NoDecay nd, const float* __restrict__ scale, float* p_out,                       \
        float* m_out, float* v_out, bf16_t* __restrict__ p_lp, long long n, float b1,          \
        float b2, float lr_bc1, float inv_sqrt_bc2, float eps, float lr_wd) {                  \
        adamw<G>(p, gp, m, v, nd, scale, p_out, m_out, v_out, p_lp, n, b1, b2, lr_bc1,          \
                 inv_sqrt_bc2, eps, lr_wd);                                                    \
    }
ADAMW_KERNEL(adamw_step, float)
ADAMW_KERNEL(adamw_step_bf16g, bf16_t)

// The sum of 256 threads' values, in a fixed order; thread 0 gets it.
__device__ __forceinline__ float block_sum_256(float s) {
    __shared__ float warp_sums[8];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
    __syncthreads();
    float t = 0.0f;
    if (threadIdx.x == 0)
        for (int w = 0; w < 8; ++w) t += warp_sums[w];
    return t;
}

// part[block] = this block's sum of x^2 over the parts' elements;
// blockDim.x == 256. With the grid fixed by n, every partial sum is
// computed in the same order each run.
template <typename X>
__device__ __forceinline__ void sum_sq(const Parts& xp, float* part, long long n) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long n4 = xp.vec ? n / 4 : 0;
    float s = 0.0f;
    GradAt<X> x4(xp);
    // Four passes' loads in flight per thread (one 8-byte bf16 load each
    // fell short of the memory's bandwidth); the sum's order is fixed.
    long long i = tid;
    for (; i + 3 * stride < n4; i += 4 * stride) {
        float4 q[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) q[u] = x4.four(i + u * stride);
#pragma unroll
        for (int u = 0; u < 4; ++u) s += q[u].x * q[u].x + q[u].y * q[u].y + q[u].z * q[u].z + q[u].w * q[u].w;
    }
    for (; i < n4; i += stride) {
        const float4 q = x4.four(i);
        s += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
    }
    GradAt<X> x1(xp);
    for (long long i = 4 * n4 + tid; i < n; i += stride) {
        const float q = x1.one(i);
        s += q * q;
    }
    const float t = block_sum_256(s);
    if (threadIdx.x == 0) part[blockIdx.x] = t;
}
extern "C" __global__ void sum_squares(const Parts xp, float* part, long long n) {
    sum_sq<float>(xp, part, n);
}
extern "C" __global__ void sum_squares_bf16(const Parts xp, float* part, long long n) {
    sum_sq<bf16_t>(xp, part, n);
}

// out[0] = sum of part[0..parts], in a fixed order (one block of 256): the
// gradient norm, and so clipping, is the same bit for bit on every run.
extern "C" __global__ void sum_parts(const float* __restrict__ part, float* out, int parts) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) s += part[i];
    const float t = block_sum_256(s);
    if (threadIdx.x == 0) out[0] = t;
}
"#;

/// The kernels' `Parts` (same layout).
#[repr(C)]
struct Parts {
    g: [u64; GRAD_PARTS_MAX],
    off: [i64; GRAD_PARTS_MAX],
    n: [i64; GRAD_PARTS_MAX],
    count: i32,
    vec: i32,
}

/// A flat gradient `[len]` given as `(tensor, offset)` pieces, checked and
/// ready for the kernels: sorted, disjoint, contiguous, one dtype (f32 or
/// bf16), at most [`GRAD_PARTS_MAX`] (packed into one buffer otherwise).
struct GradParts {
    parts: Vec<(T, usize)>,
    dtype: DType,
}

impl GradParts {
    fn new(parts: Vec<(T, usize)>, len: usize, what: &str) -> Self {
        let mut parts: Vec<(T, usize)> = parts
            .into_iter()
            .map(|(t, o)| (grad_contiguous(t, what), o))
            .filter(|(t, _)| t.meta.shape().num_elements() > 0)
            .collect();
        parts.sort_by_key(|p| p.1);
        let mut end = 0;
        for (t, o) in &parts {
            assert!(*o >= end, "{what}: gradient pieces overlap");
            end = o + t.meta.shape().num_elements();
            assert!(end <= len, "{what}: a gradient piece overruns {len}");
        }
        let dtype = parts.first().map_or(DType::F32, |p| p.0.dtype);
        if parts.len() > GRAD_PARTS_MAX || parts.iter().any(|p| p.0.dtype != dtype) {
            let flat = super::pack(parts, len, None, DType::F32);
            return Self {
                parts: vec![(flat, 0)],
                dtype: DType::F32,
            };
        }
        Self { parts, dtype }
    }

    fn tensors(&self) -> impl Iterator<Item = Option<&T>> {
        self.parts.iter().map(|p| Some(&p.0))
    }

    /// The kernel argument, from the parts' device addresses (in order).
    fn table(spans: &[(usize, usize)], addrs: &[u64], elem: usize) -> Parts {
        let mut t = Parts {
            g: [0; GRAD_PARTS_MAX],
            off: [0; GRAD_PARTS_MAX],
            n: [0; GRAD_PARTS_MAX],
            count: spans.len() as i32,
            vec: 1,
        };
        for (k, (&(o, n), &a)) in spans.iter().zip(addrs).enumerate() {
            (t.g[k], t.off[k], t.n[k]) = (a, o as i64, n as i64);
            if o % 4 != 0 || n % 4 != 0 || a % (4 * elem as u64) != 0 {
                t.vec = 0;
            }
        }
        t
    }

    fn spans(&self) -> Vec<(usize, usize)> {
        self.parts
            .iter()
            .map(|(t, o)| (*o, t.meta.shape().num_elements()))
            .collect()
    }

    fn elem(&self) -> usize {
        if self.dtype == DType::BF16 { 2 } else { 4 }
    }
}

/// `[1]`: the sum of squares of a flat gradient `[len]` given as pieces
/// at offsets (zeros between), f32 or bf16, in f32.
pub fn sum_squares(parts: Vec<(T, usize)>, len: usize) -> T {
    let like = parts
        .first()
        .map(|p| p.0.clone())
        .expect("sum_squares: no tensor");
    let gp = GradParts::new(parts, len, "sum_squares input");
    if len == 0 || gp.parts.is_empty() {
        return zeros_f32(&like, vec![1]);
    }
    // Block partial sums, then their sum in order: no float atomics, so
    // the result does not depend on which block finishes first.
    let grid = grid_for(len, 256);
    let part = empty(&like, vec![grid.0 as usize], DType::F32);
    let out = empty(&like, vec![1], DType::F32);
    let device = like.device.index;
    let name = match gp.dtype {
        DType::BF16 => "sum_squares_bf16",
        _ => "sum_squares",
    };
    let f = nvrtc::function(device, "adamw", &adamw_src(), name);
    let g = nvrtc::function(device, "adamw", &adamw_src(), "sum_parts");
    let (spans, elem) = (gp.spans(), gp.elem());
    let ts: Vec<Option<&T>> = [Some(&out), Some(&part)]
        .into_iter()
        .chain(gp.tensors())
        .collect();
    nvrtc::enqueue_dyn(&ts, move |p, stream| {
        let (mut o_p, mut part_p) = (p[0], p[1]);
        let mut table = GradParts::table(&spans, &p[2..], elem);
        let (mut n64, mut parts) = (len as i64, grid.0 as i32);
        let mut params = kernel_args!(table, part_p, n64);
        // SAFETY: the kernel's signature (`table` laid out as its Parts, each
        // piece inside `len`); `part` holds one f32 per block.
        unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
        let mut params = kernel_args!(part_p, o_p, parts);
        // SAFETY: the kernel's signature; one block; `out` holds one f32.
        unsafe { launch(device, g, (1, 1, 1), (256, 1, 1), 0, stream, &mut params) };
    });
    drop((gp, part));
    out
}

fn adamw_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, ADAMW)
}

fn f32_contiguous(t: T, what: &str) -> T {
    assert_eq!(t.dtype, DType::F32, "fused AdamW: {what} must be f32");
    into_contiguous(t)
}

fn grad_contiguous(t: T, what: &str) -> T {
    assert!(
        matches!(t.dtype, DType::F32 | DType::BF16),
        "fused AdamW: {what} must be f32 or bf16, not {:?}",
        t.dtype
    );
    into_contiguous(t)
}

/// The kernel's `NoDecay` (same layout).
#[repr(C)]
struct NoDecay {
    lo: [i64; NO_DECAY_MAX],
    hi: [i64; NO_DECAY_MAX],
    n: i32,
}

/// One AdamW step in one pass: reads p, the gradient (f32 or bf16 pieces
/// at offsets, zeros between), m and v, writes the new three, and with
/// `bf16_copy` the new parameter in bf16 as well. Weight decay applies
/// outside the `no_decay` element ranges (at most [`NO_DECAY_MAX`]).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: T,
    g: Vec<(T, usize)>,
    m: T,
    v: T,
    no_decay: &[(usize, usize)],
    scale: Option<T>,
    bf16_copy: bool,
    h: &AdamWHyper,
) -> ([T; 3], Option<T>) {
    assert!(
        no_decay.len() <= NO_DECAY_MAX,
        "fused AdamW: {} no-decay ranges, at most {NO_DECAY_MAX}",
        no_decay.len()
    );
    let n = p.meta.shape().num_elements();
    let p = f32_contiguous(p, "param");
    let g = GradParts::new(g, n, "grad");
    let (m, v) = (
        f32_contiguous(m, "exp_avg"),
        f32_contiguous(v, "exp_avg_sq"),
    );
    let scale = scale.map(|t| f32_contiguous(t, "grad scale"));
    for t in [&m, &v] {
        assert_eq!(
            t.meta.shape().num_elements(),
            n,
            "fused AdamW: operand sizes differ"
        );
    }
    let mut nd = NoDecay {
        lo: [0; NO_DECAY_MAX],
        hi: [0; NO_DECAY_MAX],
        n: no_decay.len() as i32,
    };
    // Sorted: the kernel walks them with a cursor.
    let mut sorted = no_decay.to_vec();
    sorted.sort_unstable();
    for (k, &(lo, hi)) in sorted.iter().enumerate() {
        (nd.lo[k], nd.hi[k]) = (lo as i64, hi as i64);
    }
    // In place where nothing else holds the buffer.
    let out = |t: &T| {
        if t.can_mut() {
            t.clone()
        } else {
            empty(t, t.meta.shape().to_vec(), DType::F32)
        }
    };
    let (po, mo, vo) = (out(&p), out(&m), out(&v));
    let lp = bf16_copy.then(|| empty(&p, vec![n], DType::BF16));
    if n == 0 {
        return ([po, mo, vo], lp);
    }
    let device = p.device.index;
    let name = match g.dtype {
        DType::BF16 => "adamw_step_bf16g",
        _ => "adamw_step",
    };
    let f = nvrtc::function(device, "adamw", &adamw_src(), name);
    let (mut b1, mut b2) = (h.beta1 as f32, h.beta2 as f32);
    let (mut lr_bc1, mut inv_sqrt_bc2) = (h.lr_bc1 as f32, h.inv_sqrt_bc2 as f32);
    let (mut eps, mut lr_wd) = (h.eps as f32, h.lr_wd as f32);
    let (spans, elem) = (g.spans(), g.elem());
    let ts: Vec<Option<&T>> = [
        Some(&po),
        Some(&p),
        Some(&m),
        Some(&v),
        scale.as_ref(),
        Some(&mo),
        Some(&vo),
        lp.as_ref(),
    ]
    .into_iter()
    .chain(g.tensors())
    .collect();
    nvrtc::enqueue_dyn(&ts, move |ptrs, stream| {
        let [
            mut po_p,
            mut p_p,
            mut m_p,
            mut v_p,
            mut scale_p,
            mut mo_p,
            mut vo_p,
            mut lp_p,
        ] = ptrs[..8].try_into().expect("eight operands");
        let mut table = GradParts::table(&spans, &ptrs[8..], elem);
        let mut n64 = n as i64;
        let mut params = kernel_args!(
            p_p,
            table,
            m_p,
            v_p,
            nd,
            scale_p,
            po_p,
            mo_p,
            vo_p,
            lp_p,
            n64,
            b1,
            b2,
            lr_bc1,
            inv_sqrt_bc2,
            eps,
            lr_wd
        );
        // SAFETY: the kernel's signature (`table` and `nd` by value, laid
        // out as its Parts and NoDecay, each gradient piece inside `n`);
        // every buffer holds `n` f32 (scale one, the optional copy `n`
        // bf16), live until the launch is enqueued (burn reuses memory in
        // stream order).
        unsafe { launch_flat(device, f, n, stream, &mut params) };
    });
    drop((p, g, m, v, scale));
    ([po, mo, vo], lp)
}
