//! Pretraining initialisation (mamba_ssm's convention, as fms-fsdp used for
//! Bamba), seeded and addressable: every parameter draws from its own ChaCha
//! stream keyed by (seed, HF name), and element `i` always uses the same four
//! words of that stream. So any slice of any parameter can be generated alone
//! (an FSDP rank makes only its shard) and the result never depends on the
//! number of ranks, the device, or the order parameters are built in.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::BambaConfig;
use crate::error::ModelError;
use crate::params::ParamSource;

/// How one parameter is initialised, decided from its HF name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitRule {
    Ones,
    Zeros,
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// `log(U[1, 16])`: A = -exp(A_log) spreads decay rates over heads.
    ALog,
    /// `inv_softplus(exp(U[log dt_min, log dt_max]))`, dt floored at 1e-4, so
    /// that softplus(dt_bias) starts inside the intended time-step range.
    DtBias {
        min: f64,
        max: f64,
    },
}

const DT_FLOOR: f64 = 1e-4;

impl InitRule {
    pub fn for_param(cfg: &BambaConfig, name: &str) -> Self {
        let std = cfg.initializer_range;
        if name.ends_with("norm.weight") || name.ends_with("mamba.D") {
            InitRule::Ones
        } else if name.ends_with("mamba.A_log") {
            InitRule::ALog
        } else if name.ends_with("mamba.dt_bias") {
            InitRule::DtBias {
                min: cfg.time_step_min,
                max: cfg.time_step_max,
            }
        } else if name.ends_with("conv1d.weight") || name.ends_with("conv1d.bias") {
            // mamba_ssm leaves the depthwise conv at PyTorch's default:
            // kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = d_conv.
            InitRule::Uniform {
                bound: 1.0 / (cfg.mamba_d_conv as f64).sqrt(),
            }
        } else if name.ends_with(".bias") {
            InitRule::Zeros
        } else if name.ends_with("out_proj.weight")
            || name.ends_with("o_proj.weight")
            || name.ends_with("down_proj.weight")
        {
            // GPT-2's residual scaling: each layer adds two residual branches.
            InitRule::Normal {
                std: std / (2.0 * cfg.num_hidden_layers as f64).sqrt(),
            }
        } else {
            InitRule::Normal { std }
        }
    }
}

/// Seeded initial values for a configuration.
pub struct InitSource<'a> {
    pub cfg: &'a BambaConfig,
    pub seed: u64,
}

impl InitSource<'_> {
    /// Elements `start..start + len` of the flattened parameter `name`,
    /// generated on all cores for large ranges (the stream is addressable,
    /// so the values do not depend on the split).
    pub fn values(&self, name: &str, start: usize, len: usize) -> Vec<f32> {
        const CHUNK: usize = 1 << 20;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if len < 2 * CHUNK || threads == 1 {
            return self.values_serial(name, start, len);
        }
        let per = len.div_ceil(threads).max(CHUNK);
        let mut out = vec![0f32; len];
        std::thread::scope(|s| {
            for (i, part) in out.chunks_mut(per).enumerate() {
                s.spawn(move || {
                    part.copy_from_slice(&self.values_serial(name, start + i * per, part.len()))
                });
            }
        });
        out
    }

    fn values_serial(&self, name: &str, start: usize, len: usize) -> Vec<f32> {
        let rule = InitRule::for_param(self.cfg, name);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(fnv1a(name));
        rng.set_word_pos(4 * start as u128);
        (0..len)
            .map(|_| {
                // Exactly four 32-bit words per element keeps elements addressable.
                let (a, b) = (rng.next_u64(), rng.next_u64());
                let (u1, u2) = (unit(a), unit(b));
                sample(rule, u1, u2) as f32
            })
            .collect()
    }
}

impl ParamSource for InitSource<'_> {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(self.values(name, 0, shape.iter().product()))
    }

    fn load_range(
        &self,
        name: &str,
        _shape: &[usize],
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>, ModelError> {
        Ok(self.values(name, start, len))
    }
}

fn sample(rule: InitRule, u1: f64, u2: f64) -> f64 {
    match rule {
        InitRule::Ones => 1.0,
        InitRule::Zeros => 0.0,
        InitRule::Uniform { bound } => (2.0 * u1 - 1.0) * bound,
        // Box-Muller on (0, 1]: never ln(0).
        InitRule::Normal { std } => {
            std * (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }
        InitRule::ALog => (1.0 + 15.0 * u1).ln(),
        InitRule::DtBias { min, max } => {
            let dt = (min.ln() + u1 * (max.ln() - min.ln())).exp().max(DT_FLOOR);
            // inverse of softplus: dt + log(1 - exp(-dt))
            dt + (-(-dt).exp_m1()).ln()
        }
    }
}

/// A uniform in [0, 1) from the top 53 bits.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A seeded RNG for anything else that must be reproducible (tests, data).
pub fn rng(seed: u64) -> impl Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_match_the_whole() {
        let cfg = BambaConfig::tiny();
        let src = InitSource { cfg: &cfg, seed: 7 };
        let name = "model.layers.0.mamba.in_proj.weight";
        let whole = src.values(name, 0, 1000);
        assert_eq!(src.values(name, 337, 100), whole[337..437]);
        assert_ne!(
            src.values("model.layers.1.mamba.in_proj.weight", 0, 1000),
            whole
        );
        assert_ne!(
            InitSource { cfg: &cfg, seed: 8 }.values(name, 0, 1000),
            whole
        );
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let cfg = BambaConfig::tiny();
        let src = InitSource { cfg: &cfg, seed: 1 };
        let w = src.values("model.layers.0.feed_forward.up_proj.weight", 0, 100_000);
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let std =
            (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "mean {mean} std {std}"
        );
        let down = src.values("model.layers.0.feed_forward.down_proj.weight", 0, 100_000);
        let std_down =
            (down.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / down.len() as f64).sqrt();
        assert!((std_down - 0.02 / 8f64.sqrt()).abs() < 3e-4, "{std_down}");
        let a_log = src.values("model.layers.0.mamba.A_log", 0, 1000);
        assert!(a_log.iter().all(|&x| (0.0..=16f32.ln()).contains(&x)));
        let dt = src.values("model.layers.0.mamba.dt_bias", 0, 1000);
        let softplus = |x: f32| (1.0 + x.exp()).ln();
        assert!(dt.iter().all(|&b| (0.99e-3..=0.101).contains(&softplus(b))));
        assert!(
            src.values("model.layers.0.mamba.D", 0, 8)
                .iter()
                .all(|&x| x == 1.0)
        );
    }
}
