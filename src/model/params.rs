//! The model's parameters as a typed tree: `Params<T>` holds one `T` per
//! parameter (host values, GPU tensors, gradients, AdamW moments, shapes),
//! in fields named for what they are, so that code reaches a parameter by a
//! field (`params.blocks[l].wqkv`), never by a formatted string.
//!
//! One order, the canonical one, is used wherever parameters are visited in
//! sequence (initialization draws, the gradient norm's partial sums, AdamW,
//! checkpoint files): [`Params::iter`]. Names appear only at the file edge:
//! [`ParamId::name`] and [`ParamId::parse`] are amoe's own safetensors names
//! (`wte`, `layers.3.ffn.w1`, ...); other formats map their names onto the
//! same [`ParamId`]s.

use crate::error::{Error, Result};
use crate::gpu::{is_16_bit, Dtype, F16_MAX};
use std::fmt;

/// A parameter of one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockParam {
    /// norm1 [D]: the attention's RMSNorm gain.
    Norm1,
    /// wqkv [D, (H + 2 Hkv) Dh]: the q, k and v projections side by side.
    Wqkv,
    /// bqkv [(H + 2 Hkv) Dh]: their biases (Qwen2).
    Bqkv,
    /// q_norm [Dh] (per head) or [H Dh] (whole projection): QK-norm gain.
    QNorm,
    /// k_norm [Dh] or [Hkv Dh]
    KNorm,
    /// wo [H Dh, D]
    Wo,
    /// norm2 [D]: the FFN's RMSNorm gain.
    Norm2,
    /// w_router [D, E] (E = 1 for a dense FFN).
    Router,
    /// w1 [E, D, F]
    W1,
    /// w3 [E, D, F]: SwiGLU's second input projection.
    W3,
    /// w2 [E, F, D]
    W2,
    /// The shared expert (Qwen2-MoE): its sigmoid gate [D, 1] and its
    /// weights w1, w3 [1, D, Fs], w2 [1, Fs, D].
    SharedGate,
    SharedW1,
    SharedW3,
    SharedW2,
}

impl BlockParam {
    fn suffix(self) -> &'static str {
        match self {
            BlockParam::Norm1 => "norm1",
            BlockParam::Wqkv => "wqkv",
            BlockParam::Bqkv => "bqkv",
            BlockParam::QNorm => "q_norm",
            BlockParam::KNorm => "k_norm",
            BlockParam::Wo => "wo",
            BlockParam::Norm2 => "norm2",
            BlockParam::Router => "ffn.w_router",
            BlockParam::W1 => "ffn.w1",
            BlockParam::W3 => "ffn.w3",
            BlockParam::W2 => "ffn.w2",
            BlockParam::SharedGate => "shared.w_router",
            BlockParam::SharedW1 => "shared.w1",
            BlockParam::SharedW3 => "shared.w3",
            BlockParam::SharedW2 => "shared.w2",
        }
    }

    const ALL: [BlockParam; 15] = [
        BlockParam::Norm1,
        BlockParam::Wqkv,
        BlockParam::Bqkv,
        BlockParam::QNorm,
        BlockParam::KNorm,
        BlockParam::Wo,
        BlockParam::Norm2,
        BlockParam::Router,
        BlockParam::W1,
        BlockParam::W3,
        BlockParam::W2,
        BlockParam::SharedGate,
        BlockParam::SharedW1,
        BlockParam::SharedW3,
        BlockParam::SharedW2,
    ];

    /// An expert weight of the routed FFN (w1, w3, w2).
    pub fn is_expert(self) -> bool {
        matches!(self, BlockParam::W1 | BlockParam::W3 | BlockParam::W2)
    }
}

/// Which parameter: the typed identity behind every name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamId {
    /// wte [V, D]: token embeddings.
    Wte,
    /// wpe [N, D]: learned position embeddings (none with rotary ones).
    Wpe,
    /// A parameter of block `l`.
    Block(usize, BlockParam),
    /// norm_f [D]: the final RMSNorm gain.
    NormF,
    /// w_out [D, V]: the unembedding (none when tied to wte).
    WOut,
}

