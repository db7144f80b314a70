//! Building blocks shared by the architectures: parameters declared on a `VarStore` under their
//! checkpoint names, fallible forward passes (bad input is an error, never a panic), activations,
//! attention, and the config fields several `config.json` schemas spell the same way.

use crate::key_spans::KeySpans;
use crate::model::{Declared, Decoder, Pass, Sizes};
use crate::registry::{self, ArchConfig, ConfigFile, StageNames};
use crate::rope::{RopeFields, RopeParameters, RopeSpec, RopeTables, Rotary};
use crate::{Error, ModelInput, Result, Stage};
use serde::{Deserialize, Deserializer};
use std::marker::PhantomData;
use std::path::Path;
use tch::nn::{self, VarStore};
use tch::{Kind, Tensor};

/// A parameter named `name` under `p`, in the store's kind and device. Allocated but never written:
/// every parameter is overwritten by the checkpoint ([`crate::load_weights`] refuses a checkpoint that
/// lacks one), which is cheaper than a fill. Under [`declare_shapes_only`] nothing is allocated.
pub(crate) fn param(p: &nn::Path, name: &str, dims: &[i64]) -> Result<Tensor> {
    let options = (p.kind(), p.device());
    let tensor = if SHAPES_ONLY.get() {
        // One element seen through every index: the shape, without memory.
        Tensor::f_zeros([1], options)?.f_expand(dims, false)?
    } else {
        Tensor::f_empty(dims, options)?
    };
    Ok(p.add(name, tensor, true))
}

thread_local! {
    static SHAPES_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `declare` (a model's `new`) with every [`param`] declared as a shape only: a single element
/// broadcast to the parameter's shape, which must be given storage (`set_data`) before it is used.
/// How a parameter-sharded model is declared: allocating the parameters, even untouched, would leave
/// a model-sized free region in the heap once they are replaced by shards, and later allocations
/// wander through it, touching pages until the process is as large as the unsharded model.
pub(crate) fn declare_shapes_only<T>(declare: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SHAPES_ONLY.set(false);
        }
    }
    SHAPES_ONLY.set(true);
    let _reset = Reset;
    declare()
}

/// Hugging Face's `nn.Linear`: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = param(&p, "weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(param(&p, "bias", &[out_dim])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// An output head without bias over `embedding` `[vocab, hidden]`: its own `weight` under `p`
    /// (`lm_head`), or with `tied` the embedding table itself, which then has no parameter of its own.
    pub(crate) fn head(p: nn::Path, embedding: &Tensor, tied: bool) -> Result<Self> {
        if tied {
            return Ok(Self { weight: embedding.shallow_clone(), bias: None });
        }
        let (vocab, hidden) = embedding.size2()?;
        Self::new(p, hidden, vocab, false)
    }

    /// `x · weightᵀ + bias`, through [`crate::skinny`] for the few rows of a decoding step.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match crate::skinny::linear(x, &self.weight, self.bias.as_ref())? {
            Some(y) => Ok(y),
            None => Ok(x.f_linear(&self.weight, self.bias.as_ref())?),
        }
    }
}

/// Logits of `hidden` (`[..., hidden]`) under an output head or tied embedding `weight` (`[vocab,
/// hidden]`): `hidden · weightᵀ`, through [`crate::skinny`] for the few rows of a decoding step.
pub(crate) fn output_head(hidden: &Tensor, weight: &Tensor) -> Result<Tensor> {
    match crate::skinny::linear(hidden, weight, None)? {
        Some(logits) => Ok(logits),
        None => Ok(hidden.f_matmul(&weight.f_tr()?)?),
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with `weight` and (unless made
/// [`LayerNorm::without_bias`]) `bias`.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: param(&p, "weight", &[dim])?, bias: Some(param(&p, "bias", &[dim])?), eps })
    }

    /// A LayerNorm with a gain only (`bias=None`, as MPT's).
    pub(crate) fn without_bias(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: param(&p, "weight", &[dim])?, bias: None, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.size();
        Ok(x.f_layer_norm(dim.as_slice(), Some(&self.weight), self.bias.as_ref(), self.eps, false)?)
    }
}

/// Where an RMSNorm rounds and how it applies its gain; each as its reference computes it, so that
/// bf16 rounds where the reference rounds (in f32 all three agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RmsStyle {
    /// Llama: normalised in f32, cast back to the input's kind, then scaled by the gain.
    CastThenScale,
    /// OLMo 2: scaled by the gain in f32, then cast back.
    ScaleThenCast,
    /// Gemma: scaled by `1 + gain` in f32, then cast back.
    OnePlusGain,
}

/// Root-mean-square norm over the last dimension with a gain `weight`.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
    style: RmsStyle,
}

impl RmsNorm {
    pub(crate) fn with_style(p: nn::Path, dim: i64, eps: f64, style: RmsStyle) -> Result<Self> {
        Ok(Self { weight: param(&p, "weight", &[dim])?, eps, style })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.f_to_kind(Kind::Float)?;
        let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(match self.style {
            RmsStyle::CastThenScale => self.weight.f_mul(&normed.f_to_kind(x.kind())?)?,
            RmsStyle::ScaleThenCast => normed.f_mul(&self.weight.f_to_kind(Kind::Float)?)?.f_to_kind(x.kind())?,
            RmsStyle::OnePlusGain => {
                normed.f_mul(&self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?)?.f_to_kind(x.kind())?
            }
        })
    }
}

/// Token (or position) lookup that reports an out-of-range id as an error.
pub(crate) fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_embedding(table, ids, -1, false, false)?)
}

/// The activations the supported configs name (`hidden_act` / `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact (erf) form.
    Gelu,
    Relu,
    Silu,
}

impl Activation {
    /// Parses an activation name; the error names `field`.
    pub(crate) fn parse(name: &str, field: &str) -> Result<Self, String> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(format!(
                "field `{field}`: `{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, \
                 gelu_fast, relu, silu)"
            )),
        }
    }

    pub(crate) fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluTanh => match crate::gelu_tanh::forward(x)? {
                Some(y) => y,
                None => x.f_gelu("tanh")?,
            },
            Self::Gelu => x.f_gelu("none")?,
            Self::Relu => x.f_relu()?,
            Self::Silu => x.f_silu()?,
        })
    }
}

