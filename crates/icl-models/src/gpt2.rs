//! GPT-2 (OpenAI), as Hugging Face's `GPT2LMHeadModel` computes it.
//!
//! Pre-norm blocks with LayerNorm, a learned position table (`n_positions`), one fused `c_attn`
//! projection for queries, keys and values, scores scaled by `1/sqrt(head_dim)` (and by
//! `1/(layer + 1)` with `scale_attn_by_inverse_layer_idx`), a `gelu_new` MLP and a head tied to the
//! token embedding (or `lm_head` when untied). GPT-2's projections are `Conv1D` layers whose weights
//! are stored `[in, out]`, the transpose of `nn.Linear`. Tensor names follow the checkpoint:
//! `transformer.wte`, `transformer.wpe`, `transformer.h.{i}.{ln_1,ln_2}`, `transformer.h.{i}.attn.{c_attn,c_proj}`,
//! `transformer.h.{i}.mlp.{c_fc,c_proj}`, `transformer.ln_f`. Checkpoints saved from the bare `GPT2Model`
//! (the original OpenAI files) leave out the `transformer.` prefix; both spellings load.

use crate::defaults;
use crate::layers::{self, Activation, LayerNorm};
use crate::model::{Declared, Decoder, Pass, PositionTable, Sizes};
use crate::registry::{self, ArchConfig, Architecture, ConfigFile, StageNames};
use crate::{ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::nn::{self, VarStore};
use tch::Tensor;

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["gpt2"], parse };

/// Stage names without the optional `transformer.` prefix.
const STAGES: StageNames =
    StageNames { embedding: &["wte", "wpe"], blocks: "h", final_norm: &["ln_f"], head: &["lm_head"] };

/// GPT-2's `config.json`, with Hugging Face's defaults for omitted fields.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// MLP width; defaults to `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "defaults::positions_1024")]
    pub n_positions: i64,
    #[serde(default = "defaults::eps_1e5")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "defaults::gelu_new")]
    pub activation_function: String,
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
}

/// A validated GPT-2 config.
#[derive(Debug, Clone)]
struct Params {
    raw: Gpt2Config,
    inner: i64,
    act: Activation,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Params::validate(file, file.deserialize()?)?))
}

impl Params {
    fn validate(file: &ConfigFile, raw: Gpt2Config) -> Result<Self> {
        let c = &raw;
        let inner = c.n_inner.unwrap_or(4 * c.n_embd);
        file.positive(&[
            ("vocab_size", c.vocab_size),
            ("n_embd", c.n_embd),
            ("n_layer", c.n_layer),
            ("n_head", c.n_head),
            ("n_positions", c.n_positions),
            ("n_inner", inner),
        ])?;
        file.divisible(("n_embd", c.n_embd), ("n_head", c.n_head))?;
        let act = Activation::parse(&c.activation_function, "activation_function").map_err(|m| file.error(m))?;
        Ok(Self { raw, inner, act })
    }
}

impl ArchConfig for Params {
    fn sizes(&self) -> Sizes {
        Sizes {
            vocab_size: self.raw.vocab_size,
            hidden_size: self.raw.n_embd,
            max_length: self.raw.n_positions as usize,
            positions: Some(PositionTable { size: self.raw.n_positions, field: "n_positions" }),
            eos_token_id: self.raw.eos_token_id,
        }
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        registry::parameter_lower_bound(self.raw.vocab_size, self.raw.n_embd, self.raw.n_layer)
    }

    fn declare(&self, vs: VarStore, dir: &Path) -> Result<Box<dyn Declared>> {
        // Checkpoints of the bare `GPT2Model` (the original OpenAI files) have no `transformer.` prefix.
        let prefixed = layers::uses_prefix(dir, "transformer.", "wte.weight")?;
        registry::declared(vs, |vs| Gpt2Decoder::new(vs, self, if prefixed { "transformer" } else { "" }))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        STAGES.stage_of(name.strip_prefix("transformer.").unwrap_or(name))
    }
}

