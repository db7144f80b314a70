//! `TrainingEvaluator`: a call from a training loop sees the model in evaluation mode without
//! gradients, restores training mode (also after an error), returns what a plain evaluation returns,
//! and with several ranks each rank scores only its share yet all return one process's results.
//!
//! Needs the reference models of `cargo xtask setup` (`$ICL_MODELS/gpt-neo-tiny`) and the task files
//! in `$ICL_DATA` (default ../shared/data/icl).
#![allow(clippy::unwrap_used)]

use icl_data::{EncodeOptions, PromptOptions, ReadOptions, TaskSpec, Tokenizer};
use icl_eval::{logged_metrics, EvalOptions, Evaluator, Silent, TaskResult, TrainingEvaluator};
use icl_models::{CausalLm, GptNeo, GptNeoConfig, KvCache, ModelInput};
use icl_shard::{SingleProcess, ThreadRanks};
use icl_test_support::{data_dir, model_dir};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

/// The tiny reference GPT-Neo with dropout switched on, in training mode.
fn training_model() -> GptNeo {
    let dir = model_dir("gpt-neo-tiny");
    let path = dir.join("config.json");
    let mut config = GptNeoConfig::from_json(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    config.embed_dropout = 0.2;
    config.attention_dropout = 0.2;
    config.resid_dropout = 0.2;
    let model = GptNeo::load(&dir, &config, Kind::Float, Device::Cpu).unwrap();
    model.set_training(true);
    model
}

/// LAMBADA and PIQA subsets in small batches, so that there are several batches to share out.
fn evaluator(limit: usize) -> Evaluator {
    let tokenizer = Tokenizer::from_file(&model_dir("gpt-neo-tiny").join("tokenizer.json")).unwrap();
    let spec = |name: &str, file: &str, num_fewshot: usize| TaskSpec {
        name: name.into(),
        path: data_dir().join(file),
        read: ReadOptions::default(),
        prompt: PromptOptions { num_fewshot, ..PromptOptions::default() },
    };
    let specs = vec![spec("lambada", "lambada_openai.jsonl", 0), spec("piqa", "piqa.jsonl", 1)];
    let encode = EncodeOptions { max_length: 256, prefix_token: 50256 };
    let options = EvalOptions { batch_tokens: 1024, row_len: 256, limit: Some(limit), ..EvalOptions::default() };
    Evaluator::new(specs, &tokenizer, encode, options).unwrap()
}

/// A model that records, on every forward pass, whether gradients were on and which mode it was in.
struct Probe<'a> {
    inner: &'a GptNeo,
    passes: AtomicUsize,
    saw_grad: AtomicBool,
    saw_training: AtomicBool,
    fail: bool,
}

impl<'a> Probe<'a> {
    fn new(inner: &'a GptNeo, fail: bool) -> Self {
        Self {
            inner,
            passes: AtomicUsize::new(0),
            saw_grad: AtomicBool::new(false),
            saw_training: AtomicBool::new(false),
            fail,
        }
    }
}

impl CausalLm for Probe<'_> {
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> icl_models::Result<Tensor> {
        self.passes.fetch_add(1, Ordering::Relaxed);
        let leaf = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        if (&leaf * 2.0).requires_grad() {
            self.saw_grad.store(true, Ordering::Relaxed);
        }
        if self.inner.is_training() {
            self.saw_training.store(true, Ordering::Relaxed);
        }
        if self.fail {
            return Err(icl_models::Error::Config { path: "probe".into(), message: "injected failure".into() });
        }
        self.inner.hidden_at(input, scored)
    }
    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> icl_models::Result<Tensor> {
        self.inner.hidden_cached(input, cache)
    }
    fn head_logits(&self, hidden: &Tensor) -> icl_models::Result<Tensor> {
        self.inner.head_logits(hidden)
    }
    fn logits(&self, input: &ModelInput) -> icl_models::Result<Tensor> {
        self.inner.logits(input)
    }
    fn vocab_size(&self) -> i64 {
        self.inner.vocab_size()
    }
    fn max_length(&self) -> usize {
        self.inner.max_length()
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn kind(&self) -> Kind {
        self.inner.kind()
    }
    fn parameter_bytes(&self) -> usize {
        self.inner.parameter_bytes()
    }
    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        self.inner.forward_flops(lengths, scored)
    }
    fn is_training(&self) -> bool {
        self.inner.is_training()
    }
    fn set_training(&self, training: bool) {
        self.inner.set_training(training)
    }
}

