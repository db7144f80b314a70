//! The resume journal: every request's result is appended as its batch finishes, so that a crash or a
//! `kill -9` loses at most the batch in flight.
//!
//! Format: one header line, `icl-journal v1 ` followed by a JSON object describing the run (model,
//! dtype, task files with their lengths and CRCs, batching and prompt options), then one line per
//! request: `CRC32HEX JSON`, the CRC covering the JSON text. Lines are appended and `fdatasync`ed
//! once per batch. On resume the header must match the new run exactly; records are read up to the
//! first line that is torn or fails its checksum, and the file is cut back to there before appending.
//!
//! Floats are written by serde_json, whose shortest round-trip formatting reads back bit-identical,
//! and a resumed run skips only batches whose every request was recovered: the batch plan is the
//! same as in an uninterrupted run, so the results are identical.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &str = "icl-journal v1 ";

pub use icl_eval::RequestResult;

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    task: String,
    request: usize,
    #[serde(flatten)]
    result: RequestResult,
}

/// A generation task's output: the new tokens of one of its requests.
#[derive(Debug, Serialize, Deserialize)]
struct GenerationRecord {
    task: String,
    generation: usize,
    tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Entry {
    Request(Record),
    Generation(GenerationRecord),
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// Results recovered from an earlier run, keyed by task name and request index.
#[derive(Debug, Default)]
pub struct Recovered {
    results: HashMap<String, HashMap<usize, RequestResult>>,
    generations: HashMap<String, HashMap<usize, Vec<u32>>>,
    /// Bytes after the last intact record (a torn write), dropped.
    pub dropped_bytes: u64,
}

impl Recovered {
    pub fn get(&self, task: &str, request: usize) -> Option<RequestResult> {
        self.results.get(task).and_then(|m| m.get(&request)).copied()
    }

    /// The tokens generated for a generation task's request.
    pub fn generation(&self, task: &str, request: usize) -> Option<&[u32]> {
        self.generations.get(task).and_then(|m| m.get(&request)).map(Vec::as_slice)
    }

    /// Recovered records: scored requests and generated outputs.
    pub fn len(&self) -> usize {
        self.results.values().map(HashMap::len).sum::<usize>()
            + self.generations.values().map(HashMap::len).sum::<usize>()
    }
}

impl Journal {
    /// Starts a new journal at `path` (replacing any), headed by `run`.
    pub fn create(path: &Path, run: &serde_json::Value) -> Result<Self> {
        let mut file = File::create(path).with_context(|| format!("creating journal {}", path.display()))?;
        writeln!(file, "{MAGIC}{run}")
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path: path.to_owned(), file })
    }

    /// Reopens the journal of an interrupted run. `run` must equal the header the journal was created
    /// with: results of another model, file or setting are never mixed in.
    pub fn resume(path: &Path, run: &serde_json::Value) -> Result<(Self, Recovered)> {
        let file = File::open(path).with_context(|| {
            format!(
                "--resume: cannot open journal {} (was the run started with the same --output/--journal?)",
                path.display()
            )
        })?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        reader.read_line(&mut line).with_context(|| format!("reading {}", path.display()))?;
        let header = line.strip_prefix(MAGIC).map(str::trim_end);
        let Some(Ok(recorded)) = header.map(serde_json::from_str::<serde_json::Value>) else {
            bail!("{}: line 1: not an icl journal header", path.display());
        };
        if &recorded != run {
            bail!(
                "{}: the journal belongs to a different run; differing settings: {}. Start afresh without --resume.",
                path.display(),
                differing_keys(&recorded, run).join(", ")
            );
        }
        let mut good_end = line.len() as u64;
        let mut recovered = Recovered::default();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).with_context(|| format!("reading {}", path.display()))?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            match parse_record(line.trim_end_matches('\n')) {
                Some(Entry::Request(r)) => {
                    recovered.results.entry(r.task).or_default().insert(r.request, r.result);
                }
                Some(Entry::Generation(g)) => {
                    recovered.generations.entry(g.task).or_default().insert(g.generation, g.tokens);
                }
                None => break,
            }
            good_end += n as u64;
        }
        let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        recovered.dropped_bytes = len - good_end;
        let mut file =
            OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        file.set_len(good_end)
            .and_then(|()| file.seek(SeekFrom::End(0)))
            .with_context(|| format!("truncating {}", path.display()))?;
        Ok((Self { path: path.to_owned(), file }, recovered))
    }

    /// Appends one finished batch and makes it durable.
    pub fn append(&mut self, task: &str, results: &[(usize, RequestResult)]) -> Result<()> {
        let mut lines = Vec::with_capacity(results.len());
        for &(request, result) in results {
            lines.push(serde_json::to_string(&Record { task: task.to_owned(), request, result })?);
        }
        self.write_lines(&lines)
    }

    /// Appends one finished generation batch (each request's new tokens) and makes it durable.
    pub fn append_generations(&mut self, task: &str, outputs: &[(usize, Vec<u32>)]) -> Result<()> {
        let mut lines = Vec::with_capacity(outputs.len());
        for (generation, tokens) in outputs {
            let record = GenerationRecord { task: task.to_owned(), generation: *generation, tokens: tokens.clone() };
            lines.push(serde_json::to_string(&record)?);
        }
        self.write_lines(&lines)
    }

    fn write_lines(&mut self, lines: &[String]) -> Result<()> {
        let mut buf = String::new();
        for json in lines {
            buf.push_str(&format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())));
        }
        self.file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to journal {}", self.path.display()))
    }
}