/// Scaled dot-product attention over `[rows, heads, seq, head_dim]` queries and `[rows, kv_heads, keys,
/// head_dim]` keys and values; `mask`, broadcastable to `[rows, heads, seq, keys]`, is boolean or a float
/// bias added to the scores (one over heads only with `kv_heads == heads`; see [`biased_attention`]). Key-value
/// heads are repeated to the query heads here rather than through SDPA's `enable_gqa`: on CPU the
/// repeated form takes the fused kernel and is about twice as fast. Returns `[rows, seq, heads * head_dim]`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with_dropout(q, k, v, mask, scale, 0.0, None)
}

/// [`attention`] with dropout `p` on the attention weights (training only; 0 is the inference
/// computation exactly), over only the keys each window of queries sees when `spans` (found in
/// `mask`, see [`crate::key_spans`]) are given and dropout is off.
pub(crate) fn attention_with_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    p: f64,
    spans: Option<&KeySpans>,
) -> Result<Tensor> {
    let (b, heads, t, head_dim) = q.size4()?;
    // With a key-value cache there are more keys than queries.
    let (_, kv_heads, keys, _) = k.size4()?;
    if t == 1 && p == 0.0 && mask.kind() == Kind::Bool && mask.size() == [b, 1, 1, keys] {
        // A decoding step: the query heads of a key-value head as its rows, the cache's keys and
        // values used where they are.
        let q_by_kv = q.f_reshape([b, kv_heads, heads / kv_heads, head_dim])?;
        let seen = mask.f_reshape([b, keys])?;
        if let Some((y, _)) = crate::skinny::one_query_attention(&q_by_kv, k, v, &seen, scale)? {
            return Ok(y.f_to_kind(q.kind())?.f_reshape([b, 1, heads * head_dim])?);
        }
    }
    if p == 0.0 && (t > 1 || !crate::skinny::in_decoding()) {
        // On CPUs with AVX-512 BF16, bf16 attention through icl's kernel, key-value heads shared
        // without copies and each query block over only the keys it sees. Every scoring batch takes
        // it, whatever its length, so a row's result does not depend on its batch; a decoding step
        // (one query, every cached key) is as fast through the path below.
        if let Some(y) = crate::bf16_attention::forward(q, k, v, mask, scale)? {
            return Ok(y);
        }
    }
    if t == 1 && kv_heads != heads {
        // One query per row (a decoding step): the query heads of a key-value head become its queries,
        // `[rows, kv_heads, groups, head_dim]`, so the cached keys and values are used without copies.
        // The mask's query axis has size 1 and broadcasts over the groups.
        let groups = heads / kv_heads;
        let q = q.f_reshape([b, kv_heads, groups, head_dim])?;
        let y = Tensor::f_scaled_dot_product_attention(&q, k, v, Some(mask), p, false, scale, false)?;
        return Ok(y.f_reshape([b, 1, heads * head_dim])?);
    }
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if kv_heads == heads {
            return Ok(x.shallow_clone());
        }
        let groups = heads / kv_heads;
        Ok(x.f_unsqueeze(2)?
            .f_expand([b, kv_heads, groups, keys, head_dim], false)?
            .f_reshape([b, heads, keys, head_dim])?)
    };
    let y = match spans {
        Some(spans) if p == 0.0 && spans.fit(mask) => spans.attend(q, &repeat(k)?, &repeat(v)?, mask, scale)?,
        _ => Tensor::f_scaled_dot_product_attention(q, &repeat(k)?, &repeat(v)?, Some(mask), p, false, scale, false)?,
    };
    Ok(y.f_transpose(1, 2)?.f_reshape([b, t, heads * head_dim])?)
}

/// [`attention`] of queries `q` (`[rows, heads, t, head_dim]`) over a prefix that every row shares
/// and every query sees (`shared`: keys and values `[1, kv_heads, prefix, head_dim]`), followed by
/// each row's own keys and values (`own`: `[rows, kv_heads, keys - prefix, head_dim]`) under
/// `own_mask` (boolean, `[rows, 1, t, keys - prefix]`, each query seeing at least one key). Each part
/// runs through libtorch's flash attention, which also gives each query's log-sum-exp of scores: the
/// shared part as one sequence of every row's queries per key-value head, so the prefix's keys and
/// values are read once for all rows and never copied per row (in a decoding step, the own part goes
/// through [`crate::skinny::one_query_attention`]). The two results are merged by their log-sum-exps,
/// which is the softmax over all keys up to rounding. Returns `[rows, t, heads * head_dim]`.
pub(crate) fn attention_after_shared(
    q: &Tensor,
    shared: &(Tensor, Tensor),
    own: &(Tensor, Tensor),
    own_mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (rows, heads, t, head_dim) = q.size4()?;
    let (sk, sv) = shared;
    let (ok, ov) = own;
    let kv_heads = sk.size4()?.1;
    let groups = heads / kv_heads;
    let flash = |q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<Tensor>| -> Result<(Tensor, Tensor)> {
        Ok(Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, mask, scale)?)
    };
    // Shared part: `[1, kv_heads, rows * groups * t, head_dim]`, then back to `[rows, kv_heads,
    // groups, t, ...]`.
    let q_by_kv = q.f_reshape([rows, kv_heads, groups, t, head_dim])?;
    let q_shared = q_by_kv.f_permute([1, 0, 2, 3, 4])?.f_reshape([1, kv_heads, rows * groups * t, head_dim])?;
    let (shared_out, shared_lse) = flash(&q_shared, sk, sv, None)?;
    let back = |x: Tensor, last: i64| -> Result<Tensor> {
        Ok(x.f_reshape([kv_heads, rows, groups, t, last])?.f_permute([1, 0, 2, 3, 4])?)
    };
    let (shared_out, shared_lse) = (back(shared_out, head_dim)?, back(shared_lse, 1)?);
    // Own part, as an additive mask (0 where a key is seen, -inf elsewhere). One query per row: the
    // query heads of a key-value head are its queries, so the cached keys are used without copies.
    let own_mask = own_mask.f_expand([rows, 1, t, own_mask.size().last().copied().unwrap_or(0)], false)?;
    let additive = || -> Result<Tensor> {
        Ok(Tensor::f_zeros(own_mask.size().as_slice(), (q.kind(), q.device()))?
            .f_masked_fill(&own_mask.f_logical_not()?, f64::NEG_INFINITY)?)
    };
    let one_query = if t == 1 {
        let seen = own_mask.f_reshape([rows, own_mask.size()[3]])?;
        crate::skinny::one_query_attention(
            &q_by_kv.f_reshape([rows, kv_heads, groups, head_dim])?,
            ok,
            ov,
            &seen,
            scale,
        )?
    } else {
        None
    };
    let (own_out, own_lse) = if let Some(computed) = one_query {
        computed
    } else if t == 1 {
        flash(&q_by_kv.f_reshape([rows, kv_heads, groups, head_dim])?, ok, ov, Some(additive()?))?
    } else {
        flash(q, &repeat_kv(ok, heads)?, &repeat_kv(ov, heads)?, Some(additive()?))?
    };
    let own_out = own_out.f_reshape([rows, kv_heads, groups, t, head_dim])?;
    let own_lse = own_lse.f_reshape([rows, kv_heads, groups, t, 1])?;
    let max = shared_lse.f_maximum(&own_lse)?;
    let shared_weight = shared_lse.f_sub(&max)?.f_exp()?;
    let own_weight = own_lse.f_sub(&max)?.f_exp()?;
    let total = shared_weight.f_add(&own_weight)?;
    let y = shared_out
        .f_to_kind(Kind::Float)?
        .f_mul(&shared_weight)?
        .f_add(&own_out.f_to_kind(Kind::Float)?.f_mul(&own_weight)?)?
        .f_div(&total)?
        .f_to_kind(q.kind())?;
    Ok(y.f_reshape([rows, heads, t, head_dim])?.f_transpose(1, 2)?.f_reshape([rows, t, heads * head_dim])?)
}

