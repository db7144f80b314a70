//! Greedy generation with the key-value cache, for every architecture's tiny model
//! (`scripts/make_models.py`): a batch of prompts of different lengths (left-padded) gives the tokens
//! of a full recomputation of each prompt alone without a cache, and those of transformers'
//! `generate` (`scripts/generate_reference.py`, greedy, one prompt at a time). The outputs run past
//! GPT-Neo's local window, the sliding windows of Mistral and Phi-3 (16) and Qwen's per-layer windows (16
//! on layer 1 of qwen2-tiny and qwen3-tiny, 8 on layer 0 of qwen2-tiny-tied), so windows over cached keys
//! are tested, with Gemma 2's (8, 16) and MPT's ALiBi bias over cached keys.
//! Per-row stopping (end-of-text token, `stop`, the length cap) and input errors are checked too.
//! Requires `cargo xtask setup`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::{generate_greedy, generate_greedy_after_prefix, CausalLm, Dtype, GenerateOptions, ModelInput};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

const MODELS: &[&str] = &[
    "gpt-neo-tiny",
    "gpt2-tiny",
    "pythia-tiny",
    "pythia-tiny-sequential",
    "llama-tiny",
    "llama-tiny-tied",
    "mistral-tiny",
    "phi3-tiny",
    "phi3-tiny-tied",
    "mpt-tiny",
    "mpt-tiny-odd",
    "qwen2-tiny",
    "qwen2-tiny-tied",
    "qwen3-tiny",
    "qwen3-tiny-tied",
    "gemma2-tiny",
    "gemma2-tiny-untied",
    "olmo2-tiny",
];
const MAX_NEW: usize = 30;

/// The real tokens of the reference batch's rows: 40, 29 and 17 tokens.
fn prompts(name: &str) -> Vec<Vec<i64>> {
    let r = reference(name);
    (0..r.lengths.size()[0])
        .map(|row| {
            let n = r.lengths.int64_value(&[row]);
            Vec::<i64>::try_from(r.ids.get(row).narrow(0, 0, n)).unwrap()
        })
        .collect()
}

fn greedy(model: &dyn CausalLm, prompts: &[Vec<i64>], max_new_tokens: usize, eos: Option<i64>) -> Vec<Vec<i64>> {
    let options = GenerateOptions { max_new_tokens, eos_token_id: eos };
    generate_greedy(model, prompts, options, &mut |_, _| false).unwrap()
}

