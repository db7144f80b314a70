//! Reading and validating task files: llm-foundry's local schema, as JSONL or Parquet (rows from
//! [`crate::rows`]).

use crate::rows::{self, json_type, Format};
use crate::{
    ChoiceExample, Error, GenerationExample, LmExample, Location, PerplexityExample, Result, SchemaExample, Task,
    TaskExamples, TaskKind,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Canonical field name → the file's field (column) that holds it, for files with other names.
pub type FieldMap = BTreeMap<String, String>;

/// How to read a task file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    /// The declared type; `None` tells it from the fields (the first row of a JSONL file, the columns
    /// of a Parquet file).
    pub kind: Option<TaskKind>,
    /// Other field names for canonical fields (`query` → `ctx` reads the file's `ctx` as `query`).
    pub fields: FieldMap,
    /// Only the rows whose `category` field is this (llm-foundry's `has_categories`: one dataset per
    /// category, rows numbered within it); every row must then have a string `category`.
    pub category: Option<String>,
}

/// The field `has_categories` partitions a task file by.
pub const CATEGORY_FIELD: &str = "category";

/// A generation row's optional chain of thought (gsm8k, svamp): shots show it before the
/// `cot_delimiter` and the answer.
pub const CHAIN_OF_THOUGHT_FIELD: &str = "chain_of_thought";

/// The sorted distinct `category` values of a task file (llm-foundry's `partition_dataset_by_category`
/// sorts them too). Errors name the file, the row and the field when a row has none.
pub fn read_categories(path: &Path) -> Result<Vec<String>> {
    let format = Format::of_task_file(path);
    let wanted = match rows::columns(path, format)? {
        Some(columns) if !columns.iter().any(|c| c == CATEGORY_FIELD) => {
            return Err(Error::File {
                path: path.to_owned(),
                message: format!("has_categories: the file has no column `{CATEGORY_FIELD}` (it has {columns:?})"),
            })
        }
        Some(_) => Some(vec![CATEGORY_FIELD]),
        None => None,
    };
    let mut categories = std::collections::BTreeSet::new();
    rows::read(path, format, wanted.as_deref(), |at, obj| {
        categories.insert(row_category(path, at, &obj)?.to_owned());
        Ok(())
    })?;
    if categories.is_empty() {
        return Err(Error::File { path: path.to_owned(), message: "the task file has no rows".into() });
    }
    Ok(categories.into_iter().collect())
}

/// A row's `category`, which `has_categories` needs on every row.
fn row_category<'v>(path: &Path, at: Location, obj: &'v Map<String, Value>) -> Result<&'v str> {
    let error =
        |message: String| Error::Field { path: path.to_owned(), at, field: format!("`{CATEGORY_FIELD}`"), message };
    match obj.get(CATEGORY_FIELD) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(error(format!("expected a string, found {} (has_categories: true)", json_type(other)))),
        None => Err(error("missing: has_categories: true needs a category on every row".into())),
    }
}

impl ReadOptions {
    /// The file's name for a canonical field.
    pub fn source<'a>(&'a self, canonical: &'a str) -> &'a str {
        self.fields.get(canonical).map_or(canonical, String::as_str)
    }

