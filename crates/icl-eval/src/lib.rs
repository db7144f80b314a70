//! The evaluator as a library: the `icl` binary and training loops share it.
//!
//! [`Evaluator::new`] reads every task, builds its prompts (few-shot shots fixed by the seed), tokenizes
//! and plans the batches once; [`Evaluator::evaluate`] then scores any [`CausalLm`] and returns each
//! task's metrics and per-example lines. Bad input fails in `new`, before any model work (or, with
//! [`EvalOptions::skip_bad_rows`], the rows that cannot be scored are left out and counted).
//!
//! Generation tasks (`generation_task_with_answers`) run greedy decoding with the model's key-value
//! cache ([`icl_models::generate_greedy`]) on batches of prompts of similar length, stop per example
//! at a stop sequence, the end-of-text token or the length cap, and score exact match
//! ([`icl_metrics::exact_match`]); see `icl_data::generation_requests` for the cap and stop defaults.
//!
//! Invariant: no files are written and nothing is printed here. What a caller wants to see or keep
//! while a run goes (progress, a journal of finished requests, results written after each task) comes
//! through an [`Observer`]; an observer can also supply results recorded by an interrupted run.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use icl_data::{EncodeOptions, PromptOptions, ReadOptions, TaskSpec, Tokenizer};
//! use icl_eval::{EvalOptions, Evaluator, Silent};
//! use icl_models::{Dtype, ModelSpec};
//! use std::path::Path;
//!
//! let dir = Path::new("gpt-neo-125m");
//! let spec = ModelSpec::read(dir)?;
//! let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
//! let task = TaskSpec {
//!     name: "lambada".into(),
//!     path: "lambada_openai.jsonl".into(),
//!     read: ReadOptions::default(),
//!     prompt: PromptOptions::default(),
//! };
//! let encode = EncodeOptions { max_length: spec.max_length, prefix_token: spec.eos_token_id.unwrap_or(0) };
//! let evaluator = Evaluator::new(vec![task], &tokenizer, encode, EvalOptions { limit: Some(100), ..EvalOptions::default() })?;
//! let model = spec.load(Dtype::F32, tch::Device::Cpu)?;
//! for result in evaluator.evaluate(model.as_ref(), &mut Silent)? {
//!     println!("{}: {:?}", result.report.name, result.report.metrics());
//! }
//! # Ok(())
//! # }
//! ```

mod generate;
pub mod memory;
mod prepare;
mod report;
mod run;
mod score;
mod summary;
mod training;
mod wire;

pub use prepare::{GenerationRequests, PreparedTask, ScoredRequests, Work};
pub use report::{SkippedRow, TaskReport, PERPLEXITY_BOOTSTRAP};
pub use training::{logged_metrics, TrainingEvaluator};

use icl_data::{BatchOptions, EncodeOptions, TaskSpec, Tokenizer};
use icl_models::CausalLm;
use icl_shard::{Collective, SingleProcess};
use score::DeviceBatch;
use std::collections::HashSet;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] icl_data::Error),
    #[error(transparent)]
    Metrics(#[from] icl_metrics::Error),
    #[error(transparent)]
    Model(#[from] icl_models::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// Ranks failed to exchange results.
    #[error(transparent)]
    Shard(#[from] icl_shard::Error),
    /// One example could not be evaluated (out of memory alone, a non-finite log-likelihood).
    #[error("{task} example {example}: {message}")]
    Example { task: String, example: usize, message: String },
    #[error("{0}")]
    Invalid(String),
    /// An [`Observer`] failed (writing its journal, say); the run stops.
    #[error(transparent)]
    Observer(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How requests are batched, and which rows are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Most tokens (rows x padded length) in one forward pass.
    pub batch_tokens: usize,
    /// Most tokens in one scoring forward pass, where that is fewer than `batch_tokens` (which
    /// generation batches keep): on the CPU, `auto` keeps scoring batches small enough to stay in
    /// cache (see [`memory::cpu_scoring_tokens`]). `None`: `batch_tokens`.
    pub scoring_batch_tokens: Option<usize>,
    /// Most rows in one forward pass.
    pub batch_rows: usize,
    /// Shortest packed row (see `icl_data::BatchOptions::row_len`).
    pub row_len: usize,
    /// Evaluate only the first rows of each task (shots still come from the whole file).
    pub limit: Option<usize>,
    /// Leave out (and count) the rows that cannot be scored, such as a continuation that tokenizes to
    /// nothing, instead of failing.
    pub skip_bad_rows: bool,
    /// Compute a token prefix that the rows of a batch share (the same few-shot examples before every
    /// question) once for the batch, instead of once per row; results are those of each row alone, up
    /// to float rounding.
    pub prefix_reuse: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_tokens: 16384,
            scoring_batch_tokens: None,
            batch_rows: 256,
            row_len: 512,
            limit: None,
            skip_bad_rows: false,
            prefix_reuse: true,
        }
    }
}

/// What the model said about one request (a context and one continuation).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestResult {
    /// Summed log-probability of the continuation's tokens.
    pub loglik: f64,
    /// Whether every continuation token was the model's argmax.
    pub is_greedy: bool,
    /// Continuation tokens.
    pub n_tokens: i64,
}

