//! The driver's compiled pipelines, kept on disk between runs: wgpu's
//! `PipelineCache` (a Vulkan pipeline cache; wgpu 30 offers it on Vulkan
//! only), loaded when a device is made and written back when the last
//! handle of the device goes, if pipelines were built meanwhile.
//!
//! Where: `$AMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/amoe`, else
//! `$HOME/.cache/amoe`; `AMOE_CACHE_DIR=off` turns it off. One file per
//! adapter and driver (`wgpu::util::pipeline_cache_key` and a hash of the
//! driver's name and version), framed with a magic, its length and a
//! checksum: a cut or damaged file is ignored (and replaced), never handed
//! to the driver. wgpu and the driver check the data's own header against
//! the adapter and driver version too, and start empty when it differs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 8] = b"AMOEPC01";

pub(crate) struct DiskCache {
    pub(crate) cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Pipelines were built with the cache since it was loaded or saved.
    dirty: AtomicBool,
    /// Bytes of driver data loaded (0: none, or none usable).
    pub(crate) loaded_bytes: usize,
}

/// FNV-1a, 64 bits: a checksum against cut or damaged files, not an
/// adversary (the cache directory is the user's own).
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("AMOE_CACHE_DIR") {
        Some(d) if d == "off" || d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("amoe"))
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|d| !d.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache").join("amoe"))
            }),
    }
}

/// The payload of a file written by `frame`, if it is whole.
fn unframe(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let sum = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    let data = rest.get(16..)?;
    (data.len() as u64 == len && fnv64(data) == sum).then_some(data)
}

fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 24);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv64(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

impl DiskCache {
    /// The cache of this adapter and driver, loaded from disk where a whole
    /// file is there; `None` where the device has no `PIPELINE_CACHE` or
    /// there is no cache directory.
    pub(crate) fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<DiskCache> {
        if !device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(info)?;
        let driver =
            fnv64(format!("{}\n{}\n{}", info.name, info.driver, info.driver_info).as_bytes());
        let path = cache_dir()?.join(format!("{key}_{driver:016x}.bin"));
        let file = std::fs::read(&path).ok();
        let data = file.as_deref().and_then(unframe);
        // SAFETY: `data` is what `PipelineCache::get_data` returned on an
        // adapter with this pipeline-cache key and this driver (the file's
        // name), checked whole by its checksum; wgpu validates its header
        // against the device and, with `fallback`, starts empty where it
        // does not match.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("amoe pipelines"),
                data,
                fallback: true,
            })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: AtomicBool::new(false),
            loaded_bytes: data.map_or(0, |d| d.len()),
        })
    }

    /// A pipeline was built with the cache: it has news to save.
    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Write the cache's data if pipelines were built since the last save:
    /// to a temporary file, then renamed over the old one, so a reader sees
    /// the old file or the new one, never half of one.
    pub(crate) fn save(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let Some(data) = self.cache.get_data() else {
            return Ok(());
        };
        write_atomically(&self.path, &frame(&data))
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl Drop for DiskCache {
    /// The last handle of the device is going: keep what was compiled. A
    /// cache that cannot be written (a read-only home) costs the next run
    /// its compile time, nothing else.
    fn drop(&mut self) {
        let _ = self.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_refuses_damage() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let f = frame(&data);
        assert_eq!(unframe(&f), Some(&data[..]));
        // Cut anywhere, or one byte changed: refused.
        for cut in [0, 7, 8, 23, 24, f.len() - 1] {
            assert_eq!(unframe(&f[..cut]), None, "cut at {cut}");
        }
        for i in [0, 9, 17, 30, f.len() - 1] {
            let mut g = f.clone();
            g[i] ^= 0x10;
            assert_eq!(unframe(&g), None, "byte {i} changed");
        }
        assert_eq!(unframe(&frame(&[])), Some(&[][..]));
    }
}
