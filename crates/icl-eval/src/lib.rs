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

mod report;
mod training;

pub use report::{SkippedRow, TaskReport};
pub use training::{logged_metrics, TrainingEvaluator};

use icl_data::{
    encode_each, generation_requests, plan_batches, plan_generation_batches, prompts, py_strip, read_task, requests,
    Batch, BatchOptions, EncodeOptions, EncodedRequest, GenerationPlan, Prompt, Request, Task, TaskExamples, TaskKind,
    TaskSpec, Tokenizer,
};
use icl_metrics::{
    cut_at_stop, exact_match, predict_choices, score_continuations, ChoiceMetrics, ChoiceScores, ContinuationScores,
    GenerationMetrics, LmMetrics,
};
use icl_models::{generate_greedy, CausalLm, GenerateOptions, ModelInput};
use icl_shard::{Collective, SingleProcess};
use serde_json::json;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;
use tch::{Device, Tensor};

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
    /// Most rows in one forward pass.
    pub batch_rows: usize,
    /// Shortest packed row (see `icl_data::BatchOptions::row_len`).
    pub row_len: usize,
    /// Evaluate only the first rows of each task (shots still come from the whole file).
    pub limit: Option<usize>,
    /// Leave out (and count) the rows that cannot be scored, such as a continuation that tokenizes to
    /// nothing, instead of failing.
    pub skip_bad_rows: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { batch_tokens: 16384, batch_rows: 256, row_len: 512, limit: None, skip_bad_rows: false }
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

/// A task ready to run: its rows, prompts, tokens and batch plan.
#[derive(Debug)]
pub struct PreparedTask {
    pub task: Task,
    pub spec: TaskSpec,
    /// The evaluated examples (the first `limit` rows, less skipped ones), in row order.
    pub prompts: Vec<Prompt>,
    /// Model requests of the evaluated examples, in prompt order.
    pub requests: Vec<Request>,
    pub encoded: Vec<EncodedRequest>,
    /// Rows left out because they cannot be scored (only with `skip_bad_rows`).
    pub skipped: Vec<SkippedRow>,
    /// Generation tasks: prompt tokens, length cap and stop sequences (the prompts' requests).
    pub generation: Option<GenerationPlan>,
    /// Generation tasks: batches of indices into the plan's requests, in the order they run.
    generation_batches: Vec<Vec<usize>>,
    /// Groups of requests that share their context (the choices of a multiple-choice question).
    shared: Vec<Vec<usize>>,
    batches: Vec<Batch>,
    batch_options: BatchOptions,
}

impl PreparedTask {
    pub fn name(&self) -> &str {
        &self.task.name
    }

    /// The batch plan: every request once, in the order batches are run.
    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }
}

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
            max_tokens: options.batch_tokens,
            max_rows: options.batch_rows,
            row_len: options.row_len,
            pad_id: encode.prefix_token,
        };
        let tasks = specs
            .into_iter()
            .map(|spec| prepare(spec, tokenizer, encode, options, batch_options))
            .collect::<Result<Vec<_>>>()?;
        let tokenizer = tasks.iter().any(|t| t.generation.is_some()).then(|| tokenizer.clone());
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
    /// planned as on one rank (split by rows when there are too few to go round, see [`rank_plan`])
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
    /// model's device when given (see [`score_task`]).
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

