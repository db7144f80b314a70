//! `icl eval`: the library evaluator (`icl_eval`) with what a command line run adds: a progress bar,
//! the resume journal, and results written after each task so a later failure loses nothing.

use crate::journal::{encode_generations, encode_results, file_identity, Journal, Recovered, RequestResult};
use crate::report;
use crate::EvalArgs;
use anyhow::{bail, Context, Result};
use icl_data::{
    ChatTemplate, EncodeOptions, Gauntlet, PromptOptions, ReadOptions, SkippedTask, Suite, SuiteOptions, TaskKind,
    TaskSpec, Tokenizer,
};
use icl_eval::{EvalOptions, Evaluator, Observer, PreparedTask, TaskReport, TaskResult};
use icl_models::{CausalLm, Dtype, ModelSpec};
use icl_shard::watch::{MessageHandler, Watch};
use icl_shard::{Collective, DistChoice, Launch};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::Device;

pub fn run(args: &EvalArgs) -> Result<()> {
    let launch = Launch::from_env()?;
    let dist = match args.dist {
        crate::DistArg::Auto => DistChoice::Auto,
        crate::DistArg::None => DistChoice::None,
        crate::DistArg::Mpi => DistChoice::Mpi,
        crate::DistArg::Nccl => DistChoice::Nccl,
    };
    // Ranks on one machine share its cores unless --threads says otherwise.
    let threads = args.threads.or_else(|| {
        let local = launch.local_world_size.unwrap_or(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (local > 1).then(|| (cores / local).max(1) as i32)
    });
    if let Some(threads) = threads {
        tch::set_num_threads(threads);
    }
    // Each rank of a machine computes on its own GPU (wrapping round when there are fewer GPUs).
    let device = match tch::Cuda::device_count() {
        0 => Device::Cpu,
        gpus => Device::Cuda(launch.local_rank % gpus as usize),
    };
    let cuda_ordinal = match device {
        Device::Cuda(ordinal) => Some(ordinal),
        _ => None,
    };
    // Shared: a parameter-sharded model keeps it for its gathers.
    let collective: Rc<dyn Collective> = Rc::from(icl_shard::connect(dist, &launch, cuda_ordinal)?);
    let (rank, world_size) = (collective.rank(), collective.world_size());
    // Ranks of this machine that share its memory (its GPU's, when they wrap round fewer GPUs).
    let local = launch.local_world_size.unwrap_or(1).max(1);
    let sharing = match device {
        Device::Cuda(_) => local.div_ceil(tch::Cuda::device_count().max(1) as usize),
        _ => local,
    };
    let journal = SharedJournal::default();
    let mut watch = None;
    let outcome = start_watch(args, collective.as_ref(), &journal).and_then(|started| {
        watch = started;
        evaluate(args, device, &collective, sharing, watch.as_ref(), &journal)
    });
    match outcome {
        Ok(()) => {
            if let Some(watch) = &watch {
                watch.finish();
            }
            Ok(())
        }
        // Other ranks may be waiting for this one in a collective: end them all now.
        // (The side channel stays up: should the abort not reach the launcher, rank 0 sees this
        // rank's connection close and ends the others.)
        Err(e) if world_size > 1 => {
            // One write: mpirun relays each rank's stderr in the chunks it reads, beside its own
            // MPI_Abort notice, so a message written in pieces can arrive split around it.
            let message = format!("error: icl eval, rank {rank} of {world_size}: {}\n", crate::describe(&e));
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), message.as_bytes());
            collective.abort(1)
        }
        Err(e) => Err(e),
    }
}

/// Rank 0's journal, which the main thread and the side channel's threads (the other ranks' streamed
/// records) append to; an error of a streamed append waits here for the main thread to report it.
#[derive(Default, Clone)]
struct SharedJournal(Arc<Mutex<JournalSlot>>);

#[derive(Default)]
struct JournalSlot {
    journal: Option<Journal>,
    streamed_error: Option<String>,
}

impl SharedJournal {
    fn with<T>(&self, f: impl FnOnce(&mut JournalSlot) -> T) -> Result<T> {
        let mut slot = self.0.lock().map_err(|_| anyhow::anyhow!("the journal's lock is poisoned"))?;
        Ok(f(&mut slot))
    }

