//! Training data: a corpus of named documents, its train/validation split, token sequences
//! and the batches the model reads.
//!
//! * [`Corpus`]: the shipped corpus (`data/corpus/{shakespeare,kjv}.jsonl.gz`, one domain or
//!   both) or the user's `--data` path: a `.txt` / `.md` file, a `.jsonl` / `.jsonl.gz` file
//!   in the shipped format (`{"id", "title", "text"}` per line; only `text` is required), or
//!   a directory holding any of these (recursively, hidden entries skipped, other files
//!   ignored).
//! * [`Split`]: validation holds out whole documents, never slices, where it can:
//!   - shipped corpus: the fixed list in [`SHIPPED_VALIDATION`] (data/corpus/README.md);
//!   - user data with 10 or more documents: sorted by name, every 10th (the 10th, 20th, ...);
//!   - user data with fewer than 10 documents (a single file, say): each document's last
//!     10%, cut at the first line break at or after 90% of its bytes when there is one.
//! * [`Dataset`]: each split's documents are tokenized, each followed by the end-of-text
//!   token, concatenated, and cut into [`Sequence`]s of `N + 1` tokens with stride `N`
//!   (consecutive sequences share one token), so every next-token pair of the stream is a
//!   target exactly once. The stream's last `< N` targets are dropped.
//! * [`Batcher`]: batches of `B` sequences in a per-epoch order: epoch 0 a seeded shuffle,
//!   later epochs an order given from outside (the curriculum, or a fresh shuffle). When
//!   `B` does not divide the number of sequences, the last batch of an epoch is **padded**
//!   with the first sequences of that epoch's order, so every batch has exactly `B`
//!   sequences (fixed GPU shapes) and every sequence is seen, and its routing recorded,
//!   every epoch. Its [`BatcherState`] is serde, so a resumed run continues with the same
//!   batches.
//!
//! No twin: host code. Reading files is native only; the rest compiles for wasm32.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Held-out validation documents of the shipped corpus, as `file/id` names
/// (see data/corpus/README.md: one tragedy, one comedy; Bible narrative, poetry, epistle).
pub const SHIPPED_VALIDATION: [&str; 5] = [
    "kjv/07_judges",
    "kjv/18_job",
    "kjv/59_james",
    "shakespeare/othello",
    "shakespeare/twelfth_night",
];

/// With this many user documents or more, validation holds out whole documents.
const MIN_DOCS_FOR_DOC_SPLIT: usize = 10;

/// One document of a corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Unique within the corpus: `file/id` for JSON lines, the relative path for text files.
    pub name: String,
    pub text: String,
}

/// Which part of the shipped corpus to train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Shakespeare,
    Kjv,
    Both,
}

impl Domain {
    /// The shipped files' stems (`<stem>.jsonl.gz`) this domain reads.
    pub fn stems(self) -> &'static [&'static str] {
        match self {
            Domain::Shakespeare => &["shakespeare"],
            Domain::Kjv => &["kjv"],
            Domain::Both => &["kjv", "shakespeare"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Domain::Shakespeare => "shakespeare",
            Domain::Kjv => "kjv",
            Domain::Both => "both",
        }
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Domain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shakespeare" => Ok(Domain::Shakespeare),
            "kjv" => Ok(Domain::Kjv),
            "both" => Ok(Domain::Both),
            _ => Err(Error::invalid(
                "domain",
                format!("{s:?}: expected shakespeare, kjv or both"),
            )),
        }
    }
}

/// How a corpus is split into train and validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitRule {
    /// Hold out the named documents (the shipped corpus).
    Listed(Vec<String>),
    /// User data: every 10th document by name, or each document's last 10% when there are
    /// fewer than 10 documents.
    Auto,
}

/// A set of named documents and where they came from.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The path (or a label) the documents were read from; named in errors.
    pub source: String,
    /// Sorted by name, names unique, no empty document.
    pub docs: Vec<Document>,
    pub rule: SplitRule,
}

/// Documents for training and for validation.
#[derive(Clone, Debug)]
pub struct Split {
    pub source: String,
    pub train: Vec<Document>,
    pub val: Vec<Document>,
    /// One line saying which rule made the split, for logs.
    pub description: String,
}

impl Corpus {
    /// A corpus of the given documents (user data, split by [`SplitRule::Auto`]).
    /// Documents with only whitespace are dropped; none left, or two with one name, is an
    /// error naming `source`.
    pub fn from_documents(source: impl Into<String>, docs: Vec<Document>) -> Result<Corpus> {
        Self::with_rule(source.into(), docs, SplitRule::Auto)
    }

