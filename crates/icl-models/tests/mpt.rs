//! MPT against Hugging Face `transformers` (reference models and logits made by
//! `scripts/make_models.py` under `$ICL_MODELS`): `mpt-tiny` (4 heads, so ALiBi slopes of a power of
//! two; `MptConfig`'s defaults; tied head) and `mpt-tiny-odd` (6 heads, the interleaved slopes of a head
//! count that is not a power of two; `clip_qkv` 2, `softmax_scale` 0.3, untied `lm_head`). Packed rows
//! check that the bias counts distances within each sequence.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use icl_models::{Dtype, ModelInput, ModelSpec};
use tch::{Device, Kind, Tensor};

const MPT: [&str; 2] = ["mpt-tiny", "mpt-tiny-odd"];

#[test]
fn f32_logits_equal_transformers() {
    MPT.into_iter().for_each(check_logits);
}

#[test]
fn packed_and_prefix_shared_rows_equal_each_sequence_alone() {
    MPT.into_iter().for_each(check_packed);
}

#[test]
fn bf16_logits_stay_near_the_f32_reference() {
    MPT.into_iter().for_each(check_bf16);
}

#[test]
fn max_seq_len_bounds_the_positions() {
    let spec = ModelSpec::read(&model_dir("mpt-tiny-odd")).unwrap();
    assert_eq!((spec.model_type.as_str(), spec.max_length, spec.eos_token_id), ("mpt", 256, Some(50256)));
    let model = load("mpt-tiny", Dtype::F32);
    let ids = Tensor::full([1, 257], 11i64, (Kind::Int64, Device::Cpu));
    let e = model.logits(&ModelInput::causal(&ids).unwrap()).unwrap_err().to_string();
    assert!(e.contains("position 256") && e.contains("max_seq_len 256"), "{e}");
    assert!(model.logits(&ModelInput::causal(&ids.narrow(1, 0, 256)).unwrap()).is_ok());
}

#[test]
fn loading_errors_name_the_file_the_field_and_the_tensor() {
    check_loader_errors(
        "mpt-tiny",
        "transformer.blocks.1.attn.Wqkv.weight",
        r#""d_model": 64"#,
        r#""d_model": 32"#,
        "attn.Wqkv",
    );
    check_loader_errors("mpt-tiny-odd", "lm_head.weight", r#""d_model": 96"#, r#""d_model": 48"#, "lm_head");
    let e = config_error("mpt-tiny", r#""tie_word_embeddings": true"#, r#""tie_word_embeddings": false"#);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
    // What transformers' MptForCausalLM does not implement is refused, naming the nested field.
    for (from, to, field) in [
        (r#""qk_ln": false"#, r#""qk_ln": true"#, "attn_config.qk_ln"),
        (r#""alibi_bias_max": 8"#, r#""alibi_bias_max": 4"#, "attn_config.alibi_bias_max"),
        (r#""alibi": true"#, r#""alibi": false"#, "attn_config.alibi"),
    ] {
        let e = config_error("mpt-tiny-odd", from, to);
        assert!(e.contains("config.json") && e.contains(field), "{to}: {e}");
    }
    let e = config_error("mpt-tiny-odd", r#""n_heads": 6"#, r#""n_heads": 5"#);
    assert!(e.contains("config.json") && e.contains("d_model") && e.contains("n_heads"), "{e}");
}
