//! Phi-3 (Microsoft's Phi-3 and Phi-3.5 mini/medium, Phi-4-mini's shape), as Hugging Face's
//! `Phi3ForCausalLM` computes it.
//!
//! Llama's network with fused projections: one `qkv_proj` whose output holds the queries, then the
//! keys, then the values (grouped-query sizes: `num_attention_heads` query heads and
//! `num_key_value_heads` key-value heads of `head_dim`), and one `gate_up_proj` holding the gate, then
//! the up projection, of a SwiGLU MLP. No biases. RMSNorm (normalised in f32), rotary embeddings on the
//! first `partial_rotary_factor` of each head (`rope_theta`; only the default rope type: `longrope`,
//! Phi-3's long-context scaling, is refused until supported), an optional `sliding_window` (keys at most
//! `sliding_window - 1` positions back, as transformers' sliding-window mask) and an untied `lm_head`
//! unless `tie_word_embeddings`. Tensor names follow the checkpoint: `model.embed_tokens`,
//! `model.layers.{i}.self_attn.{qkv_proj,o_proj}`, `model.layers.{i}.mlp.{gate_up_proj,down_proj}`,
//! `model.layers.{i}.{input,post_attention}_layernorm`, `model.norm`, `lm_head`.

use crate::layers::{self, Activation, AttentionSpec, GatedMlp, Linear, QkNorm, RmsNorm, RmsStyle, SelfAttention};
use crate::model::{Declared, Decoder, Pass, Sizes};
use crate::registry::{self, ArchConfig, Architecture, ConfigFile, StageNames};
use crate::rope::{RopeFields, RopeParameters, RopeSpec, Rotary};
use crate::{ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::nn::VarStore;
use tch::Tensor;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["phi3"], parse };

const STAGES: StageNames = StageNames {
    embedding: &["model.embed_tokens"],
    blocks: "model.layers",
    final_norm: &["model.norm"],
    head: &["lm_head"],
};

/// Phi-3's `config.json`, with the defaults of transformers' `Phi3Config` for what it may omit.
#[derive(Debug, Clone, Deserialize)]
pub struct Phi3Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Not a `Phi3Config` field, but transformers' attention and rotary embedding read it when a
    /// config has it; `hidden_size / num_attention_heads` (rounded down) otherwise.
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "Phi3Config::silu")]
    pub hidden_act: String,
    #[serde(default = "Phi3Config::max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "Phi3Config::rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE base of older configs (transformers 5 writes `rope_parameters.rope_theta`).
    #[serde(default = "Phi3Config::theta")]
    pub rope_theta: f64,
    /// Share of each head that rotates, in older configs (Phi-4-mini: 0.75).
    #[serde(default = "Phi3Config::whole_heads")]
    pub partial_rotary_factor: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Keys fewer than this many positions back; null or absent for full attention.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// 32000 when absent, as `Phi3Config`.
    #[serde(default = "Phi3Config::end_of_text", deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
}

impl Phi3Config {
    fn silu() -> String {
        "silu".into()
    }
    fn max_positions() -> i64 {
        4096
    }
    fn rms_eps() -> f64 {
        1e-5
    }
    fn theta() -> f64 {
        10000.0
    }
    fn whole_heads() -> f64 {
        1.0
    }
    fn end_of_text() -> Option<u32> {
        Some(32000)
    }
}

/// A validated Phi-3 config.
#[derive(Debug, Clone)]
struct Params {
    raw: Phi3Config,
    attention: AttentionSpec,
    act: Activation,
    rope: RopeSpec,
    sizes: Sizes,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Params::validate(file, file.deserialize()?)?))
}

