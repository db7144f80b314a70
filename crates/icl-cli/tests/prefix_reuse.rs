//! Prefix reuse: a token prefix that every request of a task shares (here a fixed preamble before
//! every prompt, as a fixed set of shots is) is computed once, for scoring (language modelling,
//! multiple choice) and for generation. Each example's results must be those of computing every
//! request whole (`--no-prefix-reuse`): the same log-likelihoods within rounding, the same
//! predictions, identical generated text. Llama-tiny (grouped-query attention: decoding attends to
//! the shared prefix apart from each row's own keys) and GPT-Neo-tiny (local attention windows
//! across the prefix; its attention takes the prefix copied out per row). Requires `cargo xtask setup`.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Longer than the shortest prefix worth computing once (32 tokens) on either tokenizer.
const PREAMBLE: &str = "The following are questions and passages from many fields, each followed by its answer. \
    Read every one with care, think about what is asked and what the text before it says, and then \
    give the single best answer that completes it, without any further explanation.\n";

fn eval(model: &str, out: &Path, reuse: bool) -> String {
    run_icl(Command::new(env!("CARGO_BIN_EXE_icl")), model, out, reuse, &[])
}

/// `icl eval` through `cmd` (the binary, or a launcher before it) on the three tasks, `extra` options
/// last.
fn run_icl(mut cmd: Command, model: &str, out: &Path, reuse: bool, extra: &[&str]) -> String {
    let data = data_dir();
    let task = |name: &str, file: &str| format!("{name}={}", data.join(file).display());
    cmd.args(["eval", "--quiet", "--threads", "1", "--limit", "8", "--batch-tokens", "2048", "--max-new-tokens", "24"]);
    cmd.arg("--model").arg(models_dir().join(model)).arg("--prompt-string").arg(PREAMBLE);
    for (name, file) in
        [("lambada", "lambada_openai.jsonl"), ("piqa", "piqa.jsonl"), ("triviaqa", "triviaqa_small.jsonl")]
    {
        cmd.arg("--task").arg(task(name, file));
    }
    cmd.arg("--log-samples").arg(out);
    if !reuse {
        cmd.arg("--no-prefix-reuse");
    }
    cmd.args(extra);
    let output = cmd.output().expect("run icl");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "icl eval {model} (reuse {reuse}) failed:\n{stderr}");
    stderr
}

/// Numbers within `LL_TOLERANCE / 10` (a thousandth of what a peer may differ by is float rounding
/// here), everything else equal.
fn assert_same(ours: &Value, theirs: &Value, at: &str) {
    match (ours, theirs) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            assert!((a - b).abs() <= LL_TOLERANCE / 10.0 * a.abs().max(1.0), "{at}: {a} vs {b}");
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_same(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{at}");
            for (key, x) in a {
                assert_same(x, &b[key], &format!("{at}.{key}"));
            }
        }
        _ => assert_eq!(ours, theirs, "{at}"),
    }
}

#[test]
fn a_shared_prefix_computed_once_scores_and_generates_as_whole_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    for model in ["llama-tiny", "gpt-neo-tiny"] {
        let (with, without) =
            (dir.path().join(format!("{model}-with.jsonl")), dir.path().join(format!("{model}-without.jsonl")));
        let told = eval(model, &with, true);
        // The run says what it computed once, for each task type.
        for task in ["lambada", "piqa", "triviaqa"] {
            assert!(
                told.contains(&format!("{task}: the ")) && told.contains("prefix that every"),
                "{model} {task}:\n{told}"
            );
        }
        let silent = eval(model, &without, false);
        assert!(!silent.contains("prefix that every"), "{model}: --no-prefix-reuse still reused:\n{silent}");
        let (ours, theirs) = (read_jsonl(&with), read_jsonl(&without));
        assert_eq!(ours.len(), 3 * 8, "{model}");
        assert_eq!(ours.len(), theirs.len(), "{model}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_same(a, b, &format!("{model} sample {i}"));
        }
    }
}

/// Data parallel and sharded parameters keep prefix reuse on: two ranks under `mpirun`, each
/// computing the prefix for its own batches, with `--shard-params` (the prefix's forward pass is
/// collective like any other), give the one-rank results and samples bit for bit.
#[cfg(feature = "mpi")]
#[test]
fn prefix_reuse_on_two_sharded_ranks_equals_one_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = "llama-tiny";
    let (one, two) = (dir.path().join("one.jsonl"), dir.path().join("two.jsonl"));
    eval(model, &one, true);
    let told = run_icl(mpirun(2), model, &two, true, &["--shard-params"]);
    assert!(told.contains("prefix that every"), "{told}");
    assert_eq!(std::fs::read_to_string(&two).expect("samples"), std::fs::read_to_string(&one).expect("samples"));
}
