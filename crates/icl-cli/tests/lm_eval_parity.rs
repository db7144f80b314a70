//! `icl eval` against EleutherAI's lm-evaluation-harness, example by example, on the same model folder,
//! JSONL files and prompt convention (lm-eval runs offline through `scripts/run_lm_eval.sh`).
//!
//! By default a small subset on the tiny model (CI). `cargo xtask parity` runs the full comparison by
//! setting `ICL_PARITY_MODEL` (a folder name under `$ICL_MODELS`, or a path) and `ICL_PARITY_LIMIT`.
//! `ICL_PARITY_LM_EVAL_DIR` reuses an earlier lm-eval output folder of `scripts/run_lm_eval.sh` for
//! the same model and limit instead of running lm-eval again. Requires `cargo xtask setup` (venv with
//! lm-eval, reference models).
//!
//! Tasks: LAMBADA (language modelling), PIQA and HellaSwag (multiple choice), Winograd (schema: each
//! context option scored with the shared continuation, lm-eval's multiple-input mode). lm-eval's
//! `acc_norm` for schema tasks divides by the length of the context options, a different quantity from
//! icl's, so only `acc` predictions are compared there.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// lm-eval task names (see scripts/lm_eval_tasks.py) and the files they read.
const TASKS: [(&str, &str); 4] = [
    ("icl_lambada", "lambada_openai.jsonl"),
    ("icl_piqa", "piqa.jsonl"),
    ("icl_hellaswag", "hellaswag.jsonl"),
    ("icl_winograd", "winograd_wsc.jsonl"),
];
#[derive(Default, Debug)]
struct TaskSummary {
    n: usize,
    max_ll_diff: f64,
    ll_over_tolerance: usize,
    greedy_mismatch: usize,
    pred_mismatch: usize,
    near_ties: usize,
    acc_ours: f64,
    acc_theirs: f64,
}

