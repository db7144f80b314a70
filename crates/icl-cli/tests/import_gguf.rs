//! `icl import-gguf`: on a small Llama GGUF written here (names, shapes, un-permuted q/k rows, config,
//! tokenizer, bf16, atomic output and errors), and on the real SmolLM2-135M-Instruct Q4_1 file against
//! transformers' own GGUF loader (`scripts/gguf_reference.py`, run by `cargo xtask setup`): every
//! tensor, the config and the token ids of the first 2000 LAMBADA and PIQA contexts.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn icl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_icl"))
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A GGUF v3 file: metadata as (key, type, encoded value), tensors as (name, ggml dims, type, data).
#[derive(Default)]
struct Gguf {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Gguf {
    fn u32(mut self, key: &str, v: u32) -> Self {
        self.kv.push((key.into(), 4, v.to_le_bytes().to_vec()));
        self
    }
    fn f32(mut self, key: &str, v: f32) -> Self {
        self.kv.push((key.into(), 6, v.to_le_bytes().to_vec()));
        self
    }
    fn bool(mut self, key: &str, v: bool) -> Self {
        self.kv.push((key.into(), 7, vec![u8::from(v)]));
        self
    }
    fn str(mut self, key: &str, v: &str) -> Self {
        self.kv.push((key.into(), 8, string(v)));
        self
    }
    fn strings(mut self, key: &str, items: &[String]) -> Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|s| v.extend(string(s)));
        self.kv.push((key.into(), 9, v));
        self
    }
    fn i32s(mut self, key: &str, items: &[i32]) -> Self {
        let mut v = 5u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|x| v.extend(x.to_le_bytes()));
        self.kv.push((key.into(), 9, v));
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    fn write(&self, path: &Path) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(string(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(32) * 32, 0);
        pad(&mut out);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            pad(&mut out);
        }
        std::fs::write(path, out).expect("write gguf");
    }
}

const HIDDEN: u64 = 32;
const HEADS: u32 = 2;
const KV_HEADS: u32 = 1;
const FFN: u64 = 12;

/// GPT-2's byte alphabet, written out independently of the importer.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut shifted = 0;
    (0..256u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(code).expect("char")
        })
        .collect()
}

/// Q8_0 rows (scale 1.0) whose every value is the row's index, so a row can be traced after moving.
fn q8_rows(rows: u64, cols: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for r in 0..rows {
        for _ in 0..cols / 32 {
            out.extend(0x3c00u16.to_le_bytes());
            out.extend([r as u8; 32]);
        }
    }
    out
}

/// A 1-layer Llama with a byte-level vocabulary: the 256 byte tokens, merges for "Ġt", "he", "Ġthe"
/// and "ĠĠ", control tokens `<s>` and `</s>`, and a user-defined `<think>`. f32 tensors count up in
/// steps of 0.5 in file order; q/k are Q8_0 rows holding their own row index.
const TINY_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}\n";