    /// Appends this rank's records (or reports the failure of a streamed append).
    fn append(&self, write: impl FnOnce(&mut Journal) -> Result<()>) -> Result<()> {
        self.with(|slot| {
            if let Some(e) = slot.streamed_error.take() {
                bail!("{e}");
            }
            slot.journal.as_mut().map_or(Ok(()), write)
        })?
    }
}

/// With several ranks, the side channel beside the collective: heartbeats that end every rank when
/// one is lost, and on rank 0 the other ranks' records going into the journal as their batches finish.
fn start_watch(args: &EvalArgs, collective: &dyn Collective, journal: &SharedJournal) -> Result<Option<Watch>> {
    if collective.world_size() == 1 {
        return Ok(None);
    }
    let handler = (collective.rank() == 0).then(|| {
        let journal = journal.clone();
        Box::new(move |from: usize, payload: Vec<u8>| {
            let _ = journal.with(|slot| {
                let appended = match (std::str::from_utf8(&payload), slot.journal.as_mut()) {
                    (Ok(text), Some(journal)) => journal.append_text(text),
                    (Err(e), _) => Err(anyhow::anyhow!("{e}")),
                    (Ok(_), None) => Ok(()),
                };
                if let Err(e) = appended {
                    slot.streamed_error.get_or_insert(format!("records streamed by rank {from}: {e:#}"));
                }
            });
        }) as MessageHandler
    });
    Ok(Some(Watch::start(collective, Duration::from_secs(args.peer_timeout), handler)?))
}

/// `--batch-tokens`: the figure given, or with `auto` one sized from the memory free on `device`
/// (shared by `sharing` ranks), the smallest any rank finds, so that every rank plans the same batches.
fn batch_tokens(
    args: &EvalArgs,
    spec: &ModelSpec,
    dtype: Dtype,
    device: Device,
    collective: &dyn Collective,
    sharing: usize,
) -> Result<usize> {
    const FALLBACK: usize = 16384;
    let crate::BatchTokens::Fixed(n) = args.batch_tokens else {
        let dtype_bytes = dtype.kind().elt_size_in_bytes();
        let per_token = icl_eval::memory::bytes_per_token(spec.hidden_size, dtype_bytes, args.row_len);
        let model_bytes = spec.parameter_count_lower_bound().unwrap_or(0).saturating_mul(dtype_bytes as u64);
        let free = icl_eval::memory::free_memory(device);
        let mine = match &free {
            Some(free) => icl_eval::memory::auto_batch_tokens(free.bytes / sharing as u64, model_bytes, per_token),
            None => FALLBACK,
        };
        let all = icl_shard::all_gather_bytes(collective, &(mine as u64).to_le_bytes())?;
        let chosen = all
            .iter()
            .filter_map(|b| Some(u64::from_le_bytes(b.as_slice().try_into().ok()?) as usize))
            .min()
            .unwrap_or(mine);
        if collective.rank() == 0 {
            match free {
                Some(free) => eprintln!(
                    "icl: --batch-tokens auto: {chosen} tokens ({:.1} GiB free by {}{}, about {} KiB per token)",
                    free.bytes as f64 / f64::from(1u32 << 30),
                    free.source,
                    if sharing > 1 { format!(", shared by {sharing} ranks") } else { String::new() },
                    per_token / 1024
                ),
                None => eprintln!("icl: --batch-tokens auto: free memory unknown on {device:?}; {chosen} tokens"),
            }
        }
        return Ok(chosen);
    };
    Ok(n)
}

