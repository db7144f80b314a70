//! Scoring: continuations' log-likelihoods from forward passes over packed batches, this rank's
//! share of the plan run through the shared loop ([`crate::run`]).

use crate::run::{run_share, Job};
use crate::{Error, Observer, RequestResult, Result, ScoredRequests};
use icl_data::{plan_batches, Batch, BatchOptions, EncodedRequest};
use icl_metrics::score_continuations;
use icl_models::{CausalLm, KvCache, ModelInput};
use icl_shard::Collective;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use tch::{Device, Tensor};

/// Scores every request of a task: this rank's share of the batches of [`rank_plan`], then the other
/// ranks' results are gathered; the results are in request order. `prebuilt[i]`, when given, is the
/// input of batch `i` of [`rank_plan`], already on the model's device.
pub(crate) fn score_task(
    model: &dyn CausalLm,
    task: &str,
    work: &ScoredRequests,
    collective: &dyn Collective,
    observer: &mut dyn Observer,
    prebuilt: Option<&[Option<DeviceBatch>]>,
) -> Result<Vec<RequestResult>> {
    let plan = rank_plan(work, collective.world_size());
    let mine = batches_of_rank(&plan, collective.rank(), collective.world_size());
    let recovered = |r: &usize| observer.recovered(task, *r).is_some();
    let mut batches = Vec::with_capacity(mine.len());
    for &b in &mine {
        let batch = &plan[b];
        if batch.requests.iter().all(recovered) || !batch.requests.iter().any(recovered) {
            batches.push(Queued { batch: batch.clone(), options: work.batch_options, planned: Some(b) });
            continue;
        }
        // Partly finished by a run on another rank count, whose plan cuts the same rows into other
        // batches: only the rows with work left run (rows score the same in any batch).
        for row in batch.split_rows(1).into_iter().filter(|row| !row.requests.iter().all(recovered)) {
            batches.push(Queued { batch: row, options: work.batch_options, planned: None });
        }
    }
    if !work.prefix.is_empty() {
        observer.notice(&format!(
            "{task}: the {}-token prefix that every request shares is computed once",
            work.prefix.len()
        ));
    }
    let job = Scoring { model, task, work, prebuilt, prefix_cache: RefCell::new(None) };
    run_share(&job, task, work.encoded.len(), batches, collective, observer)
}

/// A batch waiting to be scored.
struct Queued {
    batch: Batch,
    /// What it was planned under.
    options: BatchOptions,
    /// Its index in the rank plan (none once planned again), which finds a prebuilt input.
    planned: Option<usize>,
}

/// Scoring as a [`Job`] of the shared loop.
struct Scoring<'a> {
    model: &'a dyn CausalLm,
    task: &'a str,
    work: &'a ScoredRequests,
    prebuilt: Option<&'a [Option<DeviceBatch>]>,
    /// The keys and values of the task's shared prefix ([`ScoredRequests::prefix`]), one row,
    /// computed at this rank's first batch.
    prefix_cache: RefCell<Option<KvCache>>,
}

