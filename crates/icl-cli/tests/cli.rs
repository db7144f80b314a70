//! The `icl` binary end to end on the tiny reference model: its outputs, and a clear error (exit code 1,
//! never a panic) for each kind of bad input.

mod common;

use common::{data_dir, read_jsonl, tiny_model};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `icl eval` and returns (exit code, stderr).
fn icl_eval(model: &Path, tasks: &[(&str, &Path)], extra: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icl"));
    cmd.args(["eval", "--quiet", "--model"]).arg(model);
    for (name, path) in tasks {
        cmd.arg("--task").arg(format!("{name}={}", path.display()));
    }
    let out = cmd.args(extra).output().expect("run icl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

const LM_ROW: &str = r#"{"context": "The cat sat on the", "continuation": "mat"}"#;
const MC_ROW: &str = r#"{"query": "Question: which is bigger?", "choices": ["a whale", "a mouse"], "gold": 0}"#;
/// The same question with the other gold answer: the three rows cannot all be right or all wrong.
const MC_ROW_GOLD_1: &str = r#"{"query": "Question: which is bigger?", "choices": ["a whale", "a mouse"], "gold": 1}"#;

/// lm-eval's `mean_stderr` written out: sample standard deviation (n − 1) over `sqrt(n)`.
fn mean_stderr(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
}

#[test]
fn writes_results_and_samples_with_the_documented_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lm = write(tmp.path(), "lm.jsonl", &format!("{LM_ROW}\n{LM_ROW}\n"));
    let mc = write(tmp.path(), "mc.jsonl", &format!("{MC_ROW}\n{MC_ROW_GOLD_1}\n{MC_ROW}\n"));
    let (results, samples) = (tmp.path().join("results.json"), tmp.path().join("samples.jsonl"));
    let (code, stderr) = icl_eval(
        &tiny_model(),
        &[("lm", &lm), ("mc", &mc)],
        &["--output", results.to_str().expect("utf-8"), "--log-samples", samples.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
    for key in ["acc", "perplexity", "n", "seconds"] {
        assert!(r["tasks"]["lm"].get(key).is_some(), "lm lacks {key}: {r}");
    }
    for key in ["acc", "acc_norm", "n", "seconds"] {
        assert!(r["tasks"]["mc"].get(key).is_some(), "mc lacks {key}: {r}");
    }
    assert_eq!(r["tasks"]["mc"]["n"], 3);
    let lines = read_jsonl(&samples);
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[1]["task"], "lm");
    assert_eq!(lines[1]["index"], 1);
    for key in ["loglik", "is_greedy", "n_tokens"] {
        assert!(lines[0].get(key).is_some(), "{key}");
    }
    assert_eq!(lines[4]["index"], 2);
    assert_eq!(lines[4]["logliks"].as_array().map(Vec::len), Some(2));
    for key in ["pred", "pred_norm", "gold"] {
        assert!(lines[4].get(key).is_some(), "{key}");
    }
    // Identical rows get the same score up to GEMM rounding (the rows of a batch may take different
    // kernel paths).
    let (a, b) = (lines[0]["loglik"].as_f64().expect("f64"), lines[1]["loglik"].as_f64().expect("f64"));
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");

    // Standard errors: lm-eval's mean_stderr of the per-example 0/1 values that samples.jsonl logs.
    let close = |got: &Value, want: f64, what: &str| {
        let got = got.as_f64().unwrap_or_else(|| panic!("{what} missing: {r}"));
        assert!((got - want).abs() < 1e-12, "{what}: {got} vs {want}");
    };
    let mc_lines: Vec<&Value> = lines.iter().filter(|l| l["task"] == "mc").collect();
    for (metric, pred) in [("acc", "pred"), ("acc_norm", "pred_norm")] {
        let correct: Vec<f64> = mc_lines.iter().map(|l| f64::from(u8::from(l[pred] == l["gold"]))).collect();
        let want = mean_stderr(&correct);
        assert!(want > 0.0, "the gold answers differ, so {metric} is neither 0 nor 1");
        close(&r["tasks"]["mc"][format!("{metric}_stderr")], want, &format!("mc {metric}_stderr"));
    }
    let greedy: Vec<f64> =
        lines.iter().filter(|l| l["task"] == "lm").map(|l| f64::from(u8::from(l["is_greedy"] == true))).collect();
    close(&r["tasks"]["lm"]["acc_stderr"], mean_stderr(&greedy), "lm acc_stderr");
    let ppl_stderr = r["tasks"]["lm"]["perplexity_stderr"].as_f64().expect("lm perplexity_stderr");
    assert!(ppl_stderr.is_finite() && ppl_stderr >= 0.0, "{ppl_stderr}");
    // Bits per byte of the continuations: -Σ loglik / Σ bytes / ln 2 over the logged samples.
    let lm_lines: Vec<&Value> = lines.iter().filter(|l| l["task"] == "lm").collect();
    let loglik: f64 = lm_lines.iter().map(|l| l["loglik"].as_f64().expect("loglik")).sum();
    let bytes: u64 = lm_lines.iter().map(|l| l["n_bytes"].as_u64().expect("n_bytes")).sum();
    let bpb = r["tasks"]["lm"]["bits_per_byte"].as_f64().expect("lm bits_per_byte");
    assert!((bpb - (-loglik / bytes as f64 / std::f64::consts::LN_2)).abs() < 1e-9, "bits_per_byte {bpb}");
    assert!(r["tasks"]["lm"]["bits_per_byte_stderr"].as_f64().is_some_and(|se| se > 0.0), "{r}");
}

#[test]
fn bad_task_files_name_file_line_and_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tiny_model();
    let cases = [
        ("malformed.jsonl", format!("{LM_ROW}\n{{\"context\": \"x\",\n"), ":2: malformed JSON"),
        ("missing.jsonl", format!("{LM_ROW}\n{{\"context\": \"x\"}}\n"), ":2: field `continuation`: missing"),
        (
            "gold.jsonl",
            r#"{"query": "q", "choices": ["a", "b"], "gold": 5}"#.to_owned(),
            ":1: field `gold`: 5 is out of range for 2 choices",
        ),
        (
            "empty_choices.jsonl",
            r#"{"query": "q", "choices": [], "gold": 0}"#.to_owned(),
            ":1: field `choices`: is empty",
        ),
        ("empty.jsonl", String::new(), "has no rows"),
    ];
    for (name, text, expected) in cases {
        let path = write(tmp.path(), name, &text);
        let good = write(tmp.path(), "good.jsonl", LM_ROW);
        let results = tmp.path().join(format!("{name}.results.json"));
        // The bad file comes second: it must still fail before any model work, and write nothing.
        let (code, stderr) =
            icl_eval(&model, &[("good", &good), ("bad", &path)], &["--output", results.to_str().expect("utf-8")]);
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(stderr.contains(name) && stderr.contains(expected), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!results.exists(), "{name}: results written despite bad input");
    }
    let (code, stderr) = icl_eval(&model, &[("gone", Path::new("/nonexistent/task.jsonl"))], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/task.jsonl"), "{stderr}");
}

/// A copy of the tiny model's files, to break one of them.
fn model_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("model");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_model().join(f), copy.join(f)).expect("copy");
    }
    copy
}

