//! FSDP's flat buffers: parameter gradients packed (and accumulated) into
//! a unit's f32 buffer, or copied into a bf16 one.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::empty;
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, launch_flat};

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
// dst[i] = src[i] in bf16 (no sum); a null src writes zeros. 8 per 16 bytes.
extern "C" __global__ void copy_bf16(const bf16_t* __restrict__ src, bf16_t* __restrict__ dst,
                                     long long n, int) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const bool vec = (((unsigned long long)dst | (unsigned long long)src) & 15ull) == 0;
    const long long n8 = vec ? n / 8 : 0;
    for (long long i = tid; i < n8; i += stride)
        ((uint4*)dst)[i] = src ? ((const uint4*)src)[i] : make_uint4(0u, 0u, 0u, 0u);
    for (long long i = 8 * n8 + tid; i < n; i += stride) dst[i] = src ? src[i] : (bf16_t)0;
}
"#;

/// See [`super::BambaBackend::bamba_pack`]: one kernel per part (cast
/// and copy, or add), zeros written only into the gaps. The accumulator is
/// updated in place when nothing else holds it. A bf16 buffer (no `acc`,
/// bf16 parts) is a plain copy.
pub fn pack(parts: Vec<(T, usize)>, len: usize, acc: Option<T>, dtype: DType) -> T {
    let like = parts
        .first()
        .map(|p| p.0.clone())
        .or_else(|| acc.clone())
        .expect("pack: nothing to pack");
    let device = like.device.index;
    let src_code = format!("{}{}", nvrtc::PRELUDE, PACK);
    let dst_bf16 = acc.is_none() && dtype == DType::BF16;
    assert!(
        !dst_bf16 || parts.iter().all(|p| p.0.dtype == DType::BF16),
        "pack: a {dtype:?} buffer takes bf16 parts and no accumulator"
    );
    let kernel = |src: DType| {
        let name = match src {
            _ if dst_bf16 => "copy_bf16",
            DType::BF16 => "pack_bf16",
            DType::F32 => "pack_f32",
            other => panic!("pack: unsupported gradient dtype {other:?}"),
        };
        nvrtc::function(device, "pack", &src_code, name)
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
        None if dst_bf16 => (empty(&like, vec![len], DType::BF16), false),
        None => (empty(&like, vec![len], DType::F32), false),
    };
    let mut parts: Vec<(T, usize)> = parts
        .into_iter()
        .map(|(p, o)| (into_contiguous(p), o))
        .collect();
    parts.sort_by_key(|p| p.1);
    let zeros = kernel(DType::F32);
    let elem = if dst_bf16 { 2 } else { 4 };
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
            let (mut s_p, mut d_p) = (if src == 0 { 0 } else { p[src] }, p[0] + elem * at as u64);
            let (mut n64, mut acc32) = (n as i64, acc as i32);
            let mut params = kernel_args!(s_p, d_p, n64, acc32);
            // SAFETY: the kernel's signature; `src` holds `n` elements (or is
            // null), `dst` at least `at + n` of its dtype.
            unsafe { launch_flat(device, f, n, stream, &mut params) };
        }
    });
    drop(operands);
    out
}
