//! The resume journal: every request's result is appended as its batch finishes, so that a crash or a
//! `kill -9` loses at most the batch in flight.
//!
//! Format: one header line, `icl-journal v1 ` followed by a JSON object describing the run (model,
//! dtype, task files with their lengths and CRCs, batching and prompt options), then one line per
//! request: `CRC32HEX JSON`, the CRC covering the JSON text. Lines are appended and `fdatasync`ed
//! once per batch. On resume the header must match the new run exactly; records are read up to the
//! first line that is torn or fails its checksum, and the file is cut back to there before appending.
//!
//! Several ranks: rank 0 is the only writer. The other ranks stream each finished batch's records to
//! it over the side channel ([`icl_shard::watch`], [`encode_results`]), so a job killed mid-task keeps
//! every rank's finished batches; records are keyed by task and request only, never by rank, and a
//! record that reaches the journal twice (streamed, then gathered at the task's end) is written once.
//! A resumed run hands rank 0's recovered records to every rank ([`Recovered::to_text`]), so it may
//! run on any number of ranks.
//!
//! Floats are written by serde_json, whose shortest round-trip formatting reads back bit-identical,
//! and a resumed run skips only batches whose every request was recovered: the batch plan is the
//! same as in an uninterrupted run, so the results are identical.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
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

#[derive(Debug, Serialize, Deserialize)]
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
    /// What the journal holds (`generation`, task, request): a record comes in once.
    written: HashSet<(bool, String, usize)>,
    /// What it held when resumed; a record of these that comes again was computed again.
    recovered: HashSet<(bool, String, usize)>,
    /// Records written since it was opened, and records of `recovered` that came again.
    pub added: usize,
    pub recomputed: usize,
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

    /// Every record, one JSON object a line: what rank 0 hands the other ranks of a resumed run.
    pub fn to_text(&self) -> Result<String> {
        let mut text = String::new();
        for (task, results) in &self.results {
            for (&request, &result) in results {
                text += &serde_json::to_string(&Record { task: task.clone(), request, result })?;
                text.push('\n');
            }
        }
        for (task, generations) in &self.generations {
            for (&generation, tokens) in generations {
                let record = GenerationRecord { task: task.clone(), generation, tokens: tokens.clone() };
                text += &serde_json::to_string(&record)?;
                text.push('\n');
            }
        }
        Ok(text)
    }

    /// The records of [`Recovered::to_text`].
    pub fn from_text(text: &str) -> Result<Self> {
        let mut recovered = Self::default();
        for (i, line) in text.lines().enumerate() {
            let entry: Entry =
                serde_json::from_str(line).with_context(|| format!("recovered record {}: malformed", i + 1))?;
            recovered.insert(entry);
        }
        Ok(recovered)
    }

    fn insert(&mut self, entry: Entry) {
        match entry {
            Entry::Request(r) => {
                self.results.entry(r.task).or_default().insert(r.request, r.result);
            }
            Entry::Generation(g) => {
                self.generations.entry(g.task).or_default().insert(g.generation, g.tokens);
            }
        }
    }

    fn keys(&self) -> impl Iterator<Item = (bool, String, usize)> + '_ {
        let results = self.results.iter().flat_map(|(t, m)| m.keys().map(move |&r| (false, t.clone(), r)));
        let generations = self.generations.iter().flat_map(|(t, m)| m.keys().map(move |&r| (true, t.clone(), r)));
        results.chain(generations)
    }
}

/// A batch's records as the other ranks stream them to rank 0 ([`Journal::append_text`]).
pub fn encode_results(task: &str, results: &[(usize, RequestResult)]) -> Result<String> {
    let mut text = String::new();
    for &(request, result) in results {
        text += &serde_json::to_string(&Record { task: task.to_owned(), request, result })?;
        text.push('\n');
    }
    Ok(text)
}

/// A generation batch's records, as [`encode_results`].
pub fn encode_generations(task: &str, outputs: &[(usize, Vec<u32>)]) -> Result<String> {
    let mut text = String::new();
    for (generation, tokens) in outputs {
        let record = GenerationRecord { task: task.to_owned(), generation: *generation, tokens: tokens.clone() };
        text += &serde_json::to_string(&record)?;
        text.push('\n');
    }
    Ok(text)
}

