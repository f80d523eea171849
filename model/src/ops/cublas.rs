//! GEMMs on the CUDA backend through cuBLAS, on burn's own device memory.
//!
//! burn 0.21's matmul kernels reach 84-225 TFLOP/s on an H100 and compute f32
//! as TF32; `cublasGemmStridedBatchedEx` reaches ~820 in bf16 and computes f32
//! in full precision. The GEMM is enqueued on the CUDA stream that owns the
//! output (exposed by the patched cubecl-cuda in `trainer/vendor/`), so it is
//! ordered after burn's kernels that produced the inputs and before those
//! that read the output: no host synchronisation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl_cuda::CudaRuntime;
use cudarc::cublas::sys as cb;
use cudarc::driver::CudaContext;

use super::BambaBackend;

type T = CubeTensor<CudaRuntime>;

impl<F: FloatElement, I: IntElement, BT: BoolElement> BambaBackend
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn bamba_matmul(lhs: T, rhs: T) -> T {
        let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
        if ls[..ls.len() - 2] != rs[..rs.len() - 2] {
            // Broadcast batch dims: rare in the model; burn's kernel handles them.
            return Self::float_matmul(lhs, rhs);
        }
        let dtype = lhs.dtype;
        gemm(lhs, rhs, false, dtype)
    }

    fn bamba_matmul_tf32(lhs: T, rhs: T) -> T {
        let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
        if ls[..ls.len() - 2] != rs[..rs.len() - 2] {
            return Self::float_matmul(lhs, rhs);
        }
        let dtype = lhs.dtype;
        gemm(lhs, rhs, true, dtype)
    }

    fn bamba_matmul_f32(lhs: T, rhs: T) -> T {
        let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
        if ls[..ls.len() - 2] != rs[..rs.len() - 2] {
            let f32 = |t| Self::float_cast(t, burn::tensor::FloatDType::F32);
            return Self::float_matmul(f32(lhs), f32(rhs));
        }
        gemm(lhs, rhs, false, DType::F32)
    }

    fn bamba_matmul_acc(lhs: T, rhs: T, acc: T) -> T {
        let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
        if ls[..ls.len() - 2] == rs[..rs.len() - 2] && acc_fits(&lhs, &rhs, &acc) {
            return gemm_into(lhs, rhs, acc);
        }
        let product = Self::bamba_matmul(lhs, rhs);
        Self::float_add(acc, product)
    }

    fn bamba_fused() -> bool {
        true
    }

    fn bamba_transposed(t: &T) -> bool {
        layout(t).is_some_and(|l| !l.row_major)
    }

    fn bamba_zeros(
        shape: burn::tensor::Shape,
        device: &burn::tensor::Device<Self>,
        dtype: DType,
    ) -> T {
        super::fused::zeros(shape, device, dtype)
    }

    fn bamba_narrow(t: T, dim: usize, start: usize, len: usize) -> T {
        super::fused::narrow_view(t, dim, start, len)
    }

    fn bamba_reshape_view(t: T, shape: burn::tensor::Shape) -> T {
        super::fused::reshape_view(t, shape)
    }

    fn bamba_add_narrow(full: T, part: T, dim: usize, start: usize) -> T {
        super::fused::add_narrow(full, part, dim, start)
    }

    fn bamba_pack(parts: Vec<(T, usize)>, len: usize, acc: Option<T>, dtype: DType) -> T {
        super::fused::pack(parts, len, acc, dtype)
    }

    fn bamba_read_f32(ts: Vec<T>, out: &mut [f32]) -> bool {
        match super::to_host::read_f32(ts, out) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("warning: {e}; reading through burn instead");
                false
            }
        }
    }

    fn bamba_rms_norm_fwd(x: T, z: Option<T>, w: T, eps: f64) -> (T, T) {
        super::fused::rms_norm_fwd(x, z, w, eps)
    }

    fn bamba_rms_norm_bwd(
        dout: T,
        x: T,
        z: Option<T>,
        w: T,
        rstd: T,
        acc: Option<T>,
    ) -> (T, Option<T>, T) {
        super::fused::rms_norm_bwd(dout, x, z, w, rstd, acc)
    }

    fn bamba_conv1d_silu_fwd(x: T, w: T, bias: Option<T>) -> T {
        super::fused::conv1d_silu_fwd(x, w, bias)
    }

    fn bamba_conv1d_silu_bwd(dy: T, x: T, w: T, bias: Option<T>) -> (T, T, Option<T>) {
        super::fused::conv1d_silu_bwd(dy, x, w, bias)
    }

    fn bamba_dt_softplus_fwd(raw: T, bias: T, lo: f64, hi: f64) -> T {
        super::fused::dt_softplus_fwd(raw, bias, lo, hi)
    }

    fn bamba_dt_softplus_bwd(g: T, raw: T, bias: T, lo: f64, hi: f64) -> (T, T) {
        super::fused::dt_softplus_bwd(g, raw, bias, lo, hi)
    }

    fn bamba_chunk_cumsum(x: T, reverse: bool) -> T {
        super::fused::chunk_cumsum(x, reverse)
    }

    fn bamba_end_decay_fwd(dt: T, cs: T) -> T {
        super::fused::end_decay_fwd(dt, cs)
    }

    fn bamba_end_decay_bwd(g: T, dt: T, cs: T) -> (T, T) {
        super::fused::end_decay_bwd(g, dt, cs)
    }

    fn bamba_scale_heads_fwd(x: T, a: T) -> T {
        super::fused::scale_heads_fwd(x, a)
    }

    fn bamba_scale_heads_bwd(g: T, x: T, a: T) -> (T, T) {
        super::fused::scale_heads_bwd(g, x, a)
    }

    fn bamba_sum_squares(parts: Vec<(T, usize)>, len: usize) -> T {
        super::fused::sum_squares(parts, len)
    }

    fn bamba_cross_entropy_fwd(logits: T, targets: T, z: f64) -> (T, T) {
        super::fused::cross_entropy_fwd(logits, targets, z)
    }

    fn bamba_cross_entropy_bwd(g: T, logits: T, targets: T, lse: T, z: f64) -> T {
        super::fused::cross_entropy_bwd(g, logits, targets, lse, z)
    }

    fn bamba_causal_softmax_fwd(scores: T, scale: f64) -> T {
        super::fused::causal_softmax_fwd(scores, scale)
    }

    fn bamba_causal_softmax_bwd(dprobs: T, probs: T, scale: f64) -> T {
        super::fused::causal_softmax_bwd(dprobs, probs, scale)
    }

    fn bamba_rope(x: T, cos: T, sin: T) -> T {
        super::fused::rope_fwd(x, cos, sin)
    }

    fn bamba_rope_bwd(dy: T, cos: T, sin: T) -> T {
        super::fused::rope_bwd(dy, cos, sin)
    }

    fn bamba_flash_head_dim(head_dim: usize) -> bool {
        super::fused::FLASH_HEAD_DIMS.contains(&head_dim)
    }

    fn bamba_flash_attention_fwd(q: T, k: T, v: T, scale: f64) -> (T, T) {
        super::fused::flash_attention_fwd(q, k, v, scale)
    }

    fn bamba_flash_attention_bwd(
        dout: T,
        q: T,
        k: T,
        v: T,
        out: T,
        lse: T,
        scale: f64,
    ) -> (T, T, T) {
        super::fused::flash_attention_bwd(dout, q, k, v, out, lse, scale)
    }

    fn bamba_embedding_bwd(dy: T, ids: T, vocab: usize) -> T {
        super::fused::embedding_bwd(dy, ids, vocab)
    }

    fn bamba_swiglu_fwd(g: T, u: T) -> T {
        super::fused::swiglu_fwd(g, u)
    }

    fn bamba_swiglu_bwd(dy: T, g: T, u: T) -> (T, T) {
        super::fused::swiglu_bwd(dy, g, u)
    }

    fn bamba_ssd_diag_fwd(scores: T, cs: T, dt: T, x: T, tf32: bool) -> T {
        super::fused::ssd_diag_fwd(scores, cs, dt, x, tf32)
    }

    fn bamba_ssd_diag_bwd(
        dy: T,
        scores: T,
        cs: T,
        dt: T,
        x: T,
        tf32: bool,
        acc: Option<T>,
    ) -> (T, T, T, T) {
        super::fused::ssd_diag_bwd(dy, scores, cs, dt, x, tf32, acc)
    }

    fn bamba_ssd_states_fwd(s: T, a: T, out: DType) -> T {
        super::fused::ssd_states_fwd(s, a, out)
    }

    fn bamba_ssd_states_bwd(de: T, a: T, e: T) -> (T, T) {
        super::fused::ssd_states_bwd(de, a, e)
    }

    fn bamba_ssd_out_fwd(yd: T, yo: T, cs: T, x: T, d: T) -> T {
        super::fused::ssd_out_fwd(yd, yo, cs, x, d)
    }

    fn bamba_ssd_out_bwd(g: T, yo: T, cs: T, x: T, d: T) -> (T, T, T, T, T) {
        super::fused::ssd_out_bwd(g, yo, cs, x, d)
    }

    fn bamba_scale_rows_fwd(x: T, s: T) -> T {
        super::fused::scale_rows_fwd(x, s)
    }

    fn bamba_scale_rows_bwd(g: T, x: T, s: T, acc: Option<T>) -> (T, T) {
        super::fused::scale_rows_bwd(g, x, s, acc)
    }

    fn bamba_adamw(
        s: super::AdamWState<Self>,
        h: &super::AdamWHyper,
    ) -> Option<([T; 3], Option<T>)> {
        Some(super::fused::adamw(
            s.param,
            s.grad,
            s.exp_avg,
            s.exp_avg_sq,
            &s.no_decay,
            s.grad_scale,
            s.bf16_copy,
            h,
        ))
    }
}