fn evaluate(
    args: &EvalArgs,
    device: Device,
    collective: &Rc<dyn Collective>,
    sharing: usize,
    watch: Option<&Watch>,
    shared_journal: &SharedJournal,
) -> Result<()> {
    // Rank 0 alone writes files and talks to the user; the other ranks only compute.
    let leader = collective.rank() == 0;
    let tokenizer_path = args.model.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let dtype = match args.dtype {
        crate::DtypeArg::F32 => Dtype::F32,
        crate::DtypeArg::Bf16 => Dtype::Bf16,
    };
    let spec = ModelSpec::read(&args.model)?;
    if tokenizer.vocab_size() as i64 > spec.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary (vocab_size in {}) has {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            args.model.join("config.json").display(),
            spec.vocab_size
        );
    }
    let prefix_token = match bos_token(&args.model, &tokenizer)? {
        Some(bos) => bos,
        None => spec
            .eos_token_id
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .with_context(|| format!("{}: no eos_token_id to stand in for empty contexts", args.model.display()))?,
    };
    let max_length = match args.max_length {
        Some(n) if n as usize > spec.max_length => {
            bail!("--max-length {n}: the model {} takes at most {} tokens", args.model.display(), spec.max_length)
        }
        Some(n) => n as usize,
        None => spec.max_length,
    };
    let encode = EncodeOptions { max_length, prefix_token };
    let batch_tokens = batch_tokens(args, &spec, dtype, device, collective.as_ref(), sharing)?;
    // `auto` on the CPU: scoring batches sized for the caches (the same on every rank).
    let scoring_batch_tokens = (matches!(args.batch_tokens, crate::BatchTokens::Auto) && device == Device::Cpu)
        .then(|| icl_eval::memory::cpu_scoring_tokens(dtype.kind().elt_size_in_bytes()));
    if let (Some(n), 0) = (scoring_batch_tokens, collective.rank()) {
        eprintln!("icl: --batch-tokens auto: scoring batches of at most {n} tokens on the CPU, to stay in cache");
    }
    let options = EvalOptions {
        batch_tokens,
        scoring_batch_tokens,
        batch_rows: args.batch_rows,
        row_len: args.row_len,
        limit: args.limit,
        skip_bad_rows: args.skip_bad_rows,
        prefix_reuse: !args.no_prefix_reuse,
    };

    let (mut specs, gauntlet, skipped) = task_specs(args, leader)?;
    // The flag wins over a suite's `fewshot_sampler` (and over its llm-foundry default).
    if let Some(sampler) = args.fewshot_sampler {
        for spec in &mut specs {
            spec.prompt.fewshot_sampler = sampler.sampler();
        }
    }
    chat_options(args, &mut specs)?;
    // Bad input anywhere fails here, before any model work.
    let evaluator = Evaluator::new(specs, &tokenizer, encode, options)?;
    if leader {
        for p in evaluator.tasks() {
            for row in &p.skipped {
                eprintln!("icl: {} row {} skipped: {}", p.name(), row.index, row.reason);
            }
        }
        if let Some(path) = &args.write_prompts {
            report::write_prompts(path, evaluator.tasks())?;
        }
    }
    let (journal, mut recovered) =
        if leader { open_journal(args, evaluator.tasks())? } else { (None, Recovered::default()) };
    // A resumed run may have any number of ranks: every rank skips what rank 0's journal holds.
    if args.resume && collective.world_size() > 1 {
        let text = if leader { recovered.to_text()? } else { String::new() };
        let gathered = icl_shard::all_gather_bytes(collective.as_ref(), text.as_bytes())?;
        if !leader {
            recovered = Recovered::from_text(std::str::from_utf8(&gathered[0]).context("recovered records")?)?;
        }
    }
    shared_journal.with(|slot| slot.journal = journal)?;
    // The other ranks stream their records to rank 0 when it keeps a journal.
    let stream_to_leader = watch.filter(|_| !leader && (args.journal.is_some() || args.output.is_some()));
    let load_start = Instant::now();
    let model: Box<dyn CausalLm> = if args.shard_params {
        if args.allow_pickle {
            bail!("--shard-params reads each rank's slices of safetensors files; it cannot be combined with --allow-pickle");
        }
        Box::new(spec.load_sharded(dtype, device, collective.clone())?)
    } else if args.allow_pickle {
        spec.load_allowing_pickle(dtype, device)?
    } else {
        spec.load(dtype, device)?
    };
    if leader {
        let ranks = match collective.world_size() {
            1 => String::new(),
            n => format!(", {n} ranks over {}", collective.backend()),
        };
        eprintln!(
            "icl: {} ({:.1}M parameters, {} on {:?}), loaded in {:.1}s; {} task(s){ranks}",
            args.model.display(),
            model.parameter_bytes() as f64 / model.kind().elt_size_in_bytes() as f64 / 1e6,
            args.dtype.name(),
            device,
            load_start.elapsed().as_secs_f64(),
            evaluator.tasks().len()
        );
    }

    let samples = match &args.log_samples {
        Some(path) if leader => Some(report::SamplesWriter::create(path)?),
        _ => None,
    };
    let mut run = CommandLineRun {
        args,
        leader,
        gauntlet: &gauntlet,
        skipped: &skipped,
        journal: shared_journal.clone(),
        stream_to_leader,
        recovered,
        samples,
        progress: ProgressBar::hidden(),
        reports: Vec::new(),
    };
    let outcome = evaluator.evaluate_on(model.as_ref(), collective.as_ref(), &mut run);
    run.progress.finish_and_clear();
    // Finished tasks are reported (and already written) even when a later one fails.
    if leader && !run.reports.is_empty() {
        print!("{}", report::table(&run.reports));
        print!("{}", report::gauntlet_table(&report::gauntlet_scores(&gauntlet, &run.reports), &skipped));
    }
    outcome?;
    if leader && args.resume {
        shared_journal.with(|slot| {
            if let Some(j) = &slot.journal {
                eprintln!("icl: journal: {} record(s) added, {} computed again", j.added, j.recomputed);
            }
        })?;
    }
    Ok(())
}

