//! Embedding launchers (`shaders/embedding.wgsl`): the token + position
//! lookup `x[t, :] = wte[ids[t], :] + wpe[t % N, :]` and its two backward
//! gathers (`dwte` through the host's counting sort of the ids, `dwpe`), one
//! dispatch each. Twins: `reference::embedding`.
//!
//! The host validates token ids before uploading them (`check_ids`, or
//! `token_order`, which the data loader calls once per batch anyway); the
//! shader only clamps, so that a bad id cannot read out of bounds.

use super::matmul::wgsl_select;
use super::{grid_1d, Kernel, ParamsLayout};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor, WeightRef};
use crate::gpu_params;

/// Invocations per workgroup (one output element each).
pub const EMBEDDING_WG: u32 = 128;

const EMBEDDING_WGSL: &str = include_str!("../../shaders/embedding.wgsl");

/// The three embedding kernels (the forward also with wte stored as f16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmbeddingSpec {
    Forward,
    ForwardF16,
    BackwardWte,
    BackwardWpe,
}

impl EmbeddingSpec {
    /// Kernel name (WGSL entry point, twin, conformance `kernel` field).
    pub fn name(&self) -> &'static str {
        match self {
            EmbeddingSpec::Forward | EmbeddingSpec::ForwardF16 => "embedding_forward",
            EmbeddingSpec::BackwardWte => "embedding_backward_wte",
            EmbeddingSpec::BackwardWpe => "embedding_backward_wpe",
        }
    }

    fn flags(&self) -> &'static [&'static str] {
        match self {
            EmbeddingSpec::Forward => &["forward"],
            EmbeddingSpec::ForwardF16 => &["forward", "w16"],
            EmbeddingSpec::BackwardWte => &["wte"],
            EmbeddingSpec::BackwardWpe => &["wpe"],
        }
    }

    fn bindings(&self) -> Vec<Binding> {
        match self {
            EmbeddingSpec::Forward | EmbeddingSpec::ForwardF16 => vec![
                Binding::Uniform,
                Binding::Read,      // ids [T]
                Binding::Read,      // wte [V, D]
                Binding::Read,      // wpe [N, D]
                Binding::ReadWrite, // x [T, D]
            ],
            EmbeddingSpec::BackwardWte => vec![
                Binding::Uniform,
                Binding::Read,      // dx [T, D]
                Binding::Read,      // offsets [V + 1]
                Binding::Read,      // order [T]
                Binding::ReadWrite, // dwte [V, D]
            ],
            EmbeddingSpec::BackwardWpe => vec![
                Binding::Uniform,
                Binding::Read,      // dx [T, D]
                Binding::ReadWrite, // dwpe [N, D]
            ],
        }
    }

    pub fn def(&self) -> KernelDef {
        let src = wgsl_select(EMBEDDING_WGSL, self.flags());
        let f16 = *self == EmbeddingSpec::ForwardF16;
        KernelDef::new(
            format!("{}{}", self.name(), if f16 { "_f16" } else { "" }),
            &[super::f16_source(f16), &src],
            self.name(),
            &[("WG", EMBEDDING_WG)],
            &self.bindings(),
        )
    }

    pub fn all() -> Vec<Self> {
        vec![
            EmbeddingSpec::Forward,
            EmbeddingSpec::ForwardF16,
            EmbeddingSpec::BackwardWte,
            EmbeddingSpec::BackwardWpe,
        ]
    }
}

gpu_params! {
    /// Mirrors `struct EmbeddingParams` in `shaders/embedding.wgsl`.
    pub struct EmbeddingParams {
        pub t: u32,
        pub v: u32,
        pub n: u32,
        pub d: u32,
        pub nx: u32,
        pub scale: f32,
        pub has_wpe: u32,
        pub v0: u32,
        pub vc: u32,
        pub _pad0: u32,
        pub _pad1: u32,
        pub _pad2: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    EmbeddingSpec::all()
        .into_iter()
        .map(|s| ParamsLayout::of::<EmbeddingParams>(Kernel::Embedding(s)))
        .collect()
}

/// Fail with a typed error naming the first token id that is `>= v`.
pub fn check_ids(ids: &[u32], v: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= v) {
        None => Ok(()),
        Some(t) => Err(Error::invalid(
            "embedding",
            format!(
                "token id {} at position {t} is outside the vocabulary V = {v}",
                ids[t]
            ),
        )),
    }
}

