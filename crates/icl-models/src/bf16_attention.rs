//! Attention of bf16 queries, keys and values under a boolean mask, on CPUs with AVX-512 BF16.
//!
//! libtorch's CPU flash attention multiplies its bf16 blocks through MKL's `gemm_bf16bf16f32`, which
//! on the AMD EPYC of the README widens both operands to f32 and runs `sgemm`: about 100 GFLOP/s on
//! 2 threads, against 600-800 for the bf16 products of the layers, and a tenth of a bf16 scoring
//! run's time. Here, per head:
//! - the keys and values are laid out once in the pairs `vdpbf16ps` reads (two consecutive elements
//!   of the summed axis in each 32-bit lane): keys by pairs of head dimensions, values by pairs of
//!   keys;
//! - each block of [`BLOCK`] queries is scored in f32 with `vdpbf16ps` against only the keys some
//!   query of it sees (in packed rows of short sequences, few), four queries by 64 keys at a time;
//! - each query's softmax is taken in f32 over the keys it sees, masked keys at exactly zero, and its
//!   terms rounded to bf16 are multiplied by the values with `vdpbf16ps`;
//! - the sums are multiplied by the reciprocal of the softmax's denominator once and rounded to bf16,
//!   straight into the `[rows, seq, heads * head_dim]` layout the output projection reads.
//!
//! That is libtorch's computation (f32 scores, f32 softmax, bf16 weights, f32 sums scaled once);
//! the products of bf16 values are exact in f32, so results differ from libtorch's only in the order
//! of the f32 sums. A query's result depends on its own row alone: masked keys add exact zeros, and
//! sums run in the same order whatever the block.
//!
//! CPU only, inference only; head sizes a multiple of 32; boolean masks broadcastable to `[rows, 1,
//! seq, keys]`. Queries that see no key get zeros.

use crate::skinny::{grad_enabled, has_avx512_bf16, parallel};
use crate::Result;
use tch::{Device, Kind, Tensor};

/// Queries per block: their scores over a block's keys (f32) and their bf16 weights stay in L2.
const BLOCK: usize = 32;
/// Queries per register tile of a product.
const TILE_ROWS: usize = 4;
/// f32 lanes per vector; keys are scored, and values summed, in whole vectors of this many.
const LANES: usize = 16;

/// `softmax(scale · q kᵀ, masked) · v` for `q` `[rows, heads, seq, head_dim]`, `k`, `v` `[rows,
/// kv_heads, keys, head_dim]` (query heads share key-value heads in equal groups) and boolean `mask`
/// broadcastable to `[rows, 1, seq, keys]`, as `[rows, seq, heads * head_dim]`; `None` when the kernel
/// does not apply (see the module docs; also a CPU without AVX-512 BF16).
pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !applies(q, k, v, mask) {
        return Ok(None);
    }
    let (rows, heads, seq, head_dim) = q.size4()?;
    let (_, kv_heads, keys, _) = k.size4()?;
    let mask_size = mask.size();
    let out = Tensor::f_empty([rows, seq, heads * head_dim], (Kind::BFloat16, Device::Cpu))?;
    if rows == 0 || seq == 0 || heads == 0 {
        return Ok(Some(out));
    }
    // The kernel reads rows along the last axis; a mask broadcast along it is materialized.
    let last_contiguous =
        |t: &Tensor| -> Result<Tensor> { Ok(if t.stride()[3] == 1 { t.shallow_clone() } else { t.f_contiguous()? }) };
    let (q, k, v, mask) = (last_contiguous(q)?, last_contiguous(k)?, last_contiguous(v)?, last_contiguous(mask)?);
    // Keys are gathered in pairs, sixteen positions at a time, by 32-bit offsets.
    let key_stride = k.stride()[2];
    let k = if key_stride % 2 != 0 || key_stride > i64::from(i32::MAX / 16) { k.f_contiguous()? } else { k };
    let view = |t: &Tensor| {
        let s = t.stride();
        Strided { at: t.data_ptr() as usize, row: s[0] as isize, head: s[1] as isize, position: s[2] as isize }
    };
    let mask_view = {
        let s = mask.stride();
        let row = if mask_size[0] == 1 { 0 } else { s[0] as isize };
        let position = if mask_size[2] == 1 { 0 } else { s[2] as isize };
        Strided { at: mask.data_ptr() as usize, row, head: 0, position }
    };
    let problem = Problem {
        q: view(&q),
        k: view(&k),
        v: view(&v),
        mask: mask_view,
        out: out.data_ptr() as usize,
        heads: heads as usize,
        groups: (heads / kv_heads) as usize,
        seq: seq as usize,
        keys: keys as usize,
        head_dim: head_dim as usize,
        scale: scale as f32,
        seen: seen_ranges(&mask_view, rows as usize, seq as usize, keys as usize),
    };
    parallel(problem.seen.len() / problem.seq * problem.heads, 1, &|begin, end| {
        let mut scratch = Scratch::default();
        for task in begin..end {
            // SAFETY: `has_avx512_bf16` found the instructions; the views are of tensors alive until
            // `forward` returns, of the sizes `problem` holds; each task writes its own head of
            // its own row of `out`.
            unsafe { problem.head(task / problem.heads, task % problem.heads, &mut scratch) };
        }
    });
    Ok(Some(out))
}

