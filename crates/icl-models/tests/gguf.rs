//! The GGUF reader on small files written here: every metadata type, each supported tensor type
//! against a dequantization written out in this file, the Llama name mapping and q/k un-permutation,
//! and malformed files (truncated at every byte, bad magic and versions, oversized counts, lengths and
//! shapes, out-of-range offsets, unsupported types, random corruption), which must give errors, never
//! panics.

use icl_models::gguf::{GgmlType, GgufArray, GgufFile, GgufValue};
use icl_models::LlamaConfig;
use std::path::{Path, PathBuf};

/// Deterministic pseudo-random bytes (64-bit LCG, high bits).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A GGUF file under construction: metadata entries and tensors with their raw data.
struct Gguf {
    version: u32,
    alignment: u64,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl Gguf {
    fn new() -> Self {
        Self { version: 3, alignment: 32, kv: Vec::new(), tensors: Vec::new() }
    }
    fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        self.kv.push((key.to_owned(), ty, value));
        self
    }
    fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(self, key: &str, v: f32) -> Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn str(self, key: &str, v: &str) -> Self {
        self.kv(key, 8, string(v))
    }
    fn strings(self, key: &str, items: &[&str]) -> Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(string(s));
        }
        self.kv(key, 9, v)
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (key, ty, value) in &self.kv {
            out.extend(string(key));
            out.extend(ty.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        let pad = |out: &mut Vec<u8>| {
            out.resize((out.len() as u64).div_ceil(self.alignment) as usize * self.alignment as usize, 0)
        };
        pad(&mut out);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            pad(&mut out);
        }
        out
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_bytes(dir, name, &self.bytes())
    }
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write gguf");
    path
}

/// IEEE half to f32 from its fields, independent of the library's conversion.
fn f16_hand(bits: u16) -> f32 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    let v = match exp {
        0 => frac / 1024.0 * 2f64.powi(-14),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    };
    (sign * v) as f32
}

/// f16 bit patterns of finite scales of moderate size (exponent 10..20), so products stay normal.
fn scale(rng: &mut Rng) -> [u8; 2] {
    let bits = ((rng.next() as u16) & 0x83ff) | ((10 + (rng.next() % 10) as u16) << 10);
    bits.to_le_bytes()
}

fn le_f16(b: &[u8]) -> f32 {
    f16_hand(u16::from_le_bytes([b[0], b[1]]))
}

