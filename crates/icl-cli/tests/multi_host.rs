//! `icl eval` on several hosts for real: three network namespaces on this machine, joined by a bridge,
//! each with its own address in a private range (inside the namespaces only) and no shared memory
//! between ranks; `mpirun` starts one rank in each through a launcher agent that enters the namespace
//! instead of ssh, and Open MPI talks TCP only (`--mca btl tcp,self`). Data parallel and
//! `--shard-params` give samples byte-identical to one rank; a host that leaves the network (its link
//! cut) or whose ranks are `kill -9`ed ends every remaining rank within a minute with an error naming
//! the lost rank, and the journal written so far stays valid.
//!
//! Needs root and iproute2 (`ip netns`), and Open MPI (`cargo xtask setup` installs both); where
//! namespaces cannot be created each test says so on stderr and passes without running.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Hosts of one test: namespaces `icl<pid>-<n>-h<i>` on a bridge, torn down (every process in
/// them killed first) when dropped, also when the test fails.
struct Hosts {
    namespaces: Vec<String>,
    bridge: String,
    subnet: String,
    agent: PathBuf,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("`ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Hosts {
    /// `count` hosts, or why they cannot be made here.
    fn new(count: usize) -> Result<Self, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        // Interface names have at most 15 characters.
        let bridge = format!("iclb{id}");
        let subnet_byte = (std::process::id() as usize * 7 + n) % 250 + 1;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut hosts = Self {
            namespaces: Vec::new(),
            bridge: bridge.clone(),
            subnet: format!("10.213.{subnet_byte}.0/24"),
            agent: dir.path().join("agent.sh"),
            _dir: dir,
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["link", "set", &bridge, "up"])?;
        let mut agent = String::from("#!/bin/sh\n# mpirun's launcher agent: HOST COMMAND... runs COMMAND inside HOST's namespace.\nhost=$1\nshift\ncase $host in\n");
        for i in 1..=count {
            let ns = format!("icl{id}-h{i}");
            ip(&["netns", "add", &ns])?;
            hosts.namespaces.push(ns.clone());
            let veth = hosts.veth(i);
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.213.{subnet_byte}.{i}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            agent += &format!("  h{i}) ns={ns} ;;\n");
        }
        agent +=
            "  *) echo \"agent: unknown host $host\" >&2; exit 1 ;;\nesac\n\
             exec ip netns exec \"$ns\" unshare --uts sh -c 'hostname \"$1\" && exec sh -c \"$2\"' agent \"$host\" \"$*\"\n";
        std::fs::write(&hosts.agent, agent).map_err(|e| e.to_string())?;
        let chmod = Command::new("chmod").arg("+x").arg(&hosts.agent).status().map_err(|e| e.to_string())?;
        assert!(chmod.success());
        Ok(hosts)
    }

    /// `mpirun` on host 1 starting `ranks` ranks over the hosts, TCP only, `icl` and its arguments to
    /// follow.
    fn mpirun(&self, ranks: usize) -> Command {
        let mut cmd = self.mpirun_program(ranks);
        cmd.arg(env!("CARGO_BIN_EXE_icl"));
        cmd
    }

    /// Waits until `mpirun` reaches every host (a link brought back up, or a neighbour entry that
    /// failed while it was down, takes a moment), or panics after 60 s with what `mpirun` said.
    fn wait_until_reachable(&self) {
        let start = Instant::now();
        loop {
            let out = self.mpirun_program(self.namespaces.len()).arg("true").output().expect("mpirun");
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mpirun cannot reach every host: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `mpirun` as in [`Hosts::mpirun`], the program still to be named.
    fn mpirun_program(&self, ranks: usize) -> Command {
        let names: Vec<String> = (1..=self.namespaces.len()).map(|i| format!("h{i}")).collect();
        // Session directories of their own: the namespaces share `/tmp` and, without the agent's
        // host names, one host name, so the tests' jobs would share `/tmp/ompi.<host>.<uid>`, which
        // one job removes when it finishes while another's daemon is creating its directory there
        // ("mkdir ... No such file or directory"). The agent starts each daemon under its own host
        // name (a UTS namespace), so the daemons of one job do not race `mpirun` to create the same
        // directories either ("mkdir ... File exists").
        let session = std::env::temp_dir().join(format!("icl-ompi-{}", self.bridge));
        std::fs::create_dir_all(&session).expect("session directory");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespaces[0], "mpirun", "-np", &ranks.to_string()])
            .args(["--host", &names.join(","), "--oversubscribe", "--bind-to", "none"])
            .args(["--mca", "plm_rsh_agent"])
            .arg(&self.agent)
            .args(["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", &self.subnet])
            .args(["--mca", "oob_tcp_if_include", &self.subnet])
            // Open MPI 4.1's daemon maps hwloc's topology into the largest hole of its address space
            // and now and then segfaults there (`hwloc_shmem_topology_write`); it is only an
            // optimisation of the daemon's start.
            .args(["--mca", "rtc_hwloc_vmhole", "none"])
            .args(["--mca", "orte_tmpdir_base"])
            .arg(&session)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        cmd
    }

    /// Host `i`'s end of its link (1-based), on the bridge.
    fn veth(&self, i: usize) -> String {
        format!("{}x{i}", self.bridge.replacen("iclb", "iclv", 1))
    }

    /// Processes running `icl` inside host `i` (1-based).
    fn icl_processes(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.namespaces[i - 1]]).output().expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("icl")))
            })
            .collect()
    }

    /// Kills every process inside the hosts (a daemon of a lost host outlives `mpirun`).
    fn kill_all(&self) {
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.kill_all();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let _ = ip(&["netns", "del", ns]);
            let _ = ip(&["link", "del", &self.veth(i + 1)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("icl-ompi-{}", self.bridge)));
    }
}