fn prepare(
    spec: TaskSpec,
    tokenizer: &Tokenizer,
    encode: EncodeOptions,
    options: EvalOptions,
    batch_options: BatchOptions,
) -> Result<PreparedTask> {
    let task = read_task(&spec.name, &spec.path, &spec.read)?;
    if task.kind() == TaskKind::GenerationWithAnswers {
        let prompts = prompts(&task, &spec.prompt, options.limit);
        let plan =
            generation_requests(tokenizer, &task, &prompts, &spec.prompt, encode.max_length, encode.prefix_token)?;
        let lengths: Vec<usize> = plan.requests.iter().map(|r| r.input.len()).collect();
        let generation_batches =
            plan_generation_batches(&lengths, plan.max_new_tokens, options.batch_tokens, options.batch_rows);
        return Ok(PreparedTask {
            task,
            spec,
            prompts,
            requests: Vec::new(),
            encoded: Vec::new(),
            skipped: Vec::new(),
            generation: Some(plan),
            generation_batches,
            shared: Vec::new(),
            batches: Vec::new(),
            batch_options,
        });
    }
    let mut prompts = prompts(&task, &spec.prompt, options.limit);
    let mut requests = requests(&prompts);
    let each = encode_each(tokenizer, &spec.name, &requests, encode)?;
    let mut skipped = Vec::new();
    let encoded = if options.skip_bad_rows {
        // An example is left out whole when any of its requests cannot be scored.
        let mut bad: HashMap<usize, String> = HashMap::new();
        for (r, e) in requests.iter().zip(&each) {
            if let Err(e) = e {
                bad.entry(r.example).or_insert_with(|| e.to_string());
            }
        }
        // Every request of a kept example encoded; the others are dropped with their example.
        let encoded: Vec<EncodedRequest> = requests
            .iter()
            .zip(each)
            .filter_map(|(r, e)| if bad.contains_key(&r.example) { None } else { e.ok() })
            .collect();
        prompts.retain(|p| !bad.contains_key(&p.example));
        requests.retain(|r| !bad.contains_key(&r.example));
        let mut rows: Vec<(usize, String)> = bad.into_iter().collect();
        rows.sort();
        skipped = rows.into_iter().map(|(index, reason)| SkippedRow { index, reason }).collect();
        encoded
    } else {
        each.into_iter().collect::<Result<Vec<_>, _>>()?
    };
    // The choices of a multiple-choice question share their context: it is computed once.
    let mut shared: Vec<Vec<usize>> = Vec::new();
    if task.kind() == TaskKind::MultipleChoice {
        for (i, r) in requests.iter().enumerate() {
            if r.choice == 0 {
                shared.push(Vec::new());
            }
            if let Some(group) = shared.last_mut() {
                group.push(i);
            }
        }
    }
    let batches = plan_batches(&encoded, &shared, batch_options);
    Ok(PreparedTask {
        task,
        spec,
        prompts,
        requests,
        encoded,
        skipped,
        generation: None,
        generation_batches: Vec::new(),
        shared,
        batches,
        batch_options,
    })
}

/// One task on `model`, every rank scoring (or generating for) its share: its result, the same on
/// every rank. `prebuilt` as in [`score_task`].
fn evaluate_task(
    model: &dyn CausalLm,
    p: &PreparedTask,
    tokenizer: Option<&Tokenizer>,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    prebuilt: Option<&[Option<DeviceBatch>]>,
) -> Result<TaskResult> {
    let start = Instant::now();
    match (&p.generation, tokenizer) {
        (Some(plan), Some(tokenizer)) => {
            let outputs = generate_task(model, p, plan, tokenizer, collective, observer)?;
            summarize_generation(model, p, plan, tokenizer, &outputs, start.elapsed().as_secs_f64())
        }
        _ => {
            let scores = score_task(model, p, collective, observer, prebuilt)?;
            summarize(model, p, &scores, start.elapsed().as_secs_f64())
        }
    }
}

