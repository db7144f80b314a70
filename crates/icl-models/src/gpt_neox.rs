//! GPT-NeoX (EleutherAI: Pythia, GPT-NeoX-20B), as Hugging Face's `GPTNeoXForCausalLM` computes it.
//!
//! Blocks with two LayerNorms; with `use_parallel_residual` (Pythia) attention and MLP both read the
//! block's input and are added together, `x + attn(ln1(x)) + mlp(ln2(x))`, otherwise they are
//! sequential. One fused `query_key_value` projection laid out per head (`[heads, 3, head_dim]` along
//! its output), rotary embeddings on the first `rotary_pct` of each head with base `rotary_emb_base`,
//! scores scaled by `1/sqrt(head_dim)`, an MLP with `hidden_act` (exact `gelu` in Pythia) and an
//! untied output head `embed_out`. Tensor names follow the checkpoint: `gpt_neox.embed_in`,
//! `gpt_neox.layers.{i}.{input,post_attention}_layernorm`, `gpt_neox.layers.{i}.attention.{query_key_value,dense}`,
//! `gpt_neox.layers.{i}.mlp.{dense_h_to_4h,dense_4h_to_h}`, `gpt_neox.final_layer_norm`, `embed_out`.

use crate::generate::{cached_kv, key_positions};
use crate::layers::{self, Activation, LayerNorm, Linear};
use crate::rope::{RopeFields, RopeParameters, RopeSpec, Rotary};
use crate::{CausalLm, Error, Hooks, KvCache, ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> i64 {
    2048
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_rotary_pct() -> f64 {
    0.25
}
fn default_rotary_emb_base() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}

/// GPT-NeoX's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// Share of each head that rotates (older configs; transformers 5 writes
    /// `rope_parameters.partial_rotary_factor`).
    #[serde(default = "default_rotary_pct")]
    pub rotary_pct: f64,
    /// RoPE base (older configs; transformers 5 writes `rope_parameters.rope_theta`).
    #[serde(default = "default_rotary_emb_base")]
    pub rotary_emb_base: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
    #[serde(skip)]
    rope: Option<RopeSpec>,
}