/// Attention with Gemma 2's soft-capped scores, `cap * tanh(scores / cap)` before the mask, which a
/// fused kernel cannot apply: scores, softmax in f32 (cast back, as the reference) and weighted
/// values written out. Shapes and result as [`attention`]; `mask` is boolean.
pub(crate) fn softcapped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (b, heads, t, head_dim) = q.size4()?;
    let scores = q.f_matmul(&repeat_kv(k, heads)?.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
    let scores = softcap(&scores, cap)?;
    let scores = scores.f_masked_fill(&mask.f_logical_not()?, f64::NEG_INFINITY)?;
    let weights = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
    let y = weights.f_matmul(&repeat_kv(v, heads)?)?;
    Ok(y.f_transpose(1, 2)?.f_reshape([b, t, heads * head_dim])?)
}

/// Keys or values `[rows, kv_heads, keys, head_dim]` repeated to `[rows, heads, keys, head_dim]`, each
/// key-value head serving its group of query heads.
fn repeat_kv(x: &Tensor, heads: i64) -> Result<Tensor> {
    let (b, kv_heads, keys, head_dim) = x.size4()?;
    let groups = heads / kv_heads;
    Ok(x.f_unsqueeze(2)?
        .f_expand([b, kv_heads, groups, keys, head_dim], false)?
        .f_reshape([b, heads, keys, head_dim])?)
}

/// Attention with an additive f32 `bias` on the scores (`[rows or 1, heads, seq, keys]`, `-inf` where a
/// query may not attend, as [`alibi_mask`] makes it), shapes and result as [`attention`]. In f32 the bias
/// is SDPA's float mask. In other kinds it is added as transformers' eager attention adds it: scores in
/// the compute kind, the bias added in f32, softmax in f32 and cast back. (A fused kernel would need the
/// bias in the query's kind, rounding it, and CUDA's refuses an f32 bias with bf16 queries.)
pub(crate) fn biased_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if q.kind() == Kind::Float {
        return attention(q, k, v, bias, scale);
    }
    let (b, heads, t, head_dim) = q.size4()?;
    let scores = q.f_matmul(&repeat_kv(k, heads)?.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
    let weights = scores.f_to_kind(Kind::Float)?.f_add(bias)?.f_softmax(-1, Kind::Float)?.f_to_kind(v.kind())?;
    let y = weights.f_matmul(&repeat_kv(v, heads)?)?;
    Ok(y.f_transpose(1, 2)?.f_reshape([b, t, heads * head_dim])?)
}

/// ALiBi's attention bias as a float mask for [`biased_attention`], f32 `[rows, heads, seq, keys]`: `-slope *
/// distance` with each head's slope (`slopes`, f32 `[heads]`) where boolean `mask` (`[rows or 1, 1, seq,
/// keys]`) lets a query attend, `-inf` elsewhere. `distances` are query minus key positions within each
/// sequence ([`Pass::distances`]), so packed rows, shared prefixes and cached keys get the bias of
/// separate sequences. A softmax is unchanged by a shift per query, so this is the bias on key
/// positions alone (`slope * (key - last)`) that MPT and BLOOM add over an unpacked row.
pub(crate) fn alibi_mask(mask: &Tensor, distances: &Tensor, slopes: &Tensor) -> Result<Tensor> {
    let heads = slopes.size1()?;
    let bias = distances.f_to_kind(Kind::Float)?.f_unsqueeze(1)?.f_mul(&slopes.f_view([1, heads, 1, 1])?)?.f_neg()?;
    Ok(bias.f_masked_fill(&mask.f_logical_not()?, f64::NEG_INFINITY)?)
}

/// Gemma 2's soft cap on attention scores and logits, `cap * tanh(x / cap)`, in `x`'s kind.
pub(crate) fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(x.f_div_scalar(cap)?.f_tanh()?.f_mul_scalar(cap)?)
}

/// `[rows, seq, heads * head_dim]` as `[rows, heads, seq, head_dim]`.
pub(crate) fn split_heads(x: &Tensor, heads: i64, head_dim: i64) -> Result<Tensor> {
    let (b, t, _) = x.size3()?;
    Ok(x.f_view([b, t, heads, head_dim])?.f_transpose(1, 2)?)
}

