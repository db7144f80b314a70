//! The decoding steps' kernels, on the CPU. Products of a few rows by a weight matrix, `x · wᵀ (+
//! bias)` with `x` `[m, k]` for `m` up to [`MAX_ROWS`] and `w` `[n, k]` (f32; bf16 through `vdpbf16ps`
//! on CPUs with AVX-512 BF16, else with the weights widened as they are read): what a decoding step
//! asks of every linear layer and of the output head. Such a
//! product does only `m` multiply-adds per weight it reads, so it is bound by reading `w`; MKL's
//! general product packs `w` first, and on the 2-core EPYC of the README it streamed SmolLM2's
//! weights at 5-9 GB/s where this kernel reaches 20-24 GB/s (a decoding step's 211 products: 70-100 ms
//! against 22-35 ms for 1 to 16 rows, 269 against 161 ms for 100 rows, 586 against 519 ms for 256).
//! And a step's attention, one query per head ([`one_query_attention`]), whose scores are such
//! products.
//!
//! The product keeps four rows of `w` and up to four rows of `x` in registers, so each weight is
//! loaded once per block of `x` rows while the rows of `w` stay in L1, and prefetches `w` into L2
//! ahead of use. It runs on libtorch's own OpenMP threads, each taking a run of `w`'s rows. Each
//! output's sum runs in the same order whatever the number of rows (lane-wise over `k`, the lanes
//! added, the tail of `k`, then the bias), so a row's result does not depend on which other rows
//! share its batch. The kernels run only inside [`decoding`].

use crate::Result;
use tch::{Device, Kind, Tensor};

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a generation's decoding steps) with the kernels on. They are used there only: a
/// generation batch is the same batch on any number of ranks, while a scoring batch's rows depend on
/// the planning, and a row's result must not depend on whether its batch went through the kernel or
/// through libtorch (whose sums run in another order).
pub(crate) fn decoding<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            DECODING.set(self.0);
        }
    }
    let _reset = Reset(DECODING.replace(true));
    f()
}

/// Whether this thread is inside [`decoding`].
pub(crate) fn in_decoding() -> bool {
    DECODING.get()
}

/// Most rows the kernel takes (a decoding step's rows: `--batch-rows` is 256 by default); from about
/// 512 rows MKL's general product is as fast.
pub(crate) const MAX_ROWS: i64 = 256;

/// `x · wᵀ (+ bias)` (`x` `[..., k]`, `w` `[n, k]`, `bias` `[n]`), computed by the kernel when it
/// applies: inside [`decoding`], f32 or bf16 tensors (all of one kind) on the CPU, at most
/// [`MAX_ROWS`] rows, nothing that wants a gradient, and a CPU with AVX2 and FMA (or AVX-512). In
/// bf16 the products of bf16 values are summed in f32 (with AVX-512 BF16 by `vdpbf16ps`, else with
/// the weights widened to f32 as they are read) and the result is rounded to bf16 once, as libtorch's
/// bf16 product does. `None` when it does not apply.
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(isa) = Isa::detected().filter(|_| in_decoding()) else { return Ok(None) };
    let dims = x.size();
    let (Some(&k), &[n, wk]) = (dims.last(), w.size().as_slice()) else { return Ok(None) };
    let m: i64 = dims[..dims.len() - 1].iter().product();
    let kind = w.kind();
    let same_kind_cpu =
        [Some(x), Some(w), bias].into_iter().flatten().all(|t| t.kind() == kind && t.device() == Device::Cpu);
    let supported = matches!(kind, Kind::Float | Kind::BFloat16);
    if !supported
        || !same_kind_cpu
        || m == 0
        || m > MAX_ROWS
        || k != wk
        || k == 0
        || bias.is_some_and(|b| b.size() != [n])
    {
        return Ok(None);
    }
    if [Some(x), Some(w), bias].into_iter().flatten().any(Tensor::requires_grad) && grad_enabled() {
        return Ok(None);
    }
    if kind == Kind::BFloat16 && has_avx512_bf16() {
        return Ok(Some(bf16_pairs(x, w, bias, &dims, (m as usize, k as usize, n as usize))?));
    }
    // The rows and the bias are small: widened to f32 here; the weights stay as they are.
    let x = x.f_to_kind(Kind::Float)?.f_contiguous()?;
    let w = w.f_contiguous()?;
    let bias = bias.map(|b| b.f_to_kind(Kind::Float)?.f_contiguous()).transpose()?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n);
    let y = Tensor::f_empty(out_dims.as_slice(), (Kind::Float, Device::Cpu))?;
    let (m, k, n) = (m as usize, k as usize, n as usize);
    // SAFETY: each tensor is contiguous on the CPU, of the element type and count of its slice, and
    // lives (with its storage) until the end of this function; `y` is freshly allocated, so it
    // aliases none of the others.
    unsafe {
        let x = std::slice::from_raw_parts(x.data_ptr() as *const f32, m * k);
        let bias = bias.as_ref().map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, n));
        let out = y.data_ptr() as *mut f32;
        if kind == Kind::Float {
            let w = std::slice::from_raw_parts(w.data_ptr() as *const f32, n * k);
            run_threaded(isa, &Problem { x, w, bias, m, k, n, out });
        } else {
            let w = std::slice::from_raw_parts(w.data_ptr() as *const Bf16, n * k);
            run_threaded(isa, &Problem { x, w, bias, m, k, n, out });
        }
    }
    Ok(Some(if kind == Kind::Float { y } else { y.f_to_kind(kind)? }))
}