/// The RoPE dict in force (a non-null `rope_scaling` wins, as in transformers) and its type: Phi-3
/// computes only the default rotary embedding here, so any other type is refused with the field named.
fn check_rope_type(file: &ConfigFile, c: &Phi3Config) -> Result<()> {
    let (field, dict) = match (&c.rope_scaling, &c.rope_parameters) {
        (Some(dict), _) => ("rope_scaling", dict),
        (None, Some(dict)) => ("rope_parameters", dict),
        (None, None) => return Ok(()),
    };
    match dict.rope_type.as_deref().or(dict.type_.as_deref()).unwrap_or("default") {
        "default" => Ok(()),
        // transformers reads `su` and `yarn` as `longrope` for Phi-3.
        other => Err(file.error(format!(
            "field `{field}.rope_type`: `{other}` is not supported for phi3 (supported: default; longrope, su and \
             yarn are not implemented)"
        ))),
    }
}

impl Params {
    fn validate(file: &ConfigFile, raw: Phi3Config) -> Result<Self> {
        let c = &raw;
        let heads = c.num_attention_heads;
        let kv_heads = c.num_key_value_heads.unwrap_or(heads);
        file.positive(&[
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("max_position_embeddings", c.max_position_embeddings),
        ])?;
        if let Some(window) = c.sliding_window {
            file.positive(&[("sliding_window", window)])?;
        }
        if heads % kv_heads != 0 {
            return Err(file.error(format!(
                "field `num_key_value_heads`: {kv_heads} does not divide num_attention_heads {heads}"
            )));
        }
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads);
        file.positive(&[("head_dim", head_dim)])?;
        let act = Activation::parse(&c.hidden_act, "hidden_act").map_err(|m| file.error(m))?;
        check_rope_type(file, c)?;
        let rope = RopeSpec::resolve(RopeFields {
            rope_scaling: c.rope_scaling.as_ref(),
            rope_parameters: c.rope_parameters.as_ref(),
            theta: c.rope_theta,
            partial_rotary_factor: c.partial_rotary_factor,
            max_position_embeddings: c.max_position_embeddings,
        })
        .map_err(|m| file.error(m))?;
        let rotated = rope.rotary_dim(head_dim);
        if rotated < 2 || rotated % 2 != 0 {
            return Err(file.error(format!(
                "field `partial_rotary_factor`: {} of a head of {head_dim} is {rotated} dimensions; a rotary \
                 embedding needs a positive even number",
                rope.partial_rotary_factor
            )));
        }
        let attention = AttentionSpec {
            hidden: c.hidden_size,
            heads,
            kv_heads,
            head_dim,
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            scale: (head_dim as f64).powf(-0.5),
            softcap: None,
        };
        let max_length = c.max_position_embeddings as usize;
        let (vocab_size, hidden_size, eos_token_id) = (c.vocab_size, c.hidden_size, c.eos_token_id);
        let sizes = Sizes { vocab_size, hidden_size, max_length, positions: None, eos_token_id };
        Ok(Self { raw, attention, act, rope, sizes })
    }
}

impl ArchConfig for Params {
    fn sizes(&self) -> Sizes {
        self.sizes.clone()
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        registry::parameter_lower_bound(self.raw.vocab_size, self.raw.hidden_size, self.raw.num_hidden_layers)
    }

    fn declare(&self, vs: VarStore, _dir: &Path) -> Result<Box<dyn Declared>> {
        registry::declared(vs, |vs| Phi3Decoder::new(vs, self))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        STAGES.stage_of(name)
    }
}

/// One decoder layer: pre-norm attention and MLP, each added to the residual stream.
#[derive(Debug)]
struct Phi3Layer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

/// Phi-3's layers; the model is [`Phi3`].
#[derive(Debug)]
pub struct Phi3Decoder {
    embed_tokens: Tensor,
    blocks: Vec<Phi3Layer>,
    norm: RmsNorm,
    /// `lm_head`, or the token embedding when tied.
    lm_head: Linear,
    rotary: Rotary,
    params: Params,
}

/// Phi-3 for causal language modelling.
pub type Phi3 = crate::Model<Phi3Decoder>;