fn tiny_llama(pre: &str) -> (Gguf, u64) {
    let mut tokens: Vec<String> = byte_alphabet().iter().map(|c| c.to_string()).collect();
    let merges = ["Ġ t", "h e", "Ġt he", "Ġ Ġ"].map(String::from);
    tokens.extend(["Ġt", "he", "Ġthe", "ĠĠ", "<s>", "</s>", "<think>"].map(String::from));
    let mut types = vec![1i32; tokens.len()];
    let n = types.len();
    types[n - 3] = 3;
    types[n - 2] = 3;
    types[n - 1] = 4;
    let vocab = tokens.len() as u64;
    let head_dim = HIDDEN / u64::from(HEADS);
    let file = Gguf::default()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", HIDDEN as u32)
        .u32("llama.feed_forward_length", FFN as u32)
        .u32("llama.attention.head_count", HEADS)
        .u32("llama.attention.head_count_kv", KV_HEADS)
        .f32("llama.rope.freq_base", 10000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", pre)
        .strings("tokenizer.ggml.tokens", &tokens)
        .strings("tokenizer.ggml.merges", &merges)
        .i32s("tokenizer.ggml.token_type", &types)
        .u32("tokenizer.ggml.bos_token_id", (n - 3) as u32)
        .u32("tokenizer.ggml.eos_token_id", (n - 2) as u32)
        .bool("tokenizer.ggml.add_bos_token", true)
        .str("tokenizer.chat_template", TINY_CHAT_TEMPLATE);
    let mut next = 0f32;
    let mut f32s = |n: u64| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                next += 0.5;
                next.to_le_bytes()
            })
            .collect()
    };
    let file = file
        .tensor("token_embd.weight", &[HIDDEN, vocab], 0, f32s(HIDDEN * vocab))
        .tensor("blk.0.attn_norm.weight", &[HIDDEN], 0, f32s(HIDDEN))
        .tensor("blk.0.attn_q.weight", &[HIDDEN, HIDDEN], 8, q8_rows(HIDDEN, HIDDEN))
        .tensor("blk.0.attn_k.weight", &[HIDDEN, head_dim], 8, q8_rows(head_dim, HIDDEN))
        .tensor("blk.0.attn_v.weight", &[HIDDEN, head_dim], 0, f32s(HIDDEN * head_dim))
        .tensor("blk.0.attn_output.weight", &[HIDDEN, HIDDEN], 0, f32s(HIDDEN * HIDDEN))
        .tensor("blk.0.ffn_norm.weight", &[HIDDEN], 0, f32s(HIDDEN))
        .tensor("blk.0.ffn_gate.weight", &[HIDDEN, FFN], 0, f32s(HIDDEN * FFN))
        .tensor("blk.0.ffn_up.weight", &[HIDDEN, FFN], 0, f32s(HIDDEN * FFN))
        .tensor("blk.0.ffn_down.weight", &[FFN, HIDDEN], 0, f32s(FFN * HIDDEN))
        .tensor("output_norm.weight", &[HIDDEN], 0, f32s(HIDDEN))
        .tensor("output.weight", &[HIDDEN, vocab], 0, f32s(HIDDEN * vocab));
    (file, vocab)
}

fn run_import(gguf: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    icl().arg("import-gguf").arg(gguf).arg("--out").arg(out).args(extra).output().expect("run icl")
}

fn read_f32(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (t.shape().to_vec(), v)
}

