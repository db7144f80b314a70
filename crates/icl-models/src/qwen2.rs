//! Qwen 2 (Qwen2, Qwen2.5), as Hugging Face's `Qwen2ForCausalLM` computes it.
//!
//! Llama's network (pre-norm RMSNorm blocks normalised in f32, rotary embeddings with `rope_theta` and
//! `rope_scaling` none / linear / llama3, grouped-query attention with `num_key_value_heads` heads
//! scaled by `1/sqrt(head_dim)`, a SwiGLU MLP without biases), with biases on the query, key and value
//! projections and none on the output projection. `head_dim` is not a field of transformers'
//! `Qwen2Config`, but a file that has it sets it (otherwise `hidden_size / num_attention_heads`). The
//! head is `lm_head` or, with `tie_word_embeddings`, the token embedding.
//!
//! Attention windows, as `Qwen2Config` resolves them: `sliding_window` counts only with
//! `use_sliding_window` (otherwise no layer has a window); the layers that `layer_types` marks
//! `sliding_attention` attend to keys fewer than `sliding_window` positions back, and without
//! `layer_types` the layers from `max_window_layers` on do. A `sliding_attention` layer without a
//! window, which transformers refuses when it builds the mask, is refused here with the config.
//!
//! The network is the shared [`RotaryDecoder`](crate::layers::RotaryDecoder), tensor names as the
//! checkpoint: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj`, `model.layers.{i}.{input,post_attention}_layernorm`,
//! `model.norm`, `lm_head`. Qwen 3 (`qwen3.rs`) reads this config with two more fields.

use crate::layers::{
    self, Activation, AttentionSpec, DecoderFields, FieldDefaults, QkNorm, StackConfig, StackSpec, WindowFields,
};
use crate::registry::{ArchConfig, Architecture, ConfigFile};
use crate::rope::RopeParameters;
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["qwen2"], parse };

/// Qwen 2's `config.json`; omitted fields take the defaults of transformers' `Qwen2Config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Qwen2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// 32 when omitted; null means `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// When omitted, `hidden_size / num_attention_heads` (Qwen 3: 128). Null is refused, as
    /// transformers cannot build the model from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    pub hidden_act: String,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// 10000 when neither this nor `rope_parameters` gives it.
    pub rope_theta: f64,
    /// The older spelling of `rope_parameters`; it wins when both are given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// transformers moves it into `rope_parameters`; only 1 (whole heads) is supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    pub use_sliding_window: bool,
    /// 4096 when omitted; null means no window.
    pub sliding_window: Option<i64>,
    pub max_window_layers: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    #[serde(deserialize_with = "layers::token_id", skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
}

impl Default for Qwen2Config {
    /// transformers' `Qwen2Config()` (the Qwen2-7B shape).
    fn default() -> Self {
        Self {
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: Some(32),
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            rope_theta: 10000.0,
            rope_scaling: None,
            rope_parameters: None,
            partial_rotary_factor: None,
            use_sliding_window: false,
            sliding_window: Some(4096),
            max_window_layers: 28,
            layer_types: None,
            eos_token_id: None,
        }
    }
}

/// What Qwen 3's attention changes in Qwen 2's network.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionVariant {
    /// `head_dim` when the file has none; `None`: `hidden_size / num_attention_heads`.
    pub default_head_dim: Option<i64>,
    /// Biases on the query, key and value projections, and on the output projection.
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMSNorms `q_norm` and `k_norm` over each head.
    pub qk_norm: bool,
}

const QWEN2_ATTENTION: AttentionVariant =
    AttentionVariant { default_head_dim: None, qkv_bias: true, o_bias: false, qk_norm: false };

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    let config: Qwen2Config = file.deserialize()?;
    Ok(Arc::new(StackConfig::<Qwen2Config>::new(config.network(file, QWEN2_ATTENTION)?)))
}

impl Qwen2Config {
    /// The validated network of `file` (whose fields these are), with `attention`'s variant of the
    /// attention; errors name the field.
    pub(crate) fn network(&self, file: &ConfigFile, attention: AttentionVariant) -> Result<StackSpec> {
        if file.json.get("head_dim").is_some_and(serde_json::Value::is_null) {
            return Err(file.error("field `head_dim`: null is not a head size"));
        }
        file.positive(&[("num_hidden_layers", self.num_hidden_layers)])?;
        let windows = WindowFields {
            use_sliding_window: self.use_sliding_window,
            sliding_window: self.sliding_window,
            max_window_layers: self.max_window_layers,
            layer_types: self.layer_types.as_deref(),
            num_hidden_layers: self.num_hidden_layers,
        }
        .resolve()
        .map_err(|m| file.error(m))?;
        if let Some(factor) = self.partial_rotary_factor.filter(|&f| f != 1.0) {
            return Err(file.error(format!(
                "field `partial_rotary_factor`: {factor} is not supported (the rotary embedding turns whole heads)"
            )));
        }
        let fields = DecoderFields {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim.or(attention.default_head_dim),
            max_position_embeddings: Some(self.max_position_embeddings),
            rms_norm_eps: Some(self.rms_norm_eps),
            tie_word_embeddings: Some(self.tie_word_embeddings),
            attention_bias: false,
            rope_theta: Some(self.rope_theta),
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
            eos_token_id: self.eos_token_id,
        };
        let act = Activation::parse(&self.hidden_act, "hidden_act").map_err(|m| file.error(m))?;
        let stack = StackSpec::new(file, &fields, &DEFAULTS, act)?;
        let qk_norm = if attention.qk_norm { QkNorm::PerHead { eps: stack.rms_norm_eps } } else { QkNorm::None };
        let attention =
            AttentionSpec { qkv_bias: attention.qkv_bias, o_bias: attention.o_bias, qk_norm, ..stack.attention };
        Ok(StackSpec { attention, windows, ..stack })
    }
}