/// Norms on queries and keys before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum QkNorm {
    None,
    /// Qwen 3: an RMSNorm over each head (`q_norm`, `k_norm` of `head_dim`).
    PerHead {
        eps: f64,
    },
    /// OLMo 2: an RMSNorm over the whole projection (`q_norm`, `k_norm` of `heads * head_dim`).
    Whole {
        eps: f64,
    },
}

/// The shape of a self-attention with `q_proj`, `k_proj`, `v_proj` (or one fused `qkv_proj`) and
/// `o_proj` projections and rotary embeddings (Llama and its descendants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttentionSpec {
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Biases on the query, key and value projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    /// Factor on the scores (`1 / sqrt(head_dim)` for most).
    pub scale: f64,
    /// Gemma 2's attention-score soft cap.
    pub softcap: Option<f64>,
}

/// Grouped-query self-attention with rotary embeddings, named `q_proj`, `k_proj`, `v_proj` (or
/// `qkv_proj`), `o_proj` (and `q_norm`, `k_norm`) under its path.
#[derive(Debug)]
pub(crate) struct SelfAttention {
    qkv: Qkv,
    o_proj: Linear,
    norms: Option<(RmsNorm, RmsNorm)>,
    spec: AttentionSpec,
}

impl SelfAttention {
    pub(crate) fn new(p: &nn::Path, spec: AttentionSpec, norm_style: RmsStyle) -> Result<Self> {
        let AttentionSpec { hidden, heads, kv_heads, head_dim, qkv_bias, .. } = spec;
        let qkv = Qkv::Separate {
            q_proj: Linear::new(p / "q_proj", hidden, heads * head_dim, qkv_bias)?,
            k_proj: Linear::new(p / "k_proj", hidden, kv_heads * head_dim, qkv_bias)?,
            v_proj: Linear::new(p / "v_proj", hidden, kv_heads * head_dim, qkv_bias)?,
        };
        Self::with_projections(p, spec, norm_style, qkv)
    }

    /// With one fused `qkv_proj` (Phi-3) instead of `q_proj`, `k_proj` and `v_proj`.
    pub(crate) fn fused(p: &nn::Path, spec: AttentionSpec, norm_style: RmsStyle) -> Result<Self> {
        let out = (spec.heads + 2 * spec.kv_heads) * spec.head_dim;
        let qkv = Qkv::Fused(Linear::new(p / "qkv_proj", spec.hidden, out, spec.qkv_bias)?);
        Self::with_projections(p, spec, norm_style, qkv)
    }

    fn with_projections(p: &nn::Path, spec: AttentionSpec, norm_style: RmsStyle, qkv: Qkv) -> Result<Self> {
        let AttentionSpec { hidden, heads, kv_heads, head_dim, o_bias, .. } = spec;
        let norms = match spec.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead { eps } => Some((
                RmsNorm::with_style(p / "q_norm", head_dim, eps, norm_style)?,
                RmsNorm::with_style(p / "k_norm", head_dim, eps, norm_style)?,
            )),
            QkNorm::Whole { eps } => Some((
                RmsNorm::with_style(p / "q_norm", heads * head_dim, eps, norm_style)?,
                RmsNorm::with_style(p / "k_norm", kv_heads * head_dim, eps, norm_style)?,
            )),
        };
        Ok(Self { qkv, o_proj: Linear::new(p / "o_proj", heads * head_dim, hidden, o_bias)?, norms, spec })
    }

    /// Attention of `x` `[rows, seq, hidden]` as layer `layer` of the pass, under `mask`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        pass: &mut Pass<'_>,
        layer: usize,
    ) -> Result<Tensor> {
        let AttentionSpec { heads, kv_heads, head_dim, .. } = self.spec;
        let (mut q, mut k, v) = self.qkv.forward(x, &self.spec)?;
        if let (Some((q_norm, k_norm)), QkNorm::Whole { .. }) = (&self.norms, self.spec.qk_norm) {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let (mut q, mut k) = (split_heads(&q, heads, head_dim)?, split_heads(&k, kv_heads, head_dim)?);
        if let (Some((q_norm, k_norm)), QkNorm::PerHead { .. }) = (&self.norms, self.spec.qk_norm) {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let v = split_heads(&v, kv_heads, head_dim)?;
        let y = match self.spec.softcap {
            Some(cap) => {
                let (k, v) = pass.keys_values(layer, k, v)?;
                softcapped_attention(&q, &k, &v, mask, self.spec.scale, cap)?
            }
            None => pass.attend(layer, &q, k, v, mask, self.spec.scale)?,
        };
        self.o_proj.forward(&y)
    }
}

/// The query, key and value projections of a [`SelfAttention`].
#[derive(Debug)]
enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    /// Phi-3's `qkv_proj`: the queries, then the keys, then the values along its output.
    Fused(Linear),
}

impl Qkv {
    /// Queries `[rows, seq, heads * head_dim]`, keys and values `[rows, seq, kv_heads * head_dim]`.
    fn forward(&self, x: &Tensor, spec: &AttentionSpec) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Separate { q_proj, k_proj, v_proj } => {
                Ok((q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?))
            }
            Self::Fused(qkv_proj) => {
                let qkv = qkv_proj.forward(x)?;
                let (q_dim, kv_dim) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
                Ok((
                    qkv.f_narrow(-1, 0, q_dim)?,
                    qkv.f_narrow(-1, q_dim, kv_dim)?,
                    qkv.f_narrow(-1, q_dim + kv_dim, kv_dim)?,
                ))
            }
        }
    }
}

/// A gated MLP, `down(act(gate(x)) * up(x))`: `gate_proj`, `up_proj`, `down_proj` (SwiGLU, GeGLU), or
/// Phi-3's fused `gate_up_proj` (gate first, then up) and `down_proj`.
#[derive(Debug)]
pub(crate) struct GatedMlp {
    gate_up: GateUp,
    down_proj: Linear,
    act: Activation,
}

