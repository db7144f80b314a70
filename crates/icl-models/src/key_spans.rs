//! Attention of packed rows over the keys their queries can see.
//!
//! A scoring batch packs several sequences into each row, and its mask lets a query see only keys of
//! its own sequence (at or before it). libtorch's CPU flash attention takes a row's keys in one block
//! of up to 512 and scores every query against all of them under the mask, so in a 512-token row of
//! 85-token LAMBADA passages most of its work is on keys the mask hides: with bf16 on the 2-core EPYC
//! of the README, attention was a quarter of a scoring batch's time. Here the queries go in windows
//! of [`WINDOW`] positions, a group of rows at a time, each window against the span of keys that any
//! of its queries sees. Every query still sees exactly its own keys under the same mask and kernel;
//! only the keys hidden from all of a window's queries are left out.
//!
//! CPU only (on CUDA, finding the spans would wait for the device; not measured there), inference
//! only, boolean masks `[rows, 1, seq, keys]`.

use crate::Result;
use tch::{Device, Kind, Tensor};

/// Queries per window: libtorch's CPU flash attention takes queries in blocks of 64 (at 192 and more).
const WINDOW: i64 = 64;

/// Row groups at most, so a batch of many rows makes a bounded number of kernel calls (each group's
/// windows are one call each).
const MAX_GROUPS: i64 = 32;

/// Spans are used when they leave out at least this share of the masked computation (a single causal
/// sequence leaves out about half).
const LEAST_SAVING: f64 = 0.25;

/// One call: rows `rows.0..rows.0 + rows.1`, queries `queries.0..+queries.1`, keys `keys.0..+keys.1`
/// (no keys: no query of the window sees any, and its output is zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    rows: (i64, i64),
    queries: (i64, i64),
    keys: (i64, i64),
}

/// The windows of one mask and the keys each sees; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeySpans {
    /// `[rows, 1, seq, keys]` of the mask they were found in.
    dims: Vec<i64>,
    spans: Vec<Span>,
}

