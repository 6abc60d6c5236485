//! GGUF files (llama.cpp's format, also the blobs ollama stores) read into
//! amoe's types, lazily like a Hugging Face directory (wasm-safe: the page
//! reads the bytes a user picked).
//!
//! - **Container** ([`parse_gguf`]): versions 2 and 3, little-endian; the
//!   metadata (typed values, arrays of one type), the tensor infos (ggml's
//!   `ne`, innermost first, is reversed into amoe's row-major shape) and the
//!   data section at `general.alignment` (default 32). Every count, length
//!   and offset is checked against the file before anything is allocated,
//!   so a truncated or corrupt file is an error naming the byte, never a
//!   panic or a huge allocation.
//! - **Tensor types**: F32, F16, BF16 as stored; Q8_0, Q4_0, Q4_1, Q5_0,
//!   Q5_1 and the k-quants Q2_K..Q6_K dequantized exactly as ggml's
//!   reference code does ([`GgmlType::dequantize`]), a block at a time, when
//!   the upload asks for the values. Quantized expert banks then load
//!   block-quantized in amoe's nearest format (`TensorValues::quant`: q8
//!   for 5 to 8 bits, q4 below), whose blocks run along the output axis
//!   where GGUF's run along the input: a second rounding, measured in the
//!   README.
//! - **Architectures** ([`gguf_config`]): `llama` with experts (Mixtral),
//!   `qwen2moe`, `qwen3moe`, `olmoe`, `granitemoe`, and dense `llama`,
//!   `qwen2`, `qwen3`: the metadata becomes the `config.json` the Hugging
//!   Face loader reads (`hf::parse_config`, with its checks), the tensors
//!   ggml's names (`blk.N.attn_q.weight`, merged `ffn_*_exps` banks) mapped
//!   onto the parameter tree. llama.cpp's converter permutes the rows of q
//!   and k for `llama` and `granitemoe` (rotary pairs made adjacent); the
//!   reader undoes it.
//! - **Tokenizer** ([`gguf_tokenizer`]): a byte-level BPE vocabulary
//!   (`tokenizer.ggml.model` "gpt2") becomes a `tokenizer.json` with the
//!   pre-tokenizer that `tokenizer.ggml.pre` names; SentencePiece
//!   vocabularies ("llama") are refused with what to do instead.

use super::hf::{parse_config, Family, HfModel, Recipe};
use super::raw::{FileBytes, FileDtype, Op, RawTensor};
use crate::error::{Error, Result};
use crate::model::config::FfnKind;
use crate::model::params::{BlockParam, ParamId, ParamSpec};
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::ops::Range;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(x) => Some(*x),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => format!("{:?}", s.chars().take(80).collect::<String>()),
            Value::Array(a) => format!("an array of {}", a.len()),
        }
    }
}

