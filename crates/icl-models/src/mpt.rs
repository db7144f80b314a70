//! MPT (MosaicML's MPT-7B, MPT-30B and their fine-tunes), as Hugging Face's `MptForCausalLM`
//! computes it.
//!
//! No position embeddings: attention scores get an ALiBi bias, `-slope * (query - key position)` with a
//! slope per head, the slopes of transformers' `build_mpt_alibi_tensor` (also for head counts that are
//! not powers of two). Pre-norm blocks `x + attn(norm_1(x))`, then `+ ffn(norm_2(x))`, with LayerNorms
//! that have no bias (`no_bias`); one fused `Wqkv` projection (queries, keys, values, each `d_model`
//! wide, optionally clamped to `±clip_qkv`), scores scaled by `softmax_scale` (`1/sqrt(head_dim)` when
//! null), `out_proj`, an MLP `down_proj(gelu(up_proj(x)))` of `4 * d_model` with exact GELU, no biases
//! anywhere, and the token embedding as the head (`lm_head` if `tie_word_embeddings` is false).
//! `max_seq_len` bounds the positions. What transformers does not implement (and so would silently
//! ignore) is refused with the field named: `attn_config.qk_ln`, `prefix_lm`, `alibi: false`, an
//! `alibi_bias_max` other than 8, `attn_type` other than multi-head, `expansion_ratio` other than 4,
//! `no_bias: false`, `logit_scale`, a `norm_type` that is not a LayerNorm. Fields that change nothing
//! at inference are accepted and, as in transformers, not used: the dropouts, `learned_pos_emb` (with
//! ALiBi there is no position table), `attn_impl`, `init_*`, `embedding_fraction`. Tensor names follow
//! the checkpoint: `transformer.wte`, `transformer.blocks.{i}.{norm_1,norm_2}`, `transformer.blocks.{i}.attn.{Wqkv,out_proj}`,
//! `transformer.blocks.{i}.ffn.{up_proj,down_proj}`, `transformer.norm_f`, `lm_head`.

use crate::layers::{self, Activation, LayerNorm, Linear};
use crate::model::{Declared, Decoder, Pass, PositionTable, Sizes};
use crate::registry::{self, ArchConfig, Architecture, ConfigFile, StageNames};
use crate::{ModelInput, Result, Stage};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub(crate) const ARCHITECTURE: Architecture = Architecture { model_types: &["mpt"], parse };

const STAGES: StageNames = StageNames {
    embedding: &["transformer.wte"],
    blocks: "transformer.blocks",
    final_norm: &["transformer.norm_f"],
    head: &["lm_head"],
};

/// The one `alibi_bias_max` accepted: transformers builds its slopes with 8 whatever the config says.
const ALIBI_BIAS_MAX: f64 = 8.0;

/// MPT's `config.json`, with the defaults of transformers' `MptConfig` for what it may omit.
#[derive(Debug, Clone, Deserialize)]
pub struct MptConfig {
    pub d_model: i64,
    pub n_heads: i64,
    pub n_layers: i64,
    pub vocab_size: i64,
    #[serde(default = "MptConfig::four")]
    pub expansion_ratio: i64,
    #[serde(default = "MptConfig::seq_len")]
    pub max_seq_len: i64,
    #[serde(default = "MptConfig::eps")]
    pub layer_norm_epsilon: f64,
    /// Null or absent: every default of [`MptAttentionConfig`].
    #[serde(default)]
    pub attn_config: Option<MptAttentionConfig>,
    #[serde(default = "MptConfig::yes")]
    pub no_bias: bool,
    /// A number or a string in MosaicML's configs; transformers does not apply it.
    #[serde(default)]
    pub logit_scale: Option<serde_json::Value>,
    #[serde(default = "MptConfig::low_precision_layernorm")]
    pub norm_type: String,
    #[serde(default = "MptConfig::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default, deserialize_with = "layers::token_id")]
    pub eos_token_id: Option<u32>,
}

impl MptConfig {
    fn four() -> i64 {
        4
    }
    fn seq_len() -> i64 {
        2048
    }
    fn eps() -> f64 {
        1e-5
    }
    fn yes() -> bool {
        true
    }
    fn low_precision_layernorm() -> String {
        "low_precision_layernorm".into()
    }
}

