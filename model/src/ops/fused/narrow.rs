//! Column slices as views, and the gradient of a slice added into its
//! parent's gradient buffer in place.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;

use super::{Cb, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

// full[r, offset + i] += part[r, i] for each of `rows` rows (`m` elements
// of part per row, `row_stride` of full). Block (row, column block): 16-byte
// packs (1024 packs per block) where the row starts and m allow, else four
// elements per thread strided by the block so that loads coalesce.
const ADD_NARROW: &str = r#"
template <typename T>
__device__ void add_narrow(T* full, const T* part, long long m, long long row_stride, long long offset) {
    constexpr int V = Pack<T>::V;
    const long long r = blockIdx.x;
    T* f = full + r * row_stride + offset;
    const T* p = part + r * m;
    const bool vec = ((unsigned long long)f & 15ull) == 0 && ((unsigned long long)p & 15ull) == 0 &&
                     m % V == 0;
    if (vec) {
        const long long i = ((long long)blockIdx.y * blockDim.x + threadIdx.x) * V;
        if (i < m) {
            float a[V], b[V];
            Pack<T>::load(f, i, a);
            Pack<T>::load(p, i, b);
#pragma unroll
            for (int k = 0; k < V; ++k) a[k] += b[k];
            Pack<T>::store(f, i, a);
        }
        return;
    }
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
        let slices = crate::ops::narrow_slices(&full.meta.shape().clone(), dim, start, len);
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
    if dim + 1 == rank && t.meta.strides()[dim] == 1 && leading > 1 && offset.is_multiple_of(align)
    {
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

/// `t` reshaped to `shape`, as a view when the reshape only splits one dim
/// in two (a [`narrow_view`]'s last dim into heads, or its sequence into
/// chunks): the two new dims get strides `inner * s` and `s` from the split
/// dim's `s`, the others keep theirs. Otherwise burn's reshape (which copies
/// a non-contiguous input).
pub fn reshape_view(t: T, shape: burn::tensor::Shape) -> T {
    let (old, strides) = (t.meta.shape().to_vec(), t.meta.strides().to_vec());
    let new = shape.to_vec();
    let r = old.len();
    // The dim split in two: the first where the shapes differ.
    let k = (0..r).find(|&i| new.get(i) != Some(&old[i])).unwrap_or(r);
    let splits_one = new.len() == r + 1
        && k < r
        && new[k] * new[k + 1] == old[k]
        && new[k + 2..] == old[k + 1..];
    if !splits_one || t.is_contiguous() {
        return Cb::float_reshape(t, shape);
    }
    let mut meta = (*t.meta).clone();
    *meta.shape_mut() = new.iter().copied().collect();
    let mut st = strides[..k].to_vec();
    st.extend([new[k + 1] * strides[k], strides[k]]);
    st.extend_from_slice(&strides[k + 1..]);
    *meta.strides_mut() = st.iter().copied().collect();
    burn_cubecl::tensor::CubeTensor::new(
        t.client.clone(),
        t.handle.clone(),
        meta,
        t.device.clone(),
        t.dtype,
    )
}
