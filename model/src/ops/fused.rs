//! Fused CUDA kernels (NVRTC, `nvrtc.rs`) behind the [`BambaBackend`] hooks:
//! one pass over memory where burn's ops would make one per operation.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::AdamWHyper;
use super::nvrtc::{self, T, enqueue, enqueue_opt, grid_for, launch, launch_flat};
use crate::kernel_args;

mod norm;
pub use norm::{rms_norm_bwd, rms_norm_fwd};

/// The CUDA backend type, for burn's own ops on the kernels' tensors (the
/// tensor type does not depend on its element parameters).
type Cb = burn_cubecl::CubeBackend<cubecl_cuda::CudaRuntime, f32, i32, u8>;

// p_lp (optional): the new parameter rounded to bf16, the copy FSDP gathers.
const ADAMW: &str = r#"
// The outputs may be the inputs (updated in place: each element is read
// before it is written, by the same thread), hence no __restrict__ on them.
// Four elements per thread and pass (16-byte accesses) where aligned.
struct AdamW {
    float c, b1, b2, lr_bc1, inv_sqrt_bc2, eps, lr_wd;
    __device__ __forceinline__ void operator()(float& p, float g, float& m, float& v, float mask,
                                               bool has_mask) const {
        g *= c;
        // Decoupled weight decay first, as torch.optim.AdamW.
        p = has_mask ? p - p * mask * lr_wd : p * (1.0f - lr_wd);
        m = b1 * m + (1.0f - b1) * g;
        v = b2 * v + (1.0f - b2) * g * g;
        p = p - m / (sqrtf(v) * inv_sqrt_bc2 + eps) * lr_bc1;
    }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

extern "C" __global__ void adamw_step(
    const float* p, const float* __restrict__ g, const float* m, const float* v,
    const float* __restrict__ mask, const float* __restrict__ scale,
    float* p_out, float* m_out, float* v_out, bf16_t* __restrict__ p_lp, long long n,
    float b1, float b2, float lr_bc1, float inv_sqrt_bc2, float eps, float lr_wd)
{
    const AdamW f{scale ? scale[0] : 1.0f, b1, b2, lr_bc1, inv_sqrt_bc2, eps, lr_wd};
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) &&
                     aligned16(p_out) && aligned16(m_out) && aligned16(v_out) &&
                     (!mask || aligned16(mask)) && (((unsigned long long)p_lp & 7ull) == 0);
    const long long n4 = vec ? n / 4 : 0;
    for (long long i = tid; i < n4; i += stride) {
        float4 pp = ((const float4*)p)[i], gg = ((const float4*)g)[i];
        float4 mm = ((const float4*)m)[i], vv = ((const float4*)v)[i];
        float4 dm = mask ? ((const float4*)mask)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        f(pp.x, gg.x, mm.x, vv.x, dm.x, mask);
        f(pp.y, gg.y, mm.y, vv.y, dm.y, mask);
        f(pp.z, gg.z, mm.z, vv.z, dm.z, mask);
        f(pp.w, gg.w, mm.w, vv.w, dm.w, mask);
        ((float4*)p_out)[i] = pp;
        ((float4*)m_out)[i] = mm;
        ((float4*)v_out)[i] = vv;
        if (p_lp) {
            uint2 lo;
            lo.x = (unsigned)f32_to_bf16(pp.x) | ((unsigned)f32_to_bf16(pp.y) << 16);
            lo.y = (unsigned)f32_to_bf16(pp.z) | ((unsigned)f32_to_bf16(pp.w) << 16);
            ((uint2*)p_lp)[i] = lo;
        }
    }
    for (long long i = 4 * n4 + tid; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        f(pi, g[i], mi, vi, mask ? mask[i] : 0.0f, mask);
        p_out[i] = pi;
        m_out[i] = mi;
        v_out[i] = vi;
        if (p_lp) p_lp[i] = f32_to_bf16(pi);
    }
}

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

// part[block] = this block's sum of x^2; blockDim.x == 256. With the grid
// fixed by n, every partial sum is computed in the same order each run.
extern "C" __global__ void sum_squares(const float* __restrict__ x, float* part, long long n) {
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        s += x[i] * x[i];
    }
    const float t = block_sum_256(s);
    if (threadIdx.x == 0) part[blockIdx.x] = t;
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

/// `[1]`: the sum of squares of an f32 tensor.
pub fn sum_squares(x: T) -> T {
    let x = f32_contiguous(x, "sum_squares input");
    let n = x.meta.shape().num_elements();
    if n == 0 {
        return zeros_f32(&x, vec![1]);
    }
    // Block partial sums, then their sum in order: no float atomics, so
    // the result does not depend on which block finishes first.
    let grid = grid_for(n, 256);
    let part = empty(&x, vec![grid.0 as usize], DType::F32);
    let out = empty(&x, vec![1], DType::F32);
    let device = x.device.index;
    let f = nvrtc::function(device, "adamw", &adamw_src(), "sum_squares");
    let g = nvrtc::function(device, "adamw", &adamw_src(), "sum_parts");
    enqueue(
        [&out, &part, &x],
        move |[mut o_p, mut part_p, mut x_p], stream| {
            let (mut n64, mut parts) = (n as i64, grid.0 as i32);
            let mut params = kernel_args!(x_p, part_p, n64);
            // SAFETY: the kernel's signature; `x` holds `n` f32, `part` one per block.
            unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            let mut params = kernel_args!(part_p, o_p, parts);
            // SAFETY: the kernel's signature; one block; `out` holds one f32.
            unsafe { launch(device, g, (1, 1, 1), (256, 1, 1), 0, stream, &mut params) };
        },
    );
    drop((x, part));
    out
}

// dst[i] (+)= float(src[i]); a null src writes zeros.
const PACK: &str = r#"
// Four elements per thread and pass (16-byte f32 accesses) where aligned.
template <typename S>
__device__ __forceinline__ void pack(const S* __restrict__ src, float* __restrict__ dst,
                                     long long n, int acc) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const bool vec = ((unsigned long long)dst & 15ull) == 0 &&
                     ((unsigned long long)src & (4 * sizeof(S) - 1)) == 0;
    const long long n4 = vec ? n / 4 : 0;
    for (long long i = tid; i < n4; i += stride) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (src) {
            if constexpr (sizeof(S) == 2) {
                const uint2 w = ((const uint2*)src)[i];
                v = make_float4(bf16_to_f32(w.x & 0xffffu), bf16_to_f32(w.x >> 16),
                                bf16_to_f32(w.y & 0xffffu), bf16_to_f32(w.y >> 16));
            } else {
                v = ((const float4*)src)[i];
            }
        }
        if (acc) {
            const float4 d = ((const float4*)dst)[i];
            v.x += d.x; v.y += d.y; v.z += d.z; v.w += d.w;
        }
        ((float4*)dst)[i] = v;
    }
    for (long long i = 4 * n4 + tid; i < n; i += stride) {
        float v = 0.0f;
        if (src) {
            if constexpr (sizeof(S) == 2) v = bf16_to_f32(src[i]); else v = src[i];
        }
        dst[i] = acc ? dst[i] + v : v;
    }
}
extern "C" __global__ void pack_bf16(const bf16_t* src, float* dst, long long n, int acc) {
    pack(src, dst, n, acc);
}
extern "C" __global__ void pack_f32(const float* src, float* dst, long long n, int acc) {
    pack(src, dst, n, acc);
}
"#;

