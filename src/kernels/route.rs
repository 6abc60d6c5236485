//! Route launcher: from `topk_ids [T, K]`, the slot plan that the grouped
//! expert GEMMs follow (`shaders/route.wgsl`), in three dispatches
//! (`route_count`, `route_scan`, `route_scatter`) without any readback.
//! Twin: `reference::route::route`.
//!
//! Writes into the packed `routing` buffer (see `RoutingLayout`): the header
//! (indirect dispatch args of both expert GEMMs, used slots, num_tiles, padded
//! rows), `expert_counts [E]`, `expert_offsets [E+1]` padded to `tile_m`, and
//! `tile_expert [max_tiles]` (`UNUSED` past num_tiles); the status word and the
//! reserved words are left as they are. Also writes `token_of_slot [max_rows]`
//! (every row below the padded rows: a token, or `UNUSED` for padding) and
//! `slot_of_token [T, K]`. The slots of one expert are in priority order:
//! every first choice by token, then every second choice by token. With a
//! capacity C (Switch style, `expert_capacity`), an expert takes its first C
//! slots in that order and the rest are dropped (`slot_of_token` = `UNUSED`,
//! counted in the header's dropped word), so a second choice is dropped
//! before any first choice. Nothing depends on the order in which atomics
//! land: run to run, and GPU to CPU, the plan is bit-identical.

use super::{grid_1d, Kernel, ParamsLayout, RoutingLayout, UNUSED};
use crate::error::{Error, Result};
use crate::gpu::{uniform, Binding, Dispatch, GpuContext, Grid, KernelDef, Tensor, STORAGE_USAGE};
use crate::gpu_params;

/// Invocations per workgroup of every route pass, and slots per chunk.
pub const ROUTE_CHUNK: u32 = 256;

const ROUTE_WGSL: &str = include_str!("../../shaders/route.wgsl");

/// The three passes of the route kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteSpec {
    /// Per-chunk ranks and histograms.
    Count,
    /// Scan over chunks and experts, header, offsets, tile table.
    Scan,
    /// Final rows of every slot.
    Scatter,
}

impl RouteSpec {
    /// Kernel name (WGSL entry point).
    pub fn name(&self) -> &'static str {
        match self {
            RouteSpec::Count => "route_count",
            RouteSpec::Scan => "route_scan",
            RouteSpec::Scatter => "route_scatter",
        }
    }

    pub fn def(&self) -> KernelDef {
        KernelDef::new(
            self.name(),
            &[ROUTE_WGSL],
            self.name(),
            &[
                ("CHUNK", ROUTE_CHUNK),
                ("UNUSED", UNUSED),
                ("HEADER", RoutingLayout::HEADER as u32),
                ("ARGS1", RoutingLayout::ARGS1 as u32),
                ("ARGS2", RoutingLayout::ARGS2 as u32),
                ("USED_SLOTS", RoutingLayout::USED_SLOTS as u32),
                ("NUM_TILES", RoutingLayout::NUM_TILES as u32),
                ("PADDED_ROWS", RoutingLayout::PADDED_ROWS as u32),
                ("DROPPED_SLOTS", RoutingLayout::DROPPED_SLOTS as u32),
            ],
            // One binding table for the three passes.
            &[
                Binding::Uniform,
                Binding::Read,      // topk_ids [T, K]
                Binding::ReadWrite, // slot_of_token [T, K]
                Binding::ReadWrite, // hist [NC, E] (scratch)
                Binding::ReadWrite, // routing [RoutingLayout::len()]
                Binding::ReadWrite, // token_of_slot [max_rows]
            ],
        )
    }

    pub fn all() -> Vec<Self> {
        vec![RouteSpec::Count, RouteSpec::Scan, RouteSpec::Scatter]
    }
}

gpu_params! {
    /// Mirrors `struct RouteParams` in `shaders/route.wgsl`.
    pub struct RouteParams {
        pub t: u32,
        pub k: u32,
        pub e: u32,
        pub s: u32,
        pub tile_m: u32,
        pub num_chunks: u32,
        pub max_tiles: u32,
        pub grid_y1: u32,
        pub grid_y2: u32,
        pub nx: u32,
        // slots an expert takes at most (UNUSED: no limit)
        pub capacity: u32,
        pub _pad1: u32,
    }
}

pub fn params_layouts() -> Vec<ParamsLayout> {
    vec![ParamsLayout::of::<RouteParams>(Kernel::Route(
        RouteSpec::Scan,
    ))]
}

