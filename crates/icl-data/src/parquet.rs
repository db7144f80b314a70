//! Parquet task files through arrow `RecordBatch` readers and writers.
//!
//! Reading (the Parquet backend of [`crate::rows`]) projects the needed columns only and turns each
//! row into the same JSON object a JSONL line gives, so every format shares one validation. Writing
//! produces the canonical layout of a task type: strings as `Utf8`, lists as `List<Utf8>`, `gold` as
//! `Int64`, zstd-compressed.

use crate::{Error, Location, Result, TaskExamples};
use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Number, Value};
use std::path::Path;
use std::sync::Arc;

/// Rows per record batch, read or written.
const BATCH_ROWS: usize = 4096;

/// Whether a path names a Parquet file (by extension).
pub(crate) fn is_parquet(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e == "pq")
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Parquet { path: path.to_owned(), message: e.to_string() }
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(path, e))
}

/// The top-level column names of a Parquet file.
pub(crate) fn column_names(path: &Path) -> Result<Vec<String>> {
    crate::contain_panics(path, "the parquet library", || {
        Ok(open(path)?.schema().fields().iter().map(|f| f.name().clone()).collect())
    })
}

/// Calls `row` with each row's location (1-based row number) and the named columns (which the
/// caller has checked exist; `None`: every column) as a JSON object; no other column is read.
pub(crate) fn read_rows(
    path: &Path,
    columns: Option<&[&str]>,
    row: impl FnMut(Location, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    crate::contain_panics(path, "the parquet library", || read_rows_unguarded(path, columns, row))
}

fn read_rows_unguarded(
    path: &Path,
    columns: Option<&[&str]>,
    mut row: impl FnMut(Location, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let builder = open(path)?;
    let names: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    let columns = columns.map_or_else(|| names.iter().map(String::as_str).collect(), <[&str]>::to_vec);
    let indices: Vec<usize> = columns.iter().filter_map(|c| names.iter().position(|n| n == c)).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder.with_projection(mask).with_batch_size(BATCH_ROWS).build().map_err(|e| perr(path, e))?;
    let mut number = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| perr(path, e))?;
        let schema = batch.schema();
        for r in 0..batch.num_rows() {
            number += 1;
            let mut obj = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                let value = to_json(column.as_ref(), r).map_err(|message| Error::Field {
                    path: path.to_owned(),
                    at: Location::Row(number),
                    field: format!("`{}`", field.name()),
                    message,
                })?;
                obj.insert(field.name().clone(), value);
            }
            row(Location::Row(number), obj)?;
        }
    }
    Ok(())
}

/// One cell as JSON; the types a task file can hold (strings, integers, floats, booleans, lists).
fn to_json(array: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    let int = |v: i64| Value::Number(v.into());
    Ok(match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_owned()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_owned()),
        DataType::Utf8View => Value::String(array.as_string_view().value(i).to_owned()),
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => int(array.as_primitive::<Int8Type>().value(i).into()),
        DataType::Int16 => int(array.as_primitive::<Int16Type>().value(i).into()),
        DataType::Int32 => int(array.as_primitive::<Int32Type>().value(i).into()),
        DataType::Int64 => int(array.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => int(array.as_primitive::<UInt8Type>().value(i).into()),
        DataType::UInt16 => int(array.as_primitive::<UInt16Type>().value(i).into()),
        DataType::UInt32 => int(array.as_primitive::<UInt32Type>().value(i).into()),
        DataType::UInt64 => Value::Number(array.as_primitive::<UInt64Type>().value(i).into()),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(i).into()),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        other => return Err(format!("has Parquet type {other}, which task files do not use")),
    })
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len()).map(|j| to_json(values, j)).collect::<std::result::Result<Vec<_>, _>>().map(Value::Array)
}

