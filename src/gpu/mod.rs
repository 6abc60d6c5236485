//! GPU context: adapter discovery and selection, device creation with the
//! adapter's real limits and the optional features amoe can use, the typed
//! pipeline cache and buffer helpers.
//!
//! "Get a device" (this module) is kept apart from "run on a device"
//! (`kernels`, `moe`), so tests and the browser can bring their own context.

mod buffer;
mod params;
mod pipeline;
mod weight;

pub use buffer::*;
pub use params::*;
pub use pipeline::*;
pub use weight::*;

use crate::error::{Error, Result};
use serde::Serialize;
use std::fmt;

/// Backends a user can ask for by name (`--backend`, `AMOE_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    Browser,
}

impl BackendChoice {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Self::Vulkan,
            "metal" | "mtl" => Self::Metal,
            "dx12" | "d3d12" => Self::Dx12,
            "gl" | "gles" | "opengl" => Self::Gl,
            "browser" | "webgpu" => Self::Browser,
            other => {
                return Err(Error::invalid(
                    "backend",
                    format!(
                        "unknown backend {other:?}; expected vulkan, metal, dx12, gl or browser"
                    ),
                ))
            }
        })
    }

    pub fn backends(self) -> wgpu::Backends {
        match self {
            Self::Vulkan => wgpu::Backends::VULKAN,
            Self::Metal => wgpu::Backends::METAL,
            Self::Dx12 => wgpu::Backends::DX12,
            Self::Gl => wgpu::Backends::GL,
            Self::Browser => wgpu::Backends::BROWSER_WEBGPU,
        }
    }

    pub fn of(backend: wgpu::Backend) -> Option<Self> {
        Some(match backend {
            wgpu::Backend::Vulkan => Self::Vulkan,
            wgpu::Backend::Metal => Self::Metal,
            wgpu::Backend::Dx12 => Self::Dx12,
            wgpu::Backend::Gl => Self::Gl,
            wgpu::Backend::BrowserWebGpu => Self::Browser,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Vulkan => "vulkan",
            Self::Metal => "metal",
            Self::Dx12 => "dx12",
            Self::Gl => "gl",
            Self::Browser => "browser",
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The features amoe uses when present. Each has a fallback path.
pub fn optional_features() -> wgpu::Features {
    wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY
}

/// What `amoe devices` prints about an adapter.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub backend: String,
    pub name: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub features: Vec<String>,
    pub limits: LimitsSummary,
}

/// The limits that matter to amoe's kernels.
#[derive(Clone, Debug, Serialize)]
pub struct LimitsSummary {
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size_x: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub min_subgroup_size: u32,
    pub max_subgroup_size: u32,
}

impl LimitsSummary {
    fn of(l: &wgpu::Limits, info: &wgpu::AdapterInfo) -> Self {
        LimitsSummary {
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: l.max_compute_workgroup_size_x,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            min_subgroup_size: info.subgroup_min_size,
            max_subgroup_size: info.subgroup_max_size,
        }
    }
}

fn feature_names(f: wgpu::Features) -> Vec<String> {
    let mut v: Vec<String> = f.iter_names().map(|(name, _)| name.to_string()).collect();
    v.sort();
    v
}

fn summarize(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    AdapterSummary {
        index,
        backend: BackendChoice::of(info.backend)
            .map(|b| b.name().to_string())
            .unwrap_or_else(|| format!("{:?}", info.backend).to_lowercase()),
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        features: feature_names(a.features()),
        limits: LimitsSummary::of(&a.limits(), &info),
    }
}

/// Which adapter(s) to use. `None` fields mean "any".
#[derive(Clone, Debug, Default)]
pub struct AdapterFilter {
    pub backend: Option<BackendChoice>,
    pub index: Option<usize>,
}

impl AdapterFilter {
    /// `--backend` / `--adapter` from the CLI, falling back to `AMOE_BACKEND`.
    pub fn from_args(backend: Option<&str>, index: Option<usize>) -> Result<Self> {
        let env = std::env::var("AMOE_BACKEND").ok().filter(|s| !s.is_empty());
        let backend = match backend.map(str::to_string).or(env) {
            Some(b) => Some(BackendChoice::parse(&b)?),
            None => None,
        };
        Ok(AdapterFilter { backend, index })
    }
}

fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    desc.flags = wgpu::InstanceFlags::empty();
    wgpu::Instance::new(desc)
}

/// All adapters wgpu finds on every backend compiled in, in a stable order
/// (Vulkan, Metal, DX12, GL, browser), numbered as `--adapter N` counts them.
pub async fn enumerate_adapters() -> Vec<wgpu::Adapter> {
    let mut out = Vec::new();
    #[cfg(not(target_arch = "wasm32"))]
    {
        for b in [
            BackendChoice::Vulkan,
            BackendChoice::Metal,
            BackendChoice::Dx12,
            BackendChoice::Gl,
        ] {
            let instance = new_instance(b.backends());
            out.extend(instance.enumerate_adapters(b.backends()).await);
        }
    }
    #[cfg(target_arch = "wasm32")]
    {
        let instance = new_instance(wgpu::Backends::BROWSER_WEBGPU);
        if let Ok(a) = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
        {
            out.push(a);
        }
    }
    out
}

/// Summaries of every adapter, for `amoe devices`.
pub async fn list_adapters() -> Vec<AdapterSummary> {
    enumerate_adapters()
        .await
        .iter()
        .enumerate()
        .map(|(i, a)| summarize(i, a))
        .collect()
}

/// Adapters matching `filter`, with their global index.
pub async fn select_adapters(filter: &AdapterFilter) -> Result<Vec<(usize, wgpu::Adapter)>> {
    let all = enumerate_adapters().await;
    let n = all.len();
    let chosen: Vec<(usize, wgpu::Adapter)> = all
        .into_iter()
        .enumerate()
        .filter(|(i, a)| {
            filter.index.is_none_or(|want| want == *i)
                && filter
                    .backend
                    .is_none_or(|b| BackendChoice::of(a.get_info().backend) == Some(b))
        })
        .collect();
    if chosen.is_empty() {
        let what = match (&filter.backend, filter.index) {
            (None, None) => "wgpu found none on any backend (on Linux without a GPU, install Mesa's lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)".to_string(),
            (b, i) => format!(
                "none matches backend {} and index {} ({n} adapters in all; see `amoe devices`)",
                b.map(|b| b.name().to_string()).unwrap_or_else(|| "any".into()),
                i.map(|i| i.to_string()).unwrap_or_else(|| "any".into()),
            ),
        };
        return Err(Error::NoAdapter(what));
    }
    Ok(chosen)
}

/// A device ready to run amoe's kernels, plus what it can do.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The optional features that were enabled on this device.
    pub features: wgpu::Features,
    /// The limits requested: the adapter's real limits.
    pub limits: wgpu::Limits,
    pipelines: PipelineCache,
    /// Errors wgpu reported outside an error scope, collected instead of the
    /// default handler's panic, and turned into `Error::Gpu` by `check_errors`.
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Why the device was lost, once it is (a driver reset, a browser tab
    /// whose GPU process restarted): every later call fails with it.
    lost: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Weights larger than this many bytes are split into parts (see
    /// `gpu::Weight`): the adapter's storage-binding limit, or less where
    /// `AMOE_SPLIT_BYTES` (bytes) or `set_split_bytes` asks for less.
    split_bytes: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("backend", &self.info.backend)
            .field("name", &self.info.name)
            .finish()
    }
}

impl GpuContext {
    /// Create a device on `adapter` with its real limits and whichever of the
    /// optional features it offers.
    pub async fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let features = adapter.features() & optional_features();
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("amoe"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                msg: e.to_string(),
            })?;
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let lost = std::sync::Arc::new(std::sync::Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost_sink.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        let binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        // A smaller size on request: how a model's weights would be split in
        // a browser (128 MiB bindings) can be tried on any adapter.
        let asked = std::env::var("AMOE_SPLIT_BYTES")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&b| b >= 1024);
        Ok(GpuContext {
            device,
            queue,
            info,
            features,
            limits,
            pipelines: PipelineCache::default(),
            errors,
            lost,
            split_bytes: std::sync::atomic::AtomicU64::new(
                asked.map_or(binding, |a| a.min(binding)),
            ),
        })
    }

    /// The first adapter matching `filter`.
    pub async fn new(filter: &AdapterFilter) -> Result<Self> {
        let adapters = select_adapters(filter).await?;
        Self::from_adapter(&adapters[0].1).await
    }

    /// One context per matching adapter.
    pub async fn all(filter: &AdapterFilter) -> Result<Vec<Self>> {
        let mut v = Vec::new();
        for (_, a) in select_adapters(filter).await? {
            v.push(Self::from_adapter(&a).await?);
        }
        Ok(v)
    }

    pub fn backend(&self) -> String {
        BackendChoice::of(self.info.backend)
            .map(|b| b.name().to_string())
            .unwrap_or_else(|| format!("{:?}", self.info.backend).to_lowercase())
    }

    /// "vulkan/llvmpipe (LLVM 15.0.6, 256 bits)": how results name the adapter.
    pub fn adapter_label(&self) -> String {
        format!("{}/{}", self.backend(), self.info.name)
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// The most bytes one part of a weight takes (`gpu::Weight` splits a
    /// larger one).
    pub fn split_bytes(&self) -> u64 {
        self.split_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Split weights uploaded from now on into parts of at most `bytes`
    /// (at least 1024; never more than the binding limit). Tests use it to
    /// split small models.
    pub fn set_split_bytes(&self, bytes: u64) {
        let binding = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        self.split_bytes.store(
            bytes.clamp(1024, binding),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Check a storage binding size against the adapter's limit.
    pub fn check_binding(&self, what: impl Into<String>, bytes: u64) -> Result<()> {
        let max = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if bytes > max {
            return Err(Error::Limit {
                what: what.into(),
                needed: bytes,
                max,
            });
        }
        Ok(())
    }

    /// Check a 1-D workgroup count against the per-dimension limit.
    pub fn check_workgroups(&self, what: impl Into<String>, count: u64) -> Result<()> {
        let max = self.limits.max_compute_workgroups_per_dimension as u64;
        if count > max {
            return Err(Error::Limit {
                what: what.into(),
                needed: count,
                max,
            });
        }
        Ok(())
    }

    /// The compiled pipeline for `kernel`, built on first use.
    pub fn pipeline<K: KernelKey>(&self, kernel: &K) -> Result<std::sync::Arc<Pipeline>> {
        self.pipelines.get_or_build(self, kernel)
    }

    /// Pipelines built on this context so far (each kernel specialization
    /// once): how a test sees that a warm-up left nothing to compile.
    pub fn pipelines_built(&self) -> usize {
        self.pipelines.built()
    }

    /// Forget errors collected so far (before an operation whose errors we want).
    pub fn capture_errors(&self) {
        if let Ok(mut v) = self.errors.lock() {
            v.clear();
        }
    }

    /// Why the device was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// Turn errors wgpu reported since `capture_errors` into `Error::Gpu`
    /// (a lost device is one too).
    pub fn check_errors(&self, op: &str) -> Result<()> {
        if let Some(why) = self.lost() {
            return Err(Error::Gpu {
                op: op.into(),
                msg: format!("the GPU device was lost ({why})"),
            });
        }
        let mut v = self.errors.lock().map_err(|_| Error::Gpu {
            op: op.into(),
            msg: "error sink poisoned".into(),
        })?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(Error::Gpu { op: op.into(), msg })
    }

    /// Submit `encoder` and, natively, wait until the GPU is done.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.queue.submit(Some(encoder.finish()));
        self.wait()?;
        self.check_errors("submit")
    }

    /// Let the staging memory of the uploads so far go: natively, uploads
    /// (`Tensor::from_slice`, `Tensor::write`) keep a host copy of their
    /// bytes until a submit has run, so a model uploaded without one would
    /// hold twice its size in host memory at its peak. In the browser the
    /// GPU process owns that memory: a submit is all it takes.
    pub fn flush_uploads(&self) -> Result<()> {
        self.queue.submit(std::iter::empty());
        self.wait()?;
        self.check_errors("upload")
    }

    /// Natively: block until all submitted work is done. In the browser this is a
    /// no-op; use the async readback functions, which resolve when work is done.
    pub fn wait(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                op: "poll".into(),
                msg: e.to_string(),
            })?;
        Ok(())
    }
}
