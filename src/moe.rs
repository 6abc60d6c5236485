//! One MoE FFN layer, forward: router GEMM, gate, route, grouped expert GEMMs
//! (gather fused, indirect dispatch), combine; or, for a few tokens, the
//! decode path (gate, then a mat-vec per selected expert). The whole layer is
//! recorded into one command encoder and submitted once; the host never reads
//! the routing back.
//!
//! Twin: `reference::moe::moe_forward`, composed of the kernels' twins (with
//! the per-token decode twin for the experts, so the grouped path is checked
//! against an independent formulation).

use crate::error::{Error, Result};
use crate::gpu::{Dtype, GpuContext, Tensor, Weight, WeightPart, WeightRef};
use crate::kernels::combine::{Combine, CombineBuffers};
use crate::kernels::decode::{DecodeBuffers, DecodeFfn, DecodePart};
use crate::kernels::expert::{ExpertBuffers, ExpertFfn, ExpertShape, ExpertSpec};
use crate::kernels::gate::{Gate, GateBuffers};
use crate::kernels::matmul::{Matmul, MatmulShape, MatmulSpec, Trans};
use crate::kernels::moe_backward::{
    ExpertGradBuffers, MoeBackward, MoeBackwardBuffers, MoeBackwardShape,
};
use crate::kernels::route::{routing_tensor, Route, RouteBuffers, RouteConfig};
use crate::kernels::{
    Activation, AuxConfig, RoutingLayout, SingleWeight, STATUS_NONFINITE, UNUSED,
};
use serde::Serialize;

pub use crate::kernels::moe_config::{MoeConfig, MoeWeights};

/// Up to this many tokens, `Path::Auto` takes the decode path.
pub const DECODE_MAX_T: usize = 16;

/// Which expert path a plan uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Decode for T <= `DECODE_MAX_T`, grouped otherwise.
    Auto,
    /// Route + grouped GEMMs (training, prefill).
    Grouped,
    /// A mat-vec per selected expert, no permutation (few tokens).
    Decode,
}

/// One part of an expert bank: experts `e0 ..` and their weights.
struct ExpertPart<'a> {
    e0: usize,
    w1: WeightRef<'a>,
    w3: Option<WeightRef<'a>>,
    w2: WeightRef<'a>,
}

/// A layer's weights on the GPU.
pub struct MoeLayer {
    pub cfg: MoeConfig,
    /// w_router [D, E]
    pub w_router: Tensor<f32>,
    /// w1 [E, D, F] (f32, or f16 for inference)
    pub w1: Weight,
    /// w3 [E, D, F] (SwiGLU)
    pub w3: Option<Weight>,
    /// w2 [E, F, D]
    pub w2: Weight,
    /// `None`: the layer holds all of its experts. Under expert
    /// parallelism, the experts it holds (w1, w3 and w2 are then
    /// [share, ..]): its plans over tokens route over all E experts and run
    /// none (the routed rows go to the experts' ranks); the rows plans
    /// (`plan_rows`, `plan_rows_train`) run the experts it holds.
    pub share: Option<std::ops::Range<usize>>,
}

// Boxed: launchers are large and a plan holds one path. One expert
// launcher per part of a split expert bank (one for a bank in one buffer).
enum Experts {
    Grouped(Box<GroupedExperts>),
    Decode(Vec<DecodeFfn>),
}

/// How a grouped plan is built.
#[derive(Clone, Copy)]
struct Grouping {
    /// Keep what the backward needs.
    train: bool,
    /// Run the experts here (false: route only, the rows run elsewhere).
    run_experts: bool,
    /// Slots an expert takes at most (`None`: dropless).
    capacity: Option<u32>,
}

/// What the grouped path reads and writes.
struct GroupedIo<'a> {
    x: &'a Tensor<f32>,
    topk_ids: &'a Tensor<u32>,
    topk_weights: &'a Tensor<f32>,
    routing: &'a Tensor<u32>,
    y: &'a Tensor<f32>,
}

struct GroupedExperts {
    route: Route,
    ffn: Vec<ExpertFfn>,
    combine: Combine,
    token_of_slot: Tensor<u32>,
    slot_of_token: Tensor<u32>,
    y_expert: Tensor<f32>,
    /// u [R, F]: GEMM 1's pre-activation (training plans only)
    u: Option<Tensor<f32>>,
    /// u3 [R, F]: SwiGLU's second product (SwiGLU training plans only)
    u3: Option<Tensor<f32>>,
    /// h [R, F]: the activation (`None` where no expert runs)
    h: Option<Tensor<f32>>,
}

