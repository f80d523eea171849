//! SwiGLU's gate.

use burn_cubecl::kernel::into_contiguous;

use super::{empty, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch_flat};

/// SwiGLU's gate, `silu(g) * u`, rounded as torch's `act(gate) * up`;
/// backward in f32 from `g` and `u`.
const SWIGLU: &str = r#"
// 16-byte packs (fv(offset)) where all operands are aligned, then the
// tail one element at a time (f1(index)).
template <int V, typename FV, typename F1>
__device__ __forceinline__ void vec_loop(long long n, bool aligned, FV fv, F1 f1) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long nv = aligned ? n / V : 0;
    for (long long i = tid; i < nv; i += stride) fv(i * V);
    for (long long i = nv * V + tid; i < n; i += stride) f1(i);
}
__device__ __forceinline__ bool al16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }
__device__ __forceinline__ float silu(float g) { return g * sigm(g); }

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, long long n) {
    constexpr int V = Pack<T>::V;
    vec_loop<V>(n, al16(g) && al16(u) && al16(y), [&](long long o) {
        float gv[V], uv[V];
        Pack<T>::load(g, o, gv);
        Pack<T>::load(u, o, uv);
#pragma unroll
        for (int k = 0; k < V; ++k) gv[k] = rnd(silu(gv[k]), T()) * uv[k];
        Pack<T>::store(y, o, gv);
    }, [&](long long i) {
        st(y, i, rnd(silu(ld(g, i)), T()) * ld(u, i));
    });
}

__device__ __forceinline__ void swiglu_grad(float gv, float uv, float d, float& dg, float& du) {
    const float sg = sigm(gv);
    du = d * gv * sg;
    dg = d * uv * sg * (1.0f + gv * (1.0f - sg));
}

template <typename T>
__device__ void swiglu_bwd(const T* dy, const T* g, const T* u, T* dg, T* du, long long n) {
    constexpr int V = Pack<T>::V;
    vec_loop<V>(n, al16(dy) && al16(g) && al16(u) && al16(dg) && al16(du), [&](long long o) {
        float gv[V], uv[V], dv[V];
        Pack<T>::load(g, o, gv);
        Pack<T>::load(u, o, uv);
        Pack<T>::load(dy, o, dv);
#pragma unroll
        for (int k = 0; k < V; ++k) swiglu_grad(gv[k], uv[k], dv[k], gv[k], uv[k]);
        Pack<T>::store(dg, o, gv);
        Pack<T>::store(du, o, uv);
    }, [&](long long i) {
        float a, b;
        swiglu_grad(ld(g, i), ld(u, i), ld(dy, i), a, b);
        st(dg, i, a);
        st(du, i, b);
    });
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
