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

use crate::generate::{cached_kv, key_positions};
use crate::layers::{self, Activation, Linear, RmsNorm};
use crate::rope::{RopeFields, RopeParameters, RopeSpec, Rotary};
use crate::{CausalLm, Error, Hooks, KvCache, ModelInput, Result, Stage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_positions() -> i64 {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
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
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_rope_theta")]
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
    #[serde(skip)]
    rope: Option<RopeSpec>,
}

impl LlamaConfig {
    /// Parses and validates `config.json` of `model_type` `llama` or `mistral`; errors name the file
    /// and field.
    pub fn from_json(path: &Path, text: &str, model_type: &str) -> Result<Self> {
        let mut config: Self = layers::parse_config(path, text)?;
        let fail = |message: String| Error::Config { path: path.to_owned(), message };
        if model_type == "mistral" {
            let json: serde_json::Value = layers::parse_config(path, text)?;
            if json.get("sliding_window").is_none() {
                config.sliding_window = Some(MISTRAL_SLIDING_WINDOW);
            }
        } else if config.sliding_window.is_some() {
            // Llama ignores the field; honouring it would change the model.
            config.sliding_window = None;
        }
        for (field, value) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.kv_heads()),
            ("sliding_window", config.sliding_window.unwrap_or(1)),
        ] {
            if value <= 0 {
                return Err(fail(format!("field `{field}`: {value} is not positive")));
            }
        }
        if config.head_dim.is_none() && config.hidden_size % config.num_attention_heads != 0 {
            return Err(fail(format!(
                "field `hidden_size`: {} is not divisible by num_attention_heads {} (and no head_dim is given)",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let head_dim = config.head_dim();
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(fail(format!("field `head_dim`: {head_dim} is not a positive even number")));
        }
        if config.num_attention_heads % config.kv_heads() != 0 {
            return Err(fail(format!(
                "field `num_key_value_heads`: num_attention_heads {} is not a multiple of {}",
                config.num_attention_heads,
                config.kv_heads()
            )));
        }
        Activation::parse(&config.hidden_act, "hidden_act").map_err(&fail)?;
        let rope = RopeSpec::resolve(RopeFields {
            rope_scaling: config.rope_scaling.as_ref(),
            rope_parameters: config.rope_parameters.as_ref(),
            theta: config.rope_theta,
            partial_rotary_factor: 1.0,
            max_position_embeddings: config.max_position_embeddings,
        })
        .map_err(&fail)?;
        if rope.partial_rotary_factor != 1.0 {
            return Err(fail("field `partial_rotary_factor`: Llama rotates whole heads".into()));
        }
        config.rope = Some(rope);
        Ok(config)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn rope(&self) -> Result<RopeSpec> {
        self.rope.ok_or_else(|| Error::Config {
            path: "config.json".into(),
            message: "LlamaConfig must come from LlamaConfig::from_json".into(),
        })
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &LlamaConfig) -> Result<Self> {
        let (d, hd, bias) = (c.hidden_size, c.head_dim(), c.attention_bias);
        let (heads, kv_heads) = (c.num_attention_heads, c.kv_heads());
        Ok(Self {
            q_proj: Linear::new(&p / "q_proj", d, heads * hd, bias)?,
            k_proj: Linear::new(&p / "k_proj", d, kv_heads * hd, bias)?,
            v_proj: Linear::new(&p / "v_proj", d, kv_heads * hd, bias)?,
            o_proj: Linear::new(&p / "o_proj", heads * hd, d, bias)?,
            heads,
            kv_heads,
            head_dim: hd,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.size3()?;
        let split = |proj: &Linear, heads: i64| -> Result<Tensor> {
            Ok(proj.forward(x)?.f_view([b, t, heads, self.head_dim])?.f_transpose(1, 2)?)
        };
        let q = rotary.apply(&split(&self.q_proj, self.heads)?, cos, sin)?;
        let k = rotary.apply(&split(&self.k_proj, self.kv_heads)?, cos, sin)?;
        let (k, v) = cached_kv(cache, layer, k, split(&self.v_proj, self.kv_heads)?)?;
        let y = layers::attention(&q, &k, &v, mask, 1.0 / (self.head_dim as f64).sqrt())?;
        self.o_proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.gate_proj.forward(x)?)?.f_mul(&self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Llama (or Mistral) for causal language modelling.
#[derive(Debug)]
pub struct Llama {
    vs: VarStore,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `lm_head.weight`, or the token embedding itself when tied.
    lm_head: Tensor,
    rotary: Rotary,
    config: LlamaConfig,
    hooks: Hooks,
}

impl Llama {
    /// Declares the model on `vs` (names as in the checkpoint), zero-filled until weights are loaded.
    pub fn new(vs: VarStore, config: &LlamaConfig) -> Result<Self> {
        let c = config;
        let fail = |message: String| Error::Config { path: "config.json".into(), message };
        let act = Activation::parse(&c.hidden_act, "hidden_act").map_err(fail)?;
        let rotary = Rotary::new(&c.rope()?, c.head_dim(), vs.device())?;
        let root = vs.root();
        let p = &root / "model";
        let d = c.hidden_size;
        let embed_tokens = layers::param(&(&p / "embed_tokens"), "weight", &[c.vocab_size, d])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &p / "layers" / i;
                let m = &l / "mlp";
                Ok(Layer {
                    input_layernorm: RmsNorm::new(&l / "input_layernorm", d, c.rms_norm_eps)?,
                    self_attn: Attention::new(&l / "self_attn", c)?,
                    post_attention_layernorm: RmsNorm::new(&l / "post_attention_layernorm", d, c.rms_norm_eps)?,
                    mlp: Mlp {
                        gate_proj: Linear::new(&m / "gate_proj", d, c.intermediate_size, c.mlp_bias)?,
                        up_proj: Linear::new(&m / "up_proj", d, c.intermediate_size, c.mlp_bias)?,
                        down_proj: Linear::new(&m / "down_proj", c.intermediate_size, d, c.mlp_bias)?,
                        act,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&p / "norm", d, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            layers::param(&(&root / "lm_head"), "weight", &[c.vocab_size, d])?
        };
        Ok(Self { vs, embed_tokens, layers, norm, lm_head, rotary, config: config.clone(), hooks: Hooks::default() })
    }

    /// Builds the model in `kind` on `device` and copies the checkpoint of `dir` into it.
    pub fn load(dir: &Path, config: &LlamaConfig, kind: Kind, device: Device) -> Result<Self> {
        let model = Self::new(layers::var_store(kind, device), config)?;
        crate::load_weights(&model.vs, dir)?;
        Ok(model)
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Final hidden states `[rows, seq_len, hidden]`.
    fn hidden(&self, input: &ModelInput, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hooks.enter(Stage::Embedding)?;
        let mut x = layers::embed(&self.embed_tokens, &input.input_ids)?;
        self.hooks.leave(Stage::Embedding)?;
        let (cos, sin) = self.rotary.cos_sin(&input.positions, x.kind())?;
        let keys = key_positions(cache.as_deref_mut(), &input.positions)?;
        let mut mask = input.attention.shallow_clone();
        if let Some(window) = self.config.sliding_window {
            // Mistral's window counts positions within the sequence, like the rotary phases.
            let distance = input.positions.f_unsqueeze(2)?.f_sub(&keys.f_unsqueeze(1)?)?;
            mask = mask.f_logical_and(&distance.f_lt(window)?)?;
        }
        let mask = mask.f_unsqueeze(1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            self.hooks.enter(Stage::Block(i))?;
            let h = layer.input_layernorm.forward(&x)?;
            let cache = cache.as_deref_mut();
            x = x.f_add(&layer.self_attn.forward(&h, &self.rotary, &cos, &sin, &mask, cache, i)?)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = x.f_add(&layer.mlp.forward(&h)?)?;
            self.hooks.leave(Stage::Block(i))?;
        }
        self.hooks.enter(Stage::FinalNorm)?;
        let x = self.norm.forward(&x)?;
        self.hooks.leave(Stage::FinalNorm)?;
        Ok(x)
    }
}

impl CausalLm for Llama {
    fn hidden_at(&self, input: &ModelInput, scored: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        Ok(hidden.f_reshape([-1, self.config.hidden_size])?.f_index_select(0, scored)?)
    }

    fn hidden_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hidden(input, Some(cache))
    }

    fn head_log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.hooks.enter(Stage::Head)?;
        let log_probs = layers::head_log_probs(hidden, &self.lm_head)?;
        self.hooks.leave(Stage::Head)?;
        Ok(log_probs)
    }

    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        self.hooks.enter(Stage::Head)?;
        let logits = hidden.f_matmul(&self.lm_head.f_tr()?)?;
        self.hooks.leave(Stage::Head)?;
        Ok(logits)
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_length(&self) -> usize {
        self.config.max_position_embeddings as usize
    }

    fn eos_token_id(&self) -> Option<u32> {
        self.config.eos_token_id
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    fn parameter_bytes(&self) -> usize {
        layers::parameter_bytes(&self.vs)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.config;
        let (d, inner, vocab) = (c.hidden_size as f64, c.intermediate_size as f64, c.vocab_size as f64);
        let q_dim = (c.num_attention_heads * c.head_dim()) as f64;
        let kv_dim = (c.kv_heads() * c.head_dim()) as f64;
        let window = c.sliding_window.map(|w| w as usize);
        let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
        // Per token and layer: q and o (d * q_dim each), k and v (d * kv_dim each), gate, up and down
        // (d * inner each) multiply-adds; per attended key, scores and weighted values (q_dim each).
        let dense = tokens * c.num_hidden_layers as f64 * 2.0 * (2.0 * d * q_dim + 2.0 * d * kv_dim + 3.0 * d * inner);
        let attention = c.num_hidden_layers as f64 * 2.0 * 2.0 * q_dim * layers::attended_keys(lengths, window);
        dense + attention + scored as f64 * 2.0 * d * vocab
    }
}

impl crate::sharded::Shardable for Llama {
    fn var_store(&self) -> &VarStore {
        &self.vs
    }
    fn set_hooks(&mut self, hooks: Hooks) {
        self.hooks = hooks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 0,
        "eos_token_id": 0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9,
        "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 49152}"#;

    fn config(json: &str, model_type: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json(Path::new("config.json"), json, model_type)
    }

    #[test]
    fn smollm2_shape_parses_and_counts_parameters() {
        let c = config(SMOLLM2, "llama").unwrap();
        assert_eq!((c.head_dim(), c.kv_heads(), c.eos_token_id), (64, 3, Some(0)));
        assert_eq!(c.rope().unwrap().theta, 100000.0);
        let model = Llama::new(VarStore::new(Device::Cpu), &c).unwrap();
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
        assert_eq!(config(&json, "llama").unwrap().eos_token_id, Some(128001));
        // Mistral's window defaults to 4096 when absent, and null turns it off; Llama never has one.
        assert_eq!(config(SMOLLM2, "mistral").unwrap().sliding_window, Some(4096));
        let json = SMOLLM2.replace(r#""use_cache": true"#, r#""sliding_window": null"#);
        assert_eq!(config(&json, "mistral").unwrap().sliding_window, None);
        let json = SMOLLM2.replace(r#""use_cache": true"#, r#""sliding_window": 16"#);
        assert_eq!(config(&json, "llama").unwrap().sliding_window, None);
    }
}
