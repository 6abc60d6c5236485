//! Block-quantized weight storage: 8 and 4 bits with an f16 scale per block
//! of 32 consecutive values (in the tensor's row-major order, so a block
//! lies within one row when the last dimension is a multiple of 32).
//!
//! - **q8**: `q = round(x / d)` in [-127, 127], `d = max|x| / 127`; 8.5 bits
//!   a weight.
//! - **q4**: `q = round(x / d)` clamped to [-8, 7], `d = m / -8` where `m` is
//!   the block's value of largest magnitude, with its sign (GGUF's Q4_0
//!   rule: `m` itself is exact); 4.5 bits a weight. A per-block minimum
//!   (q4_1, 5 bits) was measured and not taken: on the experts of the
//!   shipped top-8 model its relative RMS error is 0.0640 against 0.0671
//!   (5% less error for 11% more bytes; the demo: 0.0651 against 0.0686).
//!
//! The scale is rounded to f16 before the values are divided by it, so the
//! stored codes are the nearest ones for the scale a kernel reads.
//!
//! **Packing** (what the kernels read, `u32` words, little-endian): two
//! blocks (64 values) at a time, their codes then one word holding both
//! scales (the first block's in the low half).
//! - q8: 16 words of codes (value `i` of the pair in byte `i % 4` of word
//!   `i / 4`, two's complement), then the scales: 17 words per 64 values.
//! - q4: 8 words of codes (value `i` in nibble `i % 8` of word `i / 8`,
//!   stored as `q + 8`), then the scales: 9 words per 64 values.
//!
//! A tensor whose value count is not a multiple of 64 is padded with zeros
//! to the next pair. Four consecutive values starting at a multiple of 4
//! share one word and one scale: the kernels' vec4 loads read one word.
//! Twin of the shaders' `//#if q8` / `//#if q4` accessors: [`dequantize`].

use crate::error::{Error, Result};
use half::f16;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;
/// Values per packed pair of blocks.
pub const PAIR: usize = 2 * BLOCK;

/// A block-quantized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8,
    Q4,
}

crate::choice::choice! { QuantFormat, "quantization",
    Q8 = "q8": "8-bit codes, an f16 scale per 32 values (8.5 bits a weight)",
    Q4 = "q4": "4-bit codes, an f16 scale per 32 values (4.5 bits a weight)",
}

impl QuantFormat {
    /// Words per pair of blocks (codes and the scale word).
    pub fn pair_words(self) -> usize {
        match self {
            QuantFormat::Q8 => 17,
            QuantFormat::Q4 => 9,
        }
    }

    /// Largest code magnitude the scale maps the block's extreme to.
    fn levels(self) -> f32 {
        match self {
            QuantFormat::Q8 => 127.0,
            QuantFormat::Q4 => 8.0,
        }
    }

    /// Packed words for `numel` values.
    pub fn words(self, numel: usize) -> usize {
        numel.div_ceil(PAIR) * self.pair_words()
    }

    /// Packed bytes for `numel` values.
    pub fn bytes(self, numel: usize) -> u64 {
        self.bytes_u64(numel as u64)
    }

    /// [`QuantFormat::bytes`] of a count that may not fit `usize` (a
    /// model's size on a 32-bit target).
    pub fn bytes_u64(self, numel: u64) -> u64 {
        numel.div_ceil(PAIR as u64) * self.pair_words() as u64 * 4
    }

    /// The largest error of one value of a block whose largest magnitude is
    /// `amax`: half a step (q4: a whole step, as a value of the other sign
    /// than the extreme may reach code 8, clamped to 7), plus the scale's
    /// f16 rounding over the code range (relative 2^-11 of `amax`).
    pub fn error_bound(self, amax: f32) -> f32 {
        let step = amax / self.levels();
        let steps = match self {
            QuantFormat::Q8 => 0.5,
            QuantFormat::Q4 => 1.0,
        };
        steps * step + amax * (1.0 / 2048.0) * 1.01 + f32::EPSILON * amax
    }
}