/// [`linear`] of bf16 rows by bf16 weights with `vdpbf16ps` ([`avx512_pairs`]): `dims` are `x`'s,
/// `(m, k, n)` the product's sizes.
fn bf16_pairs(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    dims: &[i64],
    (m, k, n): (usize, usize, usize),
) -> Result<Tensor> {
    let (x, w) = (x.f_contiguous()?, w.f_contiguous()?);
    let bias = bias.map(|b| b.f_to_kind(Kind::Float)?.f_contiguous()).transpose()?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(n as i64);
    let y = Tensor::f_empty(out_dims.as_slice(), (Kind::Float, Device::Cpu))?;
    // SAFETY: as in `linear`: contiguous CPU tensors of the element types and counts of the slices,
    // alive until the end of this function; `y` is fresh.
    unsafe {
        let x = std::slice::from_raw_parts(x.data_ptr() as *const Bf16, m * k);
        let w = std::slice::from_raw_parts(w.data_ptr() as *const Bf16, n * k);
        let bias = bias.as_ref().map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, n));
        let problem = Problem { x, w, bias, m, k, n, out: y.data_ptr() as *mut f32 };
        run_pairs(&problem, 0, n, true);
    }
    Ok(y.f_to_kind(Kind::BFloat16)?)
}

/// Whether the CPU has AVX-512 BF16 (`vdpbf16ps`), with AVX-512 F and BW.
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PRESENT.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Output columns `[begin, end)` of a bf16-by-bf16 product, on libtorch's threads when `threaded`.
///
/// # Safety
/// [`has_avx512_bf16`]; `p.out` holds `m * n` elements.
unsafe fn run_pairs(p: &Problem<'_, Bf16, Bf16>, begin: usize, end: usize, threaded: bool) {
    debug_assert!(p.x.len() == p.m * p.k && p.w.len() == p.n * p.k && begin <= end && end <= p.n);
    #[cfg(target_arch = "x86_64")]
    {
        let columns = |b: usize, e: usize| {
            // SAFETY: as the caller promises.
            unsafe { avx512_pairs::product(p, begin + b, begin + e) }
        };
        if threaded {
            parallel(end - begin, 4, &columns);
        } else {
            columns(0, end - begin);
        }
    }
}

/// A bf16 weight's bits.
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Bf16(pub(crate) u16);

/// What a weight matrix can hold: f32, or bf16 widened as it is read.
pub(crate) trait Weight: Copy + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The product kernel of each instruction set for weights of this type.
    #[cfg(target_arch = "x86_64")]
    const KERNELS: Kernels<Self>;
}

/// One kernel per instruction set: output columns `[begin, end)` of a problem.
///
/// # Safety (of each)
/// The CPU must have the instructions of its set; `p.out` must hold `m * n` elements.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Kernels<W: 'static> {
    avx512: unsafe fn(&Problem<'_, W>, usize, usize),
    avx2: unsafe fn(&Problem<'_, W>, usize, usize),
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    const KERNELS: Kernels<Self> = Kernels { avx512: avx512::product, avx2: avx2::product };
}

impl Weight for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    const KERNELS: Kernels<Self> = Kernels { avx512: avx512_bf16::product, avx2: avx2_bf16::product };
}

/// The product on libtorch's threads, each taking a run of `w`'s rows in blocks of four.
fn run_threaded<W: Weight>(isa: Isa, problem: &Problem<'_, W>) {
    parallel(problem.n, 4, &|begin, end| isa.run(problem, begin, end));
}

/// The instruction set for a kernel over the elements of `t`: `t` is f32 or bf16 on the CPU and wants
/// no gradient, and the CPU has AVX2 with FMA (or AVX-512). `None` when a kernel does not apply.
pub(crate) fn element_kernel_isa(t: &Tensor) -> Option<Isa> {
    let isa = Isa::detected()?;
    let applies = t.device() == Device::Cpu
        && matches!(t.kind(), Kind::Float | Kind::BFloat16)
        && !(t.requires_grad() && grad_enabled());
    applies.then_some(isa)
}

/// Whether autograd records operations on this thread (the kernel's results carry no gradient).
pub(crate) fn grad_enabled() -> bool {
    // `at_grad_set_enabled` returns the previous mode; setting it back leaves it as it was.
    // SAFETY: plain calls into libtorch's thread-local grad mode.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// One product: `x` `[m, k]`, `w` `[n, k]`, `bias` `[n]` and the output `[m, n]`, row-major. Threads
/// write disjoint columns of the output, through the pointer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Problem<'a, W, X = f32> {
    x: &'a [X],
    w: &'a [W],
    bias: Option<&'a [f32]>,
    m: usize,
    k: usize,
    n: usize,
    out: *mut f32,
}

// SAFETY: the threads that share a problem write disjoint parts of the output; the rest is read only.
unsafe impl<W: Sync, X: Sync> Sync for Problem<'_, W, X> {}

