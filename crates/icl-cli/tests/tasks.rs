//! Task types, formats, few-shot prompts, suites and `icl convert`, end to end on the tiny model.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Runs `icl` and returns (exit code, stdout, stderr).
fn icl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_icl")).args(args).output().expect("run icl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `icl eval` over `tasks` with extra flags; returns the samples.
fn eval_samples(tasks: &[(&str, &Path)], extra: &[&str]) -> Vec<Value> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let samples = tmp.path().join("samples.jsonl");
    let model = tiny_model();
    let mut args = vec!["eval", "--quiet", "--model", s(&model), "--log-samples", s(&samples)];
    let specs: Vec<String> = tasks.iter().map(|(n, p)| format!("{n}={}", p.display())).collect();
    for spec in &specs {
        args.extend(["--task", spec.as_str()]);
    }
    args.extend_from_slice(extra);
    let (code, _, stderr) = icl(&args);
    assert_eq!(code, 0, "{stderr}");
    read_jsonl(&samples)
}

fn max_loglik_diff(a: &[Value], b: &[Value]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x["task"], &x["index"]), (&y["task"], &y["index"]));
        if let Some(ll) = x["loglik"].as_f64() {
            worst = worst.max((ll - y["loglik"].as_f64().expect("loglik")).abs());
            assert_eq!(x["is_greedy"], y["is_greedy"], "{x} vs {y}");
        } else {
            for (p, q) in
                x["logliks"].as_array().expect("logliks").iter().zip(y["logliks"].as_array().expect("logliks"))
            {
                worst = worst.max((p.as_f64().expect("f64") - q.as_f64().expect("f64")).abs());
            }
            assert_eq!((&x["pred"], &x["gold"]), (&y["pred"], &y["gold"]), "{x} vs {y}");
        }
    }
    worst
}

#[test]
fn converted_parquet_gives_the_same_results_as_jsonl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = data_dir();
    let cases = [
        ("lambada", "lambada_openai.jsonl", "language_modeling"),
        ("piqa", "piqa.jsonl", "multiple_choice"),
        ("hellaswag", "hellaswag.jsonl", "multiple_choice"),
        ("winograd", "winograd_wsc.jsonl", "schema"),
    ];
    let mut jsonl = Vec::new();
    let mut parquet = Vec::new();
    for (name, file, kind) in cases {
        let out = tmp.path().join(format!("{name}.parquet"));
        let input = data.join(file);
        let (code, _, stderr) = icl(&["convert", "--type", kind, "--input", s(&input), "--output", s(&out)]);
        assert_eq!(code, 0, "{stderr}");
        // Without --type the type comes from the fields, as in `icl eval`: the same file.
        let inferred = tmp.path().join(format!("{name}_inferred.parquet"));
        let (code, _, stderr) = icl(&["convert", "--input", s(&input), "--output", s(&inferred)]);
        assert_eq!(code, 0, "{stderr}");
        assert!(std::fs::read(&out).expect("parquet") == std::fs::read(&inferred).expect("parquet"), "{name}");
        jsonl.push((name, input));
        parquet.push((name, out));
    }
    let a: Vec<(&str, &Path)> = jsonl.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let b: Vec<(&str, &Path)> = parquet.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let flags = ["--limit", "24", "--num-fewshot", "2"];
    let (x, y) = (eval_samples(&a, &flags), eval_samples(&b, &flags));
    // Same rows, prompts, tokens and batches: the numbers are identical.
    assert_eq!(max_loglik_diff(&x, &y), 0.0);
    assert_eq!(x.len(), 4 * 24);
}