/// One tensor of each supported type, 2 rows x 64 columns, against the formulas of ggml's blocks.
#[test]
fn each_supported_type_dequantizes_as_ggml_defines_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(7);
    let n = 128usize;
    let mut cases: Vec<(&str, u32, Vec<u8>, Vec<f32>)> = Vec::new();

    let f32s: Vec<f32> = (0..n).map(|i| (i as f32 - 60.0) * 0.37 + 1e-3).collect();
    cases.push(("f32", 0, f32s.iter().flat_map(|v| v.to_le_bytes()).collect(), f32s.clone()));

    let halves: Vec<u16> = (0..n).map(|i| if i == 0 { 0x0001 } else { rng.next() as u16 & 0xfbff }).collect(); // finite, incl. a subnormal
    cases.push((
        "f16",
        1,
        halves.iter().flat_map(|v| v.to_le_bytes()).collect(),
        halves.iter().map(|&h| f16_hand(h)).collect(),
    ));

    let bf: Vec<u16> = (0..n).map(|_| (rng.next() as u16) & 0xbfff).collect();
    cases.push((
        "bf16",
        30,
        bf.iter().flat_map(|v| v.to_le_bytes()).collect(),
        bf.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect(),
    ));

    // Q8_0: {d: f16, q: [i8; 32]}, x = q * d.
    let mut raw = Vec::new();
    let mut want = Vec::new();
    for _ in 0..n / 32 {
        let d = scale(&mut rng);
        let q = rng.bytes(32);
        raw.extend(d);
        raw.extend(&q);
        want.extend(q.iter().map(|&b| f32::from(b as i8) * le_f16(&d)));
    }
    cases.push(("q8_0", 8, raw, want));

    // Q4_0: {d: f16, q: [u8; 16]}: element i < 16 is the low nibble of q[i], i >= 16 the high nibble of q[i - 16].
    let (mut raw, mut want) = (Vec::new(), Vec::new());
    for _ in 0..n / 32 {
        let d = scale(&mut rng);
        let q = rng.bytes(16);
        raw.extend(d);
        raw.extend(&q);
        for i in 0..32 {
            let nibble = if i < 16 { q[i] % 16 } else { q[i - 16] / 16 };
            want.push((f32::from(nibble) - 8.0) * le_f16(&d));
        }
    }
    cases.push(("q4_0", 2, raw, want));

    // Q4_1: {d: f16, m: f16, q: [u8; 16]}, x = nibble * d + m.
    let (mut raw, mut want) = (Vec::new(), Vec::new());
    for _ in 0..n / 32 {
        let (d, m) = (scale(&mut rng), scale(&mut rng));
        let q = rng.bytes(16);
        raw.extend(d);
        raw.extend(m);
        raw.extend(&q);
        for i in 0..32 {
            let nibble = if i < 16 { q[i] % 16 } else { q[i - 16] / 16 };
            want.push(f32::from(nibble) * le_f16(&d) + le_f16(&m));
        }
    }
    cases.push(("q4_1", 3, raw, want));

    let mut file = Gguf::new().str("general.architecture", "test");
    for (name, ty, raw, _) in &cases {
        file = file.tensor(name, &[64, 2], *ty, raw.clone());
    }
    let path = file.write(dir.path(), "types.gguf");
    let gguf = GgufFile::open(&path).expect("open");
    for (name, ty, _, want) in &cases {
        let info = gguf.tensor(name).expect("tensor");
        assert_eq!(info.ggml_type, GgmlType(*ty));
        assert_eq!(info.shape(), vec![2, 64], "{name}: row-major shape is dims reversed");
        let got = gguf.dequantize(info).expect("dequantize");
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{name}[{i}]: got {g}, want {w}");
        }
    }
}

