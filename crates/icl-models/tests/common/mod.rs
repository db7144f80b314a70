//! Checks shared by the architecture tests: logits against `transformers` on the right-padded
//! reference batch of a tiny model made by `scripts/make_models.py`, packed rows and shared prefixes
//! against separate sequences, bf16 compute, and the loader's errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use icl_models::{load_model, CausalLm, Dtype, ModelInput};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `$ICL_MODELS/name` (default `~/.cache/icl/models`), which must hold a reference fixture.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = icl_test_support::model_dir(name);
    assert!(
        dir.join("reference_logits.safetensors").is_file(),
        "reference model {} missing: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

pub struct Reference {
    pub ids: Tensor,
    pub lengths: Tensor,
    pub logits: Tensor,
}

pub fn reference(name: &str) -> Reference {
    let named = Tensor::read_safetensors(model_dir(name).join("reference_logits.safetensors")).expect("read reference");
    let get = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone()).expect(n);
    Reference { ids: get("input_ids"), lengths: get("lengths"), logits: get("logits") }
}

pub fn load(name: &str, dtype: Dtype) -> Box<dyn CausalLm> {
    load_model(&model_dir(name), dtype, Device::Cpu).unwrap()
}

/// Largest |a - b| over the real (unpadded) positions of each row.
pub fn max_diff_on_real_tokens(a: &Tensor, b: &Tensor, lengths: &Tensor) -> f64 {
    let mut worst = 0f64;
    for row in 0..lengths.size()[0] {
        let n = lengths.int64_value(&[row]);
        let d = (a.get(row).narrow(0, 0, n).to_kind(Kind::Float) - b.get(row).narrow(0, 0, n).to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        worst = worst.max(d);
    }
    worst
}

/// f32 logits on the padded batch within 1e-4 of `transformers`, and `log_probs_at` equal to the
/// full log-softmax at scattered positions.
pub fn check_logits(name: &str) {
    let r = reference(name);
    let model = load(name, Dtype::F32);
    let input = ModelInput::causal(&r.ids).unwrap();
    let logits = model.logits(&input).unwrap();
    assert_eq!(logits.size(), r.logits.size());
    let diff = max_diff_on_real_tokens(&logits, &r.logits, &r.lengths);
    println!("{name}: max abs logit difference against transformers: {diff:.3e}");
    assert!(diff <= 1e-4, "{name}: max abs logit difference {diff}");

    let seq = r.ids.size()[1];
    let scored = Tensor::from_slice(&[0i64, 5, 17, 39, seq + 3, 2 * seq + 16]);
    let picked = model.log_probs_at(&input, &scored).unwrap();
    assert_eq!(picked.kind(), Kind::Float);
    let full = logits.log_softmax(-1, Kind::Float).view([-1, model.vocab_size()]).index_select(0, &scored);
    let d = (picked - full).abs().max().double_value(&[]);
    assert!(d < 1e-5, "{name}: log_probs_at differs from the full log-softmax by {d}");
}

/// Two sequences packed in one row (positions restarting, block-diagonal mask) give the logits of
/// each alone; a tree row (shared prefix, two branches) gives those of prefix + branch.
pub fn check_packed(name: &str) {
    let r = reference(name);
    let model = load(name, Dtype::F32);
    let cpu = (Kind::Int64, Device::Cpu);
    let (n1, n2) = (r.lengths.int64_value(&[1]), r.lengths.int64_value(&[2]));
    let ids = Tensor::cat(&[r.ids.get(1).narrow(0, 0, n1), r.ids.get(2).narrow(0, 0, n2)], 0).unsqueeze(0);
    let positions = Tensor::cat(&[Tensor::arange(n1, cpu), Tensor::arange(n2, cpu)], 0).unsqueeze(0);
    let segments = Tensor::cat(&[Tensor::zeros([n1], cpu), Tensor::ones([n2], cpu)], 0).unsqueeze(0);
    let branches = Tensor::zeros([1, n1 + n2], cpu);
    let input = ModelInput::packed(&ids, &positions, &segments, &branches).unwrap();
    let logits = model.logits(&input).unwrap().get(0);
    let d1 = (logits.narrow(0, 0, n1) - r.logits.get(1).narrow(0, 0, n1)).abs().max().double_value(&[]);
    let d2 = (logits.narrow(0, n1, n2) - r.logits.get(2).narrow(0, 0, n2)).abs().max().double_value(&[]);
    println!("{name}: packed logits differ by {d1:.3e}, {d2:.3e}");
    assert!(d1 <= 1e-4 && d2 <= 1e-4, "{name}: packed logits differ by {d1}, {d2}");

    // Row 0's first 20 tokens shared by two branches: row 0's tokens 20..40, and 5 other tokens.
    let row0 = r.ids.get(0);
    let other = r.ids.get(2).narrow(0, 0, 5);
    let tree_ids = Tensor::cat(&[row0.narrow(0, 0, 40), other.shallow_clone()], 0).unsqueeze(0);
    let pos: Vec<i64> = (0..40).chain(20..25).collect();
    let br: Vec<i64> =
        std::iter::repeat_n(0, 20).chain(std::iter::repeat_n(1, 20)).chain(std::iter::repeat_n(2, 5)).collect();
    let input = ModelInput::packed(
        &tree_ids,
        &Tensor::from_slice(&pos).unsqueeze(0),
        &Tensor::zeros([1, 45], cpu),
        &Tensor::from_slice(&br).unsqueeze(0),
    )
    .unwrap();
    let tree = model.logits(&input).unwrap().get(0);
    let d = (tree.narrow(0, 0, 40) - r.logits.get(0)).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "{name}: branch 1 differs by {d}");
    let alone = Tensor::cat(&[row0.narrow(0, 0, 20), other], 0).unsqueeze(0);
    let alone = model.logits(&ModelInput::causal(&alone).unwrap()).unwrap().get(0);
    let d = (tree.narrow(0, 40, 5) - alone.narrow(0, 20, 5)).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "{name}: branch 2 differs by {d}");
}

