//! GPT-2 against Hugging Face `transformers`: `gpt2-tiny` (learned positions, `Conv1D` weights stored
//! `[in, out]`, tied head), made with its reference logits by `scripts/make_models.py` under `$ICL_MODELS`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::{Dtype, ModelInput};
use tch::Tensor;

#[test]
fn logits_match_transformers_on_a_padded_batch() {
    check_logits("gpt2-tiny");
}

#[test]
fn packed_rows_and_shared_prefixes_equal_separate_sequences() {
    check_packed("gpt2-tiny");
}

#[test]
fn bf16_compute_stays_close() {
    check_bf16("gpt2-tiny");
}

#[test]
fn checkpoints_without_the_transformer_prefix_load() {
    // The original GPT-2 files were saved from the bare GPT2Model: `wte.weight`, `h.0.attn.c_attn.weight`, ...
    let dir = model_dir("gpt2-tiny");
    let t = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), t.path().join(f)).unwrap();
    }
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_owned(), v))
        .collect();
    assert!(named.iter().any(|(k, _)| k == "wte.weight"));
    Tensor::write_safetensors(&named, t.path().join("model.safetensors")).unwrap();
    let r = reference("gpt2-tiny");
    let model = icl_models::load_model(t.path(), Dtype::F32, tch::Device::Cpu).unwrap();
    let logits = model.logits(&ModelInput::causal(&r.ids).unwrap()).unwrap();
    assert!(max_diff_on_real_tokens(&logits, &r.logits, &r.lengths) <= 1e-4);
}

#[test]
fn positions_beyond_the_table_are_an_error() {
    let model = load("gpt2-tiny", Dtype::F32);
    let ids = Tensor::zeros([1, 257], (tch::Kind::Int64, tch::Device::Cpu));
    let e = model.logits(&ModelInput::causal(&ids).unwrap()).expect_err("must fail").to_string();
    assert!(e.contains("n_positions") && e.contains("256"), "{e}");
    let ids = Tensor::from_slice(&[50257i64]).view([1, 1]);
    assert!(model.logits(&ModelInput::causal(&ids).unwrap()).is_err(), "token id beyond the vocabulary");
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        "gpt2-tiny",
        "transformer.h.1.mlp.c_fc.bias",
        r#""n_inner": null"#,
        r#""n_inner": 128"#,
        "mlp.c_",
    );
    let e = config_error("gpt2-tiny", r#""tie_word_embeddings": true"#, r#""tie_word_embeddings": false"#);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}
