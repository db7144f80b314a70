//! CPython's `random.Random`, draw for draw: what the peers' few-shot samplers consume.
//!
//! Matched against CPython 3.11 (`Modules/_randommodule.c` and `Lib/random.py`; the parts used here
//! are unchanged from 3.9 to 3.13):
//! - [`Random::new`]: `random.Random(seed)` for an `int` seed. `random_seed` seeds MT19937 with
//!   `init_by_array` on the 32-bit words of `abs(seed)`, least significant first (one word `0` for
//!   seed 0), so `Random(-s)` and `Random(s)` are the same stream. [`Random::from_words`] takes those
//!   words for a seed of any size.
//! - [`Random::next_u32`]: `genrand_uint32`, the reference MT19937 output (`getrandbits(32)`).
//! - [`Random::random`]: `random()`, 53 bits from two draws.
//! - [`Random::getrandbits`]: `getrandbits(k)` for `k <= 64`: one draw shifted right by `32 - k` when
//!   `k <= 32`, otherwise the low word first and the high word shifted.
//! - [`Random::randbelow`]: `_randbelow_with_getrandbits` (`k = n.bit_length()`, redraw
//!   `getrandbits(k)` while `>= n`), which is what `choice` and `sample` use.
//! - [`Random::choice_index`]: `choice(seq)` is `seq[choice_index(len(seq))]`.
//! - [`Random::sample_range`]: `sample(range(n), k)` with both of CPython's branches: the pool branch
//!   (a list, each pick swapped with the last unpicked) when `n <= setsize`, else the set branch
//!   (redraw `randbelow(n)` until unseen), where `setsize = 21`, plus `4 ** ceil(log(3k, 4))` if `k > 5`.
//!
//! [`IntSet`] reproduces the iteration order of a CPython `set` of non-negative `int`s, which
//! llm-foundry iterates to order its shots. The unit tests compare with numbers printed by CPython
//! 3.11.7; `tests/peer_fewshot.rs` runs CPython itself.

use std::collections::HashSet;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's Mersenne Twister `random.Random` (see the module docs for what is matched).
#[derive(Clone)]
pub struct Random {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for Random {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Random").field("index", &self.index).finish_non_exhaustive()
    }
}

/// `random.sample` was asked for more items than the population has (CPython's `ValueError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Sample larger than population or is negative: {k} from {n}")]
pub struct SampleTooLarge {
    pub n: usize,
    pub k: usize,
}

impl Random {
    /// `random.Random(seed)` for an `int` seed: MT19937 seeded from `abs(seed)`.
    pub fn new(seed: i128) -> Self {
        let magnitude = seed.unsigned_abs();
        let bits = 128 - magnitude.leading_zeros() as usize;
        let words = if bits == 0 { 1 } else { (bits - 1) / 32 + 1 };
        let key: Vec<u32> = (0..words).map(|w| (magnitude >> (32 * w)) as u32).collect();
        Self::from_words(&key)
    }

    /// `random.Random(s)` for an `int` whose absolute value has these 32-bit words, least
    /// significant first and without high zero words (`[0]` for zero), as CPython splits it.
    pub fn from_words(key: &[u32]) -> Self {
        let key = if key.is_empty() { &[0][..] } else { key };
        let mut r = Self::init_genrand(19_650_218);
        let mt = &mut r.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        r
    }

    fn init_genrand(s: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = s;
        for i in 1..N {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: N }
    }