#[test]
fn few_shot_prompts_do_not_depend_on_limit_or_batching() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = data_dir();
    let (lambada, piqa, wsc) =
        (data.join("lambada_openai.jsonl"), data.join("piqa.jsonl"), data.join("winograd_wsc.jsonl"));
    let model = tiny_model();
    let prompts = |limit: &str, sampler: &str, out: &Path| {
        let (l, p, w) = (
            format!("lambada={}", lambada.display()),
            format!("piqa={}", piqa.display()),
            format!("wsc={}", wsc.display()),
        );
        let args = [
            "eval",
            "--quiet",
            "--model",
            s(&model),
            "--task",
            &l,
            "--task",
            &p,
            "--task",
            &w,
            "--num-fewshot",
            "3",
            "--fewshot-seed",
            "11",
            "--fewshot-sampler",
            sampler,
            "--limit",
            limit,
            "--write-prompts",
            s(out),
        ];
        let (code, _, stderr) = icl(&args);
        assert_eq!(code, 0, "{stderr}");
        read_jsonl(out)
    };
    // The peers' samplers draw from one generator in row order: a limit still only cuts the list.
    for sampler in ["llm-foundry", "lm-eval"] {
        let few = prompts("5", sampler, &tmp.path().join("a.jsonl"));
        let more = prompts("12", sampler, &tmp.path().join("b.jsonl"));
        for task in ["lambada", "piqa", "wsc"] {
            let f: Vec<&Value> = few.iter().filter(|v| v["task"] == task).collect();
            let m: Vec<&Value> = more.iter().filter(|v| v["task"] == task).collect();
            assert_eq!((f.len(), m.len()), (5, 12));
            assert_eq!(f, m[..5].to_vec(), "{sampler} {task}: prompts changed with the limit");
            assert!(f.iter().all(|p| p["shots"].as_array().map(Vec::len) == Some(3)), "{sampler} {task}");
        }
    }
    let few = prompts("5", "icl", &tmp.path().join("a.jsonl"));
    let more = prompts("12", "icl", &tmp.path().join("b.jsonl"));
    for task in ["lambada", "piqa", "wsc"] {
        let f: Vec<&Value> = few.iter().filter(|v| v["task"] == task).collect();
        let m: Vec<&Value> = more.iter().filter(|v| v["task"] == task).collect();
        assert_eq!((f.len(), m.len()), (5, 12));
        assert_eq!(f, m[..5].to_vec(), "{task}: prompts changed with the limit");
    }
    // Three shots of lambada: three newline-joined examples before the scored one.
    let first = &few[0];
    assert_eq!(first["targets"], serde_json::json!([" signs"]));
    assert!(first["context"].as_str().expect("context").ends_with("I don't care about"));
    // PIQA shots show the gold answer; schema prompts carry one context per option.
    let piqa0 = few.iter().find(|v| v["task"] == "piqa").expect("piqa prompt");
    assert_eq!(piqa0["targets"].as_array().map(Vec::len), Some(2));
    assert!(piqa0.get("gold").is_some());
    let wsc0 = few.iter().find(|v| v["task"] == "wsc").expect("wsc prompt");
    assert_eq!(wsc0["contexts"].as_array().map(Vec::len), Some(2));
    assert_eq!(wsc0["targets"], serde_json::json!([" feared violence."]));

    let tasks = [("lambada", lambada.as_path()), ("piqa", piqa.as_path()), ("wsc", wsc.as_path())];
    let base = ["--limit", "16", "--num-fewshot", "3"];
    let reference =
        eval_samples(&tasks, &[&base[..], &["--batch-tokens", "1", "--batch-rows", "1", "--row-len", "1"]].concat());
    let packed = eval_samples(&tasks, &[&base[..], &["--batch-tokens", "100000", "--row-len", "2048"]].concat());
    let worst = max_loglik_diff(&reference, &packed);
    assert!(worst <= 1e-4, "few-shot log-likelihoods differ by {worst} between batchings");
}

#[test]
fn suites_run_with_gauntlet_scores() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let results = tmp.path().join("results.json");
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../suites/default.yaml");
    let model = tiny_model();
    let data = data_dir();
    let (code, stdout, stderr) = icl(&[
        "eval",
        "--quiet",
        "--model",
        s(&model),
        "--suite",
        s(&suite),
        "--data-dir",
        s(&data),
        "--limit",
        "8",
        "--output",
        s(&results),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("gauntlet") && stdout.contains("commonsense_reasoning"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
    let names: Vec<&str> = r["tasks"].as_object().expect("tasks").keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "hellaswag/0-shot",
            "lambada_openai/0-shot",
            "lambada_openai/5-shot",
            "piqa/0-shot",
            "piqa/5-shot",
            "triviaqa/0-shot",
            "triviaqa/3-shot",
            "winograd_wsc/0-shot"
        ]
    );
    assert_eq!(r["tasks"]["triviaqa/3-shot"]["type"], "generation_task_with_answers");
    assert!(r["tasks"]["triviaqa/3-shot"].get("exact_match").is_some());
    assert!(r["gauntlet"]["categories"].get("world_knowledge").is_some());
    assert_eq!(r["tasks"]["winograd_wsc/0-shot"]["type"], "schema");
    assert_eq!(r["tasks"]["piqa/5-shot"]["num_fewshot"], 5);
    for key in ["acc", "acc_norm", "acc_mean_nll"] {
        assert!(r["tasks"]["winograd_wsc/0-shot"].get(key).is_some(), "schema lacks {key}");
    }
    let g = &r["gauntlet"];
    let piqa = &r["tasks"]["piqa/0-shot"];
    // The gauntlet scores multiple choice by llm-foundry's accuracy: the lowest mean per-token loss.
    let expected = (piqa["acc_mean_nll"].as_f64().expect("acc_mean_nll") - 0.5) / 0.5;
    assert!((g["tasks"]["piqa/0-shot"]["score"].as_f64().expect("score") - expected).abs() < 1e-12, "{g}");
    let cats = g["categories"].as_object().expect("categories");
    let mean = cats.values().map(|v| v.as_f64().expect("f64")).sum::<f64>() / cats.len() as f64;
    assert!((g["averages"]["default_average"].as_f64().expect("average") - mean).abs() < 1e-12);
}