/// Buffers, bind groups and launchers for one token count T: built once,
/// reused for every forward of that shape.
pub struct MoePlan {
    pub t: usize,
    /// x [T, D]: write the input here (or let a previous kernel write it).
    pub x: Tensor<f32>,
    /// router_logits [T, E]
    pub logits: Tensor<f32>,
    /// probs [T, E]
    pub probs: Tensor<f32>,
    /// topk_ids [T, K]
    pub topk_ids: Tensor<u32>,
    /// topk_weights [T, K]
    pub topk_weights: Tensor<f32>,
    /// lse [T]
    pub lse: Tensor<f32>,
    /// routing [RoutingLayout::len()]
    pub routing: Tensor<u32>,
    /// y [T, D]: the layer's output.
    pub y: Tensor<f32>,
    router: Matmul,
    gate: Gate,
    experts: Experts,
}

/// What the routing did in one forward, read back on request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoutingSummary {
    /// Tokens routed to each expert (first or second choice).
    pub expert_counts: Vec<u32>,
    /// Fraction of tokens that used two experts.
    pub two_expert_fraction: f64,
    /// Routed (token, expert) pairs.
    pub used_slots: usize,
}

impl MoeLayer {
    /// The expert bank's parts: the experts each holds and its w1, w3, w2
    /// (one part for a bank in one buffer each).
    fn expert_parts(&self) -> Result<Vec<ExpertPart<'_>>> {
        let (p1, p2) = (self.w1.parts(), self.w2.parts());
        let p3 = self.w3.as_ref().map(Weight::parts);
        let same = |a: &[WeightPart], b: &[WeightPart]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.range == y.range)
        };
        if !same(&p1, &p2) || p3.as_ref().is_some_and(|p3| !same(&p1, p3)) {
            return Err(Error::invalid(
                "moe_layer",
                "w1, w3 and w2 are split at different experts",
            ));
        }
        Ok(p1
            .iter()
            .zip(&p2)
            .enumerate()
            .map(|(i, (a, b))| ExpertPart {
                e0: a.range.start,
                w1: a.view,
                w3: p3.as_ref().map(|p| p[i].view),
                w2: b.view,
            })
            .collect())
    }

    /// Upload `weights` for `cfg` in f32.
    pub fn new(ctx: &GpuContext, cfg: MoeConfig, weights: &MoeWeights) -> Result<Self> {
        Self::with_dtype(ctx, cfg, weights, Dtype::F32)
    }

    /// Upload `weights` for `cfg`, the experts stored as `dtype` (the
    /// router stays f32: it decides the routing, and it is small). A bank
    /// larger than one storage binding is split into parts of whole experts
    /// (`GpuContext::split_bytes`); w1, w3 and w2 have the same size, so
    /// they split at the same experts.
    pub fn with_dtype(
        ctx: &GpuContext,
        cfg: MoeConfig,
        weights: &MoeWeights,
        dtype: Dtype,
    ) -> Result<Self> {
        cfg.validate()?;
        weights.validate(&cfg)?;
        let (d, f, e) = (cfg.d, cfg.f, cfg.e);
        Self::from_parts(
            cfg,
            Tensor::from_slice(ctx, "w_router", &[d, e], &weights.w_router)?,
            Weight::upload_split(ctx, "w1", &[e, d, f], &weights.w1, dtype, 0)?,
            match &weights.w3 {
                Some(w3) => Some(Weight::upload_split(ctx, "w3", &[e, d, f], w3, dtype, 0)?),
                None => None,
            },
            Weight::upload_split(ctx, "w2", &[e, f, d], &weights.w2, dtype, 0)?,
        )
    }

    /// A layer of weights already on the GPU (a model uploads its
    /// parameters one at a time), checked against `cfg`: w_router [D, E],
    /// w1 and (SwiGLU only) w3 [E, D, F], w2 [E, F, D].
    pub fn from_parts(
        cfg: MoeConfig,
        w_router: Tensor<f32>,
        w1: Weight,
        w3: Option<Weight>,
        w2: Weight,
    ) -> Result<Self> {
        Self::from_share(cfg, None, w_router, w1, w3, w2)
    }

    /// `from_parts` for a layer that holds experts `share` of its E (expert
    /// parallelism; `None`: all of them): w1 and w3 [share, D, F], w2
    /// [share, F, D].
    pub fn from_share(
        cfg: MoeConfig,
        share: Option<std::ops::Range<usize>>,
        w_router: Tensor<f32>,
        w1: Weight,
        w3: Option<Weight>,
        w2: Weight,
    ) -> Result<Self> {
        cfg.validate()?;
        if let Some(r) = &share {
            if r.is_empty() || r.end > cfg.e {
                return Err(Error::invalid(
                    "moe_layer",
                    format!("experts {r:?} of a layer of {}", cfg.e),
                ));
            }
        }
        let (d, f) = (cfg.d, cfg.f);
        let e = share.as_ref().map_or(cfg.e, |r| r.len());
        w_router.expect_shape("moe_layer", "w_router", &[d, cfg.e])?;
        let shape = |w: &Weight, name: &str, want: &[usize]| {
            crate::gpu::expect_shape("moe_layer", name, w.shape(), want)
        };
        shape(&w1, "w1", &[e, d, f])?;
        shape(&w2, "w2", &[e, f, d])?;
        match (&w3, cfg.activation == Activation::SwiGlu) {
            (Some(w3), true) => shape(w3, "w3", &[e, d, f])?,
            (None, false) => {}
            (_, swiglu) => {
                return Err(Error::invalid(
                    "moe_layer",
                    format!(
                        "w3 is {} but the activation is {}",
                        if w3.is_some() { "given" } else { "missing" },
                        if swiglu { "SwiGLU" } else { "GELU" }
                    ),
                ))
            }
        }
        Ok(MoeLayer {
            cfg,
            w_router,
            w1,
            w3,
            w2,
            share,
        })
    }

    /// Experts whose weights the layer holds (E, or its share's).
    pub fn held(&self) -> usize {
        self.share.as_ref().map_or(self.cfg.e, |r| r.len())
    }

    /// Allocate everything a forward of `t` tokens needs.
    pub fn plan(&self, ctx: &GpuContext, t: usize, path: Path) -> Result<MoePlan> {
        self.plan_with(ctx, t, path, false, None)
    }

    /// A plan that reads its input from `x [T, D]` (another FFN's input:
    /// a shared expert beside the routed ones).
    pub fn plan_on(&self, ctx: &GpuContext, x: &Tensor<f32>, path: Path) -> Result<MoePlan> {
        let &[t, d] = x.shape.as_slice() else {
            return Err(Error::shape(
                "moe_layer",
                "x [T, D]",
                format!("{:?}", x.shape),
            ));
        };
        if d != self.cfg.d {
            return Err(Error::shape(
                "moe_layer",
                format!("x [T, {}]", self.cfg.d),
                format!("{:?}", x.shape),
            ));
        }
        self.plan_with(ctx, t, path, false, Some(x))
    }

    fn plan_with(
        &self,
        ctx: &GpuContext,
        t: usize,
        path: Path,
        train: bool,
        input: Option<&Tensor<f32>>,
    ) -> Result<MoePlan> {
        if t == 0 {
            return Err(Error::invalid("moe_layer", "T = 0 tokens"));
        }
        let cfg = &self.cfg;
        let (d, f, e, k) = (cfg.d, cfg.f, cfg.e, cfg.k());
        let x = match input {
            Some(x) => x.clone(),
            None => Tensor::zeros(ctx, "x", &[t, d])?,
        };
        let logits = Tensor::zeros(ctx, "router_logits", &[t, e])?;
        let probs = Tensor::zeros(ctx, "probs", &[t, e])?;
        let topk_ids = Tensor::zeros(ctx, "topk_ids", &[t, k])?;
        let topk_weights = Tensor::zeros(ctx, "topk_weights", &[t, k])?;
        let lse = Tensor::zeros(ctx, "lse", &[t])?;
        let y = Tensor::zeros(ctx, "y", &[t, d])?;

        let router_shape = MatmulShape {
            m: t,
            n: e,
            k: d,
            trans: Trans::NN,
            alpha: 1.0,
            beta: 0.0,
        };
        let router = Matmul::new(
            ctx,
            &router_shape,
            MatmulSpec::choose(ctx, t, e, d, Trans::NN),
            &x,
            &self.w_router,
            &logits,
        )?;

        let decode = match path {
            Path::Auto => t <= DECODE_MAX_T && self.share.is_none(),
            Path::Grouped => false,
            Path::Decode => true,
        };
        if decode && self.share.is_some() {
            return Err(Error::invalid(
                "moe_layer",
                "a layer holding a share of its experts has no decode path (its experts run on their ranks)",
            ));
        }
        let expert_shape = ExpertShape {
            t,
            k,
            e,
            d,
            f,
            act: cfg.activation,
        };
        let spec = ExpertSpec::choose(ctx, &expert_shape);
        let layout = RoutingLayout {
            t,
            k,
            e,
            tile_m: spec.tile_m(),
        };
        let routing = routing_tensor(ctx, &layout)?;
        let gate = Gate::new(
            ctx,
            &cfg.gate,
            &GateBuffers {
                router_logits: &logits,
                probs: &probs,
                topk_ids: &topk_ids,
                topk_weights: &topk_weights,
                lse: &lse,
                routing: &routing,
            },
        )?;
        let parts = self.expert_parts()?;
        let experts = if decode {
            let mut ffns = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                ffns.push(DecodeFfn::new(
                    ctx,
                    cfg.activation,
                    &DecodeBuffers {
                        x: &x,
                        topk_ids: &topk_ids,
                        topk_weights: &topk_weights,
                        w1: p.w1,
                        w3: p.w3,
                        w2: p.w2,
                        y: &y,
                        part: (parts.len() > 1).then_some(DecodePart {
                            e0: p.e0,
                            experts: e,
                            accumulate: i > 0,
                        }),
                    },
                )?);
            }
            Experts::Decode(ffns)
        } else {
            Experts::Grouped(Box::new(self.grouped(
                ctx,
                &expert_shape,
                spec,
                &parts,
                Grouping {
                    train,
                    run_experts: self.share.is_none(),
                    capacity: if train { cfg.capacity(t) } else { None },
                },
                GroupedIo {
                    x: &x,
                    topk_ids: &topk_ids,
                    topk_weights: &topk_weights,
                    routing: &routing,
                    y: &y,
                },
            )?))
        };
        Ok(MoePlan {
            t,
            x,
            logits,
            probs,
            topk_ids,
            topk_weights,
            lse,
            routing,
            y,
            router,
            gate,
            experts,
        })
    }

    /// The grouped path's launchers and buffers over `io` (the gate's
    /// outputs or, for rows routed from elsewhere, ids written by the host).
    fn grouped(
        &self,
        ctx: &GpuContext,
        expert_shape: &ExpertShape,
        spec: ExpertSpec,
        parts: &[ExpertPart<'_>],
        how: Grouping,
        io: GroupedIo<'_>,
    ) -> Result<GroupedExperts> {
        let cfg = &self.cfg;
        let (t, d, f, k) = (expert_shape.t, cfg.d, cfg.f, expert_shape.k);
        let Grouping {
            train,
            run_experts,
            capacity,
        } = how;
        let layout = RoutingLayout {
            t,
            k,
            e: expert_shape.e,
            tile_m: spec.tile_m(),
        };
        let GroupedIo {
            x,
            topk_ids,
            topk_weights,
            routing,
            y,
        } = io;
        let rows = layout.max_rows();
        let token_of_slot = Tensor::zeros(ctx, "token_of_slot", &[rows])?;
        let slot_of_token = Tensor::zeros(ctx, "slot_of_token", &[t, k])?;
        let y_expert = Tensor::zeros(ctx, "y_expert", &[rows, d])?;
        let scratch = |name: &str, on: bool| -> Result<Option<Tensor<f32>>> {
            match on && run_experts {
                true => Ok(Some(Tensor::zeros(ctx, name, &[rows, f])?)),
                false => Ok(None),
            }
        };
        let h = scratch("h", true)?;
        let u = scratch("u", train)?;
        let u3 = scratch("u3", train && cfg.activation == Activation::SwiGlu)?;
        // Each part's GEMMs write the rows of its own experts' tiles.
        let mut ffn = Vec::with_capacity(parts.len());
        if let Some(h) = &h {
            for p in parts {
                ffn.push(ExpertFfn::new(
                    ctx,
                    expert_shape,
                    spec,
                    ExpertBuffers {
                        x,
                        token_of_slot: &token_of_slot,
                        routing,
                        w1: p.w1,
                        w3: p.w3,
                        w2: p.w2,
                        e0: p.e0,
                        h,
                        y_expert: &y_expert,
                        u: u.as_ref(),
                        u3: u3.as_ref(),
                    },
                )?);
            }
        }
        let route = Route::new(
            ctx,
            &RouteConfig {
                layout,
                // The GEMMs' column tiles (what the route writes as their
                // indirect grids).
                grid_y1: f.div_ceil(spec.tile_n()) as u32,
                grid_y2: d.div_ceil(spec.tile_n()) as u32,
                capacity,
            },
            &RouteBuffers {
                topk_ids,
                routing,
                token_of_slot: &token_of_slot,
                slot_of_token: &slot_of_token,
            },
        )?;
        let combine = Combine::new(
            ctx,
            &CombineBuffers {
                topk_weights,
                slot_of_token: &slot_of_token,
                y_expert: &y_expert,
                y,
            },
        )?;
        Ok(GroupedExperts {
            route,
            ffn,
            combine,
            token_of_slot,
            slot_of_token,
            y_expert,
            u,
            u3,
            h,
        })
    }

    /// The expert GEMMs' part of a backward over `g` (a training plan's
    /// grouped path), writing the weight gradients `dw` (dw1, dw2, dw3).
    fn expert_grad_buffers<'a>(
        &'a self,
        g: &'a GroupedExperts,
        dw: ExpertGrads<'a>,
    ) -> Result<ExpertGradBuffers<'a>> {
        let (Some(u), Some(h)) = (g.u.as_ref(), g.h.as_ref()) else {
            return Err(Error::invalid("moe_layer", "training plan without u"));
        };
        Ok(ExpertGradBuffers {
            u,
            u3: g.u3.as_ref(),
            h,
            w1: self.w1.f32("MoE backward")?,
            w2: self.w2.f32("MoE backward")?,
            w3: match &self.w3 {
                Some(w3) => Some(w3.f32("MoE backward")?),
                None => None,
            },
            dw1: dw.0,
            dw2: dw.1,
            dw3: dw.2,
        })
    }

    /// A forward over `rows` rows that other ranks routed to this bank's
    /// experts (expert parallelism): each row names one of the bank's
    /// experts (or none), no router and no gate; the output row is that
    /// expert's output (weight 1).
    pub fn plan_rows(&self, ctx: &GpuContext, rows: usize) -> Result<ExpertRowsPlan> {
        self.plan_rows_with(ctx, rows, false)
    }

    /// `plan_rows` for training: the forward keeps what the backward needs;
    /// the backward takes each row's output gradient and gives its input
    /// gradient and the bank's weight gradients (no router, no gate).
    /// `split`: K chunks of the weight-gradient GEMMs (1 on CPU adapters).
    pub fn plan_rows_train(
        &self,
        ctx: &GpuContext,
        rows: usize,
        split: usize,
    ) -> Result<ExpertRowsTrainPlan> {
        self.plan_rows_train_into(ctx, rows, split, None)
    }

    /// `plan_rows_train` writing the weight gradients into `dw` (dw1, dw2,
    /// dw3: a plan rebuilt for more rows keeps its gradients), or into new
    /// tensors.
    pub fn plan_rows_train_into(
        &self,
        ctx: &GpuContext,
        rows: usize,
        split: usize,
        dw: Option<ExpertGradTensors>,
    ) -> Result<ExpertRowsTrainPlan> {
        let fwd = self.plan_rows_with(ctx, rows, true)?;
        let (d, f, e) = (self.cfg.d, self.cfg.f, self.held());
        let swiglu = self.cfg.activation == Activation::SwiGlu;
        let z = |name: &str, shape: &[usize]| Tensor::<f32>::zeros(ctx, name, shape);
        let dy = z("rows dy", &[rows, d])?;
        let dx = z("rows dx", &[rows, d])?;
        let (dw1, dw2, dw3) = match dw {
            Some(dw) => dw,
            None => (
                z("dw1", &[e, d, f])?,
                z("dw2", &[e, f, d])?,
                match swiglu {
                    true => Some(z("dw3", &[e, d, f])?),
                    false => None,
                },
            ),
        };
        // What the router's part binds and never runs here.
        let unused = (
            z("unused probs", &[rows, e])?,
            z("unused lse", &[rows])?,
            z("unused w_router", &[d, e])?,
            z("unused dw_router", &[d, e])?,
        );
        let g = &fwd.grouped;
        let [ffn] = g.ffn.as_slice() else {
            return Err(Error::invalid(
                "moe_layer",
                "training needs each expert bank in one buffer",
            ));
        };
        let shape = MoeBackwardShape {
            layout: RoutingLayout {
                t: rows,
                k: 1,
                e,
                tile_m: ffn.tile_m(),
            },
            d,
            f,
            raw_single: false,
            topk: None,
            balance: 0.0,
            z_loss: 0.0,
            split,
            swiglu,
        };
        let backward = MoeBackward::new(
            ctx,
            &shape,
            ffn.spec.core,
            &MoeBackwardBuffers {
                x: &fwd.x,
                dy: &dy,
                probs: &unused.0,
                topk_ids: &fwd.expert,
                topk_weights: &fwd._ones,
                lse: &unused.1,
                routing: &fwd.routing,
                token_of_slot: &g.token_of_slot,
                slot_of_token: &g.slot_of_token,
                y_expert: &g.y_expert,
                w_router: &unused.2,
                experts: Some(self.expert_grad_buffers(g, (&dw1, &dw2, dw3.as_ref()))?),
                dx: &dx,
                dw_router: &unused.3,
            },
        )?;
        Ok(ExpertRowsTrainPlan {
            fwd,
            dy,
            dx,
            dw1,
            dw2,
            dw3,
            backward,
            _unused: unused,
        })
    }

    fn plan_rows_with(&self, ctx: &GpuContext, rows: usize, train: bool) -> Result<ExpertRowsPlan> {
        if rows == 0 {
            return Err(Error::invalid("moe_layer", "a plan of 0 rows"));
        }
        let cfg = &self.cfg;
        let d = cfg.d;
        let x = Tensor::zeros(ctx, "received rows", &[rows, d])?;
        let expert = Tensor::zeros(ctx, "expert of row", &[rows, 1])?;
        let ones = Tensor::from_slice(ctx, "unit weights", &[rows, 1], &vec![1.0f32; rows])?;
        let y = Tensor::zeros(ctx, "expert rows out", &[rows, d])?;
        let shape = ExpertShape {
            t: rows,
            k: 1,
            e: self.held(),
            d,
            f: cfg.f,
            act: cfg.activation,
        };
        let spec = ExpertSpec::choose(ctx, &shape);
        let routing = routing_tensor(ctx, &shape.layout(&spec))?;
        let parts = self.expert_parts()?;
        let grouped = self.grouped(
            ctx,
            &shape,
            spec,
            &parts,
            // Dropless: the rows were routed (and any capacity applied)
            // where their tokens are.
            Grouping {
                train,
                run_experts: true,
                capacity: None,
            },
            GroupedIo {
                x: &x,
                topk_ids: &expert,
                topk_weights: &ones,
                routing: &routing,
                y: &y,
            },
        )?;
        Ok(ExpertRowsPlan {
            rows,
            e: self.held(),
            x,
            expert,
            _ones: ones,
            y,
            routing,
            grouped: Box::new(grouped),
        })
    }

    /// Record one forward of `plan` into `encoder` (input already in `plan.x`).
    pub fn record(&self, plan: &MoePlan, encoder: &mut wgpu::CommandEncoder) {
        plan.clear(encoder);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("moe_layer_forward"),
            timestamp_writes: None,
        });
        plan.record_pass(&mut pass);
    }

    /// Allocate a training plan for `t` tokens: the grouped forward keeping
    /// what the backward needs (and dropping past the capacity, when the
    /// config sets a factor), the backward and the gradients.
    /// `split`: K chunks of the expert weight-gradient GEMMs (1 on CPU adapters).
    pub fn plan_train(
        &self,
        ctx: &GpuContext,
        t: usize,
        aux: &AuxConfig,
        split: usize,
    ) -> Result<MoeTrainPlan> {
        let g = &self.cfg.gate;
        if g.gating == crate::kernels::Gating::TopK
            && g.score != crate::kernels::RouterScore::Softmax
        {
            return Err(Error::invalid(
                "moe_layer",
                "training takes a top-k router with softmax scores, not sigmoid ones",
            ));
        }
        let fwd = self.plan_with(ctx, t, Path::Grouped, true, None)?;
        let (d, f, e) = (self.cfg.d, self.cfg.f, self.cfg.e);
        let swiglu = self.cfg.activation == Activation::SwiGlu;
        let dy = Tensor::zeros(ctx, "moe_dy", &[t, d])?;
        let dx = Tensor::zeros(ctx, "moe_dx", &[t, d])?;
        let dw_router = Tensor::zeros(ctx, "dw_router", &[d, e])?;
        let Experts::Grouped(g) = &fwd.experts else {
            return Err(Error::invalid(
                "moe_layer",
                "training needs the grouped path",
            ));
        };
        // The experts' gradients where they run here (expert parallelism:
        // in the rows plan of the experts this layer holds).
        let grads = match self.share {
            None => {
                let dw3 = if swiglu {
                    Some(Tensor::zeros(ctx, "dw3", &[e, d, f])?)
                } else {
                    None
                };
                Some((
                    Tensor::zeros(ctx, "dw1", &[e, d, f])?,
                    Tensor::zeros(ctx, "dw2", &[e, f, d])?,
                    dw3,
                ))
            }
            Some(_) => None,
        };
        if grads.is_some() && g.ffn.len() != 1 {
            return Err(Error::invalid(
                "moe_layer",
                "training needs each expert bank in one buffer",
            ));
        }
        let spec = ExpertSpec::choose(
            ctx,
            &ExpertShape {
                t,
                k: self.cfg.k(),
                e,
                d,
                f,
                act: self.cfg.activation,
            },
        );
        let core = spec.core;
        let layout = RoutingLayout {
            t,
            k: self.cfg.k(),
            e,
            tile_m: spec.tile_m(),
        };
        let shape = MoeBackwardShape {
            layout,
            d,
            f,
            raw_single: self.cfg.gate.single_weight == SingleWeight::RawP1,
            topk: crate::kernels::moe_backward::TopKWeights::of(&self.cfg.gate),
            balance: aux.balance,
            z_loss: aux.z_loss,
            split,
            swiglu,
        };
        let backward = MoeBackward::new(
            ctx,
            &shape,
            core,
            &MoeBackwardBuffers {
                x: &fwd.x,
                dy: &dy,
                probs: &fwd.probs,
                topk_ids: &fwd.topk_ids,
                topk_weights: &fwd.topk_weights,
                lse: &fwd.lse,
                routing: &fwd.routing,
                token_of_slot: &g.token_of_slot,
                slot_of_token: &g.slot_of_token,
                y_expert: &g.y_expert,
                w_router: &self.w_router,
                experts: match &grads {
                    Some((dw1, dw2, dw3)) => {
                        Some(self.expert_grad_buffers(g, (dw1, dw2, dw3.as_ref()))?)
                    }
                    None => None,
                },
                dx: &dx,
                dw_router: &dw_router,
            },
        )?;
        let (dw1, dw2, dw3) = match grads {
            Some((a, b, c)) => (Some(a), Some(b), c),
            None => (None, None, None),
        };
        Ok(MoeTrainPlan {
            fwd,
            dy,
            dx,
            dw_router,
            dw1,
            dw2,
            dw3,
            backward,
        })
    }

    /// Upload `x [T, D]`, record the layer and submit once. Natively this
    /// waits for the GPU; read the result with `plan.output(ctx).await`.
    pub fn forward(&self, ctx: &GpuContext, plan: &MoePlan, x: &[f32]) -> Result<()> {
        plan.x.write(ctx, x)?;
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("moe_layer_forward"),
            });
        self.record(plan, &mut encoder);
        ctx.submit_and_wait(encoder)
    }
}

