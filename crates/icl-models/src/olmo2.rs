//! OLMo 2 (AllenAI), as Hugging Face's `Olmo2ForCausalLM` computes it.
//!
//! Blocks whose RMSNorms follow attention and the MLP rather than precede them,
//! `x + norm(attn(x))` then `x + norm(mlp(x))` (`post_attention_layernorm`,
//! `post_feedforward_layernorm`); queries and keys normalised by an RMSNorm over the whole projection
//! (`q_norm` of `num_attention_heads * head_dim`, `k_norm` of `num_key_value_heads * head_dim`)
//! before they are split into heads and rotated. Every RMSNorm scales by its gain in f32 and rounds
//! afterwards, and the rotary tables stay in f32 (the rotated queries and keys are rounded to the
//! compute dtype), as the reference does in bf16. Otherwise Llama's network: grouped-query attention
//! scaled by `1/sqrt(head_dim)` (`head_dim` may be given), `rope_theta` and `rope_scaling`, a SwiGLU
//! MLP with `hidden_act`, optional `attention_bias`, and an untied `lm_head` unless
//! `tie_word_embeddings`. Tensor names follow the checkpoint: `model.embed_tokens`,
//! `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.self_attn.{q,k}_norm`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj`, `model.layers.{i}.post_{attention,feedforward}_layernorm`,
//! `model.norm`, `lm_head`. The stack itself is `layers::RotaryDecoder`.

use crate::layers::{
    Activation, AttentionSpec, BlockNorms, DecoderFields, FieldDefaults, QkNorm, RmsStyle, RotaryDecoder, StackConfig,
    StackSpec,
};
use crate::registry::{ArchConfig, Architecture, ConfigFile};
use crate::Result;
use serde::Deserialize;
use std::sync::Arc;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["olmo2"], parse };

/// Norms after attention and after the MLP, none before.
const NORMS: BlockNorms = BlockNorms {
    pre_attention: None,
    post_attention: Some("post_attention_layernorm"),
    pre_mlp: None,
    post_mlp: Some("post_feedforward_layernorm"),
};

/// `Olmo2Config`'s defaults for the shared fields.
const DEFAULTS: FieldDefaults = FieldDefaults {
    num_key_value_heads: None,
    head_dim: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    eos_token_id: Some(50279),
};

fn default_hidden_act() -> String {
    "silu".into()
}

/// OLMo 2's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct Olmo2Config {
    #[serde(flatten)]
    pub decoder: DecoderFields,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

/// OLMo 2's layers; the model is [`Olmo2`].
pub type Olmo2Decoder = RotaryDecoder<Olmo2Config>;

/// OLMo 2 for causal language modelling.
pub type Olmo2 = crate::Model<Olmo2Decoder>;

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(StackConfig::<Olmo2Config>::new(validate(file, &file.deserialize()?)?)))
}

fn validate(file: &ConfigFile, c: &Olmo2Config) -> Result<StackSpec> {
    let act = Activation::parse(&c.hidden_act, "hidden_act").map_err(|m| file.error(m))?;
    let stack = StackSpec::new(file, &c.decoder, &DEFAULTS, act)?;
    Ok(StackSpec {
        attention: AttentionSpec { qk_norm: QkNorm::Whole { eps: stack.rms_norm_eps }, ..stack.attention },
        rope_in_f32: true,
        norms: NORMS,
        norm_style: RmsStyle::ScaleThenCast,
        ..stack
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;
    use tch::nn::VarStore;

    const OLMO_2_7B: &str = r#"{"architectures": ["Olmo2ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "olmo2", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 500000,
        "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true, "vocab_size": 100352}"#;

    fn config(edits: &[(&str, &str)]) -> Result<StackSpec> {
        crate::registry::edited_config(OLMO_2_7B, edits, validate)
    }

    #[test]
    fn olmo_2_7b_parses_and_counts_parameters() {
        let c = config(&[]).unwrap();
        assert_eq!((c.attention.head_dim, c.attention.qk_norm), (128, QkNorm::Whole { eps: 1e-6 }));
        assert_eq!((c.rope.theta, c.sizes.eos_token_id, c.sizes.max_length), (500000.0, Some(100257), 4096));
        assert!(!c.tie_word_embeddings && c.windows.iter().all(Option::is_none));
        let arch = StackConfig::<Olmo2Config>::new(c);
        let model = arch.declare(VarStore::new(tch::Device::Cpu), Path::new(".")).unwrap().into_causal_lm();
        // OLMo-2-1124-7B has 7,298,617,344 parameters.
        assert_eq!(model.parameter_bytes(), 7_298_617_344 * 4);
        assert_eq!(arch.stage_of("model.layers.31.self_attn.k_norm.weight"), Some(crate::Stage::Block(31)));
        let d = 4096.0;
        let expected =
            10.0 * 32.0 * 2.0 * (4.0 * d * d + 3.0 * d * 11008.0) + 32.0 * 4.0 * d * 55.0 + 2.0 * 2.0 * d * 100352.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
    }

    #[test]
    fn defaults_follow_olmo2_config() {
        let c = config(&[
            (r#""num_key_value_heads": 32,"#, ""),
            (r#""eos_token_id": 100257, "#, ""),
            (r#""rms_norm_eps": 1e-06, "#, ""),
            (r#""tie_word_embeddings": false, "#, ""),
        ])
        .unwrap();
        assert_eq!((c.attention.kv_heads, c.sizes.eos_token_id, c.rms_norm_eps), (32, Some(50279), 1e-5));
        assert!(!c.tie_word_embeddings);
        // A head_dim beside hidden_size / num_attention_heads, as transformers reads it.
        let c = config(&[(r#""use_cache": true"#, r#""head_dim": 64"#)]).unwrap();
        assert_eq!(c.attention.head_dim, 64);
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (r#""num_key_value_heads": 32"#, r#""num_key_value_heads": 5"#, "num_key_value_heads"),
            (
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
                "rope_scaling.rope_type",
            ),
            (r#""hidden_act": "silu""#, r#""hidden_act": "xielu""#, "hidden_act"),
            (r#""num_attention_heads": 32"#, r#""num_attention_heads": 0"#, "num_attention_heads"),
            (r#""use_cache": true"#, r#""head_dim": 63"#, "head_dim"),
        ];
        for (from, to, field) in cases {
            let e = config(&[(from, to)]).unwrap_err().to_string();
            assert!(e.contains("config.json") && e.contains(field), "{from} -> {to}: {e}");
        }
        // Serde's own errors name the file and the position.
        assert!(config(&[(r#""vocab_size": 100352"#, r#""vocab_size": "x""#)]).is_err());
        let e = config(&[(r#""vocab_size": 100352"#, r#""vocab": 1"#)]).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("missing field `vocab_size`"), "{e}");
    }
}
