//! `icl eval`: every task is read, checked and tokenized before any model work, then evaluated in
//! token-budget batches; results are written after each task so a later failure loses nothing.

use crate::journal::{file_identity, Journal, Recovered, RequestResult};
use crate::report::{self, TaskReport};
use crate::EvalArgs;
use anyhow::{bail, Context, Result};
use icl_data::{
    encode_requests, plan_batches, prompts, py_strip, read_task, requests, Batch, BatchOptions, EncodeOptions,
    EncodedRequest, Gauntlet, GauntletCategory, Prompt, PromptOptions, ReadOptions, Request, Suite, Task,
    TaskExamples, TaskKind, TaskSpec, Tokenizer,
};
use icl_metrics::{
    predict_choices, score_continuations, ChoiceMetrics, ChoiceScores, ContinuationScores, LmMetrics,
};
use icl_models::{CausalLm, Dtype, ModelInput, ModelSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::VecDeque;
use std::time::Instant;
use tch::{Device, Tensor};

/// A task ready to run: its rows, prompts and tokens.
struct Prepared {
    task: Task,
    spec: TaskSpec,
    /// The evaluated examples (the first `--limit` rows).
    prompts: Vec<Prompt>,
    requests: Vec<Request>,
    encoded: Vec<EncodedRequest>,
}

/// What the model said about each request, in request order.
struct Scores {
    loglik: Vec<f64>,
    is_greedy: Vec<bool>,
    n_tokens: Vec<i64>,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let tokenizer_path = args.model.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let dtype = match args.dtype {
        crate::DtypeArg::F32 => Dtype::F32,
        crate::DtypeArg::Bf16 => Dtype::Bf16,
    };
    let device = Device::cuda_if_available();
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
    let prefix_token = spec
        .eos_token_id
        .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
        .with_context(|| format!("{}: no eos_token_id to stand in for empty contexts", args.model.display()))?;
    let encode_options = EncodeOptions { max_length: spec.max_length, prefix_token };

    let (specs, gauntlet) = task_specs(args)?;
    let mut names = std::collections::HashSet::new();
    if let Some(spec) = specs.iter().find(|spec| !names.insert(&spec.name)) {
        bail!("task name `{}` is given twice: names key the results", spec.name);
    }
    // Bad input anywhere fails here, before any model work.
    let prepared = specs
        .into_iter()
        .map(|spec| {
            let task = read_task(&spec.name, &spec.path, &spec.read)?;
            let prompts = prompts(&task, &spec.prompt, args.limit);
            let requests = requests(&prompts);
            let encoded = encode_requests(&tokenizer, &spec.name, &requests, encode_options)?;
            Ok(Prepared { task, spec, prompts, requests, encoded })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(path) = &args.write_prompts {
        report::write_prompts(path, prepared.iter().map(|p| (&p.task, p.prompts.as_slice())))?;
    }
    let (mut journal, recovered) = open_journal(args, &prepared)?;
    let load_start = Instant::now();
    let model = if args.allow_pickle { spec.load_allowing_pickle(dtype, device)? } else { spec.load(dtype, device)? };
    eprintln!(
        "icl: {} ({:.1}M parameters, {} on {:?}), loaded in {:.1}s; {} task(s)",
        args.model.display(),
        model.parameter_bytes() as f64 / model.kind().elt_size_in_bytes() as f64 / 1e6,
        args.dtype.name(),
        device,
        load_start.elapsed().as_secs_f64(),
        prepared.len()
    );

    let mut samples = match &args.log_samples {
        Some(path) => Some(report::SamplesWriter::create(path)?),
        None => None,
    };
    let mut reports = Vec::new();
    let outcome = prepared.iter().try_for_each(|p| -> Result<()> {
        let start = Instant::now();
        let scores = score_requests(model.as_ref(), p, args, journal.as_mut(), &recovered)?;
        let seconds = start.elapsed().as_secs_f64();
        let (report, lines) = summarize(model.as_ref(), p, &scores, seconds)?;
        if let Some(w) = samples.as_mut() {
            w.write(&lines)?;
        }
        reports.push(report);
        if let Some(path) = &args.output {
            report::write_results(path, &args.model, args.dtype.name(), &reports, &gauntlet)?;
        }
        Ok(())
    });
    // Finished tasks are reported (and already written) even when a later one fails.
    if !reports.is_empty() {
        print!("{}", report::table(&reports));
        print!("{}", report::gauntlet_table(&report::gauntlet_scores(&gauntlet, &reports)));
    }
    outcome
}

/// The tasks to run, from `--suite` or from `--task` with the prompt flags, and how their scores
/// aggregate (without a suite: one category of every task).
fn task_specs(args: &EvalArgs) -> Result<(Vec<TaskSpec>, Gauntlet)> {
    if let Some(path) = &args.suite {
        let suite = Suite::read(path, args.data_dir.as_deref())?;
        return Ok((suite.tasks, suite.gauntlet));
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
        prompt_string: args.prompt_string.clone(),
        example_delimiter: args.example_delimiter.clone(),
        continuation_delimiter: args.continuation_delimiter.clone(),
    };
    let specs: Vec<TaskSpec> = args
        .tasks
        .iter()
        .map(|(name, path)| TaskSpec {
            name: name.clone(),
            path: path.clone(),
            read: ReadOptions { kind, fields: fields.clone() },
            prompt: prompt.clone(),
        })
        .collect();
    let all = GauntletCategory { name: "all".into(), benchmarks: specs.iter().map(|s| (s.name.clone(), None)).collect() };
    Ok((specs, Gauntlet { categories: vec![all] }))
}

/// The journal of this run, and what an interrupted run left in it when resuming.
fn open_journal(args: &EvalArgs, prepared: &[Prepared]) -> Result<(Option<Journal>, Recovered)> {
    let path = match (&args.journal, &args.output) {
        (Some(path), _) => path.clone(),
        (None, Some(output)) => {
            let mut name = output.as_os_str().to_owned();
            name.push(".journal");
            name.into()
        }
        (None, None) if args.resume => bail!("--resume needs the journal: give --output or --journal as in the first run"),
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
        "dtype": args.dtype.name(), "limit": args.limit, "tasks": tasks,
        "batch_tokens": args.batch_tokens, "batch_rows": args.batch_rows, "row_len": args.row_len,
    });
    if args.resume {
        let (journal, recovered) = Journal::resume(&path, &run)?;
        eprintln!(
            "icl: resuming from {}: {} finished request(s){}",
            path.display(),
            recovered.len(),
            if recovered.dropped_bytes > 0 { format!(", {} byte(s) of a torn write dropped", recovered.dropped_bytes) } else { String::new() }
        );
        Ok((Some(journal), recovered))
    } else {
        Ok((Some(Journal::create(&path, &run)?), Recovered::default()))
    }
}

/// Runs the model over every request of a task. Batches whose every request is in `recovered` are
/// taken from it; the batch plan does not depend on what was recovered, so results are the same as
/// in an uninterrupted run.
fn score_requests(
    model: &dyn CausalLm,
    p: &Prepared,
    args: &EvalArgs,
    mut journal: Option<&mut Journal>,
    recovered: &Recovered,
) -> Result<Scores> {
    let n = p.encoded.len();
    let options = BatchOptions {
        max_tokens: args.batch_tokens,
        max_rows: args.batch_rows,
        row_len: args.row_len,
        pad_id: model.eos_token_id().unwrap_or(0),
    };
    // The choices of a multiple-choice question share their context: it is computed once.
    let mut shared: Vec<Vec<usize>> = Vec::new();
    if p.task.kind() == TaskKind::MultipleChoice {
        for (i, r) in p.requests.iter().enumerate() {
            if r.choice == 0 {
                shared.push(Vec::new());
            }
            if let Some(group) = shared.last_mut() {
                group.push(i);
            }
        }
    }
    // Batches that run out of memory are re-planned smaller and put back at the front.
    let mut queue: VecDeque<(Batch, BatchOptions)> =
        plan_batches(&p.encoded, &shared, options).into_iter().map(|b| (b, options)).collect();
    let progress = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(n as u64) };
    progress.set_style(
        ProgressStyle::with_template("{prefix:>12} {bar:40} {pos}/{len} requests {elapsed_precise} eta {eta}")
            .expect("static template"),
    );
    progress.set_prefix(p.task.name.clone());
    let mut scores = Scores { loglik: vec![0.0; n], is_greedy: vec![false; n], n_tokens: vec![0; n] };
    while let Some((batch, batch_options)) = queue.pop_front() {
        let done: Option<Vec<RequestResult>> =
            batch.requests.iter().map(|&r| recovered.get(&p.task.name, r)).collect();
        if let Some(done) = done {
            for (&r, result) in batch.requests.iter().zip(done) {
                scores.loglik[r] = result.loglik;
                scores.is_greedy[r] = result.is_greedy;
                scores.n_tokens[r] = result.n_tokens;
            }
            progress.inc(batch.requests.len() as u64);
            continue;
        }
        let (loglik, is_greedy, n_tokens) = match score_batch(model, &batch) {
            Ok(scored) => scored,
            Err(e) if is_out_of_memory(&e) => {
                let smaller = BatchOptions {
                    max_tokens: (batch.rows * batch.seq_len / 2).max(1),
                    row_len: (batch_options.row_len / 2).max(1),
                    ..batch_options
                };
                let parts = replan(&p.encoded, &shared, &batch.requests, smaller);
                if parts.len() < 2 && parts.iter().all(|b| b.rows * b.seq_len >= batch.rows * batch.seq_len) {
                    let r = batch.requests[0];
                    bail!(
                        "{} example {}: out of memory even alone ({} tokens): {e:#}",
                        p.task.name,
                        p.requests[r].example,
                        p.encoded[r].input.len()
                    );
                }
                progress.suspend(|| {
                    eprintln!(
                        "icl: out of memory on a batch of {} x {} tokens; retrying it in {} smaller batch(es)",
                        batch.rows,
                        batch.seq_len,
                        parts.len()
                    )
                });
                for part in parts.into_iter().rev() {
                    queue.push_front((part, smaller));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        for (k, &r) in batch.requests.iter().enumerate() {
            if !loglik[k].is_finite() {
                bail!(
                    "{} example {} (choice {}): the model gave a non-finite log-likelihood",
                    p.task.name,
                    p.requests[r].example,
                    p.requests[r].choice
                );
            }
            scores.loglik[r] = loglik[k];
            scores.is_greedy[r] = is_greedy[k];
            scores.n_tokens[r] = n_tokens[k];
        }
        if let Some(journal) = journal.as_deref_mut() {
            let finished: Vec<(usize, RequestResult)> = batch
                .requests
                .iter()
                .enumerate()
                .map(|(k, &r)| (r, RequestResult { loglik: loglik[k], is_greedy: is_greedy[k], n_tokens: n_tokens[k] }))
                .collect();
            journal.append(&p.task.name, &finished)?;
        }
        progress.inc(batch.requests.len() as u64);
    }
    progress.finish_and_clear();
    Ok(scores)
}

/// One forward pass: per-request log-likelihood, greedy flag and token count, in `batch.requests` order.
fn score_batch(model: &dyn CausalLm, batch: &Batch) -> Result<(Vec<f64>, Vec<bool>, Vec<i64>)> {
    let device = model.device();
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
    let hidden = model.hidden_at(&input, &tensor(&batch.scored, &[batch.scored.len() as i64])?)?;
    score_in_chunks(model, &hidden, batch)
}

/// Whether an error is libtorch failing to allocate (CPU or CUDA), which a smaller batch can avoid.
fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    ["can't allocate memory", "out of memory", "not enough memory"].iter().any(|m| text.contains(m))
}

/// Plans `requests` (indices into `encoded`) again under `options`; the batches index `encoded`.
fn replan(encoded: &[EncodedRequest], shared: &[Vec<usize>], requests: &[usize], options: BatchOptions) -> Vec<Batch> {
    let subset: Vec<EncodedRequest> = requests.iter().map(|&r| encoded[r].clone()).collect();
    let local: std::collections::HashMap<usize, usize> = requests.iter().enumerate().map(|(i, &r)| (r, i)).collect();
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

/// Applies the output head to a batch's scored hidden states chunk by chunk and merges the
/// per-continuation results: summed log-likelihoods, greedy flags and token counts, in request order.
fn score_in_chunks(model: &dyn CausalLm, hidden: &Tensor, batch: &Batch) -> Result<(Vec<f64>, Vec<bool>, Vec<i64>)> {
    let n = batch.requests.len();
    let (mut loglik, mut is_greedy, mut n_tokens) = (vec![0.0; n], vec![true; n], vec![0i64; n]);
    let chunk = (HEAD_CHUNK_BYTES / (4 * model.vocab_size())).max(8) as usize;
    let device = model.device();
    let mut start = 0;
    while start < batch.scored.len() {
        let end = (start + chunk).min(batch.scored.len());
        // Owners are ordered, so a chunk covers the contiguous range first..=last of continuations.
        let first = batch.owner[start];
        let owner: Vec<i64> = batch.owner[start..end].iter().map(|o| o - first).collect();
        let span = owner.last().map_or(0, |last| last + 1);
        let log_probs = model.head_log_probs(&hidden.f_narrow(0, start as i64, (end - start) as i64)?)?;
        let to_device = |v: &[i64]| Tensor::from_slice(v).f_to_device(device);
        let scores = score_continuations(&log_probs, &to_device(&batch.targets[start..end])?, &to_device(&owner)?, span)?;
        let ll = Vec::<f64>::try_from(&scores.loglik.to_device(Device::Cpu))?;
        let greedy = Vec::<bool>::try_from(&scores.is_greedy.to_device(Device::Cpu))?;
        let count = Vec::<i64>::try_from(&scores.n_tokens.to_device(Device::Cpu))?;
        for k in 0..span as usize {
            let r = first as usize + k;
            loglik[r] += ll[k];
            is_greedy[r] &= greedy[k];
            n_tokens[r] += count[k];
        }
        start = end;
    }
    Ok((loglik, is_greedy, n_tokens))
}

/// The causal sequences a task needs at the least: every request whole, except that the choices of a
/// multiple-choice question share their context (counted once; each choice then adds the
/// continuation tokens it feeds to the model).
fn needed_sequences(p: &Prepared) -> Vec<usize> {
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
fn summarize(
    model: &dyn CausalLm,
    p: &Prepared,
    s: &Scores,
    seconds: f64,
) -> Result<(TaskReport, Vec<serde_json::Value>)> {
    let tokens: usize = p.encoded.iter().map(|e| e.input.len()).sum();
    let truncated = p.encoded.iter().filter(|e| e.truncated).count();
    let name = &p.task.name;
    let n = p.prompts.len();
    let mut report = TaskReport::new(name, p.task.kind().name(), n, seconds, tokens, truncated);
    report.num_fewshot = p.spec.prompt.num_fewshot;
    report.set_flops(model.forward_flops(&needed_sequences(p), p.encoded.iter().map(|e| e.targets.len()).sum()));
    let mut lines = Vec::new();
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
                lines.push(json!({
                    "task": name, "index": r.example, "loglik": s.loglik[i],
                    "is_greedy": s.is_greedy[i], "n_tokens": s.n_tokens[i],
                }));
            }
        }
        TaskExamples::MultipleChoice(_) | TaskExamples::Schema(_) => {
            // (options, gold) of each evaluated question; schema options share one continuation.
            let rows: Vec<(usize, usize)> = (0..n)
                .map(|q| p.task.choice(q))
                .collect::<Option<_>>()
                .context("a choice task without options")?;
            let n_chars: Vec<i64> =
                p.requests.iter().map(|r| py_strip(&r.continuation).chars().count() as i64).collect();
            let question: Vec<i64> = p.requests.iter().map(|r| r.example as i64).collect();
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
            for (q, &(k, gold)) in rows.iter().enumerate() {
                let range = first..first + k;
                first = range.end;
                lines.push(json!({
                    "task": name, "index": q, "logliks": &s.loglik[range.clone()],
                    "n_tokens": &s.n_tokens[range], "pred": pred[q], "pred_norm": pred_norm[q], "gold": gold,
                }));
            }
        }
    }
    Ok((report, lines))
}