/// See [`super::BambaBackend::bamba_pack_f32`]: one kernel per part (cast
/// and copy, or add), zeros written only into the gaps. The accumulator is
/// updated in place when nothing else holds it.
pub fn pack_f32(parts: Vec<(T, usize)>, len: usize, acc: Option<T>) -> T {
    let like = parts
        .first()
        .map(|p| p.0.clone())
        .or_else(|| acc.clone())
        .expect("pack_f32: nothing to pack");
    let device = like.device.index;
    let src = format!("{}{}", nvrtc::PRELUDE, PACK);
    let kernel = |dtype: DType| {
        let name = match dtype {
            DType::BF16 => "pack_bf16",
            DType::F32 => "pack_f32",
            other => panic!("pack_f32: unsupported gradient dtype {other:?}"),
        };
        nvrtc::function(device, "pack", &src, name)
    };
    // (operand index, 0 = zeros; kernel; dst offset; length; add)
    let mut jobs: Vec<(usize, nvrtc::Kernel, usize, usize, bool)> = Vec::new();
    let mut operands: Vec<T> = Vec::new();
    let (out, accumulate) = match acc {
        Some(a) if a.dtype == DType::F32 && a.is_contiguous() && a.can_mut() => (a, true),
        Some(a) => {
            let a = into_contiguous(a);
            jobs.push((1, kernel(a.dtype), 0, len, false));
            operands.push(a);
            (empty(&like, vec![len], DType::F32), true)
        }
        None => (empty(&like, vec![len], DType::F32), false),
    };
    let mut parts: Vec<(T, usize)> = parts
        .into_iter()
        .map(|(p, o)| (into_contiguous(p), o))
        .collect();
    parts.sort_by_key(|p| p.1);
    let zeros = kernel(DType::F32);
    let mut filled = 0;
    for (part, at) in parts {
        let n = part.meta.shape().num_elements();
        if !accumulate && at > filled {
            jobs.push((0, zeros, filled, at - filled, false));
        }
        jobs.push((operands.len() + 1, kernel(part.dtype), at, n, accumulate));
        operands.push(part);
        filled = filled.max(at + n);
    }
    if !accumulate && len > filled {
        jobs.push((0, zeros, filled, len - filled, false));
    }
    let ts: Vec<Option<&T>> = std::iter::once(&out).chain(&operands).map(Some).collect();
    nvrtc::enqueue_dyn(&ts, move |p, stream| {
        for (src, f, at, n, acc) in jobs.into_iter().filter(|j| j.3 > 0) {
            let (mut s_p, mut d_p) = (if src == 0 { 0 } else { p[src] }, p[0] + 4 * at as u64);
            let (mut n64, mut acc32) = (n as i64, acc as i32);
            let mut params = kernel_args!(s_p, d_p, n64, acc32);
            // SAFETY: the kernel's signature; `src` holds `n` elements (or is
            // null), `dst` at least `at + n` f32.
            unsafe { launch_flat(device, f, n, stream, &mut params) };
        }
    });
    drop(operands);
    out
}

// full[r, offset + i] += part[r, i] for each of `rows` rows (`m` elements
// of part per row, `row_stride` of full); four elements per thread, strided
// by the block so that loads coalesce.
const ADD_NARROW: &str = r#"
template <typename T>
__device__ void add_narrow(T* full, const T* part, long long m, long long row_stride, long long offset) {
    const long long r = blockIdx.x;
    T* f = full + r * row_stride + offset;
    const T* p = part + r * m;
    long long i = (long long)blockIdx.y * blockDim.x * 4 + threadIdx.x;
#pragma unroll
    for (int k = 0; k < 4; ++k, i += blockDim.x) {
        if (i < m) st(f, i, ld(f, i) + ld(p, i));
    }
}
extern "C" __global__ void add_narrow_f32(float* full, const float* part, long long m,
                                          long long row_stride, long long offset) {
    add_narrow<float>(full, part, m, row_stride, offset);
}
extern "C" __global__ void add_narrow_bf16(bf16_t* full, const bf16_t* part, long long m,
                                           long long row_stride, long long offset) {
    add_narrow<bf16_t>(full, part, m, row_stride, offset);
}
"#;

/// See [`super::BambaBackend::bamba_add_narrow`]: one pass, in place when
/// nothing else holds `full` (the usual case: the gradient buffer).
pub fn add_narrow(full: T, part: T, dim: usize, start: usize) -> T {
    let shape = full.meta.shape().to_vec();
    let len = part.meta.shape()[dim];
    let rows: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let (m, row_stride) = (len * inner, shape[dim] * inner);
    let dtype = full.dtype;
    let fused = matches!(dtype, DType::F32 | DType::BF16)
        && full.can_mut()
        && full.is_contiguous()
        && m.div_ceil(1024) <= 65535
        && rows < 1 << 31;
    if !fused {
        let slices = super::narrow_slices(&full.meta.shape().clone(), dim, start, len);
        let sum = Cb::float_add(Cb::float_slice(full.clone(), &slices), part);
        return Cb::float_slice_assign(full, &slices, sum);
    }
    let part = same_dtype(part, dtype);
    if rows == 0 || m == 0 {
        return full;
    }
    let device = full.device.index;
    let src = format!("{}{}", nvrtc::PRELUDE, ADD_NARROW);
    let f = nvrtc::function(
        device,
        "add_narrow",
        &src,
        &format!("add_narrow_{}", suffix(dtype)),
    );
    let (mut m64, mut rs64, mut off64) = (m as i64, row_stride as i64, (start * inner) as i64);
    enqueue([&full, &part], move |[mut f_p, mut p_p], stream| {
        let mut params = kernel_args!(f_p, p_p, m64, rs64, off64);
        // SAFETY: the kernel's signature; `full` holds `rows * row_stride`
        // elements, `part` `rows * m`, both of `dtype`.
        unsafe {
            launch(
                device,
                f,
                (rows as u32, m.div_ceil(1024) as u32, 1),
                (256, 1, 1),
                0,
                stream,
                &mut params,
            )
        };
    });
    drop(part);
    full
}

fn adamw_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, ADAMW)
}

fn f32_contiguous(t: T, what: &str) -> T {
    assert_eq!(t.dtype, DType::F32, "fused AdamW: {what} must be f32");
    into_contiguous(t)
}

/// One AdamW step in one pass: reads p, g, m, v (and the mask), writes the
/// new three, and with `bf16_copy` the new parameter in bf16 as well.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: T,
    g: T,
    m: T,
    v: T,
    mask: Option<T>,
    scale: Option<T>,
    bf16_copy: bool,
    h: &AdamWHyper,
) -> ([T; 3], Option<T>) {
    let n = p.meta.shape().num_elements();
    let (p, g) = (f32_contiguous(p, "param"), f32_contiguous(g, "grad"));
    let (m, v) = (
        f32_contiguous(m, "exp_avg"),
        f32_contiguous(v, "exp_avg_sq"),
    );
    let mask = mask.map(|t| f32_contiguous(t, "decay mask"));
    let scale = scale.map(|t| f32_contiguous(t, "grad scale"));
    for t in [&g, &m, &v].into_iter().chain(mask.as_ref()) {
        assert_eq!(
            t.meta.shape().num_elements(),
            n,
            "fused AdamW: operand sizes differ"
        );
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
    let f = nvrtc::function(device, "adamw", &adamw_src(), "adamw_step");
    let (mut b1, mut b2) = (h.beta1 as f32, h.beta2 as f32);
    let (mut lr_bc1, mut inv_sqrt_bc2) = (h.lr_bc1 as f32, h.inv_sqrt_bc2 as f32);
    let (mut eps, mut lr_wd) = (h.eps as f32, h.lr_wd as f32);
    enqueue_opt(
        [
            Some(&po),
            Some(&p),
            Some(&g),
            Some(&m),
            Some(&v),
            mask.as_ref(),
            scale.as_ref(),
            Some(&mo),
            Some(&vo),
            lp.as_ref(),
        ],
        move |[
            mut po_p,
            mut p_p,
            mut g_p,
            mut m_p,
            mut v_p,
            mut mask_p,
            mut scale_p,
            mut mo_p,
            mut vo_p,
            mut lp_p,
        ],
              stream| {
            let mut n64 = n as i64;
            let mut params = kernel_args!(
                p_p,
                g_p,
                m_p,
                v_p,
                mask_p,
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
            // SAFETY: the kernel's signature; every buffer holds `n` f32 (scale one,
            // the optional copy `n` bf16),
            // live until the launch is enqueued (burn reuses memory in stream order).
            unsafe { launch_flat(device, f, n, stream, &mut params) };
        },
    );
    drop((p, g, m, v, mask, scale));
    ([po, mo, vo], lp)
}

pub(super) fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => panic!("fused kernels: unsupported dtype {other:?}"),
    }
}