/// Runs `icl eval` on one bad input and checks the error names what it must.
fn expect_error(args: &[&str], expected: &[&str]) {
    let (code, _, stderr) = icl(args);
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
}

#[test]
fn bad_inputs_name_file_row_and_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let model = tiny_model();
    let m = s(&model);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    // A schema file declared multiple choice by a suite.
    std::fs::copy(data_dir().join("winograd_wsc.jsonl"), dir.join("wsc.jsonl")).expect("copy");
    let suite = write(
        "suite.yaml",
        "icl_tasks:\n- label: wsc\n  dataset_uri: wsc.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n",
    );
    expect_error(
        &["eval", "--model", m, "--suite", s(&suite)],
        &["wsc.jsonl:1: field `query`: missing: the task is declared multiple_choice but the row has the fields of a schema task"],
    );
    let suite = write(
        "bad.yaml",
        "icl_tasks:\n- label: x\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n  icl_task_type: code_evaluation\n",
    );
    expect_error(&["eval", "--model", m, "--suite", s(&suite)], &["bad.yaml", "code_evaluation", "not supported yet"]);
    // Generation rows: aliases not a list of strings, a missing answer.
    let qa = write("qa.jsonl", "{\"context\": \"Q?\", \"answer\": \"a\", \"aliases\": [\"a\"]}\n{\"context\": \"Q?\", \"answer\": \"a\", \"aliases\": \"a\"}\n");
    expect_error(
        &["eval", "--model", m, "--task", &format!("qa={}", qa.display())],
        &["qa.jsonl:2: field `aliases`: expected a list of strings, found a string"],
    );
    let qa = write(
        "qa2.jsonl",
        "{\"context\": \"Q?\", \"answer\": \"a\"}\n{\"context\": \"Q?\", \"aliases\": [\"a\", null]}\n",
    );
    expect_error(
        &["eval", "--model", m, "--task", &format!("qa={}", qa.display()), "--type", "question_answering"],
        &["qa2.jsonl:2: field `answer`: missing"],
    );

    // Wrong field type, inconsistent choice counts, an empty file.
    let wrong = write("wrong.jsonl", "{\"context_options\": [\"a\", \"b\"], \"continuation\": [\"c\"], \"gold\": 0}\n");
    expect_error(
        &["eval", "--model", m, "--task", &format!("w={}", wrong.display())],
        &["wrong.jsonl:1: field `continuation`: expected a string, found an array"],
    );
    let counts = write(
        "counts.jsonl",
        "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n",
    );
    expect_error(
        &["eval", "--model", m, "--task", &format!("c={}", counts.display())],
        &["counts.jsonl:2: field `choices`: has 1 entries but line 1 has 2"],
    );
    let empty = write("empty.jsonl", "");
    expect_error(
        &["eval", "--model", m, "--task", &format!("e={}", empty.display())],
        &["empty.jsonl: the task file has no rows"],
    );

    // A Parquet file missing a column (the mapping names a column the file lacks), and a mapped
    // field with the wrong type.
    let lm = write("lm.jsonl", "{\"context\": \"a b\", \"continuation\": \"c\"}\n");
    let pq = dir.join("lm.parquet");
    let (code, _, stderr) = icl(&["convert", "--type", "language_modeling", "--input", s(&lm), "--output", s(&pq)]);
    assert_eq!(code, 0, "{stderr}");
    expect_error(
        &["eval", "--model", m, "--task", &format!("lm={}", pq.display()), "--field", "continuation=cont"],
        &["lm.parquet: field `cont` (read as `continuation`): no such column"],
    );
    expect_error(
        &["eval", "--model", m, "--task", &format!("lm={}", pq.display()), "--type", "multiple_choice"],
        &["lm.parquet: field `query`: no such column"],
    );

    // icl convert: a bad row stops the conversion and leaves no output.
    let csv = write("piqa.csv", "goal,sol1,sol2,label\na,b,c,1\nd,e,f,x\n");
    let out = dir.join("piqa.parquet");
    let (code, _, stderr) = icl(&["convert", "--preset", "piqa", "--input", s(&csv), "--output", s(&out)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("piqa.csv row 2: field `gold`: expected an integer, found a string"), "{stderr}");
    assert!(!out.exists());
}

