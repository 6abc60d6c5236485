//! Buffers: typed tensors on the GPU, uploads, and async readback.
//!
//! Readback is `async` because in the browser mapping a buffer resolves on the
//! event loop (`mapAsync`); natively the future completes after a blocking
//! poll, so the CLI can wrap it in `pollster::block_on`.

use crate::error::{Error, Result};
use bytemuck::Pod;
use std::marker::PhantomData;
use wgpu::util::DeviceExt;

use super::GpuContext;

/// Usage of every storage tensor: bindable, copyable both ways.
pub const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A row-major tensor of `T` (f32 or u32) in a GPU storage buffer.
#[derive(Debug)]
pub struct Tensor<T> {
    pub buffer: wgpu::Buffer,
    pub shape: Vec<usize>,
    /// Counts the buffer's bytes in `GpuContext::tensor_bytes` while a
    /// handle lives.
    _live: std::sync::Arc<super::LiveBytes>,
    _t: PhantomData<T>,
}

/// A second handle to the same buffer (wgpu buffers are reference counted):
/// the model's parameter list and a layer's launchers share tensors this way.
impl<T> Clone for Tensor<T> {
    fn clone(&self) -> Self {
        Tensor {
            buffer: self.buffer.clone(),
            shape: self.shape.clone(),
            _live: self._live.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Pod> Tensor<T> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the logical contents (the buffer may be padded to 4 bytes).
    pub fn bytes(&self) -> u64 {
        (self.numel() * std::mem::size_of::<T>()) as u64
    }

    /// An uninitialized (zeroed) tensor.
    pub fn zeros(ctx: &GpuContext, label: &str, shape: &[usize]) -> Result<Self> {
        Self::with_usage(ctx, label, shape, STORAGE_USAGE)
    }

    /// A zeroed tensor with extra usages (e.g. `INDIRECT`).
    pub fn with_usage(
        ctx: &GpuContext,
        label: &str,
        shape: &[usize],
        usage: wgpu::BufferUsages,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        let bytes = padded_bytes::<T>(n);
        check_buffer(ctx, label, bytes)?;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        });
        Ok(Tensor {
            buffer,
            shape: shape.to_vec(),
            _live: ctx.live_bytes(bytes),
            _t: PhantomData,
        })
    }

    /// A tensor holding `data`, which must have `shape`'s element count.
    pub fn from_slice(ctx: &GpuContext, label: &str, shape: &[usize], data: &[T]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                op: "upload",
                expected: format!("{label} {shape:?} = {n} elements"),
                got: format!("{} elements", data.len()),
            });
        }
        let bytes = padded_bytes::<T>(n);
        check_buffer(ctx, label, bytes)?;
        // Written through the creation mapping: no padded copy of `data`.
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: STORAGE_USAGE,
            mapped_at_creation: true,
        });
        {
            let src = bytemuck::cast_slice::<T, u8>(data);
            let mut dst = buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Gpu {
                    op: "upload".into(),
                    msg: format!("{label}: {e}"),
                })?;
            // The padding stays as created: zeros.
            dst.slice(..src.len()).copy_from_slice(src);
        }
        buffer.unmap();
        Ok(Tensor {
            buffer,
            shape: shape.to_vec(),
            _live: ctx.live_bytes(bytes),
            _t: PhantomData,
        })
    }

    /// Overwrite the contents from the host (queued, ordered before later submits).
    pub fn write(&self, ctx: &GpuContext, data: &[T]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape(
                "write",
                format!("{:?} = {} elements", self.shape, self.numel()),
                data.len(),
            ));
        }
        ctx.queue
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Copy the contents back to the host.
    pub async fn read(&self, ctx: &GpuContext) -> Result<Vec<T>> {
        read_buffer(ctx, &self.buffer, self.numel()).await
    }

    /// Fail with `Error::Shape` unless the shape is `want`.
    pub fn expect_shape(&self, op: &'static str, name: &str, want: &[usize]) -> Result<()> {
        expect_shape(op, name, &self.shape, want)
    }
}

/// `Error::Shape` naming `name` unless `got` is `want` (tensors and weight
/// views alike).
pub(crate) fn expect_shape(
    op: &'static str,
    name: &str,
    got: &[usize],
    want: &[usize],
) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            op,
            format!("{name} {want:?}"),
            format!("{name} {got:?}"),
        ));
    }
    Ok(())
}

