//! Generation tasks against transformers: `icl eval` on TriviaQA (1-shot, the 32-row sample) dumps
//! its prompts with `--write-prompts`; `scripts/generate_reference.py` runs transformers' greedy
//! `generate` on the same prompts (same length cap, same stop sequences, one prompt at a time); the
//! outputs must be identical for at least 99% of the examples and exact match must agree.
//!
//! The tiny random GPT-2 never writes a newline, so its outputs run to the length cap: a long greedy
//! path through the cache. `ICL_GEN_PARITY_MODEL=DIR` (and `ICL_GEN_PARITY_SHOTS=N`) runs the same
//! check on another model, e.g. SmolLM2-135M-Instruct. Requires `cargo xtask setup`.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().expect(what);
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn generated_answers_match_transformers_generate() {
    let model = env_dir("ICL_GEN_PARITY_MODEL", || models_dir().join("gpt2-tiny"));
    let shots = std::env::var("ICL_GEN_PARITY_SHOTS").unwrap_or_else(|_| "1".into());
    let python = venv_python();
    assert!(model.join("config.json").is_file(), "{}: missing, run `cargo xtask setup`", model.display());
    let task = data_dir().join("triviaqa_small.jsonl");
    assert!(task.is_file(), "{}: missing", task.display());

    let dir = tempfile::tempdir().expect("tempdir");
    let (prompts, samples, reference) =
        (dir.path().join("prompts.jsonl"), dir.path().join("samples.jsonl"), dir.path().join("reference.jsonl"));
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&model).arg("--task").arg(format!("triviaqa={}", task.display()));
    icl.args(["--num-fewshot", &shots, "--write-prompts"]).arg(&prompts).arg("--log-samples").arg(&samples);
    run(&mut icl, "icl eval");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/generate_reference.py");
    run(
        Command::new(&python).arg(script).arg("prompts").arg(&model).arg(&prompts).arg(&reference),
        "generate_reference.py",
    );

    let prompt_lines = read_jsonl(&prompts);
    let ours = read_jsonl(&samples);
    let theirs: BTreeMap<u64, Value> =
        read_jsonl(&reference).into_iter().map(|v| (v["index"].as_u64().expect("index"), v)).collect();
    assert_eq!(ours.len(), 32);
    assert_eq!(theirs.len(), ours.len());
    let (mut identical, mut our_correct, mut their_correct) = (0, 0, 0);
    let mut differing = Vec::new();
    for (line, prompt) in ours.iter().zip(&prompt_lines) {
        let index = line["index"].as_u64().expect("index");
        assert_eq!(prompt["index"].as_u64(), Some(index));
        let reference = &theirs[&index];
        let output = line["output"].as_str().expect("output");
        let answers: Vec<String> = serde_json::from_value(prompt["targets"].clone()).expect("answers");
        let correct = icl_metrics::exact_match(reference["output"].as_str().expect("output"), &answers);
        our_correct += usize::from(line["correct"].as_bool().expect("correct"));
        their_correct += usize::from(correct);
        if output == reference["output"] {
            identical += 1;
        } else {
            differing.push(format!("{index}: {output:?} vs {:?}", reference["output"]));
        }
    }
    let n = ours.len();
    let rate = identical as f64 / n as f64;
    println!(
        "{}, {shots}-shot: {identical}/{n} identical outputs ({:.1}%); exact match {:.4} (icl) vs {:.4} (transformers)",
        model.display(),
        100.0 * rate,
        our_correct as f64 / n as f64,
        their_correct as f64 / n as f64
    );
    for d in &differing {
        println!("  differs: {d}");
    }
    assert!(rate >= 0.99, "only {identical}/{n} outputs identical:\n{}", differing.join("\n"));
    assert_eq!(our_correct, their_correct, "exact match differs");
    // The outputs are the model's, not empty: the test would pass vacuously otherwise.
    assert!(ours.iter().any(|l| l["n_tokens"].as_u64() > Some(0)));
}
