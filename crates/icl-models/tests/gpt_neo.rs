//! GPT-Neo against Hugging Face `transformers`: logits on a padded batch longer than the local window,
//! sharded and bf16 checkpoints, and the loader's errors.
//!
//! The reference models and logits are made by `scripts/make_models.py` (run by `cargo xtask setup`)
//! under `$ICL_MODELS` (default `~/.cache/icl/models`).
#![allow(clippy::unwrap_used)]

use icl_models::{load_model, Dtype, ModelInput};
use icl_test_support::{model_dir, models_dir};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn reference() -> (Tensor, Tensor, Tensor) {
    let path = model_dir("gpt-neo-tiny").join("reference_logits.safetensors");
    assert!(path.is_file(), "{}: missing, run `cargo xtask setup`", path.display());
    let named = Tensor::read_safetensors(&path).expect("read reference logits");
    let get = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone()).expect(n);
    (get("input_ids"), get("lengths"), get("logits"))
}

/// Largest |a - b| over the real (unpadded) positions of each row.
fn max_diff_on_real_tokens(a: &Tensor, b: &Tensor, lengths: &Tensor) -> f64 {
    let mut worst = 0f64;
    for row in 0..lengths.size()[0] {
        let n = lengths.int64_value(&[row]);
        let d = (a.get(row).narrow(0, 0, n).to_kind(Kind::Float) - b.get(row).narrow(0, 0, n))
            .abs()
            .max()
            .double_value(&[]);
        worst = worst.max(d);
    }
    worst
}

#[test]
fn logits_match_transformers_on_a_padded_batch() {
    let (ids, lengths, expected) = reference();
    assert!(ids.size()[1] > 16, "sequences must be longer than window_size");
    let model = load_model(&models_dir().join("gpt-neo-tiny"), Dtype::F32, Device::Cpu).unwrap();
    let logits = model.logits(&ModelInput::causal(&ids).unwrap()).unwrap();
    let diff = max_diff_on_real_tokens(&logits, &expected, &lengths);
    println!("max abs logit difference against transformers: {diff:.3e}");
    assert!(diff <= 1e-4, "max abs logit difference {diff}");
}

#[test]
fn log_probs_at_scored_positions_equal_full_log_softmax() {
    let (ids, _, _) = reference();
    let model = load_model(&models_dir().join("gpt-neo-tiny"), Dtype::F32, Device::Cpu).unwrap();
    let seq = ids.size()[1];
    let scored = Tensor::from_slice(&[0i64, 5, 17, seq + 3, 2 * seq + 16]);
    let picked = model.log_probs_at(&ModelInput::causal(&ids).unwrap(), &scored).unwrap();
    let full = model
        .logits(&ModelInput::causal(&ids).unwrap())
        .unwrap()
        .log_softmax(-1, Kind::Float)
        .view([-1, model.vocab_size()]);
    let diff = (picked - full.index_select(0, &scored)).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn sharded_and_bf16_checkpoints_load() {
    let (ids, lengths, expected) = reference();
    let dir = models_dir();
    let sharded = load_model(&dir.join("gpt-neo-tiny-sharded"), Dtype::F32, Device::Cpu).unwrap();
    assert!(
        max_diff_on_real_tokens(&sharded.logits(&ModelInput::causal(&ids).unwrap()).unwrap(), &expected, &lengths)
            <= 1e-4
    );

    // bf16 weights widened to f32 and computed in f32: close, but not equal, to the f32 model.
    let widened = load_model(&dir.join("gpt-neo-tiny-bf16"), Dtype::F32, Device::Cpu).unwrap();
    assert_eq!(widened.kind(), Kind::Float);
    let d = max_diff_on_real_tokens(&widened.logits(&ModelInput::causal(&ids).unwrap()).unwrap(), &expected, &lengths);
    assert!(d > 0.0 && d < 1.5, "{d}");

    let bf16 = load_model(&dir.join("gpt-neo-tiny"), Dtype::Bf16, Device::Cpu).unwrap();
    assert_eq!(bf16.kind(), Kind::BFloat16);
    let d = max_diff_on_real_tokens(&bf16.logits(&ModelInput::causal(&ids).unwrap()).unwrap(), &expected, &lengths);
    assert!(d < 1.5, "bf16 compute differs by {d}");
    // Top-1 predictions mostly survive bf16 (real positions only).
    let agree = bf16
        .logits(&ModelInput::causal(&ids).unwrap())
        .unwrap()
        .argmax(-1, false)
        .eq_tensor(&expected.argmax(-1, false));
    let (mut same, mut total) = (0i64, 0i64);
    for row in 0..lengths.size()[0] {
        let n = lengths.int64_value(&[row]);
        same += agree.get(row).narrow(0, 0, n).sum(Kind::Int64).int64_value(&[]);
        total += n;
    }
    let share = same as f64 / total as f64;
    println!("bf16 logits differ by at most {d:.3}; top-1 agreement {share:.3}");
    assert!(share > 0.8, "bf16 top-1 agreement {share}");
}

#[test]
fn packed_rows_and_shared_prefixes_equal_separate_sequences() {
    let (ids, lengths, expected) = reference();
    let model = load_model(&models_dir().join("gpt-neo-tiny"), Dtype::F32, Device::Cpu).unwrap();
    // Row 1 (29 tokens) and row 2 (17 tokens) packed into one row of 46, positions restarting.
    let (n1, n2) = (lengths.int64_value(&[1]), lengths.int64_value(&[2]));
    let packed_ids = Tensor::cat(&[ids.get(1).narrow(0, 0, n1), ids.get(2).narrow(0, 0, n2)], 0).unsqueeze(0);
    let positions = Tensor::cat(
        &[Tensor::arange(n1, (Kind::Int64, Device::Cpu)), Tensor::arange(n2, (Kind::Int64, Device::Cpu))],
        0,
    )
    .unsqueeze(0);
    let segments = Tensor::cat(
        &[Tensor::zeros([n1], (Kind::Int64, Device::Cpu)), Tensor::ones([n2], (Kind::Int64, Device::Cpu))],
        0,
    )
    .unsqueeze(0);
    let branches = Tensor::zeros([1, n1 + n2], (Kind::Int64, Device::Cpu));
    let input = ModelInput::packed(&packed_ids, &positions, &segments, &branches).unwrap();
    let logits = model.logits(&input).unwrap().get(0);
    let d1 = (logits.narrow(0, 0, n1) - expected.get(1).narrow(0, 0, n1)).abs().max().double_value(&[]);
    let d2 = (logits.narrow(0, n1, n2) - expected.get(2).narrow(0, 0, n2)).abs().max().double_value(&[]);
    assert!(d1 <= 1e-4 && d2 <= 1e-4, "packed logits differ by {d1}, {d2}");

    // A shared prefix: row 0's first 20 tokens, then two branches: row 0's tokens 20..40 and a branch
    // of 5 other tokens. Branch 1 must equal row 0 itself; branch 2 the prefix plus its own tokens.
    let row0 = ids.get(0);
    let other = ids.get(2).narrow(0, 0, 5);
    let tree_ids = Tensor::cat(&[row0.narrow(0, 0, 40), other.shallow_clone()], 0).unsqueeze(0);
    let pos: Vec<i64> = (0..40).chain(20..25).collect();
    let br: Vec<i64> =
        std::iter::repeat_n(0, 20).chain(std::iter::repeat_n(1, 20)).chain(std::iter::repeat_n(2, 5)).collect();
    let input = ModelInput::packed(
        &tree_ids,
        &Tensor::from_slice(&pos).unsqueeze(0),
        &Tensor::zeros([1, 45], (Kind::Int64, Device::Cpu)),
        &Tensor::from_slice(&br).unsqueeze(0),
    )
    .unwrap();
    let tree = model.logits(&input).unwrap().get(0);
    let d = (tree.narrow(0, 0, 40) - expected.get(0)).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "branch 1 differs by {d}");
    let alone = Tensor::cat(&[row0.narrow(0, 0, 20), other], 0).unsqueeze(0);
    let alone = model.logits(&ModelInput::causal(&alone).unwrap()).unwrap().get(0);
    let d = (tree.narrow(0, 40, 5) - alone.narrow(0, 20, 5)).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "branch 2 differs by {d}");
}