/// Follows a run as it goes; every method has a default that does nothing.
pub trait Observer {
    /// A result that an earlier, interrupted run already computed. A batch whose every request has
    /// one is not recomputed; batch plans do not depend on it, so results equal an uninterrupted run's.
    fn recovered(&self, _task: &str, _request: usize) -> Option<RequestResult> {
        None
    }

    /// A task's scoring starts: `requests` model requests in all (this rank's share of them).
    fn task_started(&mut self, _task: &str, _requests: usize) {}

    /// A batch was scored (not recovered): its requests' results, by request index. On rank 0 of
    /// several, also the results that the other ranks scored, once gathered at the end of the task.
    fn batch_finished(&mut self, _task: &str, _results: &[(usize, RequestResult)]) -> Result<()> {
        Ok(())
    }

    /// Generation tasks: the tokens an earlier, interrupted run generated for a request (by index
    /// into the task's generation requests). A batch whose every request has them is not rerun.
    fn recovered_generation(&self, _task: &str, _request: usize) -> Option<Vec<u32>> {
        None
    }

    /// Generation tasks: a batch was generated (not recovered): each request's new tokens.
    fn generation_finished(&mut self, _task: &str, _outputs: &[(usize, Vec<u32>)]) -> Result<()> {
        Ok(())
    }

    /// `count` more requests of the task are done (scored or recovered).
    fn requests_done(&mut self, _task: &str, _count: usize) {}

    /// A task is finished; returning an error stops the run (earlier results were already passed here).
    fn task_finished(&mut self, _result: &TaskResult) -> Result<()> {
        Ok(())
    }

    /// Something worth telling the user that is not an error (a batch retried smaller).
    fn notice(&mut self, _message: &str) {}
}

/// An observer that does nothing: for training loops that only want the returned metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// The outcome of one task: aggregate metrics and one JSON line per evaluated example.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub report: TaskReport,
    pub samples: Vec<serde_json::Value>,
}

/// Tasks read, prompted, tokenized and batched once, to be scored on any number of models (or
/// checkpoints of one model during training).
#[derive(Debug)]
pub struct Evaluator {
    tasks: Vec<PreparedTask>,
    /// Decodes generated tokens (stop sequences, outputs); kept only when a task generates.
    tokenizer: Option<Tokenizer>,
}

