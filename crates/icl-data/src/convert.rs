//! Conversion of JSONL, CSV or Parquet files with other layouts into canonical Parquet task files.
//!
//! Each input row becomes a canonical row either through a [`Preset`] (the native fields of a public
//! release) or through a field mapping (canonical field ← one source field, or a list field ← several
//! source fields in order). `gold` given as a string (CSV, or releases that store labels as text) is
//! parsed as an integer. Every converted row then passes the same validation as task files read for
//! evaluation, so a bad row stops the conversion with its file, row and field.

use crate::rows::{self, json_type, Format};
use crate::task::TaskReader;
use crate::{Error, Location, ReadOptions, Result, TaskExamples, TaskKind};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Native layouts of public releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// EleutherAI's `lambada_openai`: `text`; the context is all but the last space-separated word
    /// (lm-evaluation-harness's `text.split(' ')[:-1]`), the continuation the last word.
    LambadaOpenai,
    /// PIQA: `goal`, `sol1`, `sol2`, `label`; the query is `"Question: {goal}\n"` (llm-foundry's local
    /// PIQA file), the choices `[sol1, sol2]`.
    Piqa,
    /// HellaSwag: `ctx`, `endings`, `label`, and `activity_label` if present (the query is then
    /// `"{activity_label}: {ctx}"`, as in llm-foundry's file).
    Hellaswag,
}

impl Preset {
    pub const NAMES: [&'static str; 3] = ["lambada_openai", "piqa", "hellaswag"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "lambada_openai" | "lambada" => Some(Self::LambadaOpenai),
            "piqa" => Some(Self::Piqa),
            "hellaswag" => Some(Self::Hellaswag),
            _ => None,
        }
    }

    pub fn kind(self) -> TaskKind {
        match self {
            Self::LambadaOpenai => TaskKind::LanguageModeling,
            Self::Piqa | Self::Hellaswag => TaskKind::MultipleChoice,
        }
    }

    fn apply(self, row: &SourceRow) -> Result<Map<String, Value>> {
        let mut out = Map::new();
        match self {
            Self::LambadaOpenai => {
                let text = row.string("text")?;
                let Some((context, word)) = text.rsplit_once(' ') else {
                    return Err(row.error("text", "has no space to split the last word off"));
                };
                out.insert("context".into(), context.into());
                out.insert("continuation".into(), word.into());
            }
            Self::Piqa => {
                out.insert("query".into(), format!("Question: {}\n", row.string("goal")?).into());
                out.insert(
                    "choices".into(),
                    Value::Array(vec![row.value("sol1")?.clone(), row.value("sol2")?.clone()]),
                );
                out.insert("gold".into(), row.value("label")?.clone());
            }
            Self::Hellaswag => {
                let ctx = row.string("ctx")?;
                let query = match row.obj.get("activity_label") {
                    Some(Value::String(label)) => format!("{label}: {ctx}"),
                    _ => ctx.to_owned(),
                };
                out.insert("query".into(), query.into());
                out.insert("choices".into(), row.value("endings")?.clone());
                out.insert("gold".into(), row.value("label")?.clone());
            }
        }
        Ok(out)
    }
}

/// How to turn input rows into canonical rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertOptions {
    /// The output type (implied by a preset).
    pub kind: Option<TaskKind>,
    pub preset: Option<Preset>,
    /// Canonical field → source fields: one for a plain mapping, several to build a list field.
    pub fields: BTreeMap<String, Vec<String>>,
}

struct SourceRow<'a> {
    path: &'a Path,
    at: Location,
    obj: Map<String, Value>,
}

impl SourceRow<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Field { path: self.path.to_owned(), at: self.at, field: format!("`{field}`"), message: message.into() }
    }

    fn value(&self, field: &str) -> Result<&Value> {
        self.obj.get(field).ok_or_else(|| self.error(field, "missing"))
    }

    fn string(&self, field: &str) -> Result<&str> {
        match self.value(field)? {
            Value::String(s) => Ok(s),
            other => Err(self.error(field, format!("expected a string, found {}", json_type(other)))),
        }
    }
}

