//! Gemma 2, as Hugging Face's `Gemma2ForCausalLM` computes it.
//!
//! Token embeddings multiplied by `sqrt(hidden_size)` (rounded to the compute dtype, as the reference's
//! normalizer), blocks with RMSNorms scaling by `1 + weight` both before and after attention and the
//! MLP (`input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm`,
//! `post_feedforward_layernorm`), grouped-query attention with `head_dim` given, rotary embeddings,
//! scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped, `cap * tanh(scores / cap)` with
//! `attn_logit_softcapping`, a GeGLU MLP (`hidden_activation`), and final logits soft-capped with
//! `final_logit_softcapping`. `layer_types` says which layers attend only to keys fewer than
//! `sliding_window` positions back (`sliding_attention`); without it the even layers (0, 2, ...)
//! slide, as in transformers. The head is tied to the embedding unless `tie_word_embeddings` is false.
//! Tensor names follow the checkpoint: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj`, the four norms under `model.layers.{i}`, `model.norm`,
//! `lm_head`. The stack itself is `layers::RotaryDecoder`.

use crate::layers::{
    Activation, AttentionSpec, BlockNorms, DecoderFields, FieldDefaults, RmsStyle, RotaryDecoder, StackConfig,
    StackSpec,
};
use crate::registry::{ArchConfig, Architecture, ConfigFile};
use crate::Result;
use serde::Deserialize;
use std::sync::Arc;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["gemma2"], parse };

/// Norms before and after both attention and the MLP.
const NORMS: BlockNorms = BlockNorms {
    pre_attention: Some("input_layernorm"),
    post_attention: Some("post_attention_layernorm"),
    pre_mlp: Some("pre_feedforward_layernorm"),
    post_mlp: Some("post_feedforward_layernorm"),
};

/// `Gemma2Config`'s defaults for the shared fields.
const DEFAULTS: FieldDefaults = FieldDefaults {
    num_key_value_heads: Some(4),
    head_dim: Some(256),
    max_position_embeddings: 8192,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    rope_theta: 10000.0,
    eos_token_id: Some(1),
};

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

fn default_hidden_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> Option<i64> {
    Some(4096)
}
fn default_final_logit_softcapping() -> Option<f64> {
    Some(30.0)
}
fn default_attn_logit_softcapping() -> Option<f64> {
    Some(50.0)
}

/// Gemma 2's `config.json`, with Hugging Face's defaults for omitted fields (null turns a window or a
/// cap off).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
    #[serde(flatten)]
    pub decoder: DecoderFields,
    #[serde(default = "default_hidden_activation")]
    pub hidden_activation: String,
    /// Scores are scaled by `query_pre_attn_scalar ** -0.5`.
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    /// In `sliding_attention` layers, keys fewer than this many positions back.
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<i64>,
    /// `sliding_attention` or `full_attention`, one per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_final_logit_softcapping")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "default_attn_logit_softcapping")]
    pub attn_logit_softcapping: Option<f64>,
    /// Encoder use (EmbeddingGemma); refused when true.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

/// Gemma 2's layers; the model is [`Gemma2`].
pub type Gemma2Decoder = RotaryDecoder<Gemma2Config>;

/// Gemma 2 for causal language modelling.
pub type Gemma2 = crate::Model<Gemma2Decoder>;

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(StackConfig::<Gemma2Config>::new(validate(file, &file.deserialize()?)?)))
}

