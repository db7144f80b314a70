//! A training loop's evaluation equals `icl eval` on the checkpoint it saves: a GPT-Neo (the tiny
//! reference config, with dropout) is trained a few AdamW steps, evaluated from the loop by
//! `icl_eval::TrainingEvaluator` while in training mode, saved as a Hugging Face folder, and evaluated
//! again by the `icl` binary. Metrics and every example's log-likelihoods must agree.
//!
//! Needs `cargo xtask setup` (`$ICL_MODELS/gpt-neo-tiny`) and the task files in `$ICL_DATA`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_data::{EncodeOptions, PromptOptions, ReadOptions, TaskSpec, Tokenizer};
use icl_eval::{logged_metrics, EvalOptions, Evaluator, TrainingEvaluator};
use icl_models::{CausalLm, GptNeo, GptNeoConfig};
use icl_shard::SingleProcess;
use std::process::Command;
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Tensor};

const LIMIT: usize = 60;
const SHOTS: usize = 1;

#[test]
fn training_loop_metrics_equal_icl_eval_on_the_saved_checkpoint() {
    let reference = tiny_model();
    let config_path = reference.join("config.json");
    let mut config = GptNeoConfig::from_json(&config_path, &std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.embed_dropout = 0.1;
    config.attention_dropout = 0.1;
    config.resid_dropout = 0.1;
    tch::manual_seed(7);
    let model = GptNeo::new(VarStore::new(Device::Cpu), &config).unwrap();
    model.init_weights().unwrap();
    model.set_training(true);

    let tokenizer = Tokenizer::from_file(&reference.join("tokenizer.json")).unwrap();
    let tasks = [("lambada", "lambada_openai.jsonl"), ("piqa", "piqa.jsonl")];
    let specs = tasks
        .iter()
        .map(|(name, file)| TaskSpec {
            name: (*name).into(),
            path: data_dir().join(file),
            read: ReadOptions::default(),
            prompt: PromptOptions { num_fewshot: SHOTS, ..PromptOptions::default() },
        })
        .collect();
    let encode = EncodeOptions { max_length: config.max_position_embeddings as usize, prefix_token: 50256 };
    let options = EvalOptions { limit: Some(LIMIT), ..EvalOptions::default() };
    let in_loop = TrainingEvaluator::new(Evaluator::new(specs, &tokenizer, encode, options).unwrap());

    // A few steps on token windows of the LAMBADA file itself (only so that the weights move).
    let text = std::fs::read_to_string(data_dir().join("lambada_openai_small.jsonl")).unwrap();
    let ids: Vec<i64> = tokenizer.encode(&text).unwrap().into_iter().map(i64::from).collect();
    let mut optimizer = tch::nn::AdamW::default().build(model.var_store(), 1e-3).unwrap();
    let batch = Tensor::from_slice(&ids[..4 * 64]).view([4, 64]);
    let mut results = Vec::new();
    for _ in 0..3 {
        let loss = model.next_token_loss(&batch).unwrap();
        optimizer.backward_step(&loss);
        results = in_loop.evaluate(&model, &SingleProcess).unwrap();
        assert!(model.is_training());
    }
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    std::fs::copy(reference.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();

    let output = dir.path().join("results.json");
    let samples = dir.path().join("samples.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icl"));
    cmd.arg("eval").arg("--model").arg(dir.path());
    for (name, file) in tasks {
        cmd.arg("--task").arg(format!("{name}={}", data_dir().join(file).display()));
    }
    cmd.args(["--limit", &LIMIT.to_string(), "--num-fewshot", &SHOTS.to_string(), "--quiet"]);
    cmd.arg("--output").arg(&output).arg("--log-samples").arg(&samples);
    let run = cmd.output().unwrap();
    assert!(run.status.success(), "icl eval failed: {}", String::from_utf8_lossy(&run.stderr));

    let cli: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let metrics = logged_metrics(&results);
    // Six metrics and seven standard errors (every metric but token perplexity has one).
    assert_eq!(metrics.len(), 13, "{metrics:?}");
    for (name, value) in &metrics {
        let (task, metric) = name.split_once('/').unwrap();
        let expected = cli["tasks"][task][metric].as_f64().unwrap_or_else(|| panic!("{name} missing in results.json"));
        assert_eq!(*value, expected, "{name}: training loop {value}, icl eval {expected}");
    }
    let in_loop_samples: Vec<serde_json::Value> = results.iter().flat_map(|r| r.samples.clone()).collect();
    let cli_samples = read_jsonl(&samples);
    assert_eq!(in_loop_samples.len(), 2 * LIMIT);
    assert_eq!(in_loop_samples, cli_samples, "per-example log-likelihoods differ");
}