#[derive(Debug)]
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
}

impl GatedMlp {
    pub(crate) fn new(p: &nn::Path, hidden: i64, inner: i64, bias: bool, act: Activation) -> Result<Self> {
        let gate_up = GateUp::Separate {
            gate_proj: Linear::new(p / "gate_proj", hidden, inner, bias)?,
            up_proj: Linear::new(p / "up_proj", hidden, inner, bias)?,
        };
        Ok(Self { gate_up, down_proj: Linear::new(p / "down_proj", inner, hidden, bias)?, act })
    }

    pub(crate) fn fused(p: &nn::Path, hidden: i64, inner: i64, bias: bool, act: Activation) -> Result<Self> {
        let gate_up = GateUp::Fused(Linear::new(p / "gate_up_proj", hidden, 2 * inner, bias)?);
        Ok(Self { gate_up, down_proj: Linear::new(p / "down_proj", inner, hidden, bias)?, act })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
            GateUp::Fused(gate_up_proj) => {
                let both = gate_up_proj.forward(x)?.f_chunk(2, -1)?;
                (both[0].shallow_clone(), both[1].shallow_clone())
            }
        };
        self.down_proj.forward(&self.act.forward(&gate)?.f_mul(&up)?)
    }
}

/// Multiply-adds of a [`SelfAttention`] and a [`GatedMlp`] per token (dense part), and FLOPs per
/// attended key, as [`crate::CausalLm::forward_flops`] counts them.
pub(crate) fn gated_block_flops(spec: &AttentionSpec, inner: i64) -> (f64, f64) {
    let (d, inner) = (spec.hidden as f64, inner as f64);
    let q_dim = (spec.heads * spec.head_dim) as f64;
    let kv_dim = (spec.kv_heads * spec.head_dim) as f64;
    // q and o (d * q_dim each), k and v (d * kv_dim each), gate, up and down (d * inner each); per
    // attended key, scores and weighted values (q_dim each).
    (2.0 * (2.0 * d * q_dim + 2.0 * d * kv_dim + 3.0 * d * inner), 2.0 * 2.0 * q_dim)
}

/// Where each layer of a model whose config has Qwen 2's window fields attends (Qwen 2 and Qwen 3
/// spell them the same way), as transformers' `Qwen2Config` / `Qwen3Config` resolve them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowFields<'a> {
    pub use_sliding_window: bool,
    /// Counts only with `use_sliding_window`; null is no window.
    pub sliding_window: Option<i64>,
    /// Without `layer_types`, the layers from this one on have the window.
    pub max_window_layers: i64,
    /// `full_attention` or `sliding_attention` for each layer.
    pub layer_types: Option<&'a [String]>,
    pub num_hidden_layers: i64,
}

impl WindowFields<'_> {
    /// Each layer's window: `None` attends to every earlier key, `Some(w)` to keys fewer than `w`
    /// positions back. Errors name the field; a `sliding_attention` layer without a window (which
    /// transformers refuses when it builds the mask) is one.
    pub(crate) fn resolve(&self) -> Result<Vec<Option<i64>>, String> {
        let windows = self.windows()?;
        // A window that no layer has may be anything, as in transformers.
        match windows.iter().flatten().find(|&&w| w <= 0) {
            Some(w) => Err(format!("field `sliding_window`: {w} is not positive")),
            None => Ok(windows),
        }
    }

    fn windows(&self) -> Result<Vec<Option<i64>>, String> {
        let window = self.sliding_window.filter(|_| self.use_sliding_window);
        let Some(types) = self.layer_types else {
            return Ok((0..self.num_hidden_layers).map(|i| window.filter(|_| i >= self.max_window_layers)).collect());
        };
        if types.len() as i64 != self.num_hidden_layers {
            return Err(format!(
                "field `layer_types`: {} entries for num_hidden_layers {}",
                types.len(),
                self.num_hidden_layers
            ));
        }
        let layer = |(i, kind): (usize, &String)| match kind.as_str() {
            // `attention` is transformers' legacy name of `full_attention`.
            "full_attention" | "attention" => Ok(None),
            "sliding_attention" => window.map(Some).ok_or_else(|| {
                format!(
                    "field `layer_types`: layer {i} is `sliding_attention` but there is no window (use_sliding_window \
                     is false or sliding_window is null)"
                )
            }),
            other => Err(format!(
                "field `layer_types`: `{other}` (layer {i}) is not supported (supported: full_attention, \
                 sliding_attention)"
            )),
        };
        types.iter().enumerate().map(layer).collect()
    }
}

/// `eos_token_id` as configs write it: a number, a list (the first is the end of text), or null.
pub(crate) fn token_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        Some(Id::One(id)) => Some(id),
        Some(Id::Many(ids)) => ids.first().copied(),
        None => None,
    })
}

/// A token id the model does not read (`bos_token_id`, `pad_token_id`): as [`token_id`], and anything
/// else (`-1`, a string) as `None` rather than an error, so that such a field never stops a config
/// from loading.
pub(crate) fn lenient_token_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(u32),
        Many(Vec<u32>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        Some(Id::One(id)) => Some(id),
        Some(Id::Many(ids)) => ids.first().copied(),
        Some(Id::Other(_)) | None => None,
    })
}

/// Whether the checkpoint in `dir` names its tensors with `prefix` (e.g. `transformer.`): models saved
/// from the bare base class (the original GPT-2 files) leave it out. Decided by `probe`, a tensor
/// every checkpoint of the architecture has; when neither spelling is found the prefixed names are
/// used, so the loader's "missing tensor" error names what a full checkpoint holds.
pub(crate) fn uses_prefix(dir: &Path, prefix: &str, probe: &str) -> Result<bool> {
    for path in crate::checkpoint_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        // SAFETY: read-only map, dropped before returning; see `load_weights`.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.clone(), source })?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Checkpoint {
            dir: path.clone(),
            message: format!("not a valid safetensors file: {e:?}"),
        })?;
        let names = metadata.tensors();
        if names.contains_key(&format!("{prefix}{probe}")) {
            return Ok(true);
        }
        if names.contains_key(probe) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A fresh `VarStore` whose new variables get `kind`.
