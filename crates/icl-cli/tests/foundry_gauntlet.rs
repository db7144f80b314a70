//! llm-foundry's eval gauntlet v0.3, unchanged, against llm-foundry 0.22.0's own code
//! (`scripts/foundry_gauntlet_reference.py` imports the release's source files):
//! - the prompts of every v0.3 task that has data (chain of thought, `question_prelimiter`,
//!   per-task delimiters, `has_categories` partitions), with the shots icl draws, the accepted
//!   answers and the generation length cap;
//! - exact-match scoring (`cot_delimiter`, `do_normalization: false`, stop strings);
//! - gauntlet scores: the v0.3 gauntlet under each weighting, with and without missing benchmarks,
//!   with categories averaged, and llm-foundry's refusals;
//! - `icl eval --suite tasks_v0.3.yaml --gauntlet eval_gauntlet_v0.3.yaml --skip-missing` end to end
//!   on a few rows: `results.json`'s categories, averages, skipped tasks and per-category results.
//!
//! Needs `cargo xtask setup` (the venv, llm-foundry's wheel, SmolLM2's tokenizer) and the shared
//! llm-foundry data (`$ICL_FOUNDRY_DATA`, else `llm-foundry` next to `$ICL_DATA`).

mod common;

use common::*;
use icl_data::{prompts, read_task, Suite, SuiteOptions, TaskKind, TaskOutcome, Weighting};
use icl_metrics::{answer_matches, cot_answer, cut_at_stop};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Rows per task whose prompts are compared.
const ROWS: usize = 6;

fn foundry_data() -> PathBuf {
    env_dir("ICL_FOUNDRY_DATA", || data_dir().parent().expect("parent").join("llm-foundry"))
}

fn tasks_yaml() -> PathBuf {
    foundry_data().join("eval/yamls/tasks_v0.3.yaml")
}

fn gauntlet_yaml() -> PathBuf {
    foundry_data().join("eval/yamls/eval_gauntlet_v0.3.yaml")
}

fn suite(gauntlet: Option<&Path>) -> Suite {
    let data = foundry_data();
    let options = SuiteOptions { data_dir: Some(&data), gauntlet, skip_missing: true };
    Suite::read(&tasks_yaml(), options).expect("the v0.3 suite")
}

/// The reference script's answers to `cases`.
fn reference(cases: &Value) -> Value {
    icl_test_support::llm_foundry_reference("foundry_gauntlet_reference.py", &cases.to_string())
}