/// The hosts, or `None` after saying on stderr why this test cannot run here.
fn hosts(count: usize, test: &str) -> Option<Hosts> {
    match Hosts::new(count) {
        Ok(hosts) => Some(hosts),
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot create network namespaces (needs root and iproute2): {why}");
            None
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("starting icl (are Open MPI and iproute2 installed? `cargo xtask setup`)")
}

#[test]
fn three_hosts_data_parallel_and_sharded_equal_one_rank_byte_for_byte() {
    let Some(hosts) = hosts(3, "three_hosts_data_parallel_and_sharded_equal_one_rank_byte_for_byte") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one");
    std::fs::create_dir(&one).expect("mkdir");
    let out = run(Command::new(env!("CARGO_BIN_EXE_icl")).args(four_task_args("gpt-neo-tiny", &one, 23)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let samples = std::fs::read(one.join("samples.jsonl")).expect("samples");
    let results = results_without_timing(&one.join("results.json"));
    for sharded in [false, true] {
        let many = dir.path().join(format!("hosts-sharded-{sharded}"));
        std::fs::create_dir(&many).expect("mkdir");
        let mut args = four_task_args("gpt-neo-tiny", &many, 23);
        if sharded {
            args.push("--shard-params".into());
        }
        let start = Instant::now();
        let out = run(hosts.mpirun(3).args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sharded {sharded}: {stderr}");
        assert!(stderr.contains("3 ranks over mpi"), "{stderr}");
        assert!(std::fs::read(many.join("samples.jsonl")).expect("samples") == samples, "sharded {sharded}: differ");
        assert_eq!(results_without_timing(&many.join("results.json")), results, "sharded {sharded}");
        eprintln!(
            "3 hosts, sharded {sharded}: 4 x 23 rows identical to one rank, {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// Every journal line after the header is a whole record whose checksum holds.
fn assert_journal_valid(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).expect("journal");
    let mut lines = text.split_inclusive('\n');
    assert!(lines.next().is_some_and(|h| h.starts_with("icl-journal v1 ")), "no header");
    let mut records = 0;
    for line in lines {
        // A torn last line is allowed (resume drops it); nothing else may fail.
        let Some(line) = line.strip_suffix('\n') else { break };
        let (crc, json) = line.split_once(' ').expect("CRC and JSON");
        assert_eq!(u32::from_str_radix(crc, 16).expect("hex CRC"), crc32fast::hash(json.as_bytes()), "{line}");
        serde_json::from_str::<serde_json::Value>(json).expect("a JSON record");
        records += 1;
    }
    records
}

/// Starts a long run on three hosts (one rank each, `--peer-timeout 10`), waits until every rank
/// journals, makes host 3 disappear with `lose`, and checks that every other rank ends in time.
fn lose_host_3(hosts: &Hosts, how: &str, lose: impl FnOnce(&Hosts)) {
    hosts.wait_until_reachable();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = four_task_args("gpt-neo-125m-random", dir.path(), 400);
    args.extend(["--peer-timeout".into(), "10".into()]);
    let mut job: Child =
        hosts.mpirun(3).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("mpirun");
    let mut stderr_pipe = job.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut text);
        text
    });
    let journal = dir.path().join("results.json.journal");
    let start = Instant::now();
    while std::fs::read_to_string(&journal).map_or(0, |t| t.lines().count()) < 30 {
        assert!(start.elapsed() < Duration::from_secs(120), "{how}: no progress in the journal");
        if let Some(status) = job.try_wait().expect("wait") {
            hosts.kill_all();
            let stderr = stderr.join().expect("stderr");
            panic!("{how}: the job ended early ({status}):\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(hosts.icl_processes(3).len(), 1, "{how}: one rank on host 3");
    lose(hosts);
    let lost_at = Instant::now();
    // Every rank ends (rank 0 and 1 by their own hand, rank 2 cut off from rank 0, or killed).
    while (1..=3).any(|h| !hosts.icl_processes(h).is_empty()) {
        assert!(lost_at.elapsed() < Duration::from_secs(60), "{how}: ranks still run 60 s after the loss");
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = lost_at.elapsed();
    // mpirun may wait on for the lost host's daemon (which holds its stderr open): the test ends both.
    std::thread::sleep(Duration::from_secs(3));
    let status = job.try_wait().expect("wait");
    if status.is_none() {
        let _ = job.kill();
        let _ = job.wait();
    }
    hosts.kill_all();
    let stderr = stderr.join().expect("stderr");
    for rank in [0, 1] {
        assert!(stderr.contains(&format!("rank {rank} of 3: lost rank(s) 2")), "{how}: rank {rank} silent:\n{stderr}");
    }
    if let Some(status) = status {
        assert!(!status.success(), "{how}: mpirun succeeded");
    }
    let records = assert_journal_valid(&journal);
    assert!(records >= 29, "{how}: {records} records");
    eprintln!("{how}: every rank ended {took:?} after host 3 was lost; journal valid with {records} records");
}

#[test]
fn a_lost_host_ends_every_rank_within_a_minute_and_the_journal_stays_valid() {
    let Some(hosts) = hosts(3, "a_lost_host_ends_every_rank_within_a_minute_and_the_journal_stays_valid") else {
        return;
    };
    lose_host_3(&hosts, "link cut", |h| {
        ip(&["-n", &h.namespaces[2], "link", "set", "eth0", "down"]).expect("cut host 3's link");
    });
    // Host 3 back on the network for the next job.
    ip(&["-n", &hosts.namespaces[2], "link", "set", "eth0", "up"]).expect("link up");
    lose_host_3(&hosts, "kill -9", |h| {
        for pid in h.icl_processes(3) {
            assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill").success());
        }
    });
}