    fn with_rule(source: String, docs: Vec<Document>, rule: SplitRule) -> Result<Corpus> {
        let mut docs: Vec<Document> = docs
            .into_iter()
            .filter(|d| !d.text.trim().is_empty())
            .collect();
        if docs.is_empty() {
            return Err(Error::data(&source, "empty corpus: no document with text"));
        }
        docs.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = docs.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::data(
                &source,
                format!("two documents named {:?}", w[0].name),
            ));
        }
        Ok(Corpus { source, docs, rule })
    }

    /// Parses JSON lines in the shipped format: one object per line with a string `text`
    /// and optionally a string `id` (default: `line<N>`); other keys are ignored. Documents
    /// are named `<prefix>/<id>`. `source` names the file in errors.
    pub fn parse_jsonl(source: &str, prefix: &str, text: &str) -> Result<Vec<Document>> {
        #[derive(Deserialize)]
        struct Line {
            id: Option<String>,
            text: String,
        }
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: Line = serde_json::from_str(line)
                .map_err(|e| Error::data(format!("{source}:{}", i + 1), e.to_string()))?;
            let id = rec.id.unwrap_or_else(|| format!("line{}", i + 1));
            let name = if prefix.is_empty() {
                id
            } else {
                format!("{prefix}/{id}")
            };
            docs.push(Document {
                name,
                text: rec.text,
            });
        }
        Ok(docs)
    }

    /// Total characters over all documents.
    pub fn chars(&self) -> usize {
        self.docs.iter().map(|d| d.text.chars().count()).sum()
    }

    /// Splits into train and validation by the corpus's rule (see the module docs).
    /// Errors if either side would be empty.
    pub fn split(&self) -> Result<Split> {
        let (train, val, description) = match &self.rule {
            SplitRule::Listed(names) => {
                let held: BTreeSet<&str> = names.iter().map(String::as_str).collect();
                let (val, train): (Vec<Document>, Vec<Document>) = self
                    .docs
                    .iter()
                    .cloned()
                    .partition(|d| held.contains(d.name.as_str()));
                let desc = format!(
                    "held-out documents: {}",
                    val.iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                (train, val, desc)
            }
            SplitRule::Auto if self.docs.len() >= MIN_DOCS_FOR_DOC_SPLIT => {
                let mut train = Vec::new();
                let mut val = Vec::new();
                for (i, d) in self.docs.iter().enumerate() {
                    if i % 10 == 9 {
                        val.push(d.clone());
                    } else {
                        train.push(d.clone());
                    }
                }
                let desc = format!(
                    "every 10th of {} documents by name held out ({})",
                    self.docs.len(),
                    val.len()
                );
                (train, val, desc)
            }
            SplitRule::Auto => {
                let mut train = Vec::new();
                let mut val = Vec::new();
                for d in &self.docs {
                    let cut = tail_cut(&d.text);
                    let (head, tail) = d.text.split_at(cut);
                    if !head.trim().is_empty() {
                        train.push(Document {
                            name: format!("{}[..90%]", d.name),
                            text: head.to_string(),
                        });
                    }
                    if !tail.trim().is_empty() {
                        val.push(Document {
                            name: format!("{}[90%..]", d.name),
                            text: tail.to_string(),
                        });
                    }
                }
                let desc = format!(
                    "last 10% of each of {} document(s) held out (fewer than {} documents)",
                    self.docs.len(),
                    MIN_DOCS_FOR_DOC_SPLIT
                );
                (train, val, desc)
            }
        };
        if train.is_empty() || val.is_empty() {
            return Err(Error::data(
                &self.source,
                format!(
                    "cannot split into train and validation ({} train, {} validation \
                     documents; {description})",
                    train.len(),
                    val.len()
                ),
            ));
        }
        Ok(Split {
            source: self.source.clone(),
            train,
            val,
            description,
        })
    }
}