fn padded_bytes<T>(n: usize) -> u64 {
    // Zero-sized buffers cannot be bound; keep at least 16 bytes.
    (((n * std::mem::size_of::<T>()) as u64).div_ceil(16) * 16).max(16)
}

fn check_buffer(ctx: &GpuContext, label: &str, bytes: u64) -> Result<()> {
    if bytes > ctx.limits.max_buffer_size {
        return Err(Error::Limit {
            what: format!("buffer {label}"),
            needed: bytes,
            max: ctx.limits.max_buffer_size,
        });
    }
    Ok(())
}

/// A uniform buffer holding one params struct.
pub fn uniform<P: super::GpuParams>(ctx: &GpuContext, params: &P) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(P::WGSL_NAME),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
}

/// Read `count` elements of `T` from the start of `buffer` (a staging buffer
/// made for this one read: for a read per step, keep a [`Staging`]).
pub async fn read_buffer<T: Pod>(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    count: usize,
) -> Result<Vec<T>> {
    let bytes = (count * std::mem::size_of::<T>()) as u64;
    if count == 0 {
        return Ok(Vec::new());
    }
    let staging = Staging::new(ctx, "readback", bytes)?;
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("readback"),
        });
    staging.copy_from(&mut enc, buffer, 0, 0, bytes.div_ceil(4) * 4);
    ctx.submit("readback", enc)?;
    staging.read(ctx, count, &buffer_label(buffer)).await
}

/// A host-readable buffer, made once and read many times: the copies into it
/// are recorded in the step's own encoder, so a step that reads results back
/// (a decode step) is still one submit and creates nothing.
#[derive(Debug)]
pub struct Staging {
    pub buffer: wgpu::Buffer,
}

impl Staging {
    /// `bytes` (rounded up to 4) of mappable memory.
    pub fn new(ctx: &GpuContext, label: &str, bytes: u64) -> Result<Staging> {
        let size = bytes.div_ceil(4).max(1) * 4;
        check_buffer(ctx, label, size)?;
        Ok(Staging {
            buffer: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        })
    }

    /// Record a copy of `bytes` (a multiple of 4) from `src` at `src_offset`
    /// to `dst_offset` here.
    pub fn copy_from(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst_offset: u64,
        bytes: u64,
    ) {
        enc.copy_buffer_to_buffer(src, src_offset, &self.buffer, dst_offset, bytes);
    }

    /// Once the submitted work is done: the first `count` elements of `T`.
    /// `what` names the data in errors.
    pub async fn read<T: Pod>(&self, ctx: &GpuContext, count: usize, what: &str) -> Result<Vec<T>> {
        self.read_after(ctx, count, what, None).await
    }