/// The experts' weight gradients, owned: dw1, dw2 and (SwiGLU) dw3.
pub type ExpertGradTensors = (Tensor<f32>, Tensor<f32>, Option<Tensor<f32>>);

/// The experts' weight gradients: dw1, dw2 and (SwiGLU) dw3.
pub type ExpertGrads<'a> = (&'a Tensor<f32>, &'a Tensor<f32>, Option<&'a Tensor<f32>>);

/// A layer's training plan: forward (keeping `u`), backward, gradients.
pub struct MoeTrainPlan {
    /// The forward: write the input into `fwd.x`, read the output in `fwd.y`.
    pub fwd: MoePlan,
    /// dy [T, D]: write the gradient of the layer output here.
    pub dy: Tensor<f32>,
    /// dx [T, D]: the gradient of the layer input.
    pub dx: Tensor<f32>,
    /// dw_router [D, E]
    pub dw_router: Tensor<f32>,
    /// dw1 [E, D, F], dw2 [E, F, D], dw3 [E, D, F] (SwiGLU): `None` for a
    /// layer holding a share of its experts (their gradients are the rows
    /// plan's)
    pub dw1: Option<Tensor<f32>>,
    pub dw2: Option<Tensor<f32>>,
    pub dw3: Option<Tensor<f32>>,
    pub backward: MoeBackward,
}