fn validate(file: &ConfigFile, c: &Gemma2Config) -> Result<StackSpec> {
    if c.use_bidirectional_attention == Some(true) {
        return Err(file.error("field `use_bidirectional_attention`: bidirectional attention is not supported"));
    }
    let per_layer_type = |p: &serde_json::Value| [SLIDING, FULL].iter().any(|t| p.get(t).is_some());
    if file.json.get("rope_parameters").is_some_and(per_layer_type) {
        return Err(file.error("field `rope_parameters`: RoPE parameters per layer type are not supported"));
    }
    // Gemma2Config checks this even when head_dim is given.
    file.divisible(("hidden_size", c.decoder.hidden_size), ("num_attention_heads", c.decoder.num_attention_heads))?;
    let positive = |field: &str, value: Option<f64>| match value {
        Some(v) if v.is_nan() || v <= 0.0 => Err(file.error(format!("field `{field}`: {v} is not positive"))),
        _ => Ok(()),
    };
    positive("query_pre_attn_scalar", Some(c.query_pre_attn_scalar))?;
    positive("attn_logit_softcapping", c.attn_logit_softcapping)?;
    positive("final_logit_softcapping", c.final_logit_softcapping)?;
    let act = Activation::parse(&c.hidden_activation, "hidden_activation").map_err(|m| file.error(m))?;
    let stack = StackSpec::new(file, &c.decoder, &DEFAULTS, act)?;
    Ok(StackSpec {
        attention: AttentionSpec {
            scale: c.query_pre_attn_scalar.powf(-0.5),
            softcap: c.attn_logit_softcapping,
            ..stack.attention
        },
        norms: NORMS,
        norm_style: RmsStyle::OnePlusGain,
        windows: windows(file, c)?,
        scale_embeddings: true,
        final_softcap: c.final_logit_softcapping,
        ..stack
    })
}

