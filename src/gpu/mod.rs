//! GPU context: adapter discovery and selection, device creation with the
//! adapter's real limits and the optional features amoe can use, the typed
//! pipeline cache and buffer helpers.
//!
//! "Get a device" (this module) is kept apart from "run on a device"
//! (`kernels`, `moe`), so tests and the browser can bring their own context.

mod buffer;
#[cfg(not(target_arch = "wasm32"))]
mod disk_cache;
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
    let f = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
    // Compiled pipelines kept on disk between runs (`gpu::disk_cache`).
    #[cfg(not(target_arch = "wasm32"))]
    let f = f | wgpu::Features::PIPELINE_CACHE;
    f
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

/// A tensor's bytes, counted in `GpuContext::tensor_bytes` while it lives.
#[derive(Debug)]
pub struct LiveBytes {
    bytes: u64,
    total: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for LiveBytes {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
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
    /// Shared by every handle of the device (`handle`).
    pipelines: std::sync::Arc<PipelineCache>,
    /// Errors wgpu reported outside every error scope (another thread's
    /// work), collected instead of the default handler's panic and turned
    /// into `Error::Gpu` by the next `check_errors` of any handle. Each
    /// fallible operation runs in its own scopes (`error_scope`), so this
    /// is the exception.
    uncaptured: ErrorList,
    /// This handle's scoped errors whose answer came after the operation
    /// returned (in the browser, a popped scope answers with a promise):
    /// reported by this handle's next `check_errors`, never another's.
    deferred: ErrorList,
    /// This handle's popped scopes whose answer has not come yet (the
    /// browser): `settled_errors` waits for them.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    unanswered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Why the device was lost, once it is (a driver reset, a browser tab
    /// whose GPU process restarted): every later call fails with it.
    lost: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Weights larger than this many bytes are split into parts (see
    /// `gpu::Weight`): the adapter's storage-binding limit, or less where
    /// `AMOE_SPLIT_BYTES` (bytes) or `set_split_bytes` asks for less.
    split_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of the tensors (storage buffers) alive on the device.
    tensor_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The driver's compiled pipelines kept on disk (where the adapter
    /// offers a pipeline cache): written when the last handle goes.
    #[cfg(not(target_arch = "wasm32"))]
    disk_cache: Option<std::sync::Arc<disk_cache::DiskCache>>,
    /// Kernels are chosen for a long run (see `set_long_running`).
    long_running: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

type ErrorList = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// The error filters every scope catches.
const SCOPE_FILTERS: [wgpu::ErrorFilter; 3] = [
    wgpu::ErrorFilter::Validation,
    wgpu::ErrorFilter::OutOfMemory,
    wgpu::ErrorFilter::Internal,
];

/// The GPU errors of the calls made while it is open: validation,
/// out-of-memory and internal error scopes pushed by
/// `GpuContext::error_scope`, popped by `finish`. Scopes belong to the
/// calling thread and nest; one must never be held across an `.await`
/// (another object's work could run inside it), so they wrap synchronous
/// stretches of work: a pipeline build, an upload, an encoder's submit.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub struct ErrorScope<'a> {
    ctx: &'a GpuContext,
    /// Innermost last.
    guards: Vec<wgpu::ErrorScopeGuard>,
}

impl ErrorScope<'_> {
    /// Pop the scopes (innermost first) and return what they caught, as
    /// `Error::Gpu` naming `op`. Natively the answer is immediate. In the
    /// browser it comes later: it is kept by this handle and reported by
    /// its next `check_errors` (every object of the page calls it when its
    /// operation's results are read back).
    pub fn finish(mut self, op: &str) -> Result<()> {
        let answers: Vec<_> = std::mem::take(&mut self.guards)
            .into_iter()
            .rev()
            .map(|g| g.pop())
            .collect();
        #[cfg(not(target_arch = "wasm32"))]
        {
            let msgs: Vec<String> = answers
                .into_iter()
                .filter_map(pollster::block_on)
                .map(|e| e.to_string())
                .collect();
            if msgs.is_empty() {
                Ok(())
            } else {
                Err(Error::Gpu {
                    op: op.into(),
                    msg: msgs.join("; "),
                })
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            for answer in answers {
                let sink = self.ctx.deferred.clone();
                let unanswered = self.ctx.unanswered.clone();
                unanswered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let op = op.to_string();
                wasm_bindgen_futures::spawn_local(async move {
                    if let Some(e) = answer.await {
                        if let Ok(mut v) = sink.lock() {
                            v.push(format!("{op}: {e}"));
                        }
                    }
                    unanswered.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            Ok(())
        }
    }
}

impl Drop for ErrorScope<'_> {
    /// An unfinished scope (an early return) still pops in order.
    fn drop(&mut self) {
        while let Some(g) = self.guards.pop() {
            drop(g.pop());
        }
    }
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
        let uncaptured: ErrorList = Default::default();
        let sink = uncaptured.clone();
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
        #[cfg(not(target_arch = "wasm32"))]
        let disk_cache = disk_cache::DiskCache::open(&device, &info).map(std::sync::Arc::new);
        Ok(GpuContext {
            queue,
            info,
            features,
            limits,
            pipelines: Default::default(),
            uncaptured,
            deferred: Default::default(),
            unanswered: Default::default(),
            lost,
            split_bytes: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
                asked.map_or(binding, |a| a.min(binding)),
            )),
            tensor_bytes: Default::default(),
            #[cfg(not(target_arch = "wasm32"))]
            disk_cache,
            long_running: Default::default(),
            device,
        })
    }

    /// Another handle on the same device, for another object (the page's
    /// generator and trainer): the same queue, pipelines and limits, but
    /// its own GPU errors, so an error in one object's work is reported by
    /// that object and never cleared or taken by another.
    pub fn handle(&self) -> GpuContext {
        GpuContext {
            device: self.device.clone(),
            queue: self.queue.clone(),
            info: self.info.clone(),
            features: self.features,
            limits: self.limits.clone(),
            pipelines: self.pipelines.clone(),
            uncaptured: self.uncaptured.clone(),
            deferred: Default::default(),
            unanswered: Default::default(),
            lost: self.lost.clone(),
            split_bytes: self.split_bytes.clone(),
            tensor_bytes: self.tensor_bytes.clone(),
            #[cfg(not(target_arch = "wasm32"))]
            disk_cache: self.disk_cache.clone(),
            long_running: self.long_running.clone(),
        }
    }

    /// Choose kernels for a long run from now on (training, `bench
    /// kernels`): those that run fastest even where they take longest to
    /// compile (lavapipe's subgroup GEMM cores, see
    /// `kernels::matmul::subgroup_cores_pay`). By default a device favours
    /// kernels that compile fast: the wait for a first token.
    pub fn set_long_running(&self, long: bool) {
        self.long_running
            .store(long, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn long_running(&self) -> bool {
        self.long_running.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pipeline cache pipelines are built with, if any.
    pub(crate) fn driver_cache(&self) -> Option<&wgpu::PipelineCache> {
        #[cfg(not(target_arch = "wasm32"))]
        return self.disk_cache.as_ref().map(|c| &c.cache);
        #[cfg(target_arch = "wasm32")]
        None
    }

    /// A pipeline was built with `driver_cache`.
    pub(crate) fn driver_cache_grew(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(c) = &self.disk_cache {
            c.mark_dirty();
        }
    }

    /// Bytes of compiled pipelines this device started with from disk (0:
    /// none, or no pipeline cache on this adapter).
    pub fn pipeline_cache_loaded_bytes(&self) -> usize {
        #[cfg(not(target_arch = "wasm32"))]
        return self.disk_cache.as_ref().map_or(0, |c| c.loaded_bytes);
        #[cfg(target_arch = "wasm32")]
        0
    }

    /// Write the pipeline cache now (it is written anyway when the last
    /// handle of the device goes).
    pub fn save_pipeline_cache(&self) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(c) = &self.disk_cache {
            c.save().map_err(|e| Error::Gpu {
                op: "saving the pipeline cache".into(),
                msg: e.to_string(),
            })?;
        }
        Ok(())
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

    /// Bytes of the tensors alive on the device (every handle's; a tensor
    /// counts until its last handle drops).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensor_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `bytes` counted in `tensor_bytes` until the returned guard drops.
    pub(crate) fn live_bytes(&self, bytes: u64) -> std::sync::Arc<LiveBytes> {
        self.tensor_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        std::sync::Arc::new(LiveBytes {
            bytes,
            total: self.tensor_bytes.clone(),
        })
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

    /// Where the pipeline builds on this device spent their time so far.
    pub fn pipeline_build_times(&self) -> BuildTimes {
        self.pipelines.times()
    }

    /// Open error scopes around the calls that follow (see `ErrorScope`).
    pub fn error_scope(&self) -> ErrorScope<'_> {
        ErrorScope {
            ctx: self,
            guards: SCOPE_FILTERS
                .iter()
                .map(|&f| self.device.push_error_scope(f))
                .collect(),
        }
    }

    /// Run `f` inside error scopes: its own error first, else what the GPU
    /// reported of its calls (`op` names them).
    pub fn scoped<T>(&self, op: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let scope = self.error_scope();
        let r = f();
        let gpu = scope.finish(op);
        let v = r?;
        gpu?;
        Ok(v)
    }

    /// Finish and submit `encoder`, its errors caught as `op`'s (a command
    /// encoder's recording errors surface when it is finished).
    pub fn submit(&self, op: &str, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.scoped(op, || {
            self.queue.submit(Some(encoder.finish()));
            Ok(())
        })
    }

    /// `submit`, returning the submission's index: wait for it alone with
    /// `wait_for` (later submissions may still run), or read a staging
    /// buffer it filled with `Readback::read_after`.
    pub fn submit_indexed(
        &self,
        op: &str,
        encoder: wgpu::CommandEncoder,
    ) -> Result<wgpu::SubmissionIndex> {
        self.scoped(op, || Ok(self.queue.submit(Some(encoder.finish()))))
    }

    /// Why the device was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|l| l.clone())
    }

    /// Turn what is pending into `Error::Gpu`: a lost device, this handle's
    /// scoped errors that answered late (the browser), errors caught outside
    /// every scope. Objects call it when an operation's results are read.
    pub fn check_errors(&self, op: &str) -> Result<()> {
        if let Some(why) = self.lost() {
            return Err(Error::Gpu {
                op: op.into(),
                msg: format!("the GPU device was lost ({why})"),
            });
        }
        let mut msgs = Vec::new();
        for list in [&self.deferred, &self.uncaptured] {
            let mut v = list.lock().map_err(|_| Error::Gpu {
                op: op.into(),
                msg: "error list poisoned".into(),
            })?;
            msgs.append(&mut v);
        }
        if msgs.is_empty() {
            return Ok(());
        }
        Err(Error::Gpu {
            op: op.into(),
            msg: msgs.join("; "),
        })
    }

    /// `check_errors` once every scope this handle has popped has answered:
    /// in the browser a scope's answer is a promise that may resolve after
    /// the operation's readback (the event loop runs until they have come,
    /// at most about 10 s); natively they answered at once.
    pub async fn settled_errors(&self, op: &str) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let start = web_time::Instant::now();
            while self.unanswered.load(std::sync::atomic::Ordering::SeqCst) > 0
                && start.elapsed().as_secs_f64() < 10.0
            {
                crate::web::yield_to_browser().await;
            }
        }
        self.check_errors(op)
    }

    /// Submit `encoder` and, natively, wait until the GPU is done.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.submit("submit", encoder)?;
        self.wait()?;
        self.check_errors("submit")
    }

    /// Let the staging memory of the uploads so far go: natively, uploads
    /// (`Tensor::from_slice`, `Tensor::write`) keep a host copy of their
    /// bytes until a submit has run, so a model uploaded without one would
    /// hold twice its size in host memory at its peak. In the browser the
    /// GPU process owns that memory: a submit is all it takes.
    pub fn flush_uploads(&self) -> Result<()> {
        self.scoped("upload", || {
            self.queue.submit(std::iter::empty());
            Ok(())
        })?;
        self.wait()?;
        self.check_errors("upload")
    }

    /// Natively: block until all submitted work is done. In the browser this is a
    /// no-op; use the async readback functions, which resolve when work is done.
    pub fn wait(&self) -> Result<()> {
        self.wait_for(None)
    }

    /// Natively: block until submission `index` (all work, when `None`) is
    /// done; submissions after it may still run. A no-op in the browser.
    pub fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| Error::Gpu {
                op: "poll".into(),
                msg: e.to_string(),
            })?;
        #[cfg(target_arch = "wasm32")]
        let _ = index;
        Ok(())
    }
}
