//! Routing analysis (the paper's section 4.5 as a tool): run a text through
//! the model in context-sized windows and count, per MoE layer, how many
//! tokens took two experts and how the load spread over the experts; then
//! which words most often take two experts and which never do.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::infer::engine::{Engine, LayerRoute};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::HashMap;

/// One MoE layer over the whole text.
#[derive(Clone, Debug, Serialize)]
pub struct LayerStats {
    pub layer: usize,
    /// Tokens that used two experts (more than one, for a top-k model) /
    /// tokens.
    pub two_expert_fraction: f64,
    /// Routed (token, expert) pairs / tokens.
    pub mean_experts: f64,
    /// Routed (token, expert) pairs per expert / all routed pairs.
    pub expert_load: Vec<f64>,
}

/// One word: how often it occurred and the mean fraction of MoE layers in
/// which its tokens used two experts.
#[derive(Clone, Debug, Serialize)]
pub struct WordStat {
    pub word: String,
    pub count: usize,
    pub two_expert_fraction: f64,
}

/// The report `amoe routes` prints.
#[derive(Clone, Debug, Serialize)]
pub struct RoutesReport {
    pub gating: String,
    pub threshold: f32,
    pub tokens: usize,
    /// Fraction over every (token, MoE layer).
    pub two_expert_fraction: f64,
    /// Experts per token, over every (token, MoE layer).
    pub mean_experts: f64,
    /// The most experts any token took in any layer.
    pub max_experts: usize,
    pub layers: Vec<LayerStats>,
    /// Words (seen at least `min_count` times) that most often use two experts.
    pub most_two_expert_words: Vec<WordStat>,
    /// Frequent words (at least `min_count` times) that never used two experts.
    pub never_two_expert_words: Vec<WordStat>,
    pub min_count: usize,
}

/// Accumulates tokens and their routes.
#[derive(Clone, Debug, Default)]
pub struct RouteStats {
    tokens: usize,
    experts: usize,
    /// The most experts one token took in one layer.
    max_taken: usize,
    /// Per MoE layer (in order): layer index, two-expert tokens, load per expert.
    layers: Vec<(usize, usize, Vec<usize>)>,
    /// word -> (count, sum of per-token two-expert fractions)
    words: HashMap<String, (usize, f64)>,
    /// The word being read and its tokens' fractions.
    current: String,
    current_fracs: Vec<f64>,
}

impl RouteStats {
    pub fn new(experts: usize) -> Self {
        RouteStats {
            experts,
            ..Default::default()
        }
    }

    fn end_word(&mut self) {
        let w = self.current.trim().to_string();
        if w.chars().any(char::is_alphabetic) && !self.current_fracs.is_empty() {
            let f = self.current_fracs.iter().sum::<f64>() / self.current_fracs.len() as f64;
            let e = self.words.entry(w).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += f;
        }
        self.current.clear();
        self.current_fracs.clear();
    }