/// The ggml tensor types amoe reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Every ggml type id with its name (for messages about the unsupported).
const GGML_NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Values per block.
    pub fn block(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Byte offsets of a block's f16 scale fields: the values are finite
    /// exactly when these are.
    fn scale_offsets(self) -> &'static [usize] {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
        }
    }

    /// The amoe format that holds these values best without growing: q8
    /// for 5 to 8 bits, q4 below; None for the float types.
    pub fn nearest_quant(self) -> Option<crate::quant::QuantFormat> {
        use crate::quant::QuantFormat::{Q4, Q8};
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            GgmlType::Q8_0 | GgmlType::Q6K | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => {
                Some(Q8)
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q3K | GgmlType::Q2K => {
                Some(Q4)
            }
        }
    }

    /// Whether any value of whole blocks `bytes` is NaN or infinite.
    pub(crate) fn any_non_finite(self, bytes: &[u8]) -> bool {
        let offsets = self.scale_offsets();
        bytes.chunks_exact(self.block_bytes()).any(|b| {
            offsets
                .iter()
                .any(|&o| u16::from_le_bytes([b[o], b[o + 1]]) & 0x7c00 == 0x7c00)
        })
    }

    /// The values of whole blocks `bytes`, appended to `out`: ggml's
    /// reference dequantization (`dequantize_row_*` of ggml-quants.c).
    pub fn dequantize(self, bytes: &[u8], out: &mut Vec<f32>) {
        let h = |b: &[u8], o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
        for b in bytes.chunks_exact(self.block_bytes()) {
            match self {
                GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                GgmlType::F16 => out.push(h(b, 0)),
                GgmlType::BF16 => out.push(f32::from_bits(
                    (u16::from_le_bytes([b[0], b[1]]) as u32) << 16,
                )),
                GgmlType::Q8_0 => {
                    let d = h(b, 0);
                    out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
                }
                GgmlType::Q4_0 | GgmlType::Q4_1 => {
                    let d = h(b, 0);
                    let (m, qs, off) = match self {
                        GgmlType::Q4_1 => (h(b, 2), &b[4..20], 0.0),
                        _ => (0.0, &b[2..18], 8.0),
                    };
                    out.extend(qs.iter().map(|&q| ((q & 15) as f32 - off) * d + m));
                    out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - off) * d + m));
                }
                GgmlType::Q5_0 | GgmlType::Q5_1 => {
                    let d = h(b, 0);
                    let (m, qh, qs, off) = match self {
                        GgmlType::Q5_1 => (h(b, 2), &b[4..8], &b[8..24], 0.0),
                        _ => (0.0, &b[2..6], &b[6..22], 16.0),
                    };
                    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                    for (j, &q) in qs.iter().enumerate() {
                        let hi = ((qh >> j) << 4) & 0x10;
                        out.push((((q & 15) as u32 | hi) as f32 - off) * d + m);
                    }
                    for (j, &q) in qs.iter().enumerate() {
                        let hi = (qh >> (j + 12)) & 0x10;
                        out.push((((q >> 4) as u32 | hi) as f32 - off) * d + m);
                    }
                }
                GgmlType::Q4K | GgmlType::Q5K => {
                    let (d, dmin) = (h(b, 0), h(b, 2));
                    let scales = &b[4..16];
                    let (qh, qs) = match self {
                        GgmlType::Q5K => (Some(&b[16..48]), &b[48..176]),
                        _ => (None, &b[16..144]),
                    };
                    for c in 0..4 {
                        let q = &qs[32 * c..32 * c + 32];
                        for half_ in 0..2 {
                            let (sc, mn) = scale_min_k4(2 * c + half_, scales);
                            let (d1, m1) = (d * sc as f32, dmin * mn as f32);
                            for l in 0..32 {
                                let lo = if half_ == 0 { q[l] & 15 } else { q[l] >> 4 };
                                let hi = qh.map_or(0, |qh| {
                                    if qh[l] & (1 << (2 * c + half_)) != 0 {
                                        16
                                    } else {
                                        0
                                    }
                                });
                                out.push(d1 * (lo + hi) as f32 - m1);
                            }
                        }
                    }
                }
                GgmlType::Q6K => {
                    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                    let d = h(b, 208);
                    for n in 0..2 {
                        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                        let mut y = [0f32; 128];
                        for l in 0..32 {
                            let is = l / 16;
                            let q = |lo: u8, shift: u32| {
                                (lo as i32 | ((((qh[l] >> shift) & 3) as i32) << 4)) - 32
                            };
                            let q1 = q(ql[l] & 15, 0);
                            let q2 = q(ql[l + 32] & 15, 2);
                            let q3 = q(ql[l] >> 4, 4);
                            let q4 = q(ql[l + 32] >> 4, 6);
                            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                        }
                        out.extend_from_slice(&y);
                    }
                }
                GgmlType::Q2K => {
                    let (scales, qs) = (&b[0..16], &b[16..80]);
                    let (d, dmin) = (h(b, 80), h(b, 82));
                    let mut is = 0;
                    for n in 0..2 {
                        let q = &qs[32 * n..32 * n + 32];
                        for shift in [0u32, 2, 4, 6] {
                            for part in 0..2 {
                                let sc = scales[is];
                                is += 1;
                                let (dl, ml) = (d * (sc & 15) as f32, dmin * (sc >> 4) as f32);
                                for l in 0..16 {
                                    let v = (q[l + 16 * part] >> shift) & 3;
                                    out.push(dl * v as f32 - ml);
                                }
                            }
                        }
                    }
                }
                GgmlType::Q3K => {
                    let (hmask, qs, sc_bytes) = (&b[0..32], &b[32..96], &b[96..108]);
                    let d = h(b, 108);
                    let scale = |j: usize| -> i32 {
                        let lo = if j < 8 {
                            sc_bytes[j] & 15
                        } else {
                            sc_bytes[j - 8] >> 4
                        };
                        let hi = (sc_bytes[8 + j % 4] >> (2 * (j / 4))) & 3;
                        (lo | (hi << 4)) as i32 - 32
                    };
                    let mut is = 0;
                    let mut m = 1u8;
                    for n in 0..2 {
                        let q = &qs[32 * n..32 * n + 32];
                        for shift in [0u32, 2, 4, 6] {
                            for part in 0..2 {
                                let dl = d * scale(is) as f32;
                                is += 1;
                                for l in 0..16 {
                                    let k = l + 16 * part;
                                    let low = ((q[k] >> shift) & 3) as i32;
                                    let v = low - if hmask[k] & m != 0 { 0 } else { 4 };
                                    out.push(dl * v as f32);
                                }
                            }
                            m <<= 1;
                        }
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K / Q5_K block
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One tensor of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major (ggml's `ne` reversed).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Its bytes in the file.
    pub range: Range<usize>,
}

/// A parsed GGUF file: metadata and tensors over its bytes.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub source: String,
    pub version: u32,
    pub kv: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    file: FileBytes,
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

/// Reads the container: bounds-checked cursor over the file's bytes.
struct Cursor<'a> {
    source: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::checkpoint(self.source, format!("GGUF: {msg} (at byte {})", self.pos))
    }

    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes, {} are left",
                self.left()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A count of items of at least `min_bytes` each, bounded by the bytes
    /// left (so that no lie allocates).
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        if n > (self.left() / min_bytes.max(1)) as u64 {
            return Err(self.err(format!(
                "{what} is {n}, more than the {} bytes left can hold",
                self.left()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, in_array: bool) -> Result<Value> {
        let b = |c: &mut Self, n: usize| c.take(n, key).map(|s| s.to_vec());
        Ok(match ty {
            0 => Value::Int(b(self, 1)?[0] as i128),
            1 => Value::Int(b(self, 1)?[0] as i8 as i128),
            2 => Value::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i128),
            3 => Value::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i128),
            4 => Value::Int(u32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as i128),
            5 => Value::Int(i32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as i128),
            6 => Value::Float(f32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as f64),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                x => return Err(self.err(format!("{key}: bool byte {x}"))),
            },
            8 => Value::Str(self.string(key)?),
            9 if !in_array => {
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => return Err(self.err(format!("{key}: an array of arrays"))),
                    t => return Err(self.err(format!("{key}: unknown value type {t}"))),
                };
                let n = self.count(key, min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, true)?);
                }
                Value::Array(items)
            }
            10 => Value::Int(u64::from_le_bytes(b(self, 8)?.try_into().unwrap()) as i128),
            11 => Value::Int(i64::from_le_bytes(b(self, 8)?.try_into().unwrap()) as i128),
            12 => Value::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            t => return Err(self.err(format!("{key}: unknown value type {t}"))),
        })
    }
}