impl Journal {
    /// Starts a new journal at `path` (replacing any), headed by `run`.
    pub fn create(path: &Path, run: &serde_json::Value) -> Result<Self> {
        let mut file = File::create(path).with_context(|| format!("creating journal {}", path.display()))?;
        writeln!(file, "{MAGIC}{run}")
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            written: HashSet::new(),
            recovered: HashSet::new(),
            added: 0,
            recomputed: 0,
        })
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
                Some(entry) => recovered.insert(entry),
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
        let written: HashSet<_> = recovered.keys().collect();
        let journal =
            Self { path: path.to_owned(), file, recovered: written.clone(), written, added: 0, recomputed: 0 };
        Ok((journal, recovered))
    }

    /// Appends one finished batch and makes it durable.
    pub fn append(&mut self, task: &str, results: &[(usize, RequestResult)]) -> Result<()> {
        self.append_text(&encode_results(task, results)?)
    }

    /// Appends one finished generation batch (each request's new tokens) and makes it durable.
    pub fn append_generations(&mut self, task: &str, outputs: &[(usize, Vec<u32>)]) -> Result<()> {
        self.append_text(&encode_generations(task, outputs)?)
    }

    /// Appends records encoded by [`encode_results`] or [`encode_generations`] (from this rank or
    /// streamed by another), leaving out those the journal already holds, and makes them durable.
    pub fn append_text(&mut self, text: &str) -> Result<()> {
        let mut buf = String::new();
        for (i, json) in text.lines().enumerate() {
            let entry: Entry =
                serde_json::from_str(json).with_context(|| format!("journal record {} to append: malformed", i + 1))?;
            let key = match &entry {
                Entry::Request(r) => (false, r.task.clone(), r.request),
                Entry::Generation(g) => (true, g.task.clone(), g.generation),
            };
            if self.recovered.contains(&key) {
                self.recomputed += 1;
            } else if self.written.insert(key) {
                self.added += 1;
                buf.push_str(&format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes())));
            }
        }
        if buf.is_empty() {
            return Ok(());
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
        RequestResult { loglik: -(i as f64) / 3.0 - 1e-17, is_greedy: i.is_multiple_of(2), n_tokens: i as i64 }
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

    #[test]
    fn streamed_records_are_written_once_and_recovered_records_travel_as_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.journal");
        let run = json!({"model": "m"});
        let mut j = Journal::create(&path, &run).expect("create");
        // Rank 1 streams a batch; the task's end gathers it again with rank 0's own.
        j.append_text(&encode_results("piqa", &[(3, result(3)), (4, result(4))]).expect("encode")).expect("stream");
        j.append("piqa", &[(0, result(0)), (3, result(3)), (4, result(4))]).expect("append");
        j.append_text(&encode_generations("triviaqa", &[(1, vec![5, 6])]).expect("encode")).expect("stream");
        j.append_generations("triviaqa", &[(1, vec![5, 6])]).expect("append generations");
        let err = j.append_text("{\"task\": 1}\n").expect_err("malformed");
        assert!(format!("{err:#}").contains("record 1"), "{err:#}");
        drop(j);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 1 + 4, "{text}");
        let (mut j, rec) = Journal::resume(&path, &run).expect("resume");
        // After a resume, what the journal holds is still written once, and counted as computed again.
        j.append("piqa", &[(4, result(4)), (5, result(5))]).expect("append");
        j.append("piqa", &[(5, result(5))]).expect("append");
        assert_eq!(std::fs::read_to_string(&path).expect("read").lines().count(), 1 + 5);
        assert_eq!((j.added, j.recomputed), (1, 1));
        let moved = Recovered::from_text(&rec.to_text().expect("text")).expect("from text");
        assert_eq!(moved.len(), 4);
        assert_eq!(moved.get("piqa", 3).map(|r| r.loglik.to_bits()), Some(result(3).loglik.to_bits()));
        assert_eq!(moved.generation("triviaqa", 1), Some(&[5u32, 6][..]));
        assert!(Recovered::from_text("nonsense").is_err());
    }
}