impl Phi3Decoder {
    fn new(vs: &VarStore, params: &Params) -> Result<Self> {
        let c = &params.raw;
        let (d, eps, vocab) = (c.hidden_size, c.rms_norm_eps, c.vocab_size);
        let model = vs.root() / "model";
        let embed_tokens = layers::param(&(&model / "embed_tokens"), "weight", &[vocab, d])?;
        let mut blocks = Vec::new();
        for i in 0..c.num_hidden_layers {
            let at = &model / "layers" / i;
            blocks.push(Phi3Layer {
                input_layernorm: RmsNorm::with_style(&at / "input_layernorm", d, eps, RmsStyle::CastThenScale)?,
                self_attn: SelfAttention::fused(&(&at / "self_attn"), params.attention, RmsStyle::CastThenScale)?,
                post_attention_layernorm: RmsNorm::with_style(
                    &at / "post_attention_layernorm",
                    d,
                    eps,
                    RmsStyle::CastThenScale,
                )?,
                mlp: GatedMlp::fused(&(&at / "mlp"), d, c.intermediate_size, false, params.act)?,
            });
        }
        let norm = RmsNorm::with_style(&model / "norm", d, eps, RmsStyle::CastThenScale)?;
        Ok(Self {
            rotary: Rotary::new(&params.rope, params.attention.head_dim, vs.device())?,
            lm_head: Linear::head(vs.root() / "lm_head", &embed_tokens, c.tie_word_embeddings)?,
            embed_tokens,
            blocks,
            norm,
            params: params.clone(),
        })
    }
}

impl Decoder for Phi3Decoder {
    fn sizes(&self) -> &Sizes {
        &self.params.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let mut h = hooks.around(Stage::Embedding, || layers::embed(&self.embed_tokens, &input.input_ids))?;
        let rope = self.rotary.tables(pass.positions(), h.kind())?;
        // The window counts positions within each sequence, like the rotary phases.
        let mask = match self.params.raw.sliding_window {
            None => pass.mask().shallow_clone(),
            Some(window) => pass.window_mask(window)?,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            h = hooks.around(Stage::Block(i), || {
                let attn = block.self_attn.forward(&block.input_layernorm.forward(&h)?, &rope, &mask, pass, i)?;
                let h = h.f_add(&attn)?;
                let mlp = block.mlp.forward(&block.post_attention_layernorm.forward(&h)?)?;
                Ok(h.f_add(&mlp)?)
            })?;
        }
        hooks.around(Stage::FinalNorm, || self.norm.forward(&h))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.params.raw;
        // The fused projections do the work of separate ones.
        let (per_token, per_key) = layers::gated_block_flops(&self.params.attention, c.intermediate_size);
        let n_layers = c.num_hidden_layers as f64;
        let keys = layers::attended_keys(lengths, c.sliding_window.map(|w| w as usize));
        let tokens = lengths.iter().sum::<usize>() as f64;
        n_layers * (tokens * per_token + keys * per_key) + 2.0 * (scored as i64 * c.hidden_size * c.vocab_size) as f64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// microsoft/Phi-3-mini-4k-instruct's config.json.
    const PHI3_MINI_4K: &str = r#"{"_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
        "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2", "use_cache": true, "vocab_size": 32064}"#;

    fn config(json: &str) -> Result<Params> {
        let file = ConfigFile::parse(Path::new("config.json"), json.to_owned())?;
        Params::validate(&file, file.deserialize()?)
    }