/// Byte offset where a document's validation tail starts: the first line break at or after
/// 90% of the text (the tail starts after it), else the char boundary at 90%.
fn tail_cut(text: &str) -> usize {
    let mut at = text.len() * 9 / 10;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    match text[at..].find('\n') {
        Some(off) if at + off + 1 < text.len() => at + off + 1,
        _ => at,
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod files {
    use super::*;
    use std::io::Read;
    use std::path::{Path, PathBuf};

    /// The shipped corpus folder of this source tree (`<crate>/data/corpus`).
    pub fn shipped_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data")
            .join("corpus")
    }

    fn io_data(path: &Path, e: std::io::Error) -> Error {
        Error::data(path.display(), e.to_string())
    }

    /// The bytes of `path`, gunzipped when its name ends in `.gz`, as UTF-8 text.
    fn read_text(path: &Path) -> Result<String> {
        let raw = std::fs::read(path).map_err(|e| io_data(path, e))?;
        let bytes = if path.to_string_lossy().ends_with(".gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .map_err(|e| Error::data(path.display(), format!("not valid gzip: {e}")))?;
            out
        } else {
            raw
        };
        String::from_utf8(bytes).map_err(|e| {
            Error::data(
                path.display(),
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            )
        })
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Text,
        Jsonl,
    }

    /// The kind of a data file and its name without the extension.
    fn kind_of(name: &str) -> Option<(Kind, &str)> {
        for (ext, kind) in [
            (".jsonl.gz", Kind::Jsonl),
            (".jsonl", Kind::Jsonl),
            (".txt", Kind::Text),
            (".md", Kind::Text),
        ] {
            if let Some(stem) = name.strip_suffix(ext) {
                return Some((kind, stem));
            }
        }
        None
    }

    /// Documents of one file; `rel` is its path relative to the `--data` root (used in names).
    fn read_file(path: &Path, rel: &str) -> Result<Vec<Document>> {
        let (kind, stem) = kind_of(rel).ok_or_else(|| {
            Error::data(
                path.display(),
                "unsupported file type (expected .txt, .md, .jsonl or .jsonl.gz)",
            )
        })?;
        // A FIFO, socket or device named like a text file would block or
        // never end: only regular files are data.
        let meta = std::fs::metadata(path).map_err(|e| io_data(path, e))?;
        if !meta.is_file() {
            return Err(Error::data(
                path.display(),
                "not a regular file (a pipe, socket or device would block or never end): give a file or a directory of files",
            ));
        }
        let text = read_text(path)?;
        match kind {
            Kind::Text => Ok(vec![Document {
                name: rel.to_string(),
                text,
            }]),
            Kind::Jsonl => Corpus::parse_jsonl(&path.display().to_string(), stem, &text),
        }
    }

    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| io_data(dir, e))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_data(dir, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            paths.push(entry.path());
        }
        paths.sort();
        for p in paths {
            // Follows symlinks: a linked folder of texts is data too.
            let meta = std::fs::metadata(&p).map_err(|e| io_data(&p, e))?;
            if meta.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if kind_of(&rel).is_some() {
                    out.push((p, rel));
                }
            }
        }
        Ok(())
    }

    impl Corpus {
        /// The shipped corpus in `dir` (normally [`shipped_dir`]) for `domain`, split by
        /// [`SHIPPED_VALIDATION`]. Document names are `<file stem>/<id>`.
        pub fn shipped(dir: impl AsRef<Path>, domain: Domain) -> Result<Corpus> {
            let dir = dir.as_ref();
            let mut docs = Vec::new();
            for stem in domain.stems() {
                let path = dir.join(format!("{stem}.jsonl.gz"));
                let text = read_text(&path)?;
                docs.extend(Corpus::parse_jsonl(
                    &path.display().to_string(),
                    stem,
                    &text,
                )?);
            }
            let held = SHIPPED_VALIDATION.iter().map(|s| s.to_string()).collect();
            Corpus::with_rule(dir.display().to_string(), docs, SplitRule::Listed(held))
        }

        /// The user's `--data` path: a `.txt` / `.md` / `.jsonl` / `.jsonl.gz` file or a
        /// directory of them (recursive). Split by [`SplitRule::Auto`].
        pub fn load(path: impl AsRef<Path>) -> Result<Corpus> {
            let path = path.as_ref();
            let meta = std::fs::metadata(path).map_err(|e| io_data(path, e))?;
            let docs = if meta.is_dir() {
                let mut files = Vec::new();
                walk(path, path, &mut files)?;
                if files.is_empty() {
                    return Err(Error::data(
                        path.display(),
                        "no .txt, .md, .jsonl or .jsonl.gz file in this directory",
                    ));
                }
                let mut docs = Vec::new();
                for (p, rel) in files {
                    docs.extend(read_file(&p, &rel)?);
                }
                docs
            } else {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                read_file(path, &name)?
            };
            Corpus::from_documents(path.display().to_string(), docs)
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use files::shipped_dir;

/// One training example: `N + 1` consecutive tokens; the model reads the first `N` and
/// predicts the last `N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
}

impl Sequence {
    /// The `N` input ids.
    pub fn inputs(&self) -> &[u32] {
        &self.tokens[..self.tokens.len().saturating_sub(1)]
    }
    /// The `N` next-token targets.
    pub fn targets(&self) -> &[u32] {
        &self.tokens[self.tokens.len().min(1)..]
    }
}

/// Token sequences of both splits for one context length `N`.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// `N`: tokens the model reads per sequence.
    pub context: usize,
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    /// Tokens in each split's stream (end-of-text tokens included).
    pub train_tokens: usize,
    pub val_tokens: usize,
}

