//! Document perplexity (`--type perplexity`, rows `{text}`) against lm-evaluation-harness's
//! `loglikelihood_rolling` on the same text: a custom task YAML on a local JSONL with
//! `doc_to_target: "{{text}}"` and lm-eval's `word_perplexity`, `byte_perplexity` and `bits_per_byte`,
//! run by the venv's lm-eval on the tiny GPT-Neo (a 256-token window). The documents are built here
//! from the Jargon File that `cargo xtask setup` fetches (public domain; `$ICL_CORPUS`), each several
//! windows long, plus one shorter than a window. Each document's log-likelihood must agree within
//! 1e-3 and its word and byte counts exactly; the three metrics within 1e-4 relative. Twice: with the
//! model's window, and with `--max-length 100` (lm-eval's `max_length=100`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Documents of the test set; the last is a single short paragraph.
const DOCUMENTS: usize = 8;
/// Characters of each long document, at least (about 700 GPT-2 tokens: three windows of 256).
const MIN_CHARS: usize = 2500;
const METRIC_TOLERANCE: f64 = 1e-4;

fn corpus() -> PathBuf {
    env_dir("ICL_CORPUS", || icl_test_support::home().join(".cache/icl/corpus")).join("jargon.txt")
}

/// Runs of consecutive paragraphs of the Jargon File's lexicon (past the table of contents), each at
/// least `MIN_CHARS` long, as written (white space, typographic quotes and all), then one paragraph.
fn documents(text: &str) -> Vec<String> {
    let paragraphs: Vec<&str> = text.split("\n\n").filter(|p| p.trim().len() > 40).collect();
    let mut docs = Vec::new();
    let mut current = String::new();
    for p in paragraphs.iter().skip(paragraphs.len() / 3) {
        if !current.is_empty() {
            current.push_str("\n\n");
        }
        current.push_str(p);
        if current.len() >= MIN_CHARS {
            docs.push(std::mem::take(&mut current));
            if docs.len() == DOCUMENTS - 1 {
                break;
            }
        }
    }
    docs.push(paragraphs[paragraphs.len() / 2].to_owned());
    docs
}

/// The log-likelihood lm-eval logged for a `loglikelihood_rolling` sample (`filtered_resps`, a number
/// or its string, possibly nested in lists).
fn logged_number(v: &Value) -> f64 {
    match v {
        Value::Array(items) => logged_number(&items[0]),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a number: {s}")),
        other => other.as_f64().unwrap_or_else(|| panic!("not a number: {other}")),
    }
}

