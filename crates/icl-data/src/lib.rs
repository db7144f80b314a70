//! Task files to prompts, tokens and padded batches.
//!
//! Invariant: no model code and no tensor library here. The pipeline is
//! [`read_task`] (JSONL rows, validated, with file/line/field errors) → [`requests`] (prompt strings, one
//! request per scored continuation) → [`encode_requests`] (tokens, lm-evaluation-harness's
//! continuation rule, left truncation) → [`plan_batches`] (length-sorted, right-padded batches that carry the
//! position of every scored token). Downstream crates turn a [`Batch`] into tensors.

mod batch;
mod prompt;
mod task;
mod tokenize;

pub use batch::{plan_batches, Batch, BatchOptions};
pub use prompt::{py_strip, requests, Request};
pub use task::{read_task, ChoiceExample, LmExample, Task, TaskExamples, TaskKind};
pub use tokenize::{encode_requests, EncodeOptions, EncodedRequest, Tokenizer};

use std::path::PathBuf;

/// Every failure of this crate names the file, and where it applies the 1-based line and the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: malformed JSON: {message}")]
    Json { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: field `{field}`: {message}")]
    Field { path: PathBuf, line: usize, field: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{task} example {index}: {message}")]
    Example { task: String, index: usize, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