/// Whether [`forward`] computes this attention (see the module docs), from sizes and kinds alone.
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    if !has_avx512_bf16()
        || [q, k, v].iter().any(|t| t.kind() != Kind::BFloat16 || t.device() != Device::Cpu || t.dim() != 4)
        || mask.kind() != Kind::Bool
        || mask.dim() != 4
        || ([q, k, v].iter().any(|t| t.requires_grad()) && grad_enabled())
    {
        return false;
    }
    let (q_size, k_size, mask_size) = (q.size(), k.size(), mask.size());
    let &[rows, heads, seq, head_dim] = q_size.as_slice() else { return false };
    let &[kv_rows, kv_heads, keys, kv_dim] = k_size.as_slice() else { return false };
    let broadcasts = |size: i64, to: i64| size == to || size == 1;
    v.size() == k_size
        && kv_rows == rows
        && kv_dim == head_dim
        && kv_heads > 0
        && heads % kv_heads == 0
        && head_dim > 0
        && head_dim % 32 == 0
        && keys > 0
        && broadcasts(mask_size[0], rows)
        && mask_size[1] == 1
        && broadcasts(mask_size[2], seq)
        && mask_size[3] == keys
}

/// A 4-d CPU tensor whose last axis is contiguous: its first element's address and the strides of the
/// first three axes, in elements.
#[derive(Debug, Clone, Copy)]
struct Strided {
    at: usize,
    row: isize,
    head: isize,
    position: isize,
}

impl Strided {
    /// The first element of `[row, head, position, :]`.
    fn at<T>(&self, row: usize, head: usize, position: usize) -> *const T {
        let offset = row as isize * self.row + head as isize * self.head + position as isize * self.position;
        (self.at as *const T).wrapping_offset(offset)
    }
}

/// The keys each query sees, `[first, end)` (`(0, 0)` for none), for every query of every row (row
/// major), found by scanning the mask's rows from both ends eight bytes at a time.
fn seen_ranges(mask: &Strided, rows: usize, seq: usize, keys: usize) -> Vec<(u32, u32)> {
    let mut seen = Vec::with_capacity(rows * seq);
    for row in 0..rows {
        for i in 0..seq {
            // SAFETY: a mask row of `keys` booleans (bytes of 0 or 1), inside the mask tensor.
            let flags = unsafe { std::slice::from_raw_parts(mask.at::<u8>(row, 0, i), keys) };
            seen.push(match first_set(flags) {
                Some(first) => (first as u32, (keys - first_set_from_end(flags)) as u32),
                None => (0, 0),
            });
        }
    }
    seen
}

/// The index of the first nonzero byte.
fn first_set(flags: &[u8]) -> Option<usize> {
    let chunks = flags.chunks_exact(8);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        if word != 0 {
            return Some(c * 8 + word.trailing_zeros() as usize / 8);
        }
    }
    rest.iter().position(|&f| f != 0).map(|p| flags.len() - rest.len() + p)
}

/// How many bytes follow the last nonzero byte (called only when there is one).
fn first_set_from_end(flags: &[u8]) -> usize {
    let chunks = flags.rchunks_exact(8);
    let rest = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        if word != 0 {
            return c * 8 + word.leading_zeros() as usize / 8;
        }
    }
    let in_rest = rest.iter().rev().position(|&f| f != 0).unwrap_or(rest.len());
    flags.len() - rest.len() + in_rest
}