/// MPT's nested `attn_config`, with the defaults of transformers' `MptAttentionConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct MptAttentionConfig {
    #[serde(default = "MptAttentionConfig::multihead")]
    pub attn_type: String,
    /// Clamp the fused query-key-value projection to `±clip_qkv` (null or 0: no clamp).
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// The factor on the scores; `1/sqrt(d_model / n_heads)` when null.
    #[serde(default)]
    pub softmax_scale: Option<f64>,
    #[serde(default)]
    pub prefix_lm: bool,
    #[serde(default)]
    pub qk_ln: bool,
    #[serde(default = "MptAttentionConfig::yes")]
    pub alibi: bool,
    #[serde(default = "MptAttentionConfig::eight")]
    pub alibi_bias_max: f64,
}

impl MptAttentionConfig {
    fn multihead() -> String {
        "multihead_attention".into()
    }
    fn yes() -> bool {
        true
    }
    fn eight() -> f64 {
        ALIBI_BIAS_MAX
    }
}

impl Default for MptAttentionConfig {
    fn default() -> Self {
        Self {
            attn_type: Self::multihead(),
            clip_qkv: None,
            softmax_scale: None,
            prefix_lm: false,
            qk_ln: false,
            alibi: true,
            alibi_bias_max: ALIBI_BIAS_MAX,
        }
    }
}

/// A validated MPT config.
#[derive(Debug, Clone)]
struct Params {
    raw: MptConfig,
    head_dim: i64,
    scale: f64,
    clip_qkv: Option<f64>,
    sizes: Sizes,
}

fn parse(file: &ConfigFile) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Params::validate(file, file.deserialize()?)?))
}

/// The first option transformers' `MptForCausalLM` would ignore, as `(field, why)`.
fn unimplemented_option(c: &MptConfig, a: &MptAttentionConfig) -> Option<(&'static str, String)> {
    let ignored = "transformers' MptForCausalLM does not implement it";
    if a.attn_type != "multihead_attention" {
        return Some(("attn_config.attn_type", format!("`{}`: only multihead_attention is supported", a.attn_type)));
    }
    if a.qk_ln {
        return Some(("attn_config.qk_ln", format!("true: {ignored}")));
    }
    if a.prefix_lm {
        return Some(("attn_config.prefix_lm", format!("true: {ignored}")));
    }
    if !a.alibi {
        return Some(("attn_config.alibi", "false (learned positions) is not supported".into()));
    }
    if a.alibi_bias_max != ALIBI_BIAS_MAX {
        return Some((
            "attn_config.alibi_bias_max",
            format!(
                "{}: only 8 is supported (transformers builds its ALiBi slopes with 8 whatever the config says)",
                a.alibi_bias_max
            ),
        ));
    }
    if c.expansion_ratio != 4 {
        return Some((
            "expansion_ratio",
            format!("{}: only 4 is supported (transformers' MLP is 4 * d_model)", c.expansion_ratio),
        ));
    }
    if !c.no_bias {
        return Some(("no_bias", format!("false (biases): {ignored}")));
    }
    if let Some(scale) = c.logit_scale.as_ref().filter(|v| !v.is_null()) {
        return Some(("logit_scale", format!("{scale}: {ignored}")));
    }
    if !matches!(c.norm_type.as_str(), "low_precision_layernorm" | "layernorm") {
        return Some(("norm_type", format!("`{}`: only layernorm and low_precision_layernorm", c.norm_type)));
    }
    None
}

