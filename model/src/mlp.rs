//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use crate::ops::{BambaBackend, Remake, swiglu};
use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::linear::Linear;
use crate::params::VarBuilder;

#[derive(Module, Debug)]
pub struct BambaMlp<B: BambaBackend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: BambaBackend> BambaMlp<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig) -> Result<Self, ModelError> {
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::new(&vb.pp("gate_proj"), h, m, false)?,
            up_proj: Linear::new(&vb.pp("up_proj"), h, m, false)?,
            down_proj: Linear::new(&vb.pp("down_proj"), m, h, false)?,
        })
    }

    /// With `remake` (how to make `x` again), the products' backward makes
    /// `x` and SwiGLU's output again instead of keeping them.
    pub fn forward(&self, x: Tensor<B, 3>, remake: Option<Remake<B>>) -> Tensor<B, 3> {
        let remade = remake.is_some();
        let g = self.gate_proj.forward_remade(x.clone(), remake.clone());
        let u = self.up_proj.forward_remade(x, remake);
        let again = remade.then(|| Remake::swiglu(&g, &u));
        self.down_proj.forward_remade(swiglu(g, u), again)
    }
}
