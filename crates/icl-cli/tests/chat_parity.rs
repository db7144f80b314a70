//! `icl eval --apply-chat-template` against `lm_eval --apply_chat_template`, example by example, on
//! SmolLM2-135M-Instruct (`$ICL_MODELS/smollm2-135m-instruct`, imported from the GGUF by `icl
//! import-gguf`, chat template included; lm-eval reads the same folder, as `lm_eval_parity.rs` does),
//! on PIQA (multiple choice) and TriviaQA (generation, the 32-row sample) through
//! `scripts/run_lm_eval.sh`. `ICL_CHAT_PARITY_REFERENCE=smollm2-135m-instruct-hf` gives lm-eval
//! transformers' own load of the GGUF instead: its tokenizer splits two or more spaces before a digit
//! differently (see the README), which changes the log-likelihoods of the PIQA rows with such text. Per example: the rendered prompt and the continuation strings equal
//! lm-eval's request arguments, choice log-likelihoods within 1e-3 and the same predictions (except
//! near ties), the same generated text.
//!
//! By default 24 rows, zero-shot (CI). `ICL_CHAT_PARITY_LIMIT=200` for the full comparison,
//! `ICL_CHAT_PARITY_SHOTS=3` for few-shot (multi-turn shots, lm-eval's default under a template;
//! `ICL_CHAT_PARITY_MULTITURN=false` for one user turn), `ICL_CHAT_PARITY_SYSTEM=TEXT` for a system
//! instruction, `ICL_CHAT_PARITY_QA=jeopardy` for more generation rows than TriviaQA's 32 (see
//! `jeopardy_as_trivia_qa`). Requires `cargo xtask setup`.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Tokens generated at most: `MAX_GEN_TOKS` of scripts/lm_eval_tasks.py.
const MAX_NEW_TOKENS: &str = "16";

/// lm-eval's request arguments of a sample: `(context, continuation or generation kwargs)` per request.
fn arguments(sample: &Value) -> Vec<(String, Value)> {
    let args = sample["arguments"].as_object().expect("arguments");
    (0..args.len())
        .map(|i| {
            let a = &args[&format!("gen_args_{i}")];
            (a["arg_0"].as_str().expect("context").to_owned(), a["arg_1"].clone())
        })
        .collect()
}

/// A data folder for `ICL_CHAT_PARITY_QA=jeopardy`: TriviaQA has only its 32-row sample here, so for
/// a longer generation comparison the QA rows are llm-foundry's Jeopardy questions in TriviaQA's shape
/// (`Question: ...\nAnswer:`, the answer its one alias); the other task files are the shared ones.
fn jeopardy_as_trivia_qa(data: &Path, tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    for entry in std::fs::read_dir(data).expect("data dir") {
        let name = entry.expect("entry").file_name();
        if name != "triviaqa_small.jsonl" {
            std::os::unix::fs::symlink(data.join(&name), dir.join(&name)).expect("link a task file");
        }
    }
    let jeopardy =
        data.parent().expect("parent").join("llm-foundry/eval/local_data/world_knowledge/jeopardy_all.jsonl");
    let rows: String = read_jsonl(&jeopardy)
        .iter()
        .map(|row| {
            let answer = row["continuation"].as_str().expect("continuation").trim();
            let question = format!("Question: {}\nAnswer:", row["context"].as_str().expect("context"));
            format!("{}\n", serde_json::json!({"context": question, "answer": answer, "aliases": [answer]}))
        })
        .collect();
    std::fs::write(dir.join("triviaqa_small.jsonl"), rows).expect("write QA rows");
    dir
}

