//! The peers' few-shot samplers end to end in `icl eval`:
//! - `--fewshot-sampler lm-eval --num-fewshot 5` against lm-evaluation-harness itself (the venv's
//!   lm-eval, `--num_fewshot 5` on the project's task YAMLs with `fewshot_split: test`, through
//!   `scripts/run_lm_eval.sh`): per example the same context strings and targets, log-likelihoods
//!   within 1e-3, the same greedy flags and predictions outside near ties;
//! - `--fewshot-sampler llm-foundry` (and a suite's default): the `shots` of `--write-prompts` against
//!   llm-foundry 0.22.0's `get_fewshot_sample_idxs` run by CPython (`scripts/peer_fewshot_reference.py`).
//!
//! The lm-eval comparison runs on 200 rows of LAMBADA, PIQA and HellaSwag with the tiny model by
//! default; `ICL_PARITY_MODEL` (a folder under `$ICL_MODELS` or a path) and `ICL_PARITY_LIMIT` change
//! them, `ICL_PARITY_LM_EVAL_MODEL` gives lm-eval another folder of the same model (default: the same).
//! `ICL_PARITY_LM_EVAL_OUT` keeps lm-eval's output in a folder of your choice; a folder that already holds
//! a finished run of `scripts/run_lm_eval.sh` with these arguments is compared again without rerunning
//! lm-eval (hours on a CPU at 500 rows of SmolLM2).
//! Requires `cargo xtask setup` (venv with lm-eval, reference models, llm-foundry's wheel).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// lm-eval task names (scripts/lm_eval_tasks.py), their files and icl's names for them.
const TASKS: [(&str, &str); 3] =
    [("icl_lambada", "lambada_openai.jsonl"), ("icl_piqa", "piqa.jsonl"), ("icl_hellaswag", "hellaswag.jsonl")];
const SHOTS: &str = "5";

fn model_from_env(var: &str, default: &str) -> PathBuf {
    let name = std::env::var(var).unwrap_or_else(|_| default.into());
    if Path::new(&name).is_dir() {
        PathBuf::from(name)
    } else {
        model_dir(&name)
    }
}

/// The (context, continuation) pairs of one lm-eval sample, in request order.
fn lm_eval_requests(sample: &Value) -> Vec<(String, String)> {
    let args = sample["arguments"].as_object().expect("arguments");
    (0..args.len())
        .map(|i| {
            let a = &args[&format!("gen_args_{i}")];
            (a["arg_0"].as_str().expect("arg_0").to_owned(), a["arg_1"].as_str().expect("arg_1").to_owned())
        })
        .collect()
}

#[derive(Default, Debug)]
struct Summary {
    n: usize,
    context_mismatch: usize,
    max_ll_diff: f64,
    ll_over_tolerance: usize,
    greedy_or_pred_mismatch: usize,
    near_ties: usize,
    acc_ours: f64,
    acc_theirs: f64,
}

/// Whether `out` holds a finished lm-eval run of `model` with `limit` rows and this test's shots and tasks
/// (its results file records them), so that its samples can be compared again.
fn finished_lm_eval_run(out: &Path, model: &Path, limit: usize) -> bool {
    let results = lm_eval_output_files(out).into_iter().filter(|p| named_like(p, "results_"));
    results.filter_map(|p| serde_json::from_str::<Value>(&std::fs::read_to_string(p).ok()?).ok()).any(|r| {
        let config = &r["config"];
        config["model_args"]["pretrained"].as_str() == model.to_str()
            && config["limit"].as_f64() == Some(limit as f64)
            && TASKS.iter().all(|(task, _)| r["n-shot"][task].as_u64().map(|n| n.to_string()).as_deref() == Some(SHOTS))
    })
}