impl ParamId {
    /// amoe's own name of the parameter (the key in `model.safetensors`).
    pub fn name(self) -> String {
        self.to_string()
    }

    /// The parameter called `name` in amoe's own files; `None` for any
    /// other name (never a guess).
    pub fn parse(name: &str) -> Option<ParamId> {
        match name {
            "wte" => return Some(ParamId::Wte),
            "wpe" => return Some(ParamId::Wpe),
            "norm_f" => return Some(ParamId::NormF),
            "w_out" => return Some(ParamId::WOut),
            _ => {}
        }
        let rest = name.strip_prefix("layers.")?;
        let (l, suffix) = rest.split_once('.')?;
        // "01" or "+1" would not round-trip: only the canonical spelling.
        if l.is_empty()
            || !l.bytes().all(|b| b.is_ascii_digit())
            || (l.len() > 1 && l.starts_with('0'))
        {
            return None;
        }
        let l: usize = l.parse().ok()?;
        let p = BlockParam::ALL.into_iter().find(|p| p.suffix() == suffix)?;
        Some(ParamId::Block(l, p))
    }

    /// Whether the parameter is a matrix a matmul reads (the embedding and
    /// unembedding, the attention projections, the experts): what f16
    /// storage covers. Gains, biases, routers and learned positions stay
    /// f32 (small, and the router decides the routing).
    pub fn is_matmul_weight(self) -> bool {
        match self {
            ParamId::Wte | ParamId::WOut => true,
            ParamId::Wpe | ParamId::NormF => false,
            ParamId::Block(_, p) => matches!(
                p,
                BlockParam::Wqkv
                    | BlockParam::Wo
                    | BlockParam::W1
                    | BlockParam::W3
                    | BlockParam::W2
                    | BlockParam::SharedW1
                    | BlockParam::SharedW3
                    | BlockParam::SharedW2
            ),
        }
    }

    /// Whether this is a dense matmul weight that `--quantize all` stores
    /// block-quantized: the attention projections and an untied
    /// unembedding. (A tied one is the token table, which the embedding
    /// lookup reads in floats.)
    pub fn is_projection(self) -> bool {
        matches!(
            self,
            ParamId::WOut | ParamId::Block(_, BlockParam::Wqkv | BlockParam::Wo)
        )
    }

    /// Whether this is an expert bank [E, ..] (routed or shared experts'
    /// w1, w3, w2): what `--quantize-on-load` stores block-quantized.
    pub fn is_expert_bank(self) -> bool {
        matches!(
            self,
            ParamId::Block(
                _,
                BlockParam::W1
                    | BlockParam::W3
                    | BlockParam::W2
                    | BlockParam::SharedW1
                    | BlockParam::SharedW3
                    | BlockParam::SharedW2
            )
        )
    }

    /// Whether AdamW's decoupled weight decay applies (matrices; not gains,
    /// embeddings or the router).
    pub fn decay(self) -> bool {
        match self {
            ParamId::Wte | ParamId::Wpe | ParamId::NormF => false,
            ParamId::WOut => true,
            ParamId::Block(_, p) => !matches!(
                p,
                BlockParam::Norm1
                    | BlockParam::Norm2
                    | BlockParam::Router
                    | BlockParam::Bqkv
                    | BlockParam::QNorm
                    | BlockParam::KNorm
                    | BlockParam::SharedGate
            ),
        }
    }
}

impl fmt::Display for ParamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamId::Wte => f.write_str("wte"),
            ParamId::Wpe => f.write_str("wpe"),
            ParamId::NormF => f.write_str("norm_f"),
            ParamId::WOut => f.write_str("w_out"),
            ParamId::Block(l, p) => write!(f, "layers.{l}.{}", p.suffix()),
        }
    }
}