/// libtorch's own OpenMP runtime (libgomp, loaded with libtorch), found at run time: the kernel runs
/// on libtorch's threads, as many as libtorch uses. Threads of its own would compete with libtorch's,
/// which keep spinning for a while after each parallel operation.
struct Omp {
    parallel: GompParallel,
    thread_num: OmpQuery,
    num_threads: OmpQuery,
}

/// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on every thread of a new region.
type GompParallel =
    unsafe extern "C" fn(extern "C" fn(*mut libc::c_void), *mut libc::c_void, libc::c_uint, libc::c_uint);
/// `omp_get_thread_num()` and `omp_get_num_threads()`.
type OmpQuery = unsafe extern "C" fn() -> libc::c_int;

impl Omp {
    fn get() -> Option<&'static Omp> {
        static OMP: std::sync::OnceLock<Option<Omp>> = std::sync::OnceLock::new();
        OMP.get_or_init(|| {
            let symbol = |name: &std::ffi::CStr| {
                // SAFETY: a lookup in the symbols already loaded; nothing is called here.
                let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!address.is_null()).then_some(address)
            };
            let (parallel, thread_num, num_threads) =
                (symbol(c"GOMP_parallel")?, symbol(c"omp_get_thread_num")?, symbol(c"omp_get_num_threads")?);
            // SAFETY: libgomp's entry points, with their C signatures.
            unsafe {
                Some(Omp {
                    parallel: std::mem::transmute::<*mut libc::c_void, GompParallel>(parallel),
                    thread_num: std::mem::transmute::<*mut libc::c_void, OmpQuery>(thread_num),
                    num_threads: std::mem::transmute::<*mut libc::c_void, OmpQuery>(num_threads),
                })
            }
        })
        .as_ref()
    }

    /// `work(begin, end)` on every thread of a parallel region, each taking a run of `[0, count)`
    /// in whole granules of `granule` items.
    fn parallel(&self, count: usize, granule: usize, work: &(dyn Fn(usize, usize) + Sync)) {
        struct Region<'a> {
            omp: &'a Omp,
            count: usize,
            granule: usize,
            work: &'a (dyn Fn(usize, usize) + Sync),
        }
        extern "C" fn each_thread(data: *mut libc::c_void) {
            // SAFETY: `data` is the `Region` below, alive until `GOMP_parallel` returns.
            let region = unsafe { &*(data as *const Region<'_>) };
            // SAFETY: plain queries of the current parallel region.
            let (thread, threads) =
                unsafe { ((region.omp.thread_num)() as usize, (region.omp.num_threads)().max(1) as usize) };
            let granules = region.count.div_ceil(region.granule);
            let begin = granules * thread / threads * region.granule;
            let end = (granules * (thread + 1) / threads * region.granule).min(region.count);
            if begin < end {
                (region.work)(begin, end);
            }
        }
        let region = Region { omp: self, count, granule, work };
        // SAFETY: `each_thread` only reads `region`, which outlives the region (GOMP_parallel
        // returns when every thread is done); 0 threads: the runtime's current number.
        unsafe { (self.parallel)(each_thread, &region as *const Region<'_> as *mut libc::c_void, 0, 0) };
    }
}

/// Runs `work(begin, end)` over `[0, count)` on libtorch's threads when its OpenMP runtime is
/// found, else on this thread.
pub(crate) fn parallel(count: usize, granule: usize, work: &(dyn Fn(usize, usize) + Sync)) {
    match Omp::get() {
        Some(omp) => omp.parallel(count, granule, work),
        None => work(0, count),
    }
}

/// The vector instructions the kernel is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    pub(crate) fn detected() -> Option<Self> {
        static DETECTED: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Some(Isa::Avx512);
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return Some(Isa::Avx2);
                }
            }
            None
        })
    }

    /// Writes the output's columns `[begin, end)` (rows of `w`).
    fn run<W: Weight>(self, p: &Problem<'_, W>, begin: usize, end: usize) {
        debug_assert!(p.x.len() == p.m * p.k && p.w.len() == p.n * p.k && begin <= end && end <= p.n);
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = match self {
                Isa::Avx512 => W::KERNELS.avx512,
                Isa::Avx2 => W::KERNELS.avx2,
            };
            // SAFETY: `detected` found the instructions each kernel is compiled for; the output
            // holds `m * n` elements.
            unsafe { kernel(p, begin, end) }
        }
    }
}