/// Each layer's window: `sliding_window` for the `sliding_attention` layers, none for the others.
fn windows(file: &ConfigFile, c: &Gemma2Config) -> Result<Vec<Option<i64>>> {
    let n = c.decoder.num_hidden_layers.max(0) as usize;
    let types: Vec<&str> = match &c.layer_types {
        Some(types) if types.len() != n => {
            return Err(file.error(format!("field `layer_types`: {} entries for {n} layers", types.len())))
        }
        Some(types) => types.iter().map(String::as_str).collect(),
        None => (0..n).map(|i| if i % 2 == 0 { SLIDING } else { FULL }).collect(),
    };
    types
        .into_iter()
        .map(|t| match (t, c.sliding_window) {
            (FULL, _) => Ok(None),
            (SLIDING, Some(w)) if w > 0 => Ok(Some(w)),
            (SLIDING, w) => Err(file.error(format!(
                "field `sliding_window`: {} for sliding_attention layers, which need a positive window",
                w.map_or("null".to_owned(), |w| w.to_string())
            ))),
            (other, _) => {
                Err(file
                    .error(format!("field `layer_types`: `{other}` is not supported (supported: {SLIDING}, {FULL})")))
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;
    use tch::nn::VarStore;

    const GEMMA_2_2B: &str = r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
        "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "use_cache": true, "vocab_size": 256000}"#;

    fn config(edits: &[(&str, &str)]) -> Result<StackSpec> {
        crate::registry::edited_config(GEMMA_2_2B, edits, validate)
    }

    fn error(from: &str, to: &str) -> String {
        config(&[(from, to)]).unwrap_err().to_string()
    }

    #[test]
    fn gemma_2_2b_parses_and_counts_parameters() {
        let c = config(&[]).unwrap();
        let a = &c.attention;
        assert_eq!((a.heads, a.kv_heads, a.head_dim, a.softcap, a.scale), (8, 4, 256, Some(50.0), 1.0 / 16.0));
        assert_eq!((c.sizes.eos_token_id, c.final_softcap, c.tie_word_embeddings), (Some(1), Some(30.0), true));
        // No layer_types: layers 0, 2, ... slide.
        assert_eq!(c.windows[..3], [Some(4096), None, Some(4096)]);
        assert_eq!(c.windows.len(), 26);
        let arch = StackConfig::<Gemma2Config>::new(c);
        let model = arch.declare(VarStore::new(tch::Device::Cpu), Path::new(".")).unwrap().into_causal_lm();
        // Gemma-2-2B has 2,614,341,888 parameters (tied head counted once).
        assert_eq!(model.parameter_bytes(), 2_614_341_888 * 4);
        assert_eq!(arch.stage_of("model.layers.3.pre_feedforward_layernorm.weight"), Some(crate::Stage::Block(3)));
    }

    #[test]
    fn flops_count_each_layers_window() {
        let c = config(&[(r#""sliding_window": 4096"#, r#""sliding_window": 4"#)]).unwrap();
        let model = StackConfig::<Gemma2Config>::new(c)
            .declare(VarStore::new(tch::Device::Cpu), Path::new("."))
            .unwrap()
            .into_causal_lm();
        let (d, q, kv, inner) = (2304.0, 2048.0, 1024.0, 9216.0);
        // 13 sliding layers see at most 4 keys (1+2+3+4 + 6*4 = 34 of 10 tokens), 13 full ones 55.
        let expected = 10.0 * 26.0 * 2.0 * (2.0 * d * q + 2.0 * d * kv + 3.0 * d * inner)
            + 4.0 * q * (13.0 * 34.0 + 13.0 * 55.0)
            + 2.0 * 2.0 * d * 256000.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
    }

    #[test]
    fn layer_types_and_defaults() {
        let types = r#""layer_types": ["full_attention", "sliding_attention", "sliding_attention"]"#;
        let c = config(&[(r#""num_hidden_layers": 26"#, r#""num_hidden_layers": 3"#), (r#""use_cache": true"#, types)]);
        assert_eq!(c.unwrap().windows, [None, Some(4096), Some(4096)]);
        // Hugging Face's defaults: 4 key-value heads, head_dim 256, caps on, eos 1; null caps are off.
        let c = config(&[
            (r#""num_key_value_heads": 4, "#, ""),
            (r#""head_dim": 256, "#, ""),
            (r#""eos_token_id": [1, 107], "#, ""),
            (r#""final_logit_softcapping": 30.0"#, r#""final_logit_softcapping": null"#),
        ])
        .unwrap();
        assert_eq!((c.attention.kv_heads, c.attention.head_dim, c.sizes.eos_token_id), (4, 256, Some(1)));
        assert_eq!((c.final_softcap, c.attention.softcap), (None, Some(50.0)));
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = error(r#""use_cache": true"#, r#""layer_types": ["full_attention"]"#);
        assert!(e.contains("config.json") && e.contains("layer_types") && e.contains("1 entries for 26"), "{e}");
        let types = format!(r#""layer_types": [{}"chunked_attention"]"#, r#""full_attention", "#.repeat(25));
        let e = error(r#""use_cache": true"#, &types);
        assert!(e.contains("layer_types") && e.contains("chunked_attention"), "{e}");
        let e = error(r#""sliding_window": 4096"#, r#""sliding_window": null"#);
        assert!(e.contains("sliding_window") && e.contains("null"), "{e}");
        let e = error(r#""rope_theta": 10000.0"#, r#""rope_scaling": {"rope_type": "dynamic", "factor": 2.0}"#);
        assert!(e.contains("rope_scaling.rope_type") && e.contains("dynamic"), "{e}");
        let e = error(r#""rope_theta": 10000.0"#, r#""rope_parameters": {"full_attention": {"rope_theta": 1e6}}"#);
        assert!(e.contains("rope_parameters") && e.contains("layer type"), "{e}");
        let e = error(r#""use_cache": true"#, r#""use_bidirectional_attention": true"#);
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = error(r#""hidden_activation": "gelu_pytorch_tanh""#, r#""hidden_activation": "quick_gelu""#);
        assert!(e.contains("hidden_activation") && e.contains("quick_gelu"), "{e}");
        let e = error(r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 3"#);
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = error(r#""attn_logit_softcapping": 50.0"#, r#""attn_logit_softcapping": 0"#);
        assert!(e.contains("attn_logit_softcapping"), "{e}");
        let e = error(r#""num_attention_heads": 8"#, r#""num_attention_heads": 7"#);
        assert!(e.contains("hidden_size") && e.contains("num_attention_heads"), "{e}");
        let e = error(r#""rope_theta": 10000.0"#, r#""rope_parameters": {"partial_rotary_factor": 0.5}"#);
        assert!(e.contains("partial_rotary_factor"), "{e}");
    }
}