/// The parameters of `$p` in canonical order, as `(ParamId, &T)`,
/// `(ParamId, &mut T)` or `(ParamId, T)` (`canonical!(self, &)`,
/// `canonical!(self, &mut)`, `canonical!(self,)`): the one place that
/// spells the order out.
macro_rules! canonical {
    ($p:ident, $($m:tt)*) => {{
        let mut out = Vec::with_capacity(4 + 8 * $p.blocks.len());
        out.push((ParamId::Wte, $($m)* $p.wte));
        if let Some(wpe) = $($m)* $p.wpe {
            out.push((ParamId::Wpe, wpe));
        }
        for (l, b) in ($($m)* $p.blocks).into_iter().enumerate() {
            let id = |p| ParamId::Block(l, p);
            out.push((id(BlockParam::Norm1), $($m)* b.norm1));
            out.push((id(BlockParam::Wqkv), $($m)* b.wqkv));
            if let Some(t) = $($m)* b.bqkv {
                out.push((id(BlockParam::Bqkv), t));
            }
            if let Some(t) = $($m)* b.q_norm {
                out.push((id(BlockParam::QNorm), t));
            }
            if let Some(t) = $($m)* b.k_norm {
                out.push((id(BlockParam::KNorm), t));
            }
            out.push((id(BlockParam::Wo), $($m)* b.wo));
            out.push((id(BlockParam::Norm2), $($m)* b.norm2));
            out.push((id(BlockParam::Router), $($m)* b.ffn.w_router));
            out.push((id(BlockParam::W1), $($m)* b.ffn.w1));
            if let Some(w3) = $($m)* b.ffn.w3 {
                out.push((id(BlockParam::W3), w3));
            }
            out.push((id(BlockParam::W2), $($m)* b.ffn.w2));
            if let Some(sh) = $($m)* b.shared {
                out.push((id(BlockParam::SharedGate), $($m)* sh.w_router));
                out.push((id(BlockParam::SharedW1), $($m)* sh.w1));
                if let Some(w3) = $($m)* sh.w3 {
                    out.push((id(BlockParam::SharedW3), w3));
                }
                out.push((id(BlockParam::SharedW2), $($m)* sh.w2));
            }
        }
        out.push((ParamId::NormF, $($m)* $p.norm_f));
        if let Some(w_out) = $($m)* $p.w_out {
            out.push((ParamId::WOut, w_out));
        }
        out.into_iter()
    }};
}

/// The FFN of one block (an MoE layer, or a dense FFN as one expert).
#[derive(Clone, Debug, PartialEq)]
pub struct FfnParams<T> {
    pub w_router: T,
    pub w1: T,
    /// SwiGLU only.
    pub w3: Option<T>,
    pub w2: T,
}

/// One pre-norm transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockParams<T> {
    pub norm1: T,
    pub wqkv: T,
    /// q/k/v biases (Qwen2 families).
    pub bqkv: Option<T>,
    /// QK-norm gains (Qwen3: per head; OLMoE: whole projection).
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    pub wo: T,
    pub norm2: T,
    pub ffn: FfnParams<T>,
    /// The sigmoid-gated shared expert (Qwen2-MoE), beside the routed ones.
    pub shared: Option<FfnParams<T>>,
}

/// Every parameter of the model, one `T` each.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    pub wte: T,
    /// Learned positions; None with rotary ones.
    pub wpe: Option<T>,
    pub blocks: Vec<BlockParams<T>>,
    pub norm_f: T,
    /// The unembedding [D, V]; None when tied to `wte` (read as `wteᵀ`).
    pub w_out: Option<T>,
}

fn try_map_opt<T, U>(
    t: &Option<T>,
    id: ParamId,
    f: &mut impl FnMut(ParamId, &T) -> Result<U>,
) -> Result<Option<U>> {
    t.as_ref().map(|t| f(id, t)).transpose()
}

impl<T> FfnParams<T> {
    fn try_map<U>(
        &self,
        ids: [ParamId; 4],
        f: &mut impl FnMut(ParamId, &T) -> Result<U>,
    ) -> Result<FfnParams<U>> {
        let w_router = f(ids[0], &self.w_router)?;
        let w1 = f(ids[1], &self.w1)?;
        let w3 = try_map_opt(&self.w3, ids[2], f)?;
        let w2 = f(ids[3], &self.w2)?;
        Ok(FfnParams {
            w_router,
            w1,
            w3,
            w2,
        })
    }
}

