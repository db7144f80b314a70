//! Standard errors of task metrics: lm-eval's closed form for means, a seeded bootstrap for other
//! statistics (perplexity), and propagation through averages of independent tasks.
//!
//! # Means ([`mean_stderr`], [`sample_stddev`])
//!
//! lm-eval's `mean_stderr` (`lm_eval.api.metrics`): with `x̄ = Σ xᵢ / n`,
//!
//! ```text
//! sample_stddev = sqrt(Σ (xᵢ - x̄)² / (n - 1))        mean_stderr = sample_stddev / sqrt(n)
//! ```
//!
//! computed in f64 in the same order as lm-eval's Python (left-to-right sums), so the figures agree
//! to the last bit or two. For `n < 2` the result is `None`: lm-eval reports `"N/A"` then (its
//! aggregation only calls the stderr function when `len(items) > 1`; the function itself would
//! divide by zero).
//!
//! # Bootstrap ([`bootstrap_stderr`], [`perplexity_stderr`])
//!
//! For a statistic that is not a mean (lm-eval's `perplexity` aggregation is `exp(-mean(logliks))`
//! over the per-example log-likelihoods), the standard error is the sample standard deviation
//! (n − 1, over the replicates) of the statistic over `B` resamples of the `n` rows drawn with
//! replacement, as lm-eval's `bootstrap_stderr` does (default `B` = 100 000, lm-eval's
//! `bootstrap_iters`). Like lm-eval's, the estimate of a mean's stderr this way is biased low by a
//! factor `sqrt((n - 1) / n)` (the bootstrap distribution has the population variance).
//!
//! The statistic is any function of a resample's **column means**: the rows are `[n, k]`
//! (`k` = 1 for perplexity; e.g. log-likelihood and token count for a token-weighted perplexity, or
//! confusion-matrix indicators for F1 and MCC). Each replicate's means are summed in Rust from a
//! per-replicate random stream, then the statistic runs once on the `[B, k]` tensor of means (tch),
//! so nothing of size `B × n` is ever materialized: 100 000 resamples of 5153 rows take a fraction
//! of a second. (Generating the `B × n` = 5·10⁸ indices with elementwise tensor ops would cost a
//! full memory pass per op; the per-row draw, gather and add here is a few instructions.) Statistics
//! that are not functions of means (a median) are out of scope.
//!
//! Two resamplers ([`Resampler`]):
//! - [`Resampler::Counter`] (default): replicate `r` draws its rows from a counter-based stream keyed by
//!   `(seed, r)` only, the construction of `icl_data::fewshot`: the `t`-th 64-bit word is
//!   `mix(key + t·γ)` with `key = mix(mix(seed) ^ (r + γ))`, `mix` SplitMix64's finaliser and
//!   `γ = 0x9E3779B97F4A7C15`; each word gives two 32-bit draws (low half first), each mapped to a
//!   row below `n` by Lemire's multiply-shift with rejection (exactly uniform). The replicates are
//!   shared among threads in blocks and each is summed in draw order, so the figure is the same on
//!   any machine and with any thread count. It is **not** lm-eval's random stream: the two
//!   estimates of the same standard error differ by Monte-Carlo noise, a relative standard deviation
//!   of about `1 / sqrt(2B)` each (0.2 % at `B` = 100 000).
//! - [`Resampler::LmEval`]: lm-eval's exact draws, for parity. lm-eval splits the `B` resamples into
//!   `B // c` chunks of `c = min(1000, B)` (so it runs `c · (B // c)` of them: 2500 → 2000), and chunk
//!   `i` draws with Python's `random.Random(i)` (Mersenne Twister seeded by `init_by_array([i])`),
//!   `choices(xs, k=n)` = `xs[floor(random() * n)]` with `random()` the 53-bit double of two 32-bit
//!   outputs. This resampler replays that stream (chunks in parallel, each sequential; the seed is
//!   ignored) and sums in the same order, so the result equals lm-eval's `bootstrap_stderr` up to
//!   float rounding in the statistic (tests/lm_eval_stderr.rs: bit-identical at 2500 iterations, one
//!   ulp apart at 20 000, against the venv's lm-eval). lm-eval's multiprocessing
//!   pool changes nothing here: every chunk is seeded by its index and the results are taken in
//!   order. It is about five times slower than the counter stream (Mersenne Twister, two 32-bit
//!   outputs per draw).
//!
//! # Averages of independent tasks ([`weighted_mean_stderr`])
//!
//! For an average `Σ wᵢ xᵢ / Σ wᵢ` of independent estimates `xᵢ` with standard errors `seᵢ` (tasks
//! of a gauntlet category, categories of the gauntlet average),
//!
//! ```text
//! se = sqrt(Σ wᵢ² seᵢ²) / Σ wᵢ
//! ```
//!
//! (the variance of a sum of independent terms; weights are constants). With equal weights this is
//! lm-eval's `unweighted_mean_stderr`. With `wᵢ = nᵢ` it is close to lm-eval's size-weighted
//! `pooled_sample_stderr`, which pools the task variances with `nᵢ - 1` weights instead.

