//! Reading and validating task files (llm-foundry's local JSONL schema).

use crate::{Error, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The task types this crate reads, told apart by the fields of a file's first row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// `{context, continuation}`: is the continuation the model's greedy completion?
    LanguageModeling,
    /// `{query, choices[], gold}`: which choice is most likely after the query?
    MultipleChoice,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::LanguageModeling => "language_modeling",
            Self::MultipleChoice => "multiple_choice",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub context: String,
    pub continuation: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceExample {
    pub query: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// The rows of a task file, in file order: row `i` is example index `i`.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskExamples {
    LanguageModeling(Vec<LmExample>),
    MultipleChoice(Vec<ChoiceExample>),
}

#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub examples: TaskExamples,
}

impl Task {
    pub fn kind(&self) -> TaskKind {
        match self.examples {
            TaskExamples::LanguageModeling(_) => TaskKind::LanguageModeling,
            TaskExamples::MultipleChoice(_) => TaskKind::MultipleChoice,
        }
    }

    pub fn len(&self) -> usize {
        match &self.examples {
            TaskExamples::LanguageModeling(v) => v.len(),
            TaskExamples::MultipleChoice(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a JSONL task file: one JSON object per line, blank lines ignored, at most `limit` rows.
///
/// The task type comes from the first row's fields; every row must then have that type's fields with
/// the right JSON types. Errors name the file, the 1-based line and the field.
pub fn read_task(name: &str, path: &Path, limit: Option<usize>) -> Result<Task> {
    let io_err = |source| Error::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut kind = None;
    let mut lm = Vec::new();
    let mut mc = Vec::new();
    let mut rows = 0usize;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|n| rows >= n) {
            break;
        }
        let line = line.map_err(io_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let row = Row { path, line: i + 1 };
        let value: Value = serde_json::from_str(&line)
            .map_err(|e| Error::Json { path: path.to_owned(), line: row.line, message: e.to_string() })?;
        let Value::Object(obj) = value else {
            return Err(row.error("<row>", "expected a JSON object"));
        };
        let kind = match kind {
            Some(k) => k,
            None => *kind.insert(detect_kind(&obj, &row)?),
        };
        match kind {
            TaskKind::LanguageModeling => lm.push(LmExample {
                context: row.string(&obj, "context")?,
                continuation: row.string(&obj, "continuation")?,
            }),
            TaskKind::MultipleChoice => mc.push(row.choice_example(&obj)?),
        }
        rows += 1;
    }
    let examples = match kind {
        Some(TaskKind::LanguageModeling) => TaskExamples::LanguageModeling(lm),
        Some(TaskKind::MultipleChoice) => TaskExamples::MultipleChoice(mc),
        None => {
            return Err(Error::File { path: path.to_owned(), message: "the task file has no rows".into() })
        }
    };
    Ok(Task { name: name.to_owned(), path: path.to_owned(), examples })
}

fn detect_kind(obj: &Map<String, Value>, row: &Row) -> Result<TaskKind> {
    let has = |k: &str| obj.contains_key(k);
    if has("context_options") {
        return Err(row.error("context_options", "task type `schema` is not supported yet"));
    }
    if has("answer") || has("aliases") {
        return Err(row.error("answer", "task type `generation_task_with_answers` is not supported yet"));
    }
    if has("choices") || has("query") || has("gold") {
        return Ok(TaskKind::MultipleChoice);
    }
    if has("continuation") || has("context") {
        return Ok(TaskKind::LanguageModeling);
    }
    Err(row.error(
        "<row>",
        "cannot tell the task type: expected {context, continuation} (language_modeling) \
         or {query, choices, gold} (multiple_choice)",
    ))
}

struct Row<'a> {
    path: &'a Path,
    line: usize,
}

impl Row<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Field {
            path: self.path.to_owned(),
            line: self.line,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn field<'v>(&self, obj: &'v Map<String, Value>, field: &str) -> Result<&'v Value> {
        obj.get(field).ok_or_else(|| self.error(field, "missing"))
    }