impl<T> BlockParams<T> {
    fn try_map<U>(
        &self,
        l: usize,
        f: &mut impl FnMut(ParamId, &T) -> Result<U>,
    ) -> Result<BlockParams<U>> {
        let id = |p| ParamId::Block(l, p);
        // Explicit lets: the calls run in canonical order.
        let norm1 = f(id(BlockParam::Norm1), &self.norm1)?;
        let wqkv = f(id(BlockParam::Wqkv), &self.wqkv)?;
        let bqkv = try_map_opt(&self.bqkv, id(BlockParam::Bqkv), f)?;
        let q_norm = try_map_opt(&self.q_norm, id(BlockParam::QNorm), f)?;
        let k_norm = try_map_opt(&self.k_norm, id(BlockParam::KNorm), f)?;
        let wo = f(id(BlockParam::Wo), &self.wo)?;
        let norm2 = f(id(BlockParam::Norm2), &self.norm2)?;
        let ffn = self.ffn.try_map(
            [
                id(BlockParam::Router),
                id(BlockParam::W1),
                id(BlockParam::W3),
                id(BlockParam::W2),
            ],
            f,
        )?;
        let shared = match &self.shared {
            Some(sh) => Some(sh.try_map(
                [
                    id(BlockParam::SharedGate),
                    id(BlockParam::SharedW1),
                    id(BlockParam::SharedW3),
                    id(BlockParam::SharedW2),
                ],
                f,
            )?),
            None => None,
        };
        Ok(BlockParams {
            norm1,
            wqkv,
            bqkv,
            q_norm,
            k_norm,
            wo,
            norm2,
            ffn,
            shared,
        })
    }

    fn get(&self, p: BlockParam) -> Option<&T> {
        Some(match p {
            BlockParam::Norm1 => &self.norm1,
            BlockParam::Wqkv => &self.wqkv,
            BlockParam::Bqkv => return self.bqkv.as_ref(),
            BlockParam::QNorm => return self.q_norm.as_ref(),
            BlockParam::KNorm => return self.k_norm.as_ref(),
            BlockParam::Wo => &self.wo,
            BlockParam::Norm2 => &self.norm2,
            BlockParam::Router => &self.ffn.w_router,
            BlockParam::W1 => &self.ffn.w1,
            BlockParam::W3 => return self.ffn.w3.as_ref(),
            BlockParam::W2 => &self.ffn.w2,
            BlockParam::SharedGate => &self.shared.as_ref()?.w_router,
            BlockParam::SharedW1 => &self.shared.as_ref()?.w1,
            BlockParam::SharedW3 => return self.shared.as_ref()?.w3.as_ref(),
            BlockParam::SharedW2 => &self.shared.as_ref()?.w2,
        })
    }
}