/// One call's tensors and sizes; threads write disjoint heads of `out` through its address.
struct Problem {
    q: Strided,
    k: Strided,
    v: Strided,
    mask: Strided,
    /// `[rows, seq, heads * head_dim]`, contiguous.
    out: usize,
    heads: usize,
    groups: usize,
    seq: usize,
    keys: usize,
    head_dim: usize,
    scale: f32,
    /// [`seen_ranges`].
    seen: Vec<(u32, u32)>,
}

/// A thread's buffers, reused across its heads.
#[derive(Default)]
struct Scratch {
    /// Keys in pairs of head dimensions: `[head_dim / 2, keys']`, `keys'` the head's keys rounded to
    /// whole vectors.
    keys: Vec<u32>,
    /// Values in pairs of keys: `[keys' / 2, head_dim]`.
    values: Vec<u32>,
    /// A block's scores, `[BLOCK, width]`.
    scores: Vec<f32>,
    /// A block's softmax terms in bf16, `[BLOCK, width]`.
    weights: Vec<u16>,
}

/// `[begin, end)` of the union of `ranges` that are not empty, or `None`.
fn union(ranges: &[(u32, u32)]) -> Option<(usize, usize)> {
    ranges
        .iter()
        .filter(|r| r.1 > r.0)
        .fold(None, |acc: Option<(u32, u32)>, r| Some(acc.map_or(*r, |a| (a.0.min(r.0), a.1.max(r.1)))))
        .map(|(a, b)| (a as usize, b as usize))
}

