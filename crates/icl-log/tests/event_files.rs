//! Event files, JSONL, CSV and plots written by `MetricLog`, read back: by this crate's reader (with
//! every CRC checked), by TensorBoard's own reader from the project's venv (`cargo xtask setup`
//! installs `tensorboard` there), and PNGs by a decoder.
#![allow(clippy::unwrap_used)]

use icl_log::{read_events, tensorboard, Error, LogSinks, MetricLog, PlotOptions};
use icl_test_support::venv_python;
use std::process::Command;

/// Three evaluations and a training loss, as a training loop logs them.
fn write_run(dir: &std::path::Path) -> MetricLog {
    let mut log = MetricLog::create(dir, LogSinks::default()).unwrap();
    for step in 1..=30i64 {
        log.log(step, &[("train/loss", 10.0 / step as f64)]).unwrap();
        if step % 10 == 0 {
            let acc = step as f64 / 100.0;
            log.log(
                step,
                &[
                    ("lambada/acc", acc),
                    ("lambada/perplexity", 50_000.0 / step as f64),
                    ("piqa/acc_norm", 0.5 + acc / 10.0),
                    ("lambada/acc_stderr", 0.02),
                ],
            )
            .unwrap();
        }
    }
    log
}

#[test]
fn event_file_parses_back_with_checked_crcs() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_run(dir.path());
    let path = log.event_file().unwrap().to_owned();
    assert!(path.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let events = read_events(&path).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some(tensorboard::FILE_VERSION));
    assert_eq!(events.len(), 1 + 30 + 3);
    let loss: Vec<(i64, f32)> = events
        .iter()
        .flat_map(|e| e.scalars.iter().filter(|(t, _)| t == "train/loss").map(move |(_, v)| (e.step, *v)))
        .collect();
    assert_eq!(loss.len(), 30);
    assert_eq!(loss[3], (4, 2.5));
    let at_20 = events.iter().find(|e| e.step == 20 && e.scalars.len() == 4).unwrap();
    assert_eq!(at_20.scalars[0], ("lambada/acc".to_owned(), 0.2));
    assert_eq!(at_20.scalars[1], ("lambada/perplexity".to_owned(), 2500.0));
    assert_eq!(at_20.scalars[3], ("lambada/acc_stderr".to_owned(), 0.02));
    assert!(events.windows(2).all(|w| w[0].wall_time <= w[1].wall_time));

    // Any flipped byte is caught by one of the two CRCs, and the error names the record.
    let bytes = std::fs::read(&path).unwrap();
    let first_len = 12 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 4;
    for (position, what) in [(first_len + 2, "length CRC"), (first_len + 20, "payload CRC")] {
        let mut corrupt = bytes.clone();
        corrupt[position] ^= 0x40;
        let bad = dir.path().join("corrupt.tfevents");
        std::fs::write(&bad, &corrupt).unwrap();
        let e = read_events(&bad).unwrap_err();
        assert!(matches!(&e, Error::Corrupt { record: 1, .. }), "{e}");
        assert!(e.to_string().contains(what) && e.to_string().contains("corrupt.tfevents"), "{e}");
    }
    // A file cut short (a crash mid-write) is reported, not misread.
    let bad = dir.path().join("short.tfevents");
    std::fs::write(&bad, &bytes[..bytes.len() - 3]).unwrap();
    assert!(read_events(&bad).unwrap_err().to_string().contains("truncated"));
}

#[test]
fn tensorboard_reads_the_scalars() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    drop(write_run(dir.path()));
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags}))
"#;
    let output = Command::new(&python).args(["-c", script]).arg(dir.path()).output().unwrap();
    assert!(output.status.success(), "tensorboard's reader failed: {}", String::from_utf8_lossy(&output.stderr));
    let scalars: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let loss = scalars["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 30);
    assert_eq!(loss[3], serde_json::json!([4, 2.5]));
    assert_eq!(
        scalars["lambada/acc"],
        serde_json::json!([[10, 0.10000000149011612], [20, 0.20000000298023224], [30, 0.30000001192092896]])
    );
    assert_eq!(scalars["piqa/acc_norm"].as_array().unwrap().len(), 3);
}

#[test]
fn plots_are_valid_pngs_with_the_curve_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let log = write_run(dir.path());
    let options = PlotOptions::default();
    let paths = log.write_plots(&dir.path().join("plots"), &options).unwrap();
    let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    // `lambada/acc_stderr` is drawn as error bars on `lambada/acc`'s plot, not as a plot of its own.
    assert_eq!(names, ["lambada_acc.png", "lambada_perplexity.png", "piqa_acc_norm.png", "train_loss.png"]);
    for path in &paths {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (options.width, options.height));
        // The curve's blue, the axes' dark ink, and mostly white background.
        let rgb: Vec<&[u8]> = pixels.chunks(3).collect();
        let blue = rgb.iter().filter(|p| p[2] > 150 && p[0] < 80).count();
        let ink = rgb.iter().filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60).count();
        let white = rgb.iter().filter(|p| p.iter().all(|&c| c == 255)).count();
        assert!(blue > 200, "{}: {blue} curve pixels", path.display());
        assert!(ink > 500, "{}: {ink} ink pixels (axes, labels)", path.display());
        assert!(white > rgb.len() / 2, "{}", path.display());
    }
    // A panel too small to hold its labels is refused with the file named.
    let tiny = PlotOptions { width: 50, height: 50, ..PlotOptions::default() };
    let e = log.write_plots(&dir.path().join("tiny"), &tiny).unwrap_err().to_string();
    assert!(e.contains("50x50") && e.contains("tiny"), "{e}");
}