/// Cuts a token stream into sequences of `context + 1` tokens with stride `context`.
pub fn pack(stream: &[u32], context: usize) -> Vec<Sequence> {
    if context == 0 || stream.len() < context + 1 {
        return Vec::new();
    }
    (0..(stream.len() - 1) / context)
        .map(|i| Sequence {
            tokens: stream[i * context..i * context + context + 1].to_vec(),
        })
        .collect()
}

/// The token stream of `docs`: each document's ids followed by `eot`.
pub fn token_stream(docs: &[Document], tk: &Tokenizer) -> Result<Vec<u32>> {
    let mut stream = Vec::new();
    for d in docs {
        stream.extend(tk.encode(&d.text)?);
        stream.push(tk.eot_id());
    }
    Ok(stream)
}

impl Dataset {
    /// Tokenizes both splits and packs them into sequences of `context + 1` tokens.
    /// Errors, naming the source, if a split yields no sequence.
    pub fn build(split: &Split, tk: &Tokenizer, context: usize) -> Result<Dataset> {
        if context == 0 {
            return Err(Error::invalid("dataset", "context length N must be >= 1"));
        }
        let train_stream = token_stream(&split.train, tk)?;
        let val_stream = token_stream(&split.val, tk)?;
        let train = pack(&train_stream, context);
        let val = pack(&val_stream, context);
        for (what, seqs, n) in [
            ("training", &train, train_stream.len()),
            ("validation", &val, val_stream.len()),
        ] {
            if seqs.is_empty() {
                return Err(Error::data(
                    &split.source,
                    format!(
                        "the {what} split has {n} tokens, too few for one sequence of \
                         context {context} + 1"
                    ),
                ));
            }
        }
        Ok(Dataset {
            context,
            train,
            val,
            train_tokens: train_stream.len(),
            val_tokens: val_stream.len(),
        })
    }
}

/// `B` sequences laid out for the model: token `t = b * N + n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Input ids `[B * N]`.
    pub ids: Vec<u32>,
    /// Next-token targets `[B * N]`.
    pub targets: Vec<u32>,
    /// Which sequence each row `b` came from `[B]` (for the curriculum's `record`).
    pub seq_index: Vec<usize>,
}

impl Batch {
    /// The batch of the sequences `indices` of `seqs`, in that order. All sequences must
    /// have the same length.
    pub fn gather(seqs: &[Sequence], indices: &[usize]) -> Result<Batch> {
        let n = seqs.first().map(|s| s.inputs().len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(indices.len() * n);
        let mut targets = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            let s = seqs.get(i).ok_or_else(|| {
                Error::invalid(
                    "batch",
                    format!("sequence index {i} out of range ({} sequences)", seqs.len()),
                )
            })?;
            if s.inputs().len() != n {
                return Err(Error::shape(
                    "batch",
                    format!("sequences of {} tokens", n + 1),
                    format!("sequence {i} with {}", s.tokens.len()),
                ));
            }
            ids.extend_from_slice(s.inputs());
            targets.extend_from_slice(s.targets());
        }
        Ok(Batch {
            ids,
            targets,
            seq_index: indices.to_vec(),
        })
    }

    /// Number of sequences `B`.
    pub fn len(&self) -> usize {
        self.seq_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq_index.is_empty()
    }
}

/// Evaluation batches over all of `seqs` in index order; the last one is padded with the
/// first sequences (so a split smaller than `B` still gives one batch). A loss averaged
/// over these batches counts the padded sequences twice; for an exact mean weight by
/// `seq_index` first occurrences.
pub fn eval_batches(seqs: &[Sequence], batch_size: usize) -> Result<Vec<Batch>> {
    if batch_size == 0 || seqs.is_empty() {
        return Err(Error::invalid(
            "eval_batches",
            format!(
                "batch size {batch_size} and {} sequences must both be > 0",
                seqs.len()
            ),
        ));
    }
    let order: Vec<usize> = (0..seqs.len()).collect();
    (0..seqs.len().div_ceil(batch_size))
        .map(|k| Batch::gather(seqs, &padded_slice(&order, k * batch_size, batch_size)))
        .collect()
}

/// `len` entries of `order` from `start`, wrapping around to its beginning.
fn padded_slice(order: &[usize], start: usize, len: usize) -> Vec<usize> {
    (0..len).map(|j| order[(start + j) % order.len()]).collect()
}

/// SplitMix64: tiny, seedable, the same on every platform.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A permutation of `0..n` drawn from `seed` (Fisher-Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Where a [`Batcher`] stands; save it in a checkpoint to resume with the same batches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// 0 for the first (shuffled) epoch.
    pub epoch: u64,
    /// Position in `order` of the next batch's first sequence.
    pub cursor: usize,
    /// This epoch's permutation of the sequence indices.
    pub order: Vec<usize>,
    pub seed: u64,
    pub batch_size: usize,
}

