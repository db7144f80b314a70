//! Rows of a data file, each a JSON object with its [`Location`] for error messages: JSONL (one
//! object a line, blank lines skipped; locations are lines), CSV (a header row; every cell a string;
//! locations are rows) or Parquet (only the asked-for columns are read, through [`crate::parquet`];
//! locations are rows). Task files ([`crate::read_task`]) and the inputs of [`crate::convert`] are
//! both read here; what a row must hold is their business.

use crate::{parquet, Error, Location, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The formats rows are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    /// A task file's format: Parquet by its extension, anything else JSONL. Task files are not read
    /// as CSV, whose cells are all strings; `icl convert` turns CSV into task files.
    pub(crate) fn of_task_file(path: &Path) -> Self {
        if parquet::is_parquet(path) {
            Self::Parquet
        } else {
            Self::Jsonl
        }
    }

    /// A conversion input's format: Parquet, CSV (`.csv`, any case), anything else JSONL.
    pub(crate) fn of_input(path: &Path) -> Self {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match Self::of_task_file(path) {
            Self::Jsonl if ext == "csv" => Self::Csv,
            format => format,
        }
    }
}

/// The columns a file declares before its rows (Parquet's schema), or `None` where the rows carry
/// their own fields (JSONL) or the header is read with them (CSV).
pub(crate) fn columns(path: &Path, format: Format) -> Result<Option<Vec<String>>> {
    match format {
        Format::Parquet => parquet::column_names(path).map(Some),
        Format::Jsonl | Format::Csv => Ok(None),
    }
}

/// Calls `row` with each row of `path` in file order. `columns` (which the caller has checked exist)
/// limits what a Parquet file reads; JSONL and CSV rows keep all their fields.
pub(crate) fn read(
    path: &Path,
    format: Format,
    columns: Option<&[&str]>,
    row: impl FnMut(Location, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    match format {
        Format::Parquet => parquet::read_rows(path, columns, row),
        Format::Csv => read_csv(path, row),
        Format::Jsonl => read_jsonl(path, row),
    }
}

fn read_jsonl(path: &Path, mut row: impl FnMut(Location, Map<String, Value>) -> Result<()>) -> Result<()> {
    let io_err = |source| Error::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_err)?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| Error::Json {
            path: path.to_owned(),
            line: i + 1,
            message: e.to_string(),
        })?;
        let at = Location::Line(i + 1);
        let Value::Object(obj) = value else {
            return Err(Error::Field {
                path: path.to_owned(),
                at,
                field: "<row>".into(),
                message: "expected a JSON object".into(),
            });
        };
        row(at, obj)?;
    }
    Ok(())
}

fn read_csv(path: &Path, mut row: impl FnMut(Location, Map<String, Value>) -> Result<()>) -> Result<()> {
    let csv_err = |e: csv::Error| Error::Csv { path: path.to_owned(), message: e.to_string() };
    let mut reader = csv::ReaderBuilder::new().from_path(path).map_err(csv_err)?;
    let headers = reader.headers().map_err(csv_err)?.clone();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(csv_err)?;
        let obj = headers.iter().zip(record.iter()).map(|(h, v)| (h.to_owned(), Value::String(v.to_owned()))).collect();
        row(Location::Row(i + 1), obj)?;
    }
    Ok(())
}

/// How errors name the type of a value.
pub(crate) fn json_type(v: &Value) -> &'static str {
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

    fn rows_of(path: &Path, format: Format) -> Result<Vec<(Location, Value)>> {
        let mut out = Vec::new();
        read(path, format, None, |at, obj| {
            out.push((at, Value::Object(obj)));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn formats_by_extension() {
        for (name, task, input) in [
            ("t.parquet", Format::Parquet, Format::Parquet),
            ("t.PARQUET", Format::Parquet, Format::Parquet),
            ("t.pq", Format::Parquet, Format::Parquet),
            ("t.csv", Format::Jsonl, Format::Csv),
            ("t.CSV", Format::Jsonl, Format::Csv),
            ("t.jsonl", Format::Jsonl, Format::Jsonl),
            ("t", Format::Jsonl, Format::Jsonl),
        ] {
            assert_eq!(
                (Format::of_task_file(Path::new(name)), Format::of_input(Path::new(name))),
                (task, input),
                "{name}"
            );
        }
    }

    #[test]
    fn jsonl_and_csv_rows_carry_their_locations() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("r.jsonl");
        std::fs::write(&jsonl, "{\"a\": 1}\n\n  \n{\"a\": [\"x\"]}\n").unwrap();
        let rows = rows_of(&jsonl, Format::Jsonl).unwrap();
        assert_eq!(
            rows,
            vec![
                (Location::Line(1), serde_json::json!({"a": 1})),
                (Location::Line(4), serde_json::json!({"a": ["x"]}))
            ]
        );
        let csv = dir.path().join("r.csv");
        std::fs::write(&csv, "a,b\n1,\"x, y\"\n2,z\n").unwrap();
        let rows = rows_of(&csv, Format::Csv).unwrap();
        assert_eq!(rows[1], (Location::Row(2), serde_json::json!({"a": "2", "b": "z"})));
        assert_eq!(columns(&csv, Format::Csv).unwrap(), None);

        std::fs::write(&jsonl, "{\"a\": 1}\n7\n").unwrap();
        let e = rows_of(&jsonl, Format::Jsonl).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: field <row>: expected a JSON object", jsonl.display()));
        std::fs::write(&csv, "a,b\n1,2\n3\n").unwrap();
        let e = rows_of(&csv, Format::Csv).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: CSV: ", csv.display())), "{e}");
    }
}