impl<T> Params<T> {
    /// Every parameter with its id, in canonical order: wte, (wpe), then
    /// per block norm1, wqkv, (bqkv, q_norm, k_norm), wo, norm2, w_router,
    /// w1, (w3), w2, (the shared expert's gate, w1, w3, w2), then norm_f
    /// and (w_out). Parameters a model does not have are skipped.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (ParamId, &T)> + '_ {
        canonical!(self, &)
    }

    /// Every parameter with its id, mutable, in canonical order.
    pub fn iter_mut(&mut self) -> impl ExactSizeIterator<Item = (ParamId, &mut T)> + '_ {
        canonical!(self, &mut)
    }

    /// The values alone, mutable, in canonical order.
    pub fn values_mut(&mut self) -> impl ExactSizeIterator<Item = &mut T> + '_ {
        self.iter_mut().map(|(_, t)| t)
    }

    /// The values alone, in canonical order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &T> + '_ {
        self.iter().map(|(_, t)| t)
    }

    /// Parameters in the tree.
    pub fn len(&self) -> usize {
        self.iter().len()
    }

    /// Never true for a model (it has embeddings), kept for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The parameter `id`, if this model has it.
    pub fn get(&self, id: ParamId) -> Option<&T> {
        match id {
            ParamId::Wte => Some(&self.wte),
            ParamId::Wpe => self.wpe.as_ref(),
            ParamId::NormF => Some(&self.norm_f),
            ParamId::WOut => self.w_out.as_ref(),
            ParamId::Block(l, p) => self.blocks.get(l)?.get(p),
        }
    }

    /// A tree of the same shape, `f` called in canonical order.
    pub fn try_map<U>(&self, mut f: impl FnMut(ParamId, &T) -> Result<U>) -> Result<Params<U>> {
        let wte = f(ParamId::Wte, &self.wte)?;
        let wpe = try_map_opt(&self.wpe, ParamId::Wpe, &mut f)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (l, b) in self.blocks.iter().enumerate() {
            blocks.push(b.try_map(l, &mut f)?);
        }
        let norm_f = f(ParamId::NormF, &self.norm_f)?;
        let w_out = try_map_opt(&self.w_out, ParamId::WOut, &mut f)?;
        Ok(Params {
            wte,
            wpe,
            blocks,
            norm_f,
            w_out,
        })
    }

    /// The values, owned, in canonical order.
    pub fn into_values(self) -> Vec<T> {
        canonical!(self,).map(|(_, t)| t).collect()
    }

    /// A tree of the same shape, `f` called in canonical order on the
    /// owned values (no copy of them).
    pub fn into_map<U>(self, mut f: impl FnMut(ParamId, T) -> U) -> Params<U> {
        let shape = self.map(|_, _| ());
        let mut values = self.into_values().into_iter();
        shape.map(|id, ()| match values.next() {
            Some(v) => f(id, v),
            None => unreachable!("a tree has as many values as parameters"),
        })
    }

    /// A tree of the same shape, `f` called in canonical order.
    pub fn map<U>(&self, mut f: impl FnMut(ParamId, &T) -> U) -> Params<U> {
        match self.try_map(|id, t| Ok(f(id, t))) {
            Ok(p) => p,
            Err(_) => unreachable!("an infallible map failed"),
        }
    }
}

/// What a parameter is before it has values: its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One parameter's values on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// How the user asks for the matmul weights to be stored on the GPU
/// (`--dtype`, the page's choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DtypeChoice {
    /// f16 when the checkpoint's matmul weights are 16-bit floats (a
    /// Hugging Face bf16 or f16 file) that f16 holds, f32 otherwise
    /// (amoe's own checkpoints, f32 files).
    #[default]
    Auto,
    F32,
    F16,
}

crate::choice::choice! { DtypeChoice, "dtype",
    Auto = "auto": "f16 for checkpoints stored in 16 bits (bf16/f16 files), else f32",
    F32 = "f32": "f32 weights",
    F16 = "f16": "f16 weights: half the bytes, math still in f32",
}

/// Which weights block quantization covers (`--quantize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QuantScope {
    /// The expert banks (routed and shared experts' w1, w3, w2).
    #[default]
    Experts,
    /// The expert banks, the attention projections and an untied
    /// unembedding ([`ParamId::is_projection`]).
    All,
}

crate::choice::choice! { QuantScope, "quantize scope",
    Experts = "experts": "the expert banks (most of an MoE model's weights)",
    All = "all": "the experts, the attention projections and an untied unembedding",
}

/// The storage the user asks for: `--dtype` for the matmul weights, and
/// `--quantize-on-load` (`quant`) for the expert banks, with `--quantize
/// all` (`scope`) also for the attention projections and an untied
/// unembedding; what it does not cover follows `--dtype`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StorageChoice {
    pub dtype: DtypeChoice,
    pub quant: Option<crate::quant::QuantFormat>,
    pub scope: QuantScope,
}

impl From<DtypeChoice> for StorageChoice {
    fn from(dtype: DtypeChoice) -> Self {
        StorageChoice {
            dtype,
            ..Default::default()
        }
    }
}

/// How a model's weights are stored on the GPU: the expert banks in
/// `experts`, the attention projections and an untied unembedding in
/// `projections` (each the same as `matmul`, or block-quantized), the
/// other matmul weights (the token table) in `matmul`, everything else in
/// f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Storage {
    pub matmul: Dtype,
    pub experts: Dtype,
    pub projections: Dtype,
}

impl From<Dtype> for Storage {
    fn from(d: Dtype) -> Self {
        Storage {
            matmul: d,
            experts: d,
            projections: d,
        }
    }
}

