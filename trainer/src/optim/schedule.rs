//! Learning-rate schedules: warmup (linear or quadratic, as fms-fsdp warmed
//! Bamba up) then cosine, linear, constant or warmup-stable-decay.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WarmupShape {
    #[default]
    Linear,
    /// `lr * (step / warmup)^2`: a gentler start, Bamba's stage 1 choice.
    Quadratic,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
    /// Warmup-stable-decay: hold the peak, then decay linearly to the final LR
    /// over the last `decay_steps` steps.
    Wsd {
        decay_steps: u64,
    },
}

/// LR as a function of the optimizer step (1-based: the first update uses `lr(1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub final_lr: f64,
    pub warmup_steps: u64,
    pub warmup: WarmupShape,
    pub decay: Decay,
    pub total_steps: u64,
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f64 {
        let (peak, last) = (self.peak_lr, self.final_lr);
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            let f = step as f64 / self.warmup_steps as f64;
            return match self.warmup {
                WarmupShape::Linear => peak * f,
                WarmupShape::Quadratic => peak * f * f,
            };
        }
        let step = step.min(self.total_steps);
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let p = (step.saturating_sub(self.warmup_steps)) as f64 / span;
        match self.decay {
            Decay::Constant => peak,
            Decay::Cosine => last + (peak - last) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear => peak + (last - peak) * p,
            Decay::Wsd { decay_steps } => {
                let start = self.total_steps.saturating_sub(decay_steps);
                if step <= start || decay_steps == 0 {
                    peak
                } else {
                    peak + (last - peak) * (step - start) as f64 / decay_steps as f64
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(warmup: WarmupShape, decay: Decay) -> Schedule {
        Schedule {
            peak_lr: 3e-4,
            final_lr: 1e-5,
            warmup_steps: 2000,
            warmup,
            decay,
            total_steps: 10_000,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn every_schedule_at_known_steps() {
        let q = sched(WarmupShape::Quadratic, Decay::Cosine);
        assert!(close(q.lr(1), 3e-4 / 4e6));
        assert!(close(q.lr(1000), 3e-4 * 0.25));
        assert!(close(q.lr(2000), 3e-4));
        assert!(close(q.lr(6000), 1e-5 + (3e-4 - 1e-5) * 0.5));
        assert!(close(q.lr(10_000), 1e-5));
        assert!(
            close(q.lr(20_000), 1e-5),
            "past the end it stays at the final LR"
        );

        let l = sched(WarmupShape::Linear, Decay::Linear);
        assert!(close(l.lr(1000), 1.5e-4));
        assert!(close(l.lr(6000), 3e-4 + (1e-5 - 3e-4) * 0.5));
        assert!(close(l.lr(10_000), 1e-5));

        let c = sched(WarmupShape::Linear, Decay::Constant);
        assert!(close(c.lr(9_999), 3e-4));

        let w = sched(WarmupShape::Linear, Decay::Wsd { decay_steps: 1000 });
        assert!(close(w.lr(9_000), 3e-4));
        assert!(close(w.lr(9_500), 3e-4 + (1e-5 - 3e-4) * 0.5));
        assert!(close(w.lr(10_000), 1e-5));

        let none = Schedule {
            warmup_steps: 0,
            ..sched(WarmupShape::Linear, Decay::Cosine)
        };
        assert!(close(
            none.lr(1),
            1e-5 + (3e-4 - 1e-5) * 0.5 * (1.0 + (std::f64::consts::PI / 10_000.0).cos())
        ));
    }

    #[test]
    fn warmups_and_decays_at_their_boundaries() {
        let decays = [
            Decay::Cosine,
            Decay::Linear,
            Decay::Constant,
            Decay::Wsd { decay_steps: 1000 },
        ];
        for warmup in [WarmupShape::Linear, WarmupShape::Quadratic] {
            for decay in decays {
                let s = sched(warmup, decay);
                // Warmup: 0 before the first step, the peak at its end.
                assert_eq!(s.lr(0), 0.0, "{warmup:?} {decay:?}");
                let quarter = match warmup {
                    WarmupShape::Linear => 0.25,
                    WarmupShape::Quadratic => 0.0625,
                };
                assert!(close(s.lr(500), 3e-4 * quarter), "{warmup:?} {decay:?}");
                assert!(close(s.lr(2000), 3e-4), "{warmup:?} {decay:?}");
                // Then never rises, and ends at the final LR (constant: the peak).
                let end = if decay == Decay::Constant { 3e-4 } else { 1e-5 };
                assert!(close(s.lr(10_000), end), "{warmup:?} {decay:?}");
                assert!(close(s.lr(12_345), end), "{warmup:?} {decay:?}");
                let mut prev = s.lr(2000);
                for step in (2001..=10_000).step_by(97) {
                    let lr = s.lr(step);
                    assert!(lr <= prev + 1e-18, "{decay:?} rises at {step}");
                    assert!(lr >= 1e-5 - 1e-18, "{decay:?} below final_lr at {step}");
                    prev = lr;
                }
            }
        }
        // Cosine and linear a quarter into the decay; WSD holds until its decay.
        let q = sched(WarmupShape::Linear, Decay::Cosine);
        let quarter = 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos());
        assert!(close(q.lr(4000), 1e-5 + (3e-4 - 1e-5) * quarter));
        let l = sched(WarmupShape::Linear, Decay::Linear);
        assert!(close(l.lr(4000), 3e-4 - (3e-4 - 1e-5) * 0.25));
        let w = sched(WarmupShape::Quadratic, Decay::Wsd { decay_steps: 1000 });
        assert!(close(w.lr(2001), 3e-4) && close(w.lr(8999), 3e-4));
        assert!(close(w.lr(9250), 3e-4 - (3e-4 - 1e-5) * 0.25));
    }
}