/// How a `[rows, cols]` matrix (the last two dims) lies in memory, as
/// cuBLAS (column-major) sees it.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// The buffer read column-major is the matrix itself transposed (row-major storage).
    row_major: bool,
    ld: i64,
    batch_stride: i64,
}

/// The layout of `t`, if cuBLAS can read it in place: row-major or
/// transposed storage of the last two dims, and batch dims that collapse to
/// one stride (0 for a broadcast batch).
fn layout(t: &T) -> Option<Layout> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let d = shape.len();
    let (r, c) = (shape[d - 2], shape[d - 1]);
    let (sr, sc) = (strides[d - 2], strides[d - 1]);
    let (row_major, ld) = if (sc == 1 || c == 1) && (sr >= c || r == 1) {
        (true, if r == 1 { c } else { sr })
    } else if (sr == 1 || r == 1) && (sc >= r || c == 1) {
        (false, if c == 1 { r } else { sc })
    } else {
        return None;
    };
    // Batch dims (size-1 dims carry no stride) must collapse to one stride.
    let batch: Vec<(usize, usize)> = (0..d - 2)
        .filter(|&i| shape[i] > 1)
        .map(|i| (shape[i], strides[i]))
        .collect();
    let batch_stride = match batch.last() {
        None => (r * c) as i64,
        Some(&(_, s)) => {
            let uniform = batch.windows(2).all(|w| w[0].1 == w[1].0 * w[1].1);
            if !uniform {
                return None;
            }
            s as i64
        }
    };
    Some(Layout {
        row_major,
        ld: ld.max(1) as i64,
        batch_stride,
    })
}

