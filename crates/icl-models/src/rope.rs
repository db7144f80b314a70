//! Rotary position embeddings (RoPE) as `transformers` computes them, for Llama, Mistral and GPT-NeoX.
//!
//! Configs describe RoPE in two generations of fields: the old top-level `rope_theta` (GPT-NeoX:
//! `rotary_emb_base`, `rotary_pct`) with an optional `rope_scaling` dict, and transformers 5's
//! `rope_parameters` dict that holds all of it. As in `transformers`, a non-null `rope_scaling` wins
//! over `rope_parameters`, and values missing from the dict come from the top-level fields.
//! Frequencies and cos/sin are computed in f32 from each token's position within its own sequence,
//! then cast to the compute kind, exactly where the reference casts.

use crate::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// A `rope_scaling` / `rope_parameters` dict.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<i64>,
}

/// How the inverse frequencies are rescaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scaling {
    None,
    /// Positions divided by `factor` (inverse frequencies divided, equivalently).
    Linear {
        factor: f64,
    },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: i64,
    },
}

/// Resolved RoPE settings: base, share of each head that rotates, scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RopeSpec {
    pub theta: f64,
    pub partial_rotary_factor: f64,
    pub scaling: Scaling,
}

/// The top-level config fields that feed RoPE, with the architecture's defaults already applied.
#[derive(Debug)]
pub(crate) struct RopeFields<'a> {
    pub rope_scaling: Option<&'a RopeParameters>,
    pub rope_parameters: Option<&'a RopeParameters>,
    pub theta: f64,
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: i64,
}

impl RopeSpec {
    /// Resolves the fields as `transformers`' `convert_rope_params_to_dict` does; errors name the field.
    pub(crate) fn resolve(fields: RopeFields<'_>) -> Result<Self, String> {
        let (field, params) = match (fields.rope_scaling, fields.rope_parameters) {
            (Some(p), _) => ("rope_scaling", p.clone()),
            (None, Some(p)) => ("rope_parameters", p.clone()),
            (None, None) => ("rope_parameters", RopeParameters::default()),
        };
        let theta = params.rope_theta.unwrap_or(fields.theta);
        let partial = params.partial_rotary_factor.unwrap_or(fields.partial_rotary_factor);
        if theta.is_nan() || theta <= 0.0 {
            return Err(format!("field `{field}.rope_theta`: {theta} is not positive"));
        }
        if partial.is_nan() || partial <= 0.0 || partial > 1.0 {
            return Err(format!("field `{field}.partial_rotary_factor`: {partial} is not in (0, 1]"));
        }
        let kind = params.rope_type.as_deref().or(params.type_.as_deref()).unwrap_or("default");
        let factor = |name: &str, value: Option<f64>| -> Result<f64, String> {
            match value {
                Some(v) if v > 0.0 => Ok(v),
                Some(v) => Err(format!("field `{field}.{name}`: {v} is not positive")),
                None => Err(format!("field `{field}.{name}`: required for rope_type `{kind}`")),
            }
        };
        let scaling = match kind {
            "default" => Scaling::None,
            "linear" => Scaling::Linear { factor: factor("factor", params.factor)? },
            "llama3" => {
                let low_freq_factor = factor("low_freq_factor", params.low_freq_factor)?;
                let high_freq_factor = factor("high_freq_factor", params.high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "field `{field}.high_freq_factor`: {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                Scaling::Llama3 {
                    factor: factor("factor", params.factor)?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_positions: params
                        .original_max_position_embeddings
                        .unwrap_or(fields.max_position_embeddings),
                }
            }
            other => {
                return Err(format!(
                    "field `{field}.rope_type`: `{other}` is not supported (supported: default, linear, llama3)"
                ))
            }
        };
        Ok(Self { theta, partial_rotary_factor: partial, scaling })
    }

    /// Rotated dimensions of a head of `head_dim`: `int(head_dim * partial_rotary_factor)`.
    pub(crate) fn rotary_dim(&self, head_dim: i64) -> i64 {
        (head_dim as f64 * self.partial_rotary_factor) as i64
    }
}

/// The inverse frequencies of one model, and how many leading dimensions of each head rotate.
#[derive(Debug)]
pub(crate) struct Rotary {
    inv_freq: Tensor,
    dim: i64,
}