    fn string(&self, obj: &Map<String, Value>, field: &str) -> Result<String> {
        match self.field(obj, field)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.error(field, format!("expected a string, found {}", json_type(other)))),
        }
    }

    fn choice_example(&self, obj: &Map<String, Value>) -> Result<ChoiceExample> {
        let query = self.string(obj, "query")?;
        let Value::Array(items) = self.field(obj, "choices")? else {
            return Err(self.error("choices", "expected an array of strings"));
        };
        if items.is_empty() {
            return Err(self.error("choices", "is empty"));
        }
        let choices = items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.error(
                    &format!("choices[{i}]"),
                    format!("expected a string, found {}", json_type(other)),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let gold = match self.field(obj, "gold")? {
            Value::Number(n) => n.as_u64().ok_or_else(|| {
                self.error("gold", format!("expected a non-negative integer, found {n}"))
            })?,
            other => {
                return Err(self.error("gold", format!("expected an integer, found {}", json_type(other))))
            }
        };
        let gold = usize::try_from(gold).unwrap_or(usize::MAX);
        if gold >= choices.len() {
            return Err(self.error(
                "gold",
                format!("{gold} is out of range for {} choices", choices.len()),
            ));
        }
        Ok(ChoiceExample { query, choices, gold })
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    fn error_of(contents: &str) -> String {
        let f = file(contents);
        read_task("t", f.path(), None).unwrap_err().to_string()
    }

    #[test]
    fn reads_both_kinds_and_honours_limit() {
        let f = file("{\"context\": \"a b\", \"continuation\": \"c\"}\n\n{\"context\": \"d\", \"continuation\": \"e\"}\n");
        let t = read_task("lm", f.path(), None).unwrap();
        assert_eq!(t.kind(), TaskKind::LanguageModeling);
        assert_eq!(t.len(), 2);
        assert_eq!(read_task("lm", f.path(), Some(1)).unwrap().len(), 1);

        let f = file("{\"query\": \"q\", \"choices\": [\"x\", \"y\"], \"gold\": 1}\n");
        let t = read_task("mc", f.path(), None).unwrap();
        assert_eq!(
            t.examples,
            TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "q".into(),
                choices: vec!["x".into(), "y".into()],
                gold: 1
            }])
        );
    }

    #[test]
    fn malformed_json_names_the_line() {
        let e = error_of("{\"context\": \"a\", \"continuation\": \"b\"}\n{\"context\": \"a\",\n");
        assert!(e.contains(":2: malformed JSON"), "{e}");
    }

    #[test]
    fn missing_field_names_line_and_field() {
        let e = error_of("{\"context\": \"a\", \"continuation\": \"b\"}\n{\"context\": \"a\"}\n");
        assert!(e.contains(":2: field `continuation`: missing"), "{e}");
    }

    #[test]
    fn gold_out_of_range() {
        let e = error_of("{\"query\": \"q\", \"choices\": [\"x\", \"y\"], \"gold\": 2}\n");
        assert!(e.contains(":1: field `gold`: 2 is out of range for 2 choices"), "{e}");
        let e = error_of("{\"query\": \"q\", \"choices\": [\"x\"], \"gold\": -1}\n");
        assert!(e.contains("field `gold`: expected a non-negative integer"), "{e}");
    }

    #[test]
    fn empty_choices_and_wrong_types() {
        let e = error_of("{\"query\": \"q\", \"choices\": [], \"gold\": 0}\n");
        assert!(e.contains(":1: field `choices`: is empty"), "{e}");
        let e = error_of("{\"query\": \"q\", \"choices\": [\"a\", 3], \"gold\": 0}\n");
        assert!(e.contains("field `choices[1]`: expected a string, found a number"), "{e}");
        let e = error_of("{\"context\": 5, \"continuation\": \"b\"}\n");
        assert!(e.contains("field `context`: expected a string, found a number"), "{e}");
    }

    #[test]
    fn empty_file_and_unknown_rows() {
        assert!(error_of("\n\n").contains("has no rows"));
        assert!(error_of("{\"text\": \"a\"}\n").contains("cannot tell the task type"));
        assert!(error_of("[1, 2]\n").contains("expected a JSON object"));
        let missing = read_task("t", Path::new("/nonexistent/task.jsonl"), None).unwrap_err();
        assert!(missing.to_string().starts_with("/nonexistent/task.jsonl: "), "{missing}");
    }
}