/// The kernel for one instruction set: `$lanes` f32 per vector, `$rows` rows of `x` per block (what
/// the registers hold beside four rows of `w`: 16 accumulators of 32 registers, or 8 of 16).
macro_rules! kernel {
    ($module:ident, $weight:ty, $feature:literal, $vector:ty, $lanes:literal, $rows:literal,
     $zero:ident, $load:ident, $load_weights:expr, $fma:ident, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            #[allow(unused_imports)]
            use super::{Bf16, Problem, Weight};
            use std::arch::x86_64::*;

            const LANES: usize = $lanes;

            /// Output columns `[begin, end)`.
            ///
            /// # Safety
            /// The CPU must have the instructions of `$feature`; `p.out` must hold `m * n` elements.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn product(p: &Problem<'_, $weight>, begin: usize, end: usize) {
                let mut j = begin;
                while j < end {
                    let w_rows = if end - j >= 4 { 4 } else { 1 };
                    let mut i = 0;
                    while i < p.m {
                        let x_rows = (p.m - i).min($rows);
                        // SAFETY: the block's rows are inside `x`, `w` and `out`.
                        unsafe {
                            match (w_rows, x_rows) {
                                (4, 1) => block::<4, 1>(p, i, j),
                                (4, 2) => block::<4, 2>(p, i, j),
                                (4, 3) => block::<4, 3>(p, i, j),
                                (4, _) => block::<4, $rows>(p, i, j),
                                (_, 1) => block::<1, 1>(p, i, j),
                                (_, 2) => block::<1, 2>(p, i, j),
                                (_, 3) => block::<1, 3>(p, i, j),
                                _ => block::<1, $rows>(p, i, j),
                            }
                        }
                        i += x_rows;
                    }
                    j += w_rows;
                }
            }

            /// Outputs `[i, i + X) x [j, j + W)`.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn block<const W: usize, const X: usize>(p: &Problem<'_, $weight>, i: usize, j: usize) {
                let k = p.k;
                let whole = k / LANES * LANES;
                let (x, w) = (p.x.as_ptr(), p.w.as_ptr());
                let mut acc = [[$zero(); X]; W];
                let mut at = 0;
                while at < whole {
                    // SAFETY: `at + LANES <= k`, and the rows are inside `x` and `w`.
                    unsafe {
                        let mut wv = [$zero(); W];
                        for (r, v) in wv.iter_mut().enumerate() {
                            let row = w.add((j + r) * k + at);
                            *v = $load_weights(row);
                            // Into L2, sixteen rows ahead: rows of a few KiB read side by side are
                            // too many short streams for the hardware prefetcher (a plain read of
                            // the weights reaches 12 GB/s on one core here, 20 GB/s with this).
                            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(16 * k) as *const i8);
                        }
                        for c in 0..X {
                            let xv = $load(x.add((i + c) * k + at));
                            for r in 0..W {
                                acc[r][c] = $fma(wv[r], xv, acc[r][c]);
                            }
                        }
                    }
                    at += LANES;
                }
                for r in 0..W {
                    for c in 0..X {
                        let sum = $sum(acc[r][c]);
                        let (xs, ws) = (&p.x[(i + c) * k..(i + c + 1) * k], &p.w[(j + r) * k..(j + r + 1) * k]);
                        let tail: f32 = xs[whole..].iter().zip(&ws[whole..]).map(|(a, b)| a * b.to_f32()).sum();
                        let bias = p.bias.map_or(0.0, |b| b[j + r]);
                        // SAFETY: inside the output; no other thread writes column `j + r`.
                        unsafe { *p.out.add((i + c) * p.n + j + r) = sum + tail + bias };
                    }
                }
            }
        }
    };
}

/// The weighted sum of one head's value rows, per ISA: `out[g, :] = Σ_l p[g, l] · v[l, :]` for
/// `groups` rows of weights `p` (`[groups, keys]`) and values `v` (`[keys, head_dim]`, rows
/// contiguous), `G` weight rows at a time with one vector of columns each.
macro_rules! weighted_kernel {
    ($module:ident, $feature:literal, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::Weighted;
            use std::arch::x86_64::*;

            const LANES: usize = $lanes;

            /// # Safety
            /// The CPU must have the instructions of `$feature`; the pointers must hold the sizes
            /// [`Weighted`] names.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn weighted_sum(a: &Weighted) {
                let mut g = 0;
                while g < a.groups {
                    let rows = (a.groups - g).min(4);
                    // SAFETY: as the caller promises.
                    unsafe {
                        match rows {
                            1 => block::<1>(a, g),
                            2 => block::<2>(a, g),
                            3 => block::<3>(a, g),
                            _ => block::<4>(a, g),
                        }
                    }
                    g += rows;
                }
            }

            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn block<const G: usize>(a: &Weighted, g: usize) {
                let whole = a.head_dim / LANES * LANES;
                let mut c = 0;
                while c < whole {
                    let mut acc = [$zero(); G];
                    for l in 0..a.keys {
                        // SAFETY: `l < keys`, `c + LANES <= head_dim`, `g + G <= groups`.
                        unsafe {
                            let v = $load(a.v.add(l * a.head_dim + c));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                *acc = $fma($set1(*a.p.add((g + r) * a.keys + l)), v, *acc);
                            }
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        // SAFETY: inside `out`'s row `g + r`.
                        unsafe { $store(a.out.add((g + r) * a.head_dim + c), *acc) };
                    }
                    c += LANES;
                }
                for r in 0..G {
                    for d in whole..a.head_dim {
                        // SAFETY: as above, one column at a time.
                        unsafe {
                            let sum: f32 = (0..a.keys)
                                .map(|l| *a.p.add((g + r) * a.keys + l) * *a.v.add(l * a.head_dim + d))
                                .sum();
                            *a.out.add((g + r) * a.head_dim + d) = sum;
                        }
                    }
                }
            }
        }
    };
}
weighted_kernel!(
    avx512_weighted,
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);
weighted_kernel!(
    avx2_weighted,
    "avx2,fma",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);

/// One head's weighted sum of values ([`weighted_kernel`]): `p` `[groups, keys]`, `v` `[keys,
/// head_dim]` and `out` `[groups, head_dim]`, row-major.
struct Weighted {
    p: *const f32,
    v: *const f32,
    out: *mut f32,
    groups: usize,
    keys: usize,
    head_dim: usize,
}