/// `t.narrow(dim, start, len)` of the last dim as a view where it can be
/// one: the same buffer and strides from a later start (which cubecl needs
/// aligned). burn's own slice copies unless the buffer's end moves by an
/// aligned amount too, which for the Mamba `in_proj` splits it never does;
/// the kernels that read them take a row stride instead (see [`rows_of`]).
pub fn narrow_view(t: T, dim: usize, start: usize, len: usize) -> T {
    let shape = t.meta.shape().to_vec();
    let rank = shape.len();
    let leading: usize = shape[..rank - 1].iter().product();
    let offset = (start * t.meta.strides()[dim] * t.dtype.size()) as u64;
    let align = t.client.properties().memory.alignment;
    // A single row would look contiguous to burn over a longer buffer: keep
    // those (and every other case) to burn's slice.
    if dim + 1 == rank && t.meta.strides()[dim] == 1 && leading > 1 && offset % align == 0 {
        if len == shape[dim] {
            return t;
        }
        let mut meta = (*t.meta).clone();
        meta.shape_mut()[dim] = len;
        return burn_cubecl::tensor::CubeTensor::new(
            t.client.clone(),
            t.handle.clone().offset_start(offset),
            meta,
            t.device.clone(),
            t.dtype,
        );
    }
    let ranges: Vec<_> = shape
        .iter()
        .enumerate()
        .map(|(i, &n)| if i == dim { start..start + len } else { 0..n })
        .collect();
    burn_cubecl::kernel::slice(t, &ranges)
}

/// The row stride of `t` read as `[rows, d]` (unit column stride, leading
/// dims collapsing to evenly spaced rows), or `None` if it is not such a
/// view. Padded allocations and [`narrow_view`]s are.
pub(super) fn rows_of(t: &T) -> Option<usize> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let rank = shape.len();
    if rank < 2 {
        return (rank == 1 && (strides[0] == 1 || shape[0] <= 1))
            .then_some(shape.first().copied().unwrap_or(0));
    }
    if strides[rank - 1] != 1 && shape[rank - 1] > 1 {
        return None;
    }
    let ld = strides[rank - 2];
    if ld < shape[rank - 1] {
        return None;
    }
    let even = (0..rank - 2).all(|i| shape[i] <= 1 || strides[i] == strides[i + 1] * shape[i + 1]);
    even.then_some(ld)
}

/// `t` with rows `ld` apart (its own stride where it has one, else a
/// contiguous copy), and `ld`.
pub(super) fn with_rows(t: T) -> (T, usize) {
    match rows_of(&t) {
        Some(ld) => (t, ld),
        None => {
            let t = into_contiguous(t);
            let d = t.meta.shape().last().copied().unwrap_or(1);
            (t, d)
        }
    }
}

/// Whether `t`'s first element is 16-byte aligned (cubecl's buffers are;
/// a view may start inside one).
pub(super) fn aligned16(t: &T) -> bool {
    t.handle.offset_start.unwrap_or(0) % 16 == 0
}

/// One block per row, at most 8 per SM of a 132-SM GPU (grid-stride beyond).
pub(super) fn norm_grid(rows: usize) -> (u32, u32, u32) {
    (rows.clamp(1, 132 * 8) as u32, 1, 1)
}

/// Zeros in contiguous storage, cleared by a memset in stream order.
pub fn zeros(shape: burn::tensor::Shape, device: &cubecl_cuda::CudaDevice, dtype: DType) -> T {
    use cubecl_runtime::runtime::Runtime;
    let client = cubecl_cuda::CudaRuntime::client(device);
    let out = empty_device_contiguous_dtype(client, device.clone(), shape, dtype);
    let bytes = out.meta.num_elements() * dtype.size();
    if bytes > 0 {
        enqueue([&out], move |[p], stream| {
            // SAFETY: `p` holds `bytes` bytes of `out`, bound for this task.
            unsafe { cudarc::driver::result::memset_d8_async(p, 0, bytes, stream) }
                .expect("cuMemsetD8Async");
        });
    }
    out
}

pub(super) fn empty(like: &T, shape: Vec<usize>, dtype: DType) -> T {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

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
template <typename T, int K>
__device__ void conv_fwd(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, T* __restrict__ y, int l, int c,
                         long long ldx, int steps) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    const long long base = (long long)blockIdx.z * l;
    const int t0 = blockIdx.y * steps, t1 = min(t0 + steps, l);
    float wv[K], xw[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        wv[j] = ld(w, (long long)ch * K + j);
        // xw[j] = x[t - (K-1) + j] for the first t; the last slot is filled in the loop.
        const int tt = t0 - (K - 1) + j;
        xw[j] = (j < K - 1 && tt >= 0) ? ld(x, (base + tt) * ldx + ch) : 0.0f;
    }
    const float bv = bias ? ld(bias, ch) : 0.0f;
    for (int tb = t0; tb < t1; tb += PF) {
        float xs[PF];
#pragma unroll
        for (int s = 0; s < PF; ++s) xs[s] = tb + s < t1 ? ld(x, (base + tb + s) * ldx + ch) : 0.0f;
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            if (tb + s < t1) {
                float u = bv;
#pragma unroll
                for (int j = 0; j < K; ++j) {
                    if (j == K - 1) xw[j] = xs[s];
                    u += wv[j] * xw[j];
                }
                u = rnd(u, T());
                st(y, (base + tb + s) * c + ch, u / (1.0f + __expf(-u)));
#pragma unroll
                for (int j = 0; j + 1 < K; ++j) xw[j] = xw[j + 1];
            }
        }
    }
}

// Backward in one pass, walking a run of steps downwards: du = dy * silu'(u)
// (u recomputed from x), dx[t] = sum_j w[j] du[t + (K-1) - j] from the last
// K du in registers (the run first computes the K-1 du above its end), and
// per-run weight and bias gradient sums written to `dwp [runs, c, K]`,
// `dbp [runs, c]` (summed after in a fixed order: deterministic). Loads
// are issued PF steps at a time, as in the forward.
// grid (ceil(c / blockDim.x), ceil(l / steps), b)
template <typename T, int K>
__device__ void conv_bwd(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, const T* __restrict__ dy,
                         T* __restrict__ dx, float* __restrict__ dwp, float* __restrict__ dbp,
                         int l, int c, long long ldx, int steps) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    const long long base = (long long)blockIdx.z * l;
    const int t0 = blockIdx.y * steps, t1 = min(t0 + steps, l);
    const long long run = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    float wv[K], xw[K], dus[K], acc[K];
    const int top = min(t1 + K - 1, l) - 1;  // the highest step whose du we need
#pragma unroll
    for (int j = 0; j < K; ++j) {
        wv[j] = ld(w, (long long)ch * K + j);
        acc[j] = 0.0f;
        dus[j] = 0.0f;  // du[t + j]; zero past the end
        // xw[j] = x[top - (K-1) + j]; slot 0 is filled in the loop.
        const int tt = top - (K - 1) + j;
        xw[j] = (j >= 1 && j < K && tt >= 0) ? ld(x, (base + tt) * ldx + ch) : 0.0f;
    }
    const float bv = bias ? ld(bias, ch) : 0.0f;
    float accb = 0.0f;
    for (int tb = top; tb >= t0; tb -= PF) {
        float xs[PF], dys[PF];
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            const int t = tb - s, first = t - (K - 1);
            xs[s] = (t >= t0 && first >= 0) ? ld(x, (base + first) * ldx + ch) : 0.0f;
            dys[s] = t >= t0 ? ld(dy, (base + t) * c + ch) : 0.0f;
        }
