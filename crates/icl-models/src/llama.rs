//! Llama (and Mistral, SmolLM2, ...), as Hugging Face's `LlamaForCausalLM` / `MistralForCausalLM`
//! compute it.
//!
//! Pre-norm blocks with RMSNorm (normalised in f32), rotary position embeddings on queries and keys
//! (`rope_theta`, `rope_scaling` none / linear / llama3), grouped-query attention with
//! `num_key_value_heads` heads for keys and values, scaled by `1/sqrt(head_dim)`, and a SwiGLU MLP
//! `down(act(gate(x)) * up(x))`. `head_dim` may differ from `hidden_size / num_attention_heads`;
//! `attention_bias` and `mlp_bias` add biases; the head is `lm_head` or, with `tie_word_embeddings`,
//! the token embedding. Mistral is the same network with an optional `sliding_window` (keys at most
//! `sliding_window - 1` positions back). Tensor names follow the checkpoint:
//! `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
//! `model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head`.

use crate::defaults;
use crate::layers::{self, Activation, DecoderFields, FieldDefaults, StackConfig, StackSpec};
use crate::registry::{ArchConfig, Architecture, ConfigFile};
use crate::rope::RopeParameters;
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["llama", "mistral"], parse };

/// Mistral's default when `sliding_window` is absent (null means no window).
const MISTRAL_SLIDING_WINDOW: i64 = 4096;

/// Llama's (or Mistral's) `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    #[serde(default = "defaults::silu")]
    pub hidden_act: String,
    #[serde(default = "defaults::positions_2048")]
    pub max_position_embeddings: i64,
    #[serde(default = "defaults::eps_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "defaults::theta_10000")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Mistral only: attend to keys less than this many positions back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    /// Token ids are written as `null` when absent, not left out: transformers' Llama defaults a
    /// missing `bos_token_id` to 1 and `eos_token_id` to 2.
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
    /// Not read by the model; kept so that a config written from this struct (`icl import-gguf`) is
    /// complete for Hugging Face transformers. A value that is not a token id reads as `None`.
    #[serde(default, deserialize_with = "layers::lenient_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "layers::lenient_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// The checkpoint's dtype, in transformers 4's (`torch_dtype`) and 5's (`dtype`) spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl LlamaConfig {
    /// Each head's width: `head_dim`, or `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key-value heads: `num_key_value_heads`, or one per attention head.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(StackConfig::<LlamaConfig>::new(validate(file, &file.deserialize()?)?)))
}

/// What a Llama config omits that `LlamaConfig`'s serde defaults do not fill.
const DEFAULTS: FieldDefaults = FieldDefaults {
    num_key_value_heads: None,
    head_dim: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
    rope_theta: 10000.0,
    eos_token_id: None,
};

/// The validated network: the shared stack with Llama's biases and Mistral's window on every layer.
fn validate(file: &ConfigFile, c: &LlamaConfig) -> Result<StackSpec> {
    // Mistral's window defaults on when the field is absent; Llama ignores the field (honouring it
    // would change the model).
    let sliding_window = match file.model_type.as_str() {
        "mistral" if !file.has("sliding_window") => Some(MISTRAL_SLIDING_WINDOW),
        "mistral" => c.sliding_window,
        _ => None,
    };
    file.positive(&[("sliding_window", sliding_window.unwrap_or(1))])?;
    let fields = DecoderFields {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        max_position_embeddings: Some(c.max_position_embeddings),
        rms_norm_eps: Some(c.rms_norm_eps),
        tie_word_embeddings: Some(c.tie_word_embeddings),
        attention_bias: c.attention_bias,
        rope_theta: Some(c.rope_theta),
        rope_scaling: c.rope_scaling.clone(),
        rope_parameters: c.rope_parameters.clone(),
        eos_token_id: c.eos_token_id,
    };
    let act = Activation::parse(&c.hidden_act, "hidden_act").map_err(|m| file.error(m))?;
    let stack = StackSpec::new(file, &fields, &DEFAULTS, act)?;
    let windows = vec![sliding_window; stack.windows.len()];
    Ok(StackSpec { windows, mlp_bias: c.mlp_bias, ..stack })
}

/// Llama's (or Mistral's) layers: the shared rotary stack. The model is [`Llama`].
pub type LlamaDecoder = layers::RotaryDecoder<LlamaConfig>;

/// Llama (or Mistral) for causal language modelling.
pub type Llama = crate::Model<LlamaDecoder>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tch::nn::VarStore;

    const SMOLLM2: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 0,
        "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 49152}"#;

    fn config(json: &str, model_type: &str) -> Result<StackSpec> {
        let json = json.replace(r#""model_type": "llama""#, &format!(r#""model_type": "{model_type}""#));
        let file = ConfigFile::parse(Path::new("config.json"), json)?;
        validate(&file, &file.deserialize()?)
    }

    #[test]
    fn smollm2_shape_parses_and_counts_parameters() {
        let c = config(SMOLLM2, "llama").unwrap();
        assert_eq!((c.attention.head_dim, c.attention.kv_heads, c.sizes.eos_token_id), (64, 3, Some(0)));
        assert_eq!(c.rope.theta, 100000.0);
        let c = StackConfig::<LlamaConfig>::new(c);
        let model = c.declare(VarStore::new(tch::Device::Cpu), Path::new(".")).unwrap().into_causal_lm();
        // SmolLM2-135M has 134,515,008 parameters (tied head counted once).
        assert_eq!(model.parameter_bytes(), 134_515_008 * 4);
        // Dense: 30 layers x 2 x (2*576*576 + 2*576*192 + 3*576*1536) per token; attention 4*576 per key.
        let expected = 10.0 * 30.0 * 2.0 * (2.0 * 576.0 * 576.0 + 2.0 * 576.0 * 192.0 + 3.0 * 576.0 * 1536.0)
            + 30.0 * 4.0 * 576.0 * 55.0
            + 2.0 * 2.0 * 576.0 * 49152.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = SMOLLM2.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 2"#);
        let e = config(&bad, "llama").unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads") && e.contains("config.json"), "{e}");
        let bad = SMOLLM2.replace(r#""rope_scaling": null"#, r#""rope_scaling": {"type": "dynamic", "factor": 2}"#);
        let e = config(&bad, "llama").unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("dynamic"), "{e}");
        let bad = SMOLLM2.replace(r#""silu""#, r#""quick_gelu""#);
        let e = config(&bad, "llama").unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");
        let bad = SMOLLM2.replace(r#""eos_token_id": 0"#, r#""eos_token_id": "x""#);
        assert!(config(&bad, "llama").is_err());
    }

    #[test]
    fn eos_lists_and_mistral_windows() {
        let json = SMOLLM2.replace(r#""eos_token_id": 0"#, r#""eos_token_id": [128001, 128009]"#);
        assert_eq!(config(&json, "llama").unwrap().sizes.eos_token_id, Some(128001));
        // Mistral's window defaults to 4096 when absent, and null turns it off; Llama never has one.
        assert_eq!(config(SMOLLM2, "mistral").unwrap().windows[0], Some(4096));
        let json = SMOLLM2.replace(r#""use_cache": true"#, r#""sliding_window": null"#);
        assert_eq!(config(&json, "mistral").unwrap().windows[0], None);
        let json = SMOLLM2.replace(r#""use_cache": true"#, r#""sliding_window": 16"#);
        assert_eq!(config(&json, "llama").unwrap().windows[0], None);
    }
}