#[test]
fn v0_3_prompts_match_llm_foundry() {
    let suite = suite(None);
    let tokenizer_dir = model_dir("smollm2-135m-instruct-hf");
    let tokenizer = icl_data::Tokenizer::from_file(&tokenizer_dir.join("tokenizer.json")).expect("tokenizer");
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for spec in &suite.tasks {
        let task = read_task(&spec.name, &spec.path, &spec.read).expect("task");
        let p = prompts(&task, &spec.prompt, Some(ROWS)).expect("prompts");
        let shots: Vec<Vec<usize>> = p.iter().map(|p| p.shots.clone()).collect();
        let label = spec.name.split('/').next().expect("label");
        let mut case = json!({
            "suite": tasks_yaml(), "data_dir": foundry_data(), "label": label,
            "num_fewshot": spec.prompt.num_fewshot, "tokenizer": tokenizer_dir, "shots": shots, "rows": ROWS,
        });
        if let Some(c) = &spec.read.category {
            case["category"] = json!(c);
        }
        let max_new_tokens = (task.kind() == TaskKind::GenerationWithAnswers).then(|| {
            icl_data::generation_requests(&tokenizer, &task, &p, &spec.prompt, 2048, 0).expect("plan").max_new_tokens
        });
        cases.push(case);
        ours.push((spec.name.clone(), task, p, max_new_tokens));
    }
    // Every v0.3 task with data, jeopardy by category.
    let names: Vec<&str> = ours.iter().map(|o| o.0.as_str()).collect();
    for expected in
        ["gsm8k/0-shot", "svamp/5-shot", "jeopardy/3-shot/american_history", "hellaswag/10-shot", "winograd/3-shot"]
    {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    let answers = reference(&json!({ "prompts": cases }));
    for ((name, task, p, max_new_tokens), theirs) in ours.iter().zip(answers["prompts"].as_array().expect("prompts")) {
        assert_eq!(theirs["size"].as_u64(), Some(task.len() as u64), "{name}: rows");
        for (ex, (mine, t)) in p.iter().zip(theirs["prompts"].as_array().expect("rows")).enumerate() {
            let prompt = t["prompt"].as_str().expect("prompt");
            let contexts: Vec<String> = t["context"]
                .as_array()
                .expect("context")
                .iter()
                .map(|c| {
                    let c = c.as_str().expect("context");
                    // llm-foundry rstrips the example's context (not a schema option) before tokens.
                    if task.kind() == TaskKind::Schema {
                        format!("{prompt}{c}")
                    } else {
                        format!("{prompt}{}", c.trim_end())
                    }
                })
                .collect();
            assert_eq!(mine.contexts, contexts, "{name} example {ex}");
            let answer: Vec<&str> =
                t["answer"].as_array().expect("answer").iter().map(|a| a.as_str().expect("str")).collect();
            match task.kind() {
                TaskKind::LanguageModeling | TaskKind::Schema => {
                    assert_eq!(mine.targets, answer, "{name} example {ex}")
                }
                TaskKind::MultipleChoice => {
                    let spaced: Vec<String> = answer.iter().map(|c| format!(" {}", c.trim())).collect();
                    assert_eq!(mine.targets, spaced, "{name} example {ex}");
                }
                TaskKind::GenerationWithAnswers => {
                    let mut accepted = mine.targets.clone();
                    accepted.sort();
                    let aliases: Vec<&str> = theirs["aliases"][ex]
                        .as_array()
                        .expect("aliases")
                        .iter()
                        .map(|a| a.as_str().expect("str"))
                        .collect();
                    assert_eq!(accepted, aliases, "{name} example {ex}");
                }
                TaskKind::Perplexity => unreachable!("suites refuse perplexity tasks"),
            }
        }
        if let Some(cap) = max_new_tokens {
            assert_eq!(Some(*cap as u64), theirs["max_new_tokens"].as_u64(), "{name}: max_new_tokens");
        }
    }
}

#[test]
fn exact_match_matches_llm_foundry() {
    let stops = ["\n\n", "Question:"];
    let mut cases = Vec::new();
    let outputs = [
        " Janet sells 16 - 3 - 4 = 9 eggs. The answer is 18.\n\nQ: more",
        " 9 eggs. The answer is 1. The answer is 18",
        " The answer is 18Question: what",
        " no delimiter 18",
        " 18",
        "  The Beatles!\nrest",
        "the beatles",
        " beatles",
        " Paris, France",
        " paris",
        "\n\n18",
    ];
    let labels = [vec!["18"], vec!["The Beatles", "Beatles"], vec!["Paris"]];
    for output in outputs {
        for l in &labels {
            for cot in ["", "The answer is "] {
                for normalize in [true, false] {
                    for stop in [&stops[..], &[][..]] {
                        cases.push(json!({
                            "output": output, "labels": l, "cot_delimiter": cot,
                            "do_normalization": normalize, "stopping_criteria": stop,
                        }));
                    }
                }
            }
        }
    }
    let theirs = reference(&json!({ "exact_match": cases }));
    let theirs = theirs["exact_match"].as_array().expect("results");
    assert_eq!(theirs.len(), cases.len());
    for (case, t) in cases.iter().zip(theirs) {
        let stop: Vec<&str> =
            case["stopping_criteria"].as_array().expect("stops").iter().map(|s| s.as_str().expect("str")).collect();
        let labels: Vec<&str> =
            case["labels"].as_array().expect("labels").iter().map(|s| s.as_str().expect("str")).collect();
        let cut = cut_at_stop(case["output"].as_str().expect("output"), &stop);
        let answer = cot_answer(cut, case["cot_delimiter"].as_str().expect("cot"));
        let mine = answer_matches(answer, &labels, case["do_normalization"].as_bool().expect("bool"));
        assert_eq!(mine, t.as_u64() == Some(1), "{case}");
    }
}

/// A gauntlet case for the reference: the v0.3 gauntlet (as llm-foundry reads it, with `weighting`
/// replaced) on the given accuracies and sizes.
fn gauntlet_case(weighting: &str, metrics: &BTreeMap<String, f64>, sizes: &BTreeMap<String, usize>) -> Value {
    let text = std::fs::read_to_string(gauntlet_yaml()).expect("gauntlet yaml");
    let doc: Value = serde_json::to_value(serde_norway_free_yaml(&text)).expect("json");
    let mut config = doc["eval_gauntlet"].clone();
    config["weighting"] = json!(weighting);
    json!({ "config": config, "metrics": metrics, "sizes": sizes })
}

/// The gauntlet YAML as JSON, through the venv's PyYAML (the test does not depend on a YAML crate).
fn serde_norway_free_yaml(text: &str) -> Value {
    let mut child = Command::new(venv_python())
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("yaml");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn gauntlet_scores_match_llm_foundry() {
    let gauntlet_file = gauntlet_yaml();
    let suite = suite(Some(&gauntlet_file));
    // Every benchmark task of the suite, data or not; jeopardy by its categories.
    let mut names: Vec<String> = suite.tasks.iter().map(|t| t.name.clone()).collect();
    names.extend(suite.skipped.iter().map(|t| t.name.clone()));
    let mut metrics = BTreeMap::new();
    let mut sizes = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        // Accuracies and sizes that differ per task (deterministic).
        metrics.insert(name.clone(), 0.2 + 0.7 * ((i * 37 % 23) as f64 / 23.0));
        sizes.insert(name.clone(), 5 + i * 131 % 997);
    }
    let without = |gone: &[&str]| -> (BTreeMap<String, f64>, BTreeMap<String, usize>) {
        let keep = |k: &String| !gone.iter().any(|g| k.starts_with(g));
        (
            metrics.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), *v)).collect(),
            sizes.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), *v)).collect(),
        )
    };
    let variants: Vec<(&str, Weighting, Vec<&str>)> = vec![
        ("EQUAL", Weighting::Equal, vec![]),
        ("SAMPLE_SZ", Weighting::SampleSz, vec![]),
        ("LOG_SAMPLE_SZ", Weighting::LogSampleSz, vec![]),
        // The data this project has: what is missing drops its categories.
        ("EQUAL", Weighting::Equal, suite.skipped.iter().map(|t| t.name.as_str()).collect()),
        ("LOG_SAMPLE_SZ", Weighting::LogSampleSz, vec!["mmlu/5-shot", "squad/3-shot"]),
    ];
    let cases: Vec<Value> = variants
        .iter()
        .map(|(w, _, gone)| {
            let (m, s) = without(gone);
            gauntlet_case(w, &m, &s)
        })
        .collect();
    let theirs = reference(&json!({ "gauntlet": cases }));
    for ((w, weighting, gone), t) in variants.iter().zip(theirs["gauntlet"].as_array().expect("gauntlet")) {
        let (m, s) = without(gone);
        let mut gauntlet = suite.gauntlet.clone();
        gauntlet.weighting = *weighting;
        let results: BTreeMap<String, TaskOutcome> = m
            .iter()
            .map(|(k, acc)| (k.clone(), TaskOutcome { acc: *acc, acc_stderr: Some(0.01), n: s[k], chance: 0.0 }))
            .collect();
        let ours = gauntlet.scores(&results);
        let scores = t["scores"].as_object().unwrap_or_else(|| panic!("{w}: {t}"));
        let mut compared = 0;
        for (name, v) in &ours.categories {
            match v {
                Some(v) => {
                    let theirs = scores[name].as_f64().expect("score");
                    assert!((v - theirs).abs() < 1e-12, "{w} {gone:?} {name}: {v} vs {theirs}");
                    compared += 1;
                }
                None => assert!(!scores.contains_key(name), "{w} {gone:?}: {name} should be dropped"),
            }
        }
        for (name, v) in &ours.averages {
            let theirs = scores[name].as_f64().expect("average");
            assert!((v - theirs).abs() < 1e-12, "{w} {gone:?} {name}: {v} vs {theirs}");
        }
        assert_eq!(scores.len(), compared + ours.averages.len(), "{w} {gone:?}: {scores:?}");
    }
    // llm-foundry refuses rescaling without subtracting the baseline; so does icl.
    let (m, s) = without(&[]);
    let mut case = gauntlet_case("EQUAL", &m, &s);
    case["config"]["subtract_random_baseline"] = json!(false);
    let theirs = reference(&json!({ "gauntlet": [case] }));
    assert!(theirs["gauntlet"][0]["error"].as_str().expect("error").contains("rescaling"));
}