/// lm-eval's results file and per-document samples (by doc id) under `out`.
fn lm_eval_output(out: &Path, task: &str) -> (Value, BTreeMap<u64, Value>) {
    let files = lm_eval_output_files(out);
    let named = |prefix: &str| {
        files
            .iter()
            .find(|p| named_like(p, prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {}", out.display()))
            .clone()
    };
    let results: Value = serde_json::from_str(&std::fs::read_to_string(named("results_")).unwrap()).unwrap();
    let samples = read_jsonl(&named(&format!("samples_{task}_")))
        .into_iter()
        .map(|s| (s["doc_id"].as_u64().expect("doc_id"), s))
        .collect();
    (results["results"][task].clone(), samples)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

fn compare(tmp: &Path, docs_path: &Path, docs: &[String], max_length: Option<usize>) {
    let model = tiny_model();
    let task = "icl_jargon_ppl";
    let label = max_length.map_or("model window".to_owned(), |n| format!("--max-length {n}"));

    // lm-eval on a custom task reading the same JSONL.
    let tasks_dir = tmp.join("tasks");
    std::fs::create_dir_all(&tasks_dir).unwrap();
    let yaml = format!(
        "task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n\
         output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{{{text}}}}\"\n\
         metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        serde_json::to_string(&docs_path.display().to_string()).unwrap()
    );
    std::fs::write(tasks_dir.join(format!("{task}.yaml")), yaml).unwrap();
    let out = tmp.join(format!("lm_eval_{}", max_length.unwrap_or(0)));
    let mut model_args = format!("pretrained={},dtype=float32", model.display());
    if let Some(n) = max_length {
        model_args += &format!(",max_length={n}");
    }
    let run = Command::new(venv_python())
        .args(["-m", "lm_eval", "--model", "hf", "--model_args", &model_args, "--tasks", task, "--include_path"])
        .arg(&tasks_dir)
        .args(["--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path"])
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("run lm-eval");
    assert!(run.status.success(), "lm-eval failed: {}", String::from_utf8_lossy(&run.stderr));
    let (theirs, their_samples) = lm_eval_output(&out, task);
    assert_eq!(their_samples.len(), docs.len(), "lm-eval scored every document");

    // icl on the same file: the type told from the fields, or declared.
    let results = tmp.join(format!("icl_{}.json", max_length.unwrap_or(0)));
    let samples = tmp.join(format!("icl_{}.jsonl", max_length.unwrap_or(0)));
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--batch-tokens", "2048", "--model"]).arg(&model);
    icl.arg("--task").arg(format!("jargon={}", docs_path.display()));
    if let Some(n) = max_length {
        icl.args(["--max-length", &n.to_string(), "--type", "perplexity"]);
    }
    let run = icl.arg("--output").arg(&results).arg("--log-samples").arg(&samples).output().expect("run icl");
    assert!(run.status.success(), "icl eval failed: {}", String::from_utf8_lossy(&run.stderr));
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    let ours = &ours["tasks"]["jargon"];
    assert_eq!(ours["type"], "perplexity");
    let our_samples = read_jsonl(&samples);
    assert_eq!(our_samples.len(), docs.len());

    let window = max_length.unwrap_or(256);
    let mut max_diff = 0f64;
    for (i, ours) in our_samples.iter().enumerate() {
        let theirs = &their_samples[&(i as u64)];
        let ll = number(&ours["loglik"]);
        let their_ll = logged_number(&theirs["filtered_resps"]);
        max_diff = max_diff.max((ll - their_ll).abs());
        assert!((ll - their_ll).abs() <= LL_TOLERANCE, "{label}: document {i}: loglik {ll} vs lm-eval {their_ll}");
        // lm-eval's per-document metric items are (loglik, words) and (loglik, bytes).
        assert_eq!(ours["n_words"].as_u64(), theirs["word_perplexity"][1].as_u64(), "{label}: document {i} words");
        assert_eq!(ours["n_bytes"].as_u64(), theirs["byte_perplexity"][1].as_u64(), "{label}: document {i} bytes");
        let tokens = ours["n_tokens"].as_u64().unwrap() as usize;
        assert_eq!(ours["n_windows"].as_u64().unwrap() as usize, tokens.div_ceil(window), "{label}: document {i}");
    }
    // The long documents need several windows; the last fits in the model's one.
    assert!(our_samples[..docs.len() - 1].iter().all(|s| s["n_windows"].as_u64().unwrap() >= 3), "{our_samples:?}");
    if max_length.is_none() {
        assert_eq!(our_samples[docs.len() - 1]["n_windows"], 1);
    }

    let mut figures = Vec::new();
    for metric in ["word_perplexity", "byte_perplexity", "bits_per_byte"] {
        let (a, b) = (number(&ours[metric]), number(&theirs[format!("{metric},none")]));
        assert!(relative(a, b) <= METRIC_TOLERANCE, "{label}: {metric} {a} vs lm-eval {b}");
        assert!(ours[format!("{metric}_stderr")].as_f64().is_some_and(|se| se > 0.0), "{label}: {metric}_stderr");
        figures.push(format!("{metric} {a:.6} (lm-eval {b:.6}, rel. diff {:.1e})", relative(a, b)));
    }
    eprintln!("{label}: {} documents, max |dloglik| {max_diff:.2e}; {}", docs.len(), figures.join(", "));
}

#[test]
fn document_perplexity_matches_lm_evaluation_harness_loglikelihood_rolling() {
    let corpus = corpus();
    let text = std::fs::read_to_string(&corpus).unwrap_or_else(|e| {
        panic!("{}: {e} (run `cargo xtask setup`, which fetches the Jargon File)", corpus.display())
    });
    let docs = documents(&text);
    assert_eq!(docs.len(), DOCUMENTS);
    let tmp = tempfile::tempdir().unwrap();
    let docs_path = tmp.path().join("jargon_docs.jsonl");
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&docs_path, lines.join("\n") + "\n").unwrap();
    compare(tmp.path(), &docs_path, &docs, None);
    compare(tmp.path(), &docs_path, &docs, Some(100));
}