/// What a command-line run does as the evaluator goes: progress, journal, results after each task.
struct CommandLineRun<'a> {
    args: &'a EvalArgs,
    /// Rank 0: shows progress and writes the output files.
    leader: bool,
    gauntlet: &'a Gauntlet,
    /// Suite tasks left out for want of their data file (`--skip-missing`).
    skipped: &'a [SkippedTask],
    /// Rank 0's journal (empty on the other ranks).
    journal: SharedJournal,
    /// The other ranks: where they send their finished batches' records.
    stream_to_leader: Option<&'a Watch>,
    recovered: Recovered,
    samples: Option<report::SamplesWriter>,
    progress: ProgressBar,
    reports: Vec<TaskReport>,
}

fn observer_error(e: anyhow::Error) -> icl_eval::Error {
    icl_eval::Error::Observer(e.into())
}

impl Observer for CommandLineRun<'_> {
    fn recovered(&self, task: &str, request: usize) -> Option<RequestResult> {
        self.recovered.get(task, request)
    }

    fn task_started(&mut self, task: &str, requests: usize) {
        self.progress =
            if self.args.quiet || !self.leader { ProgressBar::hidden() } else { ProgressBar::new(requests as u64) };
        self.progress.set_style(
            ProgressStyle::with_template("{prefix:>12} {bar:40} {pos}/{len} requests {elapsed_precise} eta {eta}")
                .expect("static template"),
        );
        self.progress.set_prefix(task.to_owned());
    }

    fn batch_finished(&mut self, task: &str, results: &[(usize, RequestResult)]) -> icl_eval::Result<()> {
        match self.stream_to_leader {
            Some(watch) => {
                let text = encode_results(task, results).map_err(observer_error)?;
                watch.send_to_leader(text.as_bytes()).map_err(|e| observer_error(e.into()))
            }
            None => self.journal.append(|j| j.append(task, results)).map_err(observer_error),
        }
    }

    fn recovered_generation(&self, task: &str, request: usize) -> Option<Vec<u32>> {
        self.recovered.generation(task, request).map(<[u32]>::to_vec)
    }

    fn generation_finished(&mut self, task: &str, outputs: &[(usize, Vec<u32>)]) -> icl_eval::Result<()> {
        match self.stream_to_leader {
            Some(watch) => {
                let text = encode_generations(task, outputs).map_err(observer_error)?;
                watch.send_to_leader(text.as_bytes()).map_err(|e| observer_error(e.into()))
            }
            None => self.journal.append(|j| j.append_generations(task, outputs)).map_err(observer_error),
        }
    }

    fn requests_done(&mut self, _task: &str, count: usize) {
        self.progress.inc(count as u64);
    }

    fn task_finished(&mut self, result: &TaskResult) -> icl_eval::Result<()> {
        self.progress.finish_and_clear();
        if let Some(w) = self.samples.as_mut() {
            w.write(&result.samples).map_err(observer_error)?;
        }
        self.reports.push(result.report.clone());
        if let Some(path) = self.args.output.as_ref().filter(|_| self.leader) {
            report::write_results(
                path,
                &self.args.model,
                self.args.dtype.name(),
                &self.reports,
                self.gauntlet,
                self.skipped,
            )
            .map_err(observer_error)?;
        }
        Ok(())
    }

    fn notice(&mut self, message: &str) {
        // Every rank tells its own notices (each retries its own batches).
        self.progress.suspend(|| eprintln!("icl: {message}"));
    }
}

