//! Mutation fuzzing of every reader that takes a file from the user: task JSONL, `config.json`,
//! `tokenizer.json`, Parquet task files, safetensors checkpoints and GGUF files. Valid files are mutated (bit flips, interesting
//! bytes, truncation, duplicated, inserted and deleted spans) and fed to the reader; an error is fine,
//! a panic fails the test and saves the input for reproduction.
//!
//! Each reader runs for `ICL_FUZZ_SECONDS` (default 3) from a fixed seed (`ICL_FUZZ_SEED`), so a CI run
//! is bounded and a failure reproduces.

mod common;

use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

fn budget() -> Duration {
    let seconds = std::env::var("ICL_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(seconds)
}

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\"{}[]:,-0123456789eE.\n\\ ";

/// One to four random edits of `seed`, mostly within its first `focus` bytes (where headers live).
fn mutate(rng: &mut Rng, seed: &[u8], focus: usize) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = focus.min(data.len()).max(1);
        let at = rng.below(span);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = at.min(data.len() - 1);
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => data.truncate(at),
            3 => {
                let len = rng.below(64).min(data.len().saturating_sub(at));
                let copy = data[at..at + len].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
            4 => {
                let bytes: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                let to = at.min(data.len());
                data.splice(to..to, bytes);
            }
            5 => {
                let len = rng.below(64).min(data.len().saturating_sub(at));
                data.drain(at..at + len);
            }
            _ => {
                // A large decimal number where a digit was: sizes, offsets and indices.
                if let Some(i) = data.iter().skip(at).position(u8::is_ascii_digit) {
                    data.splice(at + i..at + i + 1, b"18446744073709551615".iter().copied());
                }
            }
        }
    }
    data
}