/// What the route needs to know besides the tensors: the routing layout
/// (T, K, E, tile_m), the y workgroup counts that go into the two indirect
/// dispatch triples (the expert GEMMs' column grids) and the capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    pub layout: RoutingLayout,
    pub grid_y1: u32,
    pub grid_y2: u32,
    /// Slots an expert takes at most; None: dropless (the default).
    pub capacity: Option<u32>,
}

impl RouteConfig {
    /// Dropless, with y grids of 1.
    pub fn new(layout: RoutingLayout) -> Self {
        RouteConfig {
            layout,
            grid_y1: 1,
            grid_y2: 1,
            capacity: None,
        }
    }
}

/// Switch-style expert capacity: `ceil(factor * T * K / E)` slots per expert
/// (GShard's `2T/E` for top-2; K is the rule's most experts per token, so
/// adaptive gating gets top-2's capacity), at least 1.
pub fn expert_capacity(factor: f32, t: usize, k: usize, e: usize) -> u32 {
    let c = (factor as f64 * (t * k) as f64 / e.max(1) as f64).ceil();
    c.clamp(1.0, u32::MAX as f64 - 1.0) as u32
}

/// The tensors the route reads and writes.
pub struct RouteBuffers<'a> {
    /// topk_ids [T, K]
    pub topk_ids: &'a Tensor<u32>,
    /// routing [RoutingLayout::len()], with `INDIRECT` usage (see `routing_tensor`)
    pub routing: &'a Tensor<u32>,
    /// token_of_slot [max_rows]
    pub token_of_slot: &'a Tensor<u32>,
    /// slot_of_token [T, K]
    pub slot_of_token: &'a Tensor<u32>,
}

/// A zeroed routing buffer for `layout`, usable as storage and as the
/// indirect-dispatch argument buffer of the expert GEMMs.
pub fn routing_tensor(ctx: &GpuContext, layout: &RoutingLayout) -> Result<Tensor<u32>> {
    Tensor::with_usage(
        ctx,
        "routing",
        &[layout.len()],
        STORAGE_USAGE | wgpu::BufferUsages::INDIRECT,
    )
}

/// Check the config and shapes; returns the number of chunks. CPU only.
pub fn check(
    config: &RouteConfig,
    topk_ids: &[usize],
    routing: &[usize],
    token_of_slot: &[usize],
    slot_of_token: &[usize],
) -> Result<usize> {
    let l = &config.layout;
    if l.t == 0 {
        return Err(Error::invalid("route", "T = 0 tokens"));
    }
    if l.k == 0 || l.k > l.e {
        return Err(Error::invalid(
            "route",
            format!(
                "K = {} experts per token with E = {} experts (need 1 <= K <= E)",
                l.k, l.e
            ),
        ));
    }
    if l.tile_m == 0 {
        return Err(Error::invalid("route", "tile_m = 0"));
    }
    if config.capacity == Some(0) || config.capacity == Some(UNUSED) {
        return Err(Error::invalid(
            "route",
            format!("capacity {:?} (need 1 <= C < 2^32 - 1)", config.capacity),
        ));
    }
    let want = |name: &str, got: &[usize], want: &[usize]| -> Result<()> {
        if got != want {
            return Err(Error::shape(
                "route",
                format!("{name} {want:?}"),
                format!("{name} {got:?}"),
            ));
        }
        Ok(())
    };
    want("topk_ids", topk_ids, &[l.t, l.k])?;
    want("slot_of_token", slot_of_token, &[l.t, l.k])?;
    want("routing", routing, &[l.len()])?;
    want("token_of_slot", token_of_slot, &[l.max_rows()])?;
    // Row indices and the words of the routing buffer are u32.
    let largest = (l.max_rows() as u64).max(l.len() as u64);
    if largest > u32::MAX as u64 {
        return Err(Error::Limit {
            what: "route: padded rows".into(),
            needed: largest,
            max: u32::MAX as u64,
        });
    }
    Ok((l.t * l.k).div_ceil(ROUTE_CHUNK as usize))
}

/// The route of one shape, ready to record.
pub struct Route {
    pub config: RouteConfig,
    count: Dispatch,
    scan: Dispatch,
    scatter: Dispatch,
    _params: wgpu::Buffer,
    _hist: Tensor<u32>,
}

