//! Helpers shared by the integration tests of the `icl` binary (each test file is its own crate; not
//! every one uses all). The fixture folders and JSONL reader come from `icl-test-support`.
#![allow(dead_code, unused_imports)]

pub use icl_test_support::{data_dir, env_dir, model_dir, models_dir, read_jsonl, venv_python, workspace_dir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Log-likelihoods of icl and of a reference (lm-eval, transformers) must agree within this.
pub const LL_TOLERANCE: f64 = 1e-3;
/// Options whose reference log-likelihoods are this close are a near tie: predictions may differ.
pub const TIE_TOLERANCE: f64 = 1e-4;

/// The tiny reference GPT-Neo.
pub fn tiny_model() -> std::path::PathBuf {
    model_dir("gpt-neo-tiny")
}

/// `icl eval` arguments for the multi-rank tests: four task types (generation too), `limit` rows each
/// in small batches, so that the batch count does not divide by the rank count and the last batches
/// are uneven; results and samples go to `out`.
pub fn four_task_args(model: &str, out: &Path, limit: usize) -> Vec<String> {
    let data = data_dir();
    let task = |name: &str, file: &str| format!("{name}={}", data.join(file).display());
    let mut args: Vec<String> = vec!["eval".into(), "--quiet".into(), "--threads".into(), "1".into()];
    args.extend(["--limit".into(), limit.to_string(), "--batch-tokens".into(), "1024".into()]);
    args.extend(["--model".into(), models_dir().join(model).display().to_string()]);
    for (name, file) in [
        ("lambada", "lambada_openai.jsonl"),
        ("piqa", "piqa.jsonl"),
        ("winograd", "winograd_wsc.jsonl"),
        ("triviaqa", "triviaqa_small.jsonl"),
    ] {
        args.extend(["--task".into(), task(name, file)]);
    }
    args.extend(["--output".into(), out.join("results.json").display().to_string()]);
    args.extend(["--log-samples".into(), out.join("samples.jsonl").display().to_string()]);
    args
}

/// `mpirun -np ranks icl`, arguments to follow.
pub fn mpirun(ranks: usize) -> Command {
    let mut cmd = icl_test_support::mpirun(ranks);
    cmd.arg(env!("CARGO_BIN_EXE_icl"));
    cmd
}

/// A number in lm-eval's output (its `filtered_resps` hold strings such as "-1.25", or numbers).
pub fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().expect("numeric string"),
        v => v.as_f64().expect("number"),
    }
}

/// A boolean in lm-eval's output ("True"/"False", or a boolean).
pub fn boolean(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "True",
        v => v.as_bool().expect("boolean"),
    }
}

/// Index of the maximum (first on ties), and whether the runner-up is within `TIE_TOLERANCE`.
pub fn argmax_and_near_tie(values: &[f64]) -> (usize, bool) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    (order[0], values.len() > 1 && values[order[0]] - values[order[1]] <= TIE_TOLERANCE)
}

/// results.json less what depends on timing.
pub fn results_without_timing(path: &Path) -> Value {
    let mut results: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).expect("results.json");
    for (_, task) in results["tasks"].as_object_mut().expect("tasks").iter_mut() {
        let task = task.as_object_mut().expect("task");
        for timing in ["seconds", "tokens_per_second", "gflops_per_second"] {
            assert!(task.remove(timing).is_some(), "{timing} missing");
        }
    }
    results
}

/// Runs `cmd` with its stdout in `log.out` and its stderr in `log`; a failure panics with the log's
/// last 30 lines, naming `what`.
pub fn run_logged(cmd: &mut Command, what: &str, log: &Path) {
    let status = cmd
        .stdout(std::fs::File::create(log.with_extension("out")).expect("log"))
        .stderr(std::fs::File::create(log).expect("log"))
        .status()
        .expect(what);
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        panic!("{what} failed:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
}

/// `scripts/run_lm_eval.sh MODEL OUT LIMIT TASKS` (lm-eval on the icl_* task YAMLs of `data`, the venv's
/// Python); callers add the script's other variables (`NUM_FEWSHOT`, `LM_EVAL_ARGS`) and run it with
/// [`run_logged`].
pub fn lm_eval_command(model: &Path, out: &Path, limit: usize, tasks: &[&str], data: &Path) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_dir().join("scripts/run_lm_eval.sh"))
        .arg(model)
        .arg(out)
        .arg(limit.to_string())
        .arg(tasks.join(","))
        .env("PY", venv_python())
        .env("DATA_DIR", data);
    cmd
}

/// The files lm-eval wrote under its output folder `out` (one folder per model, holding `results_*`
/// and `samples_*` files); none when `out` does not exist.
pub fn lm_eval_output_files(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|model_dir| std::fs::read_dir(model_dir.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect()
}

/// Whether `path`'s file name starts with `prefix`.
pub fn named_like(path: &Path, prefix: &str) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix))
}

/// lm-eval's `--log_samples` of `task` under its output folder `out`, keyed by doc id.
pub fn lm_eval_samples(out: &Path, task: &str) -> BTreeMap<u64, Value> {
    let prefix = format!("samples_{task}_");
    let file = lm_eval_output_files(out)
        .into_iter()
        .find(|p| named_like(p, &prefix))
        .unwrap_or_else(|| panic!("no lm-eval samples for {task} in {}", out.display()));
    read_jsonl(&file).into_iter().map(|s| (s["doc_id"].as_u64().expect("doc_id"), s)).collect()
}
