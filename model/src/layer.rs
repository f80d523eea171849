//! One Bamba decoder layer: pre-norm mixer (Mamba2 or attention) and pre-norm
//! SwiGLU MLP, each added to the residual stream.

use crate::ops::BambaBackend;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::attention::BambaAttention;
use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::mamba2::BambaMixer;
use crate::mlp::BambaMlp;
use crate::norm::RmsNorm;
use crate::params::VarBuilder;

#[derive(Module, Debug)]
pub struct BambaDecoderLayer<B: BambaBackend> {
    pub input_layernorm: RmsNorm<B>,
    /// Exactly one of `mamba` and `self_attn` is present.
    pub mamba: Option<BambaMixer<B>>,
    pub self_attn: Option<BambaAttention<B>>,
    pub pre_ff_layernorm: RmsNorm<B>,
    pub feed_forward: BambaMlp<B>,
    /// Products make their elementwise inputs again in backward (see
    /// [`crate::ops::Remake`]): less memory for a kernel each.
    pub remake: bool,
}

impl<B: BambaBackend> BambaDecoderLayer<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig, index: usize) -> Result<Self, ModelError> {
        let (mamba, self_attn) = if cfg.is_attention(index) {
            (None, Some(BambaAttention::new(&vb.pp("self_attn"), cfg)?))
        } else {
            (Some(BambaMixer::new(&vb.pp("mamba"), cfg)?), None)
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mamba,
            self_attn,
            pre_ff_layernorm: RmsNorm::new(
                &vb.pp("pre_ff_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            feed_forward: BambaMlp::new(&vb.pp("feed_forward"), cfg)?,
            remake: false,
        })
    }

    pub fn forward(&self, h: Tensor<B, 3>, rope: &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 3> {
        let x = self.input_layernorm.forward(h.clone());
        let remake = self.remake.then(|| self.input_layernorm.remake(&h));
        let mixed = match (&self.mamba, &self.self_attn) {
            (Some(mamba), _) => mamba.forward(x, remake),
            (None, Some(attn)) => attn.forward(x, remake, &rope.0, &rope.1),
            (None, None) => unreachable!("a layer is built with a mixer"),
        };
        let h = h + mixed;
        let x = self.pre_ff_layernorm.forward(h.clone());
        let remake = self.remake.then(|| self.pre_ff_layernorm.remake(&h));
        h + self.feed_forward.forward(x, remake)
    }

    pub fn is_attention(&self) -> bool {
        self.self_attn.is_some()
    }
}