/// Generates greedily for every request of a generation task, batch by batch; returns each
/// request's new tokens (the end-of-text token left out). Batches whose every request the observer
/// recovered are not run; a batch that runs out of memory is split in two and retried.
fn generate_task(
    model: &dyn CausalLm,
    p: &PreparedTask,
    plan: &GenerationPlan,
    tokenizer: &Tokenizer,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Vec<Vec<u32>>> {
    let name = p.name();
    // Batches are dealt out whole, by prompt tokens plus the tokens they may generate.
    let costs: Vec<u64> = p
        .generation_batches
        .iter()
        .map(|b| b.iter().map(|&r| (plan.requests[r].input.len() + plan.max_new_tokens) as u64).sum())
        .collect();
    let mine = icl_shard::assign_by_cost(&costs, collective.rank(), collective.world_size());
    let my_requests: usize = mine.iter().map(|&b| p.generation_batches[b].len()).sum();
    observer.task_started(name, my_requests);
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); plan.requests.len()];
    let mut generated_here: Vec<usize> = Vec::with_capacity(my_requests);
    let mut queue: VecDeque<Vec<usize>> = mine.iter().map(|&b| p.generation_batches[b].clone()).collect();
    let options =
        GenerateOptions { max_new_tokens: plan.max_new_tokens, eos_token_id: model.eos_token_id().map(i64::from) };
    while let Some(batch) = queue.pop_front() {
        let done: Option<Vec<Vec<u32>>> = batch.iter().map(|&r| observer.recovered_generation(name, r)).collect();
        if let Some(done) = done {
            for (&r, tokens) in batch.iter().zip(done) {
                outputs[r] = tokens;
            }
            generated_here.extend(&batch);
            observer.requests_done(name, batch.len());
            continue;
        }
        let prompts: Vec<Vec<i64>> =
            batch.iter().map(|&r| plan.requests[r].input.iter().map(|&t| i64::from(t)).collect()).collect();
        // Decoding fails only on ids outside the vocabulary; the first failure is reported.
        let mut decode_error: Option<icl_data::Error> = None;
        let mut stop = |_row: usize, tokens: &[i64]| -> bool {
            if plan.stop_sequences.is_empty() {
                return false;
            }
            let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
            match tokenizer.decode(&ids) {
                Ok(text) => plan.stop_sequences.iter().any(|s| text.contains(s.as_str())),
                Err(e) => {
                    decode_error.get_or_insert(e);
                    true
                }
            }
        };
        let generated = match generate_greedy(model, &prompts, options, &mut stop) {
            Ok(generated) => generated,
            Err(e) => {
                let e = Error::from(e);
                if !is_out_of_memory(&e) {
                    return Err(e);
                }
                if batch.len() < 2 {
                    let r = batch[0];
                    return Err(Error::Example {
                        task: name.to_owned(),
                        example: plan.requests[r].example,
                        message: format!(
                            "out of memory even alone ({} prompt tokens): {e}",
                            plan.requests[r].input.len()
                        ),
                    });
                }
                let (first, second) = batch.split_at(batch.len() / 2);
                observer.notice(&format!(
                    "out of memory generating for {} prompts; retrying them in two halves",
                    batch.len()
                ));
                queue.push_front(second.to_vec());
                queue.push_front(first.to_vec());
                continue;
            }
        };
        if let Some(e) = decode_error {
            return Err(e.into());
        }
        let finished: Vec<(usize, Vec<u32>)> = batch
            .iter()
            .zip(generated)
            .map(|(&r, tokens)| (r, tokens.into_iter().map(|t| t as u32).collect()))
            .collect();
        for (r, tokens) in &finished {
            outputs[*r] = tokens.clone();
            generated_here.push(*r);
        }
        observer.generation_finished(name, &finished)?;
        observer.requests_done(name, finished.len());
    }
    // A parameter-sharded model's decoding steps are collective: wait out the other ranks' batches.
    model.finish_collectives()?;
    if collective.world_size() > 1 {
        gather_outputs(name, collective, observer, &mut outputs, &generated_here)?;
    }
    Ok(outputs)
}

/// Gives every rank every rank's generated tokens; rank 0's observer sees the other ranks' outputs.
/// On the wire, per request: its index, the token count, then the tokens (little-endian u64/u32).
fn gather_outputs(
    name: &str,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    outputs: &mut [Vec<u32>],
    generated_here: &[usize],
) -> Result<()> {
    let mut wire = Vec::new();
    for &r in generated_here {
        wire.extend((r as u64).to_le_bytes());
        wire.extend((outputs[r].len() as u64).to_le_bytes());
        for &t in &outputs[r] {
            wire.extend(t.to_le_bytes());
        }
    }
    let gathered = icl_shard::all_gather_bytes(collective, &wire)?;
    let mut seen = vec![false; outputs.len()];
    let mut from_others = Vec::new();
    for (rank, bytes) in gathered.iter().enumerate() {
        let malformed = || Error::Invalid(format!("{name}: rank {rank} sent malformed generation results"));
        let mut at = 0;
        let word = |at: &mut usize| -> Result<u64> {
            let b = bytes.get(*at..*at + 8).ok_or_else(malformed)?;
            *at += 8;
            Ok(u64::from_le_bytes(b.try_into().map_err(|_| malformed())?))
        };
        while at < bytes.len() {
            let r = word(&mut at)? as usize;
            let len = word(&mut at)? as usize;
            let body = bytes.get(at..at.saturating_add(len.saturating_mul(4))).ok_or_else(malformed)?;
            at += body.len();
            if r >= seen.len() || std::mem::replace(&mut seen[r], true) {
                return Err(Error::Invalid(format!("{name}: rank {rank} sent request {r} twice or out of range")));
            }
            let tokens: Vec<u32> = body.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if rank != collective.rank() && observer.recovered_generation(name, r).is_none() {
                from_others.push((r, tokens.clone()));
            }
            outputs[r] = tokens;
        }
    }
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(Error::Invalid(format!("{name}: no rank generated for request {missing}")));
    }
    if collective.rank() == 0 && !from_others.is_empty() {
        observer.generation_finished(name, &from_others)?;
    }
    Ok(())
}

