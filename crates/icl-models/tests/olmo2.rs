//! OLMo 2 against Hugging Face `transformers` (reference model and logits made by
//! `scripts/make_models.py` under `$ICL_MODELS`): `olmo2-tiny` has norms after attention and the MLP,
//! query and key norms over whole projections (four heads of 32, `head_dim` given, so `q_norm` covers
//! 128 and `k_norm`, over two key-value heads, 64), attention biases, rope_theta 500000 and an untied
//! head.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::ModelSpec;

const MODEL: &str = "olmo2-tiny";

#[test]
fn logits_match_transformers_on_a_padded_batch() {
    check_logits(MODEL);
}

#[test]
fn packed_rows_and_shared_prefixes_equal_separate_sequences() {
    check_packed(MODEL);
}

#[test]
fn bf16_compute_stays_close() {
    check_bf16(MODEL);
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        MODEL,
        "model.layers.1.self_attn.q_norm.weight",
        r#""head_dim": 32"#,
        r#""head_dim": 16"#,
        "self_attn.",
    );
    let spec = ModelSpec::read(&model_dir(MODEL)).unwrap();
    assert_eq!((spec.model_type.as_str(), spec.max_length, spec.eos_token_id), ("olmo2", 256, Some(50256)));
    let e = config_error(MODEL, r#""hidden_act": "silu""#, r#""hidden_act": "xielu""#);
    assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("xielu"), "{e}");
    let e = config_error(MODEL, r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#);
    assert!(e.contains("config.json") && e.contains("num_key_value_heads"), "{e}");
}