#[test]
fn chat_prompts_match_lm_evaluation_harness() {
    let data = data_dir();
    let native = model_dir("smollm2-135m-instruct");
    let reference =
        model_dir(&std::env::var("ICL_CHAT_PARITY_REFERENCE").unwrap_or_else(|_| "smollm2-135m-instruct".into()));
    let limit: usize = std::env::var("ICL_CHAT_PARITY_LIMIT").map_or(24, |s| s.parse().expect("ICL_CHAT_PARITY_LIMIT"));
    let shots = std::env::var("ICL_CHAT_PARITY_SHOTS").unwrap_or_else(|_| "0".into());
    let multiturn = std::env::var("ICL_CHAT_PARITY_MULTITURN").unwrap_or_else(|_| "true".into());
    let system = std::env::var("ICL_CHAT_PARITY_SYSTEM").ok();
    let tasks = [("icl_piqa", "piqa.jsonl"), ("icl_triviaqa", "triviaqa_small.jsonl")];
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = match std::env::var("ICL_CHAT_PARITY_QA").as_deref() {
        Err(_) => data,
        Ok("jeopardy") => jeopardy_as_trivia_qa(&data, tmp.path()),
        Ok(other) => panic!("ICL_CHAT_PARITY_QA={other}: only `jeopardy` is known"),
    };

    // lm-eval splits LM_EVAL_ARGS on spaces: the system instruction goes through a file-free flag
    // only when it has none.
    let mut lm_eval_args = format!("--apply_chat_template --fewshot_as_multiturn {multiturn}");
    if let Some(system) = &system {
        assert!(!system.contains(' '), "ICL_CHAT_PARITY_SYSTEM: one word (run_lm_eval.sh splits on spaces)");
        lm_eval_args += &format!(" --system_instruction {system}");
    }
    let lm_eval_out = tmp.path().join("lm_eval");
    let started = std::time::Instant::now();
    run_logged(
        lm_eval_command(&reference, &lm_eval_out, limit, &tasks.map(|(t, _)| t), &data)
            .env("LM_EVAL_ARGS", &lm_eval_args)
            // Few-shot: `fewshot_split: test`, the split icl's lm-eval sampler draws from.
            .env("NUM_FEWSHOT", if shots == "0" { "" } else { &shots }),
        "lm-eval",
        &tmp.path().join("lm_eval.log"),
    );
    let lm_eval_seconds = started.elapsed().as_secs_f64();

    let (samples, prompts) = (tmp.path().join("samples.jsonl"), tmp.path().join("prompts.jsonl"));
    let mut icl = Command::new(env!("CARGO_BIN_EXE_icl"));
    icl.args(["eval", "--quiet", "--model"]).arg(&native);
    for (task, file) in tasks {
        icl.arg("--task").arg(format!("{task}={}", data.join(file).display()));
    }
    icl.args(["--limit", &limit.to_string(), "--num-fewshot", &shots, "--max-new-tokens", MAX_NEW_TOKENS]);
    // lm-eval's `until: ["\n"]`.
    icl.args(["--stop", "\n"]);
    icl.args(["--apply-chat-template", "--fewshot-as-multiturn", &multiturn]);
    if let Some(system) = &system {
        icl.args(["--system-instruction", system]);
    }
    if shots != "0" {
        // lm-eval's shot choice and layout (fewshot_delimiter "\n\n").
        icl.args(["--fewshot-sampler", "lm-eval"]);
    }
    icl.arg("--log-samples").arg(&samples).arg("--write-prompts").arg(&prompts);
    let started = std::time::Instant::now();
    let output = icl.output().expect("run icl");
    assert!(output.status.success(), "icl eval failed: {}", String::from_utf8_lossy(&output.stderr));
    let icl_seconds = started.elapsed().as_secs_f64();

    let mut ours: BTreeMap<(String, u64), (Value, Value)> = BTreeMap::new();
    for (s, p) in read_jsonl(&samples).into_iter().zip(read_jsonl(&prompts)) {
        assert_eq!((&s["task"], &s["index"]), (&p["task"], &p["index"]));
        ours.insert((s["task"].as_str().expect("task").to_owned(), s["index"].as_u64().expect("index")), (s, p));
    }
    println!(
        "chat parity, {} vs {} ({limit} rows, {shots}-shot, multiturn {multiturn}, system {system:?}): lm-eval \
         {lm_eval_seconds:.1}s, icl {icl_seconds:.1}s",
        native.display(),
        reference.display()
    );
    let mut failures = Vec::new();
    for (task, _) in tasks {
        let theirs = lm_eval_samples(&lm_eval_out, task);
        let mine: Vec<&(Value, Value)> = ours.iter().filter(|((t, _), _)| t == task).map(|(_, v)| v).collect();
        assert_eq!(mine.len(), theirs.len(), "{task}: example counts differ");
        let (mut same_prompt, mut max_diff, mut mismatches, mut ties, mut correct_ours, mut correct_theirs) =
            (0, 0f64, 0, 0, 0, 0);
        for (sample, prompt) in mine {
            let index = sample["index"].as_u64().expect("index");
            let reference = &theirs[&index];
            let args = arguments(reference);
            let context = prompt["context"].as_str().expect("context");
            if task == "icl_triviaqa" {
                if args[0].0 == context {
                    same_prompt += 1;
                } else {
                    failures.push(format!("{task} {index}: prompt {context:?} vs lm-eval's {:?}", args[0].0));
                }
                let output = sample["output"].as_str().expect("output");
                let their_output = reference["resps"][0][0].as_str().expect("resps");
                let answers: Vec<String> = serde_json::from_value(prompt["targets"].clone()).expect("answers");
                correct_ours += usize::from(sample["correct"].as_bool().expect("correct"));
                correct_theirs += usize::from(icl_metrics::exact_match(their_output, &answers));
                if output != their_output {
                    mismatches += 1;
                    failures.push(format!("{task} {index}: generated {output:?} vs lm-eval's {their_output:?}"));
                }
                continue;
            }
            let targets: Vec<&str> =
                prompt["targets"].as_array().expect("targets").iter().map(|t| t.as_str().expect("t")).collect();
            let theirs_requests: Vec<(&str, &str)> =
                args.iter().map(|(c, k)| (c.as_str(), k.as_str().expect("continuation"))).collect();
            let mine_requests: Vec<(&str, &str)> = targets.iter().map(|t| (context, *t)).collect();
            if mine_requests == theirs_requests {
                same_prompt += 1;
            } else {
                failures.push(format!("{task} {index}: requests {mine_requests:?} vs lm-eval's {theirs_requests:?}"));
            }
            let lls: Vec<f64> =
                reference["filtered_resps"].as_array().expect("choices").iter().map(|c| number(&c[0])).collect();
            let mine_lls: Vec<f64> = sample["logliks"].as_array().expect("logliks").iter().map(number).collect();
            for (a, b) in lls.iter().zip(&mine_lls) {
                max_diff = max_diff.max((a - b).abs());
                if (a - b).abs() > LL_TOLERANCE {
                    failures.push(format!("{task} {index}: log-likelihoods {mine_lls:?} vs {lls:?}"));
                }
            }
            let (their_pred, near_tie) = argmax_and_near_tie(&lls);
            let pred = sample["pred"].as_u64().expect("pred") as usize;
            let gold = sample["gold"].as_u64().expect("gold") as usize;
            correct_ours += usize::from(pred == gold);
            correct_theirs += usize::from(their_pred == gold);
            if near_tie {
                ties += 1;
            } else if pred != their_pred {
                mismatches += 1;
                failures.push(format!("{task} {index}: prediction {pred} vs lm-eval's {their_pred}"));
            }
        }
        let n = theirs.len();
        println!(
            "  {task:<13} n={n:<4} identical prompts {same_prompt}/{n}  max|dll|={max_diff:.2e}  prediction/output \
             mismatches {mismatches}  near ties {ties}  accuracy icl {:.4} lm-eval {:.4}",
            correct_ours as f64 / n as f64,
            correct_theirs as f64 / n as f64
        );
    }
    assert!(failures.is_empty(), "chat parity failures:\n{}", failures.join("\n"));
    // The model answered: equal outputs are not all empty.
    let generated = ours.iter().filter(|((t, _), (s, _))| t == "icl_triviaqa" && s["n_tokens"].as_u64() > Some(0));
    assert!(generated.count() > 0, "no TriviaQA output has a token");
}