#[test]
fn metadata_of_every_type_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nested = 9u32.to_le_bytes().to_vec(); // array of 2 arrays of i16
    nested.extend(2u64.to_le_bytes());
    for items in [&[1i16, -2][..], &[3][..]] {
        nested.extend(3u32.to_le_bytes());
        nested.extend((items.len() as u64).to_le_bytes());
        for v in items {
            nested.extend(v.to_le_bytes());
        }
    }
    let mut ints = 5u32.to_le_bytes().to_vec();
    ints.extend(3u64.to_le_bytes());
    for v in [3i32, -1, 7] {
        ints.extend(v.to_le_bytes());
    }
    let mut file = Gguf::new()
        .kv("u8", 0, vec![200])
        .kv("i8", 1, vec![0xfe])
        .kv("u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("i16", 3, (-300i16).to_le_bytes().to_vec())
        .u32("u32", 4_000_000_000)
        .kv("i32", 5, (-5i32).to_le_bytes().to_vec())
        .f32("f32", 0.25)
        .kv("bool", 7, vec![1])
        .str("string", "héllo")
        .strings("strings", &["a", "", "Ġt"])
        .kv("ints", 9, ints)
        .kv("nested", 9, nested)
        .kv("u64", 10, u64::MAX.to_le_bytes().to_vec())
        .kv("i64", 11, (-9i64).to_le_bytes().to_vec())
        .kv("f64", 12, 1e-300f64.to_le_bytes().to_vec());
    file.version = 2;
    let path = file.write(dir.path(), "meta.gguf");
    let g = GgufFile::open(&path).expect("open");
    assert_eq!(g.version(), 2);
    assert_eq!(g.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(g.get("u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(g.get("i16"), Some(&GgufValue::I16(-300)));
    assert_eq!(g.meta_u64("u32").expect("u32"), Some(4_000_000_000));
    assert_eq!(g.get("i32"), Some(&GgufValue::I32(-5)));
    assert_eq!(g.meta_f64("f32").expect("f32"), Some(0.25));
    assert_eq!(g.meta_bool("bool").expect("bool"), Some(true));
    assert_eq!(g.meta_str("string").expect("string"), Some("héllo"));
    assert_eq!(
        g.meta_strings("strings").expect("strings"),
        Some(&["a".to_owned(), String::new(), "Ġt".to_owned()][..])
    );
    assert_eq!(g.meta_ints("ints").expect("ints"), Some(vec![3, -1, 7]));
    assert_eq!(
        g.get("nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![GgufArray::I16(vec![1, -2]), GgufArray::I16(vec![3])])))
    );
    assert_eq!(g.meta_u64("u64").expect("u64"), Some(u64::MAX));
    assert_eq!(g.get("i64"), Some(&GgufValue::I64(-9)));
    assert_eq!(g.meta_f64("f64").expect("f64"), Some(1e-300));
    // Wrong types are errors naming the key, not silent defaults.
    let err = g.meta_u64("i64").expect_err("negative is not a u64").to_string();
    assert!(err.contains("metadata `i64`"), "{err}");
    let err = g.meta_str("u8").expect_err("not a string").to_string();
    assert!(err.contains("`u8`") && err.contains("expected a string"), "{err}");
    assert!(g.meta_strings("ints").is_err());
    assert_eq!(g.meta_str("absent").expect("absent is fine"), None);
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(dir.path(), "bad.gguf", bytes);
    let err = GgufFile::open(&path).expect_err("must be rejected").to_string();
    assert!(err.contains("bad.gguf"), "error must name the file: {err}");
    err
}

fn small_file() -> Gguf {
    Gguf::new()
        .str("general.architecture", "test")
        .strings("tokens", &["x", "yy"])
        .tensor("a", &[32, 2], 8, vec![0x11; 2 * 34])
        .tensor("b", &[4], 0, 1.5f32.to_le_bytes().repeat(4))
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_file().bytes();
    // The last tensor's data ends before the final padding: cutting only padding leaves a valid file.
    let data_end = bytes.len() - (32 - 16);
    for len in 0..data_end {
        let err = open_err(&bytes[..len]);
        assert!(
            err.contains("truncated") || err.contains("past the end") || err.contains("cannot fit"),
            "cut at {len}: {err}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    GgufFile::open(&write_bytes(dir.path(), "ok.gguf", &bytes[..data_end]))
        .expect("a file without trailing padding is valid");
}

#[test]
fn bad_magic_and_versions() {
    let mut bytes = small_file().bytes();
    bytes[0] = b'X';
    assert!(open_err(&bytes).contains("not a GGUF file"));
    for (version, expect) in
        [(1u32, "version 1 is not supported"), (4, "unsupported GGUF version 4"), (3u32.swap_bytes(), "big-endian")]
    {
        let mut bytes = small_file().bytes();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let err = open_err(&bytes);
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn oversized_counts_and_lengths_fail_before_allocating() {
    // Header counts.
    let mut bytes = small_file().bytes();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&bytes).contains("tensor count"));
    let mut bytes = small_file().bytes();
    bytes[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(open_err(&bytes).contains("metadata count"));
    // An array claiming 2^60 strings, and a string claiming 2^62 bytes.
    let mut huge = 8u32.to_le_bytes().to_vec();
    huge.extend((1u64 << 60).to_le_bytes());
    let err = open_err(&Gguf::new().kv("tokens", 9, huge).bytes());
    assert!(err.contains("`tokens`") && err.contains("cannot fit"), "{err}");
    let mut long = (1u64 << 62).to_le_bytes().to_vec();
    long.extend(b"abc");
    let err = open_err(&Gguf::new().kv("name", 8, long).bytes());
    assert!(err.contains("`name`") && err.contains("truncated"), "{err}");
    // Arrays nested past the limit.
    let mut deep = Vec::new();
    for _ in 0..100 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(0u32.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    assert!(open_err(&Gguf::new().kv("deep", 9, deep).bytes()).contains("nested"));
    // Unknown value type, invalid bool, duplicate key.
    assert!(open_err(&Gguf::new().kv("x", 13, vec![0; 8]).bytes()).contains("unknown value type 13"));
    assert!(open_err(&Gguf::new().kv("x", 7, vec![2]).bytes()).contains("bool byte is 2"));
    assert!(open_err(&Gguf::new().u32("x", 1).u32("x", 2).bytes()).contains("appears twice"));
}

#[test]
fn tensor_directory_is_checked_against_the_file() {
    let f32_data = |n: usize| vec![0u8; 4 * n];
    let cases: Vec<(Gguf, &str)> = vec![
        // Shape whose element count overflows, and one that fits u64 but not the file.
        (Gguf::new().tensor("t", &[u64::MAX / 2, 4], 0, f32_data(4)), "invalid shape"),
        (Gguf::new().tensor("t", &[1 << 20, 1 << 20], 0, f32_data(4)), "past the end of the file"),
        (Gguf::new().tensor("t", &[4, 0], 0, f32_data(4)), "invalid shape"),
        (Gguf::new().tensor("t", &[1, 1, 1, 1, 1], 0, f32_data(1)), "5 dimensions"),
        (Gguf::new().tensor("t", &[48], 8, vec![0; 34 * 2]), "not a multiple of the Q8_0 block size 32"),
        (Gguf::new().tensor("t", &[4], 0, f32_data(4)).tensor("t", &[4], 0, f32_data(4)), "appears twice"),
        (Gguf::new().kv("general.alignment", 4, 24u32.to_le_bytes().to_vec()), "power-of-two"),
    ];
    for (file, expect) in cases {
        let err = open_err(&file.bytes());
        assert!(err.contains(expect), "expected `{expect}`: {err}");
    }
    // Offsets: misaligned, and pointing past the end.
    let file = Gguf::new().tensor("t", &[4], 0, f32_data(4));
    let bytes = file.bytes();
    let offset_at = 24 + 8 + 1 + 4 + 8 + 4; // header, name, n_dims, one dim, type
    for (offset, expect) in [(4u64, "not a multiple of the alignment"), (1 << 40, "past the end")] {
        let mut b = bytes.clone();
        b[offset_at..offset_at + 8].copy_from_slice(&offset.to_le_bytes());
        let err = open_err(&b);
        assert!(err.contains(expect) && err.contains("`t`"), "{err}");
    }
}

#[test]
fn unsupported_types_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = Gguf::new()
        .tensor("blk.0.ffn_down.weight", &[256], 12, vec![0; 144]) // Q4_K: size known, not decoded
        .tensor("odd", &[8], 5, vec![0; 8]) // id 5: no ggml type
        .write(dir.path(), "types.gguf");
    let g = GgufFile::open(&path).expect("directory is valid");
    let err = g.dequantize(g.tensor("blk.0.ffn_down.weight").expect("t")).expect_err("Q4_K").to_string();
    assert!(err.contains("unsupported quantization type Q4_K for tensor blk.0.ffn_down.weight"), "{err}");
    let err = g.dequantize(g.tensor("odd").expect("t")).expect_err("type 5").to_string();
    assert!(err.contains("unsupported quantization type unknown type 5 for tensor odd"), "{err}");
}

#[test]
fn random_corruption_never_panics() {
    let good = small_file().bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(99);
    let mut rejected = 0;
    for i in 0..1500 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % bytes.len();
            bytes[at] = rng.next() as u8;
        }
        let path = write_bytes(dir.path(), &format!("c{}.gguf", i % 8), &bytes);
        match GgufFile::open(&path) {
            Err(_) => rejected += 1,
            Ok(g) => {
                for t in g.tensors() {
                    let _ = g.dequantize(t);
                }
            }
        }
    }
    assert!(rejected > 100, "corruption should often be detected ({rejected} of 1500)");
}

/// A Llama file with 2 layers, 4 heads of size 4 (2 key-value heads), all f32, tensor values
/// counting up so every element is distinguishable.
fn llama(n_layers: usize, with_output: bool) -> Gguf {
    let (hidden, heads, kv_heads, ffn, vocab) = (16u64, 4u32, 2u32, 24u64, 10u64);
    let head_dim = hidden / u64::from(heads);
    let mut file = Gguf::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", n_layers as u32)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", hidden as u32)
        .u32("llama.feed_forward_length", ffn as u32)
        .u32("llama.attention.head_count", heads)
        .u32("llama.attention.head_count_kv", kv_heads)
        .f32("llama.rope.freq_base", 5000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-6)
        .u32("llama.rope.dimension_count", head_dim as u32)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2);
    let mut next = 0f32;
    let mut tensor = |file: Gguf, name: &str, dims: &[u64]| {
        let n: u64 = dims.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                next += 1.0;
                next.to_le_bytes()
            })
            .collect();
        file.tensor(name, dims, 0, data)
    };
    file = tensor(file, "token_embd.weight", &[hidden, vocab]);
    for l in 0..n_layers {
        let kv = head_dim * u64::from(kv_heads);
        file = tensor(file, &format!("blk.{l}.attn_norm.weight"), &[hidden]);
        file = tensor(file, &format!("blk.{l}.attn_q.weight"), &[hidden, hidden]);
        file = tensor(file, &format!("blk.{l}.attn_k.weight"), &[hidden, kv]);
        file = tensor(file, &format!("blk.{l}.attn_v.weight"), &[hidden, kv]);
        file = tensor(file, &format!("blk.{l}.attn_output.weight"), &[hidden, hidden]);
        file = tensor(file, &format!("blk.{l}.ffn_norm.weight"), &[hidden]);
        file = tensor(file, &format!("blk.{l}.ffn_gate.weight"), &[hidden, ffn]);
        file = tensor(file, &format!("blk.{l}.ffn_up.weight"), &[hidden, ffn]);
        file = tensor(file, &format!("blk.{l}.ffn_down.weight"), &[ffn, hidden]);
    }
    file = tensor(file, "output_norm.weight", &[hidden]);
    if with_output {
        file = tensor(file, "output.weight", &[hidden, vocab]);
    }
    file
}

#[test]
fn llama_params_names_and_unpermuted_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GgufFile::open(&llama(2, false).write(dir.path(), "llama.gguf")).expect("open");
    let p = g.llama_params().expect("params");
    assert_eq!(
        (p.num_hidden_layers, p.hidden_size, p.intermediate_size, p.num_attention_heads, p.kv_heads(), p.head_dim()),
        (2, 16, 24, 4, 2, 4)
    );
    assert_eq!((p.vocab_size, p.max_position_embeddings, p.rope_theta), (10, 64, 5000.0));
    assert!((p.rms_norm_eps - 1e-6).abs() < 1e-12);
    assert!(p.tie_word_embeddings);
    assert_eq!((p.bos_token_id, p.eos_token_id, p.pad_token_id), (Some(1), Some(2), None));
    // Serialized, the config is the converted folder's config.json: every size written, absent token ids
    // as null (transformers defaults missing ones to 1 and 2), other absent options and private fields
    // left out, and it reads back as itself.
    let json = serde_json::to_value(&p).expect("serialize");
    assert_eq!(
        (json["model_type"].as_str(), json["num_key_value_heads"].as_i64(), json["head_dim"].as_i64()),
        (Some("llama"), Some(2), Some(4))
    );
    assert_eq!(json["rope_parameters"], serde_json::json!({"rope_type": "default", "rope_theta": 5000.0}));
    assert_eq!(json.get("pad_token_id"), Some(&serde_json::Value::Null));
    for absent in ["rope", "rope_scaling", "sliding_window", "torch_dtype"] {
        assert!(json.get(absent).is_none(), "{absent}: {json}");
    }
    let back: LlamaConfig = serde_json::from_value(json.clone()).expect("deserialize");
    assert_eq!(serde_json::to_value(&back).expect("serialize"), json);
    let plan = g.llama_plan(&p).expect("plan");
    assert_eq!(plan.len(), 2 + 2 * 9);
    let find = |n: &str| plan.iter().find(|t| t.hf_name == n).unwrap_or_else(|| panic!("{n} planned"));
    assert_eq!(find("model.layers.1.self_attn.k_proj.weight").shape, vec![8, 16]);
    assert_eq!(find("model.layers.0.mlp.down_proj.weight").shape, vec![16, 24]);

    // v is copied as stored; q and k rows are un-interleaved within each head (head size 4: file rows
    // 0,1,2,3 are Hugging Face rows 0,2,1,3).
    for (hf, gguf, rows) in [
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", None),
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", Some(16)),
        ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", Some(8)),
    ] {
        let got = g.read_llama_tensor(find(hf)).expect("read");
        let raw = g.dequantize(g.tensor(gguf).expect("t")).expect("raw");
        let Some(rows) = rows else {
            assert_eq!(got, raw);
            continue;
        };
        for r in 0..rows {
            let head = r / 4;
            let file_row = head * 4 + [0, 2, 1, 3][r % 4];
            assert_eq!(got[r * 16..(r + 1) * 16], raw[file_row * 16..(file_row + 1) * 16], "{hf} row {r}");
        }
    }
    let untied = GgufFile::open(&llama(1, true).write(dir.path(), "untied.gguf")).expect("open");
    assert!(!untied.llama_params().expect("params").tie_word_embeddings);
}