#[test]
fn per_example_results_match_lm_evaluation_harness() {
    let data = data_dir();
    let model_name = std::env::var("ICL_PARITY_MODEL").unwrap_or_else(|_| "gpt-neo-tiny".into());
    let model = if Path::new(&model_name).is_dir() { PathBuf::from(&model_name) } else { model_dir(&model_name) };
    let limit: usize = std::env::var("ICL_PARITY_LIMIT").map_or(24, |s| s.parse().expect("ICL_PARITY_LIMIT"));
    assert!(model.join("config.json").is_file(), "{}: missing, run `cargo xtask setup`", model.display());

    let tmp = tempfile::tempdir().expect("tempdir");
    let reuse = std::env::var_os("ICL_PARITY_LM_EVAL_DIR").map(PathBuf::from);
    let lm_eval_out = reuse.clone().unwrap_or_else(|| tmp.path().join("lm_eval"));
    let started = std::time::Instant::now();
    if reuse.is_none() {
        run_logged(
            &mut lm_eval_command(&model, &lm_eval_out, limit, &TASKS.map(|(task, _)| task), &data),
            "lm-eval",
            &tmp.path().join("lm_eval.log"),
        );
    }
    let lm_eval_seconds = started.elapsed().as_secs_f64();

    let samples = tmp.path().join("icl_samples.jsonl");
    let started = std::time::Instant::now();
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&model);
    for (task, file) in TASKS {
        icl.arg("--task").arg(format!("{task}={}", data.join(file).display()));
    }
    let output = icl.args(["--limit", &limit.to_string(), "--log-samples"]).arg(&samples).output().expect("run icl");
    assert!(output.status.success(), "icl eval failed: {}", String::from_utf8_lossy(&output.stderr));
    let icl_seconds = started.elapsed().as_secs_f64();

    let mut ours: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for s in read_jsonl(&samples) {
        ours.entry(s["task"].as_str().expect("task").to_owned()).or_default().push(s);
    }

    let mut failures = Vec::new();
    println!(
        "parity on {} ({limit} rows per task): lm-eval {lm_eval_seconds:.1}s, icl {icl_seconds:.1}s",
        model.display()
    );
    for (task, _) in TASKS {
        let theirs = lm_eval_samples(&lm_eval_out, task);
        let mine = &ours[task];
        let mut sum = TaskSummary { n: mine.len(), ..Default::default() };
        assert_eq!(mine.len(), theirs.len(), "{task}: example counts differ");
        for s in mine {
            let index = s["index"].as_u64().expect("index");
            let reference = &theirs[&index]["filtered_resps"];
            if task == "icl_lambada" {
                let (ll, greedy) = (number(&reference[0][0]), boolean(&reference[0][1]));
                let diff = (s["loglik"].as_f64().expect("loglik") - ll).abs();
                sum.max_ll_diff = sum.max_ll_diff.max(diff);
                sum.ll_over_tolerance += usize::from(diff > LL_TOLERANCE);
                let is_greedy = s["is_greedy"].as_bool().expect("is_greedy");
                sum.greedy_mismatch += usize::from(is_greedy != greedy);
                sum.acc_ours += f64::from(u8::from(is_greedy));
                sum.acc_theirs += f64::from(u8::from(greedy));
            } else {
                let lls: Vec<f64> = reference.as_array().expect("choices").iter().map(|c| number(&c[0])).collect();
                let mine_lls: Vec<f64> =
                    s["logliks"].as_array().expect("logliks").iter().map(|v| v.as_f64().expect("ll")).collect();
                assert_eq!(lls.len(), mine_lls.len(), "{task} {index}: choice counts differ");
                for (a, b) in lls.iter().zip(&mine_lls) {
                    let diff = (a - b).abs();
                    sum.max_ll_diff = sum.max_ll_diff.max(diff);
                    sum.ll_over_tolerance += usize::from(diff > LL_TOLERANCE);
                }
                let (their_pred, near_tie) = argmax_and_near_tie(&lls);
                let pred = s["pred"].as_u64().expect("pred") as usize;
                if near_tie {
                    sum.near_ties += 1;
                } else {
                    sum.pred_mismatch += usize::from(pred != their_pred);
                }
                let gold = s["gold"].as_u64().expect("gold") as usize;
                sum.acc_ours += f64::from(u8::from(pred == gold));
                sum.acc_theirs += f64::from(u8::from(their_pred == gold));
                if task == "icl_winograd" {
                    continue;
                }
                // acc_norm divides by the choice's length in characters, as lm-eval does.
                let normalized: Vec<f64> = theirs[&index]["doc"]["choices"]
                    .as_array()
                    .expect("doc choices")
                    .iter()
                    .zip(&lls)
                    .map(|(c, ll)| ll / c.as_str().expect("choice").trim().chars().count() as f64)
                    .collect();
                let (their_pred_norm, near_tie_norm) = argmax_and_near_tie(&normalized);
                let pred_norm = s["pred_norm"].as_u64().expect("pred_norm") as usize;
                if near_tie_norm {
                    sum.near_ties += 1;
                } else {
                    sum.pred_mismatch += usize::from(pred_norm != their_pred_norm);
                }
            }
        }
        let n = sum.n as f64;
        println!(
            "  {task:<14} n={:<5} max|dll|={:.2e} over {LL_TOLERANCE:e}: {}  greedy/pred mismatches: {}  near ties: {}  acc icl {:.4} lm-eval {:.4}",
            sum.n,
            sum.max_ll_diff,
            sum.ll_over_tolerance,
            sum.greedy_mismatch + sum.pred_mismatch,
            sum.near_ties,
            sum.acc_ours / n,
            sum.acc_theirs / n
        );
        if sum.ll_over_tolerance + sum.greedy_mismatch + sum.pred_mismatch > 0 {
            failures.push(format!("{task}: {sum:?}"));
        }
    }
    assert!(failures.is_empty(), "parity failures: {failures:#?}");
}
