//! Dequantization of tensor data to f32: F32, F16, BF16, Q8_0, Q4_0 and Q4_1.

use super::GgmlType;

fn f16_to_f32(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

/// Appends the values of `bytes` (whole blocks of `ty`) to `out`. Quantized blocks follow ggml:
/// Q8_0 `{d: f16, q: [i8; 32]}` -> `q * d`; Q4_0 `{d: f16, q: [u8; 16]}` -> low nibbles are elements
/// 0..16 and high nibbles 16..32, `(nibble - 8) * d`; Q4_1 `{d: f16, m: f16, q: [u8; 16]}` ->
/// `nibble * d + m`, same order. Products are rounded to f32 before adding, as gguf-py computes them.
pub(super) fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]]))),
        GgmlType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = f16_to_f32([block[0], block[1]]);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for block in bytes.chunks_exact(18) {
                let d = f16_to_f32([block[0], block[1]]);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| f32::from((q & 0x0f) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let d = f16_to_f32([block[0], block[1]]);
                let m = f16_to_f32([block[2], block[3]]);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        _ => unreachable!("callers check GgmlType::is_supported"),
    }
}