impl Params {
    fn validate(file: &ConfigFile, raw: MptConfig) -> Result<Self> {
        let c = &raw;
        file.positive(&[
            ("d_model", c.d_model),
            ("n_heads", c.n_heads),
            ("n_layers", c.n_layers),
            ("vocab_size", c.vocab_size),
            ("max_seq_len", c.max_seq_len),
        ])?;
        file.divisible(("d_model", c.d_model), ("n_heads", c.n_heads))?;
        let attn = c.attn_config.clone().unwrap_or_default();
        if let Some((field, why)) = unimplemented_option(c, &attn) {
            return Err(file.error(format!("field `{field}`: {why}")));
        }
        let non_negative = |field: &str, value: Option<f64>| match value {
            Some(v) if !(v.is_finite() && v >= 0.0) => {
                Err(file.error(format!("field `{field}`: {v} is not a finite number at least 0")))
            }
            _ => Ok(()),
        };
        non_negative("attn_config.clip_qkv", attn.clip_qkv)?;
        non_negative("attn_config.softmax_scale", attn.softmax_scale)?;
        let head_dim = c.d_model / c.n_heads;
        // transformers' ALiBi table covers `max_seq_len` keys: positions beyond it are refused.
        let table = PositionTable { size: c.max_seq_len, field: "max_seq_len" };
        let (vocab_size, hidden_size, eos_token_id) = (c.vocab_size, c.d_model, c.eos_token_id);
        let max_length = c.max_seq_len as usize;
        let sizes = Sizes { vocab_size, hidden_size, max_length, positions: Some(table), eos_token_id };
        Ok(Self {
            sizes,
            scale: attn.softmax_scale.unwrap_or(1.0 / (c.d_model as f64 / c.n_heads as f64).sqrt()),
            // As transformers' `if self.clip_qkv:`, 0 does not clamp.
            clip_qkv: attn.clip_qkv.filter(|&v| v != 0.0),
            head_dim,
            raw,
        })
    }
}

impl ArchConfig for Params {
    fn sizes(&self) -> Sizes {
        self.sizes.clone()
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        registry::parameter_lower_bound(self.raw.vocab_size, self.raw.d_model, self.raw.n_layers)
    }

    fn declare(&self, vs: VarStore, _dir: &Path) -> Result<Box<dyn Declared>> {
        registry::declared(vs, |vs| MptDecoder::new(vs, self))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        STAGES.stage_of(name)
    }
}

