//! Qwen 3 against Hugging Face `transformers` (reference models and logits made by
//! `scripts/make_models.py` under `$ICL_MODELS`): `qwen3-tiny` (q/k norms, `head_dim` 32 against
//! `hidden_size / num_attention_heads` 16, grouped-query attention, no biases, rope_theta 1e6, untied
//! head, a window of 16 on layer 1 from `use_sliding_window` and `max_window_layers` in a config.json
//! without `layer_types`) and `qwen3-tiny-tied` (`head_dim` omitted, so 128; one key-value head;
//! `attention_bias`, on the output projection too; llama3 rope_scaling; tied head).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const MODELS: [&str; 2] = ["qwen3-tiny", "qwen3-tiny-tied"];

#[test]
fn logits_in_f32_and_bf16_and_packed_rows_match_transformers() {
    for check in [check_logits, check_packed, check_bf16] {
        MODELS.into_iter().for_each(check);
    }
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        "qwen3-tiny",
        "model.layers.1.self_attn.k_norm.weight",
        r#""head_dim": 32"#,
        r#""head_dim": 16"#,
        "self_attn.",
    );
    // The output projection's bias is read, and head_dim is 128 when omitted: 16 no longer fits.
    check_loader_errors(
        "qwen3-tiny-tied",
        "model.layers.0.self_attn.o_proj.bias",
        r#""hidden_act": "silu""#,
        r#""head_dim": 16, "hidden_act": "silu""#,
        "self_attn.",
    );
    let e = config_error("qwen3-tiny", r#""head_dim": 32"#, r#""head_dim": null"#);
    assert!(e.contains("config.json") && e.contains("field `head_dim`"), "{e}");
    let e =
        config_error("qwen3-tiny", r#""use_sliding_window": true"#, r#""use_sliding_window": true, "layer_types": []"#);
    assert!(e.contains("config.json") && e.contains("field `layer_types`: 0 entries"), "{e}");
    let e = config_error("qwen3-tiny-tied", r#""rope_type": "llama3""#, r#""rope_type": "yarn""#);
    assert!(e.contains("config.json") && e.contains("rope_parameters.rope_type") && e.contains("yarn"), "{e}");
}