use crate::{Error, Result};
use tch::{Kind, Tensor};

/// lm-eval's `sample_stddev`: `sqrt(Σ (xᵢ - x̄)² / (n - 1))` in f64; `None` when `n < 2`.
pub fn sample_stddev(values: &Tensor) -> Result<Option<f64>> {
    Ok(stddev_of(&to_vec(values)?))
}

/// lm-eval's `mean_stderr`: [`sample_stddev`] over `sqrt(n)`; `None` when `n < 2` (lm-eval's `"N/A"`).
pub fn mean_stderr(values: &Tensor) -> Result<Option<f64>> {
    let v = to_vec(values)?;
    Ok(stddev_of(&v).map(|sd| sd / (v.len() as f64).sqrt()))
}

/// The standard error of the weighted mean `Σ wᵢ xᵢ / Σ wᵢ` of independent estimates with standard
/// errors `stderrs`: `sqrt(Σ wᵢ² seᵢ²) / Σ wᵢ`. Errors when the lengths differ, a weight is negative
/// or not finite, or the weights sum to zero.
pub fn weighted_mean_stderr(weights: &[f64], stderrs: &[f64]) -> Result<f64> {
    if weights.len() != stderrs.len() {
        return Err(Error::Shape(format!("{} weights for {} standard errors", weights.len(), stderrs.len())));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(Error::Shape(format!("weight {w} is not a finite non-negative number")));
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(Error::Shape("the weights sum to zero".into()));
    }
    let var: f64 = weights.iter().zip(stderrs).map(|(w, se)| w * w * se * se).sum();
    Ok(var.sqrt() / total)
}

/// The random stream a bootstrap draws its resamples from (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resampler {
    /// Counter-based SplitMix64 stream keyed by `(seed, replicate)`: fast, machine- and
    /// thread-independent.
    #[default]
    Counter,
    /// lm-eval's exact draws (`random.Random(chunk)`, chunks of 1000); the seed is ignored.
    LmEval,
}

/// Options of [`bootstrap_stderr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrap {
    /// Number of resamples `B` (lm-eval's `bootstrap_iters`, default 100 000).
    pub iters: usize,
    /// Seed of [`Resampler::Counter`].
    pub seed: u64,
    pub resampler: Resampler,
    /// Worker threads; 0 = one per available core. The result does not depend on it.
    pub threads: usize,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self { iters: 100_000, seed: 0, resampler: Resampler::Counter, threads: 0 }
    }
}

