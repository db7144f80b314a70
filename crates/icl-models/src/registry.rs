//! The table of architectures, and what each architecture file registers in it.
//!
//! Each file exports one [`Architecture`]: the `model_type` names it serves and a parser from the raw
//! `config.json` to a validated [`ArchConfig`] (candle's split: a serde struct that mirrors the file,
//! then checked, resolved values). The validated config is all the rest of the crate sees: it states
//! the sizes, a lower bound on the parameters, declares the model's tensors, and maps each
//! checkpoint name to the FSDP stage that uses it. Nothing outside the file and its line in
//! [`ARCHITECTURES`] knows the architecture.

use crate::model::{Declared, Sizes};
use crate::{Error, Result, Stage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::nn::VarStore;

/// Every supported architecture; adding one is a file and a line here.
pub(crate) const ARCHITECTURES: &[Architecture] = &[
    crate::gpt_neo::ARCHITECTURE,
    crate::gpt2::ARCHITECTURE,
    crate::gpt_neox::ARCHITECTURE,
    crate::llama::ARCHITECTURE,
    crate::mpt::ARCHITECTURE,
    crate::phi3::ARCHITECTURE,
    crate::qwen2::ARCHITECTURE,
    crate::qwen3::ARCHITECTURE,
    crate::gemma2::ARCHITECTURE,
    crate::olmo2::ARCHITECTURE,
];

/// One architecture's entry in [`ARCHITECTURES`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Architecture {
    /// The `model_type` values of `config.json` it reads.
    pub model_types: &'static [&'static str],
    /// Parses and validates a config whose `model_type` is one of them.
    pub parse: fn(&ConfigFile) -> Result<Arc<dyn ArchConfig>>,
}

/// A validated config: what loading, sharding and the evaluator need of an architecture.
pub(crate) trait ArchConfig: std::fmt::Debug + Send + Sync {
    fn sizes(&self) -> Sizes;

    /// A lower bound on the parameters the config describes (`None` on overflow), checked against the
    /// checkpoint's size before anything is allocated.
    fn parameter_lower_bound(&self) -> Option<u64>;

    /// Declares the model's parameters on `vs` under the checkpoint names of `dir` (not yet loaded).
    fn declare(&self, vs: VarStore, dir: &Path) -> Result<Box<dyn Declared>>;

    /// The stage that uses parameter `name`, `None` for a name the model does not have.
    fn stage_of(&self, name: &str) -> Option<Stage>;
}

/// A `config.json` being parsed: its path, its text, and the `model_type` it names.
#[derive(Debug)]
pub(crate) struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
    pub json: serde_json::Value,
    pub model_type: String,
}

impl ConfigFile {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        Self::parse(path, text)
    }

    pub(crate) fn parse(path: &Path, text: String) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: path.to_owned(), message: format!("invalid JSON: {e}") })?;
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("<missing>").to_owned();
        Ok(Self { path: path.to_owned(), text, json, model_type })
    }

    /// The raw config of an architecture.
    pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.text).map_err(|e| self.error(e.to_string()))
    }

    /// Whether the file has `field` at the top level (also when it is null).
    pub(crate) fn has(&self, field: &str) -> bool {
        self.json.get(field).is_some()
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> Error {
        Error::Config { path: self.path.clone(), message: message.into() }
    }

    /// The error for a field whose value is not positive, if any is.
    pub(crate) fn positive(&self, fields: &[(&str, i64)]) -> Result<()> {
        match fields.iter().find(|(_, value)| *value <= 0) {
            Some((field, value)) => Err(self.error(format!("field `{field}`: {value} is not positive"))),
            None => Ok(()),
        }
    }

    /// The error for `dividend` not divisible by `divisor`.
    pub(crate) fn divisible(&self, (field, dividend): (&str, i64), (by, divisor): (&str, i64)) -> Result<()> {
        if dividend % divisor != 0 {
            return Err(self.error(format!("field `{field}`: {dividend} is not divisible by {by} {divisor}")));
        }
        Ok(())
    }
}

/// Test support: `base` with each `(from, to)` of `edits` replaced (every `from` must occur), read as
/// `config.json` and validated by `validate`.
#[cfg(test)]
pub(crate) fn edited_config<C: serde::de::DeserializeOwned, T>(
    base: &str,
    edits: &[(&str, &str)],
    validate: fn(&ConfigFile, &C) -> Result<T>,
) -> Result<T> {
    let mut text = base.to_owned();
    for (from, to) in edits {
        assert!(text.contains(from), "the config has no `{from}`");
        text = text.replace(from, to);
    }
    let file = ConfigFile::parse(Path::new("config.json"), text)?;
    validate(&file, &file.deserialize()?)
}

/// The architecture that reads `model_type`.
pub(crate) fn architecture(model_type: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.model_types.contains(&model_type))
}

/// The `model_type` values some architecture reads, sorted.
pub fn supported_model_types() -> Vec<&'static str> {
    let mut types: Vec<&str> = ARCHITECTURES.iter().flat_map(|a| a.model_types.iter().copied()).collect();
    types.sort_unstable();
    types
}

/// How an architecture names the modules of each stage: the module paths of the embedding, final
/// norm and head parameters, and the list whose numbered entries are the blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageNames {
    pub embedding: &'static [&'static str],
    /// `blocks.{i}.…` belongs to block `i`.
    pub blocks: &'static str,
    pub final_norm: &'static [&'static str],
    pub head: &'static [&'static str],
}

impl StageNames {
    pub(crate) fn stage_of(&self, name: &str) -> Option<Stage> {
        let (module, _) = name.rsplit_once('.')?;
        if let Some(rest) = module.strip_prefix(self.blocks).and_then(|r| r.strip_prefix('.')) {
            return rest.split('.').next()?.parse().ok().map(Stage::Block);
        }
        if self.embedding.contains(&module) {
            Some(Stage::Embedding)
        } else if self.final_norm.contains(&module) {
            Some(Stage::FinalNorm)
        } else if self.head.contains(&module) {
            Some(Stage::Head)
        } else {
            None
        }
    }
}

/// The input embedding and, per layer, the query and output projections: parameters every supported
/// architecture has at least.
pub(crate) fn parameter_lower_bound(vocab: i64, hidden: i64, layers: i64) -> Option<u64> {
    let (vocab, hidden, layers) =
        (u64::try_from(vocab).ok()?, u64::try_from(hidden).ok()?, u64::try_from(layers).ok()?);
    vocab.checked_mul(hidden)?.checked_add(hidden.checked_mul(hidden)?.checked_mul(2)?.checked_mul(layers)?)
}

/// Declares a decoder on `vs` as a boxed model.
pub(crate) fn declared<D: crate::model::Decoder>(
    vs: VarStore,
    build: impl FnOnce(&VarStore) -> Result<D>,
) -> Result<Box<dyn Declared>> {
    let decoder = build(&vs)?;
    Ok(Box::new(crate::Model::from_parts(vs, decoder)))
}