/// The container of a GGUF file's bytes (see the module docs); `source`
/// names it in errors.
pub fn parse_gguf(source: &str, file: FileBytes) -> Result<Gguf> {
    let bytes = file.bytes();
    let mut c = Cursor {
        source,
        b: bytes,
        pos: 0,
    };
    if c.take(4, "the magic")? != b"GGUF" {
        return Err(Error::checkpoint(source, "not a GGUF file (no GGUF magic)"));
    }
    let version = c.u32("the version")?;
    if version & 0xffff == 0 && version != 0 {
        return Err(c.err("a big-endian file: amoe reads little-endian GGUF"));
    }
    if !(2..=3).contains(&version) {
        return Err(c.err(format!("version {version}: amoe reads versions 2 and 3")));
    }
    // A tensor info is at least 8 + 4 + 8 + 4 + 8 bytes, a pair 8 + 4 + 1.
    let n_tensors = c.count("the tensor count", 32)?;
    let n_kv = c.count("the metadata count", 13)?;
    let mut kv = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("a metadata key")?;
        let ty = c.u32(&key)?;
        let v = c.value(ty, &key, false)?;
        if kv.insert(key.clone(), v).is_some() {
            return Err(c.err(format!("metadata key {key} appears twice")));
        }
    }
    let alignment = match kv.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(c.err(format!(
                    "general.alignment {} is not a power of two",
                    v.describe()
                )))
            }
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = c.string("a tensor name")?;
        if !names.insert(name.clone()) {
            return Err(c.err(format!("tensor {name} appears twice")));
        }
        let n_dims = c.u32(&name)?;
        if !(1..=4).contains(&n_dims) {
            return Err(c.err(format!("tensor {name}: {n_dims} dimensions (1 to 4)")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.u64(&name)?);
        }
        let id = c.u32(&name)?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            let what = GGML_NAMES
                .iter()
                .find(|(i, _)| *i == id)
                .map_or(format!("type {id}"), |(_, n)| n.to_string());
            c.err(format!(
                "tensor {name} is {what}: amoe reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, \
                 Q5_1 and Q2_K to Q6_K"
            ))
        })?;
        let offset = c.u64(&name)?;
        infos.push((name, ne, ty, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, ne, ty, offset) in infos {
        let bad = |msg: String| Error::checkpoint(source, format!("GGUF: tensor {name}: {msg}"));
        let most = bytes.len() as u64 * 8;
        let numel = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            // Each dimension too (a zero elsewhere would hide a huge one).
            .filter(|&n| n <= most && ne.iter().all(|&d| d <= most))
            .ok_or_else(|| bad(format!("dimensions {ne:?} hold more values than the file")))?;
        if ne[0] % ty.block() as u64 != 0 {
            return Err(bad(format!(
                "rows of {} values are not whole {} blocks of {}",
                ne[0],
                ty.name(),
                ty.block()
            )));
        }
        let size = numel / ty.block() as u64 * ty.block_bytes() as u64;
        if offset % alignment as u64 != 0 {
            return Err(bad(format!(
                "offset {offset} is not aligned to {alignment}"
            )));
        }
        let start = (data_start as u64).checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => tensors.push(GgufTensor {
                shape: ne.iter().rev().map(|&d| d as usize).collect(),
                name,
                ty,
                range: s as usize..e as usize,
            }),
            _ => {
                return Err(bad(format!(
                    "{size} bytes at offset {offset} of the data (from byte {data_start}) run \
                     past the end of the file ({} bytes): truncated?",
                    bytes.len()
                )))
            }
        }
    }
    Ok(Gguf {
        source: source.to_string(),
        version,
        kv,
        tensors,
        file,
    })
}

