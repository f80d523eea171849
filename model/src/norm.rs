//! RMSNorm and Mamba2's gated RMSNorm, both computed in f32 and cast back,
//! as HF does, so bf16 training keeps the reduction exact enough.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::ops::{BambaBackend, Remake, rms_norm};

use crate::error::ModelError;
use crate::params::VarBuilder;

#[derive(Module, Debug)]
pub struct RmsNorm<B: BambaBackend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: BambaBackend> RmsNorm<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        rms_norm(x, None, self.weight.val(), self.eps)
    }

    /// How a product makes [`Self::forward`]'s output again from `x`.
    pub fn remake(&self, x: &Tensor<B, 3>) -> Remake<B> {
        Remake::rms_norm(x, None, &self.weight.val(), self.eps)
    }
}

/// `w * rmsnorm(y * silu(z))`: the gate is applied before the norm
/// (mamba_ssm's `norm_before_gate=False`). The statistics run over all of
/// d_inner, as in HF's `BambaRMSNormGated` and mamba_ssm's fused
/// `mamba_split_conv1d_scan_combined` that trained Bamba; mamba_ssm's
/// per-group variant only differs when `mamba_n_groups > 1`.
#[derive(Module, Debug)]
pub struct RmsNormGated<B: BambaBackend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: BambaBackend> RmsNormGated<B> {
    pub fn new(vb: &VarBuilder<B>, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [dim])?,
            eps,
        })
    }

    pub fn forward(&self, y: Tensor<B, 3>, z: Tensor<B, 3>) -> Tensor<B, 3> {
        rms_norm(y, Some(z), self.weight.val(), self.eps)
    }

    /// How a product makes [`Self::forward`]'s output again from `y`, `z`.
    pub fn remake(&self, y: &Tensor<B, 3>, z: &Tensor<B, 3>) -> Remake<B> {
        Remake::rms_norm(y, Some(z), &self.weight.val(), self.eps)
    }
}