#[test]
fn v0_3_suite_runs_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("results.json");
    let data = foundry_data();
    let model = model_dir("smollm2-135m-instruct");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--quiet",
            "--model",
            model.to_str().expect("utf-8"),
            "--suite",
            tasks_yaml().to_str().expect("utf-8"),
            "--gauntlet",
            gauntlet_yaml().to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ]
        .map(str::to_owned)
        .to_vec();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    // Without --skip-missing the first missing file stops the run before any work.
    let out = Command::new(env!("CARGO_BIN_EXE_icl")).args(args(&[])).output().expect("icl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "(`triviaqa_sm_sub`): dataset_uri `eval/local_data/world_knowledge/triviaqa_sm_sub.jsonl`: no such file"
        ),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_icl"))
        .args(args(&[
            "--skip-missing",
            "--tasks",
            "jeopardy,svamp,piqa,arc_easy,lambada_openai",
            "--limit",
            "2",
            "--output",
            results.to_str().expect("utf-8"),
        ]))
        .output()
        .expect("icl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("arc_easy/3-shot: skipped, no data file"), "{stderr}");
    assert!(stdout.contains("skipped (no data file)") && stdout.contains("arc_easy/3-shot"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
    let jeopardy = &r["tasks"]["jeopardy/3-shot"];
    let cats = jeopardy["categories"].as_object().expect("categories");
    assert_eq!(
        cats.keys().collect::<Vec<_>>(),
        ["american_history", "literature", "science", "word_origins", "world_history"]
    );
    let mean = cats.values().map(|c| c["acc"].as_f64().expect("acc")).sum::<f64>() / 5.0;
    assert!((jeopardy["acc"].as_f64().expect("acc") - mean).abs() < 1e-12, "{jeopardy}");
    assert_eq!(jeopardy["n"], 10);
    assert_eq!(cats["science"]["n"], 2);
    assert_eq!(r["skipped"][0]["name"], "arc_easy/3-shot");
    assert!(r["tasks"]["svamp/5-shot"]["exact_match"].is_number());
    // The v0.3 gauntlet: every category misses a benchmark here, so all are dropped, and the
    // averages are llm-foundry's 0; the benchmarks that ran are scored.
    let g = &r["gauntlet"];
    assert!(g["categories"]["world_knowledge"].is_null(), "{g}");
    let dropped = g["dropped"]["world_knowledge"].as_array().expect("dropped");
    assert!(dropped.contains(&json!("arc_easy/3-shot")) && dropped.contains(&json!("mmlu/5-shot")), "{g}");
    assert!(!dropped.contains(&json!("jeopardy/3-shot")), "{g}");
    assert_eq!(g["averages"]["core_average"], 0.0);
    // A multiple-choice benchmark's accuracy is llm-foundry's metric: the lowest mean per-token loss.
    let piqa = (r["tasks"]["piqa/0-shot"]["acc_mean_nll"].as_f64().expect("acc_mean_nll") - 0.5) / 0.5;
    assert!((g["tasks"]["piqa/0-shot"]["score"].as_f64().expect("score") - piqa).abs() < 1e-12, "{g}");
    assert!((g["tasks"]["jeopardy/3-shot"]["acc"].as_f64().expect("acc") - mean).abs() < 1e-12, "{g}");
    assert!(stdout.contains("world_knowledge") && stdout.contains("category dropped: no results for"), "{stdout}");
}

#[test]
fn named_tasks_are_found_in_the_data_folders() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("results.json");
    let model = model_dir("smollm2-135m-instruct");
    let icl = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_icl"));
        cmd.args(["eval", "--quiet", "--model", model.to_str().expect("utf-8"), "--data-dir"]);
        cmd.arg(data_dir()).args(extra).output().expect("icl")
    };
    // lambada_openai is a file of the icl data; jeopardy a label of llm-foundry's tasks_v0.3.yaml next to it.
    let out =
        icl(&["--tasks", "lambada_openai,jeopardy", "--limit", "1", "--output", results.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
    assert_eq!(r["tasks"]["lambada_openai"]["type"], "language_modeling");
    assert_eq!(r["tasks"]["jeopardy/3-shot"]["categories"].as_object().expect("categories").len(), 5);
    assert_eq!(r["tasks"]["jeopardy/3-shot"]["num_fewshot"], 3);
    let out = icl(&["--tasks", "no_such_task"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--tasks: no task `no_such_task` in"), "{stderr}");
    // A chosen task without data is an error naming it, unless --skip-missing.
    let out = icl(&["--tasks", "arc_easy"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("task arc_easy/3-shot: no such file") && stderr.contains("arc_easy.jsonl"), "{stderr}");
}