fn parse_record(line: &str) -> Option<Entry> {
    let (crc, json) = line.split_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(json.as_bytes()) == crc).then(|| serde_json::from_str(json).ok()).flatten()
}

fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
            keys.dedup();
            keys
        }
        _ => vec!["<header>".to_owned()],
    }
}

/// Length and CRC-32 of a file: enough to notice an edited task file between a crash and a resume.
pub fn file_identity(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::json!({ "path": path, "bytes": bytes.len(), "crc32": format!("{:08x}", crc32fast::hash(&bytes)) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result(i: usize) -> RequestResult {
        RequestResult { loglik: -(i as f64) / 3.0 - 1e-17, is_greedy: i % 2 == 0, n_tokens: i as i64 }
    }

    #[test]
    fn records_survive_a_torn_tail_bit_for_bit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.journal");
        let run = json!({"model": "m", "dtype": "f32"});
        let mut j = Journal::create(&path, &run).expect("create");
        j.append("piqa", &[(0, result(0)), (1, result(1))]).expect("append");
        j.append("lambada", &[(7, result(7))]).expect("append");
        drop(j);
        // A crash mid-write leaves half a line, and a flipped byte fails its checksum.
        let intact = std::fs::read(&path).expect("read");
        let mut torn = intact.clone();
        torn.extend_from_slice(b"0badc0de {\"task\":\"piqa\",\"req");
        std::fs::write(&path, &torn).expect("write");
        let (mut j, rec) = Journal::resume(&path, &run).expect("resume");
        assert_eq!(rec.len(), 3);
        assert_eq!(rec.get("piqa", 1), Some(result(1)));
        assert_eq!(rec.get("lambada", 7).map(|r| r.loglik.to_bits()), Some(result(7).loglik.to_bits()));
        assert_eq!(rec.dropped_bytes, torn.len() as u64 - intact.len() as u64);
        j.append("piqa", &[(2, result(2))]).expect("append after resume");
        drop(j);
        let (_, rec) = Journal::resume(&path, &run).expect("resume again");
        assert_eq!(rec.len(), 4);

        let mut corrupt = std::fs::read(&path).expect("read");
        let header_end = corrupt.iter().position(|&b| b == b'\n').expect("a header line");
        let at = header_end + corrupt[header_end..].iter().position(|&b| b == b'-').expect("a minus sign");
        corrupt[at] = b'+';
        std::fs::write(&path, &corrupt).expect("write");
        let (_, rec) = Journal::resume(&path, &run).expect("resume corrupt");
        assert!(rec.len() < 4, "a record failing its checksum and all after it are dropped");
    }

    #[test]
    fn generated_outputs_are_journaled_next_to_scores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.journal");
        let run = json!({"model": "m"});
        let mut j = Journal::create(&path, &run).expect("create");
        j.append("piqa", &[(0, result(0))]).expect("append");
        j.append_generations("triviaqa", &[(3, vec![11, 22, 33]), (4, vec![])]).expect("append generations");
        drop(j);
        let (_, rec) = Journal::resume(&path, &run).expect("resume");
        assert_eq!(rec.len(), 3);
        assert_eq!(rec.generation("triviaqa", 3), Some(&[11u32, 22, 33][..]));
        assert_eq!(rec.generation("triviaqa", 4), Some(&[][..]));
        assert_eq!((rec.generation("triviaqa", 0), rec.generation("piqa", 0)), (None, None));
        assert_eq!(rec.get("piqa", 0), Some(result(0)));
    }

    #[test]
    fn a_journal_of_another_run_is_refused_with_the_differing_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.journal");
        Journal::create(&path, &json!({"model": "m", "dtype": "f32"})).expect("create");
        let err = Journal::resume(&path, &json!({"model": "m", "dtype": "bf16"})).expect_err("refused");
        assert!(format!("{err:#}").contains("dtype"), "{err:#}");
        std::fs::write(&path, "not a journal\n").expect("write");
        let err = Journal::resume(&path, &json!({})).expect_err("refused");
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }
}
