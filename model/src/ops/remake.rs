//! Products whose lhs is made again in backward instead of kept: the
//! elementwise outputs that feed the projections (the norms' outputs, the
//! gated norm's, SwiGLU's) are as large as the GEMM outputs they come from,
//! but the op that made each one keeps its inputs anyway. Recomputing them
//! costs one memory-bound kernel each in backward (torchtitan's op-level
//! selective checkpointing keeps the same set: the products' outputs).

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{BambaBackend, pieces};

/// How to make a product's lhs again, from tensors its maker keeps.
#[derive(Clone, Debug)]
pub enum Remake<B: Backend> {
    /// `silu(g) * u`, `[b, l, m]` each.
    Swiglu(FloatTensor<B>, FloatTensor<B>),
    /// `w * rmsnorm(x)` or the gated `w * rmsnorm(x * silu(z))`, `x [b, l, d]`.
    RmsNorm {
        x: FloatTensor<B>,
        z: Option<FloatTensor<B>>,
        w: FloatTensor<B>,
        eps: f64,
    },
}

fn float<B: BambaBackend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: BambaBackend, const D: usize>(t: &Tensor<B, D>) -> FloatTensor<B> {
    t.clone().into_primitive().tensor()
}

impl<B: BambaBackend> Remake<B> {
    pub fn swiglu(g: &Tensor<B, 3>, u: &Tensor<B, 3>) -> Self {
        Self::Swiglu(prim(g), prim(u))
    }

    pub fn rms_norm(
        x: &Tensor<B, 3>,
        z: Option<&Tensor<B, 3>>,
        w: &Tensor<B, 1>,
        eps: f64,
    ) -> Self {
        Self::RmsNorm {
            x: prim(x),
            z: z.map(prim),
            w: prim(w),
            eps,
        }
    }

    /// The lhs, `[b, l, n]`, by the same op that made it in forward.
    pub fn run(self) -> FloatTensor<B> {
        let out = match self {
            Self::Swiglu(g, u) => pieces::swiglu::<B>(float(g), float(u)),
            Self::RmsNorm { x, z, w, eps } => {
                pieces::rms_norm::<B>(float(x), z.map(float), float(w), eps)
            }
        };
        out.into_primitive().tensor()
    }

    /// The same recipe on `f(t)` of each tensor (autodiff -> inner backend).
    pub(crate) fn map<B2: Backend>(
        self,
        f: impl Fn(FloatTensor<B>) -> FloatTensor<B2>,
    ) -> Remake<B2> {
        match self {
            Self::Swiglu(g, u) => Remake::Swiglu(f(g), f(u)),
            Self::RmsNorm { x, z, w, eps } => Remake::RmsNorm {
                x: f(x),
                z: z.map(&f),
                w: f(w),
                eps,
            },
        }
    }
}

/// `lhs @ rhs` (`lhs [m, k]` the output of `remake`, reshaped), whose
/// gradient remakes `lhs` rather than keeping it alive until backward.
pub fn matmul_remade<B: BambaBackend>(
    lhs: Tensor<B, 2>,
    rhs: Tensor<B, 2>,
    remake: Remake<B>,
) -> Tensor<B, 2> {
    if lhs.dtype() != rhs.dtype() {
        return super::matmul(lhs, rhs);
    }
    let out = B::bamba_matmul_remade(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
        remake,
    );
    float(out)
}