fn readable(t: T) -> (T, Layout) {
    match layout(&t) {
        Some(l) => (t, l),
        None => {
            let t = into_contiguous(t);
            let l = layout(&t).expect("a contiguous tensor is row-major");
            (t, l)
        }
    }
}

fn cuda_type(dtype: DType) -> cb::cudaDataType {
    match dtype {
        DType::F32 => cb::cudaDataType::CUDA_R_32F,
        DType::BF16 => cb::cudaDataType::CUDA_R_16BF,
        DType::F16 => cb::cudaDataType::CUDA_R_16F,
        other => panic!("cuBLAS GEMM: unsupported dtype {other:?}"),
    }
}

thread_local! {
    /// One cuBLAS handle per device per thread (handles are not thread-safe).
    static HANDLES: RefCell<HashMap<usize, (Arc<CudaContext>, Handle)>> = RefCell::new(HashMap::new());
}

struct Handle(cb::cublasHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, dropped once.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.0);
        }
    }
}

fn with_handle<R>(device: usize, f: impl FnOnce(cb::cublasHandle_t) -> R) -> R {
    HANDLES.with(|h| {
        let mut h = h.borrow_mut();
        let (ctx, handle) = h.entry(device).or_insert_with(|| {
            // cubecl runs on the device's primary context; so does cudarc's.
            let ctx = CudaContext::new(device).expect("CUDA context");
            ctx.bind_to_thread().expect("bind CUDA context");
            let handle = cudarc::cublas::result::create_handle().expect("cuBLAS handle");
            (ctx, Handle(handle))
        });
        ctx.bind_to_thread().expect("bind CUDA context");
        f(handle.0)
    })
}

/// `lhs [.., m, k] @ rhs [.., k, n]` with equal batch dims, written in
/// `out` (the operands' dtype, or f32 from bf16: f32 accumulation either
/// way); f32 as TF32 when `tf32`.
pub fn gemm(lhs: T, rhs: T, tf32: bool, out: DType) -> T {
    gemm_beta(lhs, rhs, tf32, out, None)
}