impl Scoring<'_> {
    /// One forward pass of `batch` after the task's shared prefix, whose keys and values are
    /// computed once: each row's real tokens attend to the whole prefix and sit at positions after it.
    fn score_after_prefix(&self, batch: &Batch) -> Result<Vec<(usize, RequestResult)>> {
        let model = self.model;
        let device = model.device();
        let shared = self.work.prefix.len() as i64;
        let mut slot = self.prefix_cache.borrow_mut();
        let prefix = match slot.as_mut() {
            Some(prefix) => prefix,
            None => {
                let ids: Vec<i64> = self.work.prefix.iter().map(|&t| i64::from(t)).collect();
                let input = ModelInput::causal(&Tensor::from_slice(&ids).f_view([1, shared])?.f_to_device(device)?)?;
                let mut one = KvCache::with_capacity(shared);
                one.advance(&input.positions)?;
                let _prefix_hidden = model.hidden_cached(&input, &mut one)?;
                slot.insert(one)
            }
        };
        let (rows, seq) = (batch.rows as i64, batch.seq_len as i64);
        let tensor =
            |v: &[i64]| -> Result<Tensor> { Ok(Tensor::from_slice(v).f_view([rows, seq])?.f_to_device(device)?) };
        let segments = tensor(&batch.segments)?;
        let packed = ModelInput::packed(
            &tensor(&batch.input_ids)?,
            &tensor(&batch.positions)?,
            &segments,
            &tensor(&batch.branches)?,
        )?;
        let real = segments.f_ge(0)?;
        // Padding stays at position 0 and sees only padding.
        let positions = packed.positions.f_add(&real.f_to_kind(tch::Kind::Int64)?.f_mul_scalar(shared)?)?;
        let prefix_keys = real.f_unsqueeze(2)?.f_expand([rows, seq, shared], false)?;
        let attention = Tensor::f_cat(&[&prefix_keys, &packed.attention], 2)?;
        let input = ModelInput { input_ids: packed.input_ids, positions, attention };
        let mut cache = KvCache::after_prefix(prefix, rows, seq)?;
        cache.advance(&input.positions)?;
        let hidden = model.hidden_cached(&input, &mut cache)?;
        let scored = Tensor::from_slice(&batch.scored).f_to_device(device)?;
        let hidden = hidden.f_reshape([rows * seq, -1])?.f_index_select(0, &scored)?;
        score_in_chunks(model, &hidden, batch)
    }
}

impl Job for Scoring<'_> {
    type Batch = Queued;
    type Output = RequestResult;

    fn requests<'b>(&self, queued: &'b Queued) -> &'b [usize] {
        &queued.batch.requests
    }

    /// One forward pass; a non-finite log-likelihood fails (metrics would silently turn NaN).
    fn run(&self, queued: &Queued) -> Result<Vec<(usize, RequestResult)>> {
        let ready = queued.planned.and_then(|i| self.prebuilt?.get(i)?.as_ref());
        let finished = match ready {
            _ if !self.work.prefix.is_empty() => self.score_after_prefix(&queued.batch)?,
            Some(input) => score_input(self.model, input, &queued.batch)?,
            None => score_batch(self.model, &queued.batch)?,
        };
        if let Some(&(r, _)) = finished.iter().find(|(_, result)| !result.loglik.is_finite()) {
            let request = &self.work.requests[r];
            return Err(Error::Example {
                task: self.task.to_owned(),
                example: request.example,
                message: format!("choice {}: the model gave a non-finite log-likelihood", request.choice),
            });
        }
        Ok(finished)
    }

    /// The batch's requests planned again under half its tokens and row length.
    fn split(&self, queued: Queued, error: Error) -> Result<(Vec<Queued>, String)> {
        let Queued { batch, options, .. } = queued;
        let smaller = BatchOptions {
            max_tokens: (batch.rows * batch.seq_len / 2).max(1),
            row_len: (options.row_len / 2).max(1),
            ..options
        };
        let parts = replan(&self.work.planned, &self.work.shared, &batch.requests, smaller);
        if parts.len() < 2 && parts.iter().all(|b| b.rows * b.seq_len >= batch.rows * batch.seq_len) {
            let r = batch.requests[0];
            return Err(Error::Example {
                task: self.task.to_owned(),
                example: self.work.requests[r].example,
                message: format!("out of memory even alone ({} tokens): {error}", self.work.encoded[r].input.len()),
            });
        }
        let notice = format!(
            "out of memory on a batch of {} x {} tokens; retrying it in {} smaller batch(es)",
            batch.rows,
            batch.seq_len,
            parts.len()
        );
        Ok((parts.into_iter().map(|batch| Queued { batch, options: smaller, planned: None }).collect(), notice))
    }

    fn finish_collectives(&self) -> Result<()> {
        Ok(self.model.finish_collectives()?)
    }
}

/// Batches per rank below which the plan is split further for several ranks.
const BATCHES_PER_RANK: usize = 4;