impl Evaluator {
    /// Reads and prepares every task. `encode` carries the model's limits (maximum length, the token
    /// that stands in for an empty context); the batch plan assumes padding with that token.
    pub fn new(
        specs: Vec<TaskSpec>,
        tokenizer: &Tokenizer,
        encode: EncodeOptions,
        options: EvalOptions,
    ) -> Result<Self> {
        let mut names = HashSet::new();
        if let Some(spec) = specs.iter().find(|spec| !names.insert(spec.name.clone())) {
            return Err(Error::Invalid(format!("task name `{}` is given twice: names key the results", spec.name)));
        }
        let batch_options = BatchOptions {
            max_tokens: options.scoring_batch_tokens.map_or(options.batch_tokens, |n| n.min(options.batch_tokens)),
            max_rows: options.batch_rows,
            row_len: options.row_len,
            pad_id: encode.prefix_token,
        };
        let tasks = specs
            .into_iter()
            .map(|spec| prepare::prepare(spec, tokenizer, encode, options, batch_options))
            .collect::<Result<Vec<_>>>()?;
        let tokenizer = tasks.iter().any(|t| t.generation().is_some()).then(|| tokenizer.clone());
        Ok(Self { tasks, tokenizer })
    }

    pub fn tasks(&self) -> &[PreparedTask] {
        &self.tasks
    }

    /// Scores every task on `model` under a no-grad guard and returns their results in task order.
    /// The model's device and dtype are used as they are; inputs are moved to its device.
    pub fn evaluate(&self, model: &dyn CausalLm, observer: &mut dyn Observer) -> Result<Vec<TaskResult>> {
        self.evaluate_on(model, &SingleProcess, observer)
    }

    /// [`Evaluator::evaluate`] with the work shared by the ranks of `collective` (data parallel): every
    /// rank calls it with the same evaluator and its own copy of the model. Each task's batches are
    /// planned as on one rank (split by rows when there are too few to go round, see [`score::rank_plan`])
    /// and dealt out whole ([`icl_shard::assign_by_cost`]), so every request is scored once, by the
    /// same computation as on one rank; the results are then gathered so that every rank returns the
    /// one-rank results, bit for bit. The observer of rank 0 sees every result (other ranks' once
    /// gathered at the end of each task); other ranks' see their own.
    pub fn evaluate_on(
        &self,
        model: &dyn CausalLm,
        collective: &dyn Collective,
        observer: &mut dyn Observer,
    ) -> Result<Vec<TaskResult>> {
        self.run(model, collective, observer, None)
    }

    /// [`Evaluator::evaluate_on`], with `prebuilt[t]` the inputs of task `t`'s batches already on the
    /// model's device when given (see [`score::score_task`]).
    fn run(
        &self,
        model: &dyn CausalLm,
        collective: &dyn Collective,
        observer: &mut dyn Observer,
        prebuilt: Option<&[Vec<Option<DeviceBatch>>]>,
    ) -> Result<Vec<TaskResult>> {
        let _no_grad = tch::no_grad_guard();
        let mut results = Vec::with_capacity(self.tasks.len());
        for (t, p) in self.tasks.iter().enumerate() {
            let inputs = prebuilt.and_then(|tasks| tasks.get(t)).map(Vec::as_slice);
            let result = evaluate_task(model, p, self.tokenizer.as_ref(), collective, observer, inputs)?;
            observer.task_finished(&result)?;
            results.push(result);
        }
        Ok(results)
    }
}

/// One task on `model`, every rank scoring (or generating for) its share: its result, the same on
/// every rank. `prebuilt` as in [`score::score_task`].
fn evaluate_task(
    model: &dyn CausalLm,
    p: &PreparedTask,
    tokenizer: Option<&Tokenizer>,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    prebuilt: Option<&[Option<DeviceBatch>]>,
) -> Result<TaskResult> {
    let start = Instant::now();
    match &p.work {
        Work::Scored(work) => {
            let results = score::score_task(model, p.name(), work, collective, observer, prebuilt)?;
            summary::summarize(model, p, work, &results, start.elapsed().as_secs_f64())
        }
        Work::Generation(work) => {
            // `Evaluator::new` keeps the tokenizer whenever a task generates.
            let tokenizer = tokenizer
                .ok_or_else(|| Error::Invalid(format!("{}: a generation task needs the tokenizer", p.name())))?;
            let outputs = generate::generate_task(model, p.name(), work, tokenizer, collective, observer)?;
            summary::summarize_generation(model, p, &work.plan, tokenizer, &outputs, start.elapsed().as_secs_f64())
        }
    }
}