/// Reads and validates `input` as a task of the options' type, in canonical form. Without a type or a
/// preset the type comes from the (mapped) fields as in [`crate::read_task`].
pub fn convert_rows(input: &Path, options: &ConvertOptions) -> Result<TaskExamples> {
    let kind = options.preset.map(Preset::kind).or(options.kind);
    if let (Some(p), Some(k)) = (options.preset, options.kind) {
        if p.kind() != k {
            return Err(Error::File {
                path: input.to_owned(),
                message: format!("the preset makes {} tasks, not {}", p.kind().name(), k.name()),
            });
        }
    }
    for canonical in options.fields.keys() {
        let known = |k: TaskKind| k.fields().contains(&canonical.as_str());
        let message = match kind {
            Some(kind) if !known(kind) => format!(
                "field mapping names `{canonical}`, not a field of {} ({})",
                kind.name(),
                kind.fields().join(", ")
            ),
            None if !TaskKind::ALL.into_iter().any(known) => {
                format!("field mapping names `{canonical}`, not a field of any task type")
            }
            _ => continue,
        };
        return Err(Error::File { path: input.to_owned(), message });
    }
    // Single-source mappings stay mappings, so validation errors name the input's field.
    let read = ReadOptions {
        kind,
        fields: options.fields.iter().filter(|(_, s)| s.len() == 1).map(|(c, s)| (c.clone(), s[0].clone())).collect(),
        ..Default::default()
    };
    let mut reader = TaskReader::new(input, &read);
    rows::read(input, Format::of_input(input), None, |at, obj| {
        let row = SourceRow { path: input, at, obj };
        let mut obj = match options.preset {
            Some(p) => p.apply(&row)?,
            None => row.obj.clone(),
        };
        for (canonical, sources) in options.fields.iter().filter(|(_, s)| s.len() > 1) {
            let items = sources.iter().map(|s| row.value(s).cloned()).collect::<Result<Vec<_>>>()?;
            obj.insert(canonical.clone(), Value::Array(items));
        }
        let gold_key = read.source("gold").to_owned();
        if let Some(Value::String(s)) = obj.get(&gold_key) {
            if let Ok(n) = s.trim().parse::<i64>() {
                obj.insert(gold_key, n.into());
            }
        }
        reader.push(at, obj)
    })?;
    reader.finish()
}

