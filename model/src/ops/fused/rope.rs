//! Rotary position embeddings (GPT-NeoX's rotate_half on the first `rd`
//! dims of each head) in one pass each way.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{empty, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch_flat};

/// x `[b, l, heads, d]` (rows of d), cos/sin `[l, rd]` f32. Forward:
/// `x * cos + rotate_half(x) * sin` rounded as torch does it in x's dtype
/// (tables cast to it, each product and the sum rounded); backward: the
/// transpose, `dy * cos + rotate_half^T(dy * sin)`, rounded the same way.
/// Dims past `rd` pass through.
const ROPE: &str = r#"
// I: the element index type. 32-bit where the tensor fits (a 64-bit
// division is a ~70-instruction call, and each element takes three).
template <typename T, bool BWD, typename I>
__device__ void rope_i(const T* x, const float* cs, const float* sn, T* y, I n, int heads,
                       int l, int d, int rd) {
    const int h = rd / 2;
    for (I e = blockIdx.x * (I)blockDim.x + threadIdx.x; e < n; e += (I)gridDim.x * blockDim.x) {
        const int c = (int)(e % (I)d);
        if (c >= rd) { y[e] = x[e]; continue; }
        if (c >= h) continue;  // done with its partner c - h
        const I row = e / (I)d;
        const long long t = (long long)((row / (I)heads) % (I)l);
        const float* ct = cs + t * rd;
        const float* st_ = sn + t * rd;
        const float a = ld(x, e), b = ld(x, e + h);
        const float c0 = rnd(ct[c], T()), c1 = rnd(ct[c + h], T());
        const float s0 = rnd(st_[c], T()), s1 = rnd(st_[c + h], T());
        // No contraction into fma: the reference rounds each product.
        float lo, hi;
        if (BWD) {
            lo = __fadd_rn(rnd(__fmul_rn(a, c0), T()), rnd(__fmul_rn(b, s1), T()));
            hi = __fsub_rn(rnd(__fmul_rn(b, c1), T()), rnd(__fmul_rn(a, s0), T()));
        } else {
            lo = __fsub_rn(rnd(__fmul_rn(a, c0), T()), rnd(__fmul_rn(b, s0), T()));
            hi = __fadd_rn(rnd(__fmul_rn(b, c1), T()), rnd(__fmul_rn(a, s1), T()));
        }
        st(y, e, lo);
        st(y, e + h, hi);
    }
}
template <typename T, bool BWD>
__device__ void rope(const T* x, const float* cs, const float* sn, T* y, long long rows, int heads,
                     int l, int d, int rd) {
    const long long n = rows * d;
    // Room for the grid's last stride past n in 32 bits.
    if (n + (long long)gridDim.x * blockDim.x < 0xffffffffLL)
        rope_i<T, BWD, unsigned>(x, cs, sn, y, (unsigned)n, heads, l, d, rd);
    else
        rope_i<T, BWD, long long>(x, cs, sn, y, n, heads, l, d, rd);
}

#define ROPE_KERNELS(SUF, T)                                                                     \
extern "C" __global__ void rope_fwd_##SUF(const T* x, const float* c, const float* s, T* y,      \
                                          long long rows, int heads, int l, int d, int rd) {     \
    rope<T, false>(x, c, s, y, rows, heads, l, d, rd);                                           \
}                                                                                                \
extern "C" __global__ void rope_bwd_##SUF(const T* x, const float* c, const float* s, T* y,      \
                                          long long rows, int heads, int l, int d, int rd) {     \
    rope<T, true>(x, c, s, y, rows, heads, l, d, rd);                                            \
}
ROPE_KERNELS(f32, float)
ROPE_KERNELS(bf16, bf16_t)
"#;

fn rope_src() -> String {
    format!("{}{}", nvrtc::PRELUDE, ROPE)
}

fn rope(x: T, cos: T, sin: T, bwd: bool) -> T {
    let dtype = x.dtype;
    let x = into_contiguous(x);
    let (cos, sin) = (same_dtype(cos, DType::F32), same_dtype(sin, DType::F32));
    let s = x.meta.shape().to_vec();
    assert_eq!(s.len(), 4, "fused rope: x must be [b, l, heads, head_dim]");
    let (l, heads, d) = (s[1], s[2], s[3]);
    let rd = cos.meta.shape().num_elements() / l.max(1);
    assert!(
        rd <= d && rd % 2 == 0 && sin.meta.shape().num_elements() == l * rd,
        "fused rope: tables must be [l, rotary_dim <= head_dim]"
    );
    let y = empty(&x, s.clone(), dtype);
    let rows: usize = s[..3].iter().product();
    if rows * d == 0 {
        return y;
    }
    let device = x.device.index;
    let dir = if bwd { "bwd" } else { "fwd" };
    let f = nvrtc::function(
        device,
        "rope",
        &rope_src(),
        &format!("rope_{dir}_{}", suffix(dtype)),
    );
    enqueue(
        [&y, &x, &cos, &sin],
        move |[mut y_p, mut x_p, mut c_p, mut s_p], stream| {
            let (mut rows64, mut h32, mut l32) = (rows as i64, heads as i32, l as i32);
            let (mut d32, mut rd32) = (d as i32, rd as i32);
            let mut params = kernel_args!(x_p, c_p, s_p, y_p, rows64, h32, l32, d32, rd32);
            // SAFETY: the kernel's signature; x and y hold rows * d, the tables l * rd f32.
            unsafe { launch_flat(device, f, rows * d, stream, &mut params) };
        },
    );
    drop((x, cos, sin));
    y
}

/// The rotation of `x [b, l, heads, d]` by the `[l, rd]` tables.
pub fn rope_fwd(x: T, cos: T, sin: T) -> T {
    rope(x, cos, sin, false)
}

/// `dx` from `dy` (the rotation transposed).
pub fn rope_bwd(dy: T, cos: T, sin: T) -> T {
    rope(dy, cos, sin, true)
}