impl Problem {
    /// Head `head` of row `row`.
    ///
    /// # Safety
    /// The CPU has the instructions of [`has_avx512_bf16`]; the views hold the sizes of `self`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    unsafe fn head(&self, row: usize, head: usize, scratch: &mut Scratch) {
        let d = self.head_dim;
        let seen = &self.seen[row * self.seq..(row + 1) * self.seq];
        let out_row = (self.out as *mut u16).wrapping_add((row * self.seq * self.heads + head) * d);
        let out_at = |i: usize| out_row.wrapping_add(i * self.heads * d);
        let Some((first, end)) = union(seen) else {
            for i in 0..self.seq {
                // SAFETY: query `i`'s `d` outputs of this head, inside `out`.
                unsafe { std::ptr::write_bytes(out_at(i), 0, d) };
            }
            return;
        };
        // Keys from `base`, a multiple of the vector width, in whole vectors (zeros past the last).
        let base = first / LANES * LANES;
        let width = (end - base).div_ceil(LANES) * LANES;
        let kv_head = head / self.groups;
        // SAFETY: as the caller promises.
        unsafe { self.lay_out(row, kv_head, base, width, scratch) };
        for block in (0..self.seq).step_by(BLOCK) {
            let queries = BLOCK.min(self.seq - block);
            let block_seen = &seen[block..block + queries];
            let Some((block_first, block_end)) = union(block_seen) else {
                for i in block..block + queries {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_bytes(out_at(i), 0, d) };
                }
                continue;
            };
            // The block's keys relative to `base`, in whole vectors.
            let from = (block_first - base) / LANES * LANES;
            let to = (block_end - base).div_ceil(LANES) * LANES;
            let block_width = to - from;
            scratch.scores.resize(queries * block_width, 0.0);
            scratch.weights.resize(queries * block_width, 0);
            // Scores, four queries at a time over the keys any of them sees.
            for t in (0..queries).step_by(TILE_ROWS) {
                let n = TILE_ROWS.min(queries - t);
                let Some((f, e)) = union(&block_seen[t..t + n]) else { continue };
                let (tile_from, tile_to) = ((f - base) / LANES * LANES, (e - base).div_ceil(LANES) * LANES);
                let q_rows: [*const u32; TILE_ROWS] =
                    std::array::from_fn(|r| self.q.at::<u16>(row, head, block + t + r.min(n - 1)).cast());
                let out_rows: [*mut f32; TILE_ROWS] = std::array::from_fn(|r| {
                    scratch.scores.as_mut_ptr().wrapping_add((t + r.min(n - 1)) * block_width + tile_from - from)
                });
                // SAFETY: the tile's keys lie in the laid-out `width`; its queries' rows in `q`.
                unsafe {
                    scores(
                        n,
                        &q_rows,
                        scratch.keys.as_ptr().wrapping_add(tile_from),
                        width,
                        d / 2,
                        tile_to - tile_from,
                        &out_rows,
                    )
                };
            }
            // Softmax per query over the keys it sees, as bf16 terms; `sums` their f32 totals.
            let mut sums = [0.0f32; BLOCK];
            for (i, &(f, e)) in block_seen.iter().enumerate() {
                let terms = &mut scratch.weights[i * block_width..(i + 1) * block_width];
                terms.fill(0);
                if e <= f {
                    continue;
                }
                let (f, e) = (f as usize - base - from, e as usize - base - from);
                let scores = &scratch.scores[i * block_width + f..i * block_width + e];
                // SAFETY: query `block + i`'s flags for keys `[f, e)` (relative), inside the mask.
                let flags = unsafe {
                    std::slice::from_raw_parts(self.mask.at::<u8>(row, 0, block + i).add(base + from + f), e - f)
                };
                // SAFETY: the CPU has the instructions; the slices are of one length.
                sums[i] = unsafe { softmax_terms(scores, flags, self.scale, &mut terms[f..e]) };
            }
            // Weighted values, four queries by 64 head dimensions at a time.
            for t in (0..queries).step_by(TILE_ROWS) {
                let n = TILE_ROWS.min(queries - t);
                let tile = &block_seen[t..t + n];
                let Some((f, e)) = union(tile) else {
                    for i in t..t + n {
                        // SAFETY: as above.
                        unsafe { std::ptr::write_bytes(out_at(block + i), 0, d) };
                    }
                    continue;
                };
                // Pairs of keys relative to `base + from`.
                let (pair_from, pair_to) = ((f - base - from) / 2, (e - base - from).div_ceil(2));
                let weight_rows: [*const u32; TILE_ROWS] = std::array::from_fn(|r| {
                    let i = t + r.min(n - 1);
                    scratch.weights.as_ptr().wrapping_add(i * block_width).cast::<u32>().wrapping_add(pair_from)
                });
                let scales: [f32; TILE_ROWS] = std::array::from_fn(|r| {
                    let sum = sums[t + r.min(n - 1)];
                    if sum > 0.0 {
                        1.0 / sum
                    } else {
                        0.0
                    }
                });
                let out_rows: [*mut u16; TILE_ROWS] = std::array::from_fn(|r| out_at(block + t + r.min(n - 1)));
                let values = scratch.values.as_ptr().wrapping_add(((from / 2) + pair_from) * d);
                // SAFETY: the pairs lie in the laid-out values and in the block's weights.
                unsafe { weighted_values(n, &weight_rows, values, d, pair_to - pair_from, &scales, &out_rows) };
            }
        }
    }

    /// Keys `[base, base + width)` of key-value head `kv_head` of row `row` into `scratch.keys` and
    /// `scratch.values` in `vdpbf16ps`'s pairs, zeros past the last key: the keys' pairs gathered
    /// sixteen keys at a time, the values' rows interleaved two at a time.
    ///
    /// # Safety
    /// The CPU has the instructions of [`has_avx512_bf16`]; the views hold the sizes of `self`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    unsafe fn lay_out(&self, row: usize, kv_head: usize, base: usize, width: usize, scratch: &mut Scratch) {
        use std::arch::x86_64::*;
        let d = self.head_dim;
        let pairs = d / 2;
        scratch.keys.clear();
        scratch.keys.resize(pairs * width, 0);
        scratch.values.clear();
        scratch.values.resize(width / 2 * d, 0);
        let present = self.keys.min(base + width) - base;
        // Lane `l` reads key `j + l`: offsets in pairs (`forward` checked the stride is even and
        // small enough).
        let key_step = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((self.k.position / 2) as i32),
        );
        for j in (0..present).step_by(LANES) {
            let lanes = (present - j).min(LANES);
            let active: __mmask16 = if lanes == LANES { !0 } else { (1 << lanes) - 1 };
            let first: *const i32 = self.k.at::<u16>(row, kv_head, base + j).cast();
            for p in 0..pairs {
                // SAFETY: pair `p` of the present keys `j..j + lanes`; the other lanes read nothing.
                unsafe {
                    let offsets = _mm512_add_epi32(key_step, _mm512_set1_epi32(p as i32));
                    let gathered = _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), active, offsets, first);
                    _mm512_storeu_si512(scratch.keys.as_mut_ptr().add(p * width + j).cast(), gathered);
                }
            }
        }
        // Output 16-bit lane `2c` takes dimension `c` of the even key, `2c + 1` that of the odd one
        // (index 32 and up: the second operand), for dimensions `[0, 16)` and `[16, 32)` of a chunk.
        let low: [i16; 32] = std::array::from_fn(|l| if l % 2 == 0 { l as i16 / 2 } else { 32 + l as i16 / 2 });
        let high: [i16; 32] = std::array::from_fn(|l| low[l] + 16);
        // SAFETY: 32 values each.
        let (low, high) =
            unsafe { (_mm512_loadu_si512(low.as_ptr().cast()), _mm512_loadu_si512(high.as_ptr().cast())) };
        for pair in 0..present.div_ceil(2) {
            let even: *const u16 = self.v.at::<u16>(row, kv_head, base + 2 * pair);
            let odd: *const u16 = self.v.at::<u16>(row, kv_head, base + 2 * pair + 1);
            let has_odd = 2 * pair + 1 < present;
            for c in (0..d).step_by(32) {
                // SAFETY: 32 elements of each present value row; the pair's output row of `d`.
                unsafe {
                    let a = _mm512_loadu_si512(even.add(c).cast());
                    let b = if has_odd { _mm512_loadu_si512(odd.add(c).cast()) } else { _mm512_setzero_si512() };
                    let to = scratch.values.as_mut_ptr().add(pair * d + c);
                    _mm512_storeu_si512(to.cast(), _mm512_permutex2var_epi16(a, low, b));
                    _mm512_storeu_si512(to.add(LANES).cast(), _mm512_permutex2var_epi16(a, high, b));
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn head(&self, _: usize, _: usize, _: &mut Scratch) {
        unreachable!("has_avx512_bf16 is false off x86-64")
    }
}

/// Softmax terms of one query over the keys it sees: `scores` (unscaled) and `flags` (the mask) over
/// the same keys; writes `exp(scale · s - max)` rounded to bf16 into `terms` (zero where masked) and
/// returns the f32 sum of the unrounded terms, in lanes of a fixed order.
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; the three slices are of one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,fma")]
unsafe fn softmax_terms(scores: &[f32], flags: &[u8], scale: f32, terms: &mut [u16]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(scores.len() == flags.len() && flags.len() == terms.len());
    let n = scores.len();
    let lanes_at = |c: usize| -> __mmask16 {
        if n - c >= LANES {
            !0
        } else {
            (1 << (n - c)) - 1
        }
    };
    let scale_v = _mm512_set1_ps(scale);
    // Masked keys as -inf (a key's flag byte is 0 or 1).
    let scaled = |c: usize| -> (__m512, __mmask16) {
        let lanes = lanes_at(c);
        // SAFETY: lanes `[c, n)` of both slices.
        unsafe {
            let s = _mm512_maskz_loadu_ps(lanes, scores.as_ptr().add(c));
            let f = _mm_maskz_loadu_epi8(lanes, flags.as_ptr().add(c).cast());
            let seen = _mm_test_epi8_mask(f, f) & lanes;
            (_mm512_mask_mul_ps(_mm512_set1_ps(f32::NEG_INFINITY), seen, s, scale_v), seen)
        }
    };
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in (0..n).step_by(LANES) {
        max = _mm512_max_ps(max, scaled(c).0);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    for c in (0..n).step_by(LANES) {
        let (x, seen) = scaled(c);
        // Below -87 `exp` leaves the normal range; such terms are under 2e-38 against a sum of at
        // least 1.
        let e = _mm512_maskz_mov_ps(seen, exp(_mm512_max_ps(_mm512_sub_ps(x, max), _mm512_set1_ps(-87.0))));
        sum = _mm512_add_ps(sum, e);
        // SAFETY: 256 plain bits either way; lanes `[c, n)` of `terms`.
        unsafe {
            let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(terms.as_mut_ptr().add(c).cast(), lanes_at(c), rounded);
        }
    }
    _mm512_reduce_add_ps(sum)
}

/// [`crate::gelu_tanh::exp`] on 16 lanes, the same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn exp(z: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const ROUND: f32 = 12_582_912.0;
    let round = _mm512_set1_ps(ROUND);
    let shifted = _mm512_add_ps(_mm512_mul_ps(z, _mm512_set1_ps(std::f32::consts::LOG2_E)), round);
    let n = _mm512_sub_ps(shifted, round);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), z);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r), _mm512_set1_ps(1.0));
    let exponent = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(ROUND.to_bits() as i32)),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(e, _mm512_castsi512_ps(exponent))
}