/// What the model said about each request of a task, in request order.
struct Scores {
    loglik: Vec<f64>,
    is_greedy: Vec<bool>,
    n_tokens: Vec<i64>,
}

/// Batches per rank below which the plan is split further for several ranks.
const BATCHES_PER_RANK: usize = 4;

/// The batches that `world_size` ranks share out: the one-rank plan, or, when it has fewer than
/// [`BATCHES_PER_RANK`] batches per rank, the same rows split into smaller batches so that every rank
/// gets work. Rows are kept exactly ([`Batch::split_rows`]) and results do not depend on how rows are
/// batched, so any rank count gives the one-rank results bit for bit. The same on every rank.
fn rank_plan(p: &PreparedTask, world_size: usize) -> Cow<'_, [Batch]> {
    let wanted = BATCHES_PER_RANK * world_size;
    if world_size <= 1 || p.batches.len() >= wanted {
        return Cow::Borrowed(&p.batches);
    }
    let rows: usize = p.batches.iter().map(|b| b.rows).sum();
    let max_rows = rows.div_ceil(wanted).max(1);
    Cow::Owned(p.batches.iter().flat_map(|b| b.split_rows(max_rows)).collect())
}

/// The batches of `plan` that `rank` of `world_size` scores: whole batches, balanced by tokens.
fn batches_of_rank(plan: &[Batch], rank: usize, world_size: usize) -> Vec<usize> {
    let costs: Vec<u64> = plan.iter().map(|b| (b.rows * b.seq_len) as u64).collect();
    icl_shard::assign_by_cost(&costs, rank, world_size)
}

