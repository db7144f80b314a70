//! The inputs of the scaling projection in `docs/scaling.md`, from the models' own accounting: FLOPs
//! per token of a forward pass ([`CausalLm::forward_flops`]) and the bytes a parameter-sharded rank
//! gathers for each stage ([`ModelSpec::declare_shapes`]), in bf16.
//!
//! `cargo run --release -p icl-models --example scaling_inputs -- [MODEL_DIR...]` prints a table for
//! the given Hugging Face folders (only `config.json` is read) and for three larger Llama shapes
//! declared here (Llama-2-7B, Llama-3-8B, Llama-2-70B). Parameters are declared, never written, so
//! even the 70B shape takes no memory.

use icl_models::{CausalLm, Dtype, ModelSpec, Stage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LLAMA_2_7B: &str = r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
  "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": false}"#;
const LLAMA_3_8B: &str = r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
  "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0, "tie_word_embeddings": false}"#;
const LLAMA_2_70B: &str = r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096,
  "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": false}"#;

/// Declares the model a `config.json` describes, in bf16 and without memory for its parameters, and
/// returns it with its parameters' element counts by stage.
fn declare(path: &Path, text: &str) -> anyhow::Result<(Box<dyn CausalLm>, BTreeMap<Stage, usize>)> {
    Ok(ModelSpec::parse(path, text)?.declare_shapes(Dtype::Bf16)?)
}

fn main() -> anyhow::Result<()> {
    let mut models: Vec<(String, PathBuf, String)> = Vec::new();
    for dir in std::env::args().skip(1) {
        let path = Path::new(&dir).join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let label = Path::new(&dir).file_name().map_or(dir.clone(), |n| n.to_string_lossy().into_owned());
        models.push((label, path, text));
    }
    for (label, text) in
        [("llama-2-7b (shape)", LLAMA_2_7B), ("llama-3-8b (shape)", LLAMA_3_8B), ("llama-2-70b (shape)", LLAMA_2_70B)]
    {
        models.push((label.to_owned(), PathBuf::from("config.json"), text.to_owned()));
    }
    println!(
        "| model | parameters | layers | block params | block MB (bf16) | embedding+head MB (bf16) | GFLOP/token (seq 512) | GFLOP/token (seq 2048) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, path, text) in models {
        let (model, elements) = declare(&path, &text)?;
        let total: usize = elements.values().sum();
        let blocks: Vec<usize> =
            elements.iter().filter(|(s, _)| matches!(s, Stage::Block(_))).map(|(_, n)| *n).collect();
        let block = blocks.iter().copied().max().unwrap_or(0);
        let outer: usize = elements.iter().filter(|(s, _)| !matches!(s, Stage::Block(_))).map(|(_, n)| *n).sum();
        // Every position scored, as when the whole sequence's log-probabilities are needed.
        let per_token = |len: usize| model.forward_flops(&[len], len) / len as f64 / 1e9;
        println!(
            "| {label} | {:.1} M | {} | {:.2} M | {:.1} | {:.1} | {:.3} | {:.3} |",
            total as f64 / 1e6,
            blocks.len(),
            block as f64 / 1e6,
            block as f64 * 2.0 / 1e6,
            outer as f64 * 2.0 / 1e6,
            per_token(512),
            per_token(2048),
        );
    }
    Ok(())
}
