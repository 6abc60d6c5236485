//! Typed pipeline cache. A kernel is identified by a typed key (`KernelKey`,
//! implemented by the kernels layer's enum with a small spec per family),
//! never by a string. Each kernel declares its
//! bindings, from which the explicit bind group layout is built: the layout is
//! the kernel's "header", checked against the shader by wgpu at build time.

use crate::error::{Error, Result};
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::GpuContext;

/// One binding of a kernel, in binding-index order (group 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// `var<uniform>`: the kernel's params struct.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// Everything needed to build a kernel's pipeline.
#[derive(Clone, Debug)]
pub struct KernelDef {
    /// Human-readable name used in errors and reports, e.g. `matmul_nt_r4x4`.
    pub name: String,
    /// Full WGSL source: spec constants prepended to the shader file.
    pub source: String,
    pub entry: &'static str,
    pub bindings: Vec<Binding>,
}

impl KernelDef {
    /// A definition whose source is `files` concatenated (shared snippets such as
    /// `shaders/activation.wgsl` first), preceded by `const NAME: u32 = V;` lines,
    /// one per spec constant (how specializations are expressed).
    pub fn new(
        name: impl Into<String>,
        files: &[&str],
        entry: &'static str,
        consts: &[(&str, u32)],
        bindings: &[Binding],
    ) -> Self {
        let mut source = String::new();
        // `enable` directives must precede every declaration.
        let (enables, body): (Vec<&str>, Vec<&str>) = files
            .iter()
            .flat_map(|f| f.lines())
            .partition(|l| l.trim_start().starts_with("enable "));
        for l in enables {
            source.push_str(l);
            source.push('\n');
        }
        for (k, v) in consts {
            source.push_str(&format!("const {k}: u32 = {v}u;\n"));
        }
        for l in body {
            source.push_str(l);
            source.push('\n');
        }
        KernelDef {
            name: name.into(),
            source,
            entry,
            bindings: bindings.to_vec(),
        }
    }

    /// Parse and validate with naga. Catches shader errors with a readable
    /// message before wgpu sees them, on every platform.
    pub fn validate(&self, caps: naga::valid::Capabilities) -> Result<naga::Module> {
        let module = naga::front::wgsl::parse_str(&self.source).map_err(|e| Error::Kernel {
            kernel: self.name.clone(),
            msg: e.emit_to_string(&self.source),
        })?;
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .map_err(|e| Error::Kernel {
                kernel: self.name.clone(),
                msg: format!("{e:?}"),
            })?;
        Ok(module)
    }
}

/// A compiled compute pipeline and its bind group layout.
#[derive(Debug)]
pub struct Pipeline {
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub bindings: Vec<Binding>,
}

impl Pipeline {
    /// Build a bind group for this pipeline; `buffers[i]` goes to binding `i`.
    pub fn bind(&self, ctx: &GpuContext, buffers: &[&wgpu::Buffer]) -> Result<wgpu::BindGroup> {
        self.bind_ranges(
            ctx,
            &buffers
                .iter()
                .map(|b| b.as_entire_buffer_binding())
                .collect::<Vec<_>>(),
        )
    }

    /// Like `bind`, with explicit buffer ranges (for weights bound per expert).
    pub fn bind_ranges(
        &self,
        ctx: &GpuContext,
        buffers: &[wgpu::BufferBinding<'_>],
    ) -> Result<wgpu::BindGroup> {
        if buffers.len() != self.bindings.len() {
            return Err(Error::shape(
                "bind group",
                format!("{} buffers for {}", self.bindings.len(), self.name),
                buffers.len(),
            ));
        }
        for (i, b) in buffers.iter().enumerate() {
            let size = b
                .size
                .map(|s| s.get())
                .unwrap_or(b.buffer.size() - b.offset);
            if self.bindings[i] != Binding::Uniform {
                ctx.check_binding(format!("{} binding {i}", self.name), size)?;
            }
        }
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(b.clone()),
            })
            .collect();
        Ok(ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.layout,
            entries: &entries,
        }))
    }
}

/// Where a dispatch's workgroup counts come from.
#[derive(Clone, Debug)]
pub enum Grid {
    Direct(u32, u32, u32),
    /// Written on the GPU by an earlier kernel: three u32 at `offset` bytes.
    Indirect {
        buffer: wgpu::Buffer,
        offset: u64,
    },
}

/// A pipeline, its bind group and its grid: all that `record` needs, built
/// once per shape.
#[derive(Debug)]
pub struct Dispatch {
    pipeline: Arc<Pipeline>,
    bind_group: wgpu::BindGroup,
    grid: Grid,
}

impl Dispatch {
    /// Bind `buffers[i]` to binding `i` of `pipeline`.
    pub fn new(
        ctx: &GpuContext,
        pipeline: Arc<Pipeline>,
        buffers: &[&wgpu::Buffer],
        grid: Grid,
    ) -> Result<Self> {
        let bind_group = pipeline.bind(ctx, buffers)?;
        Ok(Dispatch {
            pipeline,
            bind_group,
            grid,
        })
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        match &self.grid {
            Grid::Direct(x, y, z) => pass.dispatch_workgroups(*x, *y, *z),
            Grid::Indirect { buffer, offset } => pass.dispatch_workgroups_indirect(buffer, *offset),
        }
    }
}