#pragma unroll
        for (int s = 0; s < PF; ++s) {
            const int t = tb - s;
            if (t >= t0) {
                xw[0] = xs[s];
                float u = bv;
#pragma unroll
                for (int j = 0; j < K; ++j) u += wv[j] * xw[j];
                u = rnd(u, T());
                const float sg = 1.0f / (1.0f + __expf(-u));
                const float d = dys[s] * sg * (1.0f + u * (1.0f - sg));
#pragma unroll
                for (int j = K - 1; j > 0; --j) dus[j] = dus[j - 1];
                dus[0] = d;
                if (t < t1) {
                    float sum = 0.0f;
#pragma unroll
                    for (int j = 0; j < K; ++j) sum += wv[j] * dus[(K - 1) - j];
                    st(dx, (base + t) * c + ch, sum);
#pragma unroll
                    for (int j = 0; j < K; ++j) acc[j] += d * xw[j];
                    accb += d;
                }
#pragma unroll
                for (int j = K - 1; j > 0; --j) xw[j] = xw[j - 1];
            }
        }
    }
#pragma unroll
    for (int j = 0; j < K; ++j) dwp[(run * c + ch) * K + j] = acc[j];
    if (dbp) dbp[run * c + ch] = accb;
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

// One entry per kernel width K (compile-time: the register windows are
// indexed statically).
#define CONV_KERNELS(SUF, T, K)                                                                \
extern "C" __global__ void conv_fwd##K##_##SUF(const T* x, const T* w, const T* bias, T* y,    \
                                               int l, int c, long long ldx, int steps) {        \
    conv_fwd<T, K>(x, w, bias, y, l, c, ldx, steps);                                                 \
}                                                                                               \
extern "C" __global__ void conv_bwd##K##_##SUF(const T* x, const T* w, const T* bias,          \
        const T* dy, T* dx, float* dwp, float* dbp, int l, int c, long long ldx, int steps) {  \
    conv_bwd<T, K>(x, w, bias, dy, dx, dwp, dbp, l, c, ldx, steps);                                  \
}
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

/// Channels across the grid's x, runs of `steps` across y, the batch across z.
fn conv_grid(b: usize, l: usize, c: usize, steps: usize) -> (u32, u32, u32) {
    (
        c.div_ceil(CONV_THREADS as usize) as u32,
        l.div_ceil(steps) as u32,
        b as u32,
    )
}

fn conv_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, CONV)
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

fn same_dtype(t: T, dtype: DType) -> T {
    into_contiguous(if t.dtype == dtype {
        t
    } else {
        burn_cubecl::kernel::cast(t, dtype)
    })
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
    let f = nvrtc::function(
        device,
        "conv",
        &conv_src(),
        &format!("conv_fwd{k}_{}", suffix(dtype)),
    );
    enqueue_opt(
        [Some(&y), Some(&x), Some(&w), bias.as_ref()],
        move |[mut y_p, mut x_p, mut w_p, mut b_p], stream| {
            let (mut l32, mut c32, mut ld64) = (l as i32, c as i32, ldx as i64);
            let mut steps = CONV_STEPS_FWD as i32;
            let mut params = kernel_args!(x_p, w_p, b_p, y_p, l32, c32, ld64, steps);
            // SAFETY: the kernel's signature; y `[b, l, c]`, x the same with rows `ldx` apart, w `[c, k]`, bias `[c]`.
            unsafe {
                launch(
                    device,
                    f,
                    conv_grid(b, l, c, CONV_STEPS_FWD),
                    (CONV_THREADS, 1, 1),
                    0,
                    stream,
                    &mut params,
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
    let runs = b * l.div_ceil(CONV_STEPS_BWD);
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
        let f = nvrtc::function(
            device,
            "conv",
            &src,
            &format!("conv_bwd{k}_{}", suffix(dtype)),
        );
        let f_sum = nvrtc::function(device, "conv", &src, "conv_colsum");
        let (mut l32, mut c32, mut ld64) = (l as i32, c as i32, ldx as i64);
        let (mut steps, mut runs32) = (CONV_STEPS_BWD as i32, runs as i32);
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
                        conv_grid(b, l, c, CONV_STEPS_BWD),
                        (CONV_THREADS, 1, 1),
                        0,
                        stream,
                        &mut p1,
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

pub(super) fn zeros_f32(like: &T, shape: Vec<usize>) -> T {
    burn_cubecl::ops::numeric::zeros_client(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
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
            const int t = targets[r];
            loss[r] = lse - ld(x, t) + z * lse * lse;
            lse_out[r] = lse;
        }
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

#define XENT_KERNELS(SUF, T)                                                                  \
extern "C" __global__ void xent_fwd_##SUF(const T* logits, const int* targets, float* loss,  \
                                          float* lse, long long rows, int v, float z) {      \
    xent_fwd<T>(logits, targets, loss, lse, rows, v, z);                                      \
}                                                                                             \
extern "C" __global__ void xent_bwd_##SUF(const float* g, const T* logits, const int* targets,\
                                          const float* lse, T* dlogits, long long rows, int v,\
                                          float z) {                                          \
    xent_bwd<T>(g, logits, targets, lse, dlogits, rows, v, z);                                \
}
XENT_KERNELS(f32, float)
XENT_KERNELS(bf16, bf16_t)
"#;

fn xent_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, XENT)
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
    let dtype = logits.dtype;
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
        &format!("xent_fwd_{}", suffix(dtype)),
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
            &format!("xent_bwd_{}", suffix(dtype)),
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

/// SwiGLU's gate, `silu(g) * u`, rounded as torch's `act(gate) * up`;
/// backward in f32 from `g` and `u`.
const SWIGLU: &str = r#"
#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, long long n) {
    GRID_STRIDE(i, n) {
        const float gv = ld(g, i);
        st(y, i, rnd(gv / (1.0f + __expf(-gv)), T()) * ld(u, i));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* dy, const T* g, const T* u, T* dg, T* du, long long n) {
    GRID_STRIDE(i, n) {
        const float gv = ld(g, i), d = ld(dy, i);
        const float sg = 1.0f / (1.0f + __expf(-gv));
        st(du, i, d * gv * sg);
        st(dg, i, d * ld(u, i) * sg * (1.0f + gv * (1.0f - sg)));
    }
}

#define SWIGLU_KERNELS(SUF, T)                                                               \
extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y, long long n) {    \
    swiglu_fwd<T>(g, u, y, n);                                                               \
}                                                                                            \
extern "C" __global__ void swiglu_bwd_##SUF(const T* dy, const T* g, const T* u, T* dg,     \
                                            T* du, long long n) {                            \
    swiglu_bwd<T>(dy, g, u, dg, du, n);                                                      \
}
SWIGLU_KERNELS(f32, float)
SWIGLU_KERNELS(bf16, bf16_t)
"#;

fn swiglu_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, SWIGLU)
}

/// `silu(g) * u`, `g` and `u` of one shape and dtype.
pub fn swiglu_fwd(g: T, u: T) -> T {
    let dtype = g.dtype;
    let (g, u) = (into_contiguous(g), same_dtype(u, dtype));
    let shape = g.meta.shape().to_vec();
    let n: usize = shape.iter().product();
    assert_eq!(
        u.meta.shape().num_elements(),
        n,
        "fused SwiGLU: gate and up differ in size"
    );
    let y = empty(&g, shape, dtype);
    if n == 0 {
        return y;
    }
    let device = g.device.index;
    let f = nvrtc::function(
        device,
        "swiglu",
        &swiglu_src(),
        &format!("swiglu_fwd_{}", suffix(dtype)),
    );
    enqueue([&y, &g, &u], move |[mut y_p, mut g_p, mut u_p], stream| {
        let mut n64 = n as i64;
        let mut params = kernel_args!(g_p, u_p, y_p, n64);
        // SAFETY: the kernel's signature; three buffers of `n`.
        unsafe { launch_flat(device, f, n, stream, &mut params) };
    });
    drop((g, u));
    y
}

