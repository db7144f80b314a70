//! Metric loggers for training loops.
//!
//! [`MetricLog`] takes `(step, [(name, value)])` calls and writes each to every sink it was created
//! with: a TensorBoard event file ([`tensorboard`], readable by TensorBoard and importable by W&B and
//! Comet), `metrics.jsonl` (one JSON object per call) and `metrics.csv` (one row per value). It keeps
//! the history so that [`MetricLog::write_plots`] can draw one PNG per metric against the step
//! ([`plot`]). Every sink is flushed after each call: a run that crashes keeps what it logged.

pub mod plot;
pub mod tensorboard;

pub use plot::{plot_grid_png, plot_png, Panel, PlotOptions};
pub use tensorboard::{read_events, Event, EventWriter};

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// An event file whose framing, checksums or protobuf content is invalid.
    #[error("{path}: record {record} at byte {offset}: {message}")]
    Corrupt { path: PathBuf, record: usize, offset: usize, message: String },
    #[error("{path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    /// A `metrics.jsonl` line that [`read_metrics_jsonl`] cannot read.
    #[error("{path}:{line}: {message}")]
    Jsonl { path: PathBuf, line: usize, message: String },
    #[error("step {step}: metric `{name}`: {message}")]
    Metric { step: i64, name: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which sinks a [`MetricLog`] writes.
#[derive(Debug, Clone, Copy)]
pub struct LogSinks {
    pub tensorboard: bool,
    pub jsonl: bool,
    pub csv: bool,
}

impl Default for LogSinks {
    fn default() -> Self {
        Self { tensorboard: true, jsonl: true, csv: true }
    }
}

/// Metrics of a run, written to the chosen sinks in one folder as they arrive.
#[derive(Debug)]
pub struct MetricLog {
    dir: PathBuf,
    events: Option<EventWriter>,
    jsonl: Option<(PathBuf, BufWriter<File>)>,
    csv: Option<(PathBuf, csv::Writer<File>)>,
    history: BTreeMap<String, Vec<(i64, f64)>>,
}

fn create_file(path: &Path) -> Result<File> {
    File::create(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

impl MetricLog {
    /// Creates `dir` and the sinks' files in it: `events.out.tfevents.*`, `metrics.jsonl`, `metrics.csv`
    /// (the last two replaced if they exist; event files are always new, as TensorBoard expects).
    pub fn create(dir: &Path, sinks: LogSinks) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let events = sinks.tensorboard.then(|| EventWriter::create(dir)).transpose()?;
        let jsonl = if sinks.jsonl {
            let path = dir.join("metrics.jsonl");
            Some((path.clone(), BufWriter::new(create_file(&path)?)))
        } else {
            None
        };
        let csv = if sinks.csv {
            let path = dir.join("metrics.csv");
            let mut writer = csv::Writer::from_writer(create_file(&path)?);
            writer
                .write_record(["step", "wall_time", "metric", "value"])
                .map_err(|source| Error::Csv { path: path.clone(), source })?;
            Some((path, writer))
        } else {
            None
        };
        Ok(Self { dir: dir.to_owned(), events, jsonl, csv, history: BTreeMap::new() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The event file, when TensorBoard logging is on.
    pub fn event_file(&self) -> Option<&Path> {
        self.events.as_ref().map(EventWriter::path)
    }

    /// Records `metrics` at `step` in every sink. Names must be non-empty and distinct within a call.
    /// Non-finite values are kept (`NaN` in TensorBoard and CSV, `null` in JSON) but not plotted.
    pub fn log(&mut self, step: i64, metrics: &[(&str, f64)]) -> Result<()> {
        for (i, (name, _)) in metrics.iter().enumerate() {
            let fail = |message: &str| Error::Metric { step, name: (*name).to_owned(), message: message.to_owned() };
            if name.is_empty() {
                return Err(fail("empty name"));
            }
            if metrics[..i].iter().any(|(other, _)| other == name) {
                return Err(fail("given twice in one call"));
            }
        }
        let wall_time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        if let Some(events) = &mut self.events {
            let values: Vec<(&str, f32)> = metrics.iter().map(|&(name, value)| (name, value as f32)).collect();
            events.add_scalars_at(wall_time, step, &values)?;
            events.flush()?;
        }
        if let Some((path, file)) = &mut self.jsonl {
            let values: serde_json::Map<String, serde_json::Value> =
                metrics.iter().map(|&(name, value)| (name.to_owned(), serde_json::Value::from(value))).collect();
            let line = serde_json::json!({"step": step, "wall_time": wall_time, "metrics": values});
            writeln!(file, "{line}")
                .and_then(|()| file.flush())
                .map_err(|source| Error::Io { path: path.clone(), source })?;
        }
        if let Some((path, writer)) = &mut self.csv {
            let csv_error = |source| Error::Csv { path: path.clone(), source };
            for &(name, value) in metrics {
                writer
                    .write_record([step.to_string(), format!("{wall_time:.3}"), name.to_owned(), value.to_string()])
                    .map_err(csv_error)?;
            }
            writer.flush().map_err(|source| Error::Io { path: path.clone(), source })?;
        }
        for &(name, value) in metrics {
            self.history.entry(name.to_owned()).or_default().push((step, value));
        }
        Ok(())
    }

    /// Every metric logged so far: name -> `(step, value)` in logging order.
    pub fn history(&self) -> &BTreeMap<String, Vec<(i64, f64)>> {
        &self.history
    }

    /// Writes `{metric}.png` for every metric into `dir` (characters other than letters, digits, `-`
    /// and `.` become `_`), standard errors (`M_stderr`) as error bars on `M`'s plot; returns the paths.
    pub fn write_plots(&self, dir: &Path, options: &PlotOptions) -> Result<Vec<PathBuf>> {
        write_plots(&self.history, dir, options)
    }
}

/// The name suffix of a metric's standard error: `piqa/acc_stderr` is the error of `piqa/acc`.
pub const STDERR_SUFFIX: &str = "_stderr";

/// Writes `{metric}.png` for every metric of `history` into `dir` (see [`MetricLog::write_plots`]);
/// a metric `M_stderr` logged next to `M` gets no plot of its own but error bars on `M`'s.
pub fn write_plots(
    history: &BTreeMap<String, Vec<(i64, f64)>>,
    dir: &Path,
    options: &PlotOptions,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
    let mut paths = Vec::new();
    for (name, points) in history {
        // A metric's standard error is drawn as error bars on the metric's plot, not on its own.
        if name.strip_suffix(STDERR_SUFFIX).is_some_and(|metric| history.contains_key(metric)) {
            continue;
        }
        let errors = history.get(&format!("{name}{STDERR_SUFFIX}")).map_or(&[][..], Vec::as_slice);
        let path = dir.join(format!("{}.png", file_stem(name)));
        plot_png(&path, Panel { title: name, points, errors }, options)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Reads a `metrics.jsonl` written by [`MetricLog`] back into name -> `(step, value)` in file order
/// (to plot a finished run again). Errors name the file and line; `null` values (non-finite when
/// written) are read as NaN.
pub fn read_metrics_jsonl(path: &Path) -> Result<BTreeMap<String, Vec<(i64, f64)>>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let mut history: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |message: String| Error::Jsonl { path: path.to_owned(), line: i + 1, message };
        let record: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let step = record["step"].as_i64().ok_or_else(|| bad("field `step`: not an integer".into()))?;
        let metrics = record["metrics"].as_object().ok_or_else(|| bad("field `metrics`: not an object".into()))?;
        for (name, value) in metrics {
            let value = match value {
                serde_json::Value::Null => f64::NAN,
                v => v.as_f64().ok_or_else(|| bad(format!("field `metrics.{name}`: not a number")))?,
            };
            history.entry(name.clone()).or_default().push((step, value));
        }
    }
    Ok(history)
}

/// A metric name as a file name: letters, digits, `-` and `.` kept, anything else `_`.
pub fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sink_gets_each_call() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricLog::create(dir.path(), LogSinks::default()).unwrap();
        log.log(10, &[("lambada/acc", 0.25), ("train/loss", 3.5)]).unwrap();
        log.log(20, &[("lambada/acc", 0.5)]).unwrap();
        let jsonl = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 10);
        assert_eq!(lines[0]["metrics"]["train/loss"], 3.5);
        assert_eq!(lines[1]["metrics"]["lambada/acc"], 0.5);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
        assert_eq!(rows[0], ["step", "wall_time", "metric", "value"]);
        assert_eq!((rows[1][0], rows[1][2], rows[1][3]), ("10", "lambada/acc", "0.25"));
        assert_eq!((rows[3][0], rows[3][2], rows[3][3]), ("20", "lambada/acc", "0.5"));
        let events = read_events(log.event_file().unwrap()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].step, 20);
        assert_eq!(log.history()["lambada/acc"], vec![(10, 0.25), (20, 0.5)]);
        assert_eq!(&read_metrics_jsonl(&dir.path().join("metrics.jsonl")).unwrap(), log.history());
    }

    #[test]
    fn bad_names_are_errors_naming_step_and_metric() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricLog::create(dir.path(), LogSinks { tensorboard: false, jsonl: true, csv: false }).unwrap();
        let e = log.log(3, &[("a", 1.0), ("a", 2.0)]).unwrap_err().to_string();
        assert!(e.contains("step 3") && e.contains("`a`") && e.contains("twice"), "{e}");
        let e = log.log(4, &[("", 1.0)]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        assert!(log.history().is_empty());
        std::fs::write(dir.path().join("bad.jsonl"), "{\"step\": 1, \"metrics\": {}}\n{\"step\": \"x\"}\n").unwrap();
        let e = read_metrics_jsonl(&dir.path().join("bad.jsonl")).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("step"), "{e}");
    }

    #[test]
    fn metric_names_become_safe_file_names() {
        assert_eq!(file_stem("lambada/0-shot acc"), "lambada_0-shot_acc");
        assert_eq!(file_stem("../x"), ".._x");
    }
}
