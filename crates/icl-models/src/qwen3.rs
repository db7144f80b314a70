//! Qwen 3 (the dense models), as Hugging Face's `Qwen3ForCausalLM` computes it.
//!
//! Qwen 2's network and config (`qwen2.rs`: rotary embeddings, grouped-query attention, SwiGLU MLP,
//! attention windows from `use_sliding_window`, `sliding_window`, `max_window_layers` and
//! `layer_types`, tied or untied head) with three changes to the attention: an RMSNorm over each
//! query and key head (`q_norm`, `k_norm` of `head_dim`, eps `rms_norm_eps`, normalised in f32 and
//! cast back before the gain) before the rotary embedding; `head_dim` a field of its own, 128 when
//! omitted (not `hidden_size / num_attention_heads`); and biases on all four projections, or none,
//! after `attention_bias` (default false). Tensor names as Qwen 2's, plus
//! `model.layers.{i}.self_attn.{q,k}_norm`.

use crate::layers;
use crate::qwen2::{AttentionVariant, Qwen2Config};
use crate::registry::{ArchConfig, Architecture, ConfigFile};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["qwen3"], parse };

/// transformers' `Qwen3Config.head_dim` default.
const DEFAULT_HEAD_DIM: i64 = 128;

/// Qwen 3's `config.json`: Qwen 2's fields (with transformers' `Qwen3Config` defaults, which are
/// `Qwen2Config`'s but for `head_dim`) and `attention_bias`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Qwen3Config {
    /// The fields Qwen 3 shares with Qwen 2; `head_dim` is 128 when omitted.
    #[serde(flatten)]
    pub qwen2: Qwen2Config,
    /// Biases on the query, key, value and output projections.
    pub attention_bias: bool,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    let config: Qwen3Config = file.deserialize()?;
    let bias = config.attention_bias;
    let attention =
        AttentionVariant { default_head_dim: Some(DEFAULT_HEAD_DIM), qkv_bias: bias, o_bias: bias, qk_norm: true };
    Ok(Arc::new(layers::StackConfig::<Qwen3Config>::new(config.qwen2.network(file, attention)?)))
}

/// Qwen 3's layers: the shared Llama-shaped decoder with q/k norms. The model is [`Qwen3`].
pub type Qwen3Decoder = layers::RotaryDecoder<Qwen3Config>;

/// Qwen 3 for causal language modelling.
pub type Qwen3 = crate::Model<Qwen3Decoder>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Declared;
    use std::path::Path;
    use tch::nn::VarStore;

    /// Qwen3-0.6B's config.json.
    const QWEN3_06B: &str = r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151936}"#;

    fn config(json: &str) -> Result<Arc<dyn ArchConfig>> {
        parse(&ConfigFile::parse(Path::new("config.json"), json.to_owned())?)
    }

    fn declared(json: &str) -> Box<dyn Declared> {
        let c = config(json).unwrap();
        layers::declare_shapes_only(|| c.declare(VarStore::new(tch::Device::Cpu), Path::new("."))).unwrap()
    }

    #[test]
    fn qwen3_shape_parses_and_counts_parameters() {
        let model = declared(QWEN3_06B).into_causal_lm();
        // Qwen3-0.6B has 596,049,920 parameters (tied head counted once, q/k norms included).
        assert_eq!(model.parameter_bytes(), 596_049_920 * 4);
        assert_eq!((model.max_length(), model.eos_token_id()), (40960, Some(151645)));
        // Dense: 28 layers x 2 x (2*1024*2048 + 2*1024*1024 + 3*1024*3072) per token; 4*2048 per key.
        let expected = 10.0 * 28.0 * 2.0 * (2.0 * 1024.0 * 2048.0 + 2.0 * 1024.0 * 1024.0 + 3.0 * 1024.0 * 3072.0)
            + 28.0 * 4.0 * 2048.0 * 55.0
            + 2.0 * 2.0 * 1024.0 * 151936.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
        let variables = declared(QWEN3_06B).var_store().variables();
        assert_eq!(variables["model.layers.27.self_attn.k_norm.weight"].size(), [128]);
        assert!(!variables.keys().any(|n| n.ends_with("bias")));
    }

    #[test]
    fn head_dim_defaults_to_128_and_attention_bias_covers_every_projection() {
        let json =
            QWEN3_06B.replace(r#""head_dim": 128,"#, "").replace(r#""hidden_size": 1024"#, r#""hidden_size": 512"#);
        let json = json.replace(r#""attention_bias": false"#, r#""attention_bias": true"#);
        let variables = declared(&json).var_store().variables();
        assert_eq!(variables["model.layers.0.self_attn.q_proj.weight"].size(), [16 * 128, 512]);
        for (name, size) in [("q_proj", 16 * 128), ("k_proj", 8 * 128), ("v_proj", 8 * 128), ("o_proj", 512)] {
            assert_eq!(variables[&format!("model.layers.0.self_attn.{name}.bias")].size(), [size], "{name}");
        }
        assert!(!variables.keys().any(|n| n.contains("mlp") && n.ends_with("bias")));
    }

    #[test]
    fn config_errors_name_the_field() {
        let error = |json: &str| config(json).unwrap_err().to_string();
        let e = error(&QWEN3_06B.replace(r#""head_dim": 128"#, r#""head_dim": null"#));
        assert!(e.contains("config.json") && e.contains("field `head_dim`"), "{e}");
        let e = error(&QWEN3_06B.replace(r#""head_dim": 128"#, r#""head_dim": 127"#));
        assert!(e.contains("field `head_dim`: 127"), "{e}");
        let types = r#""full_attention", "#.repeat(27) + r#""sliding_attention""#;
        let e = error(&QWEN3_06B.replace(r#""use_cache": true"#, &format!(r#""layer_types": [{types}]"#)));
        assert!(e.contains("field `layer_types`") && e.contains("layer 27"), "{e}");
        let e = error(&QWEN3_06B.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"rope_type": "dynamic"}"#));
        assert!(e.contains("rope_scaling.rope_type") && e.contains("dynamic"), "{e}");
        assert!(config(&QWEN3_06B.replace(r#""attention_bias": false"#, r#""attention_bias": 1"#)).is_err());
    }
}