/// `(dg, du)`.
pub fn swiglu_bwd(dy: T, g: T, u: T) -> (T, T) {
    let dtype = g.dtype;
    let (g, u, dy) = (
        into_contiguous(g),
        same_dtype(u, dtype),
        same_dtype(dy, dtype),
    );
    let shape = g.meta.shape().to_vec();
    let n: usize = shape.iter().product();
    let (dg, du) = (empty(&g, shape.clone(), dtype), empty(&g, shape, dtype));
    if n > 0 {
        let device = g.device.index;
        let f = nvrtc::function(
            device,
            "swiglu",
            &swiglu_src(),
            &format!("swiglu_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&dg, &dy, &g, &u, &du],
            move |[mut dg_p, mut dy_p, mut g_p, mut u_p, mut du_p], stream| {
                let mut n64 = n as i64;
                let mut params = kernel_args!(dy_p, g_p, u_p, dg_p, du_p, n64);
                // SAFETY: as in the forward; five buffers of `n`.
                unsafe { launch_flat(device, f, n, stream, &mut params) };
            },
        );
    }
    drop((dy, g, u));
    (dg, du)
}

/// The SSD's intra-chunk product without its `[q, q]` matrix per head
/// (mamba_ssm's `chunk_scan` diagonal blocks): 64 x 64 output tiles, the
/// masked decay built tile by tile in shared memory.
const SSD_DIAG: &str = r#"
// Per (batch-chunk, head), with S [bc, g, q, q], cs [bc, q, h], v and out
// [bc, q, h, p] (rows of h * p):
//   forward:   out[i] = sum_{j <= i} exp(cs[i] - cs[j]) S[g(h)][i, j] v[j]
//   transpose: out[i] = sum_{j >= i} exp(cs[j] - cs[i]) S[g(h)][j, i] v[j]
// 64 x 64 output tiles, 256 threads (8 warps). Every thread owns the 16
// elements of an mma.m16n8k8 accumulator layout: warp w covers rows
// (w % 4) * 16 + {g, g + 8} and columns (w / 4) * 32 + 8 s + {2 t, 2 t + 1}
// (g = lane / 4, t = lane % 4, s < 4). TC multiplies on tensor cores in
// TF32 (bf16 training); otherwise the same products run as f32 FMAs.
#define DG_T 64
#define DG_K 32
#define DG_KP 36  // padded rows: conflict-free fragment loads
#define DG_VP 72

__device__ __forceinline__ unsigned tf32_bits(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Frag {
    int rb, cb, g, t;
    __device__ Frag() {
        const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
        rb = (w & 3) * 16; cb = (w >> 2) * 32; g = lane >> 2; t = lane & 3;
    }
    // Accumulator element e (s = e / 4, k = e % 4) -> tile row and column.
    __device__ int row(int e) const { return rb + g + ((e & 2) ? 8 : 0); }
    __device__ int col(int e) const { return cb + 8 * (e >> 2) + 2 * t + (e & 1); }
};

// acc += A[rows, 0..kn) B[0..kn), cols) over one shared tile, with
// A(i, k) and B(k, j) read through the accessors.
template <bool TC, typename FA, typename FB>
__device__ __forceinline__ void tile_mma(float (&acc)[16], const Frag& f, int kn, FA A, FB B) {
    if (TC) {
        for (int k = 0; k < kn; k += 8) {
            unsigned a[4];
            a[0] = tf32_bits(A(f.rb + f.g, k + f.t));
            a[1] = tf32_bits(A(f.rb + f.g + 8, k + f.t));
            a[2] = tf32_bits(A(f.rb + f.g, k + f.t + 4));
            a[3] = tf32_bits(A(f.rb + f.g + 8, k + f.t + 4));
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int j = f.cb + 8 * s + f.g;
                mma_tf32(acc + 4 * s, a, tf32_bits(B(k + f.t, j)), tf32_bits(B(k + f.t + 4, j)));
            }
        }
    } else {
#pragma unroll 4
        for (int k = 0; k < kn; ++k) {
            const float a0 = A(f.rb + f.g, k), a1 = A(f.rb + f.g + 8, k);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int j = f.cb + 8 * s + 2 * f.t;
                const float b0 = B(k, j), b1 = B(k, j + 1);
                acc[4 * s + 0] = fmaf(a0, b0, acc[4 * s + 0]);
                acc[4 * s + 1] = fmaf(a0, b1, acc[4 * s + 1]);
                acc[4 * s + 2] = fmaf(a1, b0, acc[4 * s + 2]);
                acc[4 * s + 3] = fmaf(a1, b1, acc[4 * s + 3]);
            }
        }
    }
}

// grid (i tiles * bc * h, p tiles).
template <bool TRANS, bool TC>
__device__ __forceinline__ void diag_apply(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ v,
    float* __restrict__ out, int q, int h, int g, int p)
{
    __shared__ float Ms[DG_T][DG_KP];
    __shared__ float Vs[DG_K][DG_VP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[DG_K];
    const int tid = threadIdx.x;
    const Frag f;
    // A (chunk, head)'s row tiles run side by side (its v rows stay in L2),
    // the longest (most column tiles) first.
    const int nt = (q + DG_T - 1) / DG_T;
    const int r = (int)(blockIdx.x % (unsigned)nt);
    const int it = TRANS ? r : nt - 1 - r;
    const int hi = (int)((blockIdx.x / (unsigned)nt) % (unsigned)h);
    const long long bc = blockIdx.x / ((unsigned)nt * (unsigned)h);
    const int p0 = blockIdx.y * DG_T, i0 = it * DG_T;
    const int gi = hi / (h / g);
    const float* Sm = S + (bc * g + gi) * (long long)q * q;
    const float* cm = cs + bc * q * (long long)h + hi;
    const long long rs = (long long)h * p;
    const float* vm = v + bc * q * rs + (long long)hi * p;
    float* om = out + bc * q * rs + (long long)hi * p;
    if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
    float acc[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[e] = 0.0f;
    const int j_begin = TRANS ? i0 : 0;
    const int j_end = TRANS ? q : min(q, i0 + DG_T);
    for (int j0 = j_begin; j0 < j_end; j0 += DG_K) {
        __syncthreads();  // the previous tile is consumed
        if (tid < DG_K) c_j[tid] = j0 + tid < q ? cm[(long long)(j0 + tid) * h] : 0.0f;
        for (int e = tid; e < DG_K * DG_T; e += 256) {
            const int jj = e / DG_T, pp = e - jj * DG_T;
            const int j = j0 + jj, pc = p0 + pp;
            Vs[jj][pp] = (j < q && pc < p) ? vm[(long long)j * rs + pc] : 0.0f;
        }
        __syncthreads();
        for (int e = tid; e < DG_T * DG_K; e += 256) {
            // Coalesced reads of S: along j forward, along i transposed.
            const int ii = TRANS ? e % DG_T : e / DG_K;
            const int jj = TRANS ? e / DG_T : e % DG_K;
            const int i = i0 + ii, j = j0 + jj;
            float m = 0.0f;
            if (i < q && j < q) {
                if (!TRANS && j <= i) m = __expf(c_i[ii] - c_j[jj]) * Sm[(long long)i * q + j];
                if (TRANS && j >= i) m = __expf(c_j[jj] - c_i[ii]) * Sm[(long long)j * q + i];
            }
            Ms[ii][jj] = m;
        }
        __syncthreads();
        tile_mma<TC>(acc, f, DG_K,
                     [&](int i, int k) { return Ms[i][k]; },
                     [&](int k, int j) { return Vs[k][j]; });
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), pc = p0 + f.col(e);
        if (i < q && pc < p) om[(long long)i * rs + pc] = acc[e];
    }
}

// Register caps from ncu on the H100 (1B shapes): the forward at 78
// registers ran 3 blocks per SM, at 64 four (-30%); the transpose needs 48.
#define DIAG_ENTRY(name, TRANS, TC, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(                        \
        const float* S, const float* cs, const float* v, float* out, int q, int h, int g, int p) \
    {                                                                                    \
        diag_apply<TRANS, TC>(S, cs, v, out, q, h, g, p);                                \
    }