pub(crate) fn var_store(kind: Kind, device: tch::Device) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    vs
}

/// FLOPs of a model whose blocks are multi-head attention (q, k, v and output projections of
/// `d x d`) and a plain MLP (`d x inner` twice), without windows, for sequences of `lengths` with the
/// head of `vocab` at `scored` positions (a multiply-add counts 2).
pub(crate) fn dense_model_flops(
    lengths: &[usize],
    scored: usize,
    n_layers: i64,
    d: i64,
    inner: i64,
    vocab: i64,
) -> f64 {
    let (n_layers, d, inner) = (n_layers as f64, d as f64, inner as f64);
    let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
    // Per token and layer: the four projections (4 d^2 multiply-adds) and the MLP (2 d inner); per
    // attended key, scores and weighted values (d each).
    let dense = tokens * n_layers * 2.0 * (4.0 * d * d + 2.0 * d * inner);
    let attention = n_layers * 2.0 * 2.0 * d * attended_keys(lengths, None);
    dense + attention + scored as f64 * 2.0 * d * vocab as f64
}

/// Keys attended, summed over the positions of independent causal sequences of `lengths`:
/// `n(n+1)/2` each, or at most `window` per position when attention is windowed.
pub(crate) fn attended_keys(lengths: &[usize], window: Option<usize>) -> f64 {
    lengths
        .iter()
        .map(|&n| {
            let w = window.unwrap_or(n).min(n);
            let m = w as f64;
            m * (m + 1.0) / 2.0 + (n - w) as f64 * m
        })
        .sum()
}

// Llama-family decoders on one shared stack (Gemma 2, OLMo 2). An architecture built on it states its
// config, its defaults and where its norms stand ([`StackSpec`]); the layers, the forward pass, the
// stage names and the FLOP count are here, once.

/// The checkpoint names of a [`RotaryDecoder`]'s stages.
pub(crate) const ROTARY_STAGES: StageNames = StageNames {
    embedding: &["model.embed_tokens"],
    blocks: "model.layers",
    final_norm: &["model.norm"],
    head: &["lm_head"],
};

/// The fields Llama-family `config.json` files spell alike, flattened into an architecture's config
/// (`#[serde(flatten)]`). Those whose default differs between architectures are optional here; the
/// architecture gives their defaults ([`FieldDefaults`]).
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderFields {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Biases on the query, key, value and output projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Absent, the architecture's default; null, none.
    #[serde(default, deserialize_with = "token_id")]
    pub eos_token_id: Option<u32>,
}

/// An architecture's defaults for the [`DecoderFields`] a config may omit (Hugging Face's, from its
/// configuration class).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FieldDefaults {
    /// `None`: as many as the query heads.
    pub num_key_value_heads: Option<i64>,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub eos_token_id: Option<u32>,
}

/// Where the RMSNorms of a block stand, by checkpoint name (`None`: no norm there). A block computes
/// `x + post_attention(attn(pre_attention(x)))`, then `x + post_mlp(mlp(pre_mlp(x)))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockNorms {
    pub pre_attention: Option<&'static str>,
    pub post_attention: Option<&'static str>,
    pub pre_mlp: Option<&'static str>,
    pub post_mlp: Option<&'static str>,
}

/// Llama's pre-norm layout: `input_layernorm` before attention, `post_attention_layernorm` before the
/// MLP.
pub(crate) const PRE_NORMS: BlockNorms = BlockNorms {
    pre_attention: Some("input_layernorm"),
    post_attention: None,
    pre_mlp: Some("post_attention_layernorm"),
    post_mlp: None,
};

/// A validated Llama-family config: everything a [`RotaryDecoder`] is built from.
#[derive(Debug, Clone)]
pub(crate) struct StackSpec {
    pub sizes: Sizes,
    pub attention: AttentionSpec,
    pub intermediate_size: i64,
    pub act: Activation,
    pub rope: RopeSpec,
    /// OLMo 2: cos and sin stay in f32 and the rotated queries and keys are rounded to the compute dtype
    /// afterwards; otherwise the tables are in the compute dtype.
    pub rope_in_f32: bool,
    pub norms: BlockNorms,
    pub norm_style: RmsStyle,
    pub rms_norm_eps: f64,
    /// One entry per block: attention only to keys fewer than this many positions back (`None`: to
    /// every earlier key).
    pub windows: Vec<Option<i64>>,
    pub tie_word_embeddings: bool,
    /// Gemma: token embeddings multiplied by `sqrt(hidden_size)` rounded to the compute dtype.
    pub scale_embeddings: bool,
    /// Gemma 2: logits soft-capped, `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// Llama's `mlp_bias`: biases on the MLP's projections.
    pub mlp_bias: bool,
}