    /// `genrand_uint32`: the next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            let mt = &mut self.state;
            let mag = |y: u32| if y & 1 == 1 { MATRIX_A } else { 0 };
            for kk in 0..N - M {
                let y = (mt[kk] & UPPER_MASK) | (mt[kk + 1] & LOWER_MASK);
                mt[kk] = mt[kk + M] ^ (y >> 1) ^ mag(y);
            }
            for kk in N - M..N - 1 {
                let y = (mt[kk] & UPPER_MASK) | (mt[kk + 1] & LOWER_MASK);
                mt[kk] = mt[kk + M - N] ^ (y >> 1) ^ mag(y);
            }
            let y = (mt[N - 1] & UPPER_MASK) | (mt[0] & LOWER_MASK);
            mt[N - 1] = mt[M - 1] ^ (y >> 1) ^ mag(y);
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random()`: a float in `[0, 1)` with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `getrandbits(k)` for `k <= 64` (panics above).
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}): at most 64 bits here");
        match k {
            0 => 0,
            1..=32 => u64::from(self.next_u32() >> (32 - k)),
            _ => {
                let low = u64::from(self.next_u32());
                let high = u64::from(self.next_u32() >> (64 - k));
                low | (high << 32)
            }
        }
    }

    /// `_randbelow(n)`: uniform in `[0, n)` by rejection on `getrandbits(n.bit_length())`. `n > 0`.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n > 0, "randbelow(0)");
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `choice(seq)` returns `seq[choice_index(len(seq))]`; `len > 0` (CPython raises `IndexError`).
    pub fn choice_index(&mut self, len: usize) -> usize {
        assert!(len > 0, "Cannot choose from an empty sequence");
        self.randbelow(len as u64) as usize
    }

    /// `sample(range(n), k)`: `k` distinct values below `n` in the order drawn.
    pub fn sample_range(&mut self, n: usize, k: usize) -> Result<Vec<usize>, SampleTooLarge> {
        if k > n {
            return Err(SampleTooLarge { n, k });
        }
        let mut result = Vec::with_capacity(k);
        if (n as u128) <= sample_setsize(k) {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while selected.contains(&j) {
                    j = self.randbelow(n as u64) as usize;
                }
                selected.insert(j);
                result.push(j);
            }
        }
        Ok(result)
    }
}

/// `random.sample`'s `setsize`: the pool branch runs when `n <= setsize`. The exponent is computed as
/// CPython does, `math.ceil(math.log(k * 3, 4))` = `ceil(log(3k) / log(4))` in doubles.
fn sample_setsize(k: usize) -> u128 {
    let mut setsize = 21u128;
    if k > 5 {
        let exponent = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
        setsize += 4u128.saturating_pow(exponent);
    }
    setsize
}

/// A CPython `set` of non-negative `int`s, for its iteration order: insertion, `discard` and
/// membership follow `Objects/setobject.c` (3.11; the same through 3.13): an 8-slot table, index
/// `hash & mask` with `hash(i) = i mod (2**61 - 1)`, 10 linear probes when they fit before the end of
/// the table, then `i = i*5 + 1 + perturb` with `perturb >>= 5`; deleted slots become dummies reused
/// by a later insertion that passes them; the table grows to the smallest power of two above
/// `4 * used` (`2 * used` past 50 000) once `fill * 5 >= mask * 3`, re-inserting in table order.
#[derive(Debug, Clone)]
pub struct IntSet {
    table: Vec<Slot>,
    fill: usize,
    used: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Empty,
    Dummy,
    Key(u64),
}

const LINEAR_PROBES: usize = 9;
const PERTURB_SHIFT: u32 = 5;
const MIN_SIZE: usize = 8;

/// `hash(int)` of a non-negative int on a 64-bit CPython.
fn py_hash(key: u64) -> u64 {
    key % ((1 << 61) - 1)
}

impl Default for IntSet {
    fn default() -> Self {
        Self::new()
    }
}

impl IntSet {
    /// `set()`.
    pub fn new() -> Self {
        Self { table: vec![Slot::Empty; MIN_SIZE], fill: 0, used: 0 }
    }

    /// `set(values)` from a list: the values added one by one, in order.
    pub fn from_values(values: impl IntoIterator<Item = u64>) -> Self {
        let mut s = Self::new();
        for v in values {
            s.add(v);
        }
        s
    }

    fn mask(&self) -> usize {
        self.table.len() - 1
    }

    /// Number of elements (`len(s)`).
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Slot of `key`, or `Err(first empty slot reached)`, with the last dummy passed on the way.
    fn probe(&self, key: u64) -> (Result<usize, usize>, Option<usize>) {
        let hash = py_hash(key);
        let mask = self.mask();
        let mut perturb = hash as usize;
        let mut i = hash as usize & mask;
        let mut freeslot = None;
        loop {
            let probes = if i + LINEAR_PROBES <= mask { LINEAR_PROBES } else { 0 };
            for at in i..=i + probes {
                match self.table[at] {
                    Slot::Empty => return (Err(at), freeslot),
                    Slot::Key(k) if k == key => return (Ok(at), freeslot),
                    Slot::Dummy => freeslot = Some(at),
                    Slot::Key(_) => {}
                }
            }
            perturb >>= PERTURB_SHIFT;
            i = (i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb)) & mask;
        }
    }

    /// `key in s`.
    pub fn contains(&self, key: u64) -> bool {
        self.probe(key).0.is_ok()
    }

    /// `s.add(key)`.
    pub fn add(&mut self, key: u64) {
        match self.probe(key) {
            (Ok(_), _) => {}
            (Err(_), Some(dummy)) => {
                self.table[dummy] = Slot::Key(key);
                self.used += 1;
            }
            (Err(empty), None) => {
                self.table[empty] = Slot::Key(key);
                self.fill += 1;
                self.used += 1;
                if self.fill * 5 >= self.mask() * 3 {
                    self.resize(if self.used > 50_000 { self.used * 2 } else { self.used * 4 });
                }
            }
        }
    }

    /// `s.discard(key)`; returns whether it was there (`s.remove` raises `KeyError` otherwise).
    pub fn discard(&mut self, key: u64) -> bool {
        match self.probe(key).0 {
            Ok(at) => {
                self.table[at] = Slot::Dummy;
                self.used -= 1;
                true
            }
            Err(_) => false,
        }
    }

    /// `set_table_resize(minused)`.
    fn resize(&mut self, minused: usize) {
        let mut size = MIN_SIZE;
        while size <= minused {
            size <<= 1;
        }
        let old = std::mem::replace(&mut self.table, vec![Slot::Empty; size]);
        self.fill = self.used;
        let mask = size - 1;
        for slot in old {
            if let Slot::Key(key) = slot {
                let hash = py_hash(key);
                let mut perturb = hash as usize;
                let mut i = hash as usize & mask;
                let at = 'found: loop {
                    let probes = if i + LINEAR_PROBES <= mask { LINEAR_PROBES } else { 0 };
                    for at in i..=i + probes {
                        if self.table[at] == Slot::Empty {
                            break 'found at;
                        }
                    }
                    perturb >>= PERTURB_SHIFT;
                    i = (i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb)) & mask;
                };
                self.table[at] = Slot::Key(key);
            }
        }
    }

    /// The elements in CPython's iteration order (`list(s)`).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().filter_map(|s| match s {
            Slot::Key(k) => Some(*k),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every expected number below was printed by CPython 3.11.7 (`~/.cache/icl/venv/bin/python`),
    // e.g. `r = random.Random(1234); [r.getrandbits(32) for _ in range(6)]`, and pasted here.

    #[test]
    fn getrandbits_32_matches_cpython() {
        let mut r = Random::new(1234);
        let got: Vec<u32> = (0..6).map(|_| r.next_u32()).collect();
        assert_eq!(got, [4150886329, 3342196574, 1892932127, 501869158, 32175636, 389311301]);
        let mut r = Random::new(0);
        assert_eq!((0..3).map(|_| r.next_u32()).collect::<Vec<_>>(), [3626764237, 1654615998, 3255389356]);
    }

    #[test]
    fn past_the_first_624_words() {
        // r = random.Random(1234); [r.getrandbits(32) for _ in range(1000)]; then two more.
        let mut r = Random::new(1234);
        for _ in 0..1000 {
            r.next_u32();
        }
        assert_eq!([r.next_u32(), r.next_u32()], [3260923217, 1051748857]);
    }

    #[test]
    fn random_matches_cpython() {
        // random.Random(0).random(), twice
        let mut r = Random::new(0);
        assert_eq!(r.random(), 0.8444218515250481);
        assert_eq!(r.random(), 0.7579544029403025);
    }

    #[test]
    fn negative_and_large_seeds() {
        // Random(-1234) is Random(1234); Random(2**64 + 5) and Random(2**100 - 1) use 3 and 4 key words.
        let first3 = |mut r: Random| (0..3).map(|_| r.next_u32()).collect::<Vec<_>>();
        assert_eq!(first3(Random::new(-1234)), [4150886329, 3342196574, 1892932127]);
        assert_eq!(first3(Random::new((1i128 << 64) + 5)), [2192917427, 3085273184, 3778534651]);
        assert_eq!(first3(Random::new((1i128 << 100) - 1)), [441499747, 3088945834, 1993223297]);
        assert_eq!(first3(Random::from_words(&[5, 0, 1])), [2192917427, 3085273184, 3778534651]);
    }

    #[test]
    fn getrandbits_of_other_widths() {
        // r = random.Random(1234); [r.getrandbits(k) for k in (1, 7, 31, 33, 48, 64)]
        let mut r = Random::new(1234);
        let got: Vec<u64> = [1, 7, 31, 33, 48, 64].iter().map(|&k| r.getrandbits(k)).collect();
        assert_eq!(got, [1, 99, 946466063, 501869158, 256414231849797, 17326454776888161602]);
    }

    #[test]
    fn randbelow_choice_and_sample() {
        // r = random.Random(1234); [r._randbelow(n) for n in (1, 2, 3, 10, 1000, 2**40 + 7)]
        let mut r = Random::new(1234);
        let got: Vec<u64> = [1, 2, 3, 10, 1000, (1 << 40) + 7].iter().map(|&n| r.randbelow(n)).collect();
        assert_eq!(got, [0, 0, 0, 1, 932, 183365414236]);
        // random.Random(42).sample(range(10), 5): the pool branch (10 <= setsize 21)
        assert_eq!(Random::new(42).sample_range(10, 5).unwrap(), [1, 0, 4, 9, 6]);
        // random.Random(42).sample(range(1000), 5): the set branch
        assert_eq!(Random::new(42).sample_range(1000, 5).unwrap(), [654, 114, 25, 759, 281]);
        // r = random.Random(42); [r.choice(range(7)) for _ in range(5)]
        let mut r = Random::new(42);
        assert_eq!((0..5).map(|_| r.choice_index(7)).collect::<Vec<_>>(), [5, 0, 0, 5, 2]);
        assert_eq!(Random::new(1).sample_range(3, 4), Err(SampleTooLarge { n: 3, k: 4 }));
        assert_eq!(Random::new(1).sample_range(0, 0), Ok(vec![]));
    }

    #[test]
    fn setsize_rule() {
        assert_eq!(sample_setsize(0), 21);
        assert_eq!(sample_setsize(5), 21);
        assert_eq!(sample_setsize(6), 21 + 64); // ceil(log4(18)) = 3
        assert_eq!(sample_setsize(21), 21 + 64); // log4(63) < 3
        assert_eq!(sample_setsize(22), 21 + 256);
    }

    #[test]
    fn set_iteration_order_matches_cpython() {
        // list(set([17, 1, 9, 25, 33, 8]))
        let s = IntSet::from_values([17, 1, 9, 25, 33, 8]);
        assert_eq!(s.iter().collect::<Vec<_>>(), [33, 1, 8, 9, 17, 25]);
        // s = set(range(100, 0, -7)); s.remove(37); s.add(3); list(s)
        let mut s = IntSet::from_values((1..=100).rev().step_by(7));
        assert!(s.discard(37));
        assert!(!s.discard(37));
        s.add(3);
        s.add(2);
        assert_eq!(s.iter().collect::<Vec<_>>(), [65, 2, 3, 100, 72, 9, 44, 79, 16, 51, 86, 23, 58, 93, 30]);
        assert_eq!(s.len(), 15);
        assert!(s.contains(93) && !s.contains(37));
    }

    #[test]
    fn set_reuses_dummies_it_passes() {
        let list = |s: &IntSet| s.iter().collect::<Vec<_>>();
        // s = set([1, 9, 17, 25]); s.remove(9); s.add(33); list(s)
        let mut s = IntSet::from_values([1, 9, 17, 25]);
        s.discard(9);
        s.add(33);
        assert_eq!(list(&s), [1, 33, 17, 25]);
        // s = set([0, 8, 16]); s.remove(8); s.add(24); list(s)
        let mut s = IntSet::from_values([0, 8, 16]);
        s.discard(8);
        s.add(24);
        assert_eq!(list(&s), [0, 24, 16]);
        // s = set([5, 13]); s.remove(5); then add 21, 29, 37, 45 (the last one resizes): list(s)
        let mut s = IntSet::from_values([5, 13]);
        s.discard(5);
        for v in [21, 29, 37, 45] {
            s.add(v);
        }
        assert_eq!(list(&s), [37, 45, 13, 21, 29]);
        // list(set([2**61 - 1 + 3, 2**61 + 10, 5, 2**62])): hashes reduced mod 2**61 - 1
        let s = IntSet::from_values([(1 << 61) + 2, (1 << 61) + 10, 5, 1 << 62]);
        assert_eq!(list(&s), [2305843009213693962, 4611686018427387904, 2305843009213693954, 5]);
    }

    /// `sum(i * v for i, v in enumerate(list(s))) % 2**64`, a fingerprint of the order.
    fn fingerprint(s: &IntSet) -> u64 {
        s.iter().enumerate().fold(0u64, |acc, (i, v)| acc.wrapping_add((i as u64).wrapping_mul(v)))
    }

    #[test]
    fn large_sets_with_deletions_and_growth() {
        // r = random.Random(7); vals = [r.randrange(10**6) for _ in range(300)]; s = set(vals)
        // for v in vals[::3]: s.discard(v)
        // for v in range(50): s.add(v * 64)
        // l = list(s); len(l), fingerprint, l[:5]  ->  250 12239517826 [0, 439297, 1024, 73731, 2048]
        let mut r = Random::new(7);
        let vals: Vec<u64> = (0..300).map(|_| r.randbelow(1_000_000)).collect();
        let mut s = IntSet::from_values(vals.iter().copied());
        for &v in vals.iter().step_by(3) {
            s.discard(v);
        }
        for v in 0..50 {
            s.add(v * 64);
        }
        assert_eq!(s.len(), 250);
        assert_eq!(s.iter().take(5).collect::<Vec<_>>(), [0, 439297, 1024, 73731, 2048]);
        assert_eq!(fingerprint(&s), 12239517826);
        // s = set(range(200000)); discard the even ones; add 3*v for v in range(200000, 260000)
        // -> 160000 5465418935730131 [1, 3, 5, 7, 9]  (past the 50 000 growth rule)
        let mut s = IntSet::from_values(0..200_000);
        for v in (0..200_000).step_by(2) {
            s.discard(v);
        }
        for v in 200_000..260_000 {
            s.add(v * 3);
        }
        assert_eq!(s.len(), 160_000);
        assert_eq!(s.iter().take(5).collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
        assert_eq!(fingerprint(&s), 5465418935730131);
    }
}
