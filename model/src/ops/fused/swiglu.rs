//! SwiGLU's gate.

use burn_cubecl::kernel::into_contiguous;

use super::{empty, same_dtype, suffix};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch_flat};

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