/// The f16 scale of one block, as the kernels read it.
fn block_scale(format: QuantFormat, block: &[f32]) -> f16 {
    let m = match format {
        QuantFormat::Q8 => block.iter().fold(0.0f32, |a, &x| a.max(x.abs())),
        // The signed value of largest magnitude (the first one on a tie).
        QuantFormat::Q4 => block
            .iter()
            .fold(0.0f32, |a, &x| if x.abs() > a.abs() { x } else { a }),
    };
    if m == 0.0 {
        // An all-zero block: scale +0 (q4's 0 / -8 would be -0).
        return f16::ZERO;
    }
    let d = match format {
        QuantFormat::Q8 => m / 127.0,
        QuantFormat::Q4 => m / -8.0,
    };
    f16::from_f32(d)
}

/// The code of `x` under scale `d` (0 when the scale is 0).
fn code(format: QuantFormat, x: f32, d: f32) -> i32 {
    if d == 0.0 {
        return 0;
    }
    let q = (x / d).round() as i32;
    match format {
        QuantFormat::Q8 => q.clamp(-127, 127),
        QuantFormat::Q4 => q.clamp(-8, 7),
    }
}

/// Quantize and pack `data` (`label` names it in errors). Every value must
/// be finite, and a block's scale must be a finite f16.
pub fn quantize(format: QuantFormat, label: &str, data: &[f32]) -> Result<Vec<u32>> {
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(
            "quantize",
            format!("{label}: value {i} is {}, not finite", data[i]),
        ));
    }
    let pw = format.pair_words();
    let mut out = vec![0u32; format.words(data.len())];
    for (p, pair) in data.chunks(PAIR).enumerate() {
        let words = &mut out[p * pw..(p + 1) * pw];
        let mut scales = [0u16; 2];
        for (b, block) in pair.chunks(BLOCK).enumerate() {
            let d = block_scale(format, block);
            if !d.is_finite() {
                return Err(Error::invalid(
                    "quantize",
                    format!(
                        "{label}: block {} holds values beyond what an f16 scale covers",
                        p * 2 + b
                    ),
                ));
            }
            scales[b] = d.to_bits();
            let d = d.to_f32();
            for (j, &x) in block.iter().enumerate() {
                let i = b * BLOCK + j;
                let q = code(format, x, d);
                match format {
                    QuantFormat::Q8 => words[i / 4] |= ((q as u8) as u32) << (8 * (i % 4)),
                    QuantFormat::Q4 => words[i / 8] |= ((q + 8) as u32) << (4 * (i % 8)),
                }
            }
        }
        words[pw - 1] = scales[0] as u32 | (scales[1] as u32) << 16;
    }
    Ok(out)
}

/// Value `i` of packed `words`: what the shaders' accessors compute.
pub fn value(format: QuantFormat, words: &[u32], i: usize) -> f32 {
    let pw = format.pair_words();
    let base = (i / PAIR) * pw;
    let r = i % PAIR;
    let sw = words[base + pw - 1];
    let bits = if r < BLOCK { sw & 0xffff } else { sw >> 16 };
    let d = f16::from_bits(bits as u16).to_f32();
    let q = match format {
        QuantFormat::Q8 => ((words[base + r / 4] >> (8 * (r % 4))) & 0xff) as u8 as i8 as i32,
        QuantFormat::Q4 => ((words[base + r / 8] >> (4 * (r % 8))) & 0xf) as i32 - 8,
    };
    q as f32 * d
}

/// The `numel` values packed in `words` (the twin's view of quantized
/// storage).
pub fn dequantize(format: QuantFormat, words: &[u32], numel: usize) -> Vec<f32> {
    (0..numel).map(|i| value(format, words, i)).collect()
}

