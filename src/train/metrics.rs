//! Training logs as JSON lines: one serde object per line (a step's loss, an evaluation, a
//! routing summary), flushed as soon as it is written so that a killed run keeps every line
//! it reported and `tail -f` shows progress.
//!
//! A resumed run opens the log with [`JsonlWriter::append`]; if the previous run died in the
//! middle of a line, that partial line is cut off first, so every line stays valid JSON.
//! Native only. No twin: host code.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Writes one JSON object per line.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl JsonlWriter {
    /// A new, empty log at `path` (truncates an existing file).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| io(&path, e))?;
        Ok(JsonlWriter { path, file })
    }

    /// Continues the log at `path` (creates it if missing), dropping a partial last line.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let len = file.metadata().map_err(|e| io(&path, e))?.len();
        let keep = complete_prefix_len(&mut file, len).map_err(|e| io(&path, e))?;
        if keep < len {
            file.set_len(keep).map_err(|e| io(&path, e))?;
        }
        file.seek(SeekFrom::Start(keep)).map_err(|e| io(&path, e))?;
        Ok(JsonlWriter { path, file })
    }

    /// Appends `record` as one line and flushes it to the OS.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(|e| io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Length of the file up to and including its last newline (0 if it has none).
fn complete_prefix_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        buf.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// All records of a JSON-lines file (blank lines skipped). A bad line is an
/// [`Error::Data`] naming `path:line`.
pub fn read_jsonl<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<Vec<T>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::data(format!("{}:{}", path.display(), i + 1), e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        step: u64,
        loss: f32,
    }

    #[test]
    fn write_append_read() {
        let dir = std::env::temp_dir().join(format!("amoe_metrics_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        let mut w = JsonlWriter::create(&path).unwrap();
        w.write(&Rec { step: 1, loss: 2.5 }).unwrap();
        // Flushed per line: visible before the writer is dropped.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1,\"loss\":2.5}\n"
        );
        w.write(&Rec { step: 2, loss: 2.0 }).unwrap();
        drop(w);
        // A run killed mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\":3,\"lo").unwrap();
        drop(f);
        let mut w = JsonlWriter::append(&path).unwrap();
        w.write(&Rec { step: 3, loss: 1.5 }).unwrap();
        let recs: Vec<Rec> = read_jsonl(&path).unwrap();
        assert_eq!(recs.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3]);
        // Appending to a missing file creates it; create truncates.
        let p2 = dir.join("new.jsonl");
        JsonlWriter::append(&p2)
            .unwrap()
            .write(&Rec { step: 9, loss: 0.0 })
            .unwrap();
        assert_eq!(read_jsonl::<Rec>(&p2).unwrap().len(), 1);
        JsonlWriter::create(&p2).unwrap();
        assert!(read_jsonl::<Rec>(&p2).unwrap().is_empty());
        // A file with only a partial line.
        std::fs::write(&p2, "{\"st").unwrap();
        JsonlWriter::append(&p2).unwrap();
        assert_eq!(std::fs::read(&p2).unwrap(), b"");
        std::fs::write(&p2, "{\"step\":1,\"loss\":1}\nnot json\n").unwrap();
        assert!(matches!(read_jsonl::<Rec>(&p2),
            Err(Error::Data { path, .. }) if path.ends_with("new.jsonl:2")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