impl StackSpec {
    /// Validates the shared fields (errors name the field) with the architecture's `defaults` and MLP
    /// activation `act`, into a Llama-like stack: grouped-query attention scaled by `1/sqrt(head_dim)`
    /// with RoPE over whole heads, pre-norms normalised as Llama, no windows, caps or embedding scale.
    /// The architecture changes what differs.
    pub(crate) fn new(file: &ConfigFile, c: &DecoderFields, defaults: &FieldDefaults, act: Activation) -> Result<Self> {
        let max_positions = c.max_position_embeddings.unwrap_or(defaults.max_position_embeddings);
        let (hidden, heads) = (c.hidden_size, c.num_attention_heads);
        let kv_heads = c.num_key_value_heads.or(defaults.num_key_value_heads).unwrap_or(heads);
        file.positive(&[
            ("vocab_size", c.vocab_size),
            ("hidden_size", hidden),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("max_position_embeddings", max_positions),
        ])?;
        if heads % kv_heads != 0 {
            return Err(file.error(format!(
                "field `num_key_value_heads`: {kv_heads} does not divide num_attention_heads {heads}"
            )));
        }
        let head_dim = match c.head_dim.or(defaults.head_dim) {
            Some(head_dim) => head_dim,
            None => {
                file.divisible(("hidden_size", hidden), ("num_attention_heads", heads))?;
                hidden / heads
            }
        };
        if head_dim <= 0 || head_dim % 2 != 0 {
            return Err(file.error(format!("field `head_dim`: {head_dim} is not a positive even number")));
        }
        let rope = RopeSpec::resolve(RopeFields {
            rope_scaling: c.rope_scaling.as_ref(),
            rope_parameters: c.rope_parameters.as_ref(),
            theta: c.rope_theta.unwrap_or(defaults.rope_theta),
            partial_rotary_factor: 1.0,
            max_position_embeddings: max_positions,
        })
        .map_err(|m| file.error(m))?;
        if rope.partial_rotary_factor != 1.0 {
            return Err(file.error(format!(
                "field `partial_rotary_factor`: {} is not supported (`{}` rotates whole heads)",
                rope.partial_rotary_factor, file.model_type
            )));
        }
        let eos_token_id = if file.has("eos_token_id") { c.eos_token_id } else { defaults.eos_token_id };
        Ok(Self {
            sizes: Sizes {
                vocab_size: c.vocab_size,
                hidden_size: hidden,
                max_length: max_positions as usize,
                positions: None,
                eos_token_id,
            },
            attention: AttentionSpec {
                hidden,
                heads,
                kv_heads,
                head_dim,
                qkv_bias: c.attention_bias,
                o_bias: c.attention_bias,
                qk_norm: QkNorm::None,
                scale: 1.0 / (head_dim as f64).sqrt(),
                softcap: None,
            },
            intermediate_size: c.intermediate_size,
            act,
            rope,
            rope_in_f32: false,
            norms: PRE_NORMS,
            norm_style: RmsStyle::CastThenScale,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(defaults.rms_norm_eps),
            windows: vec![None; c.num_hidden_layers as usize],
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(defaults.tie_word_embeddings),
            scale_embeddings: false,
            final_softcap: None,
            mlp_bias: false,
        })
    }

    fn norm(&self, p: &nn::Path, name: Option<&str>) -> Result<Option<RmsNorm>> {
        name.map(|name| RmsNorm::with_style(p / name, self.sizes.hidden_size, self.rms_norm_eps, self.norm_style))
            .transpose()
    }
}

/// One residual branch: `x + post(f(pre(x)))`, either norm optional.
#[derive(Debug)]
struct Branch {
    pre: Option<RmsNorm>,
    post: Option<RmsNorm>,
}

impl Branch {
    fn forward(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let norm = |norm: &Option<RmsNorm>, h: Tensor| match norm {
            Some(norm) => norm.forward(&h),
            None => Ok(h),
        };
        let h = norm(&self.pre, x.shallow_clone())?;
        let h = norm(&self.post, f(&h)?)?;
        Ok(x.f_add(&h)?)
    }
}

/// A block of `self_attn` ([`SelfAttention`]) and `mlp` ([`GatedMlp`]), each a residual branch with
/// the norms [`StackSpec::norms`] places.
#[derive(Debug)]
struct GatedBlock {
    self_attn: SelfAttention,
    mlp: GatedMlp,
    attention_branch: Branch,
    mlp_branch: Branch,
}

impl GatedBlock {
    fn new(p: &nn::Path, spec: &StackSpec) -> Result<Self> {
        let BlockNorms { pre_attention, post_attention, pre_mlp, post_mlp } = spec.norms;
        Ok(Self {
            self_attn: SelfAttention::new(&(p / "self_attn"), spec.attention, spec.norm_style)?,
            mlp: GatedMlp::new(&(p / "mlp"), spec.sizes.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.act)?,
            attention_branch: Branch { pre: spec.norm(p, pre_attention)?, post: spec.norm(p, post_attention)? },
            mlp_branch: Branch { pre: spec.norm(p, pre_mlp)?, post: spec.norm(p, post_mlp)? },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        pass: &mut Pass<'_>,
        layer: usize,
    ) -> Result<Tensor> {
        let x = self.attention_branch.forward(x, |h| self.self_attn.forward(h, rope, mask, pass, layer))?;
        self.mlp_branch.forward(&x, |h| self.mlp.forward(h))
    }
}

/// The decoder of a Llama-family architecture built on [`StackSpec`], `C` being its raw config (which
/// names the architecture): `model.embed_tokens`, blocks `model.layers.{i}`, the final norm
/// `model.norm` and the head `lm_head`, or the token embedding itself when tied.
#[derive(Debug)]
pub struct RotaryDecoder<C> {
    embed_tokens: Tensor,
    layers: Vec<GatedBlock>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: Rotary,
    spec: StackSpec,
    config: PhantomData<fn() -> C>,
}

impl<C> RotaryDecoder<C> {
    fn new(vs: &VarStore, spec: &StackSpec) -> Result<Self> {
        let (vocab, d) = (spec.sizes.vocab_size, spec.sizes.hidden_size);
        let root = vs.root();
        let p = &root / "model";
        let embed_tokens = param(&(&p / "embed_tokens"), "weight", &[vocab, d])?;
        let layers =
            (0..spec.windows.len()).map(|i| GatedBlock::new(&(&p / "layers" / i), spec)).collect::<Result<_>>()?;
        let lm_head = if spec.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            param(&(&root / "lm_head"), "weight", &[vocab, d])?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::with_style(&p / "norm", d, spec.rms_norm_eps, spec.norm_style)?,
            lm_head,
            rotary: Rotary::new(&spec.rope, spec.attention.head_dim, vs.device())?,
            spec: spec.clone(),
            config: PhantomData,
        })
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = embed(&self.embed_tokens, ids)?;
        if !self.spec.scale_embeddings {
            return Ok(x);
        }
        // As Gemma's reference: the normalizer is an f32 tensor cast to the compute dtype, so in bf16
        // sqrt(hidden_size) is rounded before it multiplies.
        let normalizer = (self.spec.sizes.hidden_size as f64).sqrt();
        let normalizer = Tensor::f_scalar_tensor(normalizer, (Kind::Float, x.device()))?.f_to_kind(x.kind())?;
        Ok(x.f_mul(&normalizer)?)
    }

