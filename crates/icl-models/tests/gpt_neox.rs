//! GPT-NeoX (Pythia) against Hugging Face `transformers`: `pythia-tiny` (parallel residual, rotary_pct
//! 0.25, rotary_emb_base 20000, untied `embed_out`) and `pythia-tiny-sequential`
//! (`use_parallel_residual` false, rotary_pct 0.5), made with their reference logits by
//! `scripts/make_models.py` under `$ICL_MODELS`.

mod common;

use common::*;

const MODELS: [&str; 2] = ["pythia-tiny", "pythia-tiny-sequential"];

#[test]
fn logits_match_transformers_on_a_padded_batch() {
    for name in MODELS {
        check_logits(name);
    }
}

#[test]
fn packed_rows_and_shared_prefixes_equal_separate_sequences() {
    for name in MODELS {
        check_packed(name);
    }
}

#[test]
fn bf16_compute_stays_close() {
    for name in MODELS {
        check_bf16(name);
    }
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    check_loader_errors(
        "pythia-tiny",
        "embed_out.weight",
        r#""intermediate_size": 256"#,
        r#""intermediate_size": 128"#,
        "mlp.dense_",
    );
    check_loader_errors(
        "pythia-tiny-sequential",
        "gpt_neox.layers.1.attention.query_key_value.bias",
        r#""hidden_size": 64"#,
        r#""hidden_size": 32"#,
        // Tensors are checked in file order (it used to be hash order): the file starts with embed_out.
        "embed_out",
    );
    let e = config_error("pythia-tiny", r#""rope_type": "default""#, r#""rope_type": "yarn""#);
    assert!(e.contains("config.json") && e.contains("rope_type") && e.contains("yarn"), "{e}");
}