/// Yields batches of `B` sequences in each epoch's order (see the module docs).
#[derive(Clone, Debug)]
pub struct Batcher {
    state: BatcherState,
}

fn check_permutation(order: &[usize], n: usize) -> Result<()> {
    if order.len() != n {
        return Err(Error::invalid(
            "batcher",
            format!("order has {} entries for {n} sequences", order.len()),
        ));
    }
    let mut seen = vec![false; n];
    for &i in order {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(Error::invalid(
                "batcher",
                format!("order is not a permutation of 0..{n} (index {i})"),
            ));
        }
    }
    Ok(())
}

impl Batcher {
    /// Epoch 0 over `num_sequences` sequences, shuffled with `seed`.
    pub fn new(num_sequences: usize, batch_size: usize, seed: u64) -> Result<Batcher> {
        if num_sequences == 0 || batch_size == 0 {
            return Err(Error::invalid(
                "batcher",
                format!("{num_sequences} sequences, batch size {batch_size}: both must be > 0"),
            ));
        }
        Ok(Batcher {
            state: BatcherState {
                epoch: 0,
                cursor: 0,
                order: shuffled(num_sequences, seed),
                seed,
                batch_size,
            },
        })
    }

    /// Resumes from a saved state; `num_sequences` must match the dataset it was made for.
    pub fn from_state(state: BatcherState, num_sequences: usize) -> Result<Batcher> {
        check_permutation(&state.order, num_sequences)?;
        if state.batch_size == 0 || state.cursor > state.order.len() || num_sequences == 0 {
            return Err(Error::invalid(
                "batcher",
                format!(
                    "bad saved state: cursor {} of {}, batch size {}",
                    state.cursor,
                    state.order.len(),
                    state.batch_size
                ),
            ));
        }
        Ok(Batcher { state })
    }

    pub fn state(&self) -> &BatcherState {
        &self.state
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    pub fn batch_size(&self) -> usize {
        self.state.batch_size
    }

    /// Batches per epoch: `ceil(sequences / B)` (the last one padded).
    pub fn batches_per_epoch(&self) -> usize {
        self.state.order.len().div_ceil(self.state.batch_size)
    }

    /// True once every batch of this epoch was taken.
    pub fn epoch_done(&self) -> bool {
        self.state.cursor >= self.state.order.len()
    }

    /// Sequence indices of the next batch, or `None` at the end of the epoch.
    pub fn next_indices(&mut self) -> Option<Vec<usize>> {
        if self.epoch_done() {
            return None;
        }
        let st = &mut self.state;
        let idx = padded_slice(&st.order, st.cursor, st.batch_size);
        st.cursor = (st.cursor + st.batch_size).min(st.order.len());
        Some(idx)
    }

    /// The next batch of `seqs` (the sequences this batcher was made for), or `None` at the
    /// end of the epoch.
    pub fn next_batch(&mut self, seqs: &[Sequence]) -> Result<Option<Batch>> {
        if seqs.len() != self.state.order.len() {
            return Err(Error::invalid(
                "batcher",
                format!(
                    "made for {} sequences, given {}",
                    self.state.order.len(),
                    seqs.len()
                ),
            ));
        }
        match self.next_indices() {
            Some(idx) => Batch::gather(seqs, &idx).map(Some),
            None => Ok(None),
        }
    }

    /// Starts the next epoch with `order` (e.g. [`super::curriculum::Curriculum::order`]),
    /// which must be a permutation of all sequence indices. The current epoch must be done.
    pub fn start_epoch(&mut self, order: Vec<usize>) -> Result<()> {
        if !self.epoch_done() {
            return Err(Error::invalid(
                "batcher",
                format!(
                    "epoch {} not finished ({} of {} sequences taken)",
                    self.state.epoch,
                    self.state.cursor,
                    self.state.order.len()
                ),
            ));
        }
        check_permutation(&order, self.state.order.len())?;
        self.state.epoch += 1;
        self.state.cursor = 0;
        self.state.order = order;
        Ok(())
    }

    /// Starts the next epoch with a fresh shuffle (no curriculum), drawn from the seed and
    /// the epoch number, so a resumed run draws the same one.
    pub fn start_epoch_shuffled(&mut self) -> Result<()> {
        let seed = SplitMix64(
            self.state.seed ^ (self.state.epoch + 1).wrapping_mul(0xA24B_AED4_963E_E407),
        )
        .next_u64();
        let order = shuffled(self.state.order.len(), seed);
        self.start_epoch(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, text: &str) -> Document {
        Document {
            name: name.into(),
            text: text.into(),
        }
    }

    fn seqs(n: usize, len: usize) -> Vec<Sequence> {
        (0..n)
            .map(|i| Sequence {
                tokens: (0..len as u32).map(|t| i as u32 * 100 + t).collect(),
            })
            .collect()
    }

    #[test]
    fn pack_stride() {
        let stream: Vec<u32> = (0..10).collect();
        let s = pack(&stream, 3);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].tokens, vec![0, 1, 2, 3]);
        assert_eq!(s[1].tokens, vec![3, 4, 5, 6]);
        assert_eq!(s[2].inputs(), &[6, 7, 8]);
        assert_eq!(s[2].targets(), &[7, 8, 9]);
        assert_eq!(pack(&stream, 9).len(), 1);
        assert!(pack(&stream, 10).is_empty());
        assert!(pack(&stream, 0).is_empty());
    }