impl Gguf {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::checkpoint(&self.source, msg.to_string())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.err(format!("{key}: {} is not a string", v.describe())))
            })
            .transpose()
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    self.err(format!(
                        "{key}: {} is not a non-negative integer",
                        v.describe()
                    ))
                })
            })
            .transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    self.err(format!("{key}: {} is not a finite number", v.describe()))
                })
            })
            .transpose()
    }

    fn required(&self, key: &str) -> Result<u64> {
        self.uint(key)?
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))
    }

    /// The tensor as a [`RawTensor`] named as in the file.
    fn raw(&self, t: &GgufTensor) -> RawTensor {
        let dtype = match t.ty {
            GgmlType::F32 => FileDtype::F32,
            GgmlType::F16 => FileDtype::F16,
            GgmlType::BF16 => FileDtype::BF16,
            ty => FileDtype::Ggml(ty),
        };
        RawTensor::over(
            t.name.clone(),
            t.shape.clone(),
            dtype,
            self.file.clone(),
            t.range.clone(),
        )
    }
}

/// The Hugging Face family a GGUF architecture maps onto, and whether
/// llama.cpp's converter permuted its q and k rows.
fn family_of(g: &Gguf, arch: &str) -> Result<(Family, bool)> {
    let experts = g.uint(&format!("{arch}.expert_count"))?.unwrap_or(0);
    Ok(match arch {
        "llama" if experts > 0 => (Family::Mixtral, true),
        "llama" => (Family::Llama, true),
        "qwen2moe" => (Family::Qwen2Moe, false),
        "qwen3moe" => (Family::Qwen3Moe, false),
        "olmoe" => (Family::Olmoe, false),
        "granitemoe" => (Family::GraniteMoe, true),
        "qwen2" => (Family::Qwen2, false),
        "qwen3" => (Family::Qwen3, false),
        other => {
            return Err(g.err(format!(
                "GGUF architecture {other:?} is not supported; amoe reads llama (Mixtral and \
                 Llama), qwen2moe, qwen3moe, olmoe, granitemoe, qwen2 and qwen3"
            )))
        }
    })
}