impl Rotary {
    pub(crate) fn new(spec: &RopeSpec, head_dim: i64, device: Device) -> Result<Self> {
        let dim = spec.rotary_dim(head_dim);
        // 1 / theta^(2i / dim), in f32 like the reference.
        let exponent = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let mut inv_freq = Tensor::f_pow_scalar(spec.theta, &exponent)?.f_reciprocal()?;
        match spec.scaling {
            Scaling::None => {}
            Scaling::Linear { factor } => inv_freq = inv_freq.f_div_scalar(factor)?,
            Scaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let old = original_max_positions as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * std::f64::consts::PI)?;
                let divided = inv_freq.f_div_scalar(factor)?;
                let scaled = divided.f_where_self(&wavelen.f_gt(low_freq_wavelen)?, &inv_freq)?;
                // Between the two wavelengths: interpolate, (1 - s) * f / factor + s * f.
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let smoothed = smooth
                    .f_neg()?
                    .f_add_scalar(1.0)?
                    .f_mul(&scaled)?
                    .f_div_scalar(factor)?
                    .f_add(&smooth.f_mul(&scaled)?)?;
                let medium = wavelen.f_ge(high_freq_wavelen)?.f_logical_and(&wavelen.f_le(low_freq_wavelen)?)?;
                inv_freq = smoothed.f_where_self(&medium, &scaled)?;
            }
        }
        Ok(Self { inv_freq: inv_freq.f_to_device(device)?, dim })
    }

    /// cos and sin `[rows, 1, seq, rotary_dim]` in `kind` for positions `[rows, seq]`.
    pub(crate) fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }

    /// Rotates the first `rotary_dim` dimensions of each head of `x` `[rows, heads, seq, head_dim]`;
    /// the rest pass through (GPT-NeoX's partial rotary).
    pub(crate) fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.size().last().copied().unwrap_or(0);
        let (rot, pass) = if self.dim == head_dim {
            (x.shallow_clone(), None)
        } else {
            (x.f_narrow(-1, 0, self.dim)?, Some(x.f_narrow(-1, self.dim, head_dim - self.dim)?))
        };
        let half = self.dim / 2;
        let rotated_half = Tensor::f_cat(&[&rot.f_narrow(-1, half, half)?.f_neg()?, &rot.f_narrow(-1, 0, half)?], -1)?;
        let out = rot.f_mul(cos)?.f_add(&rotated_half.f_mul(sin)?)?;
        Ok(match pass {
            None => out,
            Some(pass) => Tensor::f_cat(&[&out, &pass], -1)?,
        })
    }
}

/// One forward pass's cos and sin tables, applied to each layer's queries and keys.
#[derive(Debug)]
pub(crate) struct RopeTables<'a> {
    rotary: &'a Rotary,
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// The tables for positions `[rows, seq]` in `kind`.
    pub(crate) fn tables(&self, positions: &Tensor, kind: Kind) -> Result<RopeTables<'_>> {
        let (cos, sin) = self.cos_sin(positions, kind)?;
        Ok(RopeTables { rotary: self, cos, sin })
    }
}

impl RopeTables<'_> {
    /// See [`Rotary::apply`]; the result has `x`'s kind. Tables in f32 rotate a bf16 `x` in f32 and
    /// round the result, as OLMo 2's reference does; tables in `x`'s kind rotate in that kind.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.rotary.apply(x, &self.cos, &self.sin)?.f_to_kind(x.kind())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str, partial: f64) -> Result<RopeSpec, String> {
        let p: RopeParameters = serde_json::from_str(json).unwrap();
        RopeSpec::resolve(RopeFields {
            rope_scaling: Some(&p),
            rope_parameters: None,
            theta: 10000.0,
            partial_rotary_factor: partial,
            max_position_embeddings: 2048,
        })
    }

    #[test]
    fn fields_resolve_like_transformers() {
        let s = spec(r#"{"type": "linear", "factor": 4}"#, 1.0).unwrap();
        assert_eq!(s.scaling, Scaling::Linear { factor: 4.0 });
        assert_eq!(s.theta, 10000.0);
        let s =
            spec(r#"{"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}"#, 1.0).unwrap();
        assert!(matches!(s.scaling, Scaling::Llama3 { original_max_positions: 2048, .. }));
        let s = spec(r#"{"rope_type": "default", "rope_theta": 500000}"#, 0.25).unwrap();
        assert_eq!((s.theta, s.rotary_dim(64)), (500000.0, 16));
        let e = spec(r#"{"rope_type": "yarn", "factor": 4}"#, 1.0).unwrap_err();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
        let e = spec(r#"{"type": "linear"}"#, 1.0).unwrap_err();
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }

    #[test]
    fn linear_scaling_divides_positions() {
        // Rotating position 8 with factor 4 equals rotating position 2 unscaled.
        let base = spec(r#"{"rope_type": "default"}"#, 1.0).unwrap();
        let linear = spec(r#"{"type": "linear", "factor": 4}"#, 1.0).unwrap();
        let (a, b) = (Rotary::new(&base, 16, Device::Cpu).unwrap(), Rotary::new(&linear, 16, Device::Cpu).unwrap());
        let (ca, sa) = a.cos_sin(&Tensor::from_slice(&[2i64]).view([1, 1]), Kind::Float).unwrap();
        let (cb, sb) = b.cos_sin(&Tensor::from_slice(&[8i64]).view([1, 1]), Kind::Float).unwrap();
        let d = (ca - cb).abs().max().double_value(&[]) + (sa - sb).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn partial_rotary_keeps_the_tail_and_preserves_norms() {
        let s = spec(r#"{}"#, 0.25).unwrap();
        let r = Rotary::new(&s, 16, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 2, 5, 16], (Kind::Float, Device::Cpu));
        let pos = Tensor::arange(5, (Kind::Int64, Device::Cpu)).view([1, 5]);
        let (cos, sin) = r.cos_sin(&pos, Kind::Float).unwrap();
        let y = r.apply(&x, &cos, &sin).unwrap();
        assert!(y.narrow(-1, 4, 12).equal(&x.narrow(-1, 4, 12)));
        let norms = |t: &Tensor| t.narrow(-1, 0, 4).square().sum_dim_intlist(-1, false, Kind::Float);
        assert!((norms(&y) - norms(&x)).abs().max().double_value(&[]) < 1e-5);
        // Position 0 is the identity.
        assert!((y.narrow(2, 0, 1) - x.narrow(2, 0, 1)).abs().max().double_value(&[]) < 1e-7);
    }
}