    #[test]
    fn phi3_mini_parses_and_counts_parameters() {
        let c = config(PHI3_MINI_4K).unwrap();
        assert_eq!((c.attention.head_dim, c.attention.kv_heads, c.raw.sliding_window), (96, 32, Some(2047)));
        assert_eq!((c.rope.theta, c.rope.rotary_dim(96)), (10000.0, 96));
        // Declared as shapes only: 3.8 billion parameters.
        let model = layers::declare_shapes_only(|| c.declare(VarStore::new(tch::Device::Cpu), Path::new(".")))
            .unwrap()
            .into_causal_lm();
        // Phi-3-mini has 3,821,079,552 parameters.
        assert_eq!(model.parameter_bytes(), 3_821_079_552 * 4);
        assert_eq!(c.stage_of("model.layers.7.self_attn.qkv_proj.weight"), Some(Stage::Block(7)));
        assert_eq!(c.stage_of("model.layers.0.mlp.gate_up_proj.weight"), Some(Stage::Block(0)));
        assert_eq!(c.stage_of("lm_head.weight"), Some(Stage::Head));
        // Per token and layer: qkv 3072 x 9216, o 3072 x 3072, gate_up 3072 x 16384, down 8192 x 3072; per
        // attended key 4 x 3072. Windowed at 2047: a 3000-token sequence attends at most 2047 keys.
        let dense = 2.0 * (3072.0 * 9216.0 + 3072.0 * 3072.0 + 3072.0 * 16384.0 + 8192.0 * 3072.0);
        let keys = 2047.0 * 2048.0 / 2.0 + (3000.0 - 2047.0) * 2047.0 + 10.0 * 11.0 / 2.0;
        let expected = 32.0 * (3010.0 * dense + 4.0 * 3072.0 * keys) + 3.0 * 2.0 * 3072.0 * 32064.0;
        assert_eq!(model.forward_flops(&[3000, 10], 3), expected);
    }

    #[test]
    fn partial_rotary_gqa_and_head_dim() {
        // Phi-4-mini's attention shape (24 heads of 128, 8 key-value heads, 3/4 of each head rotating,
        // tied embeddings), without its longrope scaling.
        let json = PHI3_MINI_4K
            .replace(r#""num_key_value_heads": 32"#, r#""num_key_value_heads": 8, "partial_rotary_factor": 0.75"#)
            .replace(r#""num_attention_heads": 32"#, r#""num_attention_heads": 24"#)
            .replace(r#""tie_word_embeddings": false"#, r#""tie_word_embeddings": true"#);
        let c = config(&json).unwrap();
        assert_eq!((c.attention.head_dim, c.attention.kv_heads, c.rope.rotary_dim(128)), (128, 8, 96));
        let json = json.replace(r#""use_cache": true"#, r#""head_dim": 64, "rope_parameters": {"rope_type": "default", "rope_theta": 250000, "partial_rotary_factor": 0.5}"#);
        let c = config(&json).unwrap();
        assert_eq!((c.attention.head_dim, c.rope.theta, c.rope.rotary_dim(64)), (64, 250000.0, 32));
        // Absent fields take Phi3Config's defaults; null turns eos off.
        let json = PHI3_MINI_4K.replace(r#""eos_token_id": 32000,"#, "").replace(r#""sliding_window": 2047,"#, "");
        let c = config(&json).unwrap();
        assert_eq!((c.raw.eos_token_id, c.raw.sliding_window), (Some(32000), None));
        let c = config(&PHI3_MINI_4K.replace(r#""eos_token_id": 32000"#, r#""eos_token_id": null"#)).unwrap();
        assert_eq!(c.raw.eos_token_id, None);
    }

    #[test]
    fn config_errors_name_the_field() {
        let longrope = PHI3_MINI_4K.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}"#,
        );
        let e = config(&longrope).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("rope_scaling.rope_type") && e.contains("longrope"), "{e}");
        let linear = PHI3_MINI_4K
            .replace(r#""rope_scaling": null"#, r#""rope_parameters": {"rope_type": "linear", "factor": 2.0}"#);
        let e = config(&linear).unwrap_err().to_string();
        assert!(e.contains("rope_parameters.rope_type") && e.contains("linear"), "{e}");
        let e = config(&PHI3_MINI_4K.replace(r#""num_key_value_heads": 32"#, r#""num_key_value_heads": 5"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = config(&PHI3_MINI_4K.replace(r#""sliding_window": 2047"#, r#""sliding_window": 0"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sliding_window"), "{e}");
        let odd = PHI3_MINI_4K.replace(r#""use_cache": true"#, r#""partial_rotary_factor": 0.01"#);
        let e = config(&odd).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let e = config(&PHI3_MINI_4K.replace(r#""silu""#, r#""gelu_10""#)).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("gelu_10"), "{e}");
        let e = config(&PHI3_MINI_4K.replace(r#""intermediate_size": 8192,"#, "")).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }
}