/// Counting sort of the token ids, the index of `embedding_backward_wte`:
/// the tokens of id `v` are `order[offsets[v] .. offsets[v + 1]]`, in
/// ascending position. Returns `(offsets [V + 1], order [T])`; an id `>= v`
/// is a typed error.
pub fn token_order(ids: &[u32], v: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    check_ids(ids, v)?;
    if ids.len() > u32::MAX as usize {
        return Err(Error::Limit {
            what: "embedding: tokens in a batch".into(),
            needed: ids.len() as u64,
            max: u32::MAX as u64,
        });
    }
    let mut offsets = vec![0u32; v + 1];
    for &id in ids {
        offsets[id as usize + 1] += 1;
    }
    for i in 0..v {
        offsets[i + 1] += offsets[i];
    }
    let mut next = offsets.clone();
    let mut order = vec![0u32; ids.len()];
    for (t, &id) in ids.iter().enumerate() {
        let slot = &mut next[id as usize];
        order[*slot as usize] = t as u32;
        *slot += 1;
    }
    Ok((offsets, order))
}

fn dims2(op: &'static str, name: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match *shape {
        [a, b] => Ok((a, b)),
        _ => Err(Error::shape(
            op,
            format!("{name} of rank 2"),
            format!("{name} {shape:?}"),
        )),
    }
}

fn check_elements(op: &'static str, what: &str, n: usize) -> Result<()> {
    // u64: usize is 32 bits in the browser (wasm32).
    if n as u64 > u32::MAX as u64 {
        return Err(Error::Limit {
            what: format!("{op}: elements of {what}"),
            needed: n as u64,
            max: u32::MAX as u64,
        });
    }
    Ok(())
}

/// Check the forward's shapes: ids [T], wte [V, D], wpe [N, D] (if any),
/// x [T, D]. Returns (T, V, N, D), N = 1 without wpe. CPU only.
pub fn check_forward(
    ids: &[usize],
    wte: &[usize],
    wpe: Option<&[usize]>,
    x: &[usize],
) -> Result<(usize, usize, usize, usize)> {
    const OP: &str = "embedding_forward";
    let &[t] = ids else {
        return Err(Error::shape(OP, "ids [T]", format!("ids {ids:?}")));
    };
    let (v, d) = dims2(OP, "wte", wte)?;
    let (n, wpe) = match wpe {
        Some(wpe) => (dims2(OP, "wpe", wpe)?.0, wpe.to_vec()),
        None => (1, vec![1, d]),
    };
    if t == 0 || v == 0 || n == 0 || d == 0 {
        return Err(Error::invalid(
            OP,
            format!("T = {t}, V = {v}, N = {n}, D = {d}: all must be >= 1"),
        ));
    }
    if wpe != [n, d] {
        return Err(Error::shape(
            OP,
            format!("wpe [N, {d}]"),
            format!("wpe {wpe:?}"),
        ));
    }
    if x != [t, d] {
        return Err(Error::shape(
            OP,
            format!("x [{t}, {d}]"),
            format!("x {x:?}"),
        ));
    }
    check_elements(OP, "x / wte / wpe", t.max(v).max(n) * d)?;
    Ok((t, v, n, d))
}

/// Check the wte backward's shapes: dx [T, D], offsets [V + 1], order [T],
/// dwte [V, D]. Returns (T, V, D). CPU only.
pub fn check_backward_wte(
    dx: &[usize],
    offsets: &[usize],
    order: &[usize],
    dwte: &[usize],
) -> Result<(usize, usize, usize)> {
    const OP: &str = "embedding_backward_wte";
    let (t, d) = dims2(OP, "dx", dx)?;
    let (v, _) = dims2(OP, "dwte", dwte)?;
    if t == 0 || v == 0 || d == 0 {
        return Err(Error::invalid(
            OP,
            format!("T = {t}, V = {v}, D = {d}: all must be >= 1"),
        ));
    }
    if dwte != [v, d] {
        return Err(Error::shape(
            OP,
            format!("dwte [V, {d}]"),
            format!("dwte {dwte:?}"),
        ));
    }
    if offsets != [v + 1] {
        return Err(Error::shape(
            OP,
            format!("offsets [{}]", v + 1),
            format!("offsets {offsets:?}"),
        ));
    }
    if order != [t] {
        return Err(Error::shape(
            OP,
            format!("order [{t}]"),
            format!("order {order:?}"),
        ));
    }
    check_elements(OP, "dx / dwte", t.max(v) * d)?;
    Ok((t, v, d))
}