/// Runs the model over every request of a task: this rank's share of the batches, then the other
/// ranks' results are gathered. Batches whose every request the observer recovered are not run.
/// `prebuilt[i]`, when given, is the input of batch `i` of [`rank_plan`], already on the model's
/// device. A batch that runs out of memory is planned again smaller and put back at the front.
fn score_task(
    model: &dyn CausalLm,
    p: &PreparedTask,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    prebuilt: Option<&[Option<DeviceBatch>]>,
) -> Result<Scores> {
    let name = p.name();
    let n = p.encoded.len();
    let plan = rank_plan(p, collective.world_size());
    let mine = batches_of_rank(&plan, collective.rank(), collective.world_size());
    let my_requests: usize = mine.iter().map(|&b| plan[b].requests.len()).sum();
    observer.task_started(name, my_requests);
    // Each entry: a batch, its options, and its index in the plan (none once re-planned).
    let mut queue: VecDeque<(Batch, BatchOptions, Option<usize>)> =
        mine.iter().map(|&b| (plan[b].clone(), p.batch_options, Some(b))).collect();
    let mut scores = Scores { loglik: vec![0.0; n], is_greedy: vec![false; n], n_tokens: vec![0; n] };
    let mut scored_here: Vec<usize> = Vec::with_capacity(my_requests);
    while let Some((batch, batch_options, planned)) = queue.pop_front() {
        let done: Option<Vec<RequestResult>> = batch.requests.iter().map(|&r| observer.recovered(name, r)).collect();
        if let Some(done) = done {
            for (&r, result) in batch.requests.iter().zip(done) {
                scores.loglik[r] = result.loglik;
                scores.is_greedy[r] = result.is_greedy;
                scores.n_tokens[r] = result.n_tokens;
            }
            scored_here.extend(&batch.requests);
            observer.requests_done(name, batch.requests.len());
            continue;
        }
        let ready = planned.and_then(|i| prebuilt.and_then(|inputs| inputs.get(i)?.as_ref()));
        let scored = match ready {
            Some(input) => score_input(model, input, &batch),
            None => score_batch(model, &batch),
        };
        let finished = match scored {
            Ok(finished) => finished,
            Err(e) if is_out_of_memory(&e) => {
                let smaller = BatchOptions {
                    max_tokens: (batch.rows * batch.seq_len / 2).max(1),
                    row_len: (batch_options.row_len / 2).max(1),
                    ..batch_options
                };
                let parts = replan(&p.encoded, &p.shared, &batch.requests, smaller);
                if parts.len() < 2 && parts.iter().all(|b| b.rows * b.seq_len >= batch.rows * batch.seq_len) {
                    let r = batch.requests[0];
                    return Err(Error::Example {
                        task: name.to_owned(),
                        example: p.requests[r].example,
                        message: format!("out of memory even alone ({} tokens): {e}", p.encoded[r].input.len()),
                    });
                }
                observer.notice(&format!(
                    "out of memory on a batch of {} x {} tokens; retrying it in {} smaller batch(es)",
                    batch.rows,
                    batch.seq_len,
                    parts.len()
                ));
                for part in parts.into_iter().rev() {
                    queue.push_front((part, smaller, None));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        for &(r, result) in &finished {
            if !result.loglik.is_finite() {
                return Err(Error::Example {
                    task: name.to_owned(),
                    example: p.requests[r].example,
                    message: format!("choice {}: the model gave a non-finite log-likelihood", p.requests[r].choice),
                });
            }
            scores.loglik[r] = result.loglik;
            scores.is_greedy[r] = result.is_greedy;
            scores.n_tokens[r] = result.n_tokens;
            scored_here.push(r);
        }
        observer.batch_finished(name, &finished)?;
        observer.requests_done(name, finished.len());
    }
    // A parameter-sharded model's forward passes are collective: wait out the other ranks' batches.
    model.finish_collectives()?;
    if collective.world_size() > 1 {
        gather_scores(p, collective, observer, &mut scores, &scored_here)?;
    }
    Ok(scores)
}

/// Bytes of one request's result on the wire: request index, log-likelihood bits, greedy flag, tokens.
const RESULT_BYTES: usize = 8 + 8 + 1 + 8;

/// Hands every rank the results of every other rank (each rank scored the requests of its own
/// batches), and checks that together they cover every request exactly once. The log-likelihoods
/// travel as their bits, so gathered results are the ones computed.
fn gather_scores(
    p: &PreparedTask,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    scores: &mut Scores,
    scored_here: &[usize],
) -> Result<()> {
    let name = p.name();
    let mut wire = Vec::with_capacity(scored_here.len() * RESULT_BYTES);
    for &r in scored_here {
        wire.extend((r as u64).to_le_bytes());
        wire.extend(scores.loglik[r].to_bits().to_le_bytes());
        wire.push(u8::from(scores.is_greedy[r]));
        wire.extend(scores.n_tokens[r].to_le_bytes());
    }
    let gathered = icl_shard::all_gather_bytes(collective, &wire)?;
    let mut seen = vec![false; p.encoded.len()];
    let mut from_others = Vec::new();
    for (rank, bytes) in gathered.iter().enumerate() {
        if bytes.len() % RESULT_BYTES != 0 {
            return Err(Error::Invalid(format!("{name}: rank {rank} sent {} bytes of results", bytes.len())));
        }
        for record in bytes.chunks_exact(RESULT_BYTES) {
            let word = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().unwrap_or([0; 8]));
            let r = word(0) as usize;
            if r >= seen.len() || std::mem::replace(&mut seen[r], true) {
                return Err(Error::Invalid(format!("{name}: rank {rank} sent request {r} twice or out of range")));
            }
            let result = RequestResult {
                loglik: f64::from_bits(word(8)),
                is_greedy: record[16] != 0,
                n_tokens: word(17) as i64,
            };
            scores.loglik[r] = result.loglik;
            scores.is_greedy[r] = result.is_greedy;
            scores.n_tokens[r] = result.n_tokens;
            if rank != collective.rank() && observer.recovered(name, r).is_none() {
                from_others.push((r, result));
            }
        }
    }
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(Error::Invalid(format!("{name}: no rank scored request {missing}")));
    }
    if collective.rank() == 0 && !from_others.is_empty() {
        observer.batch_finished(name, &from_others)?;
    }
    Ok(())
}

/// A batch's model input and scored positions, on a device.
#[derive(Debug)]
struct DeviceBatch {
    input: ModelInput,
    scored: Tensor,
}

impl DeviceBatch {
    fn new(batch: &Batch, device: Device) -> Result<Self> {
        let tensor = |v: &[i64], shape: &[i64]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v).f_view(shape)?.f_to_device(device)?)
        };
        let shape = [batch.rows as i64, batch.seq_len as i64];
        let input = ModelInput::packed(
            &tensor(&batch.input_ids, &shape)?,
            &tensor(&batch.positions, &shape)?,
            &tensor(&batch.segments, &shape)?,
            &tensor(&batch.branches, &shape)?,
        )?;
        Ok(Self { input, scored: tensor(&batch.scored, &[batch.scored.len() as i64])? })
    }
}