impl KeySpans {
    /// The spans of boolean `mask` (`[rows, 1, seq, keys]`, on the CPU), or `None` when they would not
    /// leave out at least [`LEAST_SAVING`] of the work or the mask is not of that form.
    pub(crate) fn of(mask: &Tensor) -> Result<Option<Self>> {
        let dims = mask.size();
        let &[rows, 1, seq, keys] = dims.as_slice() else { return Ok(None) };
        if mask.kind() != Kind::Bool || mask.device() != Device::Cpu || seq < 2 * WINDOW || keys < 2 * WINDOW {
            return Ok(None);
        }
        let rows_per_group = (rows + MAX_GROUPS - 1) / MAX_GROUPS;
        let groups = (rows + rows_per_group - 1) / rows_per_group;
        let windows = (seq + WINDOW - 1) / WINDOW;
        // Padded with hidden keys to whole groups and windows: [groups, rows_per_group, windows,
        // WINDOW, keys], then whether any query of a group's window sees each key.
        let padded = mask.f_squeeze_dim(1)?.f_to_kind(Kind::Uint8)?.f_constant_pad_nd([
            0,
            0,
            0,
            windows * WINDOW - seq,
            0,
            groups * rows_per_group - rows,
        ])?;
        let seen = padded.f_view([groups, rows_per_group, windows, WINDOW, keys])?.f_amax([1, 3], false)?;
        // argmax gives the first maximum: the first key seen, and from the end, the last.
        let any = Vec::<i64>::try_from(seen.f_amax([-1], false)?.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?;
        let first = Vec::<i64>::try_from(seen.f_argmax(-1, false)?.f_flatten(0, -1)?)?;
        let from_end = Vec::<i64>::try_from(seen.f_flip([-1])?.f_argmax(-1, false)?.f_flatten(0, -1)?)?;
        let mut spans = Vec::with_capacity(any.len());
        let mut work = 0i64;
        for g in 0..groups {
            let group_rows = (g * rows_per_group, rows_per_group.min(rows - g * rows_per_group));
            for w in 0..windows {
                let i = (g * windows + w) as usize;
                let queries = (w * WINDOW, WINDOW.min(seq - w * WINDOW));
                let keys = if any[i] > 0 { (first[i], keys - from_end[i] - first[i]) } else { (0, 0) };
                work += group_rows.1 * queries.1 * keys.1;
                spans.push(Span { rows: group_rows, queries, keys });
            }
        }
        let whole = (rows * seq * keys) as f64;
        Ok((work as f64 <= (1.0 - LEAST_SAVING) * whole).then_some(Self { dims, spans }))
    }

    /// Whether these spans were found for a mask of `mask`'s dimensions.
    pub(crate) fn fit(&self, mask: &Tensor) -> bool {
        mask.size() == self.dims
    }

    /// Scaled dot-product attention of `q` (`[rows, heads, seq, head_dim]`) over `k`, `v` (`[rows,
    /// heads, keys, head_dim]`, heads already repeated) under `mask`, the mask these spans were found
    /// in: `[rows, heads, seq, head_dim]`, as libtorch's over the whole mask.
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let out = q.f_empty_like()?;
        for span in &self.spans {
            let part = |x: &Tensor, along: (i64, i64)| -> Result<Tensor> {
                Ok(x.f_narrow(0, span.rows.0, span.rows.1)?.f_narrow(2, along.0, along.1)?)
            };
            let mut target = part(&out, span.queries)?;
            if span.keys.1 == 0 {
                let _zeroed = target.f_zero_()?;
                continue;
            }
            let span_mask = part(mask, span.queries)?.f_narrow(3, span.keys.0, span.keys.1)?;
            let y = Tensor::f_scaled_dot_product_attention(
                &part(q, span.queries)?,
                &part(k, span.keys)?,
                &part(v, span.keys)?,
                Some(span_mask),
                0.0,
                false,
                scale,
                false,
            )?;
            target.f_copy_(&y)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A packed mask: each row holds sequences of the given lengths, each query seeing the keys of its
    /// own sequence at or before it; the rest of a row is padding that sees only itself.
    pub(crate) fn packed_mask(rows: &[&[i64]], seq: i64) -> Tensor {
        let mut seen = vec![false; rows.len() * (seq * seq) as usize];
        for (r, lengths) in rows.iter().enumerate() {
            let mut start = 0;
            let mut segments: Vec<(i64, i64)> = lengths.iter().map(|&n| (n, 0)).collect();
            for s in segments.iter_mut() {
                s.1 = start;
                start += s.0;
            }
            for i in 0..seq {
                let segment = segments.iter().find(|(n, s)| i >= *s && i < s + n);
                for j in 0..seq {
                    let visible = match segment {
                        Some((_, s)) => j >= *s && j <= i,
                        None => j == i,
                    };
                    seen[r * (seq * seq) as usize + (i * seq + j) as usize] = visible;
                }
            }
        }
        Tensor::from_slice(&seen).view([rows.len() as i64, 1, seq, seq])
    }

    #[test]
    fn spans_cover_every_key_a_query_sees_and_attention_is_unchanged() {
        let seq = 300;
        let rows: Vec<&[i64]> = vec![&[40, 90, 100, 70], &[150, 150], &[10, 20, 30, 40, 50, 60, 70], &[200]];
        let mask = packed_mask(&rows, seq);
        let spans = KeySpans::of(&mask).unwrap().expect("short sequences leave out most keys");
        assert!(spans.fit(&mask));
        // Every key seen lies in its query's span; the spans tile the queries of every row once.
        let seen = Vec::<bool>::try_from(mask.flatten(0, -1)).unwrap();
        let mut covered = vec![0u8; (rows.len() as i64 * seq) as usize];
        for s in &spans.spans {
            for r in s.rows.0..s.rows.0 + s.rows.1 {
                for i in s.queries.0..s.queries.0 + s.queries.1 {
                    covered[(r * seq + i) as usize] += 1;
                    for j in 0..seq {
                        if seen[((r * seq + i) * seq + j) as usize] {
                            assert!(j >= s.keys.0 && j < s.keys.0 + s.keys.1, "row {r} query {i} key {j}: {s:?}");
                        }
                    }
                }
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
        for kind in [Kind::Float, Kind::BFloat16] {
            let qkv = |seed| {
                tch::manual_seed(seed);
                Tensor::randn([rows.len() as i64, 4, seq, 16], (Kind::Float, Device::Cpu)).to_kind(kind)
            };
            let (q, k, v) = (qkv(1), qkv(2), qkv(3));
            let whole = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, 0.25, false);
            let windowed = spans.attend(&q, &k, &v, &mask, 0.25).unwrap();
            let diff = (whole.to_kind(Kind::Float) - windowed.to_kind(Kind::Float)).abs().max().double_value(&[]);
            let tolerance = if kind == Kind::Float { 1e-6 } else { 1e-2 };
            assert!(diff <= tolerance, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn one_causal_sequence_skips_the_keys_after_each_window_and_full_masks_take_the_whole_kernel() {
        let seq = 256;
        let spans = KeySpans::of(&packed_mask(&[&[256]], seq)).unwrap().expect("causal");
        let keys: Vec<(i64, i64)> = spans.spans.iter().map(|s| s.keys).collect();
        assert_eq!(keys, [(0, 64), (0, 128), (0, 192), (0, 256)]);
        let everything = Tensor::ones([2, 1, seq, seq], (Kind::Bool, Device::Cpu));
        assert_eq!(KeySpans::of(&everything).unwrap(), None);
        assert_eq!(KeySpans::of(&packed_mask(&[&[60, 60]], 100)).unwrap(), None, "too short to split");
        let float = packed_mask(&[&[60, 60, 60, 60]], seq).to_kind(Kind::Float);
        assert_eq!(KeySpans::of(&float).unwrap(), None);
        let spans = KeySpans::of(&packed_mask(&[&[60, 60, 60, 60]], seq)).unwrap().unwrap();
        assert!(!spans.fit(&packed_mask(&[&[60, 60, 60, 60], &[256]], seq)));
    }
}