/// Check the wpe backward's shapes: dx [T, D], dwpe [N, D]. Returns (T, N, D).
/// CPU only.
pub fn check_backward_wpe(dx: &[usize], dwpe: &[usize]) -> Result<(usize, usize, usize)> {
    const OP: &str = "embedding_backward_wpe";
    let (t, d) = dims2(OP, "dx", dx)?;
    let (n, dd) = dims2(OP, "dwpe", dwpe)?;
    if t == 0 || n == 0 || d == 0 {
        return Err(Error::invalid(
            OP,
            format!("T = {t}, N = {n}, D = {d}: all must be >= 1"),
        ));
    }
    if dd != d {
        return Err(Error::shape(
            OP,
            format!("dwpe [N, {d}]"),
            format!("dwpe {dwpe:?}"),
        ));
    }
    check_elements(OP, "dx / dwpe", t.max(n) * d)?;
    Ok((t, n, d))
}

/// One dispatch of `spec` over `elements` outputs.
fn build(
    ctx: &GpuContext,
    spec: EmbeddingSpec,
    dims: [usize; 4],
    (scale, has_wpe): (f32, bool),
    (v0, vc): (usize, usize),
    elements: usize,
    buffers: &[&wgpu::Buffer],
) -> Result<(Dispatch, wgpu::Buffer)> {
    let groups = (elements as u32).div_ceil(EMBEDDING_WG);
    let grid = grid_1d(groups, ctx.limits.max_compute_workgroups_per_dimension);
    ctx.check_workgroups(
        format!("{} workgroups (folded)", spec.name()),
        grid.1 as u64,
    )?;
    let [t, v, n, d] = dims.map(|x| x as u32);
    let params = EmbeddingParams {
        t,
        v,
        n,
        d,
        nx: grid.0,
        scale,
        has_wpe: has_wpe as u32,
        v0: v0 as u32,
        vc: vc as u32,
        ..Default::default()
    };
    let params_buf = uniform(ctx, &params);
    let mut all = vec![&params_buf];
    all.extend_from_slice(buffers);
    let dispatch = Dispatch::new(
        ctx,
        ctx.pipeline(&Kernel::Embedding(spec))?,
        &all,
        Grid::Direct(grid.0, grid.1, 1),
    )?;
    Ok((dispatch, params_buf))
}

/// Tensors of `embedding_forward`.
pub struct EmbeddingForwardBuffers<'a> {
    /// ids [T] (validated by the host: every id < V)
    pub ids: &'a Tensor<u32>,
    /// wte [V, D] (f32 or f16)
    pub wte: WeightRef<'a>,
    /// wpe [N, D]; None for rotary models.
    pub wpe: Option<&'a Tensor<f32>>,
    /// x [T, D]
    pub x: &'a Tensor<f32>,
    /// Token embedding multiplier (1 but for Granite).
    pub scale: f32,
    /// `(v0, V)`: `wte` holds rows `v0 ..` of a V-row table (one part of a
    /// split table: the lookup writes the tokens whose ids it holds). None:
    /// the whole table.
    pub rows: Option<(usize, usize)>,
}