    fn check_fields(&self, path: &Path) -> Result<()> {
        for canonical in self.fields.keys() {
            if !TaskKind::ALL.iter().any(|k| k.fields().contains(&canonical.as_str())) {
                return Err(Error::File {
                    path: path.to_owned(),
                    message: format!(
                        "field mapping names `{canonical}`, which is no task type's field \
                         (context, continuation, query, choices, gold, context_options, answer, aliases, \
                         text)"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Reads every row of a task file: Parquet (`.parquet`, only the needed columns are read) or JSONL
/// (one JSON object per line, blank lines ignored).
///
/// Every row must have the task type's fields with the right types, and every question the same
/// number of options. Errors name the file, the row (JSONL: line) and the field.
pub fn read_task(name: &str, path: &Path, options: &ReadOptions) -> Result<Task> {
    options.check_fields(path)?;
    let mut reader = TaskReader::new(path, options);
    let format = Format::of_task_file(path);
    // A file that declares its columns (Parquet) has its type told and its columns checked first.
    let wanted = match rows::columns(path, format)? {
        Some(columns) => {
            let (kind, wanted) = wanted_columns(path, options, &columns)?;
            reader.kind = Some(kind);
            Some(wanted)
        }
        None => None,
    };
    rows::read(path, format, wanted.as_deref(), |at, obj| reader.push(at, obj))?;
    Ok(Task { name: name.to_owned(), path: path.to_owned(), examples: reader.finish()? })
}

/// The task type a file's columns show (unless declared) and the columns to read for it.
fn wanted_columns<'a>(path: &Path, options: &'a ReadOptions, columns: &[String]) -> Result<(TaskKind, Vec<&'a str>)> {
    let kind = match options.kind {
        Some(k) => k,
        None => {
            let canonical = canonical_names(columns, options);
            TaskKind::detect(|f| canonical.contains(&f)).ok_or_else(|| Error::File {
                path: path.to_owned(),
                message: format!("cannot tell the task type from the columns {columns:?}; {}", EXPECTED),
            })?
        }
    };
    // Optional fields are read when the file has them.
    let fields: Vec<&str> = kind
        .fields()
        .iter()
        .copied()
        .filter(|f| !kind.optional_fields().contains(f) || columns.iter().any(|c| c == options.source(f)))
        .collect();
    let mut wanted: Vec<&str> = fields.iter().map(|f| options.source(f)).collect();
    for (canonical, source) in fields.iter().zip(wanted.clone()) {
        if !columns.iter().any(|c| c == source) {
            return Err(Error::File {
                path: path.to_owned(),
                message: format!(
                    "field {}: no such column (the file has {columns:?}; a {} task needs {:?})",
                    field_label(options, canonical),
                    kind.name(),
                    wanted
                ),
            });
        }
    }
    if options.category.is_some() {
        if !columns.iter().any(|c| c == CATEGORY_FIELD) {
            return Err(Error::File {
                path: path.to_owned(),
                message: format!("has_categories: the file has no column `{CATEGORY_FIELD}` (it has {columns:?})"),
            });
        }
        wanted.push(CATEGORY_FIELD);
    }
    if kind == TaskKind::GenerationWithAnswers && columns.iter().any(|c| c == CHAIN_OF_THOUGHT_FIELD) {
        wanted.push(CHAIN_OF_THOUGHT_FIELD);
    }
    Ok((kind, wanted))
}

const EXPECTED: &str = "expected {context, continuation} (language_modeling), {query, choices, gold} \
                        (multiple_choice), {context_options, continuation, gold} (schema), {context, \
                        answer, aliases} (generation_task_with_answers) or {text} (perplexity)";

/// The canonical fields a file's columns provide under a mapping.
fn canonical_names(columns: &[String], options: &ReadOptions) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = TaskKind::ALL.iter().flat_map(|k| k.fields().iter().copied()).collect();
    names.sort_unstable();
    names.dedup();
    names.retain(|c| columns.iter().any(|col| col == options.source(c)));
    names
}

/// How errors name a canonical field: the file's name, and the canonical one if it differs.
fn field_label(options: &ReadOptions, canonical: &str) -> String {
    let (base, rest) = canonical.find('[').map_or((canonical, ""), |i| canonical.split_at(i));
    match options.fields.get(base) {
        Some(source) if source != base => format!("`{source}{rest}` (read as `{base}`)"),
        _ => format!("`{canonical}`"),
    }
}

/// Accumulates validated rows of one type.
pub(crate) struct TaskReader<'a> {
    path: &'a Path,
    options: &'a ReadOptions,
    kind: Option<TaskKind>,
    examples: Option<TaskExamples>,
    /// Options per question, from the first row: every row must agree.
    width: Option<(usize, Location)>,
    /// Generation: whether the first row had a chain of thought (every row must agree).
    chain_of_thought: Option<(bool, Location)>,
}

impl<'a> TaskReader<'a> {
    pub(crate) fn new(path: &'a Path, options: &'a ReadOptions) -> Self {
        Self { path, options, kind: options.kind, examples: None, width: None, chain_of_thought: None }
    }

    pub(crate) fn finish(self) -> Result<TaskExamples> {
        self.examples
            .ok_or_else(|| Error::File { path: self.path.to_owned(), message: "the task file has no rows".into() })
    }

    pub(crate) fn push(&mut self, at: Location, obj: Map<String, Value>) -> Result<()> {
        if let Some(wanted) = &self.options.category {
            if row_category(self.path, at, &obj)? != wanted {
                return Ok(());
            }
        }
        let row = Row { path: self.path, at, options: self.options, obj };
        let kind = match self.kind {
            Some(k) => k,
            None => {
                let k = row.detect_kind()?;
                self.kind = Some(k);
                k
            }
        };
        if self.options.kind.is_some() {
            row.check_declared(kind)?;
        }
        let examples = self.examples.get_or_insert_with(|| match kind {
            TaskKind::LanguageModeling => TaskExamples::LanguageModeling(Vec::new()),
            TaskKind::MultipleChoice => TaskExamples::MultipleChoice(Vec::new()),
            TaskKind::Schema => TaskExamples::Schema(Vec::new()),
            TaskKind::GenerationWithAnswers => TaskExamples::GenerationWithAnswers(Vec::new()),
            TaskKind::Perplexity => TaskExamples::Perplexity(Vec::new()),
        });
        let width = match examples {
            TaskExamples::LanguageModeling(v) => {
                v.push(LmExample { context: row.string("context")?, continuation: row.string("continuation")? });
                None
            }
            TaskExamples::MultipleChoice(v) => {
                let query = row.string("query")?;
                let choices = row.strings("choices")?;
                let gold = row.gold(choices.len(), "choices")?;
                v.push(ChoiceExample { query, choices, gold });
                Some(("choices", v[v.len() - 1].choices.len()))
            }
            TaskExamples::Schema(v) => {
                let context_options = row.strings("context_options")?;
                let continuation = row.string("continuation")?;
                let gold = row.gold(context_options.len(), "context options")?;
                v.push(SchemaExample { context_options, continuation, gold });
                Some(("context_options", v[v.len() - 1].context_options.len()))
            }
            TaskExamples::GenerationWithAnswers(v) => {
                let context = row.string("context")?;
                let answer = row.string("answer")?;
                if answer.trim().is_empty() {
                    return Err(row.error("answer", "is empty: every answer would match it"));
                }
                let aliases = if row.has("aliases") { row.list_of_strings("aliases")? } else { Vec::new() };
                let chain_of_thought = match row.obj.get(CHAIN_OF_THOUGHT_FIELD) {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => {
                        return Err(
                            row.error(CHAIN_OF_THOUGHT_FIELD, format!("expected a string, found {}", json_type(other)))
                        )
                    }
                };
                // llm-foundry decides per file (a column of the dataset) whether shots show one.
                match self.chain_of_thought {
                    None => self.chain_of_thought = Some((chain_of_thought.is_some(), at)),
                    Some((first, first_at)) if first != chain_of_thought.is_some() => {
                        let (has, first_has) = if first { ("lacks", "has") } else { ("has", "lacks") };
                        return Err(row.error(
                            CHAIN_OF_THOUGHT_FIELD,
                            format!(
                                "this row {has} it but the first row (at{first_at}) {first_has} it: every row or none"
                            ),
                        ));
                    }
                    Some(_) => {}
                }
                v.push(GenerationExample { context, answer, aliases, chain_of_thought });
                None
            }
            TaskExamples::Perplexity(v) => {
                v.push(PerplexityExample { text: row.string("text")? });
                None
            }
        };
        if let Some((field, n)) = width {
            match self.width {
                None => self.width = Some((n, at)),
                Some((first, first_at)) if first != n => {
                    let first_at = match first_at {
                        Location::Line(l) => format!("line {l}"),
                        Location::Row(r) => format!("row {r}"),
                    };
                    return Err(row.error(
                        field,
                        format!("has {n} entries but {first_at} has {first}: every question of a task needs the same number"),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

struct Row<'a> {
    path: &'a Path,
    at: Location,
    options: &'a ReadOptions,
    obj: Map<String, Value>,
}

impl Row<'_> {
    fn error(&self, canonical: &str, message: impl Into<String>) -> Error {
        Error::Field {
            path: self.path.to_owned(),
            at: self.at,
            field: field_label(self.options, canonical),
            message: message.into(),
        }
    }

    fn has(&self, canonical: &str) -> bool {
        self.obj.contains_key(self.options.source(canonical))
    }

    fn detect_kind(&self) -> Result<TaskKind> {
        TaskKind::detect(|f| self.has(f))
            .ok_or_else(|| self.error("<row>", format!("cannot tell the task type: {EXPECTED}")))
    }

    /// A row whose fields are another type's is reported as such, not as a bare missing field.
    fn check_declared(&self, declared: TaskKind) -> Result<()> {
        let missing: Vec<&str> = declared
            .fields()
            .iter()
            .copied()
            .filter(|f| !self.has(f) && !declared.optional_fields().contains(f))
            .collect();
        let Some(first) = missing.first() else { return Ok(()) };
        match TaskKind::detect(|f| self.has(f)) {
            Some(actual) if actual != declared => Err(self.error(
                first,
                format!(
                    "missing: the task is declared {} but the row has the fields of a {} task ({})",
                    declared.name(),
                    actual.name(),
                    actual.fields().join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    fn field(&self, canonical: &str) -> Result<&Value> {
        self.obj.get(self.options.source(canonical)).ok_or_else(|| self.error(canonical, "missing"))
    }

    fn string(&self, canonical: &str) -> Result<String> {
        match self.field(canonical)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.error(canonical, format!("expected a string, found {}", json_type(other)))),
        }
    }

    fn strings(&self, canonical: &str) -> Result<Vec<String>> {
        let Value::Array(items) = self.field(canonical)? else {
            let found = json_type(self.field(canonical)?);
            return Err(self.error(canonical, format!("expected an array of strings, found {found}")));
        };
        if items.is_empty() {
            return Err(self.error(canonical, "is empty"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => {
                    Err(self
                        .error(&format!("{canonical}[{i}]"), format!("expected a string, found {}", json_type(other))))
                }
            })
            .collect()
    }

    /// A list of strings that may be empty (aliases); Parquet nulls in the list are errors.
    fn list_of_strings(&self, canonical: &str) -> Result<Vec<String>> {
        match self.field(canonical)? {
            Value::Array(items) if items.is_empty() => Ok(Vec::new()),
            Value::Array(_) => self.strings(canonical),
            other => Err(self.error(canonical, format!("expected a list of strings, found {}", json_type(other)))),
        }
    }

    fn gold(&self, n: usize, what: &str) -> Result<usize> {
        let gold = match self.field("gold")? {
            Value::Number(num) => num
                .as_u64()
                .ok_or_else(|| self.error("gold", format!("expected a non-negative integer, found {num}")))?,
            other => return Err(self.error("gold", format!("expected an integer, found {}", json_type(other)))),
        };
        let gold = usize::try_from(gold).unwrap_or(usize::MAX);
        if gold >= n {
            return Err(self.error("gold", format!("{gold} is out of range for {n} {what}")));
        }
        Ok(gold)
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

    fn read(contents: &str, options: &ReadOptions) -> Result<Task> {
        let f = file(contents);
        read_task("t", f.path(), options)
    }

    fn error_of(contents: &str) -> String {
        read(contents, &ReadOptions::default()).unwrap_err().to_string()
    }

    #[test]
    fn reads_every_kind() {
        let t = read(
            "{\"context\": \"a b\", \"continuation\": \"c\"}\n\n{\"context\": \"d\", \"continuation\": \"e\"}\n",
            &ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(t.kind(), TaskKind::LanguageModeling);
        assert_eq!(t.len(), 2);

        let t =
            read("{\"query\": \"q\", \"choices\": [\"x\", \"y\"], \"gold\": 1}\n", &ReadOptions::default()).unwrap();
        assert_eq!(
            t.examples,
            TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "q".into(),
                choices: vec!["x".into(), "y".into()],
                gold: 1
            }])
        );
        assert_eq!(t.choice(0), Some((2, 1)));

        let t = read(
            "{\"context_options\": [\"A said\", \"B said\"], \"continuation\": \"hi\", \"gold\": 1}\n",
            &ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(t.kind(), TaskKind::Schema);
        assert_eq!(t.choice(0), Some((2, 1)));
    }

    #[test]
    fn field_mapping_reads_other_names_and_names_them_in_errors() {
        let fields: FieldMap =
            [("query".to_owned(), "ctx".to_owned()), ("choices".to_owned(), "endings".to_owned())].into();
        let options = ReadOptions { kind: None, fields, ..Default::default() };
        let t = read("{\"ctx\": \"q\", \"endings\": [\"x\", \"y\"], \"gold\": 0}\n", &options).unwrap();
        assert_eq!(t.kind(), TaskKind::MultipleChoice);
        let e = read("{\"ctx\": \"q\", \"endings\": [\"x\", 7], \"gold\": 0}\n", &options).unwrap_err().to_string();
        assert!(e.contains(":1: field `endings[1]` (read as `choices`): expected a string, found a number"), "{e}");
        let bad =
            ReadOptions { kind: None, fields: [("question".to_owned(), "q".to_owned())].into(), ..Default::default() };
        let e = read("{\"q\": 1}\n", &bad).unwrap_err().to_string();
        assert!(e.contains("no task type's field"), "{e}");
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
        let e = error_of("{\"context_options\": [\"a\", \"b\"], \"continuation\": \"c\", \"gold\": \"0\"}\n");
        assert!(e.contains("field `gold`: expected an integer, found a string"), "{e}");
    }

    #[test]
    fn empty_choices_and_wrong_types() {
        let e = error_of("{\"query\": \"q\", \"choices\": [], \"gold\": 0}\n");
        assert!(e.contains(":1: field `choices`: is empty"), "{e}");
        let e = error_of("{\"query\": \"q\", \"choices\": [\"a\", 3], \"gold\": 0}\n");
        assert!(e.contains("field `choices[1]`: expected a string, found a number"), "{e}");
        let e = error_of("{\"context\": 5, \"continuation\": \"b\"}\n");
        assert!(e.contains("field `context`: expected a string, found a number"), "{e}");
        let e = error_of("{\"context_options\": \"a\", \"continuation\": \"b\", \"gold\": 0}\n");
        assert!(e.contains("field `context_options`: expected an array of strings, found a string"), "{e}");
    }

    #[test]
    fn inconsistent_choice_counts() {
        let e = error_of(
            "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": \"q\", \"choices\": [\"a\", \"b\", \"c\"], \"gold\": 0}\n",
        );
        assert!(e.contains(":2: field `choices`: has 3 entries but line 1 has 2"), "{e}");
    }

    #[test]
    fn declared_type_must_match_the_rows() {
        let schema_row = "{\"context_options\": [\"a\", \"b\"], \"continuation\": \"c\", \"gold\": 0}\n";
        let options = ReadOptions { kind: Some(TaskKind::MultipleChoice), ..Default::default() };
        let e = read(schema_row, &options).unwrap_err().to_string();
        assert!(
            e.contains(":1: field `query`: missing: the task is declared multiple_choice but the row has the fields of a schema task"),
            "{e}"
        );
    }

    #[test]
    fn empty_file_and_unknown_rows() {
        assert!(error_of("\n\n").contains("has no rows"));
        assert!(error_of("{\"words\": \"a\"}\n").contains("cannot tell the task type"));
        assert!(error_of("[1, 2]\n").contains("expected a JSON object"));
        assert!(TaskKind::from_name("code_evaluation").unwrap_err().contains("not supported yet"));
        let missing = read_task("t", Path::new("/nonexistent/task.jsonl"), &ReadOptions::default()).unwrap_err();
        assert!(missing.to_string().starts_with("/nonexistent/task.jsonl: "), "{missing}");
    }

    #[test]
    fn reads_answers_and_aliases() {
        let t = read(
            "{\"context\": \"Q: x?\", \"answer\": \"Paris\", \"aliases\": [\"Paris\", \"Paree\"]}\n\
             {\"context\": \"Q: y?\", \"answer\": \"Rome\"}\n{\"context\": \"Q\", \"answer\": \"z\", \"aliases\": []}\n",
            &ReadOptions::default(),
        )
        .unwrap();
        assert_eq!(t.kind(), TaskKind::GenerationWithAnswers);
        let TaskExamples::GenerationWithAnswers(v) = &t.examples else { panic!("{:?}", t.kind()) };
        assert_eq!(v[0].accepted(), vec!["Paris".to_owned(), "Paree".to_owned()]);
        assert_eq!(v[1].accepted(), vec!["Rome".to_owned()]);
        assert_eq!(t.choice(0), None);
        for name in ["generation_task_with_answers", "question_answering"] {
            assert_eq!(TaskKind::from_name(name), Ok(TaskKind::GenerationWithAnswers));
        }
    }

    #[test]
    fn bad_rows_name_line_and_field() {
        let e = error_of("{\"context\": \"q\", \"answer\": \"a\", \"aliases\": \"a\"}\n");
        assert!(e.contains(":1: field `aliases`: expected a list of strings, found a string"), "{e}");
        let e = error_of("{\"context\": \"q\", \"answer\": \"a\"}\n{\"context\": \"q\", \"answer\": \"a\", \"aliases\": [\"b\", 3]}\n");
        assert!(e.contains(":2: field `aliases[1]`: expected a string, found a number"), "{e}");
        let e = error_of("{\"context\": \"q\", \"answer\": \"a\"}\n{\"context\": \"q\", \"aliases\": [\"b\"]}\n");
        assert!(e.contains(":2: field `answer`: missing"), "{e}");
        let e = error_of("{\"context\": \"q\", \"answer\": 5}\n");
        assert!(e.contains(":1: field `answer`: expected a string, found a number"), "{e}");
        let e = error_of("{\"context\": \"q\", \"answer\": \" \"}\n");
        assert!(e.contains(":1: field `answer`: is empty"), "{e}");
        let declared = ReadOptions { kind: Some(TaskKind::GenerationWithAnswers), ..Default::default() };
        let e = read("{\"context\": \"q\", \"continuation\": \"a\"}\n", &declared).unwrap_err().to_string();
        assert!(e.contains("field `answer`: missing: the task is declared generation_task_with_answers but the row has the fields of a language_modeling task"), "{e}");
    }

    #[test]
    fn text_rows_are_perplexity_documents() {
        let t = read("{\"text\": \" A doc.\\n\"}\n{\"text\": \"\"}\n", &ReadOptions::default()).unwrap();
        assert_eq!(t.kind(), TaskKind::Perplexity);
        let TaskExamples::Perplexity(v) = &t.examples else { panic!("{:?}", t.kind()) };
        assert_eq!((v[0].text.as_str(), v[1].text.as_str()), (" A doc.\n", ""));
        assert_eq!(TaskKind::from_name("perplexity"), Ok(TaskKind::Perplexity));
        let declared = ReadOptions { kind: Some(TaskKind::Perplexity), fields: FieldMap::new(), ..Default::default() };
        let e = read("{\"text\": 3}\n", &declared).unwrap_err().to_string();
        assert!(e.contains(":1: field `text`: expected a string, found a number"), "{e}");
        let e = read("{\"context\": \"q\", \"continuation\": \"a\"}\n", &declared).unwrap_err().to_string();
        assert!(e.contains("field `text`: missing: the task is declared perplexity but the row has the fields of a language_modeling task"), "{e}");
        let fields: FieldMap = [("text".to_owned(), "page".to_owned())].into();
        let t = read("{\"page\": \"p\"}\n", &ReadOptions { kind: None, fields, ..Default::default() }).unwrap();
        assert_eq!(t.kind(), TaskKind::Perplexity);
    }

    #[test]
    fn field_maps_apply() {
        let fields: FieldMap =
            [("context".to_owned(), "question".to_owned()), ("aliases".to_owned(), "alts".to_owned())].into();
        let options = ReadOptions { kind: Some(TaskKind::GenerationWithAnswers), fields, ..Default::default() };
        let t = read("{\"question\": \"q\", \"answer\": \"a\", \"alts\": [\"b\"]}\n", &options).unwrap();
        let TaskExamples::GenerationWithAnswers(v) = &t.examples else { panic!() };
        assert_eq!((v[0].context.as_str(), v[0].aliases.clone()), ("q", vec!["b".to_owned()]));
        let e = read("{\"question\": \"q\", \"answer\": \"a\", \"alts\": [1]}\n", &options).unwrap_err().to_string();
        assert!(e.contains("field `alts[0]` (read as `aliases`)"), "{e}");
    }
}