    /// Add one token (its text alone) and its routes.
    pub fn add(&mut self, text: &str, routes: &[LayerRoute]) {
        self.tokens += 1;
        if self.layers.is_empty() {
            self.layers = routes
                .iter()
                .map(|r| (r.layer, 0, vec![0; self.experts]))
                .collect();
        }
        let mut two = 0usize;
        for (acc, r) in self.layers.iter_mut().zip(routes) {
            self.max_taken = self.max_taken.max(r.experts.len());
            if r.experts.len() > 1 {
                acc.1 += 1;
                two += 1;
            }
            for &e in &r.experts {
                if let Some(c) = acc.2.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        let frac = if routes.is_empty() {
            0.0
        } else {
            two as f64 / routes.len() as f64
        };
        // A word starts at whitespace or after a non-letter; punctuation
        // stands alone.
        let starts_new = text.starts_with(char::is_whitespace)
            || !text.chars().next().is_some_and(char::is_alphanumeric)
            || !self
                .current
                .chars()
                .last()
                .is_some_and(char::is_alphanumeric);
        if starts_new {
            self.end_word();
        }
        self.current.push_str(text);
        self.current_fracs.push(frac);
    }

    pub fn report(&mut self, gating: &str, threshold: f32, min_count: usize) -> RoutesReport {
        self.end_word();
        let t = self.tokens.max(1) as f64;
        let layers: Vec<LayerStats> = self
            .layers
            .iter()
            .map(|(l, two, load)| {
                let pairs = load.iter().sum::<usize>();
                let total = pairs.max(1) as f64;
                LayerStats {
                    layer: *l,
                    two_expert_fraction: *two as f64 / t,
                    mean_experts: pairs as f64 / t,
                    expert_load: load.iter().map(|&c| c as f64 / total).collect(),
                }
            })
            .collect();
        let mean = |f: fn(&LayerStats) -> f64| {
            if layers.is_empty() {
                0.0
            } else {
                layers.iter().map(f).sum::<f64>() / layers.len() as f64
            }
        };
        let overall = mean(|l| l.two_expert_fraction);
        let mean_experts = mean(|l| l.mean_experts);
        let mut words: Vec<WordStat> = self
            .words
            .iter()
            .filter(|(_, (c, _))| *c >= min_count)
            .map(|(w, (c, s))| WordStat {
                word: w.clone(),
                count: *c,
                two_expert_fraction: s / *c as f64,
            })
            .collect();
        words.sort_by(|a, b| {
            b.two_expert_fraction
                .total_cmp(&a.two_expert_fraction)
                .then(b.count.cmp(&a.count))
                .then(a.word.cmp(&b.word))
        });
        let most: Vec<WordStat> = words
            .iter()
            .filter(|w| w.two_expert_fraction > 0.0)
            .take(15)
            .cloned()
            .collect();
        let mut never: Vec<WordStat> = words
            .into_iter()
            .filter(|w| w.two_expert_fraction == 0.0)
            .collect();
        never.sort_by(|a, b| b.count.cmp(&a.count).then(a.word.cmp(&b.word)));
        never.truncate(15);
        RoutesReport {
            gating: gating.to_string(),
            threshold,
            tokens: self.tokens,
            two_expert_fraction: overall,
            mean_experts,
            max_experts: self.max_taken,
            layers,
            most_two_expert_words: most,
            never_two_expert_words: never,
            min_count,
        }
    }
}

/// Run `ids` through `engine` in windows of the context (each from
/// position 0) and gather the routes of every token.
pub async fn analyze(
    engine: &mut Engine,
    ctx: &GpuContext,
    tokenizer: &Tokenizer,
    ids: &[u32],
    min_count: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<RoutesReport> {
    if ids.is_empty() {
        return Err(Error::invalid("routes", "the text has no tokens"));
    }
    if engine.cfg.moe_layers().is_empty() {
        return Err(Error::invalid(
            "routes",
            "the model has no MoE layer (a dense checkpoint routes nothing)",
        ));
    }
    let mut stats = RouteStats::new(engine.cfg.experts);
    let n = engine.cfg.context;
    let mut done = 0;
    for chunk in ids.chunks(n) {
        let out = engine.prefill(ctx, chunk, false).await?;
        for (&id, r) in chunk.iter().zip(&out.routes) {
            stats.add(&tokenizer.decode(&[id])?, r);
        }
        done += chunk.len();
        progress(done, ids.len());
    }
    let g = engine.gate;
    // A top-k router by its description ("top-8", "top-8, mass rule P =
    // 0.5"); the paper's gatings by name, with their threshold beside.
    let name = match g.gating {
        crate::kernels::Gating::TopK => g.describe(),
        other => format!("{other:?}").to_lowercase(),
    };
    Ok(stats.report(&name, g.threshold, min_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(layer: usize, experts: &[u32]) -> LayerRoute {
        LayerRoute {
            layer,
            experts: experts.to_vec(),
            weights: vec![0.5; experts.len()],
        }
    }

    #[test]
    fn counts_layers_experts_and_words() {
        let mut s = RouteStats::new(4);
        // " the" one expert in both layers; " LORD" two in one layer; "," alone.
        for _ in 0..3 {
            s.add(" the", &[r(0, &[1]), r(1, &[2])]);
            s.add(" LO", &[r(0, &[0, 3]), r(1, &[2])]);
            s.add("RD", &[r(0, &[0, 3]), r(1, &[2])]);
            s.add(",", &[r(0, &[1]), r(1, &[1])]);
        }
        let rep = s.report("adaptive", 0.1, 2);
        assert_eq!(rep.tokens, 12);
        assert_eq!(rep.layers.len(), 2);
        assert!((rep.layers[0].two_expert_fraction - 0.5).abs() < 1e-12);
        assert_eq!(rep.layers[1].two_expert_fraction, 0.0);
        assert!((rep.layers[0].mean_experts - 1.5).abs() < 1e-12);
        assert_eq!(rep.layers[1].mean_experts, 1.0);
        assert!((rep.mean_experts - 1.25).abs() < 1e-12);
        assert_eq!(rep.max_experts, 2);
        // Layer 0: experts 1 (6 times), 0 (6), 3 (6) of 18 routed pairs.
        assert!((rep.layers[0].expert_load[3] - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(rep.most_two_expert_words[0].word, "LORD");
        assert!((rep.most_two_expert_words[0].two_expert_fraction - 0.5).abs() < 1e-12);
        assert_eq!(rep.never_two_expert_words[0].word, "the");
        assert_eq!(rep.never_two_expert_words[0].count, 3);
        assert!(rep.never_two_expert_words.iter().all(|w| w.word != ","));
    }
}