#[test]
fn bad_model_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let task = write(tmp.path(), "lm.jsonl", LM_ROW);
    let check = |model: &Path, expected: &[&str]| {
        let (code, stderr) = icl_eval(model, &[("lm", &task)], &[]);
        assert_eq!(code, 1, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for e in expected {
            assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
        }
    };

    check(&tmp.path().join("no-such-model"), &["tokenizer", "no-such-model", "not found"]);

    let m = model_copy(&tmp.path().join("a"));
    std::fs::remove_file(m.join("model.safetensors")).expect("rm");
    check(&m, &["no model.safetensors"]);

    let m = model_copy(&tmp.path().join("b"));
    let config = std::fs::read_to_string(m.join("config.json")).expect("config");
    write(&m, "config.json", &config.replace("\"gpt_neo\"", "\"rwkv\""));
    check(&m, &["config.json", "model_type", "rwkv"]);

    // One more token than the model's 50257-entry vocabulary.
    let m = model_copy(&tmp.path().join("c"));
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("tokenizer.json")).expect("tok")).expect("tokenizer json");
    tok["added_tokens"].as_array_mut().expect("added_tokens").push(serde_json::json!({
        "id": 50257, "content": "<|extra|>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    write(&m, "tokenizer.json", &tok.to_string());
    check(&m, &["tokenizer.json", "50258 tokens", "vocab_size", "50257"]);

    // A BOS token (lm-eval's prefix token) that the tokenizer does not have.
    let m = model_copy(&tmp.path().join("d"));
    write(&m, "tokenizer_config.json", r#"{"bos_token": {"content": "<s>"}}"#);
    check(&m, &["tokenizer_config.json", "field `bos_token`", "\"<s>\" is not a token"]);
    write(&m, "tokenizer_config.json", r#"{"bos_token": 3}"#);
    check(&m, &["tokenizer_config.json", "field `bos_token`: expected a string or an object"]);

    // --max-length beyond the model's position table.
    let (code, stderr) = icl_eval(&tiny_model(), &[("lm", &task)], &["--max-length", "257"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--max-length 257") && stderr.contains("at most 256 tokens"), "{stderr}");
}

#[test]
fn max_length_cuts_inputs_on_the_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let task = write(tmp.path(), "lm.jsonl", LM_ROW);
    let truncated = |extra: &[&str]| {
        let results = tmp.path().join("results.json");
        let mut args = vec!["--output", results.to_str().expect("path")];
        args.extend(extra);
        let (code, stderr) = icl_eval(&tiny_model(), &[("lm", &task)], &args);
        assert_eq!(code, 0, "{stderr}");
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&results).expect("results")).expect("json");
        r["tasks"]["lm"]["truncated"].as_u64().expect("truncated")
    };
    // "The cat sat on the" + " mat": 6 tokens, 5 of them fed to the model.
    assert_eq!(truncated(&[]), 0);
    assert_eq!(truncated(&["--max-length", "5"]), 0);
    assert_eq!(truncated(&["--max-length", "4"]), 1);
}

/// Per-example samples of one run over the first 40 rows of each task, with extra batching flags.
fn samples_with(extra: &[&str]) -> Vec<Value> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let samples = tmp.path().join("samples.jsonl");
    let data = data_dir();
    let tasks = [
        ("lambada", data.join("lambada_openai.jsonl")),
        ("piqa", data.join("piqa.jsonl")),
        ("hellaswag", data.join("hellaswag.jsonl")),
    ];
    let tasks: Vec<(&str, &Path)> = tasks.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let mut args = vec!["--limit", "40", "--log-samples", samples.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let (code, stderr) = icl_eval(&tiny_model(), &tasks, &args);
    assert_eq!(code, 0, "{stderr}");
    std::fs::read_to_string(&samples)
        .expect("samples")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

#[test]
fn results_do_not_depend_on_batching_or_packing() {
    let reference = samples_with(&["--batch-tokens", "1", "--batch-rows", "1", "--row-len", "1"]);
    for extra in [
        &["--batch-tokens", "7", "--row-len", "7"][..],
        &["--batch-tokens", "64", "--row-len", "64"][..],
        &["--batch-tokens", "100000", "--row-len", "1024"][..],
    ] {
        let other = samples_with(extra);
        assert_eq!(reference.len(), other.len());
        let mut worst = 0f64;
        for (a, b) in reference.iter().zip(&other) {
            assert_eq!((&a["task"], &a["index"]), (&b["task"], &b["index"]));
            if let Some(ll) = a["loglik"].as_f64() {
                worst = worst.max((ll - b["loglik"].as_f64().expect("loglik")).abs());
                assert_eq!(a["is_greedy"], b["is_greedy"], "{extra:?}: {a} vs {b}");
            } else {
                for (x, y) in
                    a["logliks"].as_array().expect("logliks").iter().zip(b["logliks"].as_array().expect("logliks"))
                {
                    worst = worst.max((x.as_f64().expect("f64") - y.as_f64().expect("f64")).abs());
                }
                assert_eq!((&a["pred"], &a["pred_norm"]), (&b["pred"], &b["pred_norm"]), "{extra:?}: {a} vs {b}");
            }
        }
        assert!(worst <= 1e-4, "{extra:?}: log-likelihoods differ by up to {worst}");
    }
}

#[test]
fn chat_template_flags_fail_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let task = write(tmp.path(), "lm.jsonl", LM_ROW);
    let check = |model: &Path, args: &[&str], expected: &[&str]| {
        let (code, stderr) = icl_eval(model, &[("lm", &task)], args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for e in expected {
            assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
        }
    };
    // The tiny GPT-Neo has no chat template.
    let m = model_copy(&tmp.path().join("a"));
    check(&m, &["--apply-chat-template"], &["--apply-chat-template", "has no chat template", "chat_template.jinja"]);
    check(&m, &["--fewshot-as-multiturn"], &["--fewshot-as-multiturn needs --apply-chat-template"]);
    // A template that fails to render names its file, the Jinja error and the example.
    write(
        &m,
        "chat_template.jinja",
        "{% for m in messages %}{{ raise_exception('no ' + m.role + ' role') }}{% endfor %}",
    );
    let template = m.join("chat_template.jinja");
    check(
        &m,
        &["--apply-chat-template", "--system-instruction", "Be brief."],
        &[template.to_str().expect("utf-8"), "no user role", "lm example 0"],
    );
    write(&m, "chat_template.jinja", "{% if messages %}");
    check(&m, &["--apply-chat-template"], &[template.to_str().expect("utf-8"), "syntax error", "unexpected end"]);
    write(&m, "tokenizer_config.json", r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#);
    std::fs::remove_file(&template).expect("rm");
    check(
        &m,
        &["--apply-chat-template"],
        &["tokenizer_config.json: key chat_template: no template named `default`", "tool_use"],
    );
    check(&m, &["--apply-chat-template", "rag"], &["no chat template named `rag`"]);
}