    #[test]
    fn batcher_epochs_and_padding() {
        let data = seqs(5, 4);
        let mut b = Batcher::new(5, 2, 7).unwrap();
        assert_eq!(b.batches_per_epoch(), 3);
        let order = b.state().order.clone();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        assert_ne!(order, vec![0, 1, 2, 3, 4], "seed 7 should shuffle");
        let mut got = Vec::new();
        while let Some(batch) = b.next_batch(&data).unwrap() {
            assert_eq!(batch.len(), 2);
            assert_eq!(batch.ids.len(), 2 * 3);
            for (r, &i) in batch.seq_index.iter().enumerate() {
                assert_eq!(&batch.ids[r * 3..r * 3 + 3], data[i].inputs());
                assert_eq!(&batch.targets[r * 3..r * 3 + 3], data[i].targets());
            }
            got.extend(batch.seq_index);
        }
        // Last batch padded with the epoch's first sequence.
        assert_eq!(got, [&order[..], &order[..1]].concat());
        // The curriculum gives the next order.
        assert!(b.start_epoch(vec![0, 1, 2, 3]).is_err());
        assert!(b.start_epoch(vec![0, 1, 2, 3, 3]).is_err());
        b.start_epoch(vec![4, 3, 2, 1, 0]).unwrap();
        assert_eq!(b.epoch(), 1);
        assert_eq!(b.next_indices().unwrap(), vec![4, 3]);
        assert!(
            b.start_epoch(vec![0, 1, 2, 3, 4]).is_err(),
            "epoch not done"
        );
        // Same seed, same shuffle; another seed, another one.
        assert_eq!(Batcher::new(5, 2, 7).unwrap().state().order, order);
        assert_ne!(shuffled(50, 1), shuffled(50, 2));
    }

    #[test]
    fn batch_larger_than_data_cycles() {
        let mut b = Batcher::new(2, 5, 0).unwrap();
        let idx = b.next_indices().unwrap();
        let o = &b.state().order;
        assert_eq!(idx, vec![o[0], o[1], o[0], o[1], o[0]]);
        assert!(b.next_indices().is_none());
    }

    #[test]
    fn resume_gives_same_batches() {
        let data = seqs(11, 3);
        let mut a = Batcher::new(11, 3, 42).unwrap();
        a.next_batch(&data).unwrap();
        let saved = serde_json::to_string(a.state()).unwrap();
        let mut rest_a = Vec::new();
        loop {
            while let Some(x) = a.next_batch(&data).unwrap() {
                rest_a.push(x);
            }
            if a.epoch() == 2 {
                break;
            }
            a.start_epoch_shuffled().unwrap();
        }
        let state: BatcherState = serde_json::from_str(&saved).unwrap();
        let mut b = Batcher::from_state(state, 11).unwrap();
        let mut rest_b = Vec::new();
        loop {
            while let Some(x) = b.next_batch(&data).unwrap() {
                rest_b.push(x);
            }
            if b.epoch() == 2 {
                break;
            }
            b.start_epoch_shuffled().unwrap();
        }
        assert_eq!(rest_a, rest_b);
        assert_eq!(rest_a.len(), 3 + 4 + 4);
        assert!(Batcher::from_state(serde_json::from_str(&saved).unwrap(), 12).is_err());
        assert!(b.next_batch(&data[..10]).is_err());
    }

    #[test]
    fn eval_batches_cover_all() {
        let data = seqs(5, 3);
        let bs = eval_batches(&data, 4).unwrap();
        assert_eq!(bs.len(), 2);
        assert_eq!(bs[1].seq_index, vec![4, 0, 1, 2]);
        assert_eq!(eval_batches(&data, 8).unwrap().len(), 1);
        assert!(eval_batches(&data, 0).is_err());
    }