/// The `config.json` a GGUF file's metadata and tensors stand for, with
/// its family and whether q/k rows are permuted.
pub fn gguf_config(g: &Gguf) -> Result<(Family, bool, Json)> {
    let arch = g
        .str("general.architecture")?
        .ok_or_else(|| g.err("metadata general.architecture is missing"))?
        .to_string();
    let (family, permuted) = family_of(g, &arch)?;
    let key = |k: &str| format!("{arch}.{k}");
    let layers = g.required(&key("block_count"))? as usize;
    let heads = g.required(&key("attention.head_count"))?;
    let d = g.required(&key("embedding_length"))?;
    let has = |name: &str| g.tensor(name).is_some();
    let vocab = match g.uint(&key("vocab_size"))? {
        Some(v) => v,
        None => g
            .tensor("token_embd.weight")
            .map(|t| t.shape[0] as u64)
            .ok_or_else(|| g.err("no token_embd.weight tensor"))?,
    };
    let mut c = json!({
        "model_type": family.model_type(),
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": g.uint(&key("attention.head_count_kv"))?.unwrap_or(heads),
        "max_position_embeddings": g.required(&key("context_length"))?,
        "rope_theta": g.float(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "rms_norm_eps": g.float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| g.err(format!("metadata {} is missing", key("attention.layer_norm_rms_epsilon"))))?,
        "vocab_size": vocab,
        "tie_word_embeddings": !has("output.weight"),
        "hidden_act": "silu",
    });
    let set = |c: &mut Json, k: &str, v: Json| {
        c[k] = v;
    };
    let head_dim = g.uint(&key("attention.key_length"))?;
    if let Some(hd) = head_dim {
        if g.uint(&key("attention.value_length"))?
            .is_some_and(|v| v != hd)
        {
            return Err(g.err(
                "attention.value_length differs from key_length: amoe's heads have one width",
            ));
        }
        set(&mut c, "head_dim", json!(hd));
    }
    let hd = head_dim.unwrap_or(d / heads.max(1));
    if let Some(rot) = g.uint(&key("rope.dimension_count"))? {
        if rot != hd {
            return Err(g.err(format!(
                "rope.dimension_count {rot} of heads of {hd}: amoe rotates the whole head"
            )));
        }
    }
    match g.str(&key("rope.scaling.type"))? {
        None | Some("none") => {}
        Some("linear") => set(
            &mut c,
            "rope_scaling",
            json!({"type": "linear", "factor": g.float(&key("rope.scaling.factor"))?.unwrap_or(1.0)}),
        ),
        Some(t) => {
            return Err(g.err(format!(
                "rope.scaling.type {t:?} is not supported (amoe reads none and linear)"
            )))
        }
    }
    if let Some(f) = g.uint(&key("expert_gating_func"))? {
        if f != 1 {
            return Err(g.err(format!(
                "expert_gating_func {f}: amoe's routers are softmax (1)"
            )));
        }
    }
    if let Some(w) = g.uint(&key("attention.sliding_window"))? {
        set(&mut c, "sliding_window", json!(w));
        if matches!(
            family,
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen2 | Family::Qwen3
        ) {
            set(&mut c, "use_sliding_window", json!(true));
            set(&mut c, "max_window_layers", json!(0));
        }
    }
    let ff = g.uint(&key("feed_forward_length"))?;
    let experts = g.uint(&key("expert_count"))?;
    let used = g.uint(&key("expert_used_count"))?;
    let need =
        |v: Option<u64>, k: &str| v.ok_or_else(|| g.err(format!("metadata {} is missing", key(k))));
    match family {
        Family::Mixtral | Family::GraniteMoe => {
            set(
                &mut c,
                "num_local_experts",
                json!(need(experts, "expert_count")?),
            );
            set(
                &mut c,
                "num_experts_per_tok",
                json!(need(used, "expert_used_count")?),
            );
            set(
                &mut c,
                "intermediate_size",
                json!(need(ff, "feed_forward_length")?),
            );
            if family == Family::GraniteMoe {
                if has("blk.0.ffn_gate_shexp.weight") {
                    return Err(g.err(
                        "a Granite-MoE with a shared expert (GraniteMoeShared) is not supported",
                    ));
                }
                for (k, hf) in [
                    ("embedding_scale", "embedding_multiplier"),
                    ("residual_scale", "residual_multiplier"),
                    ("attention.scale", "attention_multiplier"),
                    ("logit_scale", "logits_scaling"),
                ] {
                    if let Some(x) = g.float(&key(k))? {
                        set(&mut c, hf, json!(x));
                    }
                }
            }
        }
        Family::Olmoe => {
            set(&mut c, "num_experts", json!(need(experts, "expert_count")?));
            set(
                &mut c,
                "num_experts_per_tok",
                json!(need(used, "expert_used_count")?),
            );
            set(
                &mut c,
                "intermediate_size",
                json!(need(ff, "feed_forward_length")?),
            );
            set(&mut c, "norm_topk_prob", json!(false));
        }
        Family::Qwen2Moe | Family::Qwen3Moe => {
            let e = need(experts, "expert_count")?;
            let k = need(used, "expert_used_count")?;
            set(&mut c, "num_experts", json!(e));
            set(&mut c, "num_experts_per_tok", json!(k));
            let moe = match g.uint(&key("expert_feed_forward_length"))? {
                Some(f) => f,
                None => need(ff, "feed_forward_length")? / k.max(1),
            };
            set(&mut c, "moe_intermediate_size", json!(moe));
            if let Some(f) = ff {
                set(&mut c, "intermediate_size", json!(f));
            }
            // Layers without a router are dense.
            let dense: Vec<usize> = (0..layers)
                .filter(|l| !has(&format!("blk.{l}.ffn_gate_inp.weight")))
                .collect();
            set(&mut c, "mlp_only_layers", json!(dense));
            set(&mut c, "norm_topk_prob", json!(family == Family::Qwen3Moe));
            if family == Family::Qwen2Moe {
                let fs = match g.uint(&key("expert_shared_feed_forward_length"))? {
                    Some(f) => f,
                    None => need(ff, "feed_forward_length")?,
                };
                set(&mut c, "shared_expert_intermediate_size", json!(fs));
                set(&mut c, "qkv_bias", json!(has("blk.0.attn_q.bias")));
            }
        }
        Family::Llama | Family::Qwen2 | Family::Qwen3 => {
            set(
                &mut c,
                "intermediate_size",
                json!(need(ff, "feed_forward_length")?),
            );
            if family == Family::Qwen2 {
                set(&mut c, "qkv_bias", json!(has("blk.0.attn_q.bias")));
            }
        }
        Family::Mistral => unreachable!("no GGUF architecture maps to mistral"),
    }
    Ok((family, permuted, c))
}

