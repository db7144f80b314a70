//! Qwen 2 against Hugging Face `transformers` (reference models and logits made by
//! `scripts/make_models.py` under `$ICL_MODELS`): `qwen2-tiny` (q/k/v biases, grouped-query
//! attention, rope_theta 1e6, untied head, and a window of 16 on layer 1 from `use_sliding_window`
//! and `max_window_layers`, in a config.json without `layer_types`) and `qwen2-tiny-tied` (`head_dim`
//! 32 given, one key-value head, linear rope_scaling, `layer_types` giving layer 0 a window of 8,
//! tied head). The 40-token rows run past both windows.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::{load_model, Dtype, ModelInput};
use tch::Device;

/// Logits within 1e-4 of transformers in f32, packed rows and shared prefixes equal to separate
/// sequences, and bf16 close: all of what `common` checks of one tiny model.
fn matches_transformers(name: &str) {
    check_logits(name);
    check_packed(name);
    check_bf16(name);
}

#[test]
fn qwen2_tiny_with_windows_from_max_window_layers_matches_transformers() {
    matches_transformers("qwen2-tiny");
}

#[test]
fn qwen2_tiny_tied_with_layer_types_matches_transformers() {
    matches_transformers("qwen2-tiny-tied");
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        "qwen2-tiny",
        "model.layers.0.self_attn.q_proj.bias",
        r#""num_key_value_heads": 2"#,
        r#""num_key_value_heads": 4"#,
        "self_attn.",
    );
    // head_dim, which Qwen2Config does not declare, sets the projections' shapes.
    check_loader_errors(
        "qwen2-tiny-tied",
        "model.layers.1.self_attn.v_proj.bias",
        r#""head_dim": 32"#,
        r#""head_dim": 16"#,
        "self_attn.",
    );
    let e = config_error("qwen2-tiny-tied", r#""tie_word_embeddings": true"#, r#""tie_word_embeddings": false"#);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
    // Layer 0 slides; without use_sliding_window there is no window for it (transformers refuses too).
    let e = config_error("qwen2-tiny-tied", r#""use_sliding_window": true"#, r#""use_sliding_window": false"#);
    assert!(e.contains("config.json") && e.contains("field `layer_types`") && e.contains("layer 0"), "{e}");
    let e = config_error("qwen2-tiny-tied", r#""sliding_attention""#, r#""chunked_attention""#);
    assert!(e.contains("config.json") && e.contains("field `layer_types`") && e.contains("chunked_attention"), "{e}");
    let e = config_error("qwen2-tiny", r#""sliding_window": 16"#, r#""sliding_window": -16"#);
    assert!(e.contains("config.json") && e.contains("field `sliding_window`"), "{e}");
    let e = config_error("qwen2-tiny-tied", r#""rope_type": "linear""#, r#""rope_type": "dynamic""#);
    assert!(e.contains("config.json") && e.contains("rope_parameters.rope_type") && e.contains("dynamic"), "{e}");
}

/// The fixtures pin the windows down: a window one position shorter or longer moves the logits.
#[test]
fn a_window_off_by_one_changes_the_logits() {
    for (name, window) in [("qwen2-tiny", 16), ("qwen2-tiny-tied", 8)] {
        let (dir, r) = (model_dir(name), reference(name));
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let field = |w: i64| format!(r#""sliding_window": {w}"#);
        assert!(config.contains(&field(window)), "{name}: no {}", field(window));
        for other in [window - 1, window + 1] {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::copy(dir.join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
            std::fs::write(tmp.path().join("config.json"), config.replace(&field(window), &field(other))).unwrap();
            let model = load_model(tmp.path(), Dtype::F32, Device::Cpu).unwrap();
            let logits = model.logits(&ModelInput::causal(&r.ids).unwrap()).unwrap();
            let d = max_diff_on_real_tokens(&logits, &r.logits, &r.lengths);
            assert!(d > 1e-2, "{name}: a window of {other} gives the logits of {window} (max difference {d})");
        }
    }
}