/// Bootstrap standard error of a statistic of the column means of `rows` (`[n]` or `[n, k]`, any
/// numeric kind, read as f64): `statistic` maps the `[B, k]` f64 tensor of every replicate's column
/// means to the `[B]` replicate statistics, whose sample standard deviation (n − 1) is returned.
/// `None` when `n < 2` (lm-eval's `"N/A"`) or fewer than two replicates would run.
pub fn bootstrap_stderr<F>(rows: &Tensor, options: &Bootstrap, statistic: F) -> Result<Option<f64>>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let rows = match rows.dim() {
        1 => rows.f_unsqueeze(1)?,
        2 => rows.shallow_clone(),
        _ => return Err(Error::Shape(format!("bootstrap rows must be [n] or [n, k], got {:?}", rows.size()))),
    };
    let (n, k) = rows.size2()?;
    let (n, k) = (n as usize, k as usize);
    if n > u32::MAX as usize {
        return Err(Error::Shape(format!("{n} rows: at most 2^32 - 1 can be resampled")));
    }
    let (replicates, chunk) = match options.resampler {
        Resampler::Counter => (options.iters, 1),
        Resampler::LmEval => {
            let chunk = options.iters.clamp(1, 1000);
            ((options.iters / chunk) * chunk, chunk)
        }
    };
    if n < 2 || replicates < 2 || k == 0 {
        return Ok(None);
    }
    let values = to_vec(&rows)?; // row-major [n, k]
    let means = replicate_means(&values, n, k, replicates, chunk, options);
    let means = Tensor::from_slice(&means).view([replicates as i64, k as i64]);
    let stats = statistic(&means)?;
    if stats.size() != [replicates as i64] {
        return Err(Error::Shape(format!(
            "the statistic must give one value per replicate, [{replicates}], got {:?}",
            stats.size()
        )));
    }
    Ok(stddev_of(&to_vec(&stats)?))
}

/// Bootstrap standard error of lm-eval's `perplexity`, `exp(-mean(logliks))` over the per-example
/// log-likelihoods `[n]`.
pub fn perplexity_stderr(logliks: &Tensor, options: &Bootstrap) -> Result<Option<f64>> {
    if logliks.dim() != 1 {
        return Err(Error::Shape(format!("log-likelihoods must be [n], got {:?}", logliks.size())));
    }
    bootstrap_stderr(logliks, options, |means| Ok(means.f_select(1, 0)?.f_neg()?.f_exp()?))
}

/// Every replicate's column means, `[replicates * k]` row-major. Replicates are split among threads in
/// contiguous blocks of whole chunks (`chunk` replicates share one lm-eval stream); each replicate is
/// computed the same way whatever the split.
fn replicate_means(
    values: &[f64],
    n: usize,
    k: usize,
    replicates: usize,
    chunk: usize,
    options: &Bootstrap,
) -> Vec<f64> {
    let mut out = vec![0.0; replicates * k];
    let chunks = replicates / chunk;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        t => t,
    }
    .clamp(1, chunks);
    let chunks_per_thread = chunks.div_ceil(threads);
    let seed_key = mix(options.seed);
    let mode = options.resampler;
    std::thread::scope(|scope| {
        for (block, out) in out.chunks_mut(chunks_per_thread * chunk * k).enumerate() {
            let first_chunk = block * chunks_per_thread;
            scope.spawn(move || {
                for (c, out) in out.chunks_mut(chunk * k).enumerate() {
                    let chunk_index = (first_chunk + c) as u64;
                    match mode {
                        Resampler::Counter => {
                            let mut draws = CounterStream::new(seed_key, chunk_index);
                            resample_into(values, n, k, out, || draws.below(n as u32) as usize);
                        }
                        Resampler::LmEval => {
                            let mut mt = Mt19937::python_seed(chunk_index);
                            let nf = n as f64;
                            for replicate in out.chunks_mut(k) {
                                resample_into(values, n, k, replicate, || {
                                    ((mt.random() * nf).floor() as usize).min(n - 1)
                                });
                            }
                        }
                    }
                }
            });
        }
    });
    out
}

