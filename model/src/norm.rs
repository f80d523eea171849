//! RMSNorm and Mamba2's gated RMSNorm, both computed in f32 and cast back,
//! as HF does, so bf16 training keeps the reduction exact enough.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::error::ModelError;
use crate::params::VarBuilder;

/// `x * rsqrt(mean(x^2) + eps)` over the last dim, in f32.
fn rms<B: Backend>(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let var = x.clone().powi_scalar(2).mean_dim(2);
    x * (var + eps).sqrt().recip()
}

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = x.dtype();
        let y = rms(x.cast(DType::F32), self.eps).cast(dtype);
        y * self.weight.val().unsqueeze::<3>()
    }
}

/// `w * rmsnorm(y * silu(z))`: the gate is applied before the norm
/// (mamba_ssm's `norm_before_gate=False`). The statistics run over all of
/// d_inner, as in HF's `BambaRMSNormGated` and mamba_ssm's fused
/// `mamba_split_conv1d_scan_combined` that trained Bamba; mamba_ssm's
/// per-group variant only differs when `mamba_n_groups > 1`.
#[derive(Module, Debug)]
pub struct RmsNormGated<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNormGated<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [dim])?,
            eps,
        })
    }

    pub fn forward(&self, y: Tensor<B, 3>, z: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = y.dtype();
        let gated = y.cast(DType::F32) * silu(z.cast(DType::F32));
        let out = rms(gated, self.eps).cast(dtype);
        out * self.weight.val().unsqueeze::<3>()
    }
}
