//! Causal self-attention with grouped KV heads and partial rotary embeddings
//! (HF's `BambaAttention`, eager path).

use crate::ops::{BambaBackend, causal_softmax, matmul};
use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::linear::Linear;
use crate::params::VarBuilder;
use crate::rope::apply_rope;

#[derive(Module, Debug)]
pub struct BambaAttention<B: BambaBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: BambaBackend> BambaAttention<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig) -> Result<Self, ModelError> {
        let (h, nq, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), h, nq * hd, false)?,
            k_proj: Linear::new(&vb.pp("k_proj"), h, nkv * hd, false)?,
            v_proj: Linear::new(&vb.pp("v_proj"), h, nkv * hd, false)?,
            o_proj: Linear::new(&vb.pp("o_proj"), nq * hd, h, false)?,
            n_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x`: `[b, l, hidden]`; `cos`/`sin` from `rope_tables` for length `l`.
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let (nq, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, l, n, hd]).swap_dims(1, 2);
        let q = apply_rope(heads(self.q_proj.forward(x.clone()), nq), cos, sin);
        let k = apply_rope(heads(self.k_proj.forward(x.clone()), nkv), cos, sin);
        let v = heads(self.v_proj.forward(x), nkv);
        let (k, v) = (repeat_kv(k, nq / nkv), repeat_kv(v, nq / nkv));

        // Softmax in f32 as HF does, in one pass where the backend fuses it.
        let probs = causal_softmax(matmul(q, k.swap_dims(2, 3)), (hd as f64).powf(-0.5));
        let out = matmul(probs, v).swap_dims(1, 2).reshape([b, l, nq * hd]);
        self.o_proj.forward(out)
    }
}

/// `[b, kv, l, d] -> [b, kv * rep, l, d]`, each KV head serving `rep` query heads.
fn repeat_kv<B: BambaBackend>(x: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return x;
    }
    let [b, kv, l, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, rep, l, d])
        .reshape([b, kv * rep, l, d])
}