/// A suite's tasks (only the labels `--tasks` names, when given), telling the user what it leaves out.
fn suite_tasks(
    args: &EvalArgs,
    path: &std::path::Path,
    leader: bool,
) -> Result<(Vec<TaskSpec>, Gauntlet, Vec<SkippedTask>)> {
    // With --tasks, only the chosen tasks' files must exist (checked below).
    let options = SuiteOptions {
        data_dir: args.data_dir.as_deref(),
        gauntlet: args.gauntlet.as_deref(),
        skip_missing: args.skip_missing || !args.named_tasks.is_empty(),
    };
    let mut suite = Suite::read(path, options)?;
    if leader && !suite.unused_run_keys.is_empty() {
        eprintln!(
            "icl: {}: not read (the command line sets the model, dtype and batching): {}",
            path.display(),
            suite.unused_run_keys.join(", ")
        );
    }
    if !args.named_tasks.is_empty() {
        let label = |task: &str| task.split('/').next().unwrap_or(task).to_owned();
        for name in &args.named_tasks {
            let known = suite.tasks.iter().map(|t| label(&t.name)).chain(suite.skipped.iter().map(|t| label(&t.name)));
            if !known.clone().any(|l| &l == name) {
                let mut labels: Vec<String> = known.collect();
                labels.sort();
                labels.dedup();
                bail!("--tasks: `{name}` is not a label of {} (it has {})", path.display(), labels.join(", "));
            }
        }
        // The gauntlet stays: its categories without results are dropped, and the table says so.
        let wanted = |task: &str| args.named_tasks.contains(&label(task));
        suite.tasks.retain(|t| wanted(&t.name));
        suite.skipped.retain(|t| wanted(&t.name));
        suite.gauntlet.partitions.retain(|p, _| wanted(p));
        missing_data(args, &suite.skipped)?;
    }
    if leader {
        for s in &suite.skipped {
            eprintln!("icl: {}: skipped, no data file {}", s.name, s.path.display());
        }
    }
    Ok((suite.tasks, suite.gauntlet, suite.skipped))
}

