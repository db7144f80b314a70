//! GELU in its tanh form (`gelu_new`, `gelu_pytorch_tanh`), on the CPU, in one pass over memory.
//!
//! libtorch computes it with a vectorized `tanh` accurate to one ulp (Sleef's `tanhf16_u10`), which
//! on the AVX-512 Xeon of the README ran at 1.1-1.2 G elements/s on 2 threads in f32 and bf16,
//! against 5-6 for the erf form and 7-8 for an addition: a sixth of a bf16 GPT-Neo scoring run's time.
//! Here `0.5 x (1 + tanh(u))` is computed as `x / (1 + exp(-2u))`, the same function, with `exp`
//! from a degree-7 polynomial (Cephes' `expf` coefficients) and the exponent set by integer
//! arithmetic, so the compiler vectorizes the loop; f32 results are within a few ulp of libtorch's
//! and bf16 results (widened, computed in f32, rounded to nearest even once, as libtorch does) are
//! almost always its very bits. Each element's result depends on that element alone, so a row's
//! result does not depend on its batch. It runs on libtorch's threads (see [`crate::skinny`]).

use crate::skinny::{element_kernel_isa, parallel, Bf16, Isa, Weight};
use crate::Result;
use tch::{Kind, Tensor};

/// Fewest elements worth waking libtorch's other threads for.
const THREADED_FROM: usize = 1 << 15;
/// Elements per piece of work a thread takes (whole cache lines in both element types).
const GRANULE: usize = 1024;

/// `gelu(x, approximate = "tanh")` when the kernel applies: an f32 or bf16 tensor on the CPU that
/// wants no gradient, on a CPU with AVX2 and FMA (or AVX-512). `None` when it does not apply.
pub(crate) fn forward(x: &Tensor) -> Result<Option<Tensor>> {
    let Some(isa) = element_kernel_isa(x) else { return Ok(None) };
    let x = x.f_contiguous()?;
    let y = x.f_empty_like()?;
    if x.kind() == Kind::Float {
        run::<f32>(isa, &x, &y);
    } else {
        run::<Bf16>(isa, &x, &y);
    }
    Ok(Some(y))
}

/// `y = gelu(x)` for contiguous CPU tensors `x` and `y` of the same size, both of elements `E`, `y`
/// not overlapping `x`.
fn run<E: Element>(isa: Isa, x: &Tensor, y: &Tensor) {
    let count = x.numel();
    let (input, output) = (x.data_ptr() as usize, y.data_ptr() as usize);
    let work = |begin: usize, end: usize| {
        // SAFETY: `x` and `y` hold `count` elements of `E` each, alive until `run` returns, and do
        // not overlap; each thread writes its own run `[begin, end)` of `y`.
        unsafe {
            let from = std::slice::from_raw_parts((input as *const E).add(begin), end - begin);
            let to = std::slice::from_raw_parts_mut((output as *mut E).add(begin), end - begin);
            isa.gelu(from, to);
        }
    };
    if count >= THREADED_FROM {
        parallel(count, GRANULE, &work);
    } else if count > 0 {
        work(0, count);
    }
}

/// An element type the kernel reads and writes: widened to f32 by [`Weight::to_f32`], computed in
/// f32, rounded back once.
trait Element: Weight {
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for Bf16 {
    /// Rounds to the nearest bf16, ties to even, NaN to the quiet NaN, as `c10::BFloat16` does.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
        Bf16(if x.is_nan() { 0x7fc0 } else { rounded })
    }
}

/// `sqrt(2 / pi)`, GELU's tanh-form scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic term's coefficient.
const KAPPA: f32 = 0.044_715;