/// One forward pass: each request's result, in `batch.requests` order.
fn score_batch(model: &dyn CausalLm, batch: &Batch) -> Result<Vec<(usize, RequestResult)>> {
    score_input(model, &DeviceBatch::new(batch, model.device())?, batch)
}

/// [`score_batch`] on an input already on the model's device.
fn score_input(model: &dyn CausalLm, input: &DeviceBatch, batch: &Batch) -> Result<Vec<(usize, RequestResult)>> {
    let hidden = model.hidden_at(&input.input, &input.scored)?;
    score_in_chunks(model, &hidden, batch)
}

/// Whether an error is libtorch failing to allocate (CPU or CUDA), which a smaller batch can avoid.
fn is_out_of_memory(e: &Error) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text += &s.to_string();
        source = s.source();
    }
    ["can't allocate memory", "out of memory", "not enough memory"].iter().any(|m| text.contains(m))
}

/// Plans `requests` (indices into `encoded`) again under `options`; the batches index `encoded`.
fn replan(encoded: &[EncodedRequest], shared: &[Vec<usize>], requests: &[usize], options: BatchOptions) -> Vec<Batch> {
    let subset: Vec<EncodedRequest> = requests.iter().map(|&r| encoded[r].clone()).collect();
    let local: HashMap<usize, usize> = requests.iter().enumerate().map(|(i, &r)| (r, i)).collect();
    let sub_shared: Vec<Vec<usize>> = shared
        .iter()
        .map(|g| g.iter().filter_map(|r| local.get(r).copied()).collect::<Vec<_>>())
        .filter(|g| !g.is_empty())
        .collect();
    let mut batches = plan_batches(&subset, &sub_shared, options);
    for b in &mut batches {
        for r in &mut b.requests {
            *r = requests[*r];
        }
    }
    batches
}

/// Bytes of f32 logits per output-head chunk (about 670 scored positions for a 50k vocabulary): large
/// enough for an efficient matmul, small enough that a batch never holds `[scored, vocab]` at once
/// (multiple-choice batches score thousands of positions).
const HEAD_CHUNK_BYTES: i64 = 128 << 20;

/// Rows of every output-head call are padded to a multiple of this. CPU matmul kernels pick their
/// code path by the number of rows, and below about a dozen rows some paths round differently; with
/// every call at 16 rows or more a position's log-probabilities do not depend on which batch (and so
/// which batch size or rank) it was scored in.
const HEAD_ROW_MULTIPLE: i64 = 16;