/// The tasks to run, from `--suite`, `--tasks` or from `--task` with the prompt flags, how their
/// scores aggregate (without a suite: one category of every task), and the suite tasks skipped.
fn task_specs(args: &EvalArgs, leader: bool) -> Result<(Vec<TaskSpec>, Gauntlet, Vec<SkippedTask>)> {
    if let Some(path) = &args.suite {
        return suite_tasks(args, path, leader);
    }
    let kind = match &args.task_type {
        Some(name) => Some(TaskKind::from_name(name).map_err(|m| anyhow::anyhow!("--type: {m}"))?),
        None => None,
    };
    let mut fields = icl_data::FieldMap::new();
    for (canonical, source) in &args.fields {
        if fields.insert(canonical.clone(), source.clone()).is_some() {
            bail!("--field: `{canonical}` is mapped twice");
        }
    }
    let prompt = PromptOptions {
        num_fewshot: args.num_fewshot,
        fewshot_seed: args.fewshot_seed,
        fewshot_sampler: args.fewshot_sampler.map_or(icl_data::FewshotSampler::Icl, |s| s.sampler()),
        prompt_string: args.prompt_string.clone(),
        example_delimiter: args.example_delimiter.clone(),
        continuation_delimiter: args.continuation_delimiter.clone(),
        max_new_tokens: args.max_new_tokens.map(|n| n as usize),
        stop_sequences: (!args.stop.is_empty()).then(|| args.stop.clone()),
        ..PromptOptions::default()
    };
    let file_task = |name: &str, path: &std::path::Path| TaskSpec {
        name: name.to_owned(),
        path: path.to_owned(),
        read: ReadOptions { kind, fields: fields.clone(), ..Default::default() },
        prompt: prompt.clone(),
    };
    let mut specs: Vec<TaskSpec> = args.tasks.iter().map(|(name, path)| file_task(name, path)).collect();
    let mut gauntlet_names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let mut partitions = std::collections::BTreeMap::new();
    let mut skipped = Vec::new();
    for name in &args.named_tasks {
        match find_named_task(args, name)? {
            NamedTask::File(path) => {
                specs.push(file_task(name, &path));
                gauntlet_names.push(name.clone());
            }
            NamedTask::Suite(path, data_dir) => {
                let options = SuiteOptions { data_dir: Some(&data_dir), gauntlet: None, skip_missing: true };
                let suite = Suite::read(&path, options)?;
                let of_label = |task: &str| task.split('/').next() == Some(name.as_str());
                for s in suite.tasks.into_iter().filter(|t| of_label(&t.name)) {
                    if !suite.gauntlet.partitions.values().flatten().any(|(_, part)| part == &s.name) {
                        gauntlet_names.push(s.name.clone());
                    }
                    specs.push(s);
                }
                for (parent, parts) in suite.gauntlet.partitions.into_iter().filter(|(p, _)| of_label(p)) {
                    gauntlet_names.push(parent.clone());
                    partitions.insert(parent, parts);
                }
                skipped.extend(suite.skipped.into_iter().filter(|t| of_label(&t.name)));
            }
        }
    }
    missing_data(args, &skipped)?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = specs.iter().find(|s| !seen.insert(s.name.clone())) {
        bail!("task `{}` is given twice", twice.name);
    }
    if leader {
        for s in &skipped {
            eprintln!("icl: {}: skipped, no data file {}", s.name, s.path.display());
        }
    }
    let mut gauntlet = Gauntlet::one_category(gauntlet_names);
    gauntlet.partitions = partitions;
    Ok((specs, gauntlet, skipped))
}

/// A chosen task without its data file fails the run unless `--skip-missing`.
fn missing_data(args: &EvalArgs, skipped: &[SkippedTask]) -> Result<()> {
    match skipped.first() {
        Some(s) if !args.skip_missing => {
            bail!("task {}: no such file {} (--skip-missing evaluates the other tasks)", s.name, s.path.display())
        }
        _ => Ok(()),
    }
}

/// Where a task named by `--tasks` comes from.
enum NamedTask {
    /// A task file `NAME.jsonl` / `NAME.parquet`, read with the prompt flags.
    File(std::path::PathBuf),
    /// A label of an llm-foundry tasks file (with the folder its `dataset_uri`s resolve against).
    Suite(std::path::PathBuf, std::path::PathBuf),
}

/// Finds a task name in the data folders: `--data-dir` (else `ICL_DATA`), then its sibling
/// `llm-foundry` folder (the shared layout). In each, first the labels of the llm-foundry tasks files
/// `eval/yamls/tasks_*.yaml` (newest name first), then `NAME.jsonl` / `NAME.parquet`.
fn find_named_task(args: &EvalArgs, name: &str) -> Result<NamedTask> {
    let first = match (&args.data_dir, std::env::var_os("ICL_DATA")) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.into(),
        (None, None) => bail!("--tasks {name}: give --data-dir or set ICL_DATA to the folder of the task data"),
    };
    let mut roots = vec![first.clone()];
    if let Some(parent) = first.parent() {
        roots.push(parent.join("llm-foundry"));
    }
    for root in &roots {
        let yamls = root.join("eval/yamls");
        let mut suites: Vec<std::path::PathBuf> = std::fs::read_dir(&yamls)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("tasks_") && f.ends_with(".yaml"))
            })
            .collect();
        suites.sort();
        suites.reverse();
        for suite in suites {
            let has_label = icl_data::suite_labels(&suite)?.iter().any(|l| l == name);
            if has_label {
                return Ok(NamedTask::Suite(suite, root.clone()));
            }
        }
        for ext in ["jsonl", "parquet"] {
            let file = root.join(format!("{name}.{ext}"));
            if file.is_file() {
                return Ok(NamedTask::File(file));
            }
        }
    }
    let searched: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    bail!(
        "--tasks: no task `{name}` in {} (neither a label of eval/yamls/tasks_*.yaml nor {name}.jsonl / .parquet)",
        searched.join(" or ")
    )
}