/// Calls `$tile::<R, V>($args)` for `R = $rows` (1 to 4) and `V = $vectors` (1 to 4, at most 4).
macro_rules! by_tile {
    ($rows:expr, $vectors:expr, $tile:ident($($arg:expr),*)) => {
        match ($rows, $vectors) {
            (1, 1) => $tile::<1, 1>($($arg),*),
            (1, 2) => $tile::<1, 2>($($arg),*),
            (1, 3) => $tile::<1, 3>($($arg),*),
            (1, _) => $tile::<1, 4>($($arg),*),
            (2, 1) => $tile::<2, 1>($($arg),*),
            (2, 2) => $tile::<2, 2>($($arg),*),
            (2, 3) => $tile::<2, 3>($($arg),*),
            (2, _) => $tile::<2, 4>($($arg),*),
            (3, 1) => $tile::<3, 1>($($arg),*),
            (3, 2) => $tile::<3, 2>($($arg),*),
            (3, 3) => $tile::<3, 3>($($arg),*),
            (3, _) => $tile::<3, 4>($($arg),*),
            (_, 1) => $tile::<4, 1>($($arg),*),
            (_, 2) => $tile::<4, 2>($($arg),*),
            (_, 3) => $tile::<4, 3>($($arg),*),
            (_, _) => $tile::<4, 4>($($arg),*),
        }
    };
}