impl Route {
    pub fn new(ctx: &GpuContext, config: &RouteConfig, bufs: &RouteBuffers<'_>) -> Result<Self> {
        let num_chunks = check(
            config,
            &bufs.topk_ids.shape,
            &bufs.routing.shape,
            &bufs.token_of_slot.shape,
            &bufs.slot_of_token.shape,
        )?;
        let l = config.layout;
        // The expert GEMMs dispatch num_tiles workgroups along x.
        ctx.check_workgroups("route: row tiles of the expert GEMMs", l.max_tiles() as u64)?;
        let grid = grid_1d(
            num_chunks as u32,
            ctx.limits.max_compute_workgroups_per_dimension,
        );
        ctx.check_workgroups("route workgroups (folded)", grid.1 as u64)?;
        let hist = Tensor::<u32>::zeros(ctx, "route hist", &[num_chunks, l.e])?;
        let params = RouteParams {
            t: l.t as u32,
            k: l.k as u32,
            e: l.e as u32,
            s: (l.t * l.k) as u32,
            tile_m: l.tile_m as u32,
            num_chunks: num_chunks as u32,
            max_tiles: l.max_tiles() as u32,
            grid_y1: config.grid_y1,
            grid_y2: config.grid_y2,
            nx: grid.0,
            capacity: config.capacity.unwrap_or(UNUSED),
            _pad1: 0,
        };
        let params_buf = uniform(ctx, &params);
        let buffers = [
            &params_buf,
            &bufs.topk_ids.buffer,
            &bufs.slot_of_token.buffer,
            &hist.buffer,
            &bufs.routing.buffer,
            &bufs.token_of_slot.buffer,
        ];
        let chunks = Grid::Direct(grid.0, grid.1, 1);
        let pass =
            |spec, grid| Dispatch::new(ctx, ctx.pipeline(&Kernel::Route(spec))?, &buffers, grid);
        Ok(Route {
            config: *config,
            count: pass(RouteSpec::Count, chunks.clone())?,
            scan: pass(RouteSpec::Scan, Grid::Direct(1, 1, 1))?,
            scatter: pass(RouteSpec::Scatter, chunks)?,
            _params: params_buf,
            _hist: hist,
        })
    }

    /// Record the route: three dispatches (count, scan, scatter).
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.count.record(pass);
        self.scan.record(pass);
        self.scatter.record(pass);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: usize, k: usize, e: usize, tile_m: usize) -> RouteConfig {
        RouteConfig::new(RoutingLayout { t, k, e, tile_m })
    }

    fn shapes(c: &RouteConfig) -> Result<usize> {
        let l = &c.layout;
        // RoutingLayout's sizes divide by tile_m.
        let (len, rows) = if l.tile_m == 0 {
            (64, 64)
        } else {
            (l.len(), l.max_rows())
        };
        check(c, &[l.t, l.k], &[len], &[rows], &[l.t, l.k])
    }

    #[test]
    fn capacity_follows_switch() {
        // 128 tokens, top-1, 16 experts: 8 per expert at factor 1.
        assert_eq!(expert_capacity(1.0, 128, 1, 16), 8);
        assert_eq!(expert_capacity(1.25, 128, 1, 16), 10);
        // Top-2 doubles it; a tiny factor still leaves one slot.
        assert_eq!(expert_capacity(1.0, 128, 2, 16), 16);
        assert_eq!(expert_capacity(1e-9, 128, 2, 16), 1);
        assert_eq!(expert_capacity(1.1, 10, 1, 3), 4);
    }

    #[test]
    fn chunks_cover_every_slot() {
        assert_eq!(shapes(&cfg(1, 1, 4, 16)).unwrap(), 1);
        assert_eq!(shapes(&cfg(128, 2, 4, 16)).unwrap(), 1);
        assert_eq!(shapes(&cfg(129, 2, 4, 16)).unwrap(), 2);
        assert_eq!(shapes(&cfg(4096, 2, 64, 64)).unwrap(), 32);
    }

    #[test]
    fn rejects_bad_arguments_with_typed_errors() {
        assert!(matches!(
            shapes(&cfg(0, 2, 4, 16)),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            shapes(&cfg(4, 3, 2, 16)),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            shapes(&cfg(4, 0, 2, 16)),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            shapes(&cfg(4, 2, 4, 0)),
            Err(Error::InvalidArgument { .. })
        ));
        let zero = RouteConfig {
            capacity: Some(0),
            ..cfg(4, 2, 4, 4)
        };
        assert!(matches!(shapes(&zero), Err(Error::InvalidArgument { .. })));
        let c = cfg(4, 2, 8, 4);
        let l = c.layout;
        assert!(matches!(
            check(&c, &[4, 1], &[l.len()], &[l.max_rows()], &[4, 2]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[4, 2], &[l.len() - 1], &[l.max_rows()], &[4, 2]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[4, 2], &[l.len()], &[8], &[4, 2]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            check(&c, &[4, 2], &[l.len()], &[l.max_rows()], &[8]),
            Err(Error::Shape { .. })
        ));
    }
}