impl Storage {
    /// The storage of parameter `id`.
    pub fn of(&self, id: ParamId) -> Dtype {
        if id.is_expert_bank() {
            self.experts
        } else if id.is_projection() {
            self.projections
        } else if id.is_matmul_weight() {
            self.matmul
        } else {
            Dtype::F32
        }
    }

    /// e.g. `f16`, `f16, experts q4` or `f16, experts and projections q4`.
    pub fn describe(&self) -> String {
        let (m, e, p) = (self.matmul, self.experts, self.projections);
        if e == m && p == m {
            m.to_string()
        } else if e == p {
            format!("{m}, experts and projections {e}")
        } else if p == m {
            format!("{m}, experts {e}")
        } else if e == m {
            format!("{m}, projections {p}")
        } else {
            format!("{m}, experts {e}, projections {p}")
        }
    }
}

/// What the GPU upload needs of one parameter: its shape and its values.
/// [`HostTensor`] holds them; a checkpoint read lazily
/// (`checkpoint::LazyTensor`) makes them from its file when asked, so that
/// loading a model never holds a second copy of it in host memory.
pub trait TensorValues {
    fn shape(&self) -> &[usize];
    /// The values, row-major, as f32 (an error naming the tensor when they
    /// cannot be read).
    fn values(&self) -> Result<std::borrow::Cow<'_, [f32]>>;
    /// Whether every value is exactly a 16-bit float (bf16 or f16) that
    /// f16 holds: `--dtype auto` stores such matmul weights in f16.
    fn fits_f16(&self) -> bool;
    /// The block-quantized format the values are stored in (a checkpoint
    /// written by `amoe quantize`): they then load in that format unless
    /// the user asks for another.
    fn quant(&self) -> Option<crate::quant::QuantFormat> {
        None
    }
}

impl TensorValues for HostTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn values(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        Ok(std::borrow::Cow::Borrowed(&self.data))
    }

    fn fits_f16(&self) -> bool {
        values_fit_f16(&self.data)
    }
}

/// Whether `data` are exactly 16-bit floats within f16's range.
pub fn values_fit_f16(data: &[f32]) -> bool {
    is_16_bit(data) && data.iter().all(|x| x.abs() <= F16_MAX)
}

impl<T: TensorValues> Params<T> {
    /// The storage `choice` resolves to for these weights (f16 is checked
    /// again, value by value, on upload: a value past f16's range is an
    /// error naming the tensor).
    pub fn resolve_dtype(&self, choice: DtypeChoice) -> Dtype {
        match choice {
            DtypeChoice::F32 => Dtype::F32,
            DtypeChoice::F16 => Dtype::F16,
            DtypeChoice::Auto => {
                // Weights stored quantized load in their format, whatever
                // --dtype says: they do not decide it.
                let fits = self
                    .iter()
                    .filter(|(id, t)| id.is_matmul_weight() && t.quant().is_none())
                    .all(|(_, t)| t.fits_f16());
                if fits {
                    Dtype::F16
                } else {
                    Dtype::F32
                }
            }
        }
    }

    /// The storage `choice` resolves to: [`Params::resolve_dtype`] for the
    /// matmul weights; the expert banks (and with `--quantize all` the
    /// projections) quantized when asked, else in the format a quantized
    /// checkpoint stores them in.
    pub fn resolve_storage(&self, choice: impl Into<StorageChoice>) -> Storage {
        let choice = choice.into();
        let matmul = self.resolve_dtype(choice.dtype);
        let stored = |which: fn(ParamId) -> bool| {
            self.iter()
                .filter(|(id, _)| which(*id))
                .find_map(|(_, t)| t.quant())
        };
        let dtype = |q: Option<crate::quant::QuantFormat>| match q {
            Some(crate::quant::QuantFormat::Q8) => Dtype::Q8,
            Some(crate::quant::QuantFormat::Q4) => Dtype::Q4,
            None => matmul,
        };
        let all = choice.scope == QuantScope::All;
        Storage {
            matmul,
            experts: dtype(choice.quant.or(stored(ParamId::is_expert_bank))),
            projections: dtype(
                choice
                    .quant
                    .filter(|_| all)
                    .or(stored(ParamId::is_projection)),
            ),
        }
    }