#[test]
fn lm_eval_sampler_matches_lm_eval_five_shot() {
    let data = data_dir();
    let model = model_from_env("ICL_PARITY_MODEL", "gpt-neo-tiny");
    let lm_eval_model = std::env::var_os("ICL_PARITY_LM_EVAL_MODEL")
        .map_or_else(|| model.clone(), |_| model_from_env("ICL_PARITY_LM_EVAL_MODEL", ""));
    let limit: usize = std::env::var("ICL_PARITY_LIMIT").map_or(200, |s| s.parse().expect("ICL_PARITY_LIMIT"));
    let tmp = tempfile::tempdir().expect("tempdir");

    let lm_eval_out =
        std::env::var_os("ICL_PARITY_LM_EVAL_OUT").map_or_else(|| tmp.path().join("lm_eval"), PathBuf::from);
    let started = std::time::Instant::now();
    let lm_eval_reused = finished_lm_eval_run(&lm_eval_out, &lm_eval_model, limit);
    if !lm_eval_reused {
        run_logged(
            lm_eval_command(&lm_eval_model, &lm_eval_out, limit, &TASKS.map(|(task, _)| task), &data)
                .env("NUM_FEWSHOT", SHOTS),
            "lm-eval",
            &tmp.path().join("lm_eval.log"),
        );
    }
    let lm_eval_seconds = started.elapsed().as_secs_f64();

    let (prompts, samples) = (tmp.path().join("prompts.jsonl"), tmp.path().join("samples.jsonl"));
    let started = std::time::Instant::now();
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&model);
    for (task, file) in TASKS {
        icl.arg("--task").arg(format!("{task}={}", data.join(file).display()));
    }
    icl.args(["--fewshot-sampler", "lm-eval", "--num-fewshot", SHOTS, "--limit", &limit.to_string()])
        .arg("--write-prompts")
        .arg(&prompts)
        .arg("--log-samples")
        .arg(&samples);
    run_logged(&mut icl, "icl eval", &tmp.path().join("icl.log"));
    let icl_seconds = started.elapsed().as_secs_f64();

    let key = |v: &Value| (v["task"].as_str().expect("task").to_owned(), v["index"].as_u64().expect("index"));
    let ours: BTreeMap<_, _> = read_jsonl(&samples).into_iter().map(|s| (key(&s), s)).collect();
    let our_prompts: BTreeMap<_, _> = read_jsonl(&prompts).into_iter().map(|p| (key(&p), p)).collect();
    let lm_eval_time = if lm_eval_reused {
        format!("reused from {}", lm_eval_out.display())
    } else {
        format!("{lm_eval_seconds:.1}s")
    };
    println!(
        "{SHOTS}-shot lm-eval sampler parity on {} ({limit} rows per task): lm-eval {lm_eval_time}, icl {icl_seconds:.1}s",
        model.display()
    );
    let mut failures = Vec::new();
    for (task, _) in TASKS {
        let theirs = lm_eval_samples(&lm_eval_out, task);
        assert_eq!(theirs.len(), limit, "{task}: lm-eval evaluated {} docs", theirs.len());
        let mut sum = Summary::default();
        for (&index, t) in &theirs {
            let k = (task.to_owned(), index);
            let (mine, prompt) = (&ours[&k], &our_prompts[&k]);
            sum.n += 1;
            assert_eq!(prompt["shots"].as_array().map(Vec::len), Some(5), "{task} {index}: {prompt}");
            // The exact strings lm-eval scored: its contexts hold the shots it drew.
            let requests = lm_eval_requests(t);
            let context = prompt["context"].as_str().expect("context");
            let targets: Vec<&str> =
                prompt["targets"].as_array().expect("targets").iter().flat_map(Value::as_str).collect();
            let same = requests.len() == targets.len()
                && requests.iter().zip(&targets).all(|((c, t), target)| c == context && t == target);
            if !same {
                sum.context_mismatch += 1;
                if sum.context_mismatch <= 2 {
                    failures.push(format!("{task} {index}: icl {context:?} {targets:?} vs lm-eval {requests:?}"));
                }
            }
            let resps = t["filtered_resps"].as_array().expect("filtered_resps");
            if task == "icl_lambada" {
                let (ll, greedy) = (number(&resps[0][0]), boolean(&resps[0][1]));
                let diff = (mine["loglik"].as_f64().expect("loglik") - ll).abs();
                sum.max_ll_diff = sum.max_ll_diff.max(diff);
                sum.ll_over_tolerance += usize::from(diff > LL_TOLERANCE);
                let is_greedy = mine["is_greedy"].as_bool().expect("is_greedy");
                sum.greedy_or_pred_mismatch += usize::from(is_greedy != greedy);
                sum.acc_ours += f64::from(u8::from(is_greedy));
                sum.acc_theirs += f64::from(u8::from(greedy));
            } else {
                let lls: Vec<f64> = resps.iter().map(|c| number(&c[0])).collect();
                let mine_lls: Vec<f64> = mine["logliks"].as_array().expect("logliks").iter().map(number).collect();
                assert_eq!(lls.len(), mine_lls.len(), "{task} {index}: choice counts differ");
                for (a, b) in lls.iter().zip(&mine_lls) {
                    sum.max_ll_diff = sum.max_ll_diff.max((a - b).abs());
                    sum.ll_over_tolerance += usize::from((a - b).abs() > LL_TOLERANCE);
                }
                let (their_pred, near_tie) = argmax_and_near_tie(&lls);
                let pred = mine["pred"].as_u64().expect("pred") as usize;
                if near_tie {
                    sum.near_ties += 1;
                } else {
                    sum.greedy_or_pred_mismatch += usize::from(pred != their_pred);
                }
                let gold = mine["gold"].as_u64().expect("gold") as usize;
                sum.acc_ours += f64::from(u8::from(pred == gold));
                sum.acc_theirs += f64::from(u8::from(their_pred == gold));
            }
        }
        let n = sum.n as f64;
        println!(
            "  {task:<14} n={:<4} contexts differ: {}  max|dll|={:.2e} over {LL_TOLERANCE:e}: {}  greedy/pred mismatches: {}  near ties: {}  acc icl {:.4} lm-eval {:.4}",
            sum.n,
            sum.context_mismatch,
            sum.max_ll_diff,
            sum.ll_over_tolerance,
            sum.greedy_or_pred_mismatch,
            sum.near_ties,
            sum.acc_ours / n,
            sum.acc_theirs / n
        );
        if sum.context_mismatch + sum.ll_over_tolerance + sum.greedy_or_pred_mismatch > 0 {
            failures.push(format!("{task}: {sum:?}"));
        }
    }
    assert!(failures.is_empty(), "parity failures: {failures:#?}");
}