DIAG_ENTRY(ssd_diag_fwd, false, false, 4)
DIAG_ENTRY(ssd_diag_dx, true, false, 5)
DIAG_ENTRY(ssd_diag_fwd_tc, false, true, 4)
DIAG_ENTRY(ssd_diag_dx_tc, true, true, 5)

// For one 64 x 64 tile (it, jt) of one (batch-chunk, group), with
//   G_h[i, j] = exp(cs_h[i] - cs_h[j]) (dy_h[i] . x_h[j])   (j <= i):
//   dS[i, j] = sum over the group's heads of G_h[i, j];
//   dcs_h[i] += sum_j S[i, j] G_h[i, j],  dcs_h[j] -= sum_i S[i, j] G_h[i, j].
// The dcs sums go to part [2 nt, bc, q, h] (zeroed): row sums in slot jt,
// column sums in slot nt + it, added in a fixed order after (reproducible:
// no atomics). grid (nt * nt * hs * bc * g): the group's heads in `hs` splits,
// each writing its own dS partial [hs, bc, g, q, q]; tiles above the
// diagonal write zeros.
template <bool TC>
__device__ __forceinline__ void diag_grad(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ dS, float* __restrict__ part,
    int q, int h, int g, int p, int nt, long long bcn, int hs)
{
    __shared__ float As[DG_T][DG_KP];
    __shared__ float Bs[DG_T][DG_KP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[DG_T];
    __shared__ float red[DG_T][33];
    const int tid = threadIdx.x;
    const Frag f;
    // A (chunk, group, split)'s tiles run side by side (its rows stay in L2).
    const int tile = (int)(blockIdx.x % (unsigned)(nt * nt));
    const int jt = tile % nt, it = tile / nt;
    const int split = (int)((blockIdx.x / (unsigned)(nt * nt)) % (unsigned)hs);
    const long long bcg = blockIdx.x / ((unsigned)(nt * nt) * (unsigned)hs);
    const int gi = (int)(bcg % g);
    const long long bc = bcg / g;
    const int i0 = it * DG_T, j0 = jt * DG_T;
    const int hg = h / g, per = hg / hs;
    float* dSm = dS + ((split * bcn + bc) * g + gi) * (long long)q * q;
    if (jt > it) {
        for (int e = tid; e < DG_T * DG_T; e += 256) {
            const int i = i0 + (e >> 6), j = j0 + (e & 63);
            if (i < q && j < q) dSm[(long long)i * q + j] = 0.0f;
        }
        return;
    }
    const float* Sm = S + (bc * g + gi) * (long long)q * q;
    float s[16], ds[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), j = j0 + f.col(e);
        s[e] = (i < q && j <= i) ? Sm[(long long)i * q + j] : 0.0f;
        ds[e] = 0.0f;
    }
    const long long rs = (long long)h * p;
    for (int k = split * per; k < (split + 1) * per; ++k) {
        const int hi = gi * hg + k;
        const float* xm = x + bc * q * rs + (long long)hi * p;
        const float* dym = dy + bc * q * rs + (long long)hi * p;
        const float* cm = cs + bc * q * (long long)h + hi;
        __syncthreads();  // the previous head's shared data is consumed
        if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
        else if (tid < 2 * DG_T) c_j[tid - DG_T] = j0 + tid - DG_T < q ? cm[(long long)(j0 + tid - DG_T) * h] : 0.0f;
        float d[16];
#pragma unroll
        for (int e = 0; e < 16; ++e) d[e] = 0.0f;
        for (int k0 = 0; k0 < p; k0 += DG_K) {
            if (k0 > 0) __syncthreads();
            for (int e = tid; e < DG_T * DG_K; e += 256) {
                const int rr = e >> 5, kk = e & 31, pc = k0 + kk;
                As[rr][kk] = (i0 + rr < q && pc < p) ? dym[(long long)(i0 + rr) * rs + pc] : 0.0f;
                Bs[rr][kk] = (j0 + rr < q && pc < p) ? xm[(long long)(j0 + rr) * rs + pc] : 0.0f;
            }
            __syncthreads();
            tile_mma<TC>(d, f, DG_K,
                         [&](int i, int kk) { return As[i][kk]; },
                         [&](int kk, int j) { return Bs[j][kk]; });
        }
        // Row sums: 4 columns-pairs per thread, 8 contributors per row
        // (4 lanes x 2 column warps); column sums: 32 per column.
        float rsum[2] = {0.0f, 0.0f}, csum[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) csum[c] = 0.0f;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const int ii = f.row(e), jj = f.col(e);
            const int i = i0 + ii, j = j0 + jj;
            if (i < q && j <= i) {
                const float ev = __expf(c_i[ii] - c_j[jj]) * d[e];
                ds[e] += ev;
                const float gg = s[e] * ev;
                rsum[(e >> 1) & 1] += gg;
                csum[2 * (e >> 2) + (e & 1)] += gg;
            }
        }
        const int w = tid >> 5;
        red[f.rb + f.g][(w >> 2) * 4 + f.t] = rsum[0];
        red[f.rb + f.g + 8][(w >> 2) * 4 + f.t] = rsum[1];
        __syncthreads();
        if (tid < DG_T && i0 + tid < q) {
            float t = 0.0f;
            for (int k2 = 0; k2 < 8; ++k2) t += red[tid][k2];
            part[(((long long)jt * bcn + bc) * q + i0 + tid) * h + hi] = t;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const int jj = f.cb + 8 * (c >> 1) + 2 * f.t + (c & 1);
            red[jj][(w & 3) * 8 + f.g] = csum[c];
        }
        __syncthreads();
        if (tid < DG_T && j0 + tid < q) {
            float t = 0.0f;
            for (int k2 = 0; k2 < 32; ++k2) t += red[tid][k2];
            part[(((long long)(nt + it) * bcn + bc) * q + j0 + tid) * h + hi] = -t;
        }
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), j = j0 + f.col(e);
        if (i < q && j < q) dSm[(long long)i * q + j] = ds[e];
    }
}

#define GRAD_ENTRY(name, TC)                                                             \
    extern "C" __global__ void __launch_bounds__(256, 3) name(                           \
        const float* S, const float* cs, const float* x, const float* dy, float* dS,     \
        float* part, int q, int h, int g, int p, int nt, long long bcn, int hs)          \
    {                                                                                    \
        diag_grad<TC>(S, cs, x, dy, dS, part, q, h, g, p, nt, bcn, hs);                  \
    }
GRAD_ENTRY(ssd_diag_grad, false)
GRAD_ENTRY(ssd_diag_grad_tc, true)
"#;

/// `(b * nc, q, h, p, g)` of the SSD diagonal op's operands.
fn diag_dims(s: &T, cs: &T, x: &T) -> (usize, usize, usize, usize, usize) {
    let (ss, cd, xs) = (s.meta.shape(), cs.meta.shape(), x.meta.shape());
    assert!(
        ss.len() == 5 && cd.len() == 4 && xs.len() == 5,
        "SSD diagonal: scores [b, nc, g, q, q], cs [b, nc, q, h], x [b, nc, q, h, p]"
    );
    let (b, nc, q, h, p, g) = (xs[0], xs[1], xs[2], xs[3], xs[4], ss[2]);
    assert_eq!(&cd[..], &[b, nc, q, h], "SSD diagonal: cs shape");
    assert_eq!(&ss[..], &[b, nc, g, q, q], "SSD diagonal: scores shape");
    assert!(g > 0 && h % g == 0, "SSD diagonal: {h} heads in {g} groups");
    (b * nc, q, h, p, g)
}