/// MPT's ALiBi slopes, as transformers' `build_mpt_alibi_tensor` computes them (in f32): `1 /
/// 2^(i * bias_max / n)` for `i` in `1..=n`, `n` the power of two at or above `heads`; when `heads` is
/// smaller, every second slope from the second, then every second from the first, the first `heads`.
fn alibi_slopes(heads: i64, bias_max: f64) -> Result<Tensor> {
    let n = heads.max(1).unsigned_abs().next_power_of_two() as i64;
    let base = Tensor::f_arange_start(1, n + 1, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(bias_max / n as f64)?;
    let slopes = Tensor::f_pow_scalar(2.0, &base)?.f_reciprocal()?;
    if n == heads {
        return Ok(slopes);
    }
    let interleaved = Tensor::f_cat(&[slopes.f_slice(0, 1, n, 2)?, slopes.f_slice(0, 0, n, 2)?], 0)?;
    Ok(interleaved.f_narrow(0, 0, heads)?)
}

#[derive(Debug)]
struct Block {
    norm_1: LayerNorm,
    wqkv: Linear,
    out_proj: Linear,
    norm_2: LayerNorm,
    up_proj: Linear,
    down_proj: Linear,
}

/// MPT's layers; the model is [`Mpt`].
#[derive(Debug)]
pub struct MptDecoder {
    wte: Tensor,
    blocks: Vec<Block>,
    norm_f: LayerNorm,
    /// `lm_head`, or `transformer.wte` itself when tied.
    lm_head: Linear,
    /// f32 `[n_heads]`, on the model's device.
    slopes: Tensor,
    params: Params,
}

/// MPT for causal language modelling.
pub type Mpt = crate::Model<MptDecoder>;

impl MptDecoder {
    fn new(vs: &VarStore, params: &Params) -> Result<Self> {
        let c = &params.raw;
        let (d, eps) = (c.d_model, c.layer_norm_epsilon);
        let inner = c.expansion_ratio * d;
        let t = vs.root() / "transformer";
        let wte = layers::param(&(&t / "wte"), "weight", &[c.vocab_size, d])?;
        let blocks = (0..c.n_layers)
            .map(|i| {
                let b = &t / "blocks" / i;
                Ok(Block {
                    norm_1: LayerNorm::without_bias(&b / "norm_1", d, eps)?,
                    wqkv: Linear::new(&b / "attn" / "Wqkv", d, 3 * d, false)?,
                    out_proj: Linear::new(&b / "attn" / "out_proj", d, d, false)?,
                    norm_2: LayerNorm::without_bias(&b / "norm_2", d, eps)?,
                    up_proj: Linear::new(&b / "ffn" / "up_proj", d, inner, false)?,
                    down_proj: Linear::new(&b / "ffn" / "down_proj", inner, d, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: Linear::head(vs.root() / "lm_head", &wte, c.tie_word_embeddings)?,
            wte,
            blocks,
            norm_f: LayerNorm::without_bias(&t / "norm_f", d, eps)?,
            slopes: alibi_slopes(c.n_heads, ALIBI_BIAS_MAX)?.f_to_device(vs.device())?,
            params: params.clone(),
        })
    }

    /// Block `index`'s attention over `x` (`norm_1` applied), `bias` the ALiBi float mask.
    fn attn(&self, block: &Block, x: &Tensor, bias: &Tensor, pass: &mut Pass<'_>, index: usize) -> Result<Tensor> {
        let (heads, head_dim) = (self.params.raw.n_heads, self.params.head_dim);
        let mut qkv = block.wqkv.forward(x)?;
        if let Some(clip) = self.params.clip_qkv {
            qkv = qkv.f_clamp(-clip, clip)?;
        }
        let parts = qkv.f_chunk(3, -1)?;
        let [q, k, v] = [0, 1, 2].map(|i| layers::split_heads(&parts[i], heads, head_dim));
        let (k, v) = pass.keys_values(index, k?, v?)?;
        let y = layers::biased_attention(&q?, &k, &v, bias, self.params.scale)?;
        block.out_proj.forward(&y)
    }
}

impl Decoder for MptDecoder {
    fn sizes(&self) -> &Sizes {
        &self.params.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let mut x = hooks.around(Stage::Embedding, || layers::embed(&self.wte, &input.input_ids))?;
        // One bias for every block: distances within each sequence, so packing and caching never move it.
        let bias = layers::alibi_mask(pass.mask(), &pass.distances()?, &self.slopes)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = hooks.around(Stage::Block(i), || {
                let x = self.attn(block, &block.norm_1.forward(&x)?, &bias, pass, i)?.f_add(&x)?;
                let up = Activation::Gelu.forward(&block.up_proj.forward(&block.norm_2.forward(&x)?)?)?;
                Ok(block.down_proj.forward(&up)?.f_add(&x)?)
            })?;
        }
        hooks.around(Stage::FinalNorm, || self.norm_f.forward(&x))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let c = &self.params.raw;
        layers::dense_model_flops(lengths, scored, c.n_layers, c.d_model, c.expansion_ratio * c.d_model, c.vocab_size)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// mosaicml/mpt-7b's config.json (less `auto_map` and `init_config`).
    const MPT_7B: &str = r#"{"architectures": ["MPTForCausalLM"], "attn_config": {"alibi": true,
        "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0, "attn_type": "multihead_attention",
        "attn_uses_sequence_id": false, "clip_qkv": null, "prefix_lm": false, "qk_ln": false,
        "softmax_scale": null}, "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0,
        "expansion_ratio": 4, "init_device": "cpu", "learned_pos_emb": true, "logit_scale": null,
        "max_seq_len": 2048, "model_type": "mpt", "n_heads": 32, "n_layers": 32, "no_bias": true,
        "norm_type": "low_precision_layernorm", "resid_pdrop": 0, "tokenizer_name": "EleutherAI/gpt-neox-20b",
        "torch_dtype": "bfloat16", "transformers_version": "4.28.1", "use_cache": false, "verbose": 0,
        "vocab_size": 50432}"#;

    fn config(json: &str) -> Result<Params> {
        let file = ConfigFile::parse(Path::new("config.json"), json.to_owned())?;
        Params::validate(&file, file.deserialize()?)
    }

    fn error(from: &str, to: &str) -> String {
        assert!(MPT_7B.contains(from), "{from}");
        config(&MPT_7B.replace(from, to)).unwrap_err().to_string()
    }

    #[test]
    fn mpt_7b_parses_and_counts_parameters() {
        let c = config(MPT_7B).unwrap();
        assert_eq!((c.head_dim, c.scale, c.clip_qkv, c.raw.eos_token_id), (128, 1.0 / 128f64.sqrt(), None, None));
        let model = layers::declare_shapes_only(|| c.declare(VarStore::new(Device::Cpu), Path::new(".")))
            .unwrap()
            .into_causal_lm();
        // MPT-7B has 6,649,286,656 parameters (tied head counted once).
        assert_eq!(model.parameter_bytes(), 6_649_286_656 * 4);
        assert_eq!(model.max_length(), 2048);
        assert_eq!(c.stage_of("transformer.blocks.31.attn.Wqkv.weight"), Some(Stage::Block(31)));
        assert_eq!(c.stage_of("transformer.wte.weight"), Some(Stage::Embedding));
        assert_eq!(c.stage_of("transformer.norm_f.weight"), Some(Stage::FinalNorm));
        // Dense: 32 layers x 2 x (4 * 4096^2 + 2 * 4096 * 16384) per token; attention 4 * 4096 per key.
        let expected = 10.0 * 32.0 * 2.0 * (4.0 * 4096.0 * 4096.0 + 2.0 * 4096.0 * 16384.0)
            + 32.0 * 4.0 * 4096.0 * 55.0
            + 2.0 * 2.0 * 4096.0 * 50432.0;
        assert_eq!(model.forward_flops(&[10], 2), expected);
        // A null attn_config takes every default.
        let mut json: serde_json::Value = serde_json::from_str(MPT_7B).unwrap();
        json["attn_config"] = serde_json::Value::Null;
        let c = config(&json.to_string()).unwrap();
        assert!(c.raw.attn_config.is_none() && c.scale == 1.0 / 128f64.sqrt());
    }

    #[test]
    fn slopes_follow_build_mpt_alibi_tensor() {
        let slopes = |heads| Vec::<f32>::try_from(alibi_slopes(heads, 8.0).unwrap()).unwrap();
        assert_eq!(slopes(4), [0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: the 8 slopes 2^-1 .. 2^-8, odd-numbered first, then even, cut to 6.
        let p = |e: i32| 2f32.powi(-e);
        assert_eq!(slopes(6), [p(2), p(4), p(6), p(8), p(1), p(3)]);
        assert_eq!(slopes(1), [p(8)]);
        let s = slopes(16);
        assert!((s[0] - 2f32.powf(-0.5)).abs() < 1e-7 && (s[15] - p(8)).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn options_transformers_ignores_are_refused_with_the_field() {
        for (from, to, field) in [
            (r#""qk_ln": false"#, r#""qk_ln": true"#, "attn_config.qk_ln"),
            (r#""prefix_lm": false"#, r#""prefix_lm": true"#, "attn_config.prefix_lm"),
            (r#""alibi": true"#, r#""alibi": false"#, "attn_config.alibi"),
            (r#""alibi_bias_max": 8"#, r#""alibi_bias_max": 16"#, "attn_config.alibi_bias_max"),
            (r#""multihead_attention""#, r#""multiquery_attention""#, "attn_config.attn_type"),
            (r#""expansion_ratio": 4"#, r#""expansion_ratio": 6"#, "expansion_ratio"),
            (r#""no_bias": true"#, r#""no_bias": false"#, "no_bias"),
            (r#""logit_scale": null"#, r#""logit_scale": "inv_sqrt_d_model""#, "logit_scale"),
            (r#""low_precision_layernorm""#, r#""rmsnorm""#, "norm_type"),
            (r#""clip_qkv": null"#, r#""clip_qkv": -1"#, "attn_config.clip_qkv"),
            (r#""softmax_scale": null"#, r#""softmax_scale": -0.5"#, "attn_config.softmax_scale"),
            (r#""n_heads": 32"#, r#""n_heads": 24"#, "d_model"),
            (r#""max_seq_len": 2048"#, r#""max_seq_len": 0"#, "max_seq_len"),
        ] {
            let e = error(from, to);
            assert!(e.contains("config.json") && e.contains(&format!("field `{field}`")), "{to}: {e}");
        }
        // Implemented: clamping and a given scale.
        let c = config(&MPT_7B.replace(r#""clip_qkv": null"#, r#""clip_qkv": 6"#)).unwrap();
        assert_eq!(c.clip_qkv, Some(6.0));
        let c = config(&MPT_7B.replace(r#""softmax_scale": null"#, r#""softmax_scale": 0.1"#)).unwrap();
        assert_eq!(c.scale, 0.1);
    }
}