/// llm-foundry's shots of every example of datasets of `sizes` rows, `(n, k, seed)` each, from its
/// own `get_fewshot_sample_idxs` run by CPython; also how many `rng.choice` redraws happened.
fn llm_foundry_reference(cases: &[(usize, usize, u64)]) -> Vec<(Vec<Vec<usize>>, u64)> {
    let input: Vec<String> =
        cases.iter().map(|(n, k, seed)| format!(r#"{{"n":{n},"k":{k},"seed":"{seed}"}}"#)).collect();
    let out = icl_test_support::llm_foundry_reference(
        "peer_fewshot_reference.py",
        &format!(r#"{{"llm_foundry":[{}]}}"#, input.join(",")),
    );
    out["llm_foundry"]
        .as_array()
        .expect("llm_foundry")
        .iter()
        .map(|c| {
            let shots = c["shots"]
                .as_array()
                .expect("shots")
                .iter()
                .map(|s| s.as_array().expect("row").iter().map(|r| r.as_u64().expect("row") as usize).collect())
                .collect();
            (shots, c["choice_calls"].as_u64().expect("choice_calls"))
        })
        .collect()
}

#[test]
fn llm_foundry_sampler_shows_llm_foundrys_shots() {
    let data = data_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Small files: n <= k + 1 (every other row is a shot), one row (no shots), two rows.
    let piqa = std::fs::read_to_string(data.join("piqa.jsonl")).expect("piqa");
    for rows in [1, 2, 4, 6] {
        let text: String = piqa.lines().take(rows).map(|l| format!("{l}\n")).collect();
        std::fs::write(tmp.path().join(format!("piqa{rows}.jsonl")), text).expect("write");
    }
    // (label, file, rows of the file, shots, seed): a suite's tasks, sampler left to the suite default.
    let lambada_rows = std::fs::read_to_string(data.join("lambada_openai.jsonl")).expect("lambada").lines().count();
    let piqa_rows = piqa.lines().count();
    let lambada = data.join("lambada_openai.jsonl").display().to_string();
    let piqa_path = data.join("piqa.jsonl").display().to_string();
    let tiny = |rows: usize| tmp.path().join(format!("piqa{rows}.jsonl")).display().to_string();
    let tasks: Vec<(String, String, usize, usize, u64)> = vec![
        ("lambada".into(), lambada, lambada_rows, 5, 1234),
        ("piqa".into(), piqa_path.clone(), piqa_rows, 3, 0),
        ("piqa_seed7".into(), piqa_path, piqa_rows, 10, 987_654_321_987),
        ("tiny1".into(), tiny(1), 1, 5, 1234),
        ("tiny2".into(), tiny(2), 2, 1, 5),
        ("tiny4".into(), tiny(4), 4, 5, 1234),
        ("tiny6".into(), tiny(6), 6, 5, 42),
    ];
    let mut suite = String::from("icl_tasks:\n");
    for (label, file, _, k, seed) in &tasks {
        let kind = if label == "lambada" { "language_modeling" } else { "multiple_choice" };
        suite += &format!(
            "- label: {label}\n  dataset_uri: {file}\n  num_fewshot: [{k}]\n  icl_task_type: {kind}\n  fewshot_random_seed: {seed}\n"
        );
    }
    let suite_path = tmp.path().join("suite.yaml");
    std::fs::write(&suite_path, suite).expect("suite");
    let limit = 40;
    let prompts = tmp.path().join("prompts.jsonl");
    run_logged(
        Command::new(env!("CARGO_BIN_EXE_icl"))
            .args(["eval", "--quiet", "--model"])
            .arg(tiny_model())
            .arg("--suite")
            .arg(&suite_path)
            .args(["--limit", &limit.to_string(), "--write-prompts"])
            .arg(&prompts),
        "icl eval --suite",
        &tmp.path().join("icl.log"),
    );
    // The flag on a --task run: the same shots as the suite's default for the same seed.
    let flag_prompts = tmp.path().join("flag_prompts.jsonl");
    run_logged(
        Command::new(env!("CARGO_BIN_EXE_icl"))
            .args(["eval", "--quiet", "--model"])
            .arg(tiny_model())
            .arg("--task")
            .arg(format!("tiny6={}", tiny(6)))
            .args(["--fewshot-sampler", "llm-foundry", "--num-fewshot", "5", "--fewshot-seed", "42"])
            .arg("--write-prompts")
            .arg(&flag_prompts),
        "icl eval --fewshot-sampler llm-foundry",
        &tmp.path().join("icl_flag.log"),
    );

    let cases: Vec<(usize, usize, u64)> = tasks.iter().map(|t| (t.2, t.3, t.4)).collect();
    let reference = llm_foundry_reference(&cases);
    let mut written: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for p in read_jsonl(&prompts) {
        written.entry(p["task"].as_str().expect("task").to_owned()).or_default().push(p);
    }
    let shots_of = |p: &Value| -> Vec<usize> {
        p["shots"].as_array().expect("shots").iter().map(|r| r.as_u64().expect("row") as usize).collect()
    };
    let mut redraws = 0;
    for ((label, _, rows, k, _), (expected, choice_calls)) in tasks.iter().zip(&reference) {
        let name = format!("{label}/{k}-shot");
        let lines = &written[&name];
        assert_eq!(lines.len(), limit.min(*rows), "{name}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["index"].as_u64(), Some(i as u64), "{name}");
            assert_eq!(shots_of(line), expected[i], "{name} row {i}");
        }
        // The shots appear in the prompt, in that order.
        if label != "lambada" {
            let piqa_rows: Vec<Value> = read_jsonl(&data.join("piqa.jsonl"));
            let line = &lines[lines.len() - 1];
            let context = line["context"].as_str().expect("context");
            let mut at = 0;
            for row in shots_of(line) {
                let query = piqa_rows[row]["query"].as_str().expect("query").trim();
                let found = context[at..].find(query).unwrap_or_else(|| panic!("{name}: shot {row} not in order"));
                at += found + query.len();
            }
        }
        // Redraws (an example that drew itself) among the evaluated rows are covered when they occur.
        redraws += choice_calls;
    }
    assert!(redraws > 0, "no case drew the example itself");
    let flag = read_jsonl(&flag_prompts);
    assert_eq!(
        flag.iter().map(shots_of).collect::<Vec<_>>(),
        written["tiny6/5-shot"].iter().map(shots_of).collect::<Vec<_>>()
    );
}