/// Writes a task in the canonical layout of its type: to a temporary file next to `path` that is
/// renamed over it once the writer is closed, so a failure never leaves a partial file.
pub fn write_task(path: &Path, examples: &TaskExamples) -> Result<()> {
    if !is_parquet(path) {
        return Err(Error::File { path: path.to_owned(), message: "the output must be a .parquet file".into() });
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("task.parquet");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_to(&tmp, examples)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.to_owned(), source }));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to(path: &Path, examples: &TaskExamples) -> Result<()> {
    let string_list = || DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let (fields, n) = match examples {
        TaskExamples::LanguageModeling(v) => (
            vec![Field::new("context", DataType::Utf8, false), Field::new("continuation", DataType::Utf8, false)],
            v.len(),
        ),
        TaskExamples::MultipleChoice(v) => (
            vec![
                Field::new("query", DataType::Utf8, false),
                Field::new("choices", string_list(), false),
                Field::new("gold", DataType::Int64, false),
            ],
            v.len(),
        ),
        TaskExamples::Schema(v) => (
            vec![
                Field::new("context_options", string_list(), false),
                Field::new("continuation", DataType::Utf8, false),
                Field::new("gold", DataType::Int64, false),
            ],
            v.len(),
        ),
        TaskExamples::GenerationWithAnswers(v) => (
            vec![
                Field::new("context", DataType::Utf8, false),
                Field::new("answer", DataType::Utf8, false),
                Field::new("aliases", string_list(), false),
            ],
            v.len(),
        ),
        TaskExamples::Perplexity(v) => (vec![Field::new("text", DataType::Utf8, false)], v.len()),
    };
    let schema = Arc::new(Schema::new(fields));
    let file = std::fs::File::create(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| perr(path, e))?;
    let strings = |it: &mut dyn Iterator<Item = &str>| -> ArrayRef { Arc::new(it.map(Some).collect::<StringArray>()) };
    let lists = |rows: &mut dyn Iterator<Item = &Vec<String>>| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new()).with_field(Field::new("item", DataType::Utf8, true));
        for row in rows {
            for s in row {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let ints =
        |it: &mut dyn Iterator<Item = usize>| -> ArrayRef { Arc::new(it.map(|g| g as i64).collect::<Int64Array>()) };
    let mut start = 0;
    while start < n {
        let end = (start + BATCH_ROWS).min(n);
        let columns: Vec<ArrayRef> = match examples {
            TaskExamples::LanguageModeling(v) => {
                let v = &v[start..end];
                vec![
                    strings(&mut v.iter().map(|e| e.context.as_str())),
                    strings(&mut v.iter().map(|e| e.continuation.as_str())),
                ]
            }
            TaskExamples::MultipleChoice(v) => {
                let v = &v[start..end];
                vec![
                    strings(&mut v.iter().map(|e| e.query.as_str())),
                    lists(&mut v.iter().map(|e| &e.choices)),
                    ints(&mut v.iter().map(|e| e.gold)),
                ]
            }
            TaskExamples::Schema(v) => {
                let v = &v[start..end];
                vec![
                    lists(&mut v.iter().map(|e| &e.context_options)),
                    strings(&mut v.iter().map(|e| e.continuation.as_str())),
                    ints(&mut v.iter().map(|e| e.gold)),
                ]
            }
            TaskExamples::GenerationWithAnswers(v) => {
                let v = &v[start..end];
                vec![
                    strings(&mut v.iter().map(|e| e.context.as_str())),
                    strings(&mut v.iter().map(|e| e.answer.as_str())),
                    lists(&mut v.iter().map(|e| &e.aliases)),
                ]
            }
            TaskExamples::Perplexity(v) => vec![strings(&mut v[start..end].iter().map(|e| e.text.as_str()))],
        };
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| perr(path, e))?;
        writer.write(&batch).map_err(|e| perr(path, e))?;
        start = end;
    }
    // close() writes the footer; a file without it is unreadable.
    writer.close().map_err(|e| perr(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        read_task, ChoiceExample, GenerationExample, LmExample, PerplexityExample, ReadOptions, SchemaExample,
    };

    #[test]
    fn every_kind_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            TaskExamples::LanguageModeling(vec![
                LmExample { context: "a b".into(), continuation: "c".into() },
                LmExample { context: "\u{1f}é\n".into(), continuation: " d ".into() },
            ]),
            TaskExamples::MultipleChoice(vec![ChoiceExample {
                query: "q".into(),
                choices: vec!["x".into(), "y".into(), "".into()],
                gold: 2,
            }]),
            TaskExamples::Schema(vec![SchemaExample {
                context_options: vec!["A".into(), "B".into()],
                continuation: "went".into(),
                gold: 1,
            }]),
            TaskExamples::GenerationWithAnswers(vec![
                GenerationExample {
                    context: "Q: a?".into(),
                    answer: "b".into(),
                    aliases: vec!["b".into(), "B.".into()],
                    chain_of_thought: None,
                },
                GenerationExample {
                    context: "Q: c?".into(),
                    answer: "d".into(),
                    aliases: vec![],
                    chain_of_thought: None,
                },
            ]),
            TaskExamples::Perplexity(vec![
                PerplexityExample { text: " A document.\n\nTwo  lines ".into() },
                PerplexityExample { text: String::new() },
            ]),
        ];
        for (i, examples) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("t{i}.parquet"));
            write_task(&path, &examples).unwrap();
            let task = read_task("t", &path, &ReadOptions::default()).unwrap();
            assert_eq!(task.examples, examples);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn many_rows_span_several_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lm.parquet");
        let rows: Vec<LmExample> =
            (0..BATCH_ROWS + 7).map(|i| LmExample { context: format!("c{i}"), continuation: format!("{i}") }).collect();
        write_task(&path, &TaskExamples::LanguageModeling(rows.clone())).unwrap();
        let task = read_task("t", &path, &ReadOptions::default()).unwrap();
        assert_eq!(task.examples, TaskExamples::LanguageModeling(rows));
    }

    /// A file with arbitrary columns, written directly through arrow.
    fn custom(path: &Path, fields: Vec<Field>, columns: Vec<ArrayRef>) {
        let schema = Arc::new(Schema::new(fields));
        let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema.clone(), None).unwrap();
        w.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn missing_columns_and_wrong_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mc.parquet");
        custom(
            &path,
            vec![Field::new("query", DataType::Utf8, false), Field::new("gold", DataType::Int64, false)],
            vec![Arc::new(StringArray::from(vec!["q"])), Arc::new(Int64Array::from(vec![0]))],
        );
        let e = read_task("t", &path, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("mc.parquet: field `choices`: no such column"), "{e}");

        let path = dir.path().join("lm.parquet");
        custom(
            &path,
            vec![
                Field::new("context", DataType::Utf8, false),
                Field::new("continuation", DataType::Int64, false),
                Field::new("unused", DataType::Utf8, false),
            ],
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec!["x", "y"])),
            ],
        );
        let e = read_task("t", &path, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("lm.parquet row 1: field `continuation`: expected a string, found a number"), "{e}");

        let empty = dir.path().join("empty.parquet");
        write_task(&empty, &TaskExamples::LanguageModeling(Vec::new())).unwrap();
        let e = read_task("t", &empty, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("has no rows"), "{e}");

        let junk = dir.path().join("junk.parquet");
        std::fs::write(&junk, "not parquet").unwrap();
        let e = read_task("t", &junk, &ReadOptions::default()).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: Parquet: ", junk.display())), "{e}");
    }
}
