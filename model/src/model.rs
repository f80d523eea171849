//! `BambaForCausalLM`: embeddings, the layer stack, final norm, LM head, and
//! the causal-LM loss (cross-entropy with optional z-loss).

use crate::ops::{BambaBackend, matmul};
use burn::module::Module;
use burn::tensor::{DType, Int, Tensor};

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::layer::BambaDecoderLayer;
use crate::linear::{Embedding, Linear};
use crate::norm::RmsNorm;
use crate::params::VarBuilder;
use crate::rope::rope_tables;

#[derive(Module, Debug)]
pub struct BambaModel<B: BambaBackend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<BambaDecoderLayer<B>>,
    pub final_layernorm: RmsNorm<B>,
    pub rotary_dim: usize,
    pub rope_theta: f64,
}

impl<B: BambaBackend> BambaModel<B> {
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig) -> Result<Self, ModelError> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BambaDecoderLayer::new(&vb.pp("layers").pp(i), cfg, i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(&vb.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?,
            layers,
            final_layernorm: RmsNorm::new(
                &vb.pp("final_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            rotary_dim: cfg.rotary_dim(),
            rope_theta: cfg.rope_theta,
        })
    }

    /// Final hidden states `[b, l, hidden]` (after the final norm).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, l] = input_ids.dims();
        let mut h = self.embed_tokens.forward(input_ids);
        let rope = rope_tables(l, self.rotary_dim, self.rope_theta, &h.device());
        for layer in &self.layers {
            h = layer.forward(h, &rope);
        }
        self.final_layernorm.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct BambaForCausalLM<B: BambaBackend> {
    pub model: BambaModel<B>,
    /// Absent when `tie_word_embeddings`: the embedding matrix is the head.
    pub lm_head: Option<Linear<B>>,
    pub z_loss_coefficient: f64,
}

impl<B: BambaBackend> BambaForCausalLM<B> {
    /// Builds the model with HF names from `vb` (seeded init or a checkpoint).
    pub fn new(vb: &VarBuilder<B>, cfg: &BambaConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(
                &vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
            )?)
        };
        Ok(Self {
            model: BambaModel::new(&vb.pp("model"), cfg)?,
            lm_head,
            z_loss_coefficient: cfg.z_loss_coefficient,
        })
    }

    /// With `on`, each layer's products make their elementwise inputs (the
    /// norms', the gated norm's and SwiGLU's outputs) again in backward
    /// rather than keep them: about a fifth less activation memory per
    /// layer for one memory-bound kernel per product (see
    /// [`crate::ops::Remake`]).
    pub fn remade_inputs(mut self, on: bool) -> Self {
        for layer in &mut self.model.layers {
            layer.remake = on;
        }
        self
    }

    /// Logits `[b, l, vocab]` for `input_ids` `[b, l]`.
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.model.forward(input_ids);
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let [b, l, d] = h.dims();
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                matmul(h.reshape([b * l, d]), w.transpose()).reshape([b, l, v])
            }
        }
    }

    /// Training loss on packed lines: `targets[t]` is the token after `input_ids[t]`.
    pub fn loss(&self, input_ids: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let logits = self.forward(input_ids);
        causal_lm_loss(logits, targets, self.z_loss_coefficient)
    }
}

/// Mean next-token cross-entropy over all positions, in f32, plus
/// `z_coef * mean(logsumexp(logits)^2)` (PaLM's z-loss) when `z_coef > 0`.
pub fn causal_lm_loss<B: BambaBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    z_coef: f64,
) -> Tensor<B, 1> {
    let [b, l, v] = logits.dims();
    let rows = crate::ops::cross_entropy_rows(
        logits.reshape([b * l, v]),
        targets.reshape([b * l]),
        z_coef,
    );
    mean_two_stage(rows)
}

/// The mean of a long vector as sums of 64-long runs, then their sum: burn's
/// one-shot mean reduces 4096 rows in a single block (92 us on an H200).
fn mean_two_stage<B: BambaBackend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let n = x.dims()[0];
    let run = (2..=64)
        .rev()
        .find(|&k| n.is_multiple_of(k) && n / k > 1)
        .unwrap_or(n);
    if run == n {
        return x.mean();
    }
    x.reshape([n / run, run]).sum_dim(1).sum() / n as f64
}

/// HF's `BambaForCausalLM` loss on unshifted `input_ids` used as labels:
/// cross-entropy on `(logits[:, :-1], ids[:, 1:])`, z-loss over every position.
pub fn hf_causal_lm_loss<B: BambaBackend>(
    logits: Tensor<B, 3>,
    input_ids: Tensor<B, 2, Int>,
    z_coef: f64,
) -> Tensor<B, 1> {
    let [b, l, v] = logits.dims();
    let ce = causal_lm_loss(
        logits.clone().narrow(1, 0, l - 1),
        input_ids.narrow(1, 1, l - 1),
        0.0,
    );
    if z_coef > 0.0 {
        let lse = crate::ops::reference::logsumexp(logits.cast(DType::F32).reshape([b * l, v]));
        ce + lse.powi_scalar(2).mean() * z_coef
    } else {
        ce
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::InitSource;
    use burn::backend::{Autodiff, Flex};

    type B = Autodiff<Flex>;

    /// Products that make their inputs again in backward give the same
    /// loss and every parameter the same gradient, to the bit.
    #[test]
    fn remade_inputs_give_the_same_gradients() {
        let dev = Default::default();
        let cfg = BambaConfig::tiny();
        let src = InitSource { cfg: &cfg, seed: 3 };
        let ids: Vec<i64> = (0..2 * 24)
            .map(|i| (i * 37 % cfg.vocab_size) as i64)
            .collect();
        let ids = Tensor::<B, 1, Int>::from_data(ids.as_slice(), &dev).reshape([2, 24]);
        let run = |remade: bool| {
            let model = BambaForCausalLM::<B>::new(&VarBuilder::new(&src, &dev), &cfg)
                .unwrap()
                .remade_inputs(remade);
            let loss = model.loss(ids.clone().narrow(1, 0, 23), ids.clone().narrow(1, 1, 23));
            let grads = loss.backward();
            struct Grads<'a>(
                &'a <B as burn::tensor::backend::AutodiffBackend>::Gradients,
                Vec<Vec<f32>>,
            );
            impl burn::module::ModuleVisitor<B> for Grads<'_> {
                fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
                    let g = p
                        .val()
                        .grad(self.0)
                        .expect("every parameter has a gradient");
                    self.1.push(g.into_data().to_vec::<f32>().unwrap());
                }
            }
            let mut out = Grads(&grads, vec![loss.into_data().to_vec::<f32>().unwrap()]);
            model.visit(&mut out);
            out.1
        };
        let (kept, remade) = (run(false), run(true));
        assert!(kept.len() > 10);
        assert_eq!(kept, remade);
    }
}