/// `--apply-chat-template`, `--system-instruction` and `--fewshot-as-multiturn` on every task, with
/// lm-eval's rules: multi-turn shots by default under a template, and never without one.
fn chat_options(args: &EvalArgs, specs: &mut [TaskSpec]) -> Result<()> {
    let template = match args.apply_chat_template.as_deref() {
        None => None,
        Some(name) => {
            let name = (!name.is_empty()).then_some(name);
            Some(ChatTemplate::from_model_dir(&args.model, name)?.with_context(|| {
                format!(
                    "--apply-chat-template: {} has no chat template (no chat_template.jinja, no chat_template in \
                     tokenizer_config.json)",
                    args.model.display()
                )
            })?)
        }
    };
    if args.fewshot_as_multiturn == Some(true) && template.is_none() {
        bail!("--fewshot-as-multiturn needs --apply-chat-template (as lm-eval's --fewshot_as_multiturn)");
    }
    for spec in specs {
        spec.prompt.fewshot_as_multiturn = template.is_some() && args.fewshot_as_multiturn.unwrap_or(true);
        spec.prompt.chat_template = template.clone();
        spec.prompt.system_instruction = args.system_instruction.clone();
    }
    Ok(())
}

/// lm-eval's `prefix_token_id` (the token before an empty context and before a document's first
/// window): the tokenizer's BOS token, named by `bos_token` in `tokenizer_config.json` (a string, or
/// an object with `content`), when the folder has one and the token is in `tokenizer.json`; `None`
/// otherwise (the EOS token is used then, as lm-eval does).
fn bos_token(model: &std::path::Path, tokenizer: &Tokenizer) -> Result<Option<u32>> {
    let path = model.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))?;
    let name = match config.get("bos_token") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            _ => bail!("{}: field `bos_token.content`: expected a string", path.display()),
        },
        Some(other) => bail!("{}: field `bos_token`: expected a string or an object, found {other}", path.display()),
    };
    match tokenizer.token_to_id(name) {
        Some(id) => Ok(Some(id)),
        None => {
            bail!("{}: field `bos_token`: {name:?} is not a token of {}", path.display(), tokenizer.path().display())
        }
    }
}

/// The journal of this run, and what an interrupted run left in it when resuming.
fn open_journal(args: &EvalArgs, prepared: &[PreparedTask]) -> Result<(Option<Journal>, Recovered)> {
    let path = match (&args.journal, &args.output) {
        (Some(path), _) => path.clone(),
        (None, Some(output)) => {
            let mut name = output.as_os_str().to_owned();
            name.push(".journal");
            name.into()
        }
        (None, None) if args.resume => {
            bail!("--resume needs the journal: give --output or --journal as in the first run")
        }
        (None, None) => return Ok((None, Recovered::default())),
    };
    // Everything that decides a request's result or the batch plan: a resumed run must match it.
    let tasks = prepared
        .iter()
        .map(|p| {
            Ok(json!({
                "name": p.task.name, "file": file_identity(&p.task.path)?, "rows": p.task.len(),
                "read": format!("{:?}", p.spec.read), "prompt": format!("{:?}", p.spec.prompt),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let run = json!({
        "model": args.model, "config": file_identity(&args.model.join("config.json"))?,
        "dtype": args.dtype.name(), "limit": args.limit, "max_length": args.max_length, "tasks": tasks,
        "batch_tokens": match args.batch_tokens {
            crate::BatchTokens::Fixed(n) => json!(n),
            crate::BatchTokens::Auto => json!("auto"),
        },
        "batch_rows": args.batch_rows, "row_len": args.row_len,
        "skip_bad_rows": args.skip_bad_rows, "prefix_reuse": !args.no_prefix_reuse,
    });
    if args.resume {
        let (journal, recovered) = Journal::resume(&path, &run)?;
        eprintln!(
            "icl: resuming from {}: {} finished request(s){}",
            path.display(),
            recovered.len(),
            if recovered.dropped_bytes > 0 {
                format!(", {} byte(s) of a torn write dropped", recovered.dropped_bytes)
            } else {
                String::new()
            }
        );
        Ok((Some(journal), recovered))
    } else {
        Ok((Some(Journal::create(&path, &run)?), Recovered::default()))
    }
}
