//! The token embedding's weight gradient, deterministic (no atomics).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::{same_dtype, suffix, zeros};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// `dw[v] = sum over positions t (in order) with ids[t] == v of dy[t]`,
/// summed in f32 and rounded once. burn's `select_assign` took 1.5 ms for
/// 4096 tokens of a 128k x 2048 table (one launch, rows in turn).
const EMBED: &str = r#"
// One block per position t. Only the first occurrence of an id works: it
// collects the positions u >= t with the same id, 256 at a time, in order
// (ballot and popcount: no atomics, so the sums never depend on timing),
// and adds their dy rows, each thread owning columns tid + 256 k.
#define EB_COLS 16  // columns per thread per pass: 4096-wide rows in one
template <typename T>
__device__ void embed_bwd(const int* __restrict__ ids, const T* __restrict__ dy,
                          T* __restrict__ dw, int n, int d) {
    __shared__ int pos[256];
    __shared__ int warp_n[8];
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int id = ids[t];
    int earlier = 0;
    for (int u = tid; u < t; u += 256) earlier |= ids[u] == id;
    if (__syncthreads_or(earlier)) return;
    for (int c0 = 0; c0 < d; c0 += 256 * EB_COLS) {
        float acc[EB_COLS];
#pragma unroll
        for (int k = 0; k < EB_COLS; ++k) acc[k] = 0.0f;
        for (int u0 = t; u0 < n; u0 += 256) {
            const int u = u0 + tid;
            const bool m = u < n && ids[u] == id;
            const unsigned b = __ballot_sync(0xffffffffu, m);
            if (lane == 0) warp_n[w] = __popc(b);
            __syncthreads();
            int before = 0, total = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                before += k < w ? warp_n[k] : 0;
                total += warp_n[k];
            }
            if (m) pos[before + __popc(b & ((1u << lane) - 1u))] = u;
            __syncthreads();
            for (int k = 0; k < total; ++k) {
                const T* row = dy + (long long)pos[k] * d;
#pragma unroll
                for (int j = 0; j < EB_COLS; ++j) {
                    const int c = c0 + tid + 256 * j;
                    if (c < d) acc[j] += ld(row, c);
                }
            }
            __syncthreads();  // pos and warp_n are rewritten next round
        }
#pragma unroll
        for (int j = 0; j < EB_COLS; ++j) {
            const int c = c0 + tid + 256 * j;
            if (c < d) st(dw + (long long)id * d, c, acc[j]);
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) embed_bwd_f32(const int* ids, const float* dy,
                                                                float* dw, int n, int d) {
    embed_bwd<float>(ids, dy, dw, n, d);
}
extern "C" __global__ void __launch_bounds__(256) embed_bwd_bf16(const int* ids, const bf16_t* dy,
                                                                 bf16_t* dw, int n, int d) {
    embed_bwd<bf16_t>(ids, dy, dw, n, d);
}
"#;

/// The weight gradient `[vocab, d]` (in `dy`'s dtype) of an embedding
/// lookup of `ids [..]` that produced `dy [.., d]`. Ids must be in range
/// (the forward's gather checked nothing either; the data loader does).
pub fn embedding_bwd(dy: T, ids: T, vocab: usize) -> T {
    let shape = dy.meta.shape().to_vec();
    let d = *shape.last().expect("embedding gradient: [.., d]");
    let n: usize = ids.meta.shape().iter().product();
    assert_eq!(
        n * d,
        shape.iter().product::<usize>(),
        "embedding gradient: dy {shape:?} for {n} ids"
    );
    let dtype = dy.dtype;
    let dy = into_contiguous(dy);
    let ids = same_dtype(ids, DType::I32);
    let dw = zeros([vocab, d].into(), &dy.device, dtype);
    if n > 0 && d > 0 {
        let device = dy.device.index;
        let src = format!("{}{}", nvrtc::PRELUDE, EMBED);
        let f = nvrtc::function(
            device,
            "embed",
            &src,
            &format!("embed_bwd_{}", suffix(dtype)),
        );
        enqueue(
            [&dw, &dy, &ids],
            move |[mut dw_p, mut dy_p, mut ids_p], stream| {
                let (mut n32, mut d32) = (n as i32, d as i32);
                let mut params = kernel_args!(ids_p, dy_p, dw_p, n32, d32);
                // SAFETY: the kernel's signature; contiguous `ids [n]` (i32),
                // `dy [n, d]` and `dw [vocab, d]` of one dtype.
                unsafe {
                    launch(
                        device,
                        f,
                        (n as u32, 1, 1),
                        (256, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                };
            },
        );
    }
    drop((dy, ids));
    dw
}
