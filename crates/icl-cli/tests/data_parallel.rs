//! Data-parallel `icl eval` under a real `mpirun` on CPUs: results and samples bit-identical to one
//! rank on 2 and 3 ranks, rank 0 alone writing; a run killed on 2 ranks resumes on any rank count; a
//! rank that is killed or fails ends the whole job within a minute. Built with `--features mpi` (`cargo xtask test` does); needs Open MPI (`cargo xtask setup`).
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("starting icl (is Open MPI installed? `cargo xtask setup`)")
}

#[test]
fn results_are_bit_identical_on_one_two_and_three_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one");
    std::fs::create_dir(&one).expect("mkdir");
    let out = output(Command::new(env!("CARGO_BIN_EXE_icl")).args(four_task_args("gpt-neo-tiny", &one, 23)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines_naming_lambada = String::from_utf8_lossy(&out.stdout).matches("lambada").count();
    let samples = std::fs::read(one.join("samples.jsonl")).expect("samples");
    assert_eq!(samples.iter().filter(|&&b| b == b'\n').count(), 4 * 23);
    let results = results_without_timing(&one.join("results.json"));
    for ranks in [2, 3] {
        let many = dir.path().join(format!("ranks{ranks}"));
        std::fs::create_dir(&many).expect("mkdir");
        let out = output(mpirun(ranks).args(four_task_args("gpt-neo-tiny", &many, 23)));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{ranks} ranks: {stderr}");
        assert!(stderr.contains(&format!("{ranks} ranks over mpi")), "{stderr}");
        // Rank 0 alone reports: one results table.
        assert_eq!(stdout.matches("lambada").count(), lines_naming_lambada, "{stdout}");
        assert!(
            std::fs::read(many.join("samples.jsonl")).expect("samples") == samples,
            "{ranks} ranks: samples differ"
        );
        assert_eq!(results_without_timing(&many.join("results.json")), results, "{ranks} ranks");
    }
}

/// Perplexity documents (LAMBADA passages, several windows each under `--max-length 32`) on one and
/// two ranks: the windows are shared out like any requests and the results stay bit-identical.
#[test]
fn perplexity_windows_are_bit_identical_on_one_and_two_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lambada = read_jsonl(&data_dir().join("lambada_openai.jsonl"));
    let docs: Vec<String> = lambada[..12]
        .iter()
        .map(|r| {
            let text =
                format!("{} {}", r["context"].as_str().expect("context"), r["continuation"].as_str().expect("c"));
            serde_json::json!({ "text": text }).to_string()
        })
        .collect();
    let docs_path = dir.path().join("docs.jsonl");
    std::fs::write(&docs_path, docs.join("\n") + "\n").expect("write docs");
    let args = |out: &std::path::Path| -> Vec<String> {
        let mut args: Vec<String> =
            ["eval", "--quiet", "--threads", "1", "--max-length", "32", "--batch-tokens", "256", "--row-len", "64"]
                .map(str::to_owned)
                .to_vec();
        args.extend(["--model".into(), tiny_model().display().to_string()]);
        args.extend(["--task".into(), format!("docs={}", docs_path.display())]);
        args.extend(["--output".into(), out.join("results.json").display().to_string()]);
        args.extend(["--log-samples".into(), out.join("samples.jsonl").display().to_string()]);
        args
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for (out, cmd) in [(&one, Command::new(env!("CARGO_BIN_EXE_icl"))), (&two, mpirun(2))] {
        std::fs::create_dir(out).expect("mkdir");
        let mut cmd = cmd;
        let run = output(cmd.args(args(out)));
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    }
    let samples = read_jsonl(&one.join("samples.jsonl"));
    assert_eq!(samples.len(), 12);
    assert!(samples.iter().all(|s| s["n_windows"].as_u64() >= Some(2)), "documents longer than a window");
    assert!(
        std::fs::read(one.join("samples.jsonl")).expect("one")
            == std::fs::read(two.join("samples.jsonl")).expect("two")
    );
    assert_eq!(results_without_timing(&one.join("results.json")), results_without_timing(&two.join("results.json")));
}

/// lm-eval's own prompts change with its world size (each rank seeds its sampler afresh); icl's peer
/// samplers give the one-process prompts on any rank count, so the samples are the same bits.
#[test]
fn peer_samplers_give_one_rank_prompts_on_two_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    for sampler in ["lm-eval", "llm-foundry"] {
        let mut samples = Vec::new();
        for ranks in [1, 2] {
            let out_dir = dir.path().join(format!("{sampler}{ranks}"));
            std::fs::create_dir(&out_dir).expect("mkdir");
            let mut args = four_task_args("gpt-neo-tiny", &out_dir, 13);
            args.extend(["--num-fewshot", "2", "--fewshot-sampler", sampler].map(String::from));
            let out = if ranks == 1 {
                output(Command::new(env!("CARGO_BIN_EXE_icl")).args(&args))
            } else {
                output(mpirun(ranks).args(&args))
            };
            assert!(out.status.success(), "{sampler}, {ranks} ranks: {}", String::from_utf8_lossy(&out.stderr));
            samples.push(std::fs::read(out_dir.join("samples.jsonl")).expect("samples"));
        }
        assert!(samples[0] == samples[1], "{sampler}: samples differ between one and two ranks");
    }
}