/// A typed kernel id: equal keys must have equal definitions, so that the
/// pipeline built for one serves the other. `gpu` owns this trait so that it
/// needs nothing from the layers above; the kernels layer implements it.
pub trait KernelKey: Hash + Eq + Clone + Send + Sync + Debug + 'static {
    /// The shader source, entry point and bindings this key stands for.
    fn def(&self) -> KernelDef;
}

/// Pipelines built so far: one typed map per key type (in practice one, the
/// kernels layer's enum), found by the key type's `TypeId`.
#[derive(Default)]
pub(crate) struct PipelineCache {
    maps: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    built: std::sync::atomic::AtomicUsize,
    times: Mutex<BuildTimes>,
}

/// Where pipeline builds spent their time, summed over the builds so far:
/// what the time to a first token is made of (`bench infer` reports it).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct BuildTimes {
    /// Pipelines built.
    pub pipelines: usize,
    /// amoe's own naga parse and validation of the WGSL.
    pub naga_s: f64,
    /// `create_shader_module`: wgpu parses and validates the WGSL again and
    /// translates it (SPIR-V, MSL, HLSL or GLSL).
    pub module_s: f64,
    /// `create_compute_pipeline`: the driver compiles the shader.
    pub driver_s: f64,
}

impl BuildTimes {
    /// What was spent between `earlier` and `self`.
    pub fn since(&self, earlier: &BuildTimes) -> BuildTimes {
        BuildTimes {
            pipelines: self.pipelines - earlier.pipelines,
            naga_s: self.naga_s - earlier.naga_s,
            module_s: self.module_s - earlier.module_s,
            driver_s: self.driver_s - earlier.driver_s,
        }
    }

    pub fn total_s(&self) -> f64 {
        self.naga_s + self.module_s + self.driver_s
    }
}

/// naga capabilities matching the device's enabled features.
pub fn naga_capabilities(features: wgpu::Features) -> naga::valid::Capabilities {
    use naga::valid::Capabilities as C;
    let mut caps = C::empty();
    if features.contains(wgpu::Features::SUBGROUP) {
        caps |= C::SUBGROUP | C::SUBGROUP_BARRIER;
    }
    if features.contains(wgpu::Features::SHADER_F16) {
        caps |= C::SHADER_FLOAT16;
    }
    caps
}

impl PipelineCache {
    /// Pipelines built so far (of every key type).
    pub(crate) fn built(&self) -> usize {
        self.built.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn times(&self) -> BuildTimes {
        self.times.lock().map(|t| *t).unwrap_or_default()
    }

    pub(crate) fn get_or_build<K: KernelKey>(
        &self,
        ctx: &GpuContext,
        kernel: &K,
    ) -> Result<Arc<Pipeline>> {
        let mut maps = self.maps.lock().map_err(|_| Error::Gpu {
            op: "pipeline cache".into(),
            msg: "lock poisoned".into(),
        })?;
        let map = maps
            .entry(TypeId::of::<K>())
            .or_insert_with(|| Box::new(HashMap::<K, Arc<Pipeline>>::new()))
            .downcast_mut::<HashMap<K, Arc<Pipeline>>>()
            .ok_or_else(|| Error::Gpu {
                op: "pipeline cache".into(),
                msg: format!("entry of {} has the wrong type", std::any::type_name::<K>()),
            })?;
        if let Some(p) = map.get(kernel) {
            return Ok(p.clone());
        }
        let def = kernel.def();
        let p = Arc::new(build(ctx, &def, &self.times)?);
        map.insert(kernel.clone(), p.clone());
        self.built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(p)
    }
}

fn build(ctx: &GpuContext, def: &KernelDef, times: &Mutex<BuildTimes>) -> Result<Pipeline> {
    let sw = crate::util::Stopwatch::start();
    if def
        .bindings
        .iter()
        .filter(|b| **b != Binding::Uniform)
        .count()
        > ctx.limits.max_storage_buffers_per_shader_stage as usize
    {
        return Err(Error::Limit {
            what: format!("storage buffers of kernel {}", def.name),
            needed: def.bindings.len() as u64,
            max: ctx.limits.max_storage_buffers_per_shader_stage as u64,
        });
    }
    def.validate(naga_capabilities(ctx.features))?;
    let naga_s = sw.seconds();
    let entries: Vec<wgpu::BindGroupLayoutEntry> = def
        .bindings
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match b {
                    Binding::Uniform => wgpu::BufferBindingType::Uniform,
                    Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let label = Some(def.name.as_str());
    let scope = ctx.error_scope();
    let layout = ctx
        .device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label,
            entries: &entries,
        });
    let pipeline_layout = ctx
        .device
        .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label,
            source: wgpu::ShaderSource::Wgsl(def.source.as_str().into()),
        });
    let module_s = sw.seconds() - naga_s;
    let pipeline = ctx
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label,
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(def.entry),
            compilation_options: Default::default(),
            cache: ctx.driver_cache(),
        });
    ctx.driver_cache_grew();
    if let Ok(mut t) = times.lock() {
        t.pipelines += 1;
        t.naga_s += naga_s;
        t.module_s += module_s;
        t.driver_s += sw.seconds() - naga_s - module_s;
    }
    scope
        .finish(&format!("building kernel {}", def.name))
        .map_err(|e| Error::Kernel {
            kernel: def.name.clone(),
            msg: e.to_string(),
        })?;
    Ok(Pipeline {
        name: def.name.clone(),
        pipeline,
        layout,
        bindings: def.bindings.clone(),
    })
}
