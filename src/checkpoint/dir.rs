//! The checkpoint directory (native only): the five files written
//! atomically and read back, with recovery of a save interrupted between
//! its renames (see the module docs of `checkpoint` for the format).

use super::{
    check_tensors, parse_raw, parse_shards, safetensors_bytes, FileBytes, NamedTensor, RawTensor,
    CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, SHARD_INDEX_FILE, STATE_FILE, TOKENIZER_FILE,
};
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What [`save`] writes; borrows everything.
pub struct CheckpointData<'a, C: Serialize, S: Serialize> {
    pub model: &'a [NamedTensor],
    pub optimizer: &'a [NamedTensor],
    pub config: &'a C,
    pub tokenizer_json: &'a str,
    pub state: &'a S,
}

/// What [`load`] reads. Tensors are in the file's order (sorted by name).
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint<C, S> {
    /// The directory actually read (`.<name>.old` after an interrupted save).
    pub dir: PathBuf,
    pub model: Vec<NamedTensor>,
    pub optimizer: Vec<NamedTensor>,
    pub config: C,
    pub tokenizer_json: String,
    pub state: S,
}

impl<C, S> LoadedCheckpoint<C, S> {
    /// [`check_tensors`] on `model.safetensors`.
    pub fn check_model(&self, expected: &[(&str, &[usize])]) -> Result<()> {
        check_tensors(self.dir.join(MODEL_FILE).display(), &self.model, expected)
    }

    /// [`check_tensors`] on `optimizer.safetensors`.
    pub fn check_optimizer(&self, expected: &[(&str, &[usize])]) -> Result<()> {
        check_tensors(
            self.dir.join(OPTIMIZER_FILE).display(),
            &self.optimizer,
            expected,
        )
    }
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `.<name>.tmp` and `.<name>.old` next to `dir`.
fn siblings(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::checkpoint(dir.display(), "not a directory name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((
        parent.join(format!(".{name}.tmp")),
        parent.join(format!(".{name}.old")),
    ))
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Makes renames and new entries durable. Windows cannot open a folder as a file; there
    // the renames are as durable as the filesystem makes them.
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Write `bytes` to `path` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path, e)),
        _ => Ok(()),
    }
}

/// Where a save is, for the fault-injection hook of the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// `.<name>.tmp` written and synced; nothing renamed yet.
    Written,
    /// The previous checkpoint renamed to `.<name>.old` (first rename).
    OldMovedAside,
    /// The new one renamed into place (second rename); old not yet removed.
    Renamed,
}

/// Writes the checkpoint to `dir` atomically (see the module docs).
pub fn save<C: Serialize, S: Serialize>(
    dir: impl AsRef<Path>,
    data: &CheckpointData<C, S>,
) -> Result<()> {
    save_with(dir.as_ref(), data, &mut |_| Ok(()))
}