/// Scores of `n` (1 to 4) queries over `width` keys (a multiple of 16): query rows `q` (pairs of
/// head dimensions, `pairs` of them; rows past `n` repeat the last), keys laid out `[pairs, stride]`
/// from `keys`, outputs `out` (rows past `n` ignored).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; the pointers hold what is named.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn scores(
    n: usize,
    q: &[*const u32; TILE_ROWS],
    keys: *const u32,
    stride: usize,
    pairs: usize,
    width: usize,
    out: &[*mut f32; TILE_ROWS],
) {
    let mut c = 0;
    while c < width {
        let vectors = ((width - c) / LANES).min(4);
        let at = keys.wrapping_add(c);
        let out: [*mut f32; TILE_ROWS] = std::array::from_fn(|r| out[r].wrapping_add(c));
        // SAFETY: as the caller promises.
        unsafe { by_tile!(n, vectors, scores_tile(q, at, stride, pairs, &out)) };
        c += vectors * LANES;
    }
}

/// `R` queries by `V` vectors of keys, stored in f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn scores_tile<const R: usize, const V: usize>(
    q: &[*const u32; TILE_ROWS],
    keys: *const u32,
    stride: usize,
    pairs: usize,
    out: &[*mut f32; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises.
    let acc = unsafe { pair_products::<R, V>(q, keys, stride, pairs) };
    for (row, acc) in out.iter().zip(&acc) {
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: inside the output row.
            unsafe { _mm512_storeu_ps(row.add(v * LANES), *acc) };
        }
    }
}

/// The weighted values of `n` (1 to 4) queries over `pairs` pairs of keys: weight rows `weights`
/// (pairs of bf16 terms; rows past `n` repeat the last), values laid out `[pairs, d]` from `values`;
/// each sum is multiplied by its row's `scales` entry and stored as bf16 in its row of `out` (rows
/// past `n` untouched).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; the pointers hold what is named; `d` is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn weighted_values(
    n: usize,
    weights: &[*const u32; TILE_ROWS],
    values: *const u32,
    d: usize,
    pairs: usize,
    scales: &[f32; TILE_ROWS],
    out: &[*mut u16; TILE_ROWS],
) {
    let mut c = 0;
    while c < d {
        let vectors = ((d - c) / LANES).min(4);
        let at = values.wrapping_add(c);
        let out_at: [*mut u16; TILE_ROWS] = std::array::from_fn(|r| out[r].wrapping_add(c));
        // SAFETY: as the caller promises.
        unsafe { by_tile!(n, vectors, weighted_tile(weights, at, d, pairs, scales, &out_at)) };
        c += vectors * LANES;
    }
}

