//! Summaries: a task's metrics and per-example sample lines from its per-request results.

use crate::{Error, PreparedTask, RequestResult, Result, ScoredRequests, TaskReport, TaskResult, PERPLEXITY_BOOTSTRAP};
use icl_data::{py_strip, GenerationPlan, TaskExamples, Tokenizer};
use icl_metrics::{
    answer_matches, cot_answer, count_bytes, count_words, cut_at_stop, mean_stderr, perplexity_stderr, predict_choices,
    ratio_stderr, ChoiceMetrics, ChoiceScores, ContinuationScores, DocumentMetrics, GenerationMetrics, LmMetrics,
    RatioStatistic,
};
use icl_models::CausalLm;
use serde_json::json;
use std::collections::HashMap;
use tch::Tensor;

/// The causal sequences a task needs at the least: every request whole, except that the choices of a
/// multiple-choice question share their context (counted once; each choice then adds the
/// continuation tokens it feeds to the model).
fn needed_sequences(p: &PreparedTask, work: &ScoredRequests) -> Vec<usize> {
    let mut lengths = Vec::with_capacity(work.encoded.len());
    for (request, encoded) in work.requests.iter().zip(&work.encoded) {
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

/// Task metrics and per-example sample lines of a scored task from its requests' results (in
/// request order).
pub(crate) fn summarize(
    model: &dyn CausalLm,
    p: &PreparedTask,
    work: &ScoredRequests,
    results: &[RequestResult],
    seconds: f64,
) -> Result<TaskResult> {
    let tokens: usize = work.encoded.iter().map(|e| e.input.len()).sum();
    let truncated = work.encoded.iter().filter(|e| e.truncated).count();
    let name = p.name();
    let n = p.prompts.len();
    let mut report = TaskReport::new(name, p.task.kind().name(), n, seconds, tokens, truncated);
    report.num_fewshot = p.spec.prompt.num_fewshot;
    report.skipped = p.skipped.len();
    report.skipped_rows = p.skipped.clone();
    let scored_tokens = work.encoded.iter().map(|e| e.targets.len()).sum();
    report.set_flops(model.forward_flops(&needed_sequences(p, work), scored_tokens));
    let loglik: Vec<f64> = results.iter().map(|r| r.loglik).collect();
    let n_tokens: Vec<i64> = results.iter().map(|r| r.n_tokens).collect();
    let mut samples = Vec::new();
    match &p.task.examples {
        TaskExamples::LanguageModeling(_) => {
            let mut metrics = LmMetrics::default();
            let is_greedy: Vec<bool> = results.iter().map(|r| r.is_greedy).collect();
            let scores = ContinuationScores {
                loglik: Tensor::from_slice(&loglik),
                is_greedy: Tensor::from_slice(&is_greedy),
                n_tokens: Tensor::from_slice(&n_tokens),
            };
            metrics.update(&scores)?;
            report.acc = Some(metrics.acc.value());
            report.perplexity = Some(metrics.perplexity());
            report.token_perplexity = Some(metrics.token_perplexity());
            report.acc_stderr = mean_stderr(&scores.is_greedy)?;
            report.perplexity_stderr = perplexity_stderr(&scores.loglik, &PERPLEXITY_BOOTSTRAP)?;
            // Bits per byte of the scored continuations (their text, leading space included).
            let n_bytes: Vec<i64> = work.requests.iter().map(|r| count_bytes(&r.continuation) as i64).collect();
            let n_bytes_t = Tensor::from_slice(&n_bytes);
            let mut per_byte = DocumentMetrics::default();
            per_byte.update(&scores.loglik, &n_bytes_t, &n_bytes_t)?;
            report.bits_per_byte = Some(per_byte.bits_per_byte());
            report.bits_per_byte_stderr =
                ratio_stderr(&scores.loglik, &n_bytes_t, RatioStatistic::Bits, &PERPLEXITY_BOOTSTRAP)?;
            for ((request, result), n_bytes) in work.requests.iter().zip(results).zip(&n_bytes) {
                samples.push(json!({
                    "task": name, "index": request.example, "loglik": result.loglik,
                    "is_greedy": result.is_greedy, "n_tokens": result.n_tokens, "n_bytes": n_bytes,
                }));
            }
        }
        TaskExamples::Perplexity(documents) => {
            // A document's log-likelihood is the sum of its windows', in window order (lm-eval's `sum`).
            let mut per_document: HashMap<usize, (f64, i64, usize)> = HashMap::new();
            for (request, result) in work.requests.iter().zip(results) {
                let entry = per_document.entry(request.example).or_insert((0.0, 0, 0));
                entry.0 += result.loglik;
                entry.1 += result.n_tokens;
                entry.2 += 1;
            }
            let (mut doc_loglik, mut doc_words, mut doc_bytes, mut doc_tokens) = (vec![], vec![], vec![], vec![]);
            for prompt in &p.prompts {
                let text = &documents[prompt.example].text;
                // A document without tokens has no windows and log-likelihood 0, as in lm-eval.
                let (loglik, n_tokens, n_windows) = per_document.get(&prompt.example).copied().unwrap_or_default();
                let (n_words, n_bytes) = (count_words(text) as i64, count_bytes(text) as i64);
                samples.push(json!({
                    "task": name, "index": prompt.example, "loglik": loglik, "n_tokens": n_tokens,
                    "n_words": n_words, "n_bytes": n_bytes, "n_windows": n_windows,
                }));
                doc_loglik.push(loglik);
                doc_words.push(n_words);
                doc_bytes.push(n_bytes);
                doc_tokens.push(n_tokens);
            }
            let loglik = Tensor::from_slice(&doc_loglik);
            let (words, bytes) = (Tensor::from_slice(&doc_words), Tensor::from_slice(&doc_bytes));
            let mut metrics = DocumentMetrics::default();
            metrics.update(&loglik, &words, &bytes)?;
            report.word_perplexity = Some(metrics.word_perplexity());
            report.byte_perplexity = Some(metrics.byte_perplexity());
            report.bits_per_byte = Some(metrics.bits_per_byte());
            let total_tokens: i64 = doc_tokens.iter().sum();
            report.token_perplexity = Some((-doc_loglik.iter().sum::<f64>() / total_tokens as f64).exp());
            let bootstrap =
                |weights: &Tensor, statistic| ratio_stderr(&loglik, weights, statistic, &PERPLEXITY_BOOTSTRAP);
            report.word_perplexity_stderr = bootstrap(&words, RatioStatistic::Perplexity)?;
            report.byte_perplexity_stderr = bootstrap(&bytes, RatioStatistic::Perplexity)?;
            report.bits_per_byte_stderr = bootstrap(&bytes, RatioStatistic::Bits)?;
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
                work.requests.iter().map(|r| py_strip(&r.continuation).chars().count() as i64).collect();
            let question: Vec<i64> = work.requests.iter().map(|r| question_of[&r.example]).collect();
            let choice: Vec<i64> = work.requests.iter().map(|r| r.choice as i64).collect();
            let scores = ChoiceScores {
                loglik: Tensor::from_slice(&loglik),
                n_tokens: Tensor::from_slice(&n_tokens),
                n_chars: Tensor::from_slice(&n_chars),
                question: Tensor::from_slice(&question),
                choice: Tensor::from_slice(&choice),
            };
            let preds = predict_choices(&scores, rows.len() as i64)?;
            let gold: Vec<i64> = rows.iter().map(|&(_, g)| g as i64).collect();
            let gold = Tensor::from_slice(&gold);
            let mut metrics = ChoiceMetrics::default();
            metrics.update(&preds, &gold)?;
            report.acc = Some(metrics.acc.value());
            report.acc_norm = Some(metrics.acc_norm.value());
            report.acc_mean_nll = Some(metrics.acc_mean_nll.value());
            // Each question's 0/1 correctness under each rule, the values the means above average.
            report.acc_stderr = mean_stderr(&preds.acc.f_eq_tensor(&gold)?)?;
            report.acc_norm_stderr = mean_stderr(&preds.acc_norm.f_eq_tensor(&gold)?)?;
            report.acc_mean_nll_stderr = mean_stderr(&preds.mean_nll.f_eq_tensor(&gold)?)?;
            let pred = Vec::<i64>::try_from(&preds.acc)?;
            let pred_norm = Vec::<i64>::try_from(&preds.acc_norm)?;
            let mut first = 0;
            report.random_baseline = rows.iter().map(|&(k, _)| 1.0 / k as f64).sum::<f64>() / n.max(1) as f64;
            for (q, (&(k, gold), prompt)) in rows.iter().zip(&p.prompts).enumerate() {
                let range = first..first + k;
                first = range.end;
                samples.push(json!({
                    "task": name, "index": prompt.example, "logliks": &loglik[range.clone()],
                    "n_tokens": &n_tokens[range], "pred": pred[q], "pred_norm": pred_norm[q], "gold": gold,
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
pub(crate) fn summarize_generation(
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
        // llm-foundry's order: cut at the first stop, then the text after the last cot delimiter.
        let output = cut_at_stop(&text, &plan.stop_sequences);
        let answer = cot_answer(output, &plan.cot_delimiter);
        let is_correct = answer_matches(answer, &request.answers, plan.normalize_answers);
        correct.push(is_correct);
        let mut sample = json!({
            "task": name, "index": request.example, "output": output, "correct": is_correct,
            "n_tokens": tokens.len(),
        });
        if !plan.cot_delimiter.is_empty() {
            sample["answer"] = json!(answer);
        }
        samples.push(sample);
    }
    let correct = Tensor::from_slice(&correct);
    let mut metrics = GenerationMetrics::default();
    metrics.update(&correct)?;
    report.exact_match = Some(metrics.exact_match.value());
    report.exact_match_stderr = mean_stderr(&correct)?;
    // Gauntlet aggregation reads `acc`; chance is 0.
    report.acc = report.exact_match;
    report.acc_stderr = report.exact_match_stderr;
    report.random_baseline = 0.0;
    Ok(TaskResult { report, samples })
}