/// ggml's name of every parameter's tensors, and how they make it.
fn gguf_recipe(cfg: &ModelConfig, id: ParamId, spec: &ParamSpec) -> Recipe {
    let s = spec.shape.as_slice();
    let copy = |n: String| Recipe {
        op: Op::Copy,
        sources: vec![(n, s.to_vec())],
    };
    let linear = |n: String| Recipe {
        op: Op::Cols,
        sources: vec![(n, vec![s[1], s[0]])],
    };
    let (l, p) = match id {
        ParamId::Wte => return copy("token_embd.weight".into()),
        ParamId::Wpe => return copy("(learned positions)".into()),
        ParamId::NormF => return copy("output_norm.weight".into()),
        ParamId::WOut => return linear("output.weight".into()),
        ParamId::Block(l, p) => (l, p),
    };
    let blk = |rest: &str| format!("blk.{l}.{rest}");
    let (d, qw) = (cfg.d, cfg.q_width());
    let kw = cfg.kv_heads() * cfg.head_dim();
    // One [out, in] Linear per expert (a dense FFN, a shared expert).
    let one = |n: String| Recipe {
        op: Op::Experts,
        sources: vec![(n, vec![s[2], s[1]])],
    };
    // A merged bank [E, out, in].
    let bank = |n: String| Recipe {
        op: Op::Bank {
            start: 0,
            len: s[2],
        },
        sources: vec![(n, vec![s[0], s[2], s[1]])],
    };
    let proj = |p: BlockParam| match p {
        BlockParam::W1 | BlockParam::SharedW1 => "gate",
        BlockParam::W3 | BlockParam::SharedW3 => "up",
        _ => "down",
    };
    match p {
        BlockParam::Norm1 => copy(blk("attn_norm.weight")),
        BlockParam::Norm2 => copy(blk("ffn_norm.weight")),
        BlockParam::Wqkv => Recipe {
            op: Op::Cols,
            sources: vec![
                (blk("attn_q.weight"), vec![qw, d]),
                (blk("attn_k.weight"), vec![kw, d]),
                (blk("attn_v.weight"), vec![kw, d]),
            ],
        },
        BlockParam::Bqkv => Recipe {
            op: Op::Concat,
            sources: vec![
                (blk("attn_q.bias"), vec![qw]),
                (blk("attn_k.bias"), vec![kw]),
                (blk("attn_v.bias"), vec![kw]),
            ],
        },
        BlockParam::QNorm => copy(blk("attn_q_norm.weight")),
        BlockParam::KNorm => copy(blk("attn_k_norm.weight")),
        BlockParam::Wo => linear(blk("attn_output.weight")),
        BlockParam::Router => match cfg.kind(l) {
            FfnKind::Moe => linear(blk("ffn_gate_inp.weight")),
            FfnKind::Dense => Recipe {
                op: Op::Zeros,
                sources: Vec::new(),
            },
        },
        BlockParam::W1 | BlockParam::W3 | BlockParam::W2 => match cfg.kind(l) {
            FfnKind::Moe => bank(blk(&format!("ffn_{}_exps.weight", proj(p)))),
            FfnKind::Dense => one(blk(&format!("ffn_{}.weight", proj(p)))),
        },
        BlockParam::SharedGate => linear(blk("ffn_gate_inp_shexp.weight")),
        BlockParam::SharedW1 | BlockParam::SharedW3 | BlockParam::SharedW2 => {
            one(blk(&format!("ffn_{}_shexp.weight", proj(p))))
        }
    }
}

/// The pre-tokenizer regexes llama.cpp compiles in for the names
/// `tokenizer.ggml.pre` takes (llama-vocab.cpp).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.json` of a GGUF file's byte-level BPE vocabulary, and its
/// end-of-sequence ids (eos, then eot when it differs).
pub fn gguf_tokenizer(g: &Gguf) -> Result<(String, Vec<u32>)> {
    let model = g.str("tokenizer.ggml.model")?.unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(g.err(format!(
            "tokenizer.ggml.model {model:?}: amoe reads byte-level BPE vocabularies (\"gpt2\") \
             from GGUF; for this one, load the model's Hugging Face directory (its \
             tokenizer.json) instead"
        )));
    }
    let list = |key: &str| -> Result<&Vec<Value>> {
        match g.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(g.err(format!("{key}: {} is not an array", v.describe()))),
            None => Err(g.err(format!("metadata {key} is missing"))),
        }
    };
    let tokens: Vec<&str> = list("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| g.err("tokenizer.ggml.tokens holds a non-string"))
        })
        .collect::<Result<_>>()?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(_) => list("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| g.err("tokenizer.ggml.token_type holds a non-integer"))
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(g.err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(g.err(format!(
                "tokenizer.ggml.tokens: token {tok:?} appears twice (ids must be unique)"
            )));
        }
        // CONTROL (3) and USER_DEFINED (4) tokens match as a whole.
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3}),
            );
        }
    }
    let merges: Vec<Json> = match g.get("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(_) => list("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let m = v
                    .as_str()
                    .ok_or_else(|| g.err("tokenizer.ggml.merges holds a non-string"))?;
                // Split at the first space after the first character.
                let at = m
                    .char_indices()
                    .skip(1)
                    .find(|(_, c)| *c == ' ')
                    .map(|(i, _)| i)
                    .ok_or_else(|| g.err(format!("tokenizer.ggml.merges: {m:?} has no space")))?;
                Ok(json!([&m[..at], &m[at + 1..]]))
            })
            .collect::<Result<_>>()?,
    };
    let pre = g.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" | "mpt" | "jais" => (byte_level(true), false),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
            true,
        ),
        "refact" | "starcoder" | "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        other => {
            return Err(g.err(format!(
                "tokenizer.ggml.pre {other:?} is not one amoe knows (gpt-2, olmo, qwen2, llama3, \
                 refact, starcoder, smollm): load the model's Hugging Face directory instead"
            )))
        }
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    });
    let mut eos = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = g.uint(key)? {
            let id = u32::try_from(id).map_err(|_| g.err(format!("{key}: {id}")))?;
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    Ok((tokenizer.to_string(), eos))
}