    #[test]
    fn split_rules() {
        // Fewer than 10 documents: each one's tail, cut at a line break.
        let text = (0..20)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Corpus::from_documents("mem", vec![doc("a.txt", &text)]).unwrap();
        let s = c.split().unwrap();
        assert_eq!(s.train.len(), 1);
        assert_eq!(s.val.len(), 1);
        assert_eq!(format!("{}{}", s.train[0].text, s.val[0].text), text);
        assert!(s.train[0].text.ends_with('\n'));
        assert!(s.val[0].text.starts_with("line 1"));
        assert!(s.val[0].text.len() * 10 <= text.len() + 10);

        // Ten or more: every 10th by name.
        let docs: Vec<Document> = (0..25)
            .map(|i| doc(&format!("d{i:02}"), "some text"))
            .collect();
        let s = Corpus::from_documents("mem", docs)
            .unwrap()
            .split()
            .unwrap();
        let names: Vec<&str> = s.val.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["d09", "d19"]);
        assert_eq!(s.train.len(), 23);

        // Listed (shipped) documents.
        let c = Corpus::with_rule(
            "mem".into(),
            vec![doc("x/a", "aa"), doc("x/b", "bb"), doc("x/c", "cc")],
            SplitRule::Listed(vec!["x/b".into()]),
        )
        .unwrap();
        let s = c.split().unwrap();
        assert_eq!(s.val, vec![doc("x/b", "bb")]);
        assert_eq!(s.train.len(), 2);
    }

    #[test]
    fn corpus_errors() {
        assert!(matches!(
            Corpus::from_documents("src", vec![doc("a", "  \n")]),
            Err(Error::Data { path, .. }) if path == "src"
        ));
        assert!(Corpus::from_documents("src", vec![doc("a", "x"), doc("a", "y")]).is_err());
        // A one-character document has no 10% tail.
        let c = Corpus::from_documents("src", vec![doc("a", "x")]).unwrap();
        assert!(matches!(c.split(), Err(Error::Data { .. })));
        let err = Corpus::parse_jsonl("f.jsonl", "f", "{\"text\": \"a\"}\n{bad\n").unwrap_err();
        assert!(matches!(err, Error::Data { path, .. } if path == "f.jsonl:2"));
        let docs = Corpus::parse_jsonl(
            "f",
            "f",
            "{\"text\":\"a\"}\n\n{\"id\":\"z\",\"text\":\"b\"}",
        )
        .unwrap();
        assert_eq!(docs[0].name, "f/line1");
        assert_eq!(docs[1].name, "f/z");
        assert_eq!("kjv".parse::<Domain>().unwrap(), Domain::Kjv);
        assert!("bible".parse::<Domain>().is_err());
    }

    #[test]
    fn dataset_from_split() {
        let docs: Vec<Document> = (0..10)
            .map(|i| doc(&format!("d{i}"), &"the cat sat on the mat. ".repeat(20 + i)))
            .collect();
        let split = Corpus::from_documents("mem", docs)
            .unwrap()
            .split()
            .unwrap();
        let tk = Tokenizer::train(split.train.iter().map(|d| d.text.as_str()), 300).unwrap();
        let ds = Dataset::build(&split, &tk, 8).unwrap();
        assert_eq!(ds.train.len(), (ds.train_tokens - 1) / 8);
        assert!(!ds.val.is_empty());
        assert!(ds.train.iter().all(|s| s.tokens.len() == 9));
        // Documents end with the end-of-text token.
        let stream = token_stream(&split.val, &tk).unwrap();
        assert_eq!(stream.last(), Some(&tk.eot_id()));
        assert_eq!(
            tk.decode(&stream).unwrap(),
            format!("{}{}", split.val[0].text, crate::tokenizer::EOT)
        );
        assert!(matches!(
            Dataset::build(&split, &tk, 100_000),
            Err(Error::Data { .. })
        ));
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod files {
        use super::*;
        use std::io::Write;
        use std::path::PathBuf;

        fn tmp(name: &str) -> PathBuf {
            let d = std::env::temp_dir().join(format!("amoe_data_{}_{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            d
        }

        #[test]
        fn shipped_corpus() {
            let c = Corpus::shipped(shipped_dir(), Domain::Both).unwrap();
            assert_eq!(c.docs.len(), 108);
            let s = c.split().unwrap();
            let mut names: Vec<&str> = s.val.iter().map(|d| d.name.as_str()).collect();
            names.sort();
            assert_eq!(names, SHIPPED_VALIDATION);
            assert_eq!(s.train.len(), 103);
            let k = Corpus::shipped(shipped_dir(), Domain::Kjv).unwrap();
            assert_eq!(k.docs.len(), 66);
            assert_eq!(k.docs[0].name, "kjv/01_genesis");
            assert!(k.docs[0].text.starts_with("Genesis\n\nCHAPTER 1\n\n"));
            assert_eq!(k.split().unwrap().val.len(), 3);
            assert!(matches!(
                Corpus::shipped("/nonexistent", Domain::Kjv),
                Err(Error::Data { path, .. }) if path.contains("kjv.jsonl.gz")
            ));
        }

        #[test]
        fn user_paths() {
            let d = tmp("user");
            std::fs::create_dir_all(d.join("sub/.hidden")).unwrap();
            std::fs::write(d.join("a.txt"), "alpha text\nmore").unwrap();
            std::fs::write(d.join("sub/b.md"), "# beta\nbody").unwrap();
            std::fs::write(d.join("sub/.hidden/c.txt"), "hidden").unwrap();
            std::fs::write(d.join("notes.csv"), "ignored").unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(b"{\"id\":\"x\",\"title\":\"X\",\"text\":\"ex\"}\n{\"id\":\"y\",\"text\":\"why\"}\n")
                .unwrap();
            std::fs::write(d.join("sub/docs.jsonl.gz"), gz.finish().unwrap()).unwrap();
            let c = Corpus::load(&d).unwrap();
            let names: Vec<&str> = c.docs.iter().map(|x| x.name.as_str()).collect();
            assert_eq!(names, ["a.txt", "sub/b.md", "sub/docs/x", "sub/docs/y"]);
            assert_eq!(c.docs[3].text, "why");

            let one = Corpus::load(d.join("a.txt")).unwrap();
            assert_eq!(one.docs.len(), 1);
            assert_eq!(one.docs[0].name, "a.txt");

            // Errors name the path.
            let missing = d.join("missing.txt");
            assert!(matches!(Corpus::load(&missing),
                Err(Error::Data { path, .. }) if path == missing.display().to_string()));
            std::fs::write(d.join("bad.txt"), b"ok \xff\xfe").unwrap();
            assert!(matches!(Corpus::load(d.join("bad.txt")),
                Err(Error::Data { path, msg }) if path.ends_with("bad.txt") && msg.contains("UTF-8")));
            assert!(matches!(
                Corpus::load(d.join("notes.csv")),
                Err(Error::Data { .. })
            ));
            std::fs::remove_file(d.join("bad.txt")).unwrap();
            std::fs::write(d.join("sub/broken.jsonl.gz"), b"not gzip").unwrap();
            assert!(matches!(Corpus::load(&d),
                Err(Error::Data { path, .. }) if path.ends_with("broken.jsonl.gz")));
            let empty = tmp("empty");
            assert!(matches!(Corpus::load(&empty), Err(Error::Data { .. })));
            std::fs::write(empty.join("e.txt"), "\n\n").unwrap();
            assert!(matches!(Corpus::load(&empty),
                Err(Error::Data { msg, .. }) if msg.contains("empty")));
            std::fs::remove_dir_all(&d).unwrap();
            std::fs::remove_dir_all(&empty).unwrap();
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod corpus_tests {
    use super::*;

    /// A named pipe given as data (or found in a data directory) is
    /// refused at once instead of blocking the run for ever.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_not_read() {
        let dir = std::env::temp_dir().join(format!("amoe-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("text.txt");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            panic!("mkfifo failed: cannot make the test's pipe");
        }
        for p in [fifo.as_path(), dir.as_path()] {
            let e = Corpus::load(p).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The real pipeline on the shipped corpus: tokenizer trained on the training split only,
    /// deterministic, and validation sequences decode back to held-out text.
    #[test]
    fn shipped_pipeline() {
        let t0 = std::time::Instant::now();
        let split = Corpus::shipped(shipped_dir(), Domain::Both)
            .unwrap()
            .split()
            .unwrap();
        let tk = Tokenizer::train(split.train.iter().map(|d| d.text.as_str()), 4096).unwrap();
        let t1 = std::time::Instant::now();
        let ds = Dataset::build(&split, &tk, 256).unwrap();
        let t2 = std::time::Instant::now();
        eprintln!(
            "train tokenizer {:?}, encode {:?}: {} train / {} val tokens, {} / {} sequences",
            t1 - t0,
            t2 - t1,
            ds.train_tokens,
            ds.val_tokens,
            ds.train.len(),
            ds.val.len()
        );
        assert_eq!(tk.vocab_size(), 4096);
        let held: String = split
            .val
            .iter()
            .map(|d| format!("{}{}", d.text, crate::tokenizer::EOT))
            .collect();
        for s in [&ds.val[0], &ds.val[ds.val.len() / 2]] {
            assert!(held.contains(&tk.decode(&s.tokens).unwrap()));
        }
        let tk2 = Tokenizer::train(split.train.iter().map(|d| d.text.as_str()), 4096).unwrap();
        assert_eq!(tk.to_json(), tk2.to_json());
    }
}
