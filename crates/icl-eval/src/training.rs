//! Evaluation from inside a training loop.
//!
//! A [`TrainingEvaluator`] wraps an [`Evaluator`] (tasks read, prompted, tokenized and batched once)
//! and is called every N steps on the model being trained. Each call runs without gradients, with the
//! model in evaluation mode (dropout off) and its previous mode restored afterwards, even when the
//! call fails; it uses the model's device and dtype as they are, and keeps the planned batches on that
//! device after the first call, so later calls copy nothing from the host. With several ranks, each
//! rank scores its share of every task's batches and the per-request results are summed across
//! ranks, so every rank returns the same metrics as one process would.

use crate::{score_task, summarize, DeviceBatch, Evaluator, Result, Scores, Silent, TaskResult};
use icl_models::CausalLm;
use icl_shard::{shard_range, Collective};
use std::sync::Mutex;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Each task's planned batches already on a device, for one rank's share (other entries `None`).
#[derive(Debug)]
struct Prebuilt {
    device: Device,
    rank: usize,
    world_size: usize,
    tasks: Vec<Vec<Option<DeviceBatch>>>,
}

/// Calls an [`Evaluator`] on a model under training; see the module documentation.
#[derive(Debug)]
pub struct TrainingEvaluator {
    evaluator: Evaluator,
    /// Built on the first call; rebuilt if the model moves to another device or the ranks change.
    prebuilt: Mutex<Option<Prebuilt>>,
}

/// Switches a model to evaluation mode and restores its previous mode when dropped.
struct EvalMode<'a> {
    model: &'a dyn CausalLm,
    was_training: bool,
}

impl<'a> EvalMode<'a> {
    fn enter(model: &'a dyn CausalLm) -> Self {
        let was_training = model.is_training();
        model.set_training(false);
        Self { model, was_training }
    }
}

impl Drop for EvalMode<'_> {
    fn drop(&mut self) {
        self.model.set_training(self.was_training);
    }
}

impl TrainingEvaluator {
    pub fn new(evaluator: Evaluator) -> Self {
        Self { evaluator, prebuilt: Mutex::new(None) }
    }

    pub fn evaluator(&self) -> &Evaluator {
        &self.evaluator
    }

    /// Scores every task on `model` and returns the results in task order; see the module
    /// documentation for what a call guarantees. Every rank of `collective` must call it together.
    pub fn evaluate(&self, model: &dyn CausalLm, collective: &dyn Collective) -> Result<Vec<TaskResult>> {
        let _no_grad = tch::no_grad_guard();
        let _mode = EvalMode::enter(model);
        let key = (model.device(), collective.rank(), collective.world_size());
        // A poisoned lock only means an earlier call panicked; the cache is rebuilt then.
        let mut cache = self.prebuilt.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let prebuilt = match cache.take() {
            Some(p) if (p.device, p.rank, p.world_size) == key => p,
            _ => self.build(key)?,
        };
        let results = self.score(model, collective, &prebuilt);
        *cache = Some(prebuilt);
        results
    }

    fn score(&self, model: &dyn CausalLm, collective: &dyn Collective, prebuilt: &Prebuilt) -> Result<Vec<TaskResult>> {
        let (rank, world_size) = (prebuilt.rank, prebuilt.world_size);
        let mut results = Vec::with_capacity(self.evaluator.tasks.len());
        for (p, inputs) in self.evaluator.tasks.iter().zip(&prebuilt.tasks) {
            let start = Instant::now();
            let share = shard_range(p.batches.len(), rank, world_size);
            let mut scores = score_task(model, p, &mut Silent, share, Some(inputs))?;
            if world_size > 1 {
                scores = sum_over_ranks(scores, collective, prebuilt.device)?;
            }
            results.push(summarize(model, p, &scores, start.elapsed().as_secs_f64())?);
        }
        Ok(results)
    }

    fn build(&self, (device, rank, world_size): (Device, usize, usize)) -> Result<Prebuilt> {
        let tasks = self
            .evaluator
            .tasks
            .iter()
            .map(|p| {
                let share = shard_range(p.batches.len(), rank, world_size);
                p.batches
                    .iter()
                    .enumerate()
                    .map(|(i, batch)| share.contains(&i).then(|| DeviceBatch::new(batch, device)).transpose())
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prebuilt { device, rank, world_size, tasks })
    }
}

/// Every rank's scores merged: each request was scored by exactly one rank and is zero (false) on
/// the others, so a sum restores it exactly.
fn sum_over_ranks(scores: Scores, collective: &dyn Collective, device: Device) -> Result<Scores> {
    let mut loglik = Tensor::from_slice(&scores.loglik).f_to_device(device)?;
    let greedy: Vec<i64> = scores.is_greedy.iter().map(|&g| i64::from(g)).collect();
    let mut greedy = Tensor::from_slice(&greedy).f_to_device(device)?;
    let mut n_tokens = Tensor::from_slice(&scores.n_tokens).f_to_device(device)?;
    collective.all_reduce_sum(&mut loglik)?;
    collective.all_reduce_sum(&mut greedy)?;
    collective.all_reduce_sum(&mut n_tokens)?;
    let cpu = |t: Tensor| t.f_to_device(Device::Cpu);
    Ok(Scores {
        loglik: Vec::<f64>::try_from(cpu(loglik)?.f_to_kind(Kind::Double)?)?,
        is_greedy: Vec::<i64>::try_from(cpu(greedy)?)?.into_iter().map(|g| g > 0).collect(),
        n_tokens: Vec::<i64>::try_from(cpu(n_tokens)?)?,
    })
}

/// The results as loggers take them: `(task/metric, value)` for every metric of every task.
pub fn logged_metrics(results: &[TaskResult]) -> Vec<(String, f64)> {
    results
        .iter()
        .flat_map(|r| r.report.metrics().into_iter().map(move |(metric, v)| (format!("{}/{metric}", r.report.name), v)))
        .collect()
}
