//! Preparation: a task read, prompted, tokenized and planned into batches once, before any model work.

use crate::{EvalOptions, Result, SkippedRow};
use icl_data::{
    build_prompts, encode_each, encode_rolling, generation_requests, plan_batches, plan_generation_batches, read_task,
    requests, Batch, BatchOptions, EncodeOptions, EncodedRequest, GenerationPlan, Prompt, Request, Task, TaskKind,
    TaskSpec, Tokenizer,
};
use std::collections::HashMap;

/// A task ready to run: its rows, prompts, and the model work they need.
#[derive(Debug)]
pub struct PreparedTask {
    pub task: Task,
    pub spec: TaskSpec,
    /// The evaluated examples (the first `limit` rows, less skipped ones), in row order.
    pub prompts: Vec<Prompt>,
    /// Rows left out because they cannot be scored (only with `skip_bad_rows`).
    pub skipped: Vec<SkippedRow>,
    /// Scored requests or generation, by the task's kind.
    pub work: Work,
}

/// The model work of a task: its two kinds run differently and keep different plans.
#[derive(Debug)]
pub enum Work {
    /// Language modelling, multiple choice, schema: continuations scored after contexts.
    Scored(ScoredRequests),
    /// `generation_task_with_answers`: greedy decoding after each prompt.
    Generation(GenerationRequests),
}

/// A scored task's requests, their tokens and the batch plan.
#[derive(Debug)]
pub struct ScoredRequests {
    /// Model requests of the evaluated examples, in prompt order (perplexity tasks: one per window,
    /// `choice` the window's index within its document, with empty texts).
    pub requests: Vec<Request>,
    pub encoded: Vec<EncodedRequest>,
    /// Groups of requests that share their context (the choices of a multiple-choice question).
    pub(crate) shared: Vec<Vec<usize>>,
    pub(crate) batches: Vec<Batch>,
    /// What `batches` were planned under; a batch that runs out of memory is planned again smaller.
    pub(crate) batch_options: BatchOptions,
    /// Tokens every request starts with, computed once per task ([`crate::EvalOptions::prefix_reuse`]);
    /// empty when the requests share no long prefix.
    pub(crate) prefix: Vec<u32>,
    /// The requests less `prefix`, as the batches hold them (equal to `encoded` without a prefix).
    pub(crate) planned: Vec<EncodedRequest>,
}

impl ScoredRequests {
    /// Requests with their batch plan: a prefix that every request shares (when `prefix_reuse` and it
    /// is long enough) is taken off, to be computed once, and the rest planned into batches.
    pub(crate) fn new(
        requests: Vec<Request>,
        encoded: Vec<EncodedRequest>,
        shared: Vec<Vec<usize>>,
        batch_options: BatchOptions,
        prefix_reuse: bool,
    ) -> Self {
        // Every scored position must stay after the prefix: the first one is that of the token before
        // the first target.
        let inputs: Vec<&[u32]> = encoded.iter().map(|e| &e.input[..e.input.len() - e.targets.len()]).collect();
        let common = if prefix_reuse { crate::generate::shared_prefix_len(&inputs) } else { 0 };
        let (prefix, planned) = if common > 0 {
            let prefix = encoded[0].input[..common].to_vec();
            let planned = encoded
                .iter()
                .map(|e| EncodedRequest { input: e.input[common..].to_vec(), ..e.clone() })
                .collect::<Vec<_>>();
            (prefix, planned)
        } else {
            (Vec::new(), encoded.clone())
        };
        let batches = plan_batches(&planned, &shared, batch_options);
        Self { requests, encoded, shared, batches, batch_options, prefix, planned }
    }
}

/// A generation task's prompts (tokens, length cap, stop sequences) and its batches.
#[derive(Debug)]
pub struct GenerationRequests {
    /// One request per prompt, in prompt order.
    pub plan: GenerationPlan,
    /// Batches of indices into the plan's requests, in the order they run, each costed with the shared
    /// prefix once.
    pub(crate) batches: Vec<Vec<usize>>,
    /// The same, each prompt costed whole: the batches run when the prefix is not reused after all.
    pub(crate) whole_prompt_batches: Vec<Vec<usize>>,
    /// Whether a batch's shared prompt prefix is computed once ([`crate::EvalOptions::prefix_reuse`]).
    pub(crate) prefix_reuse: bool,
    /// Tokens that every prompt of the task starts with (0 without reuse): the least each batch shares.
    pub(crate) shared_prefix: usize,
}

