//! Fused CUDA kernels (NVRTC, `nvrtc.rs`) behind the [`BambaBackend`] hooks:
//! one pass over memory where burn's ops would make one per operation.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::nvrtc::{self, T, enqueue, launch};
use crate::kernel_args;

/// The CUDA backend type, for burn's own ops on the kernels' tensors (the
/// tensor type does not depend on its element parameters).
type Cb = burn_cubecl::CubeBackend<cubecl_cuda::CudaRuntime, f32, i32, u8>;

mod attention;
mod conv;
mod embed;
mod heads;
mod narrow;
mod norm;
mod optim;
mod pack;
mod rope;
mod softmax;
mod ssd_diag;
mod ssd_out;
mod ssd_states;
mod swiglu;
mod xent;

pub use attention::{FLASH_HEAD_DIMS, flash_attention_bwd, flash_attention_fwd};
pub use conv::{conv1d_silu_bwd, conv1d_silu_fwd};
pub use embed::embedding_bwd;
pub use heads::{dt_softplus_bwd, dt_softplus_fwd, scale_heads_bwd, scale_heads_fwd};
pub use narrow::{add_narrow, narrow_view, reshape_view};
pub use norm::{rms_norm_bwd, rms_norm_fwd};
pub use optim::{adamw, sum_squares};
pub use pack::pack;
pub use rope::{rope_bwd, rope_fwd};
pub use softmax::{causal_softmax_bwd, causal_softmax_fwd};
pub use ssd_diag::{ssd_diag_bwd, ssd_diag_fwd};
pub use ssd_out::{ssd_out_bwd, ssd_out_fwd};
pub use ssd_states::{
    chunk_cumsum, end_decay_bwd, end_decay_fwd, scale_rows_bwd, scale_rows_fwd, ssd_states_bwd,
    ssd_states_fwd,
};
pub use swiglu::{swiglu_bwd, swiglu_fwd};
pub use xent::{cross_entropy_bwd, cross_entropy_fwd};

/// Column sums of a `[rows, d]` f32 matrix in a fixed order (per-block
/// partials summed after a kernel, instead of float atomics); launch with
/// blocks of (32, 8) threads, one block per 32 columns.
const COLSUM: &str = r#"
// out[c] = sum over rows of part[r, c] (part [rows, d] f32). Block (32, 32)
// per 32 columns: thread (tx, ty) sums rows ty, ty + 32, ..., then the 32
// partials are added in order (deterministic). 32 row lanes: a norm's
// 1056 partial rows were a 132-deep dependent chain per thread at 8.
extern "C" __global__ void colsum(const float* __restrict__ part, float* __restrict__ out,
                                  int rows, int d) {
    __shared__ float s[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float a = 0.0f;
    if (c < d)
        for (int r = threadIdx.y; r < rows; r += 32) a += part[(long long)r * d + c];
    s[threadIdx.y][threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        float t = 0.0f;
        for (int k = 0; k < 32; ++k) t += s[k][threadIdx.x];
        out[c] = t;
    }
}
"#;

/// Launches `colsum` (in `f`'s module) over `part [rows, d]` into `out [d]`.
///
/// # Safety
/// `part` and `out` must be live f32 buffers of those sizes, `f` the
/// `colsum` of a module built with [`COLSUM`].
unsafe fn launch_colsum(
    device: usize,
    f: nvrtc::Kernel,
    stream: nvrtc::Stream,
    mut part: u64,
    mut out: u64,
    rows: usize,
    d: usize,
) {
    let (mut rows32, mut d32) = (rows as i32, d as i32);
    let mut params = kernel_args!(part, out, rows32, d32);
    let blocks = d.div_ceil(32) as u32;
    // SAFETY: the caller's contract.
    unsafe {
        launch(
            device,
            f,
            (blocks, 1, 1),
            (32, 32, 1),
            0,
            stream,
            &mut params,
        )
    };
}

/// The kernel-name suffix of a storage dtype.
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => panic!("fused kernels: unsupported dtype {other:?}"),
    }
}

/// The row stride of `t` read as `[rows, d]` (unit column stride, leading
/// dims collapsing to evenly spaced rows), or `None` if it is not such a
/// view. Padded allocations and [`narrow_view`]s are.
fn rows_of(t: &T) -> Option<usize> {
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
fn with_rows(t: T) -> (T, usize) {
    match rows_of(&t) {
        Some(ld) => (t, ld),
        None => {
            let t = into_contiguous(t);
            let d = t.meta.shape().last().copied().unwrap_or(1);
            (t, d)
        }
    }
}

/// `x [.., h, p]` as tokens of `h` rows of `p`: `(x, ldx)` with token `t`
/// at `t * ldx` (heads `p` apart, unit inner stride) where `x` is such a
/// view (a [`reshape_view`] of a column slice), else a contiguous copy
/// (`ldx = h * p`). `ldx` is a multiple of `align` elements (paired loads).
fn token_rows(x: T, align: usize) -> (T, usize) {
    let (s, st) = (x.meta.shape().to_vec(), x.meta.strides().to_vec());
    let r = s.len();
    if r >= 3 {
        let (h, p) = (s[r - 2], s[r - 1]);
        let inner = (st[r - 1] == 1 || p <= 1) && (st[r - 2] == p || h <= 1);
        let ld = st[r - 3];
        let even = (0..r - 3).all(|i| s[i] <= 1 || st[i] == st[i + 1] * s[i + 1]);
        if inner && even && ld >= h * p && ld % align == 0 && aligned16(&x) {
            return (x, ld);
        }
    }
    let x = into_contiguous(x);
    let hp = if r >= 2 {
        s[r - 2] * s[r - 1]
    } else {
        s.iter().product()
    };
    (x, hp)
}

/// Whether `t`'s first element is 16-byte aligned (cubecl's buffers are;
/// a view may start inside one).
fn aligned16(t: &T) -> bool {
    t.handle.offset_start.unwrap_or(0).is_multiple_of(16)
}

/// One block per row, at most 8 per SM of a 132-SM GPU (grid-stride beyond).
fn norm_grid(rows: usize) -> (u32, u32, u32) {
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

fn empty(like: &T, shape: Vec<usize>, dtype: DType) -> T {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// `t` in `dtype`, contiguous.
fn same_dtype(t: T, dtype: DType) -> T {
    into_contiguous(if t.dtype == dtype {
        t
    } else {
        burn_cubecl::kernel::cast(t, dtype)
    })
}

fn zeros_f32(like: &T, shape: Vec<usize>) -> T {
    burn_cubecl::ops::numeric::zeros_client(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}