/// `x[t, :] = wte[ids[t], :] * scale + wpe[t % N, :]`, ready to record.
pub struct EmbeddingForward {
    pub t: usize,
    pub v: usize,
    pub n: usize,
    pub d: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl EmbeddingForward {
    pub fn new(ctx: &GpuContext, bufs: &EmbeddingForwardBuffers<'_>) -> Result<Self> {
        let (t, v, n, d) = check_forward(
            &bufs.ids.shape,
            bufs.wte.shape,
            bufs.wpe.map(|w| &w.shape[..]),
            &bufs.x.shape,
        )?;
        if !bufs.scale.is_finite() {
            return Err(Error::invalid(
                "embedding_forward",
                format!("scale {}", bufs.scale),
            ));
        }
        let (v0, all) = bufs.rows.unwrap_or((0, v));
        if v0 + v > all {
            return Err(Error::invalid(
                "embedding_forward",
                format!("rows {v0}..{} of a table of {all}", v0 + v),
            ));
        }
        // Without wpe the shader reads none; wte fills the binding.
        let wpe = bufs.wpe.map_or(bufs.wte.buffer, |w| &w.buffer);
        bufs.wte.expect_float("embedding")?;
        let (dispatch, params) = build(
            ctx,
            if bufs.wte.f16() {
                EmbeddingSpec::ForwardF16
            } else {
                EmbeddingSpec::Forward
            },
            [t, all, n, d],
            (bufs.scale, bufs.wpe.is_some()),
            (v0, v),
            t * d,
            &[&bufs.ids.buffer, bufs.wte.buffer, wpe, &bufs.x.buffer],
        )?;
        Ok(EmbeddingForward {
            t,
            v,
            n,
            d,
            dispatch,
            _params: params,
        })
    }

    /// Record the lookup: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Tensors of `embedding_backward_wte`.
pub struct EmbeddingBackwardWteBuffers<'a> {
    /// dx [T, D]
    pub dx: &'a Tensor<f32>,
    /// offsets [V + 1] from `token_order`
    pub offsets: &'a Tensor<u32>,
    /// order [T] from `token_order`
    pub order: &'a Tensor<u32>,
    /// dwte [V, D] (overwritten; rows of unseen ids get zeros)
    pub dwte: &'a Tensor<f32>,
}

/// `dwte[v, :] = sum_{t: ids[t] = v} dx[t, :]` (ascending t), ready to record.
pub struct EmbeddingBackwardWte {
    pub t: usize,
    pub v: usize,
    pub d: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl EmbeddingBackwardWte {
    pub fn new(ctx: &GpuContext, bufs: &EmbeddingBackwardWteBuffers<'_>) -> Result<Self> {
        let (t, v, d) = check_backward_wte(
            &bufs.dx.shape,
            &bufs.offsets.shape,
            &bufs.order.shape,
            &bufs.dwte.shape,
        )?;
        let (dispatch, params) = build(
            ctx,
            EmbeddingSpec::BackwardWte,
            [t, v, 1, d],
            (1.0, false),
            (0, v),
            v * d,
            &[
                &bufs.dx.buffer,
                &bufs.offsets.buffer,
                &bufs.order.buffer,
                &bufs.dwte.buffer,
            ],
        )?;
        Ok(EmbeddingBackwardWte {
            t,
            v,
            d,
            dispatch,
            _params: params,
        })
    }

    /// Record the gather: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

/// Tensors of `embedding_backward_wpe`.
pub struct EmbeddingBackwardWpeBuffers<'a> {
    /// dx [T, D]
    pub dx: &'a Tensor<f32>,
    /// dwpe [N, D] (overwritten)
    pub dwpe: &'a Tensor<f32>,
}

/// `dwpe[n, :] = sum_{t % N = n} dx[t, :]` (ascending t), ready to record.
pub struct EmbeddingBackwardWpe {
    pub t: usize,
    pub n: usize,
    pub d: usize,
    dispatch: Dispatch,
    _params: wgpu::Buffer,
}

impl EmbeddingBackwardWpe {
    pub fn new(ctx: &GpuContext, bufs: &EmbeddingBackwardWpeBuffers<'_>) -> Result<Self> {
        let (t, n, d) = check_backward_wpe(&bufs.dx.shape, &bufs.dwpe.shape)?;
        let (dispatch, params) = build(
            ctx,
            EmbeddingSpec::BackwardWpe,
            [t, 1, n, d],
            (1.0, false),
            (0, 1),
            n * d,
            &[&bufs.dx.buffer, &bufs.dwpe.buffer],
        )?;
        Ok(EmbeddingBackwardWpe {
            t,
            n,
            d,
            dispatch,
            _params: params,
        })
    }

    /// Record the gather: one dispatch.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.dispatch.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_order_is_a_stable_counting_sort() {
        let ids = [2, 0, 2, 3, 0, 2];
        let (offsets, order) = token_order(&ids, 5).unwrap();
        assert_eq!(offsets, vec![0, 2, 2, 5, 6, 6]);
        assert_eq!(order, vec![1, 4, 0, 2, 5, 3]);
        assert!(matches!(
            token_order(&[0, 5], 5),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(check_ids(&[0, 4], 5).is_ok());
    }

    #[test]
    fn rejects_bad_shapes_with_typed_errors() {
        assert_eq!(
            check_forward(&[6], &[10, 4], Some(&[3, 4]), &[6, 4]).unwrap(),
            (6, 10, 3, 4)
        );
        assert!(matches!(
            check_forward(&[0], &[10, 4], Some(&[3, 4]), &[0, 4]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            check_forward(&[6], &[10, 4], Some(&[3, 5]), &[6, 4]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check_forward(&[6], &[10, 4], Some(&[3, 4]), &[5, 4]),
            Err(Error::Shape { .. })
        ));
        assert_eq!(
            check_backward_wte(&[6, 4], &[11], &[6], &[10, 4]).unwrap(),
            (6, 10, 4)
        );
        assert!(matches!(
            check_backward_wte(&[6, 4], &[10], &[6], &[10, 4]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check_backward_wte(&[6, 4], &[11], &[5], &[10, 4]),
            Err(Error::Shape { .. })
        ));
        assert_eq!(check_backward_wpe(&[6, 4], &[3, 4]).unwrap(), (6, 3, 4));
        assert!(matches!(
            check_backward_wpe(&[6, 4], &[3, 5]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check_backward_wpe(&[6], &[3, 4]),
            Err(Error::Shape { .. })
        ));
    }
}