/// `y [b, nc, q, h, p]` (f32) from scores, `cs` and `x` (see [`SSD_DIAG`]).
pub fn ssd_diag_fwd(s: T, cs: T, x: T, tf32: bool) -> T {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &x);
    let (s, cs, x) = (
        same_dtype(s, DType::F32),
        same_dtype(cs, DType::F32),
        same_dtype(x, DType::F32),
    );
    let out = empty(&x, x.meta.shape().to_vec(), DType::F32);
    if bcn * q * h * p > 0 {
        let kernel = if tf32 {
            "ssd_diag_fwd_tc"
        } else {
            "ssd_diag_fwd"
        };
        diag_apply(&s, &cs, &x, &out, kernel, (bcn, q, h, p, g));
    }
    drop((s, cs, x));
    out
}

fn diag_apply(
    s: &T,
    cs: &T,
    v: &T,
    out: &T,
    kernel: &str,
    dims: (usize, usize, usize, usize, usize),
) {
    let (bcn, q, h, p, g) = dims;
    let device = v.device.index;
    let f = nvrtc::function(device, "ssd_diag", SSD_DIAG, kernel);
    enqueue(
        [out, s, cs, v],
        move |[mut o_p, mut s_p, mut c_p, mut v_p], stream| {
            let (mut q32, mut h32, mut g32, mut p32) = (q as i32, h as i32, g as i32, p as i32);
            let mut params = kernel_args!(s_p, c_p, v_p, o_p, q32, h32, g32, p32);
            let grid = ((q.div_ceil(64) * bcn * h) as u32, p.div_ceil(64) as u32, 1);
            // SAFETY: the kernel's signature; contiguous f32 operands of the checked shapes.
            unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
        },
    );
}

/// `(dscores, dcs, dx)` of [`ssd_diag_fwd`] for the upstream `dy`.
pub fn ssd_diag_bwd(dy: T, s: T, cs: T, x: T, tf32: bool) -> (T, T, T) {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &x);
    let f32 = |t| same_dtype(t, DType::F32);
    let (dy, s, cs, x) = (f32(dy), f32(s), f32(cs), f32(x));
    let dx = empty(&x, x.meta.shape().to_vec(), DType::F32);
    // The group's heads in `hs` parallel splits (partial dS summed after).
    let hg = h / g;
    let hs = [8, 4, 2, 1].into_iter().find(|s| hg % s == 0).unwrap_or(1);
    let ds = empty(&x, vec![hs * bcn * g * q * q], DType::F32);
    let nt = q.div_ceil(64);
    // Flat: a multi-dim allocation may pad its rows (h = 3), the kernel writes flat indices.
    let part = zeros_f32(&x, vec![2 * nt * bcn * q * h]);
    if bcn * q * h * p > 0 {
        let (dx_kernel, grad_kernel) = if tf32 {
            ("ssd_diag_dx_tc", "ssd_diag_grad_tc")
        } else {
            ("ssd_diag_dx", "ssd_diag_grad")
        };
        diag_apply(&s, &cs, &dy, &dx, dx_kernel, (bcn, q, h, p, g));
        let device = x.device.index;
        let f = nvrtc::function(device, "ssd_diag", SSD_DIAG, grad_kernel);
        enqueue(
            [&ds, &s, &cs, &x, &dy, &part],
            move |[mut ds_p, mut s_p, mut c_p, mut x_p, mut dy_p, mut part_p], stream| {
                let (mut q32, mut h32, mut g32, mut p32, mut nt32, mut bcn64, mut hs32) = (
                    q as i32, h as i32, g as i32, p as i32, nt as i32, bcn as i64, hs as i32,
                );
                let mut params = kernel_args!(
                    s_p, c_p, x_p, dy_p, ds_p, part_p, q32, h32, g32, p32, nt32, bcn64, hs32
                );
                let grid = ((nt * nt * hs * bcn * g) as u32, 1, 1);
                // SAFETY: the kernel's signature; `part` holds `2 nt` slots of `cs`'s size.
                unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    let part = Cb::float_reshape(part, [2 * nt, bcn * q * h].into());
    let dcs = Cb::float_sum_dim(part, 0);
    let dcs = Cb::float_reshape(dcs, cs.meta.shape().clone());
    let ds = if hs == 1 {
        ds
    } else {
        Cb::float_sum_dim(Cb::float_reshape(ds, [hs, bcn * g * q * q].into()), 0)
    };
    let ds = Cb::float_reshape(ds, s.meta.shape().clone());
    drop((dy, s, x));
    (ds, dcs, dx)
}

/// The chunk-to-chunk recurrence of the SSD states and a per-row scale,
/// in the scan's own layout (no per-head copies).
const SSD_AUX: &str = r#"
// entering[c] = exp(a[c-1]) entering[c-1] + S[c-1], entering[0] = 0, with
// S, entering [b, nc, n, h, p] and a [b, nc, h]. grid (b * h, ceil(n p / 256)):
// one thread per element of a head's n x p state, walking the chunks.
extern "C" __global__ void ssd_states_fwd(const float* __restrict__ S, const float* __restrict__ a,
                                          float* __restrict__ E, int nc, int n, int h, int p)
{
    const int hh = (int)(blockIdx.x % (unsigned)h);
    const long long bi = blockIdx.x / (unsigned)h;
    const int e = blockIdx.y * 256 + threadIdx.x;
    if (e >= n * p) return;
    const int ni = e / p, pi = e - ni * p;
    const long long plane = (long long)n * h * p;
    const long long off = bi * nc * plane + ((long long)ni * h + hh) * p + pi;
    float st = 0.0f;
    for (int c = 0; c < nc; ++c) {
        const long long i = off + c * plane;
        E[i] = st;
        st = __expf(a[(bi * nc + c) * h + hh]) * st + S[i];
    }
}

// Backward, with G[c] the whole gradient of entering[c]:
//   dS[c] = G[c+1],  da[c] = exp(a[c]) sum(G[c+1] o entering[c]),
//   G[c] = dE[c] + exp(a[c]) G[c+1].
// da's sums go per block to part [b, ceil(n p / 256), nc, h], added after
// in a fixed order. 256 threads.
extern "C" __global__ void ssd_states_bwd(const float* __restrict__ dE, const float* __restrict__ a,
                                          const float* __restrict__ E, float* __restrict__ dS,
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
            v = gnext * E[i];
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
        if (valid) gnext = dE[i] + ea * gnext;
    }
}

// y = x * s[row] for x [rows, p], s [rows].
extern "C" __global__ void scale_rows_fwd(const float* __restrict__ x, const float* __restrict__ s,
                                          float* __restrict__ y, long long n, int p)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = n <= 0xffffffffLL ? (long long)((unsigned)i / (unsigned)p) : i / p;
        y[i] = x[i] * s[r];
    }
}

// dx = g * s[row], ds[row] = sum over the row of g * x: one warp per row.
extern "C" __global__ void scale_rows_bwd(const float* __restrict__ g, const float* __restrict__ x,
                                          const float* __restrict__ s, float* __restrict__ dx,
                                          float* __restrict__ ds, long long rows, int p)
{
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += warps) {
        const float sr = s[r];
        float acc = 0.0f;
        for (int k = threadIdx.x & 31; k < p; k += 32) {
            const long long i = r * p + k;
            const float gi = g[i];
            dx[i] = gi * sr;
            acc += gi * x[i];
        }
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if ((threadIdx.x & 31) == 0) ds[r] = acc;
    }
}
"#;

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