impl Isa {
    /// [`Weighted`]'s sum.
    ///
    /// # Safety
    /// The pointers must hold the sizes [`Weighted`] names.
    unsafe fn weighted_sum(self, a: &Weighted) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detected` found the instructions; the sizes as the caller promises.
        unsafe {
            match self {
                Isa::Avx512 => avx512_weighted::weighted_sum(a),
                Isa::Avx2 => avx2_weighted::weighted_sum(a),
            }
        }
    }
}

/// Attention of one query per head over each row's keys, as a decoding step has it: `q` `[rows,
/// kv_heads, groups, head_dim]` (the query heads of a key-value head as its rows), `k`, `v` `[rows,
/// kv_heads, keys, head_dim]` with each head's keys contiguous (as the cache's views of its buffers
/// are), `seen` boolean `[rows, keys]`, each row seeing at least one key. Scores are products of a few
/// rows (the queries) by the keys, through the product kernel; the softmax and its log-sum-exp are
/// libtorch's; the weighted values are a second kernel's, each reading a head's values once. Returns
/// the attention `[rows, kv_heads, groups, head_dim]` and each query's log-sum-exp `[rows, kv_heads,
/// groups]`, in f32; `None` where it does not apply (inside [`decoding`], f32 on the CPU with AVX2 or
/// AVX-512, nothing that wants a gradient).
pub(crate) fn one_query_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seen: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(isa) = Isa::detected().filter(|_| in_decoding()) else { return Ok(None) };
    let (Ok((rows, kv_heads, groups, head_dim)), Ok(kv_shape)) = (q.size4(), k.size4()) else { return Ok(None) };
    let keys = kv_shape.2;
    let f32_cpu = [q, k, v].iter().all(|t| t.kind() == Kind::Float && t.device() == Device::Cpu);
    let heads_contiguous = [k, v].iter().all(|t| t.size4().ok() == Some(kv_shape) && t.stride()[2..] == [head_dim, 1]);
    if !f32_cpu || !heads_contiguous || kv_shape.0 != rows || kv_shape.1 != kv_heads || keys == 0 {
        return Ok(None);
    }
    if seen.kind() != Kind::Bool || seen.size() != [rows, keys] {
        return Ok(None);
    }
    if [q, k, v].iter().any(|t| t.requires_grad()) && grad_enabled() {
        return Ok(None);
    }
    let q = q.f_contiguous()?;
    let scores = Tensor::f_empty([rows, kv_heads, groups, keys], (Kind::Float, Device::Cpu))?;
    let (heads, groups_u, keys_u, dim_u) =
        ((rows * kv_heads) as usize, groups as usize, keys as usize, head_dim as usize);
    let (k_stride, v_stride) = (k.stride(), v.stride());
    let (q_ptr, k_ptr, v_ptr) = (q.data_ptr() as usize, k.data_ptr() as usize, v.data_ptr() as usize);
    let head_start = |stride: &[i64], head: usize| -> usize {
        let (row, kv) = (head / kv_heads as usize, head % kv_heads as usize);
        (row as i64 * stride[0] + kv as i64 * stride[1]) as usize * 4
    };
    let scores_ptr = scores.data_ptr() as usize;
    // SAFETY (both regions): every pointer is into a tensor alive until this function returns, at
    // offsets inside it (the shapes and strides checked above); each head writes its own part of the
    // output.
    parallel(heads, 1, &|begin, end| {
        for head in begin..end {
            unsafe {
                let x =
                    std::slice::from_raw_parts((q_ptr as *const f32).add(head * groups_u * dim_u), groups_u * dim_u);
                let w = std::slice::from_raw_parts((k_ptr + head_start(&k_stride, head)) as *const f32, keys_u * dim_u);
                let out = (scores_ptr as *mut f32).add(head * groups_u * keys_u);
                isa.run(&Problem { x, w, bias: None, m: groups_u, k: dim_u, n: keys_u, out }, 0, keys_u);
            }
        }
    });
    let unseen = seen.f_logical_not()?.f_view([rows, 1, 1, keys])?;
    let scores = scores.f_mul_scalar(scale)?.f_masked_fill(&unseen, f64::NEG_INFINITY)?;
    let lse = scores.f_logsumexp(&[-1i64][..], true)?;
    let weights = scores.f_sub(&lse)?.f_exp()?.f_contiguous()?;
    let out = Tensor::f_empty([rows, kv_heads, groups, head_dim], (Kind::Float, Device::Cpu))?;
    let (weights_ptr, out_ptr) = (weights.data_ptr() as usize, out.data_ptr() as usize);
    parallel(heads, 1, &|begin, end| {
        for head in begin..end {
            let sum = Weighted {
                p: (weights_ptr as *const f32).wrapping_add(head * groups_u * keys_u),
                v: (v_ptr + head_start(&v_stride, head)) as *const f32,
                out: (out_ptr as *mut f32).wrapping_add(head * groups_u * dim_u),
                groups: groups_u,
                keys: keys_u,
                head_dim: dim_u,
            };
            // SAFETY: see above.
            unsafe { isa.weighted_sum(&sum) };
        }
    });
    Ok(Some((out, lse.f_squeeze_dim(-1)?)))
}

/// bf16 rows by bf16 weights with `vdpbf16ps`, 32 of `k` per instruction in pairs summed in f32:
/// the widening kernel's blocks at twice its rate of products. In a bf16 model the rows are bf16
/// already, so nothing is rounded that libtorch's bf16 product does not round; each output's sum runs
/// in the same order whatever the number of rows.
#[cfg(target_arch = "x86_64")]
mod avx512_pairs {
    use super::{Bf16, Problem, Weight};
    use std::arch::x86_64::*;