/// One replicate (`out` is `[k]`; for lm-eval, several replicates are drawn one after the other
/// from one stream by the caller): `n` rows drawn by `draw`, column sums in draw order, over `n`.
fn resample_into(values: &[f64], n: usize, k: usize, out: &mut [f64], mut draw: impl FnMut() -> usize) {
    if k == 1 {
        let mut sum = 0.0;
        for _ in 0..n {
            sum += values[draw()];
        }
        out[0] = sum / n as f64;
        return;
    }
    out.fill(0.0);
    for _ in 0..n {
        let row = &values[draw() * k..][..k];
        for (acc, v) in out.iter_mut().zip(row) {
            *acc += v;
        }
    }
    for acc in out.iter_mut() {
        *acc /= n as f64;
    }
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective mix of all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 32-bit draws of replicate `r`: the halves (low first) of `mix(key + t·γ)`, `t = 1, 2, ...`.
struct CounterStream {
    key: u64,
    t: u64,
    word: u64,
    high_left: bool,
}

impl CounterStream {
    fn new(seed_key: u64, replicate: u64) -> Self {
        Self { key: mix(seed_key ^ replicate.wrapping_add(GAMMA)), t: 0, word: 0, high_left: false }
    }

    fn next_u32(&mut self) -> u32 {
        if self.high_left {
            self.high_left = false;
            (self.word >> 32) as u32
        } else {
            self.t += 1;
            self.word = mix(self.key.wrapping_add(self.t.wrapping_mul(GAMMA)));
            self.high_left = true;
            self.word as u32
        }
    }

    /// Uniform below `n` (`n > 0`): Lemire's multiply-shift, rejecting the few low products that
    /// would bias it.
    fn below(&mut self, n: u32) -> u32 {
        let mut m = u64::from(self.next_u32()) * u64::from(n);
        if (m as u32) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u32) < threshold {
                m = u64::from(self.next_u32()) * u64::from(n);
            }
        }
        (m >> 32) as u32
    }
}