#[test]
fn dist_none_is_refused_under_several_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = four_task_args("gpt-neo-tiny", dir.path(), 5);
    args.extend(["--dist".into(), "none".into()]);
    let out = output(mpirun(2).args(&args));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dist none, but Mpi started 2 ranks"));
}

/// The journal's records: `task/request` (or `task/generation`) of each intact line.
fn journal_keys(journal: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|l| l.ends_with('}'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l.split_once(' ').expect("crc").1).expect("json");
            let index = v.get("request").or_else(|| v.get("generation")).expect("index");
            format!("{}/{index}", v["task"])
        })
        .collect()
}

/// A run on 2 ranks killed a third of the way resumes on 1, 2 and 3 ranks: nothing journaled is
/// computed again, and samples and results are byte-identical to an uninterrupted one-rank run.
#[test]
fn a_run_killed_on_two_ranks_resumes_on_one_two_or_three() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |out: &std::path::Path| {
        let mut args = four_task_args("gpt-neo-tiny", out, 100);
        let at = args.iter().position(|a| a == "--batch-tokens").expect("--batch-tokens") + 1;
        args[at] = "256".into();
        args
    };
    let whole = dir.path().join("whole");
    std::fs::create_dir(&whole).expect("mkdir");
    let start = Instant::now();
    let out = output(Command::new(env!("CARGO_BIN_EXE_icl")).args(args(&whole)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let one_rank_seconds = start.elapsed().as_secs_f64();
    let total = journal_keys(&whole.join("results.json.journal")).len();
    let samples = std::fs::read(whole.join("samples.jsonl")).expect("samples");
    let results = results_without_timing(&whole.join("results.json"));

    let killed = dir.path().join("killed");
    std::fs::create_dir(&killed).expect("mkdir");
    let journal = killed.join("results.json.journal");
    let mut job = mpirun(2).args(args(&killed)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("mpirun");
    let start = Instant::now();
    while journal_keys(&journal).len() < total / 3 {
        assert!(job.try_wait().expect("wait").is_none(), "the run ended before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(120), "no progress in the journal");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (pid, _) in ranks_of(&job) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let (status, _) = wait_with_deadline(&mut job, Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "the killed job");
    let before = journal_keys(&journal).len();
    assert!(before < total, "killed after the end");

    for ranks in [1, 2, 3] {
        let resumed = dir.path().join(format!("resumed{ranks}"));
        std::fs::create_dir(&resumed).expect("mkdir");
        for entry in std::fs::read_dir(&killed).expect("killed run's files").flatten() {
            std::fs::copy(entry.path(), resumed.join(entry.file_name())).expect("copy");
        }
        let mut resume_args = args(&resumed);
        resume_args.push("--resume".into());
        let start = Instant::now();
        let out = if ranks == 1 {
            output(Command::new(env!("CARGO_BIN_EXE_icl")).args(&resume_args))
        } else {
            output(mpirun(ranks).args(&resume_args))
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{ranks} ranks: {stderr}");
        assert!(stderr.contains(&format!("{before} finished request(s)")), "{ranks} ranks: {stderr}");
        assert!(
            stderr.contains(&format!("{} record(s) added, 0 computed again", total - before)),
            "{ranks} ranks: {stderr}"
        );
        let keys = journal_keys(&resumed.join("results.json.journal"));
        let unique: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!((keys.len(), unique.len()), (total, total), "{ranks} ranks: duplicates or gaps");
        assert!(std::fs::read(resumed.join("samples.jsonl")).expect("samples") == samples, "{ranks} ranks: differ");
        assert_eq!(results_without_timing(&resumed.join("results.json")), results, "{ranks} ranks");
        eprintln!(
            "killed on 2 ranks at {before} of {total} records; resumed on {ranks} rank(s) in {:.1} s (one rank \
             uninterrupted: {one_rank_seconds:.1} s): identical",
            start.elapsed().as_secs_f64()
        );
    }
    // Another run's journal is still refused, on several ranks too.
    let mut other = args(&killed);
    other.extend(["--resume".into(), "--row-len".into(), "128".into()]);
    let out = output(mpirun(2).args(&other));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("row_len"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The processes that mpirun started (its children running icl), with their rank.
fn ranks_of(mpirun: &Child) -> Vec<(u32, usize)> {
    let mut ranks = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Field 4 of /proc/PID/stat (after the parenthesized name) is the parent.
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent != Some(mpirun.id()) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .find_map(|v| std::str::from_utf8(v.strip_prefix(b"OMPI_COMM_WORLD_RANK=")?).ok()?.parse().ok());
        if let Some(rank) = rank {
            ranks.push((pid, rank));
        }
    }
    ranks
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return (Some(status), start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, start.elapsed())
}

#[test]
fn killing_a_rank_mid_run_ends_every_rank_within_a_minute() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The 125M model on 400 rows per task: far longer than the moment of the kill.
    let mut job = mpirun(2)
        .args(four_task_args("gpt-neo-125m-random", dir.path(), 400))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    // Both ranks started and loaded the model (rank 0 says so when loaded).
    let start = Instant::now();
    let victim = loop {
        let ranks = ranks_of(&job);
        if ranks.len() == 2 && start.elapsed() > Duration::from_secs(8) {
            break ranks.iter().find(|(_, r)| *r == 1).expect("rank 1").0;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "ranks did not start: {ranks:?}");
        assert!(job.try_wait().expect("wait").is_none(), "the job ended before the kill");
        std::thread::sleep(Duration::from_millis(200));
    };
    let killed = Command::new("kill").args(["-9", &victim.to_string()]).status().expect("kill");
    assert!(killed.success());
    let (status, took) = wait_with_deadline(&mut job, Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().expect("stderr"), &mut stderr).expect("stderr");
    let status = status.unwrap_or_else(|| panic!("the job still ran 60 s after rank 1 was killed: {stderr}"));
    assert!(!status.success(), "the job succeeded without rank 1");
    assert!(ranks_of(&job).is_empty(), "ranks outlived the job");
    assert!(stderr.contains("signal 9") || stderr.contains("Killed"), "no word of the killed rank: {stderr}");
    eprintln!("job ended {took:?} after the kill");
}

#[test]
fn a_rank_that_fails_ends_every_rank_within_a_minute() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Rank 0 cannot write its results after the first task; rank 1 goes on to the second task and
    // would wait for rank 0 there forever.
    let mut args = four_task_args("gpt-neo-tiny", dir.path(), 23);
    let output_at = args.iter().position(|a| a == "--output").expect("--output") + 1;
    args[output_at] = dir.path().join("no-such-folder/results.json").display().to_string();
    let start = Instant::now();
    let out = output(mpirun(2).args(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("error: icl eval, rank 0 of 2:") && stderr.contains("no-such-folder"), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
}

/// Processes started with srun's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) but no Slurm
/// to join them: each says so at once instead of evaluating alone or waiting for the others.
#[test]
fn srun_variables_without_slurm_are_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_icl"))
                .args(four_task_args("gpt-neo-tiny", dir.path(), 5))
                .env("SLURM_PROCID", rank.to_string())
                .env("SLURM_NTASKS", "2")
                .env("SLURM_LOCALID", rank.to_string())
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .stderr(Stdio::piped())
                .spawn()
                .expect("icl")
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {rank} ran alone: {stderr}");
        assert!(
            stderr.contains(&format!("Slurm made this process rank {rank} of 2, but MPI started it as rank 0 of 1")),
            "{stderr}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
}