#[test]
fn tiny_llama_imports_to_a_hugging_face_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, vocab) = tiny_llama("smollm");
    let gguf = dir.path().join("tiny.gguf");
    file.write(&gguf);
    let out = dir.path().join("hf");
    let o = run_import(&gguf, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json");
    for (key, want) in [
        ("model_type", serde_json::json!("llama")),
        ("vocab_size", vocab.into()),
        ("hidden_size", HIDDEN.into()),
        ("intermediate_size", FFN.into()),
        ("num_hidden_layers", 1.into()),
        ("num_attention_heads", HEADS.into()),
        ("num_key_value_heads", KV_HEADS.into()),
        ("head_dim", (HIDDEN / u64::from(HEADS)).into()),
        ("max_position_embeddings", 128.into()),
        ("rope_theta", 10000.0.into()),
        ("tie_word_embeddings", false.into()),
        ("bos_token_id", (vocab - 3).into()),
        ("eos_token_id", (vocab - 2).into()),
    ] {
        assert_eq!(config[key], want, "config.json `{key}`");
    }
    assert!((config["rms_norm_eps"].as_f64().expect("eps") - 1e-5).abs() < 1e-9);
    // The folder's config is icl's own: it loads back as a Llama.
    let spec = icl_models::ModelSpec::read(&out).expect("config.json loads in icl");
    assert_eq!((spec.model_type.as_str(), spec.vocab_size as u64, spec.max_length), ("llama", vocab, 128));
    assert_eq!(spec.eos_token_id.map(u64::from), Some(vocab - 2));

    let bytes = std::fs::read(out.join("model.safetensors")).expect("safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let want = [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.norm.weight",
    ];
    assert_eq!(names, want);
    // Row-major shapes; values in file order, except q/k rows un-interleaved per head (head size 16:
    // Hugging Face row j of a head's first half is file row 2j, of its second half file row 2j + 1).
    let (shape, embd) = read_f32(&st, "model.embed_tokens.weight");
    assert_eq!(shape, [vocab as usize, HIDDEN as usize]);
    assert_eq!(embd[..3], [0.5, 1.0, 1.5]);
    let (shape, down) = read_f32(&st, "model.layers.0.mlp.down_proj.weight");
    assert_eq!(shape, [HIDDEN as usize, FFN as usize]);
    assert!(down.windows(2).all(|w| w[1] == w[0] + 0.5), "copied in order");
    let head_dim = (HIDDEN / u64::from(HEADS)) as usize;
    for (name, rows) in [
        ("model.layers.0.self_attn.q_proj.weight", HIDDEN as usize),
        ("model.layers.0.self_attn.k_proj.weight", head_dim),
    ] {
        let (shape, q) = read_f32(&st, name);
        assert_eq!(shape, [rows, HIDDEN as usize]);
        for r in 0..rows {
            let (head, i) = (r / head_dim, r % head_dim);
            let half = head_dim / 2;
            let file_row = head * head_dim + if i < half { 2 * i } else { 2 * (i - half) + 1 };
            let row = &q[r * HIDDEN as usize..(r + 1) * HIDDEN as usize];
            assert!(row.iter().all(|&v| v == file_row as f32), "{name} row {r}: {row:?}, want file row {file_row}");
        }
    }

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    // `smollm` splits digits off before GPT-2's split, so the two spaces stay one piece (llama.cpp's rule).
    let enc = tok.encode("the the<think>  12", false).expect("encode");
    assert_eq!(enc.get_tokens(), ["t", "he", "Ġthe", "<think>", "ĠĠ", "1", "2"]);
    let with_bos = tok.encode("the", true).expect("encode");
    assert_eq!(with_bos.get_tokens(), ["<s>", "t", "he"], "add_bos_token puts BOS first");
    assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), "the the<think>  12");

    // tokenizer.chat_template becomes chat_template.jinja, byte for byte, and renders with the BOS text.
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).expect("chat_template.jinja"),
        TINY_CHAT_TEMPLATE
    );
    let template = icl_data::ChatTemplate::from_model_dir(&out, None).expect("template").expect("found");
    let rendered = template.render(&[icl_data::ChatMessage::new("user", "hi")], true).expect("renders");
    assert_eq!(rendered, "<s><|user|>hi");

    // An existing folder is kept unless --force; bf16 halves the weights and rounds to nearest even.
    let o = run_import(&gguf, &out, &["--dtype", "bf16"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("exists"));
    let o = run_import(&gguf, &out, &["--dtype", "bf16", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes16 = std::fs::read(out.join("model.safetensors")).expect("safetensors");
    let st16 = safetensors::SafeTensors::deserialize(&bytes16).expect("valid");
    let t = st16.tensor("model.embed_tokens.weight").expect("embd");
    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
    // Same bits as torch's f32 -> bf16 cast (round to nearest even).
    let torch = tch::Tensor::from_slice(&embd).to_kind(tch::Kind::BFloat16).to_kind(tch::Kind::Float);
    let torch = Vec::<f32>::try_from(&torch).expect("vec");
    let back: Vec<f32> =
        t.data().chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect();
    assert_eq!(back, torch);
    assert_ne!(back, embd, "values that bf16 cannot hold were rounded");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only the GGUF and the folder: {leftovers:?}");
}

#[test]
fn failed_imports_leave_nothing_and_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Gguf, &str)> = vec![
        (tiny_llama("no-such-pre").0, "unsupported pre-tokenizer `no-such-pre`"),
        (
            {
                let (mut f, _) = tiny_llama("gpt2");
                let t = f.tensors.iter_mut().find(|t| t.0 == "blk.0.ffn_up.weight").expect("t");
                t.1 = vec![256, 1];
                t.2 = 12; // Q4_K
                t.3 = vec![0; 144];
                f
            },
            "blk.0.ffn_up.weight",
        ),
        (
            {
                let (mut f, _) = tiny_llama("gpt2");
                f.tensors.retain(|t| t.0 != "blk.0.attn_v.weight");
                f
            },
            "blk.0.attn_v.weight`: missing",
        ),
    ];
    for (i, (file, expect)) in cases.into_iter().enumerate() {
        let gguf = dir.path().join(format!("bad{i}.gguf"));
        file.write(&gguf);
        let out = dir.path().join(format!("out{i}"));
        let o = run_import(&gguf, &out, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(expect), "expected `{expect}`: {stderr}");
        assert!(stderr.contains(&format!("bad{i}.gguf")), "names the file: {stderr}");
        assert!(!out.exists());
    }
    // Truncated: the real error comes from the reader, and still nothing is written.
    let (file, _) = tiny_llama("gpt2");
    let gguf = dir.path().join("cut.gguf");
    file.write(&gguf);
    let bytes = std::fs::read(&gguf).expect("read");
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).expect("cut");
    let o = run_import(&gguf, &dir.path().join("cut"), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("past the end of the file") && stderr.contains("output.weight"),
        "{stderr}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".gguf")), "no folder or temporary left: {names:?}");
}

