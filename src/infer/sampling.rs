//! Choosing the next token from a row of logits: greedy (temperature 0),
//! or temperature with optional top-k and top-p (nucleus) cuts, from a
//! seeded generator, so that a seed gives the same text run to run.

use crate::error::{Error, Result};
use crate::util::Rng;
use serde::{Deserialize, Serialize};

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 = greedy (the most likely token; ties to the lower id).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least p (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::greedy()
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "sampling",
                format!("temperature {} (must be >= 0)", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "sampling",
                format!("top-p {} is outside (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Index of the largest value; ties go to the lower index. NaN is an error.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(Error::NonFinite {
                op: "sampling",
                msg: format!("logit {i} is NaN"),
            });
        }
        if x > logits[best] {
            best = i;
        }
    }
    if logits.is_empty() {
        return Err(Error::invalid("sampling", "empty logits"));
    }
    Ok(best as u32)
}

/// A sampler: the settings and the generator's state.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub cfg: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self> {
        cfg.validate()?;
        Ok(Sampler {
            cfg,
            rng: Rng::new(cfg.seed),
        })
    }

    /// The next token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let greedy = argmax(logits)?;
        if self.cfg.is_greedy() {
            return Ok(greedy);
        }
        let probs = self.distribution(logits);
        // One draw per token whatever the cut, so the stream of draws is
        // the same for a given seed.
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0;
        for &(id, p) in &probs {
            acc += p;
            if u < acc {
                return Ok(id);
            }
        }
        Ok(probs.last().map(|&(id, _)| id).unwrap_or(greedy))
    }

    /// The kept tokens with their renormalized probabilities, most likely
    /// first (ties to the lower id).
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.cfg.temperature.max(1e-6) as f64;
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let mut p: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - m) / t).exp()))
            .collect();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 {
            p.truncate(self.cfg.top_k);
        }
        let z: f64 = p.iter().map(|x| x.1).sum();
        for x in p.iter_mut() {
            x.1 /= z;
        }
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = p.len();
            for (i, x) in p.iter().enumerate() {
                acc += x.1;
                if acc >= self.cfg.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            p.truncate(keep);
            let z: f64 = p.iter().map(|x| x.1).sum();
            for x in p.iter_mut() {
                x.1 /= z;
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_ties_go_low() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]).unwrap(), 1);
        assert!(argmax(&[0.0, f32::NAN]).is_err());
        let mut s = Sampler::new(Sampling::greedy()).unwrap();
        assert_eq!(s.sample(&[1.0, 5.0, 2.0]).unwrap(), 1);
    }

    #[test]
    fn cuts_keep_the_likely_tokens() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let cfg = |top_k, top_p| Sampling {
            temperature: 1.0,
            top_k,
            top_p,
            seed: 3,
        };
        let s = Sampler::new(cfg(2, 1.0)).unwrap();
        let d = s.distribution(&logits);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        // p(1) = 0.64 < 0.7 <= p(1) + p(2)
        let s = Sampler::new(cfg(0, 0.7)).unwrap();
        assert_eq!(s.distribution(&logits).len(), 2);
        let s = Sampler::new(cfg(0, 0.5)).unwrap();
        assert_eq!(s.distribution(&logits).len(), 1);
    }

    #[test]
    fn a_seed_repeats_and_draws_follow_the_distribution() {
        let logits = [0.0f32, 1.0, 0.5, -0.5];
        let cfg = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let mut a = Sampler::new(cfg).unwrap();
        let mut b = Sampler::new(cfg).unwrap();
        let xa: Vec<u32> = (0..200).map(|_| a.sample(&logits).unwrap()).collect();
        let xb: Vec<u32> = (0..200).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(xa, xb);
        let mut counts = [0usize; 4];
        let mut c = Sampler::new(Sampling { seed: 7, ..cfg }).unwrap();
        for _ in 0..20_000 {
            counts[c.sample(&logits).unwrap() as usize] += 1;
        }
        let d = c.distribution(&logits);
        for (id, p) in d {
            let f = counts[id as usize] as f64 / 20_000.0;
            assert!((f - p).abs() < 0.02, "token {id}: {f} vs {p}");
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let s = Sampling {
                temperature: t,
                top_k: 0,
                top_p: p,
                seed: 0,
            };
            assert!(Sampler::new(s).is_err());
        }
    }
}