/// The batches that `world_size` ranks share out: the one-rank plan, or, when it has fewer than
/// [`BATCHES_PER_RANK`] batches per rank, the same rows split into smaller batches so that every rank
/// gets work. Rows are kept exactly ([`Batch::split_rows`]) and results do not depend on how rows are
/// batched, so any rank count gives the one-rank results bit for bit. The same on every rank.
pub(crate) fn rank_plan(work: &ScoredRequests, world_size: usize) -> Cow<'_, [Batch]> {
    let wanted = BATCHES_PER_RANK * world_size;
    if world_size <= 1 || work.batches.len() >= wanted {
        return Cow::Borrowed(&work.batches);
    }
    let rows: usize = work.batches.iter().map(|b| b.rows).sum();
    let max_rows = rows.div_ceil(wanted).max(1);
    Cow::Owned(work.batches.iter().flat_map(|b| b.split_rows(max_rows)).collect())
}

/// The batches of `plan` that `rank` of `world_size` scores: whole batches, balanced by tokens.
pub(crate) fn batches_of_rank(plan: &[Batch], rank: usize, world_size: usize) -> Vec<usize> {
    let costs: Vec<u64> = plan.iter().map(|b| (b.rows * b.seq_len) as u64).collect();
    icl_shard::assign_by_cost(&costs, rank, world_size)
}

/// A batch's model input and scored positions, on a device.
#[derive(Debug)]
pub(crate) struct DeviceBatch {
    input: ModelInput,
    scored: Tensor,
}

impl DeviceBatch {
    pub(crate) fn new(batch: &Batch, device: Device) -> Result<Self> {
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

/// Each position's target log-likelihood (the f32 log-softmax entry, widened) and greedy flag, from
/// the head's `logits` `[targets, vocab]`: on the CPU by [`icl_models::target_scores`], which forms
/// only the targets' entries; elsewhere, and for the rare row holding a NaN or an infinity, by
/// libtorch's log-softmax and [`score_continuations`] (each row alone, so a row's result never
/// depends on the others in its chunk).
fn token_scores(logits: &Tensor, targets: &[i64]) -> Result<(Vec<f64>, Vec<bool>)> {
    // `rows` of `logits` with their `targets`, through libtorch.
    let by_libtorch = |rows: &Tensor, targets: &[i64]| -> Result<(Vec<f64>, Vec<bool>)> {
        let device = rows.device();
        let log_probs = rows.f_log_softmax(-1, tch::Kind::Float)?;
        // Every token its own owner: per-token values, summed by the caller in a fixed order.
        let n = targets.len() as i64;
        let each = Tensor::f_arange(n, (tch::Kind::Int64, device))?;
        let scores = score_continuations(&log_probs, &Tensor::from_slice(targets).f_to_device(device)?, &each, n)?;
        Ok((
            Vec::<f64>::try_from(&scores.loglik.f_to_device(Device::Cpu)?)?,
            Vec::<bool>::try_from(&scores.is_greedy.f_to_device(Device::Cpu)?)?,
        ))
    };
    let Some(scores) = icl_models::target_scores(logits, targets)? else { return by_libtorch(logits, targets) };
    let mut loglik: Vec<f64> = scores.iter().map(|s| s.map_or(f64::NAN, |s| f64::from(s.log_prob))).collect();
    let mut greedy: Vec<bool> = scores.iter().map(|s| s.is_some_and(|s| s.greedy)).collect();
    let left: Vec<i64> = (0..scores.len()).filter(|&r| scores[r].is_none()).map(|r| r as i64).collect();
    if !left.is_empty() {
        let rows = logits.f_index_select(0, &Tensor::from_slice(&left).f_to_device(logits.device())?)?;
        let left_targets: Vec<i64> = left.iter().map(|&r| targets[r as usize]).collect();
        let (their_loglik, their_greedy) = by_libtorch(&rows, &left_targets)?;
        for (k, &r) in left.iter().enumerate() {
            loglik[r as usize] = their_loglik[k];
            greedy[r as usize] = their_greedy[k];
        }
    }
    Ok((loglik, greedy))
}

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
        let logits = model.head_logits(&rows)?.f_narrow(0, 0, len)?;
        let range = start as usize..(start + len) as usize;
        let (loglik, greedy) = token_scores(&logits, &batch.targets[range.clone()])?;
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