/// What a Qwen config omits that `Qwen2Config`'s serde defaults do not fill (null key-value heads: one
/// per query head).
const DEFAULTS: FieldDefaults = FieldDefaults {
    num_key_value_heads: None,
    head_dim: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    eos_token_id: None,
};

/// Qwen 2's layers: the shared Llama-shaped decoder. The model is [`Qwen2`].
pub type Qwen2Decoder = layers::RotaryDecoder<Qwen2Config>;

/// Qwen 2 for causal language modelling.
pub type Qwen2 = crate::Model<Qwen2Decoder>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Declared;
    use std::path::Path;
    use tch::nn::VarStore;

    /// Qwen2.5-0.5B's config.json.
    const QWEN25_05B: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
        "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#;

    /// Qwen2.5-0.5B's config with `extra` fields added.
    fn with(extra: &str) -> String {
        QWEN25_05B.replace(r#""use_cache": true"#, extra)
    }

    fn config(json: &str) -> Result<Arc<dyn ArchConfig>> {
        parse(&ConfigFile::parse(Path::new("config.json"), json.to_owned())?)
    }

    fn error(json: &str) -> String {
        config(json).unwrap_err().to_string()
    }

    fn declared(json: &str) -> Box<dyn Declared> {
        let c = config(json).unwrap();
        layers::declare_shapes_only(|| c.declare(VarStore::new(tch::Device::Cpu), Path::new("."))).unwrap()
    }

    /// The windows of a 4-layer config with the window fields `fields`.
    fn windows(fields: &str) -> Vec<Option<i64>> {
        let json = format!(r#"{{"model_type": "qwen2", "num_hidden_layers": 4 {fields}}}"#);
        let c: Qwen2Config = serde_json::from_str(&json).unwrap();
        let fields = WindowFields {
            use_sliding_window: c.use_sliding_window,
            sliding_window: c.sliding_window,
            max_window_layers: c.max_window_layers,
            layer_types: c.layer_types.as_deref(),
            num_hidden_layers: c.num_hidden_layers,
        };
        fields.resolve().unwrap()
    }

    #[test]
    fn qwen25_shape_parses_and_counts_parameters() {
        let model = declared(QWEN25_05B).into_causal_lm();
        // Qwen2.5-0.5B has 494,032,768 parameters (tied head counted once, q/k/v biases included).
        assert_eq!(model.parameter_bytes(), 494_032_768 * 4);
        assert_eq!((model.max_length(), model.eos_token_id(), model.vocab_size()), (32768, Some(151643), 151936));
        // Dense: 24 layers x 2 x (2*896*896 + 2*896*128 + 3*896*4864) per token; attention 4*896 per key.
        let expected = 10.0 * 24.0 * 2.0 * (2.0 * 896.0 * 896.0 + 2.0 * 896.0 * 128.0 + 3.0 * 896.0 * 4864.0)
            + 24.0 * 4.0 * 896.0 * 55.0
            + 2.0 * 2.0 * 896.0 * 151936.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
        let variables = declared(QWEN25_05B).var_store().variables();
        assert!(variables.contains_key("model.layers.3.self_attn.k_proj.bias"));
        assert!(!variables.keys().any(|n| n.contains("o_proj.bias") || n.contains("mlp.up_proj.bias")));
        assert!(!variables.contains_key("lm_head.weight"));
        // A head_dim in the file is honoured (transformers' attention reads it when present).
        let variables = declared(&with(r#""head_dim": 32"#)).var_store().variables();
        assert_eq!(variables["model.layers.0.self_attn.q_proj.weight"].size(), [14 * 32, 896]);
    }

    #[test]
    fn windows_resolve_as_transformers_does() {
        // Without use_sliding_window no layer has a window, whatever the other fields say.
        assert_eq!(windows(r#", "sliding_window": 8, "max_window_layers": 1"#), [None; 4]);
        // The layers from max_window_layers on, with sliding_window (4096 when omitted, none when null).
        let w = windows(r#", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1"#);
        assert_eq!(w, [None, Some(8), Some(8), Some(8)]);
        assert_eq!(windows(r#", "use_sliding_window": true, "max_window_layers": 3"#), [None, None, None, Some(4096)]);
        assert_eq!(
            windows(r#", "use_sliding_window": true, "sliding_window": null, "max_window_layers": 0"#),
            [None; 4]
        );
        // layer_types wins over max_window_layers; `attention` is the legacy name of full attention.
        let types = r#""layer_types": ["sliding_attention", "full_attention", "attention", "sliding_attention"]"#;
        let w =
            windows(&format!(r#", "use_sliding_window": true, "sliding_window": 5, "max_window_layers": 0, {types}"#));
        assert_eq!(w, [Some(5), None, None, Some(5)]);
        // A window no layer has is not checked.
        assert_eq!(windows(r#", "use_sliding_window": true, "sliding_window": 0, "max_window_layers": 4"#), [None; 4]);
        // The FLOPs count each layer's window: of 10 tokens' 55 keys, a window of 5 keeps 15 + 5 * 5.
        let json = QWEN25_05B.replace(r#""use_sliding_window": false"#, r#""use_sliding_window": true"#);
        let json = json.replace(r#""sliding_window": 32768"#, r#""sliding_window": 5"#);
        let json = json.replace(r#""max_window_layers": 24"#, r#""max_window_layers": 20"#);
        let (windowed, full) = (declared(&json).into_causal_lm(), declared(QWEN25_05B).into_causal_lm());
        assert_eq!(full.forward_flops(&[10], 1) - windowed.forward_flops(&[10], 1), 4.0 * 4.0 * 896.0 * 15.0);
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = error(&with(r#""layer_types": ["sliding_attention"]"#));
        assert!(e.contains("config.json") && e.contains("field `layer_types`: 1 entries"), "{e}");
        let full = r#""full_attention", "#.repeat(23);
        let e = error(&with(&format!(r#""layer_types": [{full}"chunked_attention"]"#)));
        assert!(e.contains("field `layer_types`") && e.contains("chunked_attention"), "{e}");
        // A sliding layer needs a window, which use_sliding_window false takes away.
        let e = error(&with(&format!(r#""layer_types": [{full}"sliding_attention"]"#)));
        assert!(e.contains("field `layer_types`") && e.contains("use_sliding_window"), "{e}");
        let json = QWEN25_05B.replace(r#""use_sliding_window": false"#, r#""use_sliding_window": true"#);
        let json = json.replace(r#""max_window_layers": 24"#, r#""max_window_layers": 23"#);
        let e = error(&json.replace(r#""sliding_window": 32768"#, r#""sliding_window": 0"#));
        assert!(e.contains("field `sliding_window`: 0"), "{e}");
        let e = error(&QWEN25_05B.replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 4"#));
        assert!(e.contains("field `num_key_value_heads`: 4 does not divide num_attention_heads 14"), "{e}");
        // num_key_value_heads is 32 when omitted, as in transformers (14 heads cannot share 32), and
        // num_attention_heads when null.
        let e = error(&QWEN25_05B.replace(r#""num_key_value_heads": 2,"#, ""));
        assert!(e.contains("field `num_key_value_heads`: 32 does not divide"), "{e}");
        assert!(config(&QWEN25_05B.replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": null"#)).is_ok());
        let e = error(&with(r#""head_dim": null"#));
        assert!(e.contains("field `head_dim`"), "{e}");
        let e = error(&with(r#""rope_scaling": {"type": "yarn", "factor": 4}"#));
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
        let e = error(&with(r#""partial_rotary_factor": 0.5"#));
        assert!(e.contains("field `partial_rotary_factor`: 0.5"), "{e}");
        let e = error(&QWEN25_05B.replace(r#""silu""#, r#""quick_gelu""#));
        assert!(e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");
        let e = error(&QWEN25_05B.replace(r#""num_hidden_layers": 24"#, r#""num_hidden_layers": -1"#));
        assert!(e.contains("field `num_hidden_layers`: -1"), "{e}");
        assert!(config(&QWEN25_05B.replace(r#""eos_token_id": 151643"#, r#""eos_token_id": "x""#)).is_err());
    }

    #[test]
    fn defaults_are_transformers_and_rope_scaling_wins() {
        let defaults: Qwen2Config = serde_json::from_str(r#"{"eos_token_id": [2, 3]}"#).unwrap();
        assert_eq!((defaults.num_key_value_heads, defaults.sliding_window), (Some(32), Some(4096)));
        assert_eq!((defaults.max_window_layers, defaults.rope_theta, defaults.eos_token_id), (28, 1e4, Some(2)));
        // rope_scaling, when given, replaces rope_parameters (whose type would be refused).
        let rope = r#""rope_parameters": {"rope_type": "yarn"}, "rope_scaling": {"rope_type": "linear", "factor": 2}"#;
        assert!(config(&with(rope)).is_ok());
        assert!(error(&with(r#""rope_parameters": {"rope_type": "yarn"}"#)).contains("rope_parameters.rope_type"));
    }
}