    /// As `read`, once submission `after` is done (natively, later
    /// submissions keep running meanwhile); `None`: once all work is done.
    pub async fn read_after<T: Pod>(
        &self,
        ctx: &GpuContext,
        count: usize,
        what: &str,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<T>> {
        let bytes = (count * std::mem::size_of::<T>()) as u64;
        if bytes > self.buffer.size() {
            return Err(Error::shape(
                "readback",
                format!("at most {} bytes", self.buffer.size()),
                bytes,
            ));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        self.buffer.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        ctx.wait_for(after)?;
        let fail = |msg: String| Error::Readback {
            what: what.to_string(),
            msg,
        };
        rx.await
            .map_err(|_| fail("map callback dropped (device lost?)".into()))?
            .map_err(|e| {
                fail(match ctx.lost() {
                    Some(why) => format!("the GPU device was lost ({why})"),
                    None => e.to_string(),
                })
            })?;
        ctx.check_errors("readback")?;
        let out = {
            let view = self
                .buffer
                .slice(..bytes)
                .get_mapped_range()
                .map_err(|e| fail(e.to_string()))?;
            bytemuck::cast_slice::<u8, T>(&view).to_vec()
        };
        self.buffer.unmap();
        Ok(out)
    }
}

fn buffer_label(b: &wgpu::Buffer) -> String {
    format!("buffer of {} bytes", b.size())
}

/// Where one part of a [`Readback`] comes from and lands.
#[derive(Debug)]
struct ReadbackPart {
    src: wgpu::Buffer,
    src_offset: u64,
    /// First word of the part in the staging buffer.
    word: usize,
    words: usize,
}

/// A part of a [`Readback`]: returned by [`ReadbackLayout::push`], it
/// indexes the words that came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartId(usize);

/// The layout of a step's readback, defined once when the step is built:
/// each `push` reserves the next words of one staging buffer for a range of
/// a GPU buffer. Recording the copies and finding each part in the words
/// that come back both follow this one list.
#[derive(Debug, Default)]
pub struct ReadbackLayout {
    parts: Vec<ReadbackPart>,
    words: usize,
}

impl ReadbackLayout {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserve `bytes` (a multiple of 4) of `src` from `src_offset`.
    pub fn push(&mut self, src: &wgpu::Buffer, src_offset: u64, bytes: u64) -> PartId {
        let words = (bytes / 4) as usize;
        self.parts.push(ReadbackPart {
            src: src.clone(),
            src_offset,
            word: self.words,
            words,
        });
        self.words += words;
        PartId(self.parts.len() - 1)
    }

    /// The whole of `t`.
    pub fn push_tensor<T: Pod>(&mut self, t: &Tensor<T>) -> PartId {
        self.push(&t.buffer, 0, t.bytes())
    }

    /// Make the staging buffer.
    pub fn build(self, ctx: &GpuContext, label: &str) -> Result<Readback> {
        let staging = Staging::new(ctx, label, self.words as u64 * 4)?;
        Ok(Readback {
            staging,
            parts: self.parts,
            words: self.words,
            label: label.to_string(),
        })
    }
}

/// A staging buffer with its [`ReadbackLayout`]: made once per step shape.
#[derive(Debug)]
pub struct Readback {
    staging: Staging,
    parts: Vec<ReadbackPart>,
    words: usize,
    label: String,
}

impl Readback {
    /// Record the copy of part `id` in the step's encoder.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, id: PartId) {
        let p = &self.parts[id.0];
        self.record_range(enc, id, p.src_offset, p.words as u64 * 4);
    }

    /// Record the copy of every part.
    pub fn record_all(&self, enc: &mut wgpu::CommandEncoder) {
        for i in 0..self.parts.len() {
            self.record(enc, PartId(i));
        }
    }

    /// Record a copy of `bytes` of part `id`'s buffer from `src_offset` into
    /// the start of the part's place (fewer bytes than reserved: the rest of
    /// the part is left as it was).
    pub fn record_range(
        &self,
        enc: &mut wgpu::CommandEncoder,
        id: PartId,
        src_offset: u64,
        bytes: u64,
    ) {
        let p = &self.parts[id.0];
        let bytes = bytes.min(p.words as u64 * 4);
        if bytes > 0 {
            self.staging
                .copy_from(enc, &p.src, src_offset, p.word as u64 * 4, bytes);
        }
    }

    /// Once the submitted work is done: every word of the readback.
    pub async fn read(&self, ctx: &GpuContext) -> Result<ReadbackWords<'_>> {
        self.read_after(ctx, None).await
    }

    /// Once submission `after` is done (the one that recorded the copies):
    /// every word of the readback, while later submissions keep running.
    pub async fn read_after(
        &self,
        ctx: &GpuContext,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<ReadbackWords<'_>> {
        let words = self
            .staging
            .read_after::<u32>(ctx, self.words, &self.label, after)
            .await?;
        Ok(ReadbackWords { rb: self, words })
    }
}

/// The words of one [`Readback::read`].
pub struct ReadbackWords<'a> {
    rb: &'a Readback,
    words: Vec<u32>,
}

impl ReadbackWords<'_> {
    /// Part `id`'s words.
    pub fn u32s(&self, id: PartId) -> &[u32] {
        let p = &self.rb.parts[id.0];
        &self.words[p.word..p.word + p.words]
    }

    /// Part `id`'s words as f32.
    pub fn f32s(&self, id: PartId) -> Vec<f32> {
        self.u32s(id).iter().map(|&w| f32::from_bits(w)).collect()
    }

    /// Replace part `id`'s words (the same count).
    pub fn set_u32s(&mut self, id: PartId, v: &[u32]) {
        let p = &self.rb.parts[id.0];
        self.words[p.word..p.word + p.words].copy_from_slice(v);
    }

    /// Word `i` of part `id` as f32.
    pub fn f32_at(&self, id: PartId, i: usize) -> f32 {
        f32::from_bits(self.u32s(id)[i])
    }
}
