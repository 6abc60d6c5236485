//! The one error type of amoe. Every variant names the operation and the sizes
//! involved, so that a user (or a browser page) can tell what to change.

use std::fmt;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in amoe, typed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched the request (backend filter, index, or none at all).
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),
    /// A tensor had the wrong shape for an operation.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
    /// A resource would exceed what the adapter allows.
    #[error("{what}: needs {needed}, the adapter allows at most {max}")]
    Limit { what: String, needed: u64, max: u64 },
    /// A named choice (gating rule, activation, ...) given a value outside its list.
    #[error("{option} {value:?}: expected one of {}", .expected.join(", "))]
    Choice {
        option: &'static str,
        value: String,
        expected: &'static [&'static str],
    },
    /// An argument outside its valid range (K > E, T = 0, threshold outside [0, 1], ...).
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    /// Inputs or outputs that are NaN or infinite.
    #[error("{op}: non-finite values ({msg})")]
    NonFinite { op: &'static str, msg: String },
    /// A shader failed to compile or a pipeline failed to build.
    #[error("kernel {kernel}: {msg}")]
    Kernel { kernel: String, msg: String },
    /// The device could not be created with the requested features and limits.
    #[error("device request failed on {adapter}: {msg}")]
    RequestDevice { adapter: String, msg: String },
    /// A validation or out-of-memory error reported by the GPU API.
    #[error("GPU error in {op}: {msg}")]
    Gpu { op: String, msg: String },
    /// Reading a buffer back failed (device lost, map error).
    #[error("reading back {what} failed: {msg}")]
    Readback { what: String, msg: String },
    /// Filesystem errors with the path that caused them.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Training or using the BPE tokenizer failed (also: a bad tokenizer.json, an id outside
    /// the vocabulary).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Training data that cannot be used: a missing path, an empty corpus, text that is not
    /// UTF-8, a malformed JSON line, a split too small for the context.
    #[error("data {path}: {msg}")]
    Data { path: String, msg: String },
    /// A checkpoint file that is missing, truncated, corrupt or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// JSON (de)serialization errors.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// Shorthand for a shape mismatch.
    pub fn shape(op: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::Shape {
            op,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Shorthand for a data error naming the path (or the source) it came from.
    pub fn data(path: impl fmt::Display, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// Shorthand for a checkpoint error naming the file.
    pub fn checkpoint(path: impl fmt::Display, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// Shorthand for an invalid argument.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}