impl MoeTrainPlan {
    /// dw1, dw2 and (SwiGLU) dw3, or an error for a layer whose experts'
    /// gradients are a rows plan's (expert parallelism).
    pub fn expert_grads(&self) -> Result<ExpertGrads<'_>> {
        match (&self.dw1, &self.dw2) {
            (Some(a), Some(b)) => Ok((a, b, self.dw3.as_ref())),
            _ => Err(Error::invalid(
                "moe_layer",
                "the experts' gradients of a layer holding a share of them are its rows plan's",
            )),
        }
    }

    /// Record the backward (after the forward, in the same or a later pass).
    pub fn record_backward(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.backward.record(pass);
    }

    /// The gate statistics alone (see `MoeBackward::record_stats`).
    pub fn record_gate_stats(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.backward.record_stats(pass);
    }

    /// The backward past the gate statistics.
    pub fn record_backward_after_stats(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.backward.record_after_stats(pass);
    }

    /// stats [2E + 2] of the last backward: first-choice fractions, mean
    /// probabilities, the load-balancing and z losses.
    pub fn stats(&self) -> &Tensor<f32> {
        &self.backward.scratch.stats
    }
}

/// An expert bank's forward over rows routed to it from other ranks
/// (`MoeLayer::plan_rows`).
pub struct ExpertRowsPlan {
    /// Rows the plan holds at most.
    pub rows: usize,
    e: usize,
    /// x [rows, D]: the received rows.
    pub x: Tensor<f32>,
    /// expert [rows, 1]: each row's expert in this bank (`UNUSED` past the rows received).
    pub expert: Tensor<u32>,
    _ones: Tensor<f32>,
    /// y [rows, D]: each row's expert output.
    pub y: Tensor<f32>,
    pub routing: Tensor<u32>,
    grouped: Box<GroupedExperts>,
}