/// `R` queries by `V` vectors of head dimensions, scaled and stored in bf16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn weighted_tile<const R: usize, const V: usize>(
    weights: &[*const u32; TILE_ROWS],
    values: *const u32,
    d: usize,
    pairs: usize,
    scales: &[f32; TILE_ROWS],
    out: &[*mut u16; TILE_ROWS],
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises.
    let acc = unsafe { pair_products::<R, V>(weights, values, d, pairs) };
    for ((row, acc), &scale) in out.iter().zip(&acc).zip(scales) {
        let scale = _mm512_set1_ps(scale);
        for (v, acc) in acc.iter().enumerate() {
            let y = _mm512_cvtneps_pbh(_mm512_mul_ps(*acc, scale));
            // SAFETY: 16 bf16 of the output row.
            unsafe { _mm256_storeu_si256(row.add(v * LANES).cast(), std::mem::transmute::<__m256bh, __m256i>(y)) };
        }
    }
}

/// The products both tiles are made of: for `R` broadcast rows (a pair of bf16 per step) and `V`
/// vectors of a laid-out matrix (`[pairs, stride]` from `laid_out`, pairs in each 32-bit lane),
/// `Σ_p broadcast[r][p] · laid_out[p][v]` in f32, one `vdpbf16ps` per row and vector per step.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; each broadcast row holds `pairs` pairs, and `laid_out` `pairs`
/// rows of at least `V * 16` pairs, `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pair_products<const R: usize, const V: usize>(
    broadcast: &[*const u32; TILE_ROWS],
    laid_out: *const u32,
    stride: usize,
    pairs: usize,
) -> [[std::arch::x86_64::__m512; V]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..pairs {
        // SAFETY: pair `p` of the laid-out matrix and of each broadcast row.
        unsafe {
            let row = laid_out.add(p * stride);
            let x: [__m512bh; V] = std::array::from_fn(|v| m512bh(_mm512_loadu_si512(row.add(v * LANES).cast())));
            for (acc, from) in acc.iter_mut().zip(broadcast) {
                let pair = m512bh(_mm512_set1_epi32(from.add(p).read_unaligned() as i32));
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    *acc = _mm512_dpbf16_ps(*acc, x, pair);
                }
            }
        }
    }
    acc
}