/// Metrics and per-example lines, without timings.
/// Logged metrics and every sample line.
type Outcome = (Vec<(String, f64)>, Vec<serde_json::Value>);

fn outcome(results: &[TaskResult]) -> Outcome {
    (logged_metrics(results), results.iter().flat_map(|r| r.samples.clone()).collect())
}

#[test]
fn a_training_loop_call_is_a_plain_evaluation_in_eval_mode_without_gradients() {
    let model = training_model();
    let in_loop = TrainingEvaluator::new(evaluator(40));
    let probe = Probe::new(&model, false);
    let first = in_loop.evaluate(&probe, &SingleProcess).unwrap();
    assert!(probe.passes.load(Ordering::Relaxed) >= 4, "several batches");
    assert!(!probe.saw_grad.load(Ordering::Relaxed), "a forward pass ran with gradients on");
    assert!(!probe.saw_training.load(Ordering::Relaxed), "a forward pass ran in training mode (dropout)");
    assert!(model.is_training(), "training mode was not restored");
    // Gradients are on again for the training step that follows.
    let leaf = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    assert!((&leaf * 2.0).requires_grad());

    // The same numbers as the library's plain evaluation of the model in evaluation mode.
    model.set_training(false);
    let plain = in_loop.evaluator().evaluate(&model, &mut Silent).unwrap();
    model.set_training(true);
    assert_eq!(outcome(&first), outcome(&plain));
    let names: Vec<String> = logged_metrics(&first).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "lambada/acc",
            "lambada/acc_stderr",
            "lambada/perplexity",
            "lambada/perplexity_stderr",
            "lambada/token_perplexity",
            "lambada/bits_per_byte",
            "lambada/bits_per_byte_stderr",
            "piqa/acc",
            "piqa/acc_stderr",
            "piqa/acc_norm",
            "piqa/acc_norm_stderr",
            "piqa/acc_mean_nll",
            "piqa/acc_mean_nll_stderr"
        ]
    );
    // Each standard error is the report's, logged right after its metric.
    let logged = logged_metrics(&first);
    assert_eq!(logged[1].1, first[0].report.acc_stderr.unwrap());
    assert_eq!(logged[10].1, first[1].report.acc_norm_stderr.unwrap());
    // A second call reuses the inputs kept on the device and gives the same results.
    assert_eq!(outcome(&in_loop.evaluate(&model, &SingleProcess).unwrap()), outcome(&first));
}

#[test]
fn training_mode_is_restored_when_evaluation_fails() {
    let model = training_model();
    let in_loop = TrainingEvaluator::new(evaluator(8));
    let e = in_loop.evaluate(&Probe::new(&model, true), &SingleProcess).unwrap_err().to_string();
    assert!(e.contains("injected failure"), "{e}");
    assert!(model.is_training());
    model.set_training(false);
    in_loop.evaluate(&model, &SingleProcess).unwrap();
    assert!(!model.is_training(), "evaluation mode is kept for a model that was in it");
}

#[test]
fn every_rank_scores_its_share_and_all_return_one_process_results() {
    let model = training_model();
    let single_evaluator = TrainingEvaluator::new(evaluator(30));
    let probe = Probe::new(&model, false);
    let single = outcome(&single_evaluator.evaluate(&probe, &SingleProcess).unwrap());
    let single_passes = probe.passes.load(Ordering::Relaxed);
    for world_size in [2, 3] {
        let per_rank: Vec<(usize, Outcome)> = std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadRanks::group(world_size)
                .into_iter()
                .map(|ranks| {
                    scope.spawn(move || {
                        // One model and one evaluator per rank, as separate processes would have.
                        let model = training_model();
                        let probe = Probe::new(&model, false);
                        let results = TrainingEvaluator::new(evaluator(30)).evaluate(&probe, &ranks).unwrap();
                        assert!(model.is_training());
                        (probe.passes.load(Ordering::Relaxed), outcome(&results))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let passes: Vec<usize> = per_rank.iter().map(|(p, _)| *p).collect();
        // Few batches are split by rows for several ranks, so the ranks together may run more passes
        // than one process, but each runs only its share.
        let total: usize = passes.iter().sum();
        assert!(total >= single_passes, "{world_size} ranks: passes {passes:?}, one process {single_passes}");
        assert!(passes.iter().all(|&p| p > 0 && p < total), "{world_size} ranks: passes {passes:?}");
        for (rank, (_, result)) in per_rank.iter().enumerate() {
            assert_eq!(result, &single, "rank {rank} of {world_size}");
        }
    }
}