/// An expert bank's training plan over received rows
/// (`MoeLayer::plan_rows_train`).
pub struct ExpertRowsTrainPlan {
    pub fwd: ExpertRowsPlan,
    /// dy [rows, D]: write each received row's output gradient here.
    pub dy: Tensor<f32>,
    /// dx [rows, D]: each row's input gradient.
    pub dx: Tensor<f32>,
    /// The bank's weight gradients: dw1 [E, D, F], dw2 [E, F, D], dw3 (SwiGLU).
    pub dw1: Tensor<f32>,
    pub dw2: Tensor<f32>,
    pub dw3: Option<Tensor<f32>>,
    pub backward: MoeBackward,
    _unused: (Tensor<f32>, Tensor<f32>, Tensor<f32>, Tensor<f32>),
}

impl ExpertRowsTrainPlan {
    /// Record the bank's backward (after its forward, `dy` written).
    pub fn record_backward(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.backward.record_experts(pass);
    }
}

impl ExpertRowsPlan {
    /// Write the received rows `x [n, D]` and their experts `[n]` (n <= rows).
    pub fn write(&self, ctx: &GpuContext, x: &[f32], experts: &[u32]) -> Result<()> {
        let d = self.x.shape[1];
        let n = experts.len();
        if n > self.rows || x.len() != n * d {
            return Err(Error::shape(
                "expert rows",
                format!("at most {} rows of {d} floats and their experts", self.rows),
                format!("{} floats, {n} experts", x.len()),
            ));
        }
        if let Some(bad) = experts.iter().find(|&&x| x as usize >= self.e) {
            return Err(Error::invalid(
                "expert rows",
                format!("expert {bad} of a bank of {}", self.e),
            ));
        }
        let mut ids = experts.to_vec();
        ids.resize(self.rows, UNUSED);
        self.expert.write(ctx, &ids)?;
        if n > 0 {
            ctx.queue
                .write_buffer(&self.x.buffer, 0, bytemuck::cast_slice(x));
        }
        Ok(())
    }