    /// Each block's mask, computed once per distinct window.
    fn masks(&self, pass: &Pass<'_>) -> Result<Vec<Tensor>> {
        let windows = &self.spec.windows;
        let mut masks: Vec<Tensor> = Vec::with_capacity(windows.len());
        for (i, &window) in windows.iter().enumerate() {
            let mask = match (windows[..i].iter().position(|&w| w == window), window) {
                (Some(same), _) => masks[same].shallow_clone(),
                (None, Some(w)) => pass.window_mask(w)?,
                (None, None) => pass.mask().shallow_clone(),
            };
            masks.push(mask);
        }
        Ok(masks)
    }
}

impl<C: std::fmt::Debug + 'static> Decoder for RotaryDecoder<C> {
    fn sizes(&self) -> &Sizes {
        &self.spec.sizes
    }

    fn hidden(&self, input: &ModelInput, pass: &mut Pass<'_>) -> Result<Tensor> {
        let hooks = pass.hooks;
        let mut x = hooks.around(Stage::Embedding, || self.embed(&input.input_ids))?;
        let rope_kind = if self.spec.rope_in_f32 { Kind::Float } else { x.kind() };
        let rope = self.rotary.tables(pass.positions(), rope_kind)?;
        let masks = self.masks(pass)?;
        for (i, (layer, mask)) in self.layers.iter().zip(&masks).enumerate() {
            x = hooks.around(Stage::Block(i), || layer.forward(&x, &rope, mask, pass, i))?;
        }
        hooks.around(Stage::FinalNorm, || self.norm.forward(&x))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = output_head(hidden, &self.lm_head)?;
        match self.spec.final_softcap {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    fn forward_flops(&self, lengths: &[usize], scored: usize) -> f64 {
        let spec = &self.spec;
        let (dense, per_key) = gated_block_flops(&spec.attention, spec.intermediate_size);
        let tokens: f64 = lengths.iter().map(|&n| n as f64).sum();
        let keys: f64 = spec.windows.iter().map(|w| attended_keys(lengths, w.map(|w| w as usize))).sum();
        tokens * spec.windows.len() as f64 * dense
            + per_key * keys
            + scored as f64 * 2.0 * (spec.sizes.hidden_size * spec.sizes.vocab_size) as f64
    }
}

/// The [`ArchConfig`] of an architecture built on [`RotaryDecoder`]: its [`StackSpec`], `C` (its raw
/// config) naming the decoder it declares.
#[derive(Debug)]
pub(crate) struct StackConfig<C> {
    spec: StackSpec,
    config: PhantomData<fn() -> C>,
}

impl<C> StackConfig<C> {
    pub(crate) fn new(spec: StackSpec) -> Self {
        Self { spec, config: PhantomData }
    }
}

impl<C: std::fmt::Debug + 'static> ArchConfig for StackConfig<C> {
    fn sizes(&self) -> Sizes {
        self.spec.sizes.clone()
    }

    fn parameter_lower_bound(&self) -> Option<u64> {
        let Sizes { vocab_size, hidden_size, .. } = self.spec.sizes;
        registry::parameter_lower_bound(vocab_size, hidden_size, self.spec.windows.len() as i64)
    }

    fn declare(&self, vs: VarStore, _dir: &Path) -> Result<Box<dyn Declared>> {
        registry::declared(vs, |vs| RotaryDecoder::<C>::new(vs, &self.spec))
    }

    fn stage_of(&self, name: &str) -> Option<Stage> {
        ROTARY_STAGES.stage_of(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The prefix attended once and merged with each row's own keys is the attention over the
    /// prefix copied out before every row's keys: one query per row and several, with grouped
    /// key-value heads and padding among a row's own keys.
    #[test]
    fn attention_after_a_shared_prefix_is_attention_over_all_keys() {
        let _guard = tch::no_grad_guard();
        let options = (Kind::Float, Device::Cpu);
        let (rows, heads, kv_heads, head_dim, prefix, own) = (3, 6, 2, 16, 11, 7);
        tch::manual_seed(7);
        let sk = Tensor::randn([1, kv_heads, prefix, head_dim], options);
        let sv = Tensor::randn([1, kv_heads, prefix, head_dim], options);
        let ok = Tensor::randn([rows, kv_heads, own, head_dim], options);
        let ov = Tensor::randn([rows, kv_heads, own, head_dim], options);
        let whole = |s: &Tensor, o: &Tensor| {
            Tensor::cat(&[s.expand([rows, kv_heads, prefix, head_dim], false), o.shallow_clone()], 2)
        };
        for t in [1, 4] {
            let q = Tensor::randn([rows, heads, t, head_dim], options);
            // Row 1 pads its first two own keys; the last t own keys are causal.
            let keys = Tensor::arange(own, (Kind::Int64, Device::Cpu));
            let queries = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(1) + (own - t);
            let causal = keys.unsqueeze(0).le_tensor(&queries);
            let padded = Tensor::from_slice(&[0i64, 2, 0]).unsqueeze(1).le_tensor(&keys.unsqueeze(0));
            let own_mask = causal.unsqueeze(0).logical_and(&padded.unsqueeze(1)).unsqueeze(1);
            let mask = Tensor::cat(
                &[Tensor::ones([rows, 1, t, prefix], (Kind::Bool, Device::Cpu)), own_mask.shallow_clone()],
                3,
            );
            let reference = attention(&q, &whole(&sk, &ok), &whole(&sv, &ov), &mask, 0.25).unwrap();
            let shared = (sk.shallow_clone(), sv.shallow_clone());
            let own = (ok.shallow_clone(), ov.shallow_clone());
            // Through libtorch's flash attention, and in a decoding scope through icl's kernel.
            let merged = attention_after_shared(&q, &shared, &own, &own_mask, 0.25).unwrap();
            let kernel =
                crate::skinny::decoding(|| attention_after_shared(&q, &shared, &own, &own_mask, 0.25)).unwrap();
            for (how, result) in [("flash", merged), ("kernel", kernel)] {
                assert_eq!(result.size(), [rows, t, heads * head_dim]);
                let diff = (result - &reference).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "t {t}, {how}: {diff}");
            }
        }
    }
}