/// `exp(z)` for `z` in `[-87, 88]` (the caller clamps): `z = n ln 2 + r` with `|r| <= ln 2 / 2`,
/// `exp(r)` by Cephes' minimax polynomial, `2^n` built in the exponent bits. Branch-free, so loops
/// over it vectorize.
#[inline(always)]
pub(crate) fn exp(z: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let shifted = z * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = n.mul_add(-0.693_359_4, z);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let e = (r * r).mul_add(p, r) + 1.0;
    let scale = f32::from_bits(((shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    e * scale
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = -2.0 * SQRT_2_OVER_PI * (x * x * x).mul_add(KAPPA, x);
    // `exp` is evaluated where it is finite and normal. Below the clamp the result is `x` to within
    // f32; above it, `x * 0` (-0 as libtorch has it, NaN for -inf). A NaN stays NaN.
    let y = x / (1.0 + exp(z.clamp(-87.0, 88.0)));
    if z > 88.0 {
        x * 0.0
    } else {
        y
    }
}

#[inline(always)]
fn gelu_slice<E: Element>(from: &[E], to: &mut [E]) {
    for (y, &x) in to.iter_mut().zip(from) {
        *y = E::from_f32(gelu(x.to_f32()));
    }
}

/// The loop compiled for each instruction set.
///
/// # Safety (of each)
/// The CPU must have the instructions named.
#[cfg(target_arch = "x86_64")]
mod compiled {
    use super::Element;

    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn avx512<E: Element>(from: &[E], to: &mut [E]) {
        super::gelu_slice(from, to);
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<E: Element>(from: &[E], to: &mut [E]) {
        super::gelu_slice(from, to);
    }
}

impl Isa {
    fn gelu<E: Element>(self, from: &[E], to: &mut [E]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detected` found the instructions of the loop chosen.
        unsafe {
            match self {
                Isa::Avx512 => compiled::avx512(from, to),
                Isa::Avx2 => compiled::avx2(from, to),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        gelu_slice(from, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Values over GELU's whole range: a dense sweep of `[-12, 12]`, the extremes, zeros, and
    /// non-finite values.
    fn sweep() -> Tensor {
        let dense = Tensor::linspace(-12.0, 12.0, 200_003, (Kind::Float, Device::Cpu));
        let special = Tensor::from_slice(&[
            0.0f32,
            -0.0,
            1e-30,
            -1e-30,
            1e20,
            -1e20,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            40.0,
            -40.0,
            -9.5,
        ]);
        Tensor::cat(&[dense, special], 0)
    }

    fn assert_matches_libtorch(kind: Kind, tolerance_ulp: f64) {
        if Isa::detected().is_none() {
            return;
        }
        let x = sweep().to_kind(kind);
        let ours = forward(&x).unwrap().expect("applies");
        let theirs = x.gelu("tanh");
        assert_eq!(ours.size(), theirs.size());
        let (ours, theirs) = (ours.to_kind(Kind::Double), theirs.to_kind(Kind::Double));
        // NaN where libtorch has NaN, and nowhere else.
        assert!(ours.isnan().equal(&theirs.isnan()), "{kind:?}: NaNs differ");
        let finite = theirs.isfinite();
        assert!(ours.isinf().equal(&theirs.isinf()), "{kind:?}: infinities differ");
        let eps = if kind == Kind::Float { f64::from(f32::EPSILON) } else { 2f64.powi(-7) };
        // Error in units of the last place of the input or of the result, whichever is larger:
        // where `x` is negative, libtorch's `1 + tanh(u)` cancels, so its own result is only that
        // accurate there.
        let scale = theirs.abs().maximum(&x.to_kind(Kind::Double).abs()).clamp_min(1e-30) * eps;
        let error = ((&ours - &theirs).abs() / scale).masked_fill(&finite.logical_not(), 0.0);
        let worst = error.max().double_value(&[]);
        assert!(worst <= tolerance_ulp, "{kind:?}: {worst} ulp");
    }

    #[test]
    fn f32_is_within_a_few_ulp_of_libtorch() {
        assert_matches_libtorch(Kind::Float, 4.0);
    }

    #[test]
    fn bf16_is_libtorchs_rounding_to_within_one_ulp() {
        assert_matches_libtorch(Kind::BFloat16, 1.0);
        // And its very bits nearly always where libtorch's own result is accurate (from -2 up:
        // below, its `1 + tanh(u)` cancels and its rounding is off).
        if Isa::detected().is_none() {
            return;
        }
        let x = Tensor::linspace(-2.0, 12.0, 100_001, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let same = forward(&x).unwrap().unwrap().eq_tensor(&x.gelu("tanh")).to_kind(Kind::Float).mean(Kind::Float);
        assert!(same.double_value(&[]) >= 0.999, "{}", same.double_value(&[]));
    }

    #[test]
    fn threaded_and_alone_agree_and_views_are_read_in_order() {
        if Isa::detected().is_none() {
            return;
        }
        // Large enough to run threaded; a transposed view is made contiguous first.
        let x = Tensor::randn([300, 700], (Kind::Float, Device::Cpu)) * 3.0;
        let whole = forward(&x).unwrap().unwrap();
        let alone = forward(&x.narrow(0, 5, 2)).unwrap().unwrap();
        assert!(alone.equal(&whole.narrow(0, 5, 2)));
        let transposed = forward(&x.tr()).unwrap().unwrap();
        assert!(transposed.equal(&whole.tr().contiguous()));
        assert_eq!(forward(&x.narrow(0, 0, 0)).unwrap().unwrap().size(), [0, 700]);
    }

    #[test]
    fn declines_what_it_does_not_compute() {
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        assert!(forward(&x.to_kind(Kind::Half)).unwrap().is_none(), "f16");
        assert!(forward(&x.to_kind(Kind::Double)).unwrap().is_none(), "f64");
        let wanted = x.set_requires_grad(true);
        assert!(forward(&wanted).unwrap().is_none(), "a gradient is wanted");
        let _guard = tch::no_grad_guard();
        assert_eq!(forward(&wanted).unwrap().is_some(), Isa::detected().is_some(), "no grad mode");
    }
}
