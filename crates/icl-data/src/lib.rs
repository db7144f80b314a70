//! Task files to prompts, tokens and padded batches.
//!
//! Invariant: no model code and no tensor library here. The pipeline is
//! [`read_task`] (JSONL or Parquet rows, validated, with file/row/field errors) → [`prompts`] (the
//! prompt strings of each example, zero- or few-shot, llm-foundry's convention; see [`fewshot`] for
//! how shots are drawn, [`peer_fewshot`] for llm-foundry's and lm-eval's own draws) → [`requests`]
//! (one request per scored continuation) → [`encode_requests`] (tokens, lm-evaluation-harness's
//! continuation rule, left truncation) → [`plan_batches`] (packed batches that carry the position
//! of every scored token). Generation tasks leave [`prompts`] for [`generation_requests`] (prompt
//! tokens, length cap, stop sequences) and [`plan_generation_batches`].
//! Downstream crates turn a [`Batch`] into tensors. [`Suite`] reads suite files (llm-foundry's
//! `icl_tasks` YAML and eval-gauntlet categories); [`convert`] turns public releases and other
//! layouts into canonical Parquet task files. Rows of every format (JSONL, CSV, Parquet) come from
//! one reader, with the file and line or row each came from, for [`read_task`] and [`convert`] alike.

// Unit tests unwrap freely, as the integration tests do (their `#![allow(clippy::unwrap_used)]`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod batch;
pub mod chat;
pub mod convert;
mod examples;
pub mod fewshot;
mod generation;
mod parquet;
pub mod peer_fewshot;
mod prompt;
pub mod pyrandom;
mod rows;
mod suite;
mod task;
mod tokenize;

pub use batch::{plan_batches, Batch, BatchOptions};
pub use chat::{build_prompts, chat_prompts, ChatMessage, ChatTemplate};
pub use examples::{
    ChoiceExample, GenerationExample, LmExample, PerplexityExample, SchemaExample, Task, TaskExamples, TaskKind,
};
pub use fewshot::{shot_rows, FewshotSampler};
pub use generation::{generation_requests, plan_generation_batches, GenerationPlan, GenerationRequest};
pub use parquet::write_task;
pub use peer_fewshot::{llm_foundry_shots, lm_eval_shots, lm_eval_shots_same_split};
pub use prompt::{prompts, py_rstrip, py_strip, requests, Prompt, PromptOptions, Request};
pub use suite::{
    suite_labels, task_name, Gauntlet, GauntletCategory, GauntletScores, SkippedTask, Suite, SuiteOptions, TaskOutcome,
    TaskScore, TaskSpec, Weighting, DEFAULT_AVERAGE,
};
pub use task::{read_categories, read_task, FieldMap, ReadOptions, CATEGORY_FIELD, CHAIN_OF_THOUGHT_FIELD};
pub use tokenize::{
    encode_each, encode_requests, encode_rolling, rolling_windows, EncodeOptions, EncodedRequest, Tokenizer,
};

use std::fmt;
use std::path::PathBuf;

/// Where in a file a row sits: JSONL errors give the 1-based line, CSV and Parquet the 1-based row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    Line(usize),
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(n) => write!(f, ":{n}"),
            Self::Row(n) => write!(f, " row {n}"),
        }
    }
}

/// Every failure of this crate names the file, and where it applies the row and the field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: malformed JSON: {message}")]
    Json { path: PathBuf, line: usize, message: String },
    #[error("{path}{at}: field {field}: {message}")]
    Field { path: PathBuf, at: Location, field: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: Parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: CSV: {message}")]
    Csv { path: PathBuf, message: String },
    #[error("suite {path}: {message}")]
    Suite { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template {path}: {message}")]
    ChatTemplate { path: PathBuf, message: String },
    #[error("{task} example {index}: {message}")]
    Example { task: String, index: usize, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs a third-party parser on a user's file and turns a panic inside it into an error naming the
/// file. The fuzz tests (crates/icl-cli/tests/fuzz.rs) found inputs on which the `parquet` and
/// `tokenizers` crates panic instead of returning an error; a hostile file must not crash a run.
pub(crate) fn contain_panics<T>(path: &std::path::Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(Error::File {
            path: path.to_owned(),
            message: format!("{what} failed on this file (it panicked: {detail})"),
        })
    })
}
