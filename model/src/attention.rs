//! Causal self-attention with grouped KV heads and partial rotary embeddings
//! (HF's `BambaAttention`, eager path).

use crate::ops::{BambaBackend, Remake, attention};
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

    /// `x`: `[b, l, hidden]`; `cos`/`sin` from `rope_tables` for length `l`;
    /// with `remake`, the projections make `x` again in backward.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        remake: Option<Remake<B>>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let (nq, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Heads stay token-major, [b, l, heads, d]: the projections' own
        // layout, so neither the attention nor o_proj needs a transpose.
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, l, n, hd]);
        let proj = |p: &Linear<B>, x| p.forward_remade(x, remake.clone());
        let q = apply_rope(heads(proj(&self.q_proj, x.clone()), nq), cos, sin);
        let k = apply_rope(heads(proj(&self.k_proj, x.clone()), nkv), cos, sin);
        let v = heads(proj(&self.v_proj, x), nkv);
        let out = attention(q, k, v, (hd as f64).powf(-0.5));
        self.o_proj.forward(out.reshape([b, l, nq * hd]))
    }
}
