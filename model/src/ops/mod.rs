//! Backend extension: the operations Bamba routes to hand-picked kernels.
//!
//! burn's backends expose one `matmul`; on CUDA its kernels reach a fraction
//! of cuBLAS (and run f32 as TF32), so the model calls [`matmul`] instead,
//! which a backend may override. This is burn's "backend extension" pattern:
//! every backend the project runs on implements [`BambaBackend`] (CPU keeps
//! burn's kernels), `Autodiff<B>` derives the gradients from the inner
//! backend's op (see `autodiff.rs`), and the CUDA backend calls cuBLAS on
//! burn's own device memory (`cublas.rs`).

mod autodiff;
#[cfg(feature = "cuda")]
pub mod cublas;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

/// A burn backend with Bamba's kernel hooks. Defaults are burn's own ops.
pub trait BambaBackend: Backend {
    /// `lhs [.., m, k] @ rhs [.., k, n]`, batch dims equal or broadcast as in burn.
    fn bamba_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }
}

/// A training backend: autodiff over a [`BambaBackend`], itself one too, so
/// that both the tracked model and its `valid()` copy use the hooks.
pub trait BambaAutodiffBackend: AutodiffBackend<InnerBackend: BambaBackend> + BambaBackend {}

impl<B> BambaAutodiffBackend for B
where
    B: AutodiffBackend + BambaBackend,
    B::InnerBackend: BambaBackend,
{
}

/// Matrix product through the backend's GEMM hook (see [`BambaBackend`]).
/// Operands of different dtypes (bf16 activations meeting the f32 parts of
/// the SSD scan) are multiplied in f32, as PyTorch's type promotion would.
pub fn matmul<B: BambaBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    let (lhs, rhs) = if lhs.dtype() != rhs.dtype() {
        (lhs.cast(DType::F32), rhs.cast(DType::F32))
    } else {
        (lhs, rhs)
    };
    let out = B::bamba_matmul(lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl BambaBackend for burn::backend::Flex {}
