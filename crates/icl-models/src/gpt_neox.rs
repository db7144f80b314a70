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

use crate::defaults;
use crate::layers::{self, Activation, LayerNorm, Linear};
use crate::model::{Declared, Decoder, Pass, Sizes};
use crate::registry::{self, ArchConfig, Architecture, ConfigFile, StageNames};
use crate::rope::{RopeFields, RopeParameters, RopeSpec, RopeTables, Rotary};
use crate::{ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::nn::VarStore;
use tch::Tensor;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["gpt_neox"], parse };

const STAGES: StageNames = StageNames {
    embedding: &["gpt_neox.embed_in"],
    blocks: "gpt_neox.layers",
    final_norm: &["gpt_neox.final_layer_norm"],
    head: &["embed_out"],
};

fn default_rotary_pct() -> f64 {
    0.25
}

/// GPT-NeoX's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct GptNeoXConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::positions_2048")]
    pub max_position_embeddings: i64,
    #[serde(default = "defaults::eps_1e5")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::yes")]
    pub use_parallel_residual: bool,
    /// Share of each head that rotates (older configs; transformers 5 writes
    /// `rope_parameters.partial_rotary_factor`).
    #[serde(default = "default_rotary_pct")]
    pub rotary_pct: f64,
    /// RoPE base (older configs; transformers 5 writes `rope_parameters.rope_theta`).
    #[serde(default = "defaults::theta_10000")]
    pub rotary_emb_base: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "defaults::yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
}

/// A validated GPT-NeoX config.
#[derive(Debug, Clone)]
struct Params {
    raw: GptNeoXConfig,
    head_dim: i64,
    act: Activation,
    rope: RopeSpec,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Params::validate(file, file.deserialize()?)?))
}

impl Params {
    fn validate(file: &ConfigFile, raw: GptNeoXConfig) -> Result<Self> {
        let c = &raw;
        file.positive(&[
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("intermediate_size", c.intermediate_size),
        ])?;
        file.divisible(("hidden_size", c.hidden_size), ("num_attention_heads", c.num_attention_heads))?;
        let act = Activation::parse(&c.hidden_act, "hidden_act").map_err(|m| file.error(m))?;
        let rope = RopeSpec::resolve(RopeFields {
            rope_scaling: c.rope_scaling.as_ref(),
            rope_parameters: c.rope_parameters.as_ref(),
            theta: c.rotary_emb_base,
            partial_rotary_factor: c.rotary_pct,
            max_position_embeddings: c.max_position_embeddings,
        })
        .map_err(|m| file.error(m))?;
        let head_dim = c.hidden_size / c.num_attention_heads;
        let rotary_dim = rope.rotary_dim(head_dim);
        if rotary_dim < 2 || rotary_dim % 2 != 0 {
            return Err(file.error(format!(
                "field `rotary_pct`: rotates {rotary_dim} of {head_dim} dimensions per head; it must be a positive even number"
            )));
        }
        Ok(Self { raw, head_dim, act, rope })
    }
}

impl ArchConfig for Params {
    fn sizes(&self) -> Sizes {
        Sizes {
            vocab_size: self.raw.vocab_size,
            hidden_size: self.raw.hidden_size,
            max_length: self.raw.max_position_embeddings as usize,
            positions: None,
            eos_token_id: self.raw.eos_token_id,
        }
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        registry::parameter_lower_bound(self.raw.vocab_size, self.raw.hidden_size, self.raw.num_hidden_layers)
    }