/// Applies the output head to a batch's scored hidden states chunk by chunk and merges the per-token
/// results (log-likelihoods, greedy flags, counts) per request. Each request's log-likelihood is
/// summed token by token in order, in f64, so chunk boundaries do not change a single bit.
fn score_in_chunks(model: &dyn CausalLm, hidden: &Tensor, batch: &Batch) -> Result<Vec<(usize, RequestResult)>> {
    let mut results: Vec<(usize, RequestResult)> =
        batch.requests.iter().map(|&r| (r, RequestResult { loglik: 0.0, is_greedy: true, n_tokens: 0 })).collect();
    let chunk = (HEAD_CHUNK_BYTES / (4 * model.vocab_size()) / HEAD_ROW_MULTIPLE).max(1) * HEAD_ROW_MULTIPLE;
    let device = model.device();
    let total = batch.scored.len() as i64;
    let mut start = 0i64;
    while start < total {
        let len = chunk.min(total - start);
        let padded_len = (len + HEAD_ROW_MULTIPLE - 1) / HEAD_ROW_MULTIPLE * HEAD_ROW_MULTIPLE;
        let mut rows = hidden.f_narrow(0, start, len)?;
        if padded_len > len {
            let padding = Tensor::f_zeros([padded_len - len, rows.size()[1]], (rows.kind(), device))?;
            rows = Tensor::f_cat(&[rows, padding], 0)?;
        }
        let log_probs = model.head_log_probs(&rows)?.f_narrow(0, 0, len)?;
        let range = start as usize..(start + len) as usize;
        let targets = Tensor::from_slice(&batch.targets[range.clone()]).f_to_device(device)?;
        // Every token its own owner: per-token values, summed below in a fixed order.
        let each = Tensor::f_arange(len, (tch::Kind::Int64, device))?;
        let scores = score_continuations(&log_probs, &targets, &each, len)?;
        let loglik = Vec::<f64>::try_from(&scores.loglik.f_to_device(Device::Cpu)?)?;
        let greedy = Vec::<bool>::try_from(&scores.is_greedy.f_to_device(Device::Cpu)?)?;
        for (k, &owner) in batch.owner[range].iter().enumerate() {
            let result = &mut results[owner as usize].1;
            result.loglik += loglik[k];
            result.is_greedy &= greedy[k];
            result.n_tokens += 1;
        }
        start += len;
    }
    Ok(results)
}

/// The causal sequences a task needs at the least: every request whole, except that the choices of a
/// multiple-choice question share their context (counted once; each choice then adds the
/// continuation tokens it feeds to the model).
fn needed_sequences(p: &PreparedTask) -> Vec<usize> {
    let mut lengths = Vec::with_capacity(p.encoded.len());
    for (request, encoded) in p.requests.iter().zip(&p.encoded) {
        let fed_continuation = encoded.targets.len() - 1;
        match &p.task.examples {
            TaskExamples::MultipleChoice(_) if !encoded.truncated => {
                if request.choice == 0 {
                    lengths.push(encoded.input.len() - fed_continuation);
                }
                lengths.push(fed_continuation);
            }
            _ => lengths.push(encoded.input.len()),
        }
    }
    lengths
}