impl GptNeoXConfig {
    /// Parses and validates `config.json`; errors name the file and field.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let mut config: Self = layers::parse_config(path, text)?;
        let fail = |message: String| Error::Config { path: path.to_owned(), message };
        for (field, value) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
        ] {
            if value <= 0 {
                return Err(fail(format!("field `{field}`: {value} is not positive")));
            }
        }
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err(fail(format!(
                "field `hidden_size`: {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Activation::parse(&config.hidden_act, "hidden_act").map_err(&fail)?;
        let rope = RopeSpec::resolve(RopeFields {
            rope_scaling: config.rope_scaling.as_ref(),
            rope_parameters: config.rope_parameters.as_ref(),
            theta: config.rotary_emb_base,
            partial_rotary_factor: config.rotary_pct,
            max_position_embeddings: config.max_position_embeddings,
        })
        .map_err(&fail)?;
        let rotary_dim = rope.rotary_dim(config.head_dim());
        if rotary_dim < 2 || rotary_dim % 2 != 0 {
            return Err(fail(format!(
                "field `rotary_pct`: rotates {rotary_dim} of {} dimensions per head; it must be a positive even number",
                config.head_dim()
            )));
        }
        config.rope = Some(rope);
        Ok(config)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    fn rope(&self) -> Result<RopeSpec> {
        self.rope.ok_or_else(|| Error::Config {
            path: "config.json".into(),
            message: "GptNeoXConfig must come from GptNeoXConfig::from_json".into(),
        })
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

/// GPT-NeoX for causal language modelling.
#[derive(Debug)]
pub struct GptNeoX {
    vs: VarStore,
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `embed_out.weight`, or `embed_in` itself when tied.
    embed_out: Tensor,
    rotary: Rotary,
    act: Activation,
    config: GptNeoXConfig,
    hooks: Hooks,
}

impl GptNeoX {
    /// Declares the model on `vs` (names as in the checkpoint), zero-filled until weights are loaded.
    pub fn new(vs: VarStore, config: &GptNeoXConfig) -> Result<Self> {
        let c = config;
        let act = Activation::parse(&c.hidden_act, "hidden_act")
            .map_err(|message| Error::Config { path: "config.json".into(), message })?;
        let rotary = Rotary::new(&c.rope()?, c.head_dim(), vs.device())?;
        let root = vs.root();
        let p = &root / "gpt_neox";
        let (d, eps, bias) = (c.hidden_size, c.layer_norm_eps, c.attention_bias);
        let embed_in = layers::param(&(&p / "embed_in"), "weight", &[c.vocab_size, d])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &p / "layers" / i;
                Ok(Layer {
                    input_layernorm: LayerNorm::new(&l / "input_layernorm", d, eps)?,
                    post_attention_layernorm: LayerNorm::new(&l / "post_attention_layernorm", d, eps)?,
                    query_key_value: Linear::new(&l / "attention" / "query_key_value", d, 3 * d, bias)?,
                    dense: Linear::new(&l / "attention" / "dense", d, d, bias)?,
                    dense_h_to_4h: Linear::new(&l / "mlp" / "dense_h_to_4h", d, c.intermediate_size, true)?,
                    dense_4h_to_h: Linear::new(&l / "mlp" / "dense_4h_to_h", c.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&p / "final_layer_norm", d, eps)?;
        let embed_out = if c.tie_word_embeddings {
            embed_in.shallow_clone()
        } else {
            layers::param(&(&root / "embed_out"), "weight", &[c.vocab_size, d])?
        };
        Ok(Self {
            vs,
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary,
            act,
            config: config.clone(),
            hooks: Hooks::default(),
        })
    }

    /// Builds the model in `kind` on `device` and copies the checkpoint of `dir` into it.
    pub fn load(dir: &Path, config: &GptNeoXConfig, kind: Kind, device: Device) -> Result<Self> {
        let model = Self::new(layers::var_store(kind, device), config)?;
        crate::load_weights(&model.vs, dir)?;
        Ok(model)
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn config(&self) -> &GptNeoXConfig {
        &self.config
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        index: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.size3()?;
        let (heads, hd) = (self.config.num_attention_heads, self.config.head_dim());
        // The fused projection holds each head's query, key and value side by side.
        let qkv = layer.query_key_value.forward(x)?.f_view([b, t, heads, 3 * hd])?.f_transpose(1, 2)?;
        let q = self.rotary.apply(&qkv.f_narrow(-1, 0, hd)?, cos, sin)?;
        let k = self.rotary.apply(&qkv.f_narrow(-1, hd, hd)?, cos, sin)?;
        let (k, v) = cached_kv(cache, index, k, qkv.f_narrow(-1, 2 * hd, hd)?)?;
        let y = layers::attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?;
        layer.dense.forward(&y)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        layer.dense_4h_to_h.forward(&self.act.forward(&layer.dense_h_to_4h.forward(x)?)?)
    }

    /// Final hidden states `[rows, seq_len, hidden]`.
    fn hidden(&self, input: &ModelInput, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hooks.enter(Stage::Embedding)?;
        let mut x = layers::embed(&self.embed_in, &input.input_ids)?;
        self.hooks.leave(Stage::Embedding)?;
        let (cos, sin) = self.rotary.cos_sin(&input.positions, x.kind())?;
        // No window here, but the cache keeps every key's position (and thereby its length).
        let _ = key_positions(cache.as_deref_mut(), &input.positions)?;
        let mask = input.attention.f_unsqueeze(1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            self.hooks.enter(Stage::Block(i))?;
            let h = layer.input_layernorm.forward(&x)?;
            let attn = self.attention(layer, &h, &cos, &sin, &mask, cache.as_deref_mut(), i)?;
            x = if self.config.use_parallel_residual {
                // Summed in transformers' order: mlp + attn + x.
                let mlp = self.mlp(layer, &layer.post_attention_layernorm.forward(&x)?)?;
                mlp.f_add(&attn)?.f_add(&x)?
            } else {
                let h = attn.f_add(&x)?;
                self.mlp(layer, &layer.post_attention_layernorm.forward(&h)?)?.f_add(&h)?
            };
            self.hooks.leave(Stage::Block(i))?;
        }
        self.hooks.enter(Stage::FinalNorm)?;
        let x = self.final_layer_norm.forward(&x)?;
        self.hooks.leave(Stage::FinalNorm)?;
        Ok(x)
    }
}

impl CausalLm for GptNeoX {
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
        let log_probs = layers::head_log_probs(hidden, &self.embed_out)?;
        self.hooks.leave(Stage::Head)?;
        Ok(log_probs)
    }

    fn logits(&self, input: &ModelInput) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.hidden(input, None)?;
        self.hooks.enter(Stage::Head)?;
        let logits = hidden.f_matmul(&self.embed_out.f_tr()?)?;
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
        self.embed_in.kind()
    }

    fn parameter_bytes(&self) -> usize {
        layers::parameter_bytes(&self.vs)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.config;
        let (d, inner) = (c.hidden_size as f64, c.intermediate_size as f64);
        let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
        // Per token and layer: query_key_value (3 d^2), dense (d^2) and the MLP (2 d inner) multiply-adds;
        // per attended key, scores and weighted values (d each).
        let dense = tokens * c.num_hidden_layers as f64 * 2.0 * (4.0 * d * d + 2.0 * d * inner);
        let attention = c.num_hidden_layers as f64 * 2.0 * 2.0 * d * layers::attended_keys(lengths, None);
        dense + attention + scored as f64 * 2.0 * d * c.vocab_size as f64
    }
}

impl crate::sharded::Shardable for GptNeoX {
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

    /// EleutherAI/pythia-160m's config.json.
    const PYTHIA_160M: &str = r#"{"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox",
        "num_attention_heads": 12, "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.24.0",
        "use_cache": true, "use_parallel_residual": true, "vocab_size": 50304}"#;

    fn config(json: &str) -> Result<GptNeoXConfig> {
        GptNeoXConfig::from_json(Path::new("config.json"), json)
    }

    #[test]
    fn pythia_160m_parses_and_counts_parameters() {
        let c = config(PYTHIA_160M).unwrap();
        assert_eq!(c.rope().unwrap().rotary_dim(c.head_dim()), 16);
        assert!(c.use_parallel_residual && c.attention_bias && !c.tie_word_embeddings);
        let model = GptNeoX::new(VarStore::new(Device::Cpu), &c).unwrap();
        // Pythia-160M: 162,322,944 parameters (untied embed_in and embed_out).
        assert_eq!(model.parameter_bytes(), 162_322_944 * 4);
    }

    #[test]
    fn rope_parameters_override_the_old_fields() {
        let json = PYTHIA_160M.replace(
            r#""rotary_pct": 0.25"#,
            r#""rotary_pct": 0.25, "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 20000, "rope_type": "default"}"#,
        );
        let rope = config(&json).unwrap().rope().unwrap();
        assert_eq!((rope.theta, rope.rotary_dim(64)), (20000.0, 32));
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = config(&PYTHIA_160M.replace(r#""rotary_pct": 0.25"#, r#""rotary_pct": 0.01"#)).unwrap_err().to_string();
        assert!(e.contains("rotary_pct"), "{e}");
        let e = config(&PYTHIA_160M.replace(r#""num_attention_heads": 12"#, r#""num_attention_heads": 10"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size") && e.contains("config.json"), "{e}");
        let e = config(&PYTHIA_160M.replace(r#""intermediate_size": 3072,"#, "")).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }
}