    fn declare(&self, vs: VarStore, _dir: &Path) -> Result<Box<dyn Declared>> {
        registry::declared(vs, |vs| GptNeoXDecoder::new(vs, self))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        STAGES.stage_of(name)
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

/// GPT-NeoX's layers; the model is [`GptNeoX`].
#[derive(Debug)]
pub struct GptNeoXDecoder {
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `embed_out.weight`, or `embed_in` itself when tied.
    embed_out: Tensor,
    rotary: Rotary,
    params: Params,
    sizes: Sizes,
}

/// GPT-NeoX for causal language modelling.
pub type GptNeoX = crate::Model<GptNeoXDecoder>;

impl GptNeoXDecoder {
    fn new(vs: &VarStore, params: &Params) -> Result<Self> {
        let c = &params.raw;
        let rotary = Rotary::new(&params.rope, params.head_dim, vs.device())?;
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
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary,
            sizes: params.sizes(),
            params: params.clone(),
        })
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        rope: &RopeTables,
        pass: &mut Pass<'_>,
        index: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.size3()?;
        let (heads, hd) = (self.params.raw.num_attention_heads, self.params.head_dim);
        // The fused projection holds each head's query, key and value side by side.
        let qkv = layer.query_key_value.forward(x)?.f_view([b, t, heads, 3 * hd])?.f_transpose(1, 2)?;
        let q = rope.apply(&qkv.f_narrow(-1, 0, hd)?)?;
        let k = rope.apply(&qkv.f_narrow(-1, hd, hd)?)?;
        let mask = pass.mask().shallow_clone();
        let y = pass.attend(index, &q, k, qkv.f_narrow(-1, 2 * hd, hd)?, &mask, 1.0 / (hd as f64).sqrt())?;
        layer.dense.forward(&y)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        layer.dense_4h_to_h.forward(&self.params.act.forward(&layer.dense_h_to_4h.forward(x)?)?)
    }
}

impl Decoder for GptNeoXDecoder {
    fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let mut x = hooks.around(Stage::Embedding, || layers::embed(&self.embed_in, &input.input_ids))?;
        let rope = self.rotary.tables(pass.positions(), x.kind())?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = hooks.around(Stage::Block(i), || {
                let h = layer.input_layernorm.forward(&x)?;
                let attn = self.attention(layer, &h, &rope, pass, i)?;
                Ok(if self.params.raw.use_parallel_residual {
                    // Summed in transformers' order: mlp + attn + x.
                    let mlp = self.mlp(layer, &layer.post_attention_layernorm.forward(&x)?)?;
                    mlp.f_add(&attn)?.f_add(&x)?
                } else {
                    let h = attn.f_add(&x)?;
                    self.mlp(layer, &layer.post_attention_layernorm.forward(&h)?)?.f_add(&h)?
                })
            })?;
        }
        hooks.around(Stage::FinalNorm, || self.final_layer_norm.forward(&x))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::output_head(hidden, &self.embed_out)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.params.raw;
        layers::dense_model_flops(
            lengths,
            scored,
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.vocab_size,
        )
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

    fn config(json: &str) -> Result<Params> {
        let file = ConfigFile::parse(Path::new("config.json"), json.to_owned())?;
        Params::validate(&file, file.deserialize()?)
    }

    #[test]
    fn pythia_160m_parses_and_counts_parameters() {
        let c = config(PYTHIA_160M).unwrap();
        assert_eq!(c.rope.rotary_dim(c.head_dim), 16);
        assert!(c.raw.use_parallel_residual && c.raw.attention_bias && !c.raw.tie_word_embeddings);
        let model = c.declare(VarStore::new(tch::Device::Cpu), Path::new(".")).unwrap().into_causal_lm();
        // Pythia-160M: 162,322,944 parameters (untied embed_in and embed_out).
        assert_eq!(model.parameter_bytes(), 162_322_944 * 4);
        assert_eq!(c.stage_of("gpt_neox.layers.3.attention.dense.weight"), Some(Stage::Block(3)));
        assert_eq!(c.stage_of("gpt_neox.embed_in.weight"), Some(Stage::Embedding));
        assert_eq!(c.stage_of("gpt_neox.final_layer_norm.bias"), Some(Stage::FinalNorm));
        assert_eq!(c.stage_of("embed_out.weight"), Some(Stage::Head));
        assert_eq!(c.stage_of("model.norm.weight"), None);
    }

    #[test]
    fn rope_parameters_override_the_old_fields() {
        let json = PYTHIA_160M.replace(
            r#""rotary_pct": 0.25"#,
            r#""rotary_pct": 0.25, "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 20000, "rope_type": "default"}"#,
        );
        let rope = config(&json).unwrap().rope;
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