/// `data` through quantization and back: what a kernel reading the packed
/// weight sees.
pub fn rounded(format: QuantFormat, label: &str, data: &[f32]) -> Result<Vec<f32>> {
    Ok(dequantize(
        format,
        &quantize(format, label, data)?,
        data.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    #[test]
    fn round_trip_within_the_bound() {
        let mut rng = Rng::new(5);
        // 200 values: 3 whole pairs and a padded one; blocks of mixed scale.
        let mut data = rng.vec_sym(200, 1.0);
        for (b, block) in data.chunks_mut(BLOCK).enumerate() {
            let s = [1e-3, 1.0, 30.0, 1e4][b % 4];
            block.iter_mut().for_each(|x| *x *= s);
        }
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let words = quantize(format, "w", &data).unwrap();
            assert_eq!(words.len(), 4 * format.pair_words());
            let back = dequantize(format, &words, data.len());
            for (block, got) in data.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let amax = block.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                for (x, y) in block.iter().zip(got) {
                    assert!(
                        (x - y).abs() <= format.error_bound(amax),
                        "{format}: {x} -> {y} (block max {amax})"
                    );
                }
            }
            // Quantizing the dequantized values again changes nothing.
            assert_eq!(quantize(format, "w", &back).unwrap(), words, "{format}");
        }
    }

    #[test]
    fn exact_codes_and_packing() {
        // Block 0 holds -8 * 0.5 .. 7 * 0.5 in q4's steps; block 1 is zero.
        let mut data: Vec<f32> = (0..32).map(|i| ((i % 16) as f32 - 8.0) * 0.5).collect();
        data.extend([0.0f32; 32]);
        let q4 = quantize(QuantFormat::Q4, "w", &data).unwrap();
        assert_eq!(q4.len(), 9);
        // Values 0..8 are codes 0..8 (stored +8): nibbles 0..7 = 0..7.
        assert_eq!(q4[0], 0x7654_3210);
        assert_eq!(q4[4..8], [0x8888_8888; 4]);
        // Scale -4 / -8 = 0.5 (0x3800), then 0 (an all-zero block).
        assert_eq!(q4[8], 0x3800);
        assert_eq!(dequantize(QuantFormat::Q4, &q4, 64), data);
        let q8 = quantize(QuantFormat::Q8, "w", &data).unwrap();
        assert_eq!(q8.len(), 17);
        assert_eq!(
            dequantize(QuantFormat::Q8, &q8, 64),
            rounded(QuantFormat::Q8, "w", &data).unwrap()
        );
        // The extreme maps to +-127 exactly when the scale is exact.
        let v: Vec<f32> = (0..64).map(|i| if i == 3 { -127.0 } else { 1.0 }).collect();
        let q8 = quantize(QuantFormat::Q8, "w", &v).unwrap();
        assert_eq!((q8[0] >> 24) as u8 as i8, -127);
        assert_eq!(dequantize(QuantFormat::Q8, &q8, 32), v[..32]);
        // The second block's scale 1/127 is rounded to f16 first.
        let d = f16::from_f32(1.0 / 127.0).to_f32();
        assert_eq!(value(QuantFormat::Q8, &q8, 40), 127.0 * d);
    }

    #[test]
    fn refuses_what_it_cannot_store() {
        for format in [QuantFormat::Q8, QuantFormat::Q4] {
            let err = quantize(format, "layers.0.ffn.w1", &[1.0, f32::NAN]).unwrap_err();
            assert!(
                err.to_string().contains("layers.0.ffn.w1: value 1 is NaN"),
                "{err}"
            );
            // 1e9 / 127 is beyond f16: no scale stores it.
            let err = quantize(format, "w", &[1e9; 4]).unwrap_err();
            assert!(err.to_string().contains("block 0"), "{err}");
        }
        assert_eq!(
            quantize(QuantFormat::Q8, "w", &[]).unwrap(),
            Vec::<u32>::new()
        );
    }
}