/// bf16 compute: bf16 logits close to the f32 reference, most top-1 predictions kept, and the
/// log-softmax still in f32.
pub fn check_bf16(name: &str) {
    let r = reference(name);
    let model = load(name, Dtype::Bf16);
    assert_eq!(model.kind(), Kind::BFloat16);
    let input = ModelInput::causal(&r.ids).unwrap();
    let logits = model.logits(&input).unwrap();
    assert_eq!(logits.kind(), Kind::BFloat16);
    let d = max_diff_on_real_tokens(&logits, &r.logits, &r.lengths);
    let agree = logits.argmax(-1, false).eq_tensor(&r.logits.argmax(-1, false));
    let (mut same, mut total) = (0i64, 0i64);
    for row in 0..r.lengths.size()[0] {
        let n = r.lengths.int64_value(&[row]);
        same += agree.get(row).narrow(0, 0, n).sum(Kind::Int64).int64_value(&[]);
        total += n;
    }
    let share = same as f64 / total as f64;
    println!("{name}: bf16 logits differ by at most {d:.3}; top-1 agreement {share:.3}");
    assert!(d > 0.0 && d < 1.5, "{name}: bf16 compute differs by {d}");
    assert!(share > 0.8, "{name}: bf16 top-1 agreement {share}");
    let lp = model.log_probs_at(&input, &Tensor::from_slice(&[0i64, 1])).unwrap();
    assert_eq!(lp.kind(), Kind::Float);
}

fn copy_model(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

pub fn load_error(dir: &Path) -> String {
    load_model(dir, Dtype::F32, Device::Cpu).err().expect("load should fail").to_string()
}

/// A checkpoint whose tensor `tensor` is renamed: the error names the tensor and says it is missing.
/// A config whose `from` is replaced by `to` so that `shaped` no longer fits: the error names the
/// file, the tensor and the shapes.
pub fn check_loader_errors(name: &str, tensor: &str, from: &str, to: &str, shaped: &str) {
    let dir = model_dir(name);
    let t = copy_model(&dir);
    let path = t.path().join("model.safetensors");
    let named: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (if k == tensor { format!("{k}_renamed") } else { k }, v))
        .collect();
    Tensor::write_safetensors(&named, &path).unwrap();
    let e = load_error(t.path());
    assert!(e.contains(tensor) && e.contains("missing"), "{name}: {e}");

    let t = copy_model(&dir);
    let config = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    assert!(config.contains(from), "{name}: config.json has no `{from}`");
    std::fs::write(t.path().join("config.json"), config.replace(from, to)).unwrap();
    let e = load_error(t.path());
    assert!(e.contains("model.safetensors") && e.contains(shaped) && e.contains("shape"), "{name}: {e}");
}

/// Replaces `from` by `to` in a copy of `name`'s config.json and returns the load error.
pub fn config_error(name: &str, from: &str, to: &str) -> String {
    let t = copy_model(&model_dir(name));
    let config = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    assert!(config.contains(from), "{name}: config.json has no `{from}`");
    std::fs::write(t.path().join("config.json"), config.replace(from, to)).unwrap();
    load_error(t.path())
}