/// Whether [`gemm_into`] can add `lhs @ rhs` into `acc`: a row-major buffer
/// of the product's shape and dtype that nothing else holds.
fn acc_fits(lhs: &T, rhs: &T, acc: &T) -> bool {
    let (ls, rs) = (lhs.meta.shape(), rhs.meta.shape());
    let d = ls.len();
    let mut shape = ls[..d - 2].to_vec();
    shape.extend_from_slice(&[ls[d - 2], rs[d - 1]]);
    acc.dtype == lhs.dtype
        && acc.meta.shape().to_vec() == shape
        && acc.is_contiguous()
        && acc.can_mut()
}

/// `acc += lhs @ rhs` by the GEMM itself (beta = 1); see [`acc_fits`].
fn gemm_into(lhs: T, rhs: T, acc: T) -> T {
    let dtype = lhs.dtype;
    gemm_beta(lhs, rhs, false, dtype, Some(acc))
}

/// [`gemm`], into `acc` (beta = 1) when given (checked by [`acc_fits`]).
fn gemm_beta(lhs: T, rhs: T, tf32: bool, out: DType, acc: Option<T>) -> T {
    let (ls, rs) = (lhs.meta.shape().to_vec(), rhs.meta.shape().to_vec());
    let d = ls.len();
    assert_eq!(d, rs.len(), "matmul operands of different ranks");
    let (m, k, n) = (ls[d - 2], ls[d - 1], rs[d - 1]);
    assert_eq!(k, rs[d - 2], "matmul inner dims differ: {ls:?} @ {rs:?}");
    let dtype = lhs.dtype;
    assert_eq!(dtype, rhs.dtype, "matmul operands of different dtypes");
    assert_eq!(ls[..d - 2], rs[..d - 2], "matmul batch dims differ");
    let out_batch = ls[..d - 2].to_vec();
    let mut out_shape = out_batch.clone();
    out_shape.extend_from_slice(&[m, n]);
    let out_dtype = out;
    let beta = if acc.is_some() { 1f32 } else { 0f32 };
    let out = acc.unwrap_or_else(|| {
        empty_device_contiguous_dtype(
            lhs.client.clone(),
            lhs.device.clone(),
            out_shape.into(),
            out_dtype,
        )
    });
    let batch: usize = out_batch.iter().product();
    if batch == 0 || m == 0 || n == 0 || (k == 0 && beta == 1.0) {
        return out;
    }
    if k == 0 {
        return burn_cubecl::ops::numeric::zeros_client(
            out.client.clone(),
            out.device.clone(),
            out.meta.shape().clone(),
            out_dtype,
        );
    }
    let (lhs, la) = readable(lhs);
    let (rhs, ra) = readable(rhs);

    // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's first operand
    // is rhs^T [n, k]. Row-major storage of rhs [k, n] read column-major *is*
    // rhs^T (no transpose); transposed storage needs OP_T. Same for lhs.
    let op = |row_major: bool| {
        if row_major {
            cb::cublasOperation_t::CUBLAS_OP_N
        } else {
            cb::cublasOperation_t::CUBLAS_OP_T
        }
    };
    let (ty, out_ty) = (cuda_type(dtype), cuda_type(out_dtype));
    let device = lhs.device.index;
    let (ra_op, ra_ld, ra_bs) = (op(ra.row_major), ra.ld as i32, ra.batch_stride);
    let (la_op, la_ld, la_bs) = (op(la.row_major), la.ld as i32, la.batch_stride);
    // f32 stays full precision (no TF32) unless asked: HF parity.
    // bf16/f16 accumulate in f32.
    let compute = if tf32 && dtype == DType::F32 {
        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    // On cubecl's device thread, in stream order (see `nvrtc::enqueue`);
    // cuBLAS handles are per thread.
    super::nvrtc::enqueue([&rhs, &lhs, &out], move |[a, b, c], stream| {
        let alpha = 1f32;
        with_handle(device, |h| unsafe {
            // SAFETY: pointers are live burn buffers (bound by the queued
            // task), shapes and strides checked above.
            cudarc::cublas::result::set_stream(h, stream as _).expect("cublasSetStream");
            let status = cb::cublasGemmStridedBatchedEx(
                h,
                ra_op,
                la_op,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ty,
                ra_ld,
                ra_bs,
                b as *const c_void,
                ty,
                la_ld,
                la_bs,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                out_ty,
                n as i32,
                (m * n) as i64,
                batch as i32,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            );
            status.result().unwrap_or_else(|e| {
                panic!("cublasGemmStridedBatchedEx({ls:?} @ {rs:?}, {dtype:?}): {e:?}")
            });
        });
    });
    drop((lhs, rhs));
    out
}
