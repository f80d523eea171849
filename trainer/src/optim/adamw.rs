//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's exact
//! update order), on flat f32 tensors: each rank steps only its own shard of
//! the master weights, and the moments live beside it with the same layout.

use bamba_model::BambaBackend;
use bamba_model::ops::{AdamWHyper, AdamWState, FlatGrad, NO_DECAY_MAX};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameters whose HF name ends with one of these get no weight decay.
    pub no_decay: Vec<String>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.1,
            no_decay: [
                "norm.weight",
                "layernorm.weight",
                ".bias",
                "A_log",
                ".D",
                "dt_bias",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl AdamWConfig {
    pub fn decays(&self, name: &str) -> bool {
        !self.no_decay.iter().any(|s| name.ends_with(s.as_str()))
    }
}

/// The two moments of one flat shard.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

impl<B: Backend> Moments<B> {
    pub fn zeros(len: usize, device: &B::Device) -> Self {
        Self {
            exp_avg: Tensor::zeros([len], device),
            exp_avg_sq: Tensor::zeros([len], device),
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
}

impl AdamW {
    /// One update of `param` (returns the new tensors; a fused kernel may
    /// reuse the buffers it is handed). `grad` is f32 or bf16, one buffer or
    /// the parameters' own gradients. `step` is
    /// 1-based; `no_decay` lists the element ranges `[start, end)` that get
    /// no weight decay (everything else does); `grad_scale` (`[1]`,
    /// e.g. the clipping coefficient) multiplies the gradient. With
    /// `bf16_copy`, the backend's fused kernel also writes the new
    /// parameter in bf16 in the same pass (`None` otherwise: the caller casts).
    #[allow(clippy::too_many_arguments)]
    pub fn update<B: BambaBackend>(
        &self,
        param: Tensor<B, 1>,
        grad: FlatGrad<B>,
        moments: Moments<B>,
        no_decay: &[(usize, usize)],
        grad_scale: Option<&Tensor<B, 1>>,
        lr: f64,
        step: u64,
        bf16_copy: bool,
    ) -> (Tensor<B, 1>, Moments<B>, Option<Tensor<B, 1>>) {
        let (b1, b2) = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
        let hyper = AdamWHyper {
            beta1: b1,
            beta2: b2,
            lr_bc1: lr / bc1,
            inv_sqrt_bc2: 1.0 / bc2.sqrt(),
            eps: self.cfg.eps,
            lr_wd: lr * self.cfg.weight_decay,
        };
        // Handed over, not cloned: a kernel may then update them in place.
        if B::bamba_fused() && no_decay.len() <= NO_DECAY_MAX {
            assert_eq!(grad.len(), param.dims()[0], "AdamW: gradient length");
            let state = AdamWState {
                param: prim(param),
                grad: grad.into_parts().0,
                exp_avg: prim(moments.exp_avg),
                exp_avg_sq: prim(moments.exp_avg_sq),
                no_decay: no_decay.to_vec(),
                grad_scale: grad_scale.map(|t| prim(t.clone())),
                bf16_copy,
            };
            let ([p, m, v], copy) = B::bamba_adamw(state, &hyper)
                .expect("a backend with fused kernels has fused AdamW");
            let t = |x| Tensor::from_primitive(TensorPrimitive::Float(x));
            return (
                t(p),
                Moments {
                    exp_avg: t(m),
                    exp_avg_sq: t(v),
                },
                copy.map(t),
            );
        }
        let grad = grad.into_buffer().cast(DType::F32);
        let grad = match grad_scale {
            Some(c) => grad * c.clone(),
            None => grad,
        };
        let exp_avg = moments.exp_avg * b1 + grad.clone() * (1.0 - b1);
        let exp_avg_sq = moments.exp_avg_sq * b2 + grad.powi_scalar(2) * (1.0 - b2);
        let wd = lr * self.cfg.weight_decay;
        // The factor is rounded to f32 once, as in the fused kernel.
        let keep = (1.0 - wd) as f32 as f64;
        let param = if wd == 0.0 {
            param
        } else if no_decay.is_empty() {
            param * keep
        } else {
            let n = param.dims()[0];
            let mut factor = vec![keep as f32; n];
            for &(lo, hi) in no_decay {
                factor[lo..hi].fill(1.0);
            }
            let factor = Tensor::from_data(TensorData::new(factor, [n]), &param.device());
            param * factor
        };
        let denom = exp_avg_sq.clone().sqrt() / bc2.sqrt() + self.cfg.eps;
        let param = param - exp_avg.clone() / denom * (lr / bc1);
        (
            param,
            Moments {
                exp_avg,
                exp_avg_sq,
            },
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// PyTorch's `torch.optim.AdamW` step written out in f64.
    fn reference(p: f64, g: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9, 0.95, 1e-8);
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for (t, &g) in g.iter().enumerate() {
            let t = t as i32 + 1;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn matches_pytorch_adamw() {
        let dev = Default::default();
        let opt = AdamW {
            cfg: AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        };
        let grads = [0.5, -0.25, 1.0, 0.125];
        // Element 1 in a no-decay range the second time.
        for (no_decay, wd1) in [(vec![], 0.1), (vec![(1, 2)], 0.0)] {
            let mut p =
                Tensor::<Flex, 1>::from_data(TensorData::new(vec![1.0f32, -2.0], [2]), &dev);
            let mut m = Moments::zeros(2, &dev);
            for (t, g) in grads.iter().enumerate() {
                let gt =
                    Tensor::from_data(TensorData::new(vec![*g as f32, 2.0 * *g as f32], [2]), &dev);
                let gt = FlatGrad::Buffer(gt);
                (p, m, _) = opt.update(p, gt, m, &no_decay, None, 1e-2, t as u64 + 1, false);
            }
            let got = p.into_data().to_vec::<f32>().unwrap();
            let want = [
                reference(1.0, &grads, 1e-2, 0.1),
                reference(-2.0, &grads.map(|g| 2.0 * g), 1e-2, wd1),
            ];
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w} ({no_decay:?})");
            }
        }
    }
}