/// CPython's Mersenne Twister (`_randommodule.c`): seeding, 32-bit outputs and `random()`.
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn init_genrand(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    /// `random.Random(seed)` for a non-negative integer seed: `init_by_array` over its 32-bit
    /// words, least significant first (one word `[0]` for zero).
    fn python_seed(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
        let mut mt = Self::init_genrand(19_650_218);
        let s = &mut mt.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            let prev = s[i - 1] ^ (s[i - 1] >> 30);
            s[i] = (s[i] ^ prev.wrapping_mul(1_664_525)).wrapping_add(key[j]).wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                s[0] = s[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            let prev = s[i - 1] ^ (s[i - 1] >> 30);
            s[i] = (s[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                s[0] = s[623];
                i = 1;
            }
        }
        s[0] = 0x8000_0000;
        mt
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            let s = &mut self.state;
            let twist = |upper: u32, lower: u32, far: u32| {
                let y = (upper & 0x8000_0000) | (lower & 0x7fff_ffff);
                far ^ (y >> 1) ^ ((y & 1).wrapping_neg() & 0x9908_b0df)
            };
            for kk in 0..227 {
                s[kk] = twist(s[kk], s[kk + 1], s[kk + 397]);
            }
            for kk in 227..623 {
                s[kk] = twist(s[kk], s[kk + 1], s[kk - 227]);
            }
            s[623] = twist(s[623], s[0], s[396]);
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.random()`: 53 random bits in `[0, 1)`.
    fn random(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// The elements of a tensor of any shape as f64, on the CPU.
fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

/// Python's `sample_stddev` on a list: left-to-right sums, `n - 1`.
fn stddev_of(values: &[f64]) -> Option<f64> {
    if values.len() < 2 {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().fold(0.0, |acc, x| acc + x) / n;
    let ss = values.iter().fold(0.0, |acc, x| acc + (x - mean) * (x - mean));
    Some((ss / (n - 1.0)).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn mean_stderr_is_sample_sd_over_sqrt_n() {
        // 0/1 values: 3 of 4 right; mean 0.75, ss = 3 * 0.0625 + 0.5625 = 0.75, sd = sqrt(0.25) = 0.5.
        let v = t(&[1.0, 1.0, 0.0, 1.0]);
        assert_eq!(sample_stddev(&v).unwrap(), Some(0.5));
        assert_eq!(mean_stderr(&v).unwrap(), Some(0.25));
        // Any shape and kind is read flat as f64.
        let b = Tensor::from_slice(&[true, true, false, true]).view([2, 2]);
        assert_eq!(mean_stderr(&b).unwrap(), Some(0.25));
        // n < 2: lm-eval's "N/A".
        assert_eq!(mean_stderr(&t(&[0.3])).unwrap(), None);
        assert_eq!(mean_stderr(&t(&[])).unwrap(), None);
        assert_eq!(sample_stddev(&t(&[2.0, 2.0])).unwrap(), Some(0.0));
    }

    #[test]
    fn weighted_mean_stderr_propagates_independent_errors() {
        // Equal weights: sqrt(0.03^2 + 0.04^2) / 2 = 0.025.
        let se = weighted_mean_stderr(&[1.0, 1.0], &[0.03, 0.04]).unwrap();
        assert!((se - 0.025).abs() < 1e-15, "{se}");
        // Weights 1 and 3: sqrt(0.01^2 + 9 * 0.02^2) / 4.
        let se = weighted_mean_stderr(&[1.0, 3.0], &[0.01, 0.02]).unwrap();
        assert!((se - (0.0001f64 + 0.0036).sqrt() / 4.0).abs() < 1e-15);
        // One task: its own stderr.
        assert_eq!(weighted_mean_stderr(&[5.0], &[0.1]).unwrap(), 0.1);
        assert!(weighted_mean_stderr(&[1.0], &[0.1, 0.2]).is_err());
        assert!(weighted_mean_stderr(&[0.0, 0.0], &[0.1, 0.2]).is_err());
        assert!(weighted_mean_stderr(&[-1.0, 2.0], &[0.1, 0.2]).is_err());
        assert!(weighted_mean_stderr(&[], &[]).is_err());
    }

    #[test]
    fn mt19937_replays_python_random() {
        // Python: random.Random(0).random() x3, Random(7).choices(range(10), k=10),
        // Random(2**40 + 5).choices(range(1000), k=5).
        let mut mt = Mt19937::python_seed(0);
        let r: Vec<f64> = (0..3).map(|_| mt.random()).collect();
        assert_eq!(r, [0.8444218515250481, 0.7579544029403025, 0.420571580830845]);
        let mut mt = Mt19937::python_seed(7);
        let c: Vec<usize> = (0..10).map(|_| (mt.random() * 10.0).floor() as usize).collect();
        assert_eq!(c, [3, 1, 6, 0, 5, 3, 0, 5, 0, 4]);
        let mut mt = Mt19937::python_seed((1 << 40) + 5);
        let c: Vec<usize> = (0..5).map(|_| (mt.random() * 1000.0).floor() as usize).collect();
        assert_eq!(c, [504, 268, 925, 530, 817]);
    }

    #[test]
    fn counter_draws_are_uniform_and_in_range() {
        let mut s = CounterStream::new(mix(3), 0);
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[s.below(7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..=10_500).contains(&c)), "{counts:?}");
        // Bounds near 2^32 exercise the rejection branch.
        let mut s = CounterStream::new(mix(3), 1);
        assert!((0..1000).all(|_| s.below(u32::MAX - 1) < u32::MAX - 1));
        assert!((0..10).all(|_| s.below(1) == 0));
    }

    #[test]
    fn bootstrap_of_a_mean_is_the_population_sd_over_sqrt_n() {
        // 100 values 0..99: population sd sqrt((100^2 - 1) / 12); bootstrap sd of the mean ~ that / 10.
        let v: Vec<f64> = (0..100).map(f64::from).collect();
        let expected = ((100.0f64 * 100.0 - 1.0) / 12.0).sqrt() / 10.0;
        for resampler in [Resampler::Counter, Resampler::LmEval] {
            let opts = Bootstrap { iters: 20_000, resampler, ..Default::default() };
            let se = bootstrap_stderr(&t(&v), &opts, |m| Ok(m.f_select(1, 0)?)).unwrap().unwrap();
            // Monte-Carlo error of a sd from 20 000 replicates: ~0.5 %.
            assert!((se / expected - 1.0).abs() < 0.03, "{resampler:?}: {se} vs {expected}");
        }
    }

    #[test]
    fn bootstrap_is_deterministic_whatever_the_thread_count() {
        let v: Vec<f64> = (0..537).map(|i| -((i * 7919 % 101) as f64) / 10.0).collect();
        for resampler in [Resampler::Counter, Resampler::LmEval] {
            let run = |threads, seed| {
                let opts = Bootstrap { iters: 3_000, seed, resampler, threads };
                perplexity_stderr(&t(&v), &opts).unwrap().unwrap()
            };
            let one = run(1, 5);
            assert_eq!(one.to_bits(), run(2, 5).to_bits());
            assert_eq!(one.to_bits(), run(7, 5).to_bits());
            if resampler == Resampler::Counter {
                assert_ne!(one, run(1, 6), "the seed matters");
            } else {
                assert_eq!(one, run(1, 6), "lm-eval's stream has no seed");
            }
        }
    }

    #[test]
    fn bootstrap_columns_and_edge_cases() {
        // Token perplexity exp(-Σll / Σtokens) from two columns; a constant ratio has stderr 0.
        let rows = Tensor::from_slice(&[-2.0, 1.0, -4.0, 2.0, -6.0, 3.0]).view([3, 2]);
        let opts = Bootstrap { iters: 100, ..Default::default() };
        let ratio = |m: &Tensor| Ok(m.f_select(1, 0)?.f_div(&m.f_select(1, 1)?)?.f_neg()?.f_exp()?);
        let se = bootstrap_stderr(&rows, &opts, ratio).unwrap().unwrap();
        assert!(se.abs() < 1e-12, "{se}");
        // n < 2 or fewer than 2 replicates: None, as lm-eval's "N/A".
        assert_eq!(perplexity_stderr(&t(&[-1.0]), &opts).unwrap(), None);
        let one = Bootstrap { iters: 1, ..Default::default() };
        assert_eq!(perplexity_stderr(&t(&[-1.0, -2.0]), &one).unwrap(), None);
        // lm-eval runs whole chunks of 1000 only: 1999 iterations are 1000.
        let lm = Bootstrap { iters: 1999, resampler: Resampler::LmEval, ..Default::default() };
        let lm1000 = Bootstrap { iters: 1000, ..lm };
        let v = t(&[-1.0, -2.0, -3.5, -0.5]);
        assert_eq!(perplexity_stderr(&v, &lm).unwrap(), perplexity_stderr(&v, &lm1000).unwrap());
        // Shape errors.
        assert!(perplexity_stderr(&rows, &opts).is_err());
        assert!(bootstrap_stderr(&Tensor::zeros([2, 2, 2], (Kind::Double, tch::Device::Cpu)), &opts, ratio).is_err());
        assert!(bootstrap_stderr(&v, &opts, |m| Ok(m.shallow_clone())).is_err(), "[B, 1] is not [B]");
    }

    fn speed(resampler: Resampler) {
        let v: Vec<f64> = (0..5153).map(|i| -((i * 7919 % 1013) as f64) / 100.0).collect();
        let opts = Bootstrap { resampler, ..Default::default() };
        let start = std::time::Instant::now();
        let se = perplexity_stderr(&t(&v), &opts).unwrap().unwrap();
        eprintln!("{resampler:?}: 100000 x 5153 in {:.3} s, stderr {se}", start.elapsed().as_secs_f64());
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn bootstrap_speed_counter() {
        speed(Resampler::Counter);
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn bootstrap_speed_lm_eval() {
        speed(Resampler::LmEval);
    }
}
