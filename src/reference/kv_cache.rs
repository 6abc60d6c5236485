//! CPU twins of `shaders/kv_cache.wgsl` (same names, same argument order):
//! the embedding of tokens that start at `pos0`, appending to a layer's
//! K/V cache, and causal attention of a call's queries over the cache.
//!
//! Layout: qkv [T, (H + 2 Hkv) Dh] (q heads, then k heads, then v heads),
//! caches [Hkv, N, Dh], o [T, H Dh]; query head h reads kv head
//! h / (H / Hkv). The attention twin is the plain two-pass softmax in f64,
//! not the GPU's online one.

/// `x[i, :] = wte[ids[i], :] * scale + wpe[pos0 + i, :]` (no wpe: rotary
/// models); x [T, D].
pub fn kv_embed(
    ids: &[u32],
    wte: &[f32],
    wpe: Option<&[f32]>,
    scale: f32,
    pos0: usize,
    d: usize,
) -> Vec<f32> {
    let mut x = vec![0.0; ids.len() * d];
    for (i, &id) in ids.iter().enumerate() {
        let (p, id) = (pos0 + i, id as usize);
        for c in 0..d {
            let e = wte[id * d + c] * scale;
            x[i * d + c] = match wpe {
                Some(wpe) => e + wpe[p * d + c],
                None => e,
            };
        }
    }
    x
}

/// Shape of a KV call: T tokens from `pos0`, H query heads and Hkv
/// key/value heads of width Dh, capacity N, sliding window W (0: none),
/// score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvDims {
    pub t: usize,
    pub h: usize,
    pub hkv: usize,
    pub dh: usize,
    pub n: usize,
    pub pos0: usize,
    pub window: usize,
    pub scale: f32,
}

impl KvDims {
    /// Multi-head attention, no window, scale 1 / sqrt(Dh).
    pub fn mha(t: usize, h: usize, dh: usize, n: usize, pos0: usize) -> KvDims {
        KvDims {
            t,
            h,
            hkv: h,
            dh,
            n,
            pos0,
            window: 0,
            scale: 1.0 / (dh as f32).sqrt(),
        }
    }

    fn stride(&self) -> usize {
        (self.h + 2 * self.hkv) * self.dh
    }
}

/// Copy each row's k and v (kv head by kv head) to positions `pos0 + i` of
/// the caches. Positions past N are dropped, as on the GPU.
pub fn kv_append(qkv: &[f32], k_cache: &mut [f32], v_cache: &mut [f32], s: KvDims) {
    let (qs, kw) = (s.stride(), s.hkv * s.dh);
    for i in 0..s.t {
        let p = s.pos0 + i;
        if p >= s.n {
            continue;
        }
        let row = i * qs + s.h * s.dh;
        for g in 0..s.hkv {
            for e in 0..s.dh {
                let dst = (g * s.n + p) * s.dh + e;
                k_cache[dst] = qkv[row + g * s.dh + e];
                v_cache[dst] = qkv[row + kw + g * s.dh + e];
            }
        }
    }
}

/// `o[i, head h] = sum_j softmax_j(scale q_i . k_j) v_j` over the cached
/// positions `max(0, pos0 + i + 1 - W) <= j <= pos0 + i` of kv head
/// `h / (H / Hkv)`.
pub fn kv_attention(qkv: &[f32], k_cache: &[f32], v_cache: &[f32], s: KvDims) -> Vec<f32> {
    let d = s.h * s.dh;
    let qs = s.stride();
    let group = s.h / s.hkv;
    let mut o = vec![0.0f32; s.t * d];
    for i in 0..s.t {
        let len = (s.pos0 + i + 1).min(s.n);
        let first = if s.window > 0 {
            len.saturating_sub(s.window)
        } else {
            0
        };
        for h in 0..s.h {
            let q = &qkv[i * qs + h * s.dh..][..s.dh];
            let base = (h / group) * s.n * s.dh;
            let scores: Vec<f64> = (first..len)
                .map(|j| {
                    let k = &k_cache[base + j * s.dh..][..s.dh];
                    q.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * s.scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for e in 0..s.dh {
                let acc: f64 = (first..len)
                    .zip(&w)
                    .map(|(j, w)| w * v_cache[base + j * s.dh + e] as f64)
                    .sum();
                o[i * d + h * s.dh + e] = (acc / z) as f32;
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attention::{attention_forward, AttnShape};

    /// Appending a whole sequence and attending from position 0 is causal
    /// self-attention (the training twin).
    #[test]
    fn cache_attention_equals_self_attention() {
        let (n, h, dh) = (7, 2, 4);
        let d = h * dh;
        let mut rng = crate::util::Rng::new(5);
        let qkv = rng.vec_sym(n * 3 * d, 1.0);
        let s = KvDims::mha(n, h, dh, n, 0);
        let mut kc = vec![0.0; h * n * dh];
        let mut vc = vec![0.0; h * n * dh];
        kv_append(&qkv, &mut kc, &mut vc, s);
        let o = kv_attention(&qkv, &kc, &vc, s);
        let (want, _) = attention_forward(&qkv, AttnShape { b: 1, n, h, dh });
        for (a, b) in o.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // One token at a time gives the same rows.
        let mut kc2 = vec![0.0; h * n * dh];
        let mut vc2 = vec![0.0; h * n * dh];
        for i in 0..n {
            let row = &qkv[i * 3 * d..(i + 1) * 3 * d];
            let si = KvDims { t: 1, pos0: i, ..s };
            kv_append(row, &mut kc2, &mut vc2, si);
            let oi = kv_attention(row, &kc2, &vc2, si);
            for (a, b) in oi.iter().zip(&want[i * d..(i + 1) * d]) {
                assert!((a - b).abs() < 1e-5, "row {i}: {a} vs {b}");
            }
        }
    }
}
