//! Copying safetensors checkpoints (single or sharded) into a `VarStore`, cast to its dtype.

use crate::{Error, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io { path: index.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: index.clone(), message: format!("invalid JSON: {e}") })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
            path: index.clone(),
            message: "field `weight_map`: missing or not an object".into(),
        })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Config {
                path: index.clone(),
                message: format!("field `weight_map.{tensor}`: expected a file name"),
            })?;
            files.insert(dir.join(file));
        }
        return Ok(files.into_iter().collect());
    }
    let refused: Vec<_> = ["pytorch_model.bin", "model.pt", "model.bin"]
        .iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    let hint = if refused.is_empty() {
        String::new()
    } else {
        format!(" ({refused:?} found: pickle checkpoints can run code when loaded and are not read)")
    };
    Err(Error::Checkpoint {
        dir: dir.to_owned(),
        message: format!("no model.safetensors or model.safetensors.index.json{hint}"),
    })
}

fn kind_of(dtype: StDtype) -> Option<Kind> {
    match dtype {
        StDtype::F32 => Some(Kind::Float),
        StDtype::BF16 => Some(Kind::BFloat16),
        StDtype::F16 => Some(Kind::Half),
        StDtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Fills every variable of `vs` from the checkpoint in `dir`, by name, casting each tensor to the
/// variable's kind and device as it is copied, so no second full copy of the model is ever held.
/// Checkpoint tensors that no variable asks for are ignored (tied heads, attention-mask buffers).
/// Refuses a config that describes more parameters than the checkpoint files could hold (at two
/// bytes each, the smallest stored dtype), before anything is allocated for it: a hostile or mistaken
/// config must fail with an error, not exhaust memory.
pub fn check_checkpoint_holds(dir: &Path, parameters: Option<u64>) -> Result<()> {
    let files = checkpoint_files(dir)?;
    let mut bytes = 0u64;
    for path in &files {
        bytes += std::fs::metadata(path).map_err(|source| Error::Io { path: path.clone(), source })?.len();
    }
    match parameters {
        Some(n) if n.saturating_mul(2) <= bytes => Ok(()),
        n => Err(Error::Config {
            path: dir.join("config.json"),
            message: format!(
                "the config describes {} parameters, more than the checkpoint's {bytes} bytes can hold",
                n.map_or("an overflowing number of".to_owned(), |n| n.to_string())
            ),
        }),
    }
}

pub fn load_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    let files = checkpoint_files(dir)?;
    let mut variables = vs.variables();
    let _guard = tch::no_grad_guard();
    for path in &files {
        let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.clone(), source })?;
        // SAFETY: the map is read-only and lives until the end of this iteration; a file changed by
        // another process while we read it could give wrong weights, never memory unsafety in Rust.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| Error::Io { path: path.clone(), source })?;
        let tensors = SafeTensors::deserialize(&mmap).map_err(|e| Error::Checkpoint {
            dir: path.clone(),
            message: format!("not a valid safetensors file: {e:?}"),
        })?;
        let names: Vec<String> = tensors.names().into_iter().cloned().collect();
        for name in names {
            let Some(var) = variables.remove(&name) else { continue };
            let view = tensors.tensor(&name).map_err(|e| Error::Tensor {
                path: path.clone(),
                tensor: name.clone(),
                message: format!("{e:?}"),
            })?;
            let tensor_error = |message: String| Error::Tensor { path: path.clone(), tensor: name.clone(), message };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(tensor_error(format!("shape {shape:?} in the file, the model expects {:?}", var.size())));
            }
            let kind = kind_of(view.dtype())
                .ok_or_else(|| tensor_error(format!("unsupported dtype {:?}", view.dtype())))?;
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            let mut var = var;
            var.f_copy_(&src.f_to_kind(var.kind())?)?;
        }
    }
    if let Some(missing) = variables.keys().min() {
        return Err(Error::Tensor {
            path: dir.to_owned(),
            tensor: missing.clone(),
            message: format!(
                "missing from the checkpoint ({} of the model's tensors are missing; files read: {})",
                variables.len(),
                files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(())
}
