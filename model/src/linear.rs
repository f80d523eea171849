//! Linear and embedding layers that keep PyTorch's weight layout
//! (`[out_features, in_features]`), so HF tensors load as they are.

use crate::ops::{BambaBackend, Remake, matmul_remade_both, resharded_weight};
use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor};

use crate::error::ModelError;
use crate::params::VarBuilder;

#[derive(Module, Debug)]
pub struct Linear<B: BambaBackend> {
    /// `[out_features, in_features]`, as in `torch.nn.Linear`.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: BambaBackend> Linear<B> {
    pub fn new(
        vb: &VarBuilder<B>,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [d_out, d_in])?,
            bias: if bias {
                Some(vb.get("bias", [d_out])?)
            } else {
                None
            },
        })
    }

    /// `x @ W^T + b` over the last dim of `[batch, seq, in]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_remade(x, None)
    }

    /// [`Self::forward`] where `x` is `remake`'s output: its gradient makes
    /// `x` again rather than keeping it (see [`Remake`]). The weight is made
    /// again too when its FSDP unit is resharded after forward
    /// ([`crate::ops::with_resharded`]).
    pub fn forward_remade(&self, x: Tensor<B, 3>, remake: Option<Remake<B>>) -> Tensor<B, 3> {
        let [b, t, d_in] = x.dims();
        let w = self.weight.val();
        let w_again = resharded_weight::<B>(self.weight.id, w.dims());
        let (x, w) = (x.reshape([b * t, d_in]), w.transpose());
        let y = matmul_remade_both(x, w, remake, w_again);
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        };
        let d_out = y.dims()[1];
        y.reshape([b, t, d_out])
    }
}

#[derive(Module, Debug)]
pub struct Embedding<B: BambaBackend> {
    /// `[vocab_size, hidden_size]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: BambaBackend> Embedding<B> {
    pub fn new(vb: &VarBuilder<B>, vocab: usize, hidden: usize) -> Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get("weight", [vocab, hidden])?,
        })
    }

    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        crate::ops::embedding(self.weight.val(), ids)
    }
}
