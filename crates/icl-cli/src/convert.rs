//! `icl convert`: JSONL, CSV or Parquet in, canonical Parquet task file out (validated first, written
//! to a temporary file and renamed).

use anyhow::{bail, Result};
use icl_data::convert::{convert, ConvertOptions, Preset};
use icl_data::TaskKind;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Task type of the output: language_modeling, multiple_choice, schema or
    /// generation_task_with_answers (implied by --preset). Default: told from the (mapped) fields, as
    /// `icl eval` does.
    #[arg(long = "type")]
    pub task_type: Option<String>,
    /// Native fields of a public release: lambada_openai (text), piqa (goal, sol1, sol2, label),
    /// hellaswag (ctx, endings, label[, activity_label]).
    #[arg(long)]
    pub preset: Option<String>,
    /// Input file: .jsonl, .csv (with a header row) or .parquet.
    #[arg(long)]
    pub input: PathBuf,
    /// Output .parquet file.
    #[arg(long)]
    pub output: PathBuf,
    /// CANONICAL=SOURCE, or CANONICAL=A,B,... to build a list field (choices, context_options) from
    /// several fields in order. Repeatable.
    #[arg(long = "field")]
    pub fields: Vec<String>,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let kind = args.task_type.as_deref().map(TaskKind::from_name).transpose().map_err(anyhow::Error::msg)?;
    let preset = match args.preset.as_deref() {
        None => None,
        Some(name) => match Preset::from_name(name) {
            Some(p) => Some(p),
            None => bail!("unknown preset `{name}` (known: {})", Preset::NAMES.join(", ")),
        },
    };
    let mut fields = BTreeMap::new();
    for f in &args.fields {
        let Some((canonical, sources)) = f.split_once('=') else {
            bail!("--field: expected CANONICAL=SOURCE, got `{f}`")
        };
        let sources: Vec<String> = sources.split(',').map(str::to_owned).collect();
        if canonical.is_empty() || sources.iter().any(String::is_empty) {
            bail!("--field: expected CANONICAL=SOURCE, got `{f}`");
        }
        if fields.insert(canonical.to_owned(), sources).is_some() {
            bail!("--field: `{canonical}` is mapped twice");
        }
    }
    let rows = convert(&args.input, &args.output, &ConvertOptions { kind, preset, fields })?;
    eprintln!("icl convert: {} rows from {} -> {}", rows, args.input.display(), args.output.display());
    Ok(())
}