/// The transformers reference folder and the GGUF it was made from, or `None` (with the reason
/// printed) where setup has not made them.
fn reference() -> Option<(PathBuf, PathBuf)> {
    let dir = models_dir().join("smollm2-135m-instruct-hf");
    let Ok(source) = std::fs::read_to_string(dir.join("source.txt")) else {
        eprintln!("skipped: no transformers reference in {} (run `cargo xtask setup`)", dir.display());
        return None;
    };
    let gguf = PathBuf::from(source.trim());
    if !gguf.is_file() {
        eprintln!("skipped: {} (named by {}/source.txt) is missing", gguf.display(), dir.display());
        return None;
    }
    Some((dir, gguf))
}

#[test]
fn smollm2_matches_transformers_gguf_loader() {
    let Some((reference, gguf)) = reference() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("smollm2");
    let o = run_import(&gguf, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Every tensor, by name, equal to transformers' dequantized one.
    // Mapped, not read: two 540 MB files.
    let map = |p: PathBuf| {
        let file = std::fs::File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // SAFETY: read-only map of a file nothing else writes during the test.
        unsafe { memmap2::Mmap::map(&file) }.expect("map")
    };
    let (ours, theirs) = (map(out.join("model.safetensors")), map(reference.join("model.safetensors")));
    let ours = safetensors::SafeTensors::deserialize(&ours).expect("ours valid");
    let theirs = safetensors::SafeTensors::deserialize(&theirs).expect("reference valid");
    let mut names: Vec<String> = ours.names().into_iter().cloned().collect();
    let mut ref_names: Vec<String> = theirs.names().into_iter().cloned().collect();
    names.sort();
    ref_names.sort();
    assert_eq!(names, ref_names, "same tensor names");
    let mut worst = (0f32, String::new());
    for name in &names {
        let (shape, a) = read_f32(&ours, name);
        let (ref_shape, b) = read_f32(&theirs, name);
        assert_eq!(shape, ref_shape, "{name}");
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        if diff > worst.0 || worst.1.is_empty() {
            worst = (diff, name.clone());
        }
    }
    eprintln!("{} tensors; max |icl - transformers| = {:e} ({})", names.len(), worst.0, worst.1);
    assert_eq!(worst.0, 0.0, "dequantization differs from transformers' in {}", worst.1);

    let read_json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .expect("json")
    };
    // The chat template: the file transformers 5 writes from the same GGUF.
    let template = |dir: &Path| std::fs::read_to_string(dir.join("chat_template.jinja")).expect("chat_template.jinja");
    assert_eq!(template(&out), template(&reference), "chat_template.jinja");
    let (c, r) = (read_json(out.join("config.json")), read_json(reference.join("config.json")));
    for key in [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    ] {
        assert_eq!(c[key], r[key], "config.json `{key}`");
    }
    assert_eq!(c["rope_theta"], r["rope_parameters"]["rope_theta"], "rope_theta");

    let ours = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("our tokenizer");
    let theirs = tokenizers::Tokenizer::from_file(reference.join("tokenizer.json")).expect("reference tokenizer");
    assert_eq!(ours.get_vocab_size(true), theirs.get_vocab_size(true));
    for (file, field) in [("lambada_openai.jsonl", "context"), ("piqa.jsonl", "query")] {
        let path = data_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let contexts: Vec<String> = text
            .lines()
            .take(2000)
            .map(|l| {
                let row: serde_json::Value = serde_json::from_str(l).expect("jsonl");
                row[field].as_str().expect(field).trim().to_owned()
            })
            .collect();
        assert_eq!(contexts.len(), text.lines().count().min(2000), "{file}");
        let a = ours.encode_batch(contexts.clone(), false).expect("encode");
        let b = theirs.encode_batch(contexts.clone(), false).expect("encode");
        let differ: Vec<usize> = (0..contexts.len()).filter(|&i| a[i].get_ids() != b[i].get_ids()).collect();
        let tokens: usize = a.iter().map(|e| e.len()).sum();
        eprintln!("{file}: {} contexts, {tokens} tokens, {} differ", contexts.len(), differ.len());
        assert!(differ.is_empty(), "{file}: contexts {differ:?} tokenize differently, e.g. {:?}", contexts[differ[0]]);
    }
}