/// Converts `input` to canonical Parquet at `output` (written to a temporary file, then renamed);
/// returns the number of rows.
pub fn convert(input: &Path, output: &Path, options: &ConvertOptions) -> Result<usize> {
    let examples = convert_rows(input, options)?;
    crate::write_task(output, &examples)?;
    Ok(examples.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_task, ChoiceExample, LmExample};

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn preset(p: Preset) -> ConvertOptions {
        ConvertOptions { preset: Some(p), ..Default::default() }
    }

    #[test]
    fn the_type_comes_from_the_fields_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let csv = write(dir.path(), "p.csv", "goal,sol1,sol2,label\nOpen a jar,twist,push,0\n");
        let fields: BTreeMap<String, Vec<String>> = [
            ("query".to_owned(), vec!["goal".to_owned()]),
            ("choices".to_owned(), vec!["sol1".to_owned(), "sol2".to_owned()]),
            ("gold".to_owned(), vec!["label".to_owned()]),
        ]
        .into();
        let inferred = ConvertOptions { fields: fields.clone(), ..Default::default() };
        let expected = TaskExamples::MultipleChoice(vec![ChoiceExample {
            query: "Open a jar".into(),
            choices: vec!["twist".into(), "push".into()],
            gold: 0,
        }]);
        assert_eq!(convert_rows(&csv, &inferred).unwrap(), expected);
        let lm = write(dir.path(), "l.jsonl", "{\"context\": \"a b\", \"continuation\": \"c\"}\n");
        assert_eq!(convert_rows(&lm, &ConvertOptions::default()).unwrap().len(), 1);
        // A declared type still overrides, and is checked row by row.
        let declared = ConvertOptions { kind: Some(TaskKind::Schema), fields, ..Default::default() };
        let e = convert_rows(&csv, &declared).unwrap_err().to_string();
        assert!(e.contains("not a field of schema"), "{e}");
        let e = convert_rows(&lm, &ConvertOptions { kind: Some(TaskKind::MultipleChoice), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("l.jsonl:1") && e.contains("declared multiple_choice"), "{e}");
        let doc = write(dir.path(), "d.jsonl", "{\"text\": \"a b\"}\n");
        assert_eq!(convert_rows(&doc, &ConvertOptions::default()).unwrap().len(), 1, "a perplexity document");
        let odd = write(dir.path(), "o.jsonl", "{\"words\": \"a b\"}\n");
        let e = convert_rows(&odd, &ConvertOptions::default()).unwrap_err().to_string();
        assert!(e.contains("o.jsonl:1") && e.contains("cannot tell the task type"), "{e}");
        let bad =
            ConvertOptions { fields: [("question".to_owned(), vec!["q".to_owned()])].into(), ..Default::default() };
        let e = convert_rows(&lm, &bad).unwrap_err().to_string();
        assert!(e.contains("`question`, not a field of any task type"), "{e}");
    }

    #[test]
    fn presets_map_public_releases() {
        let dir = tempfile::tempdir().unwrap();
        let lambada = write(dir.path(), "l.jsonl", "{\"text\": \"he looked at the  old door\"}\n");
        assert_eq!(
            convert_rows(&lambada, &preset(Preset::LambadaOpenai)).unwrap(),
            TaskExamples::LanguageModeling(vec![LmExample {
                context: "he looked at the  old".into(),
                continuation: "door".into()
            }])
        );
        let piqa = write(dir.path(), "p.csv", "goal,sol1,sol2,label\nopen a jar,\"twist, lid\",smash it,0\n");
        assert_eq!(
            convert_rows(&piqa, &preset(Preset::Piqa)).unwrap(),
            TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "Question: open a jar\n".into(),
                choices: vec!["twist, lid".into(), "smash it".into()],
                gold: 0
            }])
        );
        let hs = write(
            dir.path(),
            "h.jsonl",
            "{\"activity_label\": \"Cooking\", \"ctx\": \"A man\", \"endings\": [\"a\", \"b\", \"c\", \"d\"], \"label\": \"2\"}\n",
        );
        let out = dir.path().join("h.parquet");
        assert_eq!(convert(&hs, &out, &preset(Preset::Hellaswag)).unwrap(), 1);
        let t = read_task("h", &out, &ReadOptions::default()).unwrap();
        assert_eq!(
            t.examples,
            TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "Cooking: A man".into(),
                choices: vec!["a".into(), "b".into(), "c".into(), "d".into()],
                gold: 2
            }])
        );
    }

    #[test]
    fn field_mappings_and_list_fields() {
        let dir = tempfile::tempdir().unwrap();
        let csv = write(dir.path(), "s.csv", "sentence_a,sentence_b,rest,answer\nA did,B did,it.,1\n");
        let options = ConvertOptions {
            kind: Some(TaskKind::Schema),
            preset: None,
            fields: [
                ("context_options".to_owned(), vec!["sentence_a".to_owned(), "sentence_b".to_owned()]),
                ("continuation".to_owned(), vec!["rest".to_owned()]),
                ("gold".to_owned(), vec!["answer".to_owned()]),
            ]
            .into(),
        };
        let out = dir.path().join("s.parquet");
        convert(&csv, &out, &options).unwrap();
        let t = read_task("s", &out, &ReadOptions::default()).unwrap();
        assert_eq!(t.kind(), TaskKind::Schema);
        assert_eq!(t.choice(0), Some((2, 1)));
    }

    #[test]
    fn generation_tasks_convert() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write(
            dir.path(),
            "q.jsonl",
            "{\"question\": \"Q: a?\", \"answer\": \"b\", \"aliases\": [\"b\", \"B\"]}\n{\"question\": \"Q: c?\", \"answer\": \"d\"}\n",
        );
        let options = ConvertOptions {
            kind: Some(TaskKind::GenerationWithAnswers),
            fields: [("context".to_owned(), vec!["question".to_owned()])].into(),
            ..Default::default()
        };
        let out = dir.path().join("q.parquet");
        assert_eq!(convert(&jsonl, &out, &options).unwrap(), 2);
        let t = read_task("q", &out, &ReadOptions::default()).unwrap();
        let TaskExamples::GenerationWithAnswers(v) = &t.examples else { panic!("{:?}", t.kind()) };
        assert_eq!((v[0].context.as_str(), v[0].aliases.len(), v[1].aliases.len()), ("Q: a?", 2, 0));
        // CSV: aliases from several columns; a scalar aliases cell is an error naming row and field.
        let csv = write(dir.path(), "q.csv", "context,answer,alt1,alt2\nQ: a?,b,B,bee\n");
        let options = ConvertOptions {
            kind: Some(TaskKind::GenerationWithAnswers),
            fields: [("aliases".to_owned(), vec!["alt1".to_owned(), "alt2".to_owned()])].into(),
            ..Default::default()
        };
        convert(&csv, &out, &options).unwrap();
        let t = read_task("q", &out, &ReadOptions::default()).unwrap();
        let TaskExamples::GenerationWithAnswers(v) = &t.examples else { panic!() };
        assert_eq!(v[0].accepted(), vec!["b".to_owned(), "B".to_owned(), "bee".to_owned()]);
        let csv = write(dir.path(), "bad.csv", "context,answer,aliases\nQ: a?,b,B\n");
        let options = ConvertOptions { kind: Some(TaskKind::GenerationWithAnswers), ..Default::default() };
        let e = convert(&csv, &out, &options).unwrap_err().to_string();
        assert!(e.contains("bad.csv row 1: field `aliases`: expected a list of strings, found a string"), "{e}");
    }

    #[test]
    fn bad_rows_name_file_row_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let piqa = write(dir.path(), "p.csv", "goal,sol1,sol2,label\na,b,c,1\nd,e,f,-1\n");
        let out = dir.path().join("p.parquet");
        let e = convert(&piqa, &out, &preset(Preset::Piqa)).unwrap_err().to_string();
        assert!(e.contains("p.csv row 2: field `gold`: expected a non-negative integer, found -1"), "{e}");
        assert!(!out.exists(), "no output for bad input");
        let lambada = write(dir.path(), "l.jsonl", "{\"text\": \"a b\"}\n{\"txt\": \"c d\"}\n");
        let e = convert(&lambada, &out, &preset(Preset::LambadaOpenai)).unwrap_err().to_string();
        assert!(e.contains("l.jsonl:2: field `text`: missing"), "{e}");
        let mapped = write(dir.path(), "m.jsonl", "{\"ctx\": 3, \"continuation\": \"x\"}\n");
        let options = ConvertOptions {
            kind: Some(TaskKind::LanguageModeling),
            fields: [("context".to_owned(), vec!["ctx".to_owned()])].into(),
            ..Default::default()
        };
        let e = convert(&mapped, &out, &options).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:1: field `ctx` (read as `context`): expected a string, found a number"), "{e}");
        let good = write(dir.path(), "g.jsonl", "{\"ctx\": \"a\", \"continuation\": \"x\"}\n");
        let e = convert(&good, &dir.path().join("out.jsonl"), &options).unwrap_err().to_string();
        assert!(e.contains("out.jsonl: the output must be a .parquet file"), "{e}");
    }
}