/// A GGUF file's model: config, tokenizer, and its tensors mapped onto
/// the parameter tree (read lazily, dequantized when uploaded).
pub fn load_gguf(source: &str, file: FileBytes) -> Result<HfModel> {
    let g = parse_gguf(source, file)?;
    let (family, permuted, config) = gguf_config(&g)?;
    let (_, cfg) = parse_config(
        &format!("{source} (metadata)"),
        config.to_string().as_bytes(),
    )?;
    let (tok_json, eos) = gguf_tokenizer(&g)?;
    if let Some(&bad) = eos.iter().find(|&&id| id as usize >= cfg.vocab) {
        return Err(g.err(format!(
            "end-of-sequence id {bad} is outside the vocabulary of {}",
            cfg.vocab
        )));
    }
    let tokenizer = Tokenizer::from_pretrained_json(&tok_json, eos.first().copied())
        .map_err(|e| g.err(format!("tokenizer metadata: {e}")))?;
    if tokenizer.vocab_size() > cfg.vocab {
        return Err(g.err(format!(
            "{} tokens, more than the model's vocabulary of {}",
            tokenizer.vocab_size(),
            cfg.vocab
        )));
    }
    let (q_heads, kv_heads) = (cfg.heads, cfg.kv_heads());
    let tensors = g
        .tensors
        .iter()
        .map(|t| {
            let mut raw = g.raw(t);
            if t.name.ends_with("ffn_gate_inp_shexp.weight") && raw.shape.len() == 1 {
                // A one-output Linear [1, D], stored as a vector.
                raw.shape.insert(0, 1);
            }
            if permuted {
                let heads = if t.name.ends_with("attn_q.weight") || t.name.ends_with("attn_q.bias")
                {
                    Some(q_heads)
                } else if t.name.ends_with("attn_k.weight") || t.name.ends_with("attn_k.bias") {
                    Some(kv_heads)
                } else {
                    None
                };
                if let Some(h) = heads {
                    raw = raw.unpermuted(h);
                }
            }
            raw
        })
        .collect();
    let specs = cfg.param_specs();
    let recipes = specs.map(|id, spec| gguf_recipe(&cfg, id, spec));
    let params = super::hf::assign_recipes(
        &format!(
            "the {} model its metadata describes",
            g.str("general.architecture")?.unwrap_or("?")
        ),
        &cfg,
        source,
        tensors,
        recipes,
        Vec::new(),
    )?;
    let bos = g
        .uint("tokenizer.ggml.bos_token_id")?
        .and_then(|b| u32::try_from(b).ok());
    Ok(HfModel {
        family,
        cfg,
        params,
        eos,
        bos,
        tokenizer,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GGUF writer for tests: metadata as (key, type id, value bytes),
    /// tensors as (name, row-major shape, ggml type id, data).
    pub(crate) struct Writer {
        kv: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    impl Writer {
        pub(crate) fn new(arch: &str) -> Self {
            let mut w = Writer {
                kv: Vec::new(),
                tensors: Vec::new(),
            };
            w.str("general.architecture", arch);
            w
        }

        pub(crate) fn u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.kv.push((key.into(), 4, v.to_le_bytes().to_vec()));
            self
        }

        pub(crate) fn f32(&mut self, key: &str, v: f32) -> &mut Self {
            self.kv.push((key.into(), 6, v.to_le_bytes().to_vec()));
            self
        }

        pub(crate) fn str(&mut self, key: &str, v: &str) -> &mut Self {
            self.kv.push((key.into(), 8, string(v)));
            self
        }

        pub(crate) fn strs(&mut self, key: &str, v: &[&str]) -> &mut Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            for s in v {
                b.extend(string(s));
            }
            self.kv.push((key.into(), 9, b));
            self
        }

        pub(crate) fn f32_tensor(
            &mut self,
            name: &str,
            shape: &[usize],
            data: &[f32],
        ) -> &mut Self {
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.tensors.push((name.into(), shape.to_vec(), 0, bytes));
            self
        }

        pub(crate) fn raw_tensor(
            &mut self,
            name: &str,
            shape: &[usize],
            ty: u32,
            bytes: Vec<u8>,
        ) -> &mut Self {
            self.tensors.push((name.into(), shape.to_vec(), ty, bytes));
            self
        }

        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend((self.tensors.len() as u64).to_le_bytes());
            b.extend((self.kv.len() as u64).to_le_bytes());
            for (k, ty, v) in &self.kv {
                b.extend(string(k));
                b.extend(ty.to_le_bytes());
                b.extend(v);
            }
            let mut offset = 0u64;
            for (name, shape, ty, data) in &self.tensors {
                b.extend(string(name));
                b.extend((shape.len() as u32).to_le_bytes());
                for d in shape.iter().rev() {
                    b.extend((*d as u64).to_le_bytes());
                }
                b.extend(ty.to_le_bytes());
                b.extend(offset.to_le_bytes());
                offset += (data.len() as u64).div_ceil(32) * 32;
            }
            b.resize(b.len().div_ceil(32) * 32, 0);
            for (.., data) in &self.tensors {
                b.extend(data);
                b.resize(b.len().div_ceil(32) * 32, 0);
            }
            b
        }
    }

    fn parse(bytes: Vec<u8>) -> Result<Gguf> {
        parse_gguf("m.gguf", FileBytes::new(bytes))
    }

    #[test]
    fn the_container_reads_metadata_and_tensors() {
        let mut w = Writer::new("qwen3moe");
        w.u32("qwen3moe.block_count", 2)
            .f32("x.eps", 1e-6)
            .strs("tokenizer.ggml.tokens", &["a", "b"]);
        w.f32_tensor("t", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        w.f32_tensor("u", &[4], &[0.5; 4]);
        let g = parse(w.bytes()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("qwen3moe.block_count"), Some(&Value::Int(2)));
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("qwen3moe")
        );
        assert_eq!(g.get("x.eps").and_then(Value::as_f64), Some(1e-6f32 as f64));
        let t = g.tensor("t").unwrap();
        assert_eq!((t.shape.clone(), t.ty), (vec![2, 3], GgmlType::F32));
        assert_eq!(g.raw(t).values(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(g.raw(g.tensor("u").unwrap()).values(), [0.5; 4]);
    }

    /// Every prefix of a valid file, and seeded random corruptions of it,
    /// give an error or a file, never a panic or a huge allocation.
    #[test]
    fn truncated_and_corrupt_files_are_errors_not_panics() {
        let mut w = Writer::new("olmoe");
        w.u32("olmoe.block_count", 1)
            .strs("tokenizer.ggml.tokens", &["x", "yz"]);
        w.f32_tensor("t", &[2, 2], &[1.0; 4]);
        let mut q = vec![0u8; 34];
        q[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        w.raw_tensor("q", &[32], 8, q);
        let good = w.bytes();
        parse(good.clone()).unwrap();
        for n in 0..good.len() {
            let r = parse(good[..n].to_vec());
            // Only the zero padding after the last tensor may be cut.
            assert!(r.is_err() || n >= good.len() - 32, "prefix {n}");
        }
        let mut rng = crate::util::Rng::new(7);
        let mut cases = 0;
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] = rng.below(256) as u8;
            }
            if let Ok(g) = parse(b) {
                // A parsed file's tensors all lie within it and decode.
                for t in &g.tensors {
                    let _ = g.raw(t).values();
                }
            }
            cases += 1;
        }
        assert_eq!(cases, 3000);
        // A zero dimension beside huge ones (their product would overflow).
        let mut w = Writer::new("olmoe");
        w.raw_tensor("z", &[1 << 62, 1 << 62, 0], 0, Vec::new());
        let m = parse(w.bytes()).unwrap_err().to_string();
        assert!(m.contains("hold more values than the file"), "{m}");
        let msg = |bytes: Vec<u8>| parse(bytes).unwrap_err().to_string();
        assert!(msg(b"GGML".to_vec()).contains("not a GGUF file"));
        let mut v = good.clone();
        v[4] = 1;
        assert!(msg(v).contains("version 1"));
        // A lying tensor count.
        let mut v = good.clone();
        v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(msg(v).contains("tensor count"));
    }

    #[test]
    fn unsupported_types_and_bad_shapes_are_named() {
        let mut w = Writer::new("olmoe");
        w.raw_tensor("blk.0.ffn_down_exps.weight", &[32], 16, vec![0; 66]);
        let m = parse(w.bytes()).unwrap_err().to_string();
        assert!(m.contains("blk.0.ffn_down_exps.weight is IQ2_XXS"), "{m}");
        let mut w = Writer::new("olmoe");
        w.raw_tensor("w", &[2, 48], 8, vec![0; 34 * 3]);
        let m = parse(w.bytes()).unwrap_err().to_string();
        assert!(
            m.contains("rows of 48 values are not whole Q8_0 blocks"),
            "{m}"
        );
        let mut w = Writer::new("olmoe");
        w.raw_tensor("w", &[4, 32], 8, vec![0; 34]);
        let m = parse(w.bytes()).unwrap_err().to_string();
        assert!(m.contains("run past the end of the file"), "{m}");
        let mut w = Writer::new("gpt2");
        w.u32("gpt2.block_count", 1);
        let g = parse(w.bytes()).unwrap();
        let m = gguf_config(&g).unwrap_err().to_string();
        assert!(m.contains("\"gpt2\" is not supported"), "{m}");
    }

    /// Q/K rows as llama.cpp permutes them are read back in order.
    #[test]
    fn permuted_rows_read_back_in_the_original_order() {
        // 2 heads of 4 rows, 3 columns: row r holds r.
        let rows: Vec<f32> = (0..8).flat_map(|r| [r as f32; 3]).collect();
        // The converter's permute: within a head, original row a*2+b goes
        // to 2b+a.
        let mut stored = vec![0.0; 24];
        for h in 0..2 {
            for a in 0..2 {
                for b in 0..2 {
                    let (orig, to) = (h * 4 + a * 2 + b, h * 4 + 2 * b + a);
                    stored[to * 3..to * 3 + 3].copy_from_slice(&rows[orig * 3..orig * 3 + 3]);
                }
            }
        }
        let mut w = Writer::new("llama");
        w.f32_tensor("q", &[8, 3], &stored);
        let g = parse(w.bytes()).unwrap();
        let raw = g.raw(g.tensor("q").unwrap());
        assert_eq!(raw.values(), stored);
        assert_eq!(raw.unpermuted(2).values(), rows);
    }
}
