//! Gemma 2 against Hugging Face `transformers` (reference models and logits made by
//! `scripts/make_models.py` under `$ICL_MODELS`). `gemma2-tiny`: three layers of which the last two
//! slide (`layer_types` full, sliding, sliding, not the default alternation) with a window of 8,
//! shorter than the 40-token sequences; four heads of 32 (`head_dim` given) over two key-value heads,
//! scores scaled by `query_pre_attn_scalar` 24 and soft-capped at 20, logits soft-capped at 10,
//! attention biases and a tied head. `gemma2-tiny-untied`: the default alternation (sliding, full) with
//! a window of 16, one key-value head, no attention soft cap, logits capped at 30, an untied head.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::ModelSpec;

const MODEL: &str = "gemma2-tiny";
const MODELS: [&str; 2] = [MODEL, "gemma2-tiny-untied"];

#[test]
fn logits_match_transformers_with_windows_and_soft_caps() {
    MODELS.into_iter().for_each(check_logits);
}

#[test]
fn packed_rows_and_shared_prefixes_keep_the_windows() {
    MODELS.into_iter().for_each(check_packed);
}

#[test]
fn bf16_compute_stays_close() {
    MODELS.into_iter().for_each(check_bf16);
}

#[test]
fn spec_reads_the_config() {
    let spec = ModelSpec::read(&model_dir(MODEL)).unwrap();
    assert_eq!(
        (spec.model_type.as_str(), spec.vocab_size, spec.max_length, spec.eos_token_id),
        ("gemma2", 50257, 256, Some(50256))
    );
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        MODEL,
        "model.layers.2.pre_feedforward_layernorm.weight",
        r#""num_key_value_heads": 2"#,
        r#""num_key_value_heads": 4"#,
        "self_attn.",
    );
    // Tied: no lm_head in the file; untied, the missing head is named.
    let e = config_error(MODEL, r#""tie_word_embeddings": true"#, r#""tie_word_embeddings": false"#);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
    let e = config_error(MODEL, r#""sliding_window": 8"#, r#""sliding_window": null"#);
    assert!(e.contains("config.json") && e.contains("sliding_window") && e.contains("null"), "{e}");
    let e = config_error(MODEL, r#""full_attention""#, r#""chunked_attention""#);
    assert!(e.contains("config.json") && e.contains("layer_types") && e.contains("chunked_attention"), "{e}");
    let e = config_error(MODEL, r#""rope_type": "default""#, r#""rope_type": "longrope""#);
    assert!(e.contains("rope_parameters.rope_type") && e.contains("longrope"), "{e}");
}
