//! GPT-Neo's training path: gradients reach every parameter and AdamW lowers the loss, dropout acts
//! only in training mode, evaluation mode computes exactly the inference numbers, and a saved folder
//! loads back (in `icl` and in `transformers`) with identical logits.
#![allow(clippy::unwrap_used)]

use icl_models::{load_model, CausalLm, Dtype, GptNeo, GptNeoConfig, ModelInput};
use std::path::Path;
use std::process::Command;
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

fn config(dropout: f64) -> GptNeoConfig {
    let json = format!(
        r#"{{"vocab_size": 97, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
        "attention_types": [[["global", "local"], 1]], "window_size": 4, "intermediate_size": 64,
        "max_position_embeddings": 64, "eos_token_id": 96, "embed_dropout": {dropout},
        "attention_dropout": {dropout}, "resid_dropout": {dropout}}}"#
    );
    GptNeoConfig::from_json(Path::new("config.json"), &json).unwrap()
}

fn model(dropout: f64, seed: i64) -> GptNeo {
    tch::manual_seed(seed);
    let model = GptNeo::new(VarStore::new(Device::Cpu), &config(dropout)).unwrap();
    model.init_weights().unwrap();
    model
}

fn batch() -> Tensor {
    // Two rows longer than the local window, with a repeating pattern a model can learn.
    Tensor::from_slice(&(0..40i64).map(|i| (i * 7) % 23).collect::<Vec<_>>()).reshape([2, 20])
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn the_same_seed_gives_the_same_initial_weights() {
    // Every store's map iterates in its own order; initialization must not follow it.
    let (a, b) = (model(0.0, 7), model(0.0, 7));
    let (a, b) = (a.var_store().variables(), b.var_store().variables());
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        assert!(tensor.equal(&b[name]), "{name} differs between two runs with seed 7");
    }
}

#[test]
fn initial_weights_follow_transformers() {
    let model = model(0.0, 1);
    let vars = model.var_store().variables();
    let std = vars["transformer.h.0.mlp.c_fc.weight"].std(true).double_value(&[]);
    assert!((std - 0.02).abs() < 0.002, "c_fc std {std}");
    let wte_std = vars["transformer.wte.weight"].std(true).double_value(&[]);
    assert!((wte_std - 0.02).abs() < 0.002, "wte std {wte_std}");
    assert_eq!(vars["transformer.h.1.ln_2.weight"].mean(Kind::Float).double_value(&[]), 1.0);
    assert_eq!(vars["transformer.h.1.mlp.c_proj.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn gradients_reach_every_parameter_and_adamw_lowers_the_loss() {
    let model = model(0.1, 2);
    model.set_training(true);
    assert!(model.is_training());
    let mut optimizer = tch::nn::AdamW::default().build(model.var_store(), 3e-3).unwrap();
    let ids = batch();
    let first = model.next_token_loss(&ids).unwrap();
    // Near ln(97) at initialization: the model starts uniform.
    assert!((first.double_value(&[]) - 97f64.ln()).abs() < 0.3, "initial loss {}", first.double_value(&[]));
    optimizer.zero_grad();
    first.backward();
    for (name, var) in model.var_store().variables() {
        let grad = var.grad();
        assert!(grad.defined(), "{name}: no gradient");
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name}: zero gradient");
    }
    optimizer.step();
    let mut last = f64::INFINITY;
    for _ in 0..60 {
        let loss = model.next_token_loss(&ids).unwrap();
        optimizer.backward_step(&loss);
        last = loss.double_value(&[]);
    }
    assert!(last < first.double_value(&[]) / 3.0, "loss {} -> {last}", first.double_value(&[]));
}

#[test]
fn dropout_acts_only_in_training_mode() {
    let model = model(0.3, 3);
    let input = ModelInput::causal(&batch()).unwrap();
    let eval_logits = model.logits(&input).unwrap();
    model.set_training(true);
    let a = model.forward_t(&input).unwrap();
    let b = model.forward_t(&input).unwrap();
    assert!(a.requires_grad(), "the training forward records gradients");
    assert!(max_diff(&a, &b) > 1e-3, "dropout draws differ between calls");
    model.set_training(false);
    // Evaluation mode: the training forward equals inference (no dropout) to within rounding: it
    // takes libtorch's differentiable GELU, inference the kernel of `gelu_tanh.rs` (a few ulp apart).
    let c = model.forward_t(&input).unwrap();
    assert!(max_diff(&c, &eval_logits) <= 1e-5, "{}", max_diff(&c, &eval_logits));
    assert!(!model.logits(&input).unwrap().requires_grad(), "inference records no gradients");
}

#[test]
fn without_dropout_training_mode_changes_nothing() {
    let model = model(0.0, 4);
    let input = ModelInput::causal(&batch()).unwrap();
    let eval_logits = model.logits(&input).unwrap();
    model.set_training(true);
    // To within rounding, as above.
    let diff = max_diff(&model.forward_t(&input).unwrap(), &eval_logits);
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn saved_folder_loads_back_in_icl_and_transformers() {
    let model = model(0.1, 5);
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
    let ids = batch();
    let input = ModelInput::causal(&ids).unwrap();
    let expected = model.logits(&input).unwrap();
    let loaded = load_model(dir.path(), Dtype::F32, Device::Cpu).unwrap();
    assert_eq!(max_diff(&loaded.logits(&input).unwrap(), &expected), 0.0);
    assert!(!loaded.is_training());

    // transformers reads the same folder (config fields, tensor names) and computes the same logits.
    let python = icl_test_support::venv_python();
    let ids_path = dir.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &ids_path).unwrap();
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoForCausalLM
model = GPTNeoForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = load_file(sys.argv[2])["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
"#;
    let out_path = dir.path().join("logits.safetensors");
    let output = Command::new(&python)
        .args(["-c", script])
        .arg(dir.path())
        .arg(&ids_path)
        .arg(&out_path)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "transformers failed: {}", String::from_utf8_lossy(&output.stderr));
    let reference = Tensor::read_safetensors(&out_path).unwrap().remove(0).1;
    let diff = max_diff(&reference, &expected);
    assert!(diff <= 1e-4, "max abs logit difference against transformers: {diff}");
}