/// Task metrics and per-example sample lines from the scores.
fn summarize(model: &dyn CausalLm, p: &PreparedTask, s: &Scores, seconds: f64) -> Result<TaskResult> {
    let tokens: usize = p.encoded.iter().map(|e| e.input.len()).sum();
    let truncated = p.encoded.iter().filter(|e| e.truncated).count();
    let name = p.name();
    let n = p.prompts.len();
    let mut report = TaskReport::new(name, p.task.kind().name(), n, seconds, tokens, truncated);
    report.num_fewshot = p.spec.prompt.num_fewshot;
    report.skipped = p.skipped.len();
    report.skipped_rows = p.skipped.clone();
    report.set_flops(model.forward_flops(&needed_sequences(p), p.encoded.iter().map(|e| e.targets.len()).sum()));
    let mut samples = Vec::new();
    match &p.task.examples {
        TaskExamples::LanguageModeling(_) => {
            let mut metrics = LmMetrics::default();
            metrics.update(&ContinuationScores {
                loglik: Tensor::from_slice(&s.loglik),
                is_greedy: Tensor::from_slice(&s.is_greedy),
                n_tokens: Tensor::from_slice(&s.n_tokens),
            })?;
            report.acc = Some(metrics.acc.value());
            report.perplexity = Some(metrics.perplexity());
            report.token_perplexity = Some(metrics.token_perplexity());
            for (i, r) in p.requests.iter().enumerate() {
                samples.push(json!({
                    "task": name, "index": r.example, "loglik": s.loglik[i],
                    "is_greedy": s.is_greedy[i], "n_tokens": s.n_tokens[i],
                }));
            }
        }
        TaskExamples::MultipleChoice(_) | TaskExamples::Schema(_) => {
            // (options, gold) of each evaluated question (a prompt; rows may have been skipped).
            let rows: Vec<(usize, usize)> = p
                .prompts
                .iter()
                .map(|prompt| p.task.choice(prompt.example))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::Invalid(format!("{name}: a choice task without options")))?;
            let question_of: HashMap<usize, i64> =
                p.prompts.iter().enumerate().map(|(q, prompt)| (prompt.example, q as i64)).collect();
            let n_chars: Vec<i64> =
                p.requests.iter().map(|r| py_strip(&r.continuation).chars().count() as i64).collect();
            let question: Vec<i64> = p.requests.iter().map(|r| question_of[&r.example]).collect();
            let choice: Vec<i64> = p.requests.iter().map(|r| r.choice as i64).collect();
            let scores = ChoiceScores {
                loglik: Tensor::from_slice(&s.loglik),
                n_tokens: Tensor::from_slice(&s.n_tokens),
                n_chars: Tensor::from_slice(&n_chars),
                question: Tensor::from_slice(&question),
                choice: Tensor::from_slice(&choice),
            };
            let preds = predict_choices(&scores, rows.len() as i64)?;
            let gold: Vec<i64> = rows.iter().map(|&(_, g)| g as i64).collect();
            let mut metrics = ChoiceMetrics::default();
            metrics.update(&preds, &Tensor::from_slice(&gold))?;
            report.acc = Some(metrics.acc.value());
            report.acc_norm = Some(metrics.acc_norm.value());
            report.acc_mean_nll = Some(metrics.acc_mean_nll.value());
            let pred = Vec::<i64>::try_from(&preds.acc)?;
            let pred_norm = Vec::<i64>::try_from(&preds.acc_norm)?;
            let mut first = 0;
            report.random_baseline = rows.iter().map(|&(k, _)| 1.0 / k as f64).sum::<f64>() / n.max(1) as f64;
            for (q, (&(k, gold), prompt)) in rows.iter().zip(&p.prompts).enumerate() {
                let range = first..first + k;
                first = range.end;
                samples.push(json!({
                    "task": name, "index": prompt.example, "logliks": &s.loglik[range.clone()],
                    "n_tokens": &s.n_tokens[range], "pred": pred[q], "pred_norm": pred_norm[q], "gold": gold,
                }));
            }
        }
        TaskExamples::GenerationWithAnswers(_) => {
            return Err(Error::Invalid(format!("{name}: a generation task has no scored requests")));
        }
    }
    Ok(TaskResult { report, samples })
}

/// Exact match and per-example sample lines of a generation task: each output is decoded, cut
/// before its first stop sequence and compared with the accepted answers.
fn summarize_generation(
    model: &dyn CausalLm,
    p: &PreparedTask,
    plan: &GenerationPlan,
    tokenizer: &Tokenizer,
    outputs: &[Vec<u32>],
    seconds: f64,
) -> Result<TaskResult> {
    let name = p.name();
    let n = plan.requests.len();
    let generated: usize = outputs.iter().map(Vec::len).sum();
    let prompt_tokens: usize = plan.requests.iter().map(|r| r.input.len()).sum();
    let truncated = plan.requests.iter().filter(|r| r.truncated).count();
    let mut report = TaskReport::new(name, p.task.kind().name(), n, seconds, prompt_tokens + generated, truncated);
    report.num_fewshot = p.spec.prompt.num_fewshot;
    report.max_new_tokens = Some(plan.max_new_tokens);
    // Each sequence is its prompt plus what was generated; the head ran once per generated token.
    let lengths: Vec<usize> = plan.requests.iter().zip(outputs).map(|(r, o)| r.input.len() + o.len()).collect();
    report.set_flops(model.forward_flops(&lengths, generated));
    let mut correct = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    for (request, tokens) in plan.requests.iter().zip(outputs) {
        let text = tokenizer.decode(tokens)?;
        let output = cut_at_stop(&text, &plan.stop_sequences);
        let is_correct = exact_match(output, &request.answers);
        correct.push(is_correct);
        samples.push(json!({
            "task": name, "index": request.example, "output": output, "correct": is_correct,
            "n_tokens": tokens.len(),
        }));
    }
    let mut metrics = GenerationMetrics::default();
    metrics.update(&Tensor::from_slice(&correct))?;
    report.exact_match = Some(metrics.exact_match.value());
    // Gauntlet aggregation reads `acc`; chance is 0.
    report.acc = report.exact_match;
    report.random_baseline = 0.0;
    Ok(TaskResult { report, samples })
}