/// `transformers`' `Conv1D`: `y = x W + b` with `W` stored `[in, out]`.
#[derive(Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Result<Self> {
        Ok(Self {
            weight: layers::param(&p, "weight", &[in_dim, out_dim])?,
            bias: layers::param(&p, "bias", &[out_dim])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        let in_dim = shape.pop().unwrap_or(0);
        shape.push(self.bias.size()[0]);
        let y = self.bias.f_addmm(&x.f_reshape([-1, in_dim])?, &self.weight)?;
        Ok(y.f_view(shape.as_slice())?)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    act: Activation,
    heads: i64,
    scale: f64,
}

impl Block {
    fn attention(&self, x: &Tensor, pass: &mut Pass<'_>, index: usize) -> Result<Tensor> {
        let d = x.size().last().copied().unwrap_or(0);
        let qkv = self.c_attn.forward(x)?.f_split(d, 2)?;
        let heads = |t: &Tensor| layers::split_heads(t, self.heads, d / self.heads);
        let mask = pass.mask().shallow_clone();
        let y = pass.attend(index, &heads(&qkv[0])?, heads(&qkv[1])?, heads(&qkv[2])?, &mask, self.scale)?;
        self.attn_proj.forward(&y)
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>, index: usize) -> Result<Tensor> {
        let x = x.f_add(&self.attention(&self.ln_1.forward(x)?, pass, index)?)?;
        let h = self.act.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        Ok(x.f_add(&self.mlp_proj.forward(&h)?)?)
    }
}

/// GPT-2's layers; the model is [`Gpt2`].
#[derive(Debug)]
pub struct Gpt2Decoder {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight`, or `wte` itself when tied.
    lm_head: Tensor,
    params: Params,
    sizes: Sizes,
}

/// GPT-2 for causal language modelling.
pub type Gpt2 = crate::Model<Gpt2Decoder>;

impl Gpt2Decoder {
    /// Declares the layers on `vs`, with parameter names under `prefix` (`"transformer"`, or `""` for
    /// checkpoints of the bare base model).
    fn new(vs: &VarStore, params: &Params, prefix: &str) -> Result<Self> {
        let c = &params.raw;
        let root = vs.root();
        let p = if prefix.is_empty() { root.clone() } else { &root / prefix };
        let (d, eps) = (c.n_embd, c.layer_norm_epsilon);
        let wte = layers::param(&(&p / "wte"), "weight", &[c.vocab_size, d])?;
        let wpe = layers::param(&(&p / "wpe"), "weight", &[c.n_positions, d])?;
        let head_dim = (d / c.n_head) as f64;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let h = &p / "h" / i;
                let mut scale = if c.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 };
                if c.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f64;
                }
                Ok(Block {
                    ln_1: LayerNorm::new(&h / "ln_1", d, eps)?,
                    c_attn: Conv1D::new(&h / "attn" / "c_attn", d, 3 * d)?,
                    attn_proj: Conv1D::new(&h / "attn" / "c_proj", d, d)?,
                    ln_2: LayerNorm::new(&h / "ln_2", d, eps)?,
                    c_fc: Conv1D::new(&h / "mlp" / "c_fc", d, params.inner)?,
                    mlp_proj: Conv1D::new(&h / "mlp" / "c_proj", params.inner, d)?,
                    act: params.act,
                    heads: c.n_head,
                    scale,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(&p / "ln_f", d, eps)?;
        let lm_head = if c.tie_word_embeddings {
            wte.shallow_clone()
        } else {
            layers::param(&(&root / "lm_head"), "weight", &[c.vocab_size, d])?
        };
        Ok(Self { wte, wpe, blocks, ln_f, lm_head, sizes: params.sizes(), params: params.clone() })
    }
}

impl Decoder for Gpt2Decoder {
    fn sizes(&self) -> &Sizes {
        &self.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let mut x = hooks.around(Stage::Embedding, || {
            Ok(layers::embed(&self.wte, &input.input_ids)?.f_add(&layers::embed(&self.wpe, &input.positions)?)?)
        })?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = hooks.around(Stage::Block(i), || block.forward(&x, pass, i))?;
        }
        hooks.around(Stage::FinalNorm, || self.ln_f.forward(&x))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::output_head(hidden, &self.lm_head)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.params.raw;
        layers::dense_model_flops(lengths, scored, c.n_layer, c.n_embd, self.params.inner, c.vocab_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2_SMALL: &str = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "bos_token_id": 50256, "eos_token_id": 50256, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}"#;

    fn config(json: &str) -> Result<Params> {
        let file = ConfigFile::parse(Path::new("config.json"), json.to_owned())?;
        Params::validate(&file, file.deserialize()?)
    }

    #[test]
    fn gpt2_small_parses_and_counts_parameters() {
        let c = config(GPT2_SMALL).unwrap();
        assert!(c.raw.tie_word_embeddings && c.raw.scale_attn_weights);
        let vs = VarStore::new(tch::Device::Cpu);
        let decoder = Gpt2Decoder::new(&vs, &c, "").unwrap();
        let model = crate::Model::from_parts(vs, decoder);
        // GPT-2 small: 124,439,808 parameters.
        assert_eq!(crate::CausalLm::parameter_bytes(&model), 124_439_808 * 4);
        assert!(model.var_store().variables().contains_key("h.0.attn.c_attn.weight"));
        assert_eq!(c.stage_of("transformer.h.11.attn.c_attn.weight"), Some(Stage::Block(11)));
        assert_eq!(c.stage_of("wpe.weight"), Some(Stage::Embedding));
        assert_eq!(c.stage_of("transformer.ln_f.bias"), Some(Stage::FinalNorm));
        assert_eq!(c.stage_of("lm_head.weight"), Some(Stage::Head));
        let expected = 12.0 * 2.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0) * 3.0
            + 12.0 * 4.0 * 768.0 * 6.0
            + 2.0 * 768.0 * 50257.0;
        assert_eq!(crate::CausalLm::forward_flops(&model, &[3], 1), expected);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = GPT2_SMALL.replace(r#""n_head": 12"#, r#""n_head": 7"#);
        let e = config(&bad).unwrap_err().to_string();
        assert!(e.contains("n_embd") && e.contains("config.json"), "{e}");
        let bad = GPT2_SMALL.replace(r#""gelu_new""#, r#""tanh""#);
        let e = config(&bad).unwrap_err().to_string();
        assert!(e.contains("activation_function") && e.contains("tanh"), "{e}");
        let bad = GPT2_SMALL.replace(r#""n_embd": 768,"#, "");
        let e = config(&bad).unwrap_err().to_string();
        assert!(e.contains("n_embd"), "{e}");
    }
}