    /// Record the route, the expert GEMMs and the (unit-weight) combine.
    pub fn record(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.clear_buffer(&self.routing.buffer, 0, None);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("expert_rows_forward"),
            timestamp_writes: None,
        });
        let g = &self.grouped;
        g.route.record(&mut pass);
        for f in &g.ffn {
            f.record(&mut pass);
        }
        g.combine.record(&mut pass);
    }
}

impl MoePlan {
    /// Zero what the gate and route accumulate into (outside any pass).
    pub fn clear(&self, encoder: &mut wgpu::CommandEncoder) {
        // The gate ORs status bits and the route counts into a zeroed buffer.
        encoder.clear_buffer(&self.routing.buffer, 0, None);
    }

    /// Record the forward kernels into an open pass (after `clear`).
    pub fn record_pass(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.router.record(pass);
        self.gate.record(pass);
        match &self.experts {
            Experts::Grouped(g) => {
                g.route.record(pass);
                for f in &g.ffn {
                    f.record(pass);
                }
                g.combine.record(pass);
            }
            Experts::Decode(ffns) => {
                for f in ffns {
                    f.record(pass);
                }
            }
        }
    }

    /// The router, the gate and the route alone (grouped path): expert
    /// parallelism sends the routed rows to the experts' ranks before the
    /// expert GEMMs, and writes their outputs into `y_expert` before
    /// `record_combine`. False on the decode path.
    pub fn record_routing(&self, pass: &mut wgpu::ComputePass<'_>) -> bool {
        self.router.record(pass);
        self.gate.record(pass);
        match &self.experts {
            Experts::Grouped(g) => {
                g.route.record(pass);
                true
            }
            Experts::Decode(_) => false,
        }
    }