    /// bf16 elements per vector.
    const LANES: usize = 32;

    /// Output columns `[begin, end)`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `p.out` must hold `m * n` elements.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn product(p: &Problem<'_, Bf16, Bf16>, begin: usize, end: usize) {
        let mut j = begin;
        while j < end {
            let w_rows = if end - j >= 4 { 4 } else { 1 };
            let mut i = 0;
            while i < p.m {
                let x_rows = (p.m - i).min(4);
                // SAFETY: the block's rows are inside `x`, `w` and `out`.
                unsafe {
                    match (w_rows, x_rows) {
                        (4, 1) => block::<4, 1>(p, i, j),
                        (4, 2) => block::<4, 2>(p, i, j),
                        (4, 3) => block::<4, 3>(p, i, j),
                        (4, _) => block::<4, 4>(p, i, j),
                        (_, 1) => block::<1, 1>(p, i, j),
                        (_, 2) => block::<1, 2>(p, i, j),
                        (_, 3) => block::<1, 3>(p, i, j),
                        _ => block::<1, 4>(p, i, j),
                    }
                }
                i += x_rows;
            }
            j += w_rows;
        }
    }

    /// Outputs `[i, i + X) x [j, j + W)`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block<const W: usize, const X: usize>(p: &Problem<'_, Bf16, Bf16>, i: usize, j: usize) {
        let k = p.k;
        let whole = k / LANES * LANES;
        let (x, w) = (p.x.as_ptr(), p.w.as_ptr());
        let pairs = |v: __m512i| -> __m512bh {
            // SAFETY: both are 512 plain bits.
            unsafe { std::mem::transmute(v) }
        };
        let mut acc = [[_mm512_setzero_ps(); X]; W];
        let mut at = 0;
        while at < whole {
            // SAFETY: `at + LANES <= k`, and the rows are inside `x` and `w`.
            unsafe {
                let mut wv = [pairs(_mm512_setzero_si512()); W];
                for (r, v) in wv.iter_mut().enumerate() {
                    let row = w.add((j + r) * k + at);
                    *v = pairs(_mm512_loadu_si512(row.cast()));
                    // Into L2 ahead of use, as the widening kernel does.
                    _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(16 * k) as *const i8);
                }
                for c in 0..X {
                    let xv = pairs(_mm512_loadu_si512(x.add((i + c) * k + at).cast()));
                    for (acc, &wv) in acc.iter_mut().zip(&wv) {
                        acc[c] = _mm512_dpbf16_ps(acc[c], wv, xv);
                    }
                }
            }
            at += LANES;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                let (xs, ws) = (&p.x[(i + c) * k..(i + c + 1) * k], &p.w[(j + r) * k..(j + r + 1) * k]);
                let tail: f32 = xs[whole..].iter().zip(&ws[whole..]).map(|(a, b)| a.to_f32() * b.to_f32()).sum();
                let bias = p.bias.map_or(0.0, |b| b[j + r]);
                // SAFETY: inside the output; no other thread writes column `j + r`.
                unsafe { *p.out.add((i + c) * p.n + j + r) = _mm512_reduce_add_ps(*acc) + tail + bias };
            }
        }
    }
}