    /// Values in total (from the shapes).
    pub fn numel(&self) -> usize {
        self.values()
            .map(|t| t.shape().iter().product::<usize>())
            .sum()
    }

    /// Check the tree against `cfg` (a checkpoint of another model is a
    /// shape error naming the tensor).
    pub fn validate_shapes(&self, cfg: &crate::model::ModelConfig) -> Result<()> {
        let want = cfg.param_specs();
        if want.len() != self.len() {
            return Err(Error::shape(
                "model parameters",
                format!("{} tensors", want.len()),
                format!("{} tensors", self.len()),
            ));
        }
        for ((wid, ws), (id, t)) in want.iter().zip(self.iter()) {
            if wid != id || ws.shape != t.shape() {
                return Err(Error::shape(
                    "model parameters",
                    format!("{wid} {:?}", ws.shape),
                    format!("{id} {:?}", t.shape()),
                ));
            }
        }
        Ok(())
    }
}

impl Params<ParamSpec> {
    /// Put named tensors (from a file, in any order) onto this tree: every
    /// parameter must be there exactly once with its shape, and no other
    /// name. `name_of` maps a parameter to the file's name for it, `file`
    /// names the file in the error, which lists every problem at once.
    pub fn assign<T>(
        &self,
        file: &str,
        tensors: Vec<(String, Vec<usize>, T)>,
        name_of: impl Fn(ParamId) -> String,
    ) -> Result<Params<(Vec<usize>, T)>> {
        let names: Vec<String> = self.iter().map(|(id, _)| name_of(id)).collect();
        // A model of many experts has thousands of tensors: look names up.
        let index: std::collections::HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let mut slots: Vec<Option<(Vec<usize>, T)>> = Vec::new();
        slots.resize_with(names.len(), || None);
        let mut problems = Vec::new();
        for (name, shape, value) in tensors {
            match index.get(name.as_str()).copied() {
                None => problems.push(format!("unexpected tensor {name} {shape:?}")),
                Some(i) if slots[i].is_some() => {
                    problems.push(format!("tensor {name} appears twice"))
                }
                Some(i) => slots[i] = Some((shape, value)),
            }
        }
        for (i, ((_, spec), name)) in self.iter().zip(&names).enumerate() {
            match &slots[i] {
                None => problems.push(format!("missing tensor {name} {:?}", spec.shape)),
                Some((s, _)) if *s != spec.shape => problems.push(format!(
                    "tensor {name}: expected shape {:?}, found {s:?}",
                    spec.shape
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            // A config of 100000 layers against a small file: name the
            // first problems, count the rest (a message stays readable).
            const SHOWN: usize = 20;
            let more = problems.len().saturating_sub(SHOWN);
            let mut list = problems[..problems.len().min(SHOWN)].join("; ");
            if more > 0 {
                list.push_str(&format!("; and {more} more"));
            }
            return Err(Error::checkpoint(
                file,
                format!(
                    "does not match the model's config ({} problem(s)): {list}",
                    problems.len(),
                ),
            ));
        }
        let mut slots = slots.into_iter();
        self.try_map(|id, _| {
            slots
                .next()
                .flatten()
                .ok_or_else(|| Error::invalid("model parameters", format!("{id}: not assigned")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        let ids = [
            ParamId::Wte,
            ParamId::Wpe,
            ParamId::NormF,
            ParamId::WOut,
            ParamId::Block(0, BlockParam::Norm1),
            ParamId::Block(12, BlockParam::W3),
            ParamId::Block(3, BlockParam::Router),
        ];
        for id in ids {
            assert_eq!(ParamId::parse(&id.name()), Some(id), "{id}");
        }
        assert_eq!(ParamId::Block(3, BlockParam::W1).name(), "layers.3.ffn.w1");
        for bad in [
            "layers.0.ffn.w4",
            "layers.0.ffn.",
            "layers.x.norm1",
            "layers.01.norm1",
            "layers.+1.norm1",
            "layers..norm1",
            "layers.0",
            "wte ",
            "model.embed_tokens.weight",
            "",
        ] {
            assert_eq!(ParamId::parse(bad), None, "{bad:?}");
        }
    }

    fn spec_tree() -> Params<ParamSpec> {
        let s = |shape: &[usize]| ParamSpec {
            shape: shape.to_vec(),
        };
        let block = |swiglu: bool| BlockParams {
            norm1: s(&[4]),
            wqkv: s(&[4, 12]),
            bqkv: None,
            q_norm: None,
            k_norm: None,
            wo: s(&[4, 4]),
            norm2: s(&[4]),
            ffn: FfnParams {
                w_router: s(&[4, 2]),
                w1: s(&[2, 4, 3]),
                w3: swiglu.then(|| s(&[2, 4, 3])),
                w2: s(&[2, 3, 4]),
            },
            shared: None,
        };
        Params {
            wte: s(&[7, 4]),
            wpe: Some(s(&[5, 4])),
            blocks: vec![block(false), block(true)],
            norm_f: s(&[4]),
            w_out: Some(s(&[4, 7])),
        }
    }

    #[test]
    fn one_canonical_order_for_every_visit() {
        let mut tree = spec_tree();
        let ids: Vec<ParamId> = tree.iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 4 + 7 + 8);
        assert_eq!(
            &ids[..3],
            &[
                ParamId::Wte,
                ParamId::Wpe,
                ParamId::Block(0, BlockParam::Norm1)
            ]
        );
        assert_eq!(ids[ids.len() - 1], ParamId::WOut);
        let mut_ids: Vec<ParamId> = tree.iter_mut().map(|(id, _)| id).collect();
        assert_eq!(mut_ids, ids);
        let mut seen = Vec::new();
        let mapped = tree.map(|id, _| {
            seen.push(id);
            id.name()
        });
        assert_eq!(seen, ids);
        let names: Vec<String> = mapped.clone().into_values();
        assert_eq!(names, ids.iter().map(|id| id.name()).collect::<Vec<_>>());
        let again = mapped.into_map(|id, name| (id, name));
        assert!(again
            .iter()
            .all(|(id, (id2, name))| id == *id2 && *name == id.name()));
        for id in &ids {
            assert!(tree.get(*id).is_some(), "{id}");
        }
        assert!(tree.get(ParamId::Block(0, BlockParam::W3)).is_none());
        assert!(tree.get(ParamId::Block(2, BlockParam::W1)).is_none());
    }

    #[test]
    fn a_huge_mismatch_is_a_bounded_message() {
        let mut tree = spec_tree();
        let block = tree.blocks[0].clone();
        tree.blocks = vec![block; 1000];
        let msg = tree
            .assign("f", Vec::<(String, Vec<usize>, u8)>::new(), ParamId::name)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("problem(s)") && msg.contains("more"), "{msg}");
        assert!(msg.len() < 2000, "{} bytes", msg.len());
    }

    #[test]
    fn assign_refuses_missing_unexpected_repeated_and_misshapen_tensors() {
        let tree = spec_tree();
        let good: Vec<(String, Vec<usize>, u8)> = tree
            .iter()
            .map(|(id, s)| (id.name(), s.shape.clone(), 1))
            .collect();
        // Any order.
        let mut shuffled = good.clone();
        shuffled.reverse();
        let t = tree.assign("f", shuffled, ParamId::name).unwrap();
        assert_eq!(t.wte, (vec![7, 4], 1));

        let mut bad = good.clone();
        bad.retain(|(n, _, _)| n != "layers.1.ffn.w3");
        bad.push(("layers.1.ffn.w4".into(), vec![1], 0));
        bad.push(("wte".into(), vec![7, 4], 0));
        bad[0].1 = vec![4, 7];
        let msg = tree
            .assign("dir/model.safetensors", bad, ParamId::name)
            .unwrap_err()
            .to_string();
        for want in [
            "dir/model.safetensors",
            "missing tensor layers.1.ffn.w3 [2, 4, 3]",
            "unexpected tensor layers.1.ffn.w4 [1]",
            "tensor wte appears twice",
            "4 problem(s)",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        let mut bad = good;
        bad[1].1 = vec![5, 5];
        let msg = tree
            .assign("f", bad, ParamId::name)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("tensor wpe: expected shape [5, 4], found [5, 5]"),
            "{msg}"
        );
    }
}
