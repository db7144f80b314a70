//! Evaluation from inside a training loop.
//!
//! A [`TrainingEvaluator`] wraps an [`Evaluator`] (tasks read, prompted, tokenized and batched once)
//! and is called every N steps on the model being trained. Each call runs without gradients, with the
//! model in evaluation mode (dropout off) and its previous mode restored afterwards, even when the
//! call fails; it uses the model's device and dtype as they are, and keeps the planned batches on that
//! device after the first call, so later calls copy nothing from the host. With several ranks, each
//! rank scores its share of every task's batches (the same share as [`Evaluator::evaluate_on`]) and
//! the per-request results are gathered bit for bit, so every rank returns exactly the metrics one
//! process would. Generation tasks are decoded each call (nothing to keep on the device).

use crate::score::{batches_of_rank, rank_plan, DeviceBatch};
use crate::{Evaluator, Result, Silent, TaskResult, Work};
use icl_models::CausalLm;
use icl_shard::Collective;
use std::sync::Mutex;
use tch::Device;

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
        let results = self.evaluator.run(model, collective, &mut Silent, Some(&prebuilt.tasks));
        *cache = Some(prebuilt);
        results
    }

    fn build(&self, (device, rank, world_size): (Device, usize, usize)) -> Result<Prebuilt> {
        let tasks = self
            .evaluator
            .tasks
            .iter()
            .map(|p| {
                // Generation tasks decode each call: nothing of theirs is kept on the device.
                let Work::Scored(work) = &p.work else { return Ok(Vec::new()) };
                let plan = rank_plan(work, world_size);
                let share = batches_of_rank(&plan, rank, world_size);
                plan.iter()
                    .enumerate()
                    .map(|(i, batch)| share.contains(&i).then(|| DeviceBatch::new(batch, device)).transpose())
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prebuilt { device, rank, world_size, tasks })
    }
}

/// The results as loggers take them: `(task/metric, value)` for every metric of every task, each
/// followed by `(task/metric_stderr, its standard error)` where one was computed (as in
/// `results.json`; `icl_log` draws these as error bars on the metric's plot).
pub fn logged_metrics(results: &[TaskResult]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for r in results {
        for (metric, value) in r.report.metrics() {
            let name = format!("{}/{metric}", r.report.name);
            if let Some(se) = r.report.stderr(metric) {
                out.push((name.clone(), value));
                out.push((format!("{name}_stderr"), se));
            } else {
                out.push((name, value));
            }
        }
    }
    out
}