/// A generation task from a suite (llm-foundry's older name `question_answering`, a length cap and
/// stop sequences from the suite) scores the same from JSONL and from the Parquet file `icl convert`
/// makes of it, and reports exact match as `acc` with a random baseline of 0.
#[test]
fn generation_tasks_run_from_suites_and_parquet() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let model = tiny_model();
    let jsonl = data_dir().join("triviaqa_small.jsonl");
    let parquet = dir.join("triviaqa.parquet");
    let (code, _, stderr) =
        icl(&["convert", "--type", "generation_task_with_answers", "--input", s(&jsonl), "--output", s(&parquet)]);
    assert_eq!(code, 0, "{stderr}");
    let suite = dir.join("suite.yaml");
    std::fs::write(
        &suite,
        format!(
            "icl_tasks:\n- label: tqa_jsonl\n  dataset_uri: {}\n  num_fewshot: [2]\n  icl_task_type: question_answering\n  \
             early_stopping_criteria: [\"\\n\", \"ing\"]\n  generation_kwargs: {{max_new_tokens: 6}}\n\
             - label: tqa_parquet\n  dataset_uri: {}\n  num_fewshot: [2]\n  icl_task_type: generation_task_with_answers\n  \
             early_stopping_criteria: [\"\\n\", \"ing\"]\n  generation_kwargs: {{max_new_tokens: 6}}\n",
            jsonl.display(),
            parquet.display()
        ),
    )
    .expect("write suite");
    let (out, prompts, samples) = (dir.join("r.json"), dir.join("p.jsonl"), dir.join("s.jsonl"));
    let (code, stdout, stderr) = icl(&[
        "eval",
        "--quiet",
        "--model",
        s(&model),
        "--suite",
        s(&suite),
        "--output",
        s(&out),
        "--write-prompts",
        s(&prompts),
        "--log-samples",
        s(&samples),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("exact_match") && stdout.contains("tqa_parquet/2-shot"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).expect("results")).expect("json");
    for name in ["tqa_jsonl/2-shot", "tqa_parquet/2-shot"] {
        let t = &r["tasks"][name];
        assert_eq!(
            (t["type"].as_str(), t["n"].as_u64(), t["max_new_tokens"].as_u64()),
            (Some("generation_task_with_answers"), Some(32), Some(6)),
            "{t}"
        );
        assert_eq!(t["acc"], t["exact_match"]);
        assert_eq!(t["random_baseline"].as_f64(), Some(0.0));
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .expect("samples")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 64);
    for (a, b) in lines[..32].iter().zip(&lines[32..]) {
        assert_eq!((&a["output"], &a["correct"], &a["index"]), (&b["output"], &b["correct"], &b["index"]));
        let n = a["n_tokens"].as_u64().expect("n_tokens");
        let output = a["output"].as_str().expect("output");
        assert!(n <= 6 && !output.contains('\n') && !output.contains("ing"), "{a}");
    }
    // Batching (rows of different prompt lengths, left-padded) does not change the outputs.
    let samples_small = dir.join("s3.jsonl");
    let (code, _, stderr) = icl(&[
        "eval",
        "--quiet",
        "--model",
        s(&model),
        "--suite",
        s(&suite),
        "--batch-rows",
        "3",
        "--log-samples",
        s(&samples_small),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let small = std::fs::read_to_string(&samples_small).expect("samples");
    for (a, b) in small.lines().zip(&lines) {
        let a: serde_json::Value = serde_json::from_str(a).expect("json");
        assert_eq!((&a["output"], &a["index"]), (&b["output"], &b["index"]));
    }
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&prompts).expect("prompts").lines().next().expect("a line"))
            .expect("json");
    assert_eq!(first["stop"], serde_json::json!(["\n", "ing"]));
    assert_eq!(first["max_new_tokens"], 6);
    assert_eq!(first["context"].as_str().map(|c| c.matches("\nAnswer:").count()), Some(3), "{first}");
}