/// The same 512 bits as 32 bf16 values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn m512bh(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 512 plain bits.
    unsafe { std::mem::transmute(x) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_spans::tests::packed_mask;

    fn random(size: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(size, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
    }

    /// libtorch's attention of `q`, `k`, `v` (key-value heads repeated) in `kind`, as `[rows, seq,
    /// heads * head_dim]` in f32.
    fn libtorch(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, kind: Kind) -> Tensor {
        let (rows, heads, seq, head_dim) = q.size4().unwrap();
        let groups = heads / k.size()[1];
        let repeat = |x: &Tensor| x.repeat_interleave_self_int(groups, 1, None).to_kind(kind);
        Tensor::scaled_dot_product_attention(
            &q.to_kind(kind),
            &repeat(k),
            &repeat(v),
            Some(mask),
            0.0,
            false,
            scale,
            false,
        )
        .transpose(1, 2)
        .reshape([rows, seq, heads * head_dim])
        .to_kind(Kind::Float)
    }

    fn max_abs(x: &Tensor) -> f64 {
        x.abs().max().double_value(&[])
    }

    /// Ours against f32 attention of the same bf16 inputs is as close as libtorch's bf16 attention
    /// is: packed rows, grouped key-value heads, a mask broadcast over rows with more keys than
    /// queries (a cache), queries strided as a projection's output is, and head sizes 32, 64, 128.
    #[test]
    fn as_close_to_f32_attention_as_libtorch_in_bf16() {
        if !has_avx512_bf16() {
            eprintln!("skipped: this CPU lacks AVX-512 BF16");
            return;
        }
        let seq = 300;
        let lengths: Vec<&[i64]> = vec![&[40, 90, 100, 70], &[150, 150], &[10, 20, 30, 40, 50, 60, 70], &[200]];
        let packed = packed_mask(&lengths, seq);
        // Twenty cached keys before `seq` causal ones, the same for every row.
        let cached = Tensor::ones([seq, 20], (Kind::Bool, Device::Cpu));
        let causal = Tensor::ones([seq, seq], (Kind::Bool, Device::Cpu)).tril(0);
        let with_cache = Tensor::cat(&[cached, causal], 1).view([1, 1, seq, seq + 20]);
        for (heads, kv_heads, head_dim, mask, scale) in [
            (4, 4, 64, &packed, 1.0),
            (4, 2, 32, &packed, 0.125),
            (6, 2, 128, &with_cache, 0.088),
            (2, 1, 64, &with_cache, 1.0),
        ] {
            let keys = mask.size()[3];
            let rows = lengths.len() as i64;
            // Queries as the projection leaves them: `[rows, seq, heads, head_dim]` transposed.
            let q = random(&[rows, seq, heads, head_dim], 1).transpose(1, 2);
            let k = random(&[rows, kv_heads, keys, head_dim], 2);
            let v = random(&[rows, kv_heads, keys, head_dim], 3);
            let ours = forward(&q, &k, &v, mask, scale).unwrap().expect("applies").to_kind(Kind::Float);
            let exact = libtorch(&q, &k, &v, mask, scale, Kind::Float);
            let theirs = libtorch(&q, &k, &v, mask, scale, Kind::BFloat16);
            let (ours_error, their_error) = (max_abs(&(&ours - &exact)), max_abs(&(&theirs - &exact)));
            let (ours_mean, their_mean) = (
                (&ours - &exact).abs().mean(Kind::Float).double_value(&[]),
                (&theirs - &exact).abs().mean(Kind::Float).double_value(&[]),
            );
            let case = format!("heads {heads}/{kv_heads}, head_dim {head_dim}, keys {keys}");
            eprintln!(
                "{case}: max error {ours_error:.2e} (libtorch {their_error:.2e}), mean {ours_mean:.2e} \
                 ({their_mean:.2e})"
            );
            assert!(
                ours_error <= 1.25 * their_error,
                "{case}: max error {ours_error} against libtorch's {their_error}"
            );
            assert!(ours_mean <= 1.05 * their_mean, "{case}: mean error {ours_mean} against libtorch's {their_mean}");
        }
    }

    /// Each row's result is the same, bit for bit, alone or among others, and a query that sees no
    /// key gets zeros.
    #[test]
    fn a_row_alone_is_the_same_bits_and_a_query_without_keys_gets_zeros() {
        if !has_avx512_bf16() {
            eprintln!("skipped: this CPU lacks AVX-512 BF16");
            return;
        }
        let seq = 100;
        let lengths: Vec<&[i64]> = vec![&[30, 70], &[100], &[5, 5, 5, 85]];
        let mask = packed_mask(&lengths, seq);
        // Row 1's query 7 sees nothing.
        let _ = mask.get(1).get(0).get(7).fill_(0);
        let (q, k, v) = (random(&[3, 2, seq, 64], 4), random(&[3, 2, seq, 64], 5), random(&[3, 2, seq, 64], 6));
        let together = forward(&q, &k, &v, &mask, 1.0).unwrap().expect("applies");
        for row in 0..3 {
            let alone = |x: &Tensor| x.narrow(0, row, 1);
            let by_itself = forward(&alone(&q), &alone(&k), &alone(&v), &alone(&mask), 1.0).unwrap().expect("applies");
            assert!(by_itself.equal(&together.narrow(0, row, 1)), "row {row}");
        }
        let hidden = together.get(1).get(7).to_kind(Kind::Float);
        assert_eq!(max_abs(&hidden), 0.0);
    }

    /// f32, a float mask, a head size not a multiple of 32, inputs wanting a gradient and keys of
    /// another head size are left to libtorch.
    #[test]
    fn declines_what_it_does_not_compute() {
        let mask = packed_mask(&[&[10, 10]], 20);
        let (q, k, v) = (random(&[1, 2, 20, 64], 7), random(&[1, 2, 20, 64], 8), random(&[1, 2, 20, 64], 9));
        let float = |x: &Tensor| x.to_kind(Kind::Float);
        assert!(forward(&float(&q), &float(&k), &float(&v), &mask, 1.0).unwrap().is_none());
        assert!(forward(&q, &k, &v, &mask.to_kind(Kind::BFloat16), 1.0).unwrap().is_none());
        let odd = random(&[1, 2, 20, 48], 10);
        assert!(forward(&odd, &odd, &odd, &mask, 1.0).unwrap().is_none());
        assert!(forward(&q, &k.narrow(3, 0, 32), &v.narrow(3, 0, 32), &mask, 1.0).unwrap().is_none());
        let trained = q.set_requires_grad(true);
        assert!(forward(&trained, &k, &v, &mask, 1.0).unwrap().is_none());
    }
}