// The lanes' sums and the widening loads are plain intrinsics, safe inside the kernels' target
// features; bf16 widens to f32 by moving its 16 bits to the top of an f32.
macro_rules! kernels_for_both_weights {
    ($f32:ident, $bf16:ident, $feature:literal, $vector:ty, $lanes:literal, $rows:literal,
     $zero:ident, $load:ident, $widen:expr, $fma:ident, $sum:expr) => {
        kernel!($f32, f32, $feature, $vector, $lanes, $rows, $zero, $load, |p: *const f32| $load(p), $fma, $sum);
        kernel!($bf16, Bf16, $feature, $vector, $lanes, $rows, $zero, $load, $widen, $fma, $sum);
    };
}
kernels_for_both_weights!(
    avx512,
    avx512_bf16,
    "avx512f",
    __m512,
    16,
    4,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    |p: *const Bf16| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))),
    _mm512_fmadd_ps,
    |v| _mm512_reduce_add_ps(v)
);
kernels_for_both_weights!(
    avx2,
    avx2_bf16,
    "avx2,fma",
    __m256,
    8,
    2,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    |p: *const Bf16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))),
    _mm256_fmadd_ps,
    |v: __m256| {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// [`linear`] inside a decoding scope.
    fn decode_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
        decoding(|| linear(x, w, bias).unwrap())
    }

    fn random(dims: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(dims, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn matches_the_general_product_with_tails_and_bias() {
        if Isa::detected().is_none() {
            eprintln!("skipped: the CPU has neither AVX2 with FMA nor AVX-512");
            return;
        }
        for (m, k, n) in
            [(1, 64, 4), (3, 37, 9), (4, 576, 192), (7, 15, 6), (16, 1536, 13), (9, 200, 101), (70, 96, 45)]
        {
            let (x, w, b) = (random(&[m, k], m), random(&[n, k], k), random(&[n], n));
            for bias in [None, Some(&b)] {
                let ours = decode_linear(&x, &w, bias).expect("applies");
                let theirs = x.linear(&w, bias);
                let diff = (ours - &theirs).abs().max().double_value(&[]);
                let scale = theirs.abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale.max(1.0), "m {m} k {k} n {n}: {diff}");
            }
        }
    }

    /// bf16 weights widened as they are read: the f32 product of the bf16 values, rounded once to bf16
    /// (within one bf16 rounding of libtorch's, whose sums run in another order).
    #[test]
    fn bf16_is_the_f32_product_rounded_once() {
        if Isa::detected().is_none() {
            return;
        }
        for (m, k, n) in [(1, 64, 8), (5, 77, 21), (12, 576, 96)] {
            let x = random(&[m, k], 11).to_kind(Kind::BFloat16);
            let (w, b) = (random(&[n, k], 12).to_kind(Kind::BFloat16), random(&[n], 13).to_kind(Kind::BFloat16));
            let ours = decode_linear(&x, &w, Some(&b)).expect("applies");
            assert_eq!(ours.kind(), Kind::BFloat16);
            let exact = x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), Some(&b.to_kind(Kind::Float)));
            let ulp = exact.abs().clamp_min(1e-3) * (2f64.powi(-7));
            let off = (ours.to_kind(Kind::Float) - &exact).abs().gt_tensor(&ulp).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(off, 0, "m {m} k {k} n {n}: {off} outputs more than a bf16 step from the exact product");
        }
    }

    /// A decoding step's attention: scores, softmax and weighted values against plain tensor
    /// operations, over a strided view of a longer buffer (as the cache's), with padding keys, and
    /// head dimensions with and without a tail of lanes.
    #[test]
    fn one_query_attention_is_the_softmax_over_the_seen_keys() {
        if Isa::detected().is_none() {
            return;
        }
        for (rows, kv_heads, groups, head_dim, keys) in [(3, 2, 3, 64, 9), (2, 1, 1, 20, 5), (5, 3, 5, 16, 40)] {
            let q = random(&[rows, kv_heads, groups, head_dim], 21);
            let k = random(&[rows, kv_heads, keys + 6, head_dim], 22).narrow(2, 0, keys);
            let v = random(&[rows, kv_heads, keys + 6, head_dim], 23).narrow(2, 0, keys);
            let seen = Tensor::arange(keys, (Kind::Int64, Device::Cpu))
                .unsqueeze(0)
                .ge_tensor(&Tensor::from_slice(&(0..rows).map(|r| r % 3).collect::<Vec<_>>()).unsqueeze(1));
            let (out, lse) = decoding(|| one_query_attention(&q, &k, &v, &seen, 0.3).unwrap()).expect("applies");
            let scores = q.matmul(&k.transpose(-2, -1)) * 0.3;
            let scores = scores.masked_fill(&seen.logical_not().view([rows, 1, 1, keys]), f64::NEG_INFINITY);
            let expected_lse = scores.logsumexp([-1i64], false);
            let expected = scores.softmax(-1, Kind::Float).matmul(&v);
            let diff = (out - expected).abs().max().double_value(&[]);
            let lse_diff = (lse - expected_lse).abs().max().double_value(&[]);
            assert!(
                diff < 1e-5 && lse_diff < 1e-5,
                "{rows}x{kv_heads}x{groups}x{head_dim} over {keys}: {diff} {lse_diff}"
            );
        }
    }

    /// Each instruction set's kernel the CPU has, on one thread (the AVX2 kernel is not what
    /// `linear` picks on a CPU with AVX-512).
    #[test]
    fn every_kernel_the_cpu_has_matches() {
        #[cfg(target_arch = "x86_64")]
        for (isa, present) in [
            (Isa::Avx512, std::arch::is_x86_feature_detected!("avx512f")),
            (Isa::Avx2, std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")),
        ] {
            if !present {
                continue;
            }
            let (m, k, n) = (6usize, 53usize, 11usize);
            let (x, w, b) =
                (random(&[m as i64, k as i64], 8), random(&[n as i64, k as i64], 9), random(&[n as i64], 10));
            let theirs = x.linear(&w, Some(&b));
            let (xs, ws, bs) = (
                Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(w.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(&b).unwrap(),
            );
            let mut out = vec![0f32; m * n];
            let problem = Problem { x: &xs, w: &ws, bias: Some(&bs), m, k, n, out: out.as_mut_ptr() };
            isa.run(&problem, 0, n);
            let ours = Tensor::from_slice(&out).view([m as i64, n as i64]);
            let diff = (ours - &theirs).abs().max().double_value(&[]);
            assert!(diff <= 1e-4, "{isa:?}: {diff}");
            // The same with the weights in bf16, against the f32 product of those values.
            let w16 = w.to_kind(Kind::BFloat16);
            let bits = Vec::<i16>::try_from(w16.view_dtype(Kind::Int16).flatten(0, -1)).unwrap();
            let ws16: Vec<Bf16> = bits.iter().map(|&b| Bf16(b as u16)).collect();
            let problem = Problem { x: &xs, w: &ws16, bias: Some(&bs), m, k, n, out: out.as_mut_ptr() };
            isa.run(&problem, 0, n);
            let theirs = x.linear(&w16.to_kind(Kind::Float), Some(&b));
            let ours = Tensor::from_slice(&out).view([m as i64, n as i64]);
            let diff = (ours - &theirs).abs().max().double_value(&[]);
            assert!(diff <= 1e-4, "{isa:?} with bf16 weights: {diff}");
            // The weighted sum of values: 5 weight rows (a block of four and one) over 7 values of
            // 19 columns (whole vectors and a tail).
            let (p, v) = (random(&[5, 7], 14), random(&[7, 19], 15));
            let (ps, vs) =
                (Vec::<f32>::try_from(p.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(v.flatten(0, -1)).unwrap());
            let mut summed = vec![0f32; 5 * 19];
            let sum =
                Weighted { p: ps.as_ptr(), v: vs.as_ptr(), out: summed.as_mut_ptr(), groups: 5, keys: 7, head_dim: 19 };
            // SAFETY: the buffers hold the sizes named.
            unsafe { isa.weighted_sum(&sum) };
            let diff = (Tensor::from_slice(&summed).view([5, 19]) - p.matmul(&v)).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "{isa:?} weighted sum: {diff}");
        }
    }

    /// bf16 rows and weights through `vdpbf16ps` on one thread, with a tail of `k` and blocks of one
    /// and four weight rows: the f32 product of the bf16 values, up to the order of f32 sums.
    #[test]
    fn the_pairs_kernel_is_the_f32_product_of_the_bf16_values() {
        if !has_avx512_bf16() {
            eprintln!("skipped: this CPU lacks AVX-512 BF16");
            return;
        }
        let bits = |t: &Tensor| -> Vec<Bf16> {
            let bits = Vec::<i16>::try_from(t.view_dtype(Kind::Int16).flatten(0, -1)).unwrap();
            bits.iter().map(|&b| Bf16(b as u16)).collect()
        };
        for (m, k, n) in [(6usize, 83usize, 11usize), (1, 576, 4), (13, 1536, 9)] {
            let x = random(&[m as i64, k as i64], 31).to_kind(Kind::BFloat16);
            let w = random(&[n as i64, k as i64], 32).to_kind(Kind::BFloat16);
            let b = random(&[n as i64], 33);
            let (xs, ws, bs) = (bits(&x), bits(&w), Vec::<f32>::try_from(&b).unwrap());
            let mut out = vec![0f32; m * n];
            let problem = Problem { x: &xs, w: &ws, bias: Some(&bs), m, k, n, out: out.as_mut_ptr() };
            // SAFETY: the CPU has the instructions; `out` holds `m * n` elements.
            unsafe { run_pairs(&problem, 0, n, false) };
            let exact = x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), Some(&b));
            let ours = Tensor::from_slice(&out).view([m as i64, n as i64]);
            let diff = (ours - &exact).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * (k as f64).sqrt(), "m {m} k {k} n {n}: {diff}");
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if Isa::detected().is_none() {
            return;
        }
        let (x, w) = (random(&[11, 300], 1), random(&[45, 300], 2));
        let all = decode_linear(&x, &w, None).expect("applies");
        for row in [0, 4, 10] {
            let alone = decode_linear(&x.narrow(0, row, 1), &w, None).expect("applies");
            assert!(alone.equal(&all.narrow(0, row, 1)), "row {row}");
        }
        // In bf16 too (through `vdpbf16ps` where the CPU has it).
        let (x16, w16) = (x.to_kind(Kind::BFloat16), w.to_kind(Kind::BFloat16));
        let all16 = decode_linear(&x16, &w16, None).expect("applies");
        for row in [0, 4, 10] {
            let alone = decode_linear(&x16.narrow(0, row, 1), &w16, None).expect("applies");
            assert!(alone.equal(&all16.narrow(0, row, 1)), "bf16 row {row}");
        }
        // Leading dimensions are rows too: `[rows, 1, k]` as a decoding step has it.
        let stepped = decode_linear(&x.unsqueeze(1), &w, None).expect("applies");
        assert_eq!(stepped.size(), [11, 1, 45]);
        assert!(stepped.squeeze_dim(1).equal(&all));
    }

    #[test]
    fn declines_what_it_does_not_compute() {
        let (x, w) = (random(&[MAX_ROWS + 1, 32], 3), random(&[8, 32], 4));
        assert!(linear(&x.narrow(0, 0, 2), &w, None).unwrap().is_none(), "outside a decoding scope");
        assert!(decode_linear(&x, &w, None).is_none(), "too many rows");
        let half = random(&[2, 32], 5).to_kind(Kind::Half);
        assert!(decode_linear(&half, &w.to_kind(Kind::Half), None).is_none(), "f16");
        let bf16 = random(&[2, 32], 5).to_kind(Kind::BFloat16);
        assert!(decode_linear(&bf16, &w, None).is_none(), "kinds differ");
        let wanted = random(&[2, 32], 6).set_requires_grad(true);
        assert!(decode_linear(&wanted, &w, None).is_none(), "a gradient is wanted");
        let _guard = tch::no_grad_guard();
        assert_eq!(decode_linear(&wanted, &w, None).is_some(), Isa::detected().is_some(), "no grad mode");
    }
}
