//! Few-shot prompts against references: the exact prompts of 5-shot LAMBADA and PIQA (dumped by
//! `--write-prompts`) scored by lm-evaluation-harness as zero-shot tasks
//! (`scripts/lm_eval_prompt_tasks.py`), and the Winograd schema task against a direct transformers
//! computation (`scripts/schema_reference.py`). Per example: log-likelihoods within 1e-3, the same
//! greedy flags and predictions (except near ties). Requires `cargo xtask setup`.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

const ROWS: &str = "24";

/// Compares choice log-likelihoods; returns (max |diff|, failures).
fn compare_choices(task: &str, index: u64, ours: &Value, theirs: &[f64], failures: &mut Vec<String>) -> f64 {
    let mine: Vec<f64> = ours["logliks"].as_array().expect("logliks").iter().map(number).collect();
    assert_eq!(mine.len(), theirs.len(), "{task} {index}: option counts differ");
    let worst = mine.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    if worst > LL_TOLERANCE {
        failures.push(format!("{task} {index}: log-likelihoods {mine:?} vs {theirs:?}"));
    }
    let (pred, near_tie) = argmax_and_near_tie(theirs);
    if !near_tie && ours["pred"].as_u64() != Some(pred as u64) {
        failures.push(format!("{task} {index}: prediction {} vs {pred}", ours["pred"]));
    }
    worst
}

#[test]
fn few_shot_and_schema_results_match_references() {
    let (model, python, data) = (tiny_model(), venv_python(), data_dir());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (prompts, samples) = (tmp.path().join("prompts.jsonl"), tmp.path().join("samples.jsonl"));

    // icl: 5-shot LAMBADA and PIQA, zero-shot Winograd (and 2-shot, to cover the schema preamble).
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&model);
    for (name, file) in [("lambada", "lambada_openai.jsonl"), ("piqa", "piqa.jsonl")] {
        icl.arg("--task").arg(format!("{name}={}", data.join(file).display()));
    }
    icl.args(["--num-fewshot", "5", "--limit", ROWS, "--write-prompts"])
        .arg(&prompts)
        .arg("--log-samples")
        .arg(&samples);
    run_logged(&mut icl, "icl eval (5-shot)", &tmp.path().join("icl.log"));
    let (wsc_prompts, wsc_samples) = (tmp.path().join("wsc_prompts.jsonl"), tmp.path().join("wsc_samples.jsonl"));
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&model);
    let suite = tmp.path().join("wsc.yaml");
    std::fs::write(
        &suite,
        "icl_tasks:\n- label: wsc\n  dataset_uri: winograd_wsc.jsonl\n  num_fewshot: [0, 2]\n  icl_task_type: schema\n",
    )
    .expect("suite");
    icl.arg("--suite").arg(&suite).arg("--data-dir").arg(&data);
    icl.args(["--limit", ROWS, "--write-prompts"]).arg(&wsc_prompts).arg("--log-samples").arg(&wsc_samples);
    run_logged(&mut icl, "icl eval (schema)", &tmp.path().join("icl_wsc.log"));

    // lm-eval on the same prompts.
    let tasks_dir = tmp.path().join("tasks");
    run_logged(
        Command::new(&python)
            .arg(workspace_dir().join("scripts/lm_eval_prompt_tasks.py"))
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(&tasks_dir),
        "lm_eval_prompt_tasks.py",
        &tmp.path().join("tasks.log"),
    );
    let lm_eval_out = tmp.path().join("lm_eval");
    run_logged(
        Command::new(&python)
            .args(["-m", "lm_eval", "--model", "hf", "--model_args"])
            .arg(format!("pretrained={},dtype=float32", model.display()))
            .args(["--tasks", "iclp_lambada,iclp_piqa", "--include_path"])
            .arg(&tasks_dir)
            .args(["--device", "cpu", "--batch_size", "8", "--log_samples", "--output_path"])
            .arg(&lm_eval_out)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false"),
        "lm-eval",
        &tmp.path().join("lm_eval.log"),
    );
    // Schema reference.
    let reference = tmp.path().join("wsc_reference.jsonl");
    run_logged(
        Command::new(&python)
            .arg(workspace_dir().join("scripts/schema_reference.py"))
            .arg(&model)
            .arg(&wsc_prompts)
            .arg(&reference),
        "schema_reference.py",
        &tmp.path().join("reference.log"),
    );

    let mut ours: BTreeMap<(String, u64), Value> = BTreeMap::new();
    for s in read_jsonl(&samples).into_iter().chain(read_jsonl(&wsc_samples)) {
        ours.insert((s["task"].as_str().expect("task").to_owned(), s["index"].as_u64().expect("index")), s);
    }
    let mut failures = Vec::new();
    for (task, lm_task) in [("lambada", "iclp_lambada"), ("piqa", "iclp_piqa")] {
        let prefix = format!("samples_{lm_task}_");
        let file = std::fs::read_dir(&lm_eval_out)
            .expect("lm-eval output")
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
            .unwrap_or_else(|| panic!("no lm-eval samples for {lm_task}"));
        let theirs = read_jsonl(&file);
        assert_eq!(theirs.len(), ROWS.parse::<usize>().expect("rows"), "{task}");
        let mut worst = 0f64;
        for t in &theirs {
            // lm-eval's doc is the dumped prompt line, so its `index` is the row.
            let index = t["doc"]["index"].as_u64().expect("index");
            let mine = &ours[&(task.to_owned(), index)];
            let resps = t["filtered_resps"].as_array().expect("filtered_resps");
            if task == "lambada" {
                let (ll, greedy) = (number(&resps[0][0]), boolean(&resps[0][1]));
                let diff = (mine["loglik"].as_f64().expect("loglik") - ll).abs();
                worst = worst.max(diff);
                if diff > LL_TOLERANCE || mine["is_greedy"].as_bool() != Some(greedy) {
                    failures.push(format!("{task} {index}: {mine} vs ({ll}, {greedy})"));
                }
            } else {
                let lls: Vec<f64> = resps.iter().map(|c| number(&c[0])).collect();
                worst = worst.max(compare_choices(task, index, mine, &lls, &mut failures));
            }
        }
        println!("{task} 5-shot vs lm-eval: {} examples, max |dll| {worst:.2e}", theirs.len());
    }
    let reference = read_jsonl(&reference);
    assert_eq!(reference.len(), 2 * ROWS.parse::<usize>().expect("rows"));
    let mut worst = 0f64;
    for r in &reference {
        let key = (r["task"].as_str().expect("task").to_owned(), r["index"].as_u64().expect("index"));
        let lls: Vec<f64> = r["logliks"].as_array().expect("logliks").iter().map(number).collect();
        worst = worst.max(compare_choices(&key.0, key.1, &ours[&key], &lls, &mut failures));
    }
    println!("winograd schema vs transformers: {} examples, max |dll| {worst:.2e}", reference.len());
    assert!(failures.is_empty(), "mismatches: {failures:#?}");
}