    /// The combine alone (after `record_routing` and `y_expert` filled).
    pub fn record_combine(&self, pass: &mut wgpu::ComputePass<'_>) -> bool {
        match &self.experts {
            Experts::Grouped(g) => {
                g.combine.record(pass);
                true
            }
            Experts::Decode(_) => false,
        }
    }

    /// token_of_slot [rows] and y_expert [rows, D] of the grouped path.
    pub fn slot_buffers(&self) -> Option<(&Tensor<u32>, &Tensor<f32>)> {
        match &self.experts {
            Experts::Grouped(g) => Some((&g.token_of_slot, &g.y_expert)),
            Experts::Decode(_) => None,
        }
    }

    /// `y [T, D]`, or `Error::NonFinite` when a token's router logits were NaN/inf.
    pub async fn output(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        self.check_status(ctx).await?;
        self.y.read(ctx).await
    }

    /// Fail with `Error::NonFinite` when the gate flagged a token.
    pub async fn check_status(&self, ctx: &GpuContext) -> Result<()> {
        let head = crate::gpu::read_buffer::<u32>(ctx, &self.routing.buffer, RoutingLayout::HEADER)
            .await?;
        if head[RoutingLayout::STATUS] & STATUS_NONFINITE != 0 {
            return Err(Error::NonFinite {
                op: "moe_layer",
                msg: "router logits of some token are NaN or infinite (check the input and the weights)".into(),
            });
        }
        Ok(())
    }

    /// Record only the expert GEMMs (grouped path), reusing the routing of the
    /// last forward: what the grouped-over-dense benchmark times.
    pub(crate) fn record_expert_gemms(&self, pass: &mut wgpu::ComputePass<'_>) -> bool {
        match &self.experts {
            Experts::Grouped(g) => {
                for f in &g.ffn {
                    f.record(pass);
                }
                true
            }
            Experts::Decode(_) => false,
        }
    }

    /// Per-expert load and two-expert fraction of the last forward.
    pub async fn routing_summary(&self, ctx: &GpuContext, e: usize) -> Result<RoutingSummary> {
        let ids = self.topk_ids.read(ctx).await?;
        let k = self.topk_ids.shape[1];
        let mut expert_counts = vec![0u32; e];
        let mut two = 0usize;
        let mut used = 0usize;
        for row in ids.chunks(k) {
            let n = row.iter().filter(|&&i| i != UNUSED).count();
            used += n;
            two += (n == 2) as usize;
            for &i in row.iter().filter(|&&i| (i as usize) < e) {
                expert_counts[i as usize] += 1;
            }
        }
        Ok(RoutingSummary {
            expert_counts,
            two_expert_fraction: two as f64 / self.t as f64,
            used_slots: used,
        })
    }
}