/// Greedy tokens by re-running the whole sequence at every step, without a cache.
fn recompute(model: &dyn CausalLm, prompt: &[i64], max_new_tokens: usize) -> Vec<i64> {
    let mut seq = prompt.to_vec();
    for _ in 0..max_new_tokens {
        let ids = Tensor::from_slice(&seq).unsqueeze(0);
        let logits = model.logits(&ModelInput::causal(&ids).unwrap()).unwrap();
        seq.push(logits.get(0).get(seq.len() as i64 - 1).argmax(-1, false).int64_value(&[]));
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn cached_batched_generation_equals_recomputation() {
    for name in MODELS {
        let model = load(name, Dtype::F32);
        let prompts = prompts(name);
        let batched = greedy(model.as_ref(), &prompts, MAX_NEW, None);
        for (row, prompt) in prompts.iter().enumerate() {
            assert_eq!(batched[row], recompute(model.as_ref(), prompt, MAX_NEW), "{name} row {row}");
        }
        // Alone, a prompt gets the same tokens as in the padded batch.
        assert_eq!(greedy(model.as_ref(), &prompts[2..], MAX_NEW, None)[0], batched[2], "{name}");
        let distinct: std::collections::BTreeSet<i64> = batched.iter().flatten().copied().collect();
        println!("{name}: {} distinct tokens in {} generated", distinct.len(), 3 * MAX_NEW);
    }
}

/// A prefix shared by every row, computed once and kept once in the cache (attended apart from each
/// row's own keys while decoding, or copied out for the architectures whose attention is not plain
/// SDPA), gives the tokens of the whole prompts generated as usual, past every window.
#[test]
fn a_shared_prefix_computed_once_gives_the_same_tokens() {
    for name in MODELS {
        let model = load(name, Dtype::F32);
        let suffixes = prompts(name);
        let prefix = suffixes[0][..20].to_vec();
        let whole: Vec<Vec<i64>> = suffixes.iter().map(|s| prefix.iter().chain(s).copied().collect()).collect();
        let options = GenerateOptions { max_new_tokens: MAX_NEW, eos_token_id: None };
        let after = generate_greedy_after_prefix(model.as_ref(), &prefix, &suffixes, options, &mut |_, _| false);
        assert_eq!(after.unwrap(), greedy(model.as_ref(), &whole, MAX_NEW, None), "{name}");
    }
    let model = load("llama-tiny", Dtype::F32);
    let options = GenerateOptions { max_new_tokens: 4, eos_token_id: None };
    let e = generate_greedy_after_prefix(model.as_ref(), &[1, 2], &[vec![3], vec![]], options, &mut |_, _| false);
    assert!(e.unwrap_err().to_string().contains("prompt 1 is empty (after a shared prefix of 2 tokens)"));
}

#[test]
fn generation_matches_transformers_generate() {
    let python = icl_test_support::venv_python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/generate_reference.py");
    let out = tempfile::NamedTempFile::new().unwrap();
    let dirs: Vec<PathBuf> = MODELS.iter().map(|m| model_dir(m)).collect();
    let status = Command::new(&python)
        .arg(&script)
        .arg("models")
        .arg(out.path())
        .arg(MAX_NEW.to_string())
        .args(&dirs)
        .status()
        .expect("run generate_reference.py");
    assert!(status.success(), "generate_reference.py failed");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path()).unwrap()).unwrap();
    for (name, dir) in MODELS.iter().zip(&dirs) {
        let model = load(name, Dtype::F32);
        let eos = model.eos_token_id().map(i64::from);
        let ours = greedy(model.as_ref(), &prompts(name), MAX_NEW, eos);
        let theirs: Vec<Vec<i64>> = serde_json::from_value(reference[dir.to_str().unwrap()].clone()).unwrap();
        assert_eq!(ours, theirs, "{name}: greedy tokens differ from transformers' generate");
    }
}

#[test]
fn rows_stop_independently() {
    let model = load("llama-tiny", Dtype::F32);
    let prompts = prompts("llama-tiny");
    let full = greedy(model.as_ref(), &prompts, 12, None);
    // End-of-text: row 0 stops before the token it would generate 5th, and leaves it out.
    let eos = full[0][4];
    let first_eos = |row: &Vec<i64>| row.iter().position(|&t| t == eos).unwrap_or(row.len());
    let with_eos = greedy(model.as_ref(), &prompts, 12, Some(eos));
    for (row, out) in with_eos.iter().enumerate() {
        assert_eq!(out[..], full[row][..first_eos(&full[row])], "row {row}");
    }
    // `stop`: row 1 ends after 3 tokens (kept); the others run to the cap unchanged.
    let mut asked = 0;
    let options = GenerateOptions { max_new_tokens: 12, eos_token_id: None };
    let stopped = generate_greedy(model.as_ref(), &prompts, options, &mut |row, tokens| {
        asked += 1;
        row == 1 && tokens.len() == 3
    })
    .unwrap();
    assert_eq!(stopped[1], full[1][..3]);
    assert_eq!((&stopped[0], &stopped[2]), (&full[0], &full[2]));
    assert_eq!(asked, 12 + 3 + 12);
    assert!(greedy(model.as_ref(), &prompts, 0, None).iter().all(Vec::is_empty));
}

#[test]
fn bad_prompts_are_errors() {
    let model = load("gpt2-tiny", Dtype::F32);
    let options = GenerateOptions { max_new_tokens: 4, eos_token_id: None };
    let e = generate_greedy(model.as_ref(), &[vec![1, 2], vec![]], options, &mut |_, _| false).unwrap_err().to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let long = vec![vec![5i64; 254]];
    let e = generate_greedy(model.as_ref(), &long, options, &mut |_, _| false).unwrap_err().to_string();
    assert!(e.contains("254 tokens plus 4") && e.contains("256 positions"), "{e}");
    let e = generate_greedy(model.as_ref(), &[vec![1, 60_000]], options, &mut |_, _| false).unwrap_err().to_string();
    assert!(!e.is_empty());
}