fn save_with<C: Serialize, S: Serialize>(
    dir: &Path,
    data: &CheckpointData<C, S>,
    hook: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<()> {
    let (tmp, old) = siblings(dir)?;
    recover(dir)?;
    remove_dir_if_present(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;

    write_synced(&tmp.join(MODEL_FILE), &safetensors_bytes(data.model)?)?;
    write_synced(
        &tmp.join(OPTIMIZER_FILE),
        &safetensors_bytes(data.optimizer)?,
    )?;
    write_synced(
        &tmp.join(CONFIG_FILE),
        serde_json::to_string_pretty(data.config)?.as_bytes(),
    )?;
    write_synced(&tmp.join(TOKENIZER_FILE), data.tokenizer_json.as_bytes())?;
    write_synced(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(data.state)?.as_bytes(),
    )?;
    sync_dir(&tmp)?;
    hook(Step::Written)?;

    let had_old = dir.exists();
    if had_old {
        remove_dir_if_present(&old)?;
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
        hook(Step::OldMovedAside)?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io(&tmp, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    hook(Step::Renamed)?;
    if had_old {
        remove_dir_if_present(&old)?;
    }
    Ok(())
}

/// The whole checkpoint to read for `dir`, newest first: `dir` itself; or,
/// after a save interrupted between its two renames (`dir` missing,
/// `.<name>.old` present), `.<name>.tmp`, the new checkpoint, which was
/// written and synced before the old one was moved aside; or `.<name>.old`
/// if the new one is gone. None when there is no checkpoint. (A `.tmp`
/// without an `.old` may be a save cut short: never read.)
pub fn whole_checkpoint(dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    let dir = dir.as_ref();
    let (tmp, old) = siblings(dir)?;
    Ok(if dir.is_dir() {
        Some(dir.to_path_buf())
    } else if old.is_dir() && tmp.is_dir() {
        Some(tmp)
    } else if old.is_dir() {
        Some(old)
    } else {
        None
    })
}

/// After a save interrupted between its two renames, `dir` is missing: put
/// the newest whole checkpoint in its place (see [`whole_checkpoint`]) and
/// remove the older one. Does nothing otherwise.
pub fn recover(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let (_, old) = siblings(dir)?;
    if dir.exists() {
        return Ok(());
    }
    if let Some(whole) = whole_checkpoint(dir)? {
        std::fs::rename(&whole, dir).map_err(|e| io(&whole, e))?;
        if whole != old {
            remove_dir_if_present(&old)?;
        }
    }
    Ok(())
}

fn file_error(path: &Path, e: std::io::Error) -> Error {
    let msg = if e.kind() == std::io::ErrorKind::NotFound {
        "missing".to_string()
    } else {
        e.to_string()
    };
    Error::checkpoint(path.display(), msg)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

/// The tensors of one safetensors file (F32, F16 or BF16, as f32), sorted
/// by name, read into memory.
pub fn read_tensors(path: impl AsRef<Path>) -> Result<Vec<NamedTensor>> {
    Ok(read_raw(path)?.iter().map(RawTensor::to_named).collect())
}

/// The tensors of one safetensors file, sorted by name, over a memory map
/// of it: nothing is read until a tensor's values are asked for.
pub fn read_raw(path: impl AsRef<Path>) -> Result<Vec<RawTensor>> {
    let path = path.as_ref();
    parse_raw(&path.display().to_string(), map_file(path)?)
}

/// A file's bytes through a read-only memory map (an empty file: no bytes).
pub fn map_file(path: &Path) -> Result<FileBytes> {
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    let len = file.metadata().map_err(|e| io(path, e))?.len();
    if len == 0 {
        // Nothing to map; the parser says what is wrong with an empty file.
        return Ok(FileBytes::new(Vec::new()));
    }
    // SAFETY: a read-only map, kept while the tensors over it live (a
    // model's load). As with any memory-mapped loader, a file truncated by
    // another process meanwhile would fault; a file rewritten in place can
    // only give wrong values, which the parse checks as far as the format
    // allows.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(path, e))?;
    Ok(FileBytes::new(map))
}

/// The model tensors of a directory: `model.safetensors`, or the shards
/// that `model.safetensors.index.json` names (each checked against it),
/// read into memory.
pub fn read_model_tensors(dir: impl AsRef<Path>) -> Result<Vec<NamedTensor>> {
    Ok(read_model_raw(dir)?
        .iter()
        .map(RawTensor::to_named)
        .collect())
}

/// [`read_model_tensors`] over memory maps, nothing read yet.
pub fn read_model_raw(dir: impl AsRef<Path>) -> Result<Vec<RawTensor>> {
    let dir = dir.as_ref();
    let single = dir.join(MODEL_FILE);
    let index = dir.join(SHARD_INDEX_FILE);
    if single.exists() || !index.exists() {
        return read_raw(single);
    }
    let bytes = read_file(&index)?;
    parse_shards(&index.display().to_string(), &bytes, |file| {
        let path = dir.join(file);
        Ok((path.display().to_string(), read_raw(&path)?))
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::checkpoint(path.display(), e.to_string()))
}

/// Reads the checkpoint in `dir` (or, after a save interrupted between its renames, the
/// previous one kept in `.<name>.old`). `config.json` and `state.json` are parsed into `C`
/// and `S` (use `serde_json::Value` to read them untyped).
pub fn load<C: DeserializeOwned, S: DeserializeOwned>(
    dir: impl AsRef<Path>,
) -> Result<LoadedCheckpoint<C, S>> {
    let dir = match whole_checkpoint(dir.as_ref())? {
        Some(d) => d,
        None => {
            return Err(Error::checkpoint(
                dir.as_ref().display(),
                "no checkpoint directory here",
            ))
        }
    };
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = String::from_utf8(read_file(&tokenizer_path)?)
        .map_err(|_| Error::checkpoint(tokenizer_path.display(), "not UTF-8"))?;
    Ok(LoadedCheckpoint {
        model: read_tensors(dir.join(MODEL_FILE))?,
        optimizer: read_tensors(dir.join(OPTIMIZER_FILE))?,
        config: read_json(&dir.join(CONFIG_FILE))?,
        tokenizer_json,
        state: read_json(&dir.join(STATE_FILE))?,
        dir,
    })
}

/// Write a directory `out` atomically: `fill` writes its files into the
/// sibling `.<name>.<op>-tmp` (each fsynced, see [`write_synced`]), which is
/// then fsynced and renamed into place, so that `out` never holds half of
/// it. `out` must be absent or an empty directory unless `overwrite` (its
/// old contents are then removed once the new ones are in place). `op`
/// names the command in errors.
pub fn write_dir_atomic(
    out: &Path,
    overwrite: bool,
    op: &'static str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let exists = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(Error::invalid(
                op,
                format!("{} exists and is not a directory", out.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(out, e)),
    };
    if exists && !overwrite {
        let mut entries = std::fs::read_dir(out).map_err(|e| io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::invalid(
                op,
                format!(
                    "{} is not empty (pass --overwrite to replace it)",
                    out.display()
                ),
            ));
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(op, format!("{}: not a directory name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.{op}-tmp"));
    let old = parent.join(format!(".{name}.{op}-old"));
    let remove = remove_dir_if_present;
    remove(&tmp)?;
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        // Nothing half-written is left behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    #[cfg(unix)]
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&tmp, e))?;
    if exists {
        remove(&old)?;
        std::fs::rename(out, &old).map_err(|e| io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| io(&tmp, e))?;
    #[cfg(unix)]
    std::fs::File::open(&parent)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&parent, e))?;
    if exists {
        remove(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};
    use serde::Deserialize;
    use std::collections::BTreeSet;
    use std::collections::HashMap;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Cfg {
        d: usize,
        layers: usize,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct State {
        step: u64,
        order: Vec<usize>,
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("amoe_ckpt_{}_{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn tensors(step: u64) -> (Vec<NamedTensor>, Vec<NamedTensor>) {
        let w = NamedTensor::new(
            "layer0.w",
            vec![2, 3],
            (0..6).map(|i| i as f32 + step as f32).collect(),
        )
        .unwrap();
        let b = NamedTensor::new("layer0.b", vec![3], vec![-1.5, f32::MIN_POSITIVE, 1e30]).unwrap();
        let m = NamedTensor::new("m.layer0.w", vec![2, 3], vec![0.25; 6]).unwrap();
        let v = NamedTensor::new("v.layer0.w", vec![2, 3], vec![0.5; 6]).unwrap();
        (vec![w, b], vec![m, v])
    }

    fn save_step(dir: &Path, step: u64) -> Result<()> {
        let (model, opt) = tensors(step);
        save(
            dir,
            &CheckpointData {
                model: &model,
                optimizer: &opt,
                config: &Cfg { d: 8, layers: 2 },
                tokenizer_json: "{\"tok\": 1}",
                state: &State {
                    step,
                    order: vec![2, 0, 1],
                },
            },
        )
    }

    fn step_of(dir: &Path) -> u64 {
        load::<Cfg, State>(dir).unwrap().state.step
    }

    #[test]
    fn roundtrip() {
        let root = tmp("roundtrip");
        let dir = root.join("ckpt");
        save_step(&dir, 7).unwrap();
        let ck: LoadedCheckpoint<Cfg, State> = load(&dir).unwrap();
        let (model, opt) = tensors(7);
        let mut sorted = model.clone();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(ck.model, sorted);
        assert_eq!(ck.optimizer, opt);
        assert_eq!(ck.config, Cfg { d: 8, layers: 2 });
        assert_eq!(ck.state.order, vec![2, 0, 1]);
        assert_eq!(ck.tokenizer_json, "{\"tok\": 1}");
        ck.check_model(&[("layer0.w", &[2, 3]), ("layer0.b", &[3])])
            .unwrap();
        // Untyped read and overwrite in place.
        save_step(&dir, 8).unwrap();
        let raw: LoadedCheckpoint<serde_json::Value, serde_json::Value> = load(&dir).unwrap();
        assert_eq!(raw.state["step"], 8);
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["ckpt"], "no temporary folder left behind");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A save killed at each of its steps (after the new files are written,
    /// after each rename) leaves a checkpoint that loads: the newest whole
    /// one, and the next save puts everything in order.
    #[test]
    fn a_save_killed_at_every_step_leaves_a_loadable_checkpoint() {
        for (at, want) in [
            (Step::Written, 1),
            (Step::OldMovedAside, 2),
            (Step::Renamed, 2),
        ] {
            let root = tmp(&format!("kill_{at:?}"));
            let dir = root.join("ckpt");
            save_step(&dir, 1).unwrap();
            let (model, opt) = tensors(2);
            let data = CheckpointData {
                model: &model,
                optimizer: &opt,
                config: &Cfg { d: 8, layers: 2 },
                tokenizer_json: "{}",
                state: &State {
                    step: 2,
                    order: vec![],
                },
            };
            let killed = save_with(&dir, &data, &mut |s| {
                if s == at {
                    Err(Error::checkpoint("test", "killed"))
                } else {
                    Ok(())
                }
            });
            assert!(killed.is_err());
            assert_eq!(step_of(&dir), want, "killed at {at:?}");
            save_step(&dir, 3).unwrap();
            assert_eq!(step_of(&dir), 3, "after {at:?}");
            let names: Vec<_> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names, ["ckpt"], "after {at:?}");
            std::fs::remove_dir_all(&root).unwrap();
        }
        // The first save of a run, killed before its rename: no checkpoint
        // (the unfinished .tmp is never read); killed after it: the new one.
        let root = tmp("kill_first");
        let dir = root.join("ckpt");
        let (model, opt) = tensors(5);
        let data = CheckpointData {
            model: &model,
            optimizer: &opt,
            config: &Cfg { d: 8, layers: 2 },
            tokenizer_json: "{}",
            state: &State {
                step: 5,
                order: vec![],
            },
        };
        let _ = save_with(&dir, &data, &mut |s| {
            if s == Step::Written {
                Err(Error::checkpoint("test", "killed"))
            } else {
                Ok(())
            }
        });
        assert!(load::<Cfg, State>(&dir).is_err());
        let _ = save_with(&dir, &data, &mut |s| {
            if s == Step::Renamed {
                Err(Error::checkpoint("test", "killed"))
            } else {
                Ok(())
            }
        });
        assert_eq!(step_of(&dir), 5);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn failed_save_keeps_previous() {
        let root = tmp("fail");
        let dir = root.join("ckpt");
        save_step(&dir, 1).unwrap();
        // A config that serde_json cannot write (non-string map keys) fails the save after
        // both safetensors files were written.
        let bad: HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let (model, opt) = tensors(2);
        let err = save(
            &dir,
            &CheckpointData {
                model: &model,
                optimizer: &opt,
                config: &bad,
                tokenizer_json: "{}",
                state: &0,
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::Json(_)));
        assert!(root.join(".ckpt.tmp").join(MODEL_FILE).exists());
        assert_eq!(step_of(&dir), 1);
        // Interrupted between the renames: the checkpoint folder is gone for a moment.
        let (model, opt) = tensors(3);
        let data = CheckpointData {
            model: &model,
            optimizer: &opt,
            config: &Cfg { d: 8, layers: 2 },
            tokenizer_json: "{}",
            state: &State {
                step: 3,
                order: vec![],
            },
        };
        let err = save_with(&dir, &data, &mut |s| {
            if s == Step::OldMovedAside {
                Err(Error::checkpoint("test", "crash"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, Error::Checkpoint { .. }));
        assert!(!dir.exists());
        assert_eq!(
            step_of(&dir),
            3,
            "load reads the new checkpoint, whole in .tmp once the old one moved aside"
        );
        // The next save puts it in place and then replaces it, cleaning up.
        save_step(&dir, 4).unwrap();
        assert_eq!(step_of(&dir), 4);
        assert!(!root.join(".ckpt.old").exists() && !root.join(".ckpt.tmp").exists());
        // A bad tensor is refused before anything is touched.
        let bad_t = vec![NamedTensor {
            name: "x".into(),
            shape: vec![2, 2],
            data: vec![0.0; 3],
        }];
        let err = save(
            &dir,
            &CheckpointData {
                model: &bad_t,
                optimizer: &[],
                config: &0,
                tokenizer_json: "",
                state: &0,
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }));
        assert_eq!(step_of(&dir), 4);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn load_errors_name_the_file() {
        let root = tmp("errors");
        let dir = root.join("ckpt");
        let file_err = |dir: &Path, file: &str| match load::<Cfg, State>(dir) {
            Err(Error::Checkpoint { path, msg }) => {
                assert!(path.ends_with(file), "{path} should name {file} ({msg})");
                msg
            }
            other => panic!("expected a checkpoint error for {file}, got {other:?}"),
        };
        assert!(matches!(
            load::<Cfg, State>(&dir),
            Err(Error::Checkpoint { .. })
        ));

        save_step(&dir, 1).unwrap();
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        assert_eq!(file_err(&dir, STATE_FILE), "missing");

        save_step(&dir, 1).unwrap();
        let p = dir.join(MODEL_FILE);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        assert!(file_err(&dir, MODEL_FILE).contains("safetensors"));
        std::fs::write(&p, b"garbage").unwrap();
        file_err(&dir, MODEL_FILE);

        save_step(&dir, 1).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), "{\"d\": 8,").unwrap();
        file_err(&dir, CONFIG_FILE);
        std::fs::write(dir.join(CONFIG_FILE), "{\"d\": \"eight\", \"layers\": 2}").unwrap();
        file_err(&dir, CONFIG_FILE);

        // A non-f32 tensor.
        save_step(&dir, 1).unwrap();
        let raw = [0u8; 4];
        let view = TensorView::new(Dtype::I32, vec![1], &raw).unwrap();
        let st = safetensors::serialize([("ids", view)], None).unwrap();
        std::fs::write(dir.join(OPTIMIZER_FILE), st).unwrap();
        assert!(file_err(&dir, OPTIMIZER_FILE).contains("I32"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn hf_fixtures() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("config.json").exists())
            .collect();
        dirs.sort();
        assert!(
            dirs.len() >= 9,
            "{} fixtures under {}",
            dirs.len(),
            root.display()
        );
        dirs
    }

    /// Every tensor the reference library stored (`expected.json`'s
    /// `tensors`: name -> dtype, shape) comes back with its shape, from one
    /// file or from shards, and F16/BF16 values convert exactly.
    #[test]
    fn reads_the_hugging_face_fixtures_f32_f16_bf16_and_shards() {
        let mut dtypes = BTreeSet::new();
        let mut sharded = 0;
        for dir in hf_fixtures() {
            let expected: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
            let want = expected["tensors"].as_object().unwrap();
            let got = read_model_tensors(&dir).unwrap();
            assert_eq!(got.len(), want.len(), "{}", dir.display());
            sharded += usize::from(dir.join(SHARD_INDEX_FILE).exists());
            for t in &got {
                let w = &want[&t.name];
                let shape: Vec<usize> = w["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(t.shape, shape, "{} {}", dir.display(), t.name);
                assert_eq!(t.data.len(), shape.iter().product::<usize>());
                let dtype = w["dtype"].as_str().unwrap().to_string();
                // Converted values are exactly those of the stored type.
                let exact = |x: f32| match dtype.as_str() {
                    "BF16" => half::bf16::from_f32(x).to_f32() == x,
                    "F16" => half::f16::from_f32(x).to_f32() == x,
                    _ => true,
                };
                assert!(
                    t.data.iter().all(|&x| x.is_finite() && exact(x)),
                    "{} {} ({dtype})",
                    dir.display(),
                    t.name
                );
                dtypes.insert(dtype);
            }
        }
        assert_eq!(sharded, 1);
        let want: BTreeSet<String> = ["BF16", "F16", "F32"].map(String::from).into();
        assert_eq!(dtypes, want);
    }

    #[test]
    fn bad_shards_and_dtypes_are_errors_naming_the_file() {
        let root = tmp("shards");
        let src = hf_fixtures()
            .into_iter()
            .find(|d| d.join(SHARD_INDEX_FILE).exists())
            .unwrap();
        let copy = |name: &str| -> PathBuf {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            }
            d
        };
        let index = |d: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join(SHARD_INDEX_FILE)).unwrap()).unwrap()
        };
        let write_index = |d: &Path, v: &serde_json::Value| {
            std::fs::write(d.join(SHARD_INDEX_FILE), serde_json::to_vec(v).unwrap()).unwrap()
        };
        let err = |d: &Path| match read_model_tensors(d) {
            Err(Error::Checkpoint { path, msg }) => format!("{path}: {msg}"),
            other => panic!(
                "expected a checkpoint error, got {:?}",
                other.map(|t| t.len())
            ),
        };

        // A missing shard file.
        let d = copy("missing_shard");
        let first = index(&d)["weight_map"]["model.embed_tokens.weight"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::remove_file(d.join(&first)).unwrap();
        let msg = err(&d);
        assert!(msg.contains(&first) && msg.contains("missing"), "{msg}");

        // The index names a tensor its shard does not hold.
        let d = copy("ghost_tensor");
        let mut v = index(&d);
        v["weight_map"]["model.layers.9.mlp.gate.weight"] = first.clone().into();
        write_index(&d, &v);
        let msg = err(&d);
        assert!(msg.contains("model.layers.9.mlp.gate.weight"), "{msg}");

        // A shard holds a tensor the index does not name there.
        let d = copy("unnamed_tensor");
        let mut v = index(&d);
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("model.embed_tokens.weight");
        write_index(&d, &v);
        let msg = err(&d);
        assert!(
            msg.contains("model.embed_tokens.weight") && msg.contains(&first),
            "{msg}"
        );

        // A shard outside the directory, and an index that is not one.
        let d = copy("escape");
        let mut v = index(&d);
        v["weight_map"]["model.embed_tokens.weight"] = "../x.safetensors".into();
        write_index(&d, &v);
        assert!(err(&d).contains("not a file name"));
        std::fs::write(d.join(SHARD_INDEX_FILE), b"{\"weight_map\": 3}").unwrap();
        assert!(err(&d).contains("not a shard index"));

        // A dtype amoe does not read.
        let raw = 7i32.to_le_bytes();
        let view = TensorView::new(Dtype::I32, vec![1], &raw).unwrap();
        let bytes = safetensors::serialize([("counts", view)], None).unwrap();
        let p = root.join("i32.safetensors");
        std::fs::write(&p, bytes).unwrap();
        let msg = read_tensors(&p).unwrap_err().to_string();
        assert!(
            msg.contains("counts is I32") && msg.contains("F32, F16 and BF16"),
            "{msg}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
