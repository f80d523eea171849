//! The weighted mixture of sub-datasets, by tokens, without randomness.
//!
//! Sampling datasets at random only meets the target shares on average, and
//! a resumed run would need the RNG state. Instead (as fms-fsdp) each new
//! document comes from the dataset furthest below its target share of the
//! tokens drawn so far, so after any prefix every dataset is within one
//! document of its exact share, and the choice is a function of the counters.

/// Normalised weights.
#[derive(Debug, Clone)]
pub struct Mixture {
    shares: Vec<f64>,
}

impl Mixture {
    pub fn new(weights: &[f64]) -> Mixture {
        let total: f64 = weights.iter().sum();
        Mixture {
            shares: weights.iter().map(|w| w / total).collect(),
        }
    }

    /// The dataset furthest below its share, among those still `available`
    /// (ties go to the lower index).
    pub fn pick(&self, tokens: &[u64], available: &[bool]) -> Option<usize> {
        let total: u64 = tokens
            .iter()
            .zip(available)
            .filter(|(_, a)| **a)
            .map(|(t, _)| *t)
            .sum();
        let share_total: f64 = self
            .shares
            .iter()
            .zip(available)
            .filter(|(_, a)| **a)
            .map(|(s, _)| *s)
            .sum();
        let mut best: Option<(usize, f64)> = None;
        for (d, (&t, &share)) in tokens.iter().zip(&self.shares).enumerate() {
            if !available[d] {
                continue;
            }
            let deficit = share / share_total * total as f64 - t as f64;
            if best.is_none_or(|(_, b)| deficit > b) {
                best = Some((d, deficit));
            }
        }
        best.map(|(d, _)| d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shares_stay_within_one_document_of_target() {
        let m = Mixture::new(&[1456.0, 450.0, 100.0]);
        let mut tokens = [0u64; 3];
        let mut x = 7u64;
        let max_doc = 5000;
        for _ in 0..20_000 {
            let d = m.pick(&tokens, &[true; 3]).unwrap();
            x = crate::shards::mix(x);
            tokens[d] += 1 + x % max_doc;
        }
        let total: u64 = tokens.iter().sum();
        for (d, w) in [1456.0, 450.0, 100.0].iter().enumerate() {
            let want = w / 2006.0 * total as f64;
            assert!(
                (tokens[d] as f64 - want).abs() <= 2.0 * max_doc as f64,
                "dataset {d}: {} tokens, want {want}",
                tokens[d]
            );
        }
    }

    #[test]
    fn skips_unavailable_datasets() {
        let m = Mixture::new(&[1.0, 1.0]);
        assert_eq!(m.pick(&[0, 0], &[true, true]), Some(0));
        assert_eq!(m.pick(&[0, 0], &[false, true]), Some(1));
        assert_eq!(m.pick(&[0, 0], &[false, false]), None);
    }
}