impl PreparedTask {
    pub fn name(&self) -> &str {
        &self.task.name
    }

    /// The batch plan of a scored task: every request once, in the order batches are run (empty for a
    /// generation task, whose batches are of prompts).
    pub fn batches(&self) -> &[Batch] {
        match &self.work {
            Work::Scored(work) => &work.batches,
            Work::Generation(_) => &[],
        }
    }

    /// A generation task's prompt tokens, length cap and stop sequences; `None` for a scored task.
    pub fn generation(&self) -> Option<&GenerationPlan> {
        match &self.work {
            Work::Generation(work) => Some(&work.plan),
            Work::Scored(_) => None,
        }
    }
}

/// Reads `spec`'s task and prepares it; bad rows fail here (or are skipped with `skip_bad_rows`).
pub(crate) fn prepare(
    spec: TaskSpec,
    tokenizer: &Tokenizer,
    encode: EncodeOptions,
    options: EvalOptions,
    batch_options: BatchOptions,
) -> Result<PreparedTask> {
    let task = read_task(&spec.name, &spec.path, &spec.read)?;
    let mut prompts = build_prompts(&task, &spec.prompt, options.limit)?;
    if task.kind() == TaskKind::GenerationWithAnswers {
        let plan =
            generation_requests(tokenizer, &task, &prompts, &spec.prompt, encode.max_length, encode.prefix_token)?;
        // A prefix that every prompt shares is computed once per batch and kept once, so the batch
        // budget counts it once and each row by what follows it.
        let inputs: Vec<&[u32]> = plan.requests.iter().map(|r| r.input.as_slice()).collect();
        let shared = if options.prefix_reuse { crate::generate::shared_prefix_len(&inputs) } else { 0 };
        let lengths: Vec<usize> = plan.requests.iter().map(|r| r.input.len() - shared).collect();
        let budget = options.batch_tokens.saturating_sub(shared).max(1);
        let batches = plan_generation_batches(&lengths, plan.max_new_tokens, budget, options.batch_rows);
        // Where the model's dtype turns reuse off (see `generate.rs`), every row computes its whole
        // prompt: batches planned for that.
        let whole_prompt_batches = if shared > 0 {
            let whole: Vec<usize> = plan.requests.iter().map(|r| r.input.len()).collect();
            plan_generation_batches(&whole, plan.max_new_tokens, options.batch_tokens.max(1), options.batch_rows)
        } else {
            batches.clone()
        };
        let work = Work::Generation(GenerationRequests {
            plan,
            batches,
            whole_prompt_batches,
            prefix_reuse: options.prefix_reuse,
            shared_prefix: shared,
        });
        return Ok(PreparedTask { task, spec, prompts, skipped: Vec::new(), work });
    }
    if task.kind() == TaskKind::Perplexity {
        let work = Work::Scored(rolling_work(&spec, tokenizer, &prompts, encode, batch_options)?);
        return Ok(PreparedTask { task, spec, prompts, skipped: Vec::new(), work });
    }
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
    let work = Work::Scored(ScoredRequests::new(requests, encoded, shared, batch_options, options.prefix_reuse));
    Ok(PreparedTask { task, spec, prompts, skipped, work })
}

/// A perplexity task's requests: every window of every document (lm-eval's rolling windows), in
/// document order, each request naming its document (`example`) and its window (`choice`). Windows
/// are planned into batches like any other requests.
fn rolling_work(
    spec: &TaskSpec,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    encode: EncodeOptions,
    batch_options: BatchOptions,
) -> Result<ScoredRequests> {
    if spec.prompt.num_fewshot > 0 {
        return Err(crate::Error::Invalid(format!(
            "{}: a perplexity task scores whole documents and takes no shots (num_fewshot {})",
            spec.name, spec.prompt.num_fewshot
        )));
    }
    let documents = requests(prompts);
    let windows = encode_rolling(tokenizer, &spec.name, &documents, encode)?;
    let mut requests = Vec::new();
    let mut encoded = Vec::new();
    for (document, windows) in documents.iter().zip(windows) {
        for (w, window) in windows.into_iter().enumerate() {
            requests.push(Request {
                example: document.example,
                choice: w,
                context: String::new(),
                continuation: String::new(),
            });
            encoded.push(window);
        }
    }
    // Windows of one document overlap only in what they score, never in a shared prefix.
    Ok(ScoredRequests::new(requests, encoded, Vec::new(), batch_options, false))
}