fn copy_model(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn load_error(dir: &Path) -> String {
    load_model(dir, Dtype::F32, Device::Cpu).err().expect("load should fail").to_string()
}

#[test]
fn loader_errors_name_file_field_and_tensor() {
    let tiny = models_dir().join("gpt-neo-tiny");

    let tmp = tempfile::tempdir().unwrap();
    assert!(load_error(tmp.path()).contains("config.json"), "missing config");

    let t = copy_model(&tiny);
    std::fs::remove_file(t.path().join("model.safetensors")).unwrap();
    std::fs::write(t.path().join("pytorch_model.bin"), b"not read").unwrap();
    let e = load_error(t.path());
    assert!(e.contains("no model.safetensors") && e.contains("pickle"), "{e}");

    let t = copy_model(&tiny);
    let config = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    std::fs::write(t.path().join("config.json"), config.replace("\"gpt_neo\"", "\"mamba\"")).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("model_type") && e.contains("mamba"), "{e}");

    let t = copy_model(&tiny);
    std::fs::write(t.path().join("config.json"), config.replace("\"gelu_new\"", "\"quick_gelu\"")).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("activation_function") && e.contains("quick_gelu"), "{e}");

    let t = copy_model(&tiny);
    std::fs::write(t.path().join("config.json"), config.replace("\"hidden_size\": 64", "\"hidden_size\": 32")).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("model.safetensors") && e.contains("shape"), "{e}");

    // A config far larger than its checkpoint fails before anything is allocated for it.
    let t = copy_model(&tiny);
    std::fs::write(
        t.path().join("config.json"),
        config.replace("\"vocab_size\": 50257", "\"vocab_size\": 1000000000000"),
    )
    .unwrap();
    let e = load_error(t.path());
    assert!(e.contains("config.json") && e.contains("parameters") && e.contains("bytes"), "{e}");

    // A checkpoint that lacks one tensor (renamed): the error names it.
    let t = copy_model(&tiny);
    let path = t.path().join("model.safetensors");
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.replace("transformer.ln_f.bias", "transformer.ln_f.b"), v))
        .collect();
    Tensor::write_safetensors(&named, &path).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("transformer.ln_f.bias") && e.contains("missing"), "{e}");

    // A truncated file.
    let t = copy_model(&tiny);
    let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
    std::fs::write(t.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}