/// The state entering each chunk (f32, like `s`).
pub fn ssd_states_fwd(s: T, a: T) -> T {
    let (b, nc, n, h, p) = states_dims(&s, &a);
    let (s, a) = (same_dtype(s, DType::F32), same_dtype(a, DType::F32));
    let out = empty(&s, vec![b * nc * n * h * p], DType::F32);
    if b * nc * n * h * p > 0 {
        let device = s.device.index;
        let f = nvrtc::function(device, "ssd_aux", SSD_AUX, "ssd_states_fwd");
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

/// `(ds, da)` of [`ssd_states_fwd`], from its output `e`.
pub fn ssd_states_bwd(de: T, a: T, e: T) -> (T, T) {
    let (b, nc, n, h, p) = states_dims(&e, &a);
    let f32 = |t| same_dtype(t, DType::F32);
    let (de, a, e) = (f32(de), f32(a), f32(e));
    let ds = empty(&e, vec![b * nc * n * h * p], DType::F32);
    let splits = (n * p).div_ceil(256);
    let part = empty(&e, vec![b * splits * nc * h], DType::F32);
    if b * nc * n * h * p > 0 {
        let device = e.device.index;
        let f = nvrtc::function(device, "ssd_aux", SSD_AUX, "ssd_states_bwd");
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

/// `x * s[.., None]` in f32.
pub fn scale_rows_fwd(x: T, s: T) -> T {
    let (rows, p) = rows_dims(&x, &s);
    let (x, s) = (same_dtype(x, DType::F32), same_dtype(s, DType::F32));
    let n = rows * p;
    let y = empty(&x, vec![n], DType::F32);
    if n > 0 {
        let device = x.device.index;
        let f = nvrtc::function(device, "ssd_aux", SSD_AUX, "scale_rows_fwd");
        enqueue([&y, &x, &s], move |[mut y_p, mut x_p, mut s_p], stream| {
            let (mut n64, mut p32) = (n as i64, p as i32);
            let mut params = kernel_args!(x_p, s_p, y_p, n64, p32);
            // SAFETY: the kernel's signature; x, y `[n]`, s `[rows]`.
            unsafe { launch_flat(device, f, n, stream, &mut params) };
        });
    }
    let shape = x.meta.shape().clone();
    drop((x, s));
    Cb::float_reshape(y, shape)
}

/// `(dx, ds)` in f32.
pub fn scale_rows_bwd(g: T, x: T, s: T) -> (T, T) {
    let (rows, p) = rows_dims(&x, &s);
    let f32 = |t| same_dtype(t, DType::F32);
    let (g, x, s) = (f32(g), f32(x), f32(s));
    let dx = empty(&x, vec![rows * p], DType::F32);
    let ds = empty(&x, vec![rows], DType::F32);
    if rows * p > 0 {
        let device = x.device.index;
        let f = nvrtc::function(device, "ssd_aux", SSD_AUX, "scale_rows_bwd");
        enqueue(
            [&dx, &g, &x, &s, &ds],
            move |[mut dx_p, mut g_p, mut x_p, mut s_p, mut ds_p], stream| {
                let (mut r64, mut p32) = (rows as i64, p as i32);
                let mut params = kernel_args!(g_p, x_p, s_p, dx_p, ds_p, r64, p32);
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
            },
        );
    }
    let (xs, ss) = (x.meta.shape().clone(), s.meta.shape().clone());
    drop((g, x, s));
    (Cb::float_reshape(dx, xs), Cb::float_reshape(ds, ss))
}

/// The SSD scan's output, fused: `y = y_diag + exp(cs) * y_off + D[head] x`
/// per row `r` of `p` values (rows ordered `(b, l, h)`, `p` even), rounded
/// once to `x`'s dtype. One warp per row, reading pairs; the backward's row
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
    *reinterpret_cast<unsigned int*>(p + i) =
        (unsigned int)f32_to_bf16(a) | ((unsigned int)f32_to_bf16(b) << 16);
}

// One warp per row of p values (p even); rows ordered (b, l, h).
#define ROWS_PER_WARP(r, rows)                                                                   \
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; \
         r += (long long)gridDim.x * (blockDim.x >> 5))

template <typename T>
__device__ void ssd_out_fwd(const float* yd, const float* yo, const float* cs, const T* x,
                            const T* d, T* y, long long rows, int h, int p) {
    const int lane = threadIdx.x & 31;
    ROWS_PER_WARP(r, rows) {
        const float e = expf(cs[r]);
        const float dh = ld(d, (int)(r % h));
        for (int j = 2 * lane; j < p; j += 64) {
            const long long i = r * p + j;
            const float2 a = ld2(yd, i), o = ld2(yo, i), xv = ld2(x, i);
            st2(y, i, a.x + o.x * e + xv.x * dh, a.y + o.y * e + xv.y * dh);
        }
    }
}

template <typename T>
__device__ void ssd_out_bwd(const T* g, const float* yo, const float* cs, const T* x, const T* d,
                            float* dyd, float* dyo, float* dcs, T* dx, float* dd_rows,
                            long long rows, int h, int p) {
    const int lane = threadIdx.x & 31;
    ROWS_PER_WARP(r, rows) {
        const float e = expf(cs[r]);
        const float dh = ld(d, (int)(r % h));
        float s_cs = 0.0f, s_d = 0.0f;
        for (int j = 2 * lane; j < p; j += 64) {
            const long long i = r * p + j;
            const float2 gv = ld2(g, i), o = ld2(yo, i), xv = ld2(x, i);
            st2(dyd, i, gv.x, gv.y);
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
extern "C" __global__ void ssd_out_fwd_##SUF(const float* yd, const float* yo, const float* cs,  \
                                             const T* x, const T* d, T* y, long long rows, int h, \
                                             int p) {                                             \
    ssd_out_fwd<T>(yd, yo, cs, x, d, y, rows, h, p);                                              \
}                                                                                                 \
extern "C" __global__ void ssd_out_bwd_##SUF(const T* g, const float* yo, const float* cs,       \
                                             const T* x, const T* d, float* dyd, float* dyo,      \
                                             float* dcs, T* dx, float* dd_rows, long long rows,   \
                                             int h, int p) {                                      \
    ssd_out_bwd<T>(g, yo, cs, x, d, dyd, dyo, dcs, dx, dd_rows, rows, h, p);                      \
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

/// `y_diag + exp(cs) * y_off + D x` in `x`'s dtype and shape.
pub fn ssd_out_fwd(yd: T, yo: T, cs: T, x: T, d: T) -> T {
    let dtype = x.dtype;
    let (yd, yo, cs) = (f32_dense(yd), f32_dense(yo), f32_dense(cs));
    let (x, d) = (into_contiguous(x), same_dtype(d, dtype));
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
            let (mut r64, mut h32, mut p32) = (rows as i64, h as i32, p as i32);
            let mut params = kernel_args!(yd_p, yo_p, cs_p, x_p, d_p, y_p, r64, h32, p32);
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

/// `(dy_diag, dy_off, dcs, dx, dd)`: f32 except `dx` (`x`'s dtype).
pub fn ssd_out_bwd(g: T, yo: T, cs: T, x: T, d: T) -> (T, T, T, T, T) {
    let dtype = x.dtype;
    let (yo, cs) = (f32_dense(yo), f32_dense(cs));
    let (x, d, g) = (
        into_contiguous(x),
        same_dtype(d, dtype),
        same_dtype(g, dtype),
    );
    let (rows, h, p) = ssd_out_dims(&yo, &yo, &cs, &x, &d);
    let shape = x.meta.shape().to_vec();
    let dyd = empty(&x, shape.clone(), DType::F32);
    let dyo = empty(&x, shape.clone(), DType::F32);
    let dx = empty(&x, shape, dtype);
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
            [&g, &yo, &cs, &x, &d, &dyd, &dyo, &dcs, &dx, &dd_rows],
            move |[
                mut g_p,
                mut yo_p,
                mut cs_p,
                mut x_p,
                mut d_p,
                mut dyd_p,
                mut dyo_p,
                mut dcs_p,
                mut dx_p,
                mut dd_p,
            ],
                  stream| {
                let (mut r64, mut h32, mut p32) = (rows as i64, h as i32, p as i32);
                let mut params = kernel_args!(
                    g_p, yo_p, cs_p, x_p, d_p, dyd_p, dyo_p, dcs_p, dx_p, dd_p, r64, h32, p32
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
        return (dyd, dyo, dcs, dx, zeros_f32(&x, vec![h]));
    }
    drop((g, yo, cs, x, d, dd_rows));
    (dyd, dyo, dcs, dx, dd)
}