/// Runs `read` on mutations of `seed` written to `path` until the time budget is spent.
fn fuzz(name: &str, seed: &[u8], focus: usize, path: &Path, mut read: impl FnMut(&Path)) -> usize {
    let seed_value = std::env::var("ICL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1c1_f022u64);
    let mut rng = Rng(seed_value ^ name.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed() < budget() {
        let input = mutate(&mut rng, seed, focus);
        std::fs::write(path, &input).expect("write input");
        if catch_unwind(AssertUnwindSafe(|| read(path))).is_err() {
            let keep = std::env::temp_dir().join(format!("icl-fuzz-{name}-crash"));
            std::fs::write(&keep, &input).expect("save crash");
            panic!("{name}: the reader panicked on input saved to {} (run {runs})", keep.display());
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} mutated inputs, no panic");
    runs
}

#[test]
fn task_jsonl_reader_never_panics() {
    let text = std::fs::read_to_string(data_dir().join("hellaswag.jsonl")).expect("hellaswag");
    let mut seed: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    let lm = std::fs::read_to_string(data_dir().join("lambada_openai.jsonl")).expect("lambada");
    seed.push_str(lm.lines().next().expect("a row"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let runs = fuzz("task-jsonl", seed.as_bytes(), seed.len(), &tmp.path().join("task.jsonl"), |p| {
        let _ = icl_data::read_task("t", p, &icl_data::ReadOptions::default());
    });
    assert!(runs > 10);
}

#[test]
fn generation_task_reader_and_prompts_never_panic() {
    let text = std::fs::read_to_string(data_dir().join("triviaqa_small.jsonl")).expect("triviaqa");
    let seed: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = icl_data::PromptOptions { num_fewshot: 2, ..Default::default() };
    let runs = fuzz("generation-jsonl", seed.as_bytes(), seed.len(), &tmp.path().join("qa.jsonl"), |p| {
        if let Ok(task) = icl_data::read_task("t", p, &icl_data::ReadOptions::default()) {
            let _ = icl_data::prompts(&task, &options, None).expect("2-shot icl prompts");
        }
    });
    assert!(runs > 10);
}

#[test]
fn config_reader_never_panics() {
    let tiny = models_dir().join("gpt-neo-tiny");
    let seed = std::fs::read(tiny.join("config.json")).expect("config");
    let tmp = tempfile::tempdir().expect("tempdir");
    let runs = fuzz("config-json", &seed, seed.len(), &tmp.path().join("config.json"), |p| {
        let _ = icl_models::ModelSpec::read(p.parent().expect("dir"));
    });
    assert!(runs > 10);
}

#[test]
fn tokenizer_reader_never_panics() {
    let tiny = models_dir().join("gpt-neo-tiny");
    let seed = std::fs::read(tiny.join("tokenizer.json")).expect("tokenizer");
    let tmp = tempfile::tempdir().expect("tempdir");
    // The header (model type, pre-tokenizer, added tokens) is where structure lives; the rest is vocab.
    let runs = fuzz("tokenizer-json", &seed, 4096, &tmp.path().join("tokenizer.json"), |p| {
        if let Ok(tok) = icl_data::Tokenizer::from_file(p) {
            let _ = tok.encode("Hello world, 🎉 ünïcödé");
        }
    });
    assert!(runs > 3);
}

#[test]
fn safetensors_loader_never_panics() {
    let tiny = models_dir().join("gpt-neo-tiny");
    let seed = std::fs::read(tiny.join("model.safetensors")).expect("weights");
    let header_len = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) as usize;
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(tiny.join("config.json"), tmp.path().join("config.json")).expect("config");
    let spec = icl_models::ModelSpec::read(tmp.path()).expect("spec");
    let runs = fuzz("safetensors", &seed, 8 + header_len, &tmp.path().join("model.safetensors"), |_| {
        let _ = spec.load(icl_models::Dtype::F32, tch::Device::Cpu);
    });
    assert!(runs > 3);
}

/// A small GGUF v3 file written by hand: metadata of several types (a string array among them) and
/// one tensor each of F32, Q8_0 and Q4_1, aligned as llama.cpp aligns them.
fn small_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&3u64.to_le_bytes()); // tensors
    out.extend_from_slice(&4u64.to_le_bytes()); // metadata pairs
    string(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, "general.alignment");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&32u32.to_le_bytes());
    string(&mut out, "llama.rope.freq_base");
    out.extend_from_slice(&6u32.to_le_bytes());
    out.extend_from_slice(&10000f32.to_le_bytes());
    string(&mut out, "tokenizer.ggml.tokens");
    out.extend_from_slice(&9u32.to_le_bytes());
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&3u64.to_le_bytes());
    for t in ["<s>", "a", "Ġb"] {
        string(&mut out, t);
    }
    // (name, ggml dims, type, bytes): F32 = 0, Q4_1 = 3, Q8_0 = 8.
    let f32_data: Vec<u8> = (0..32).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let mut q8 = Vec::new();
    for block in 0..2u8 {
        q8.extend_from_slice(&[0x00, 0x3c]); // f16 1.0
        q8.extend((0..32).map(|i| (i as i8 - 16 + block as i8) as u8));
    }
    let mut q4 = vec![0x00, 0x38, 0x00, 0xbc]; // d = 0.5, m = -1.0
    q4.extend((0..16).map(|i| (i as u8) | ((15 - i as u8) << 4)));
    let tensors: [(&str, Vec<u64>, u32, Vec<u8>); 3] = [
        ("token_embd.weight", vec![4, 8], 0, f32_data),
        ("blk.0.attn_q.weight", vec![32, 2], 8, q8),
        ("output_norm.weight", vec![32], 3, q4),
    ];
    let mut offset = 0u64;
    let mut data = Vec::new();
    for (name, dims, ty, bytes) in &tensors {
        string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        data.extend_from_slice(bytes);
        data.resize(data.len().next_multiple_of(32), 0);
        offset = data.len() as u64;
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend_from_slice(&data);
    out
}

#[test]
fn gguf_reader_never_panics() {
    let seed = small_gguf();
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("model.gguf");
    std::fs::write(&path, &seed).expect("write");
    // The seed itself must be valid, or the fuzzing would only exercise the first check.
    let file = icl_models::gguf::GgufFile::open(&path).expect("the seed GGUF is valid");
    for info in file.tensors() {
        file.dequantize(info).expect("dequantize the seed");
    }
    let runs = fuzz("gguf", &seed, seed.len(), &path, |p| {
        if let Ok(file) = icl_models::gguf::GgufFile::open(p) {
            let _ = file.llama_params();
            for info in file.tensors() {
                let _ = file.dequantize(info);
            }
        }
    });
    assert!(runs > 10);
}

#[test]
fn parquet_task_reader_never_panics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let jsonl = tmp.path().join("mc.jsonl");
    let rows: String = std::fs::read_to_string(data_dir().join("piqa.jsonl"))
        .expect("piqa")
        .lines()
        .take(4)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&jsonl, rows).expect("write");
    let seed_path = tmp.path().join("seed.parquet");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_icl"))
        .args(["convert", "--type", "multiple_choice", "--input"])
        .arg(&jsonl)
        .arg("--output")
        .arg(&seed_path)
        .output()
        .expect("run icl convert");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seed = std::fs::read(&seed_path).expect("seed");
    let path = tmp.path().join("task.parquet");
    std::fs::write(&path, &seed).expect("write");
    let task =
        icl_data::read_task("t", &path, &icl_data::ReadOptions::default()).expect("the seed Parquet file is valid");
    assert_eq!(task.len(), 4);
    let runs = fuzz("parquet", &seed, seed.len(), &path, |p| {
        let _ = icl_data::read_task("t", p, &icl_data::ReadOptions::default());
    });
    assert!(runs > 10);
}