#[test]
fn llama_plan_errors_name_the_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A layer the metadata does not count, a tensor outside the architecture, a missing one, a wrong shape.
    let mut extra = llama(2, false);
    extra.kv.retain(|(k, _, _)| k != "llama.block_count");
    let extra = extra.u32("llama.block_count", 1);
    let unknown = llama(1, false).tensor("blk.0.attn_q.bias", &[16], 0, vec![0; 64]);
    let mut missing = llama(1, false);
    missing.tensors.retain(|(n, ..)| n != "blk.0.ffn_up.weight");
    let mut wrong = llama(1, false);
    for t in &mut wrong.tensors {
        if t.0 == "blk.0.attn_k.weight" {
            t.1 = vec![16, 16];
            t.3 = vec![0; 16 * 16 * 4];
        }
    }
    for (file, tensor, expect) in [
        (extra, "blk.1.attn_norm.weight", "beyond llama.block_count"),
        (unknown, "blk.0.attn_q.bias", "not a tensor of the Llama architecture"),
        (missing, "blk.0.ffn_up.weight", "missing"),
        (wrong, "blk.0.attn_k.weight", "shape [16, 16]"),
    ] {
        let g = GgufFile::open(&file.write(dir.path(), "x.gguf")).expect("valid file");
        let err = g.llama_params().and_then(|p| g.llama_plan(&p)).expect_err(expect).to_string();
        assert!(err.contains(tensor) && err.contains(expect), "{err}");
    }
    let mut other = llama(1, false);
    other.kv[0] = ("general.architecture".into(), 8, string("gpt2"));
    let g = GgufFile::open(&other.write(dir.path(), "other.gguf")).expect("valid file");
    let err = g.llama_params().expect_err("not llama").to_string();
    assert!(err.contains("unsupported architecture `gpt2`"), "{err}");
}

#[test]
fn config_token_ids_the_model_does_not_read_never_stop_a_config_loading() {
    // bos/pad ids (written for transformers by the GGUF import) as configs in the wild spell them.
    let base = r#""vocab_size": 10, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 4"#;
    for (ids, want) in [
        (r#""bos_token_id": 1, "pad_token_id": null"#, (Some(1), None)),
        (r#""bos_token_id": [3, 4], "pad_token_id": -1"#, (Some(3), None)),
        (r#""bos_token_id": "<s>", "pad_token_id": [-1]"#, (None, None)),
    ] {
        let c: LlamaConfig = serde_json::from_str(&format!("{{{base}, {ids}}}")).expect(ids);
        assert_eq!((c.bos_token_id, c.pad_token_id), want, "{ids}");
    }
}
