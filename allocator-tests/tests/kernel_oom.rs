//! The real kernel as the baseline: in a memory cgroup with a hard limit, a
//! workload that appends fsynced, checksummed records while its heap grows is
//! SIGKILLed by the OOM-killer without memwatch, and with memwatch at 70% of
//! the limit exits 2 with every acknowledged record intact and no torn tail.
//!
//! Needs root and a writable cgroup v1 memory controller or cgroup v2. Where
//! that is missing the test prints why and passes, unless
//! `MEMWATCH_REQUIRE_CGROUP=1` (set by `.ci/run`) makes it fail instead.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use allocator_tests::cgroup::{cgroup_or_skip, skip_or_fail, Cgroup};
use allocator_tests::wal;
use common::{bin_path, scratch, THRESHOLD};

const LIMIT_MIB: u64 = 256;

/// One run of the workload and what it left.
struct Outcome {
    status: std::process::ExitStatus,
    acked: Vec<u64>,
    replay: wal::Replay,
    trace: Vec<String>,
    oom_kills: Option<u64>,
    elapsed: Duration,
    stderr: String,
}

fn run_workload(name: &str, threshold_mib: Option<u64>) -> Result<Outcome, String> {
    let cg = Cgroup::create(
        &format!("memwatch-test-{name}-{}", std::process::id()),
        LIMIT_MIB << 20,
    )?;
    let dir = scratch(&format!("kernel-{name}"));
    let log = dir.join("wal");
    let trace = dir.join("trace");
    let mut cmd = cg.command(&bin_path("wal_writer"), &[log.to_str().unwrap()]);
    cmd.env_remove(THRESHOLD)
        .env_remove("ELASTICKV_MEMORY_SHUTDOWN_GRACE")
        .env("SCENARIO_TRACE", &trace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = threshold_mib {
        cmd.env(THRESHOLD, t.to_string());
    }
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("spawn wal_writer: {e}"))?;
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let acked = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
        .collect();
    let data = std::fs::read(&log).unwrap_or_default();
    let trace = std::fs::read_to_string(&trace)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    let outcome = Outcome {
        status: out.status,
        acked,
        replay: wal::replay(&data),
        trace,
        oom_kills: cg.oom_kills(),
        elapsed,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

fn assert_every_ack_recovered(o: &Outcome) {
    let n = o.replay.records.len() as u64;
    assert_eq!(
        o.replay.records,
        (0..n).collect::<Vec<_>>(),
        "records in order"
    );
    assert!(
        o.acked.iter().all(|&seq| seq < n),
        "acknowledged {} records, recovered {n}",
        o.acked.len()
    );
}

#[test]
fn memwatch_exits_2_where_the_kernel_oom_kills() {
    // Baseline: no threshold. The kernel's OOM-killer ends it with SIGKILL.
    let baseline = match run_workload("baseline", None) {
        Ok(o) => o,
        Err(why) => return skip_or_fail(&why),
    };
    eprintln!(
        "kernel baseline: status {:?} (signal {:?}), {} acknowledged, {} recovered, \
         torn tail {} bytes, oom_kill {:?}, {:?}",
        baseline.status,
        baseline.status.signal(),
        baseline.acked.len(),
        baseline.replay.records.len(),
        baseline.replay.torn_bytes,
        baseline.oom_kills,
        baseline.elapsed
    );
    assert_eq!(
        baseline.status.signal(),
        Some(9),
        "the kernel SIGKILLs the workload without memwatch: {}",
        baseline.stderr
    );
    assert!(
        baseline.oom_kills.unwrap_or(1) >= 1,
        "the cgroup saw an OOM kill"
    );
    assert!(baseline.acked.len() > 100, "it ran a while before the kill");
    assert_every_ack_recovered(&baseline);

    // memwatch at 70% of the limit: an orderly exit 2 before the kernel acts.
    let threshold = LIMIT_MIB * 7 / 10;
    let ours = run_workload("memwatch", Some(threshold)).expect("second cgroup");
    eprintln!(
        "memwatch at {threshold} MiB: status {:?}, {} acknowledged, {} recovered, \
         torn tail {} bytes, oom_kill {:?}, {:?}",
        ours.status,
        ours.acked.len(),
        ours.replay.records.len(),
        ours.replay.torn_bytes,
        ours.oom_kills,
        ours.elapsed
    );
    assert_eq!(ours.status.code(), Some(2), "{}", ours.stderr);
    assert_eq!(
        ours.oom_kills.unwrap_or(0),
        0,
        "the kernel never had to act"
    );
    assert_eq!(
        ours.trace,
        ["log closed"],
        "the hook fsynced and closed the log"
    );
    assert_eq!(ours.replay.torn_bytes, 0, "no torn tail");
    assert!(ours.acked.len() > 100, "it ran a while before the trip");
    assert_every_ack_recovered(&ours);
}

#[test]
fn a_ratio_threshold_follows_the_cgroup_limit() {
    let Some(cg) = cgroup_or_skip("ratio", 256 << 20) else {
        return;
    };
    let mut cmd = cg.command(&bin_path("crosses_threshold"), &[]);
    let out = cmd
        .env_remove(THRESHOLD)
        .env("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO", "0.5")
        .env("ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO", "0.25")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let limit = stderr
        .lines()
        .find(|l| l.contains("memory limit "))
        .expect("limit logged");
    assert!(limit.contains("268435456 bytes (256 MiB)"), "{limit}");
    assert!(
        limit.contains(&format!("cgroup v{}", cg.version)),
        "{limit}"
    );
    let on = stderr
        .lines()
        .find(|l| l.contains("memory watchdog on"))
        .unwrap();
    assert!(on.contains("threshold 128 MiB (134217728 bytes)"), "{on}");
    assert!(on.contains("shed level 64 MiB (67108864 bytes"), "{on}");
    assert!(
        stderr.contains("shedding load"),
        "the shed level was entered on the way"
    );
}

#[test]
fn ratio_levels_follow_a_resize_of_the_cgroup() {
    let Some(cg) = cgroup_or_skip("resize", 512 << 20) else {
        return;
    };
    let limit_file = match cg.version {
        1 => "memory.limit_in_bytes",
        _ => "memory.max",
    };
    let dir = scratch("kernel-resize");
    let trace = dir.join("trace");
    // 96 MiB held. At 512 MiB the threshold is 256 MiB and the shed level
    // 128 MiB: below both.
    let mut child = cg
        .command(&bin_path("holds_and_waits"), &[])
        .env_remove(THRESHOLD)
        .env_remove("ELASTICKV_MEMORY_SHUTDOWN_GRACE")
        .env("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO", "0.5")
        .env("ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO", "0.25")
        .env("ELASTICKV_MEMORY_LIMIT_RECHECK", "100ms")
        .env("HOLD_MIB", "96")
        .env("SCENARIO_TRACE", &trace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn holds_and_waits");
    let lines = common::lines_of(&mut child);
    let mut seen: Vec<String> = Vec::new();
    // A line may come before one logged earlier: the watchdog's own lines
    // go through its log thread, the soft level's through the pressure
    // thread. So a line already seen counts too.
    let mut wait_for = |needle: &str| -> String {
        if let Some(line) = seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} in:\n{}", seen.join("\n")),
            }
        }
    };
    let on = wait_for("memory watchdog on");
    assert!(on.contains("threshold 256 MiB"), "{on}");
    assert!(on.contains("shed level 128 MiB"), "{on}");
    wait_for("held MiB: 96");

    // 320 MiB: threshold 160 MiB (still above), shed level 80 MiB (now
    // below what is held): the soft level is entered, nothing exits.
    cg.write(limit_file, &(320u64 << 20).to_string()).unwrap();
    let moved = wait_for("memory limit changed");
    assert!(
        moved.contains("from 536870912 to 335544320 bytes (320 MiB)"),
        "{moved}"
    );
    assert!(
        moved.contains("threshold now 160 MiB (167772160 bytes)"),
        "{moved}"
    );
    assert!(
        moved.contains("shed level 80 MiB (83886080 bytes"),
        "{moved}"
    );
    wait_for("shedding load");
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running above the shed level"
    );

    // 160 MiB: threshold 80 MiB, below the 96 MiB held: the shutdown
    // starts within a recheck period.
    let resized = Instant::now();
    cg.write(limit_file, &(160u64 << 20).to_string()).unwrap();
    let moved = wait_for("memory limit changed from 335544320 to 167772160");
    assert!(moved.contains("threshold now 80 MiB"), "{moved}");
    wait_for("memory threshold crossed");
    let status = child.wait().unwrap();
    let took = resized.elapsed();
    seen.extend(lines.iter());
    let log = seen.join("\n");
    eprintln!("{log}");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "exit {took:?} after the resize"
    );
    let trace = std::fs::read_to_string(&trace).unwrap_or_default();
    assert_eq!(
        trace.lines().collect::<Vec<_>>(),
        ["flush"],
        "the hook ran once"
    );
    assert!(!log.contains("not tripped"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Idle threads in a real 400 MiB cgroup: 100 MiB on the main thread and
/// 128 pool threads each holding 3.99 MiB (610 MiB in all, every page
/// written). Without memwatch the kernel OOM-kills the process; with a
/// 256 MiB threshold memwatch exits 2 first, and the kernel kills nothing.
#[test]
fn idle_threads_exit_2_where_the_kernel_oom_kills() {
    common::oom_killed_or_exit_2(
        "idle",
        400 << 20,
        "idle_threads",
        &["100", "128", "4085"],
        "256",
    );
}

/// Two threads that spin for as long as the guard lives: a loaded machine,
/// every core busy, for runs whose watchdog must still get a core.
struct CpuHog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHog {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        CpuHog { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `runs` runs of `bin args` in a fresh cgroup of `limit` bytes with the
/// threshold at `threshold_mib`, a logger installed and both cores kept
/// busy: every one exits 2 with `oom_kill 0` and the trip line. Prints the
/// cgroup's peak of each.
fn held_runs(name: &str, limit: u64, bin: &str, args: &[&str], threshold_mib: &str, runs: usize) {
    let _hog = CpuHog::start();
    let mut peaks = Vec::new();
    for run in 0..runs {
        let Some(cg) = cgroup_or_skip(&format!("{name}-{run}"), limit) else {
            return;
        };
        let mut cmd = cg.command(&bin_path(bin), args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ELASTICKV_MEMORY_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .env(THRESHOLD, threshold_mib)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("spawn the scenario");
        let kills = cg.oom_kills();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "run {run}: {:?}: {stderr}",
            out.status
        );
        assert_eq!(kills, Some(0), "run {run}: oom_kill {kills:?}: {stderr}");
        assert!(
            stderr.contains("[memwatch ERROR] memory threshold crossed"),
            "run {run}: no trip line: {stderr}"
        );
        peaks.push(cg.peak().unwrap_or(0) >> 20);
    }
    println!("{name}: {runs} of {runs} exit 2 with oom_kill 0; cgroup peak MiB {peaks:?}");
}

/// 100 MiB on the main thread and 128 threads allocating about 4 MiB each
/// in 64 KiB steps, against 256 MiB, in a real 400 MiB cgroup, with both
/// cores busy: threads that would take the heap past the hold ceiling
/// (halfway to the limit, 328 MiB) wait at their next allocation, so the
/// growth after the trip cannot outrun the exit into the OOM-killer.
#[test]
fn growth_after_the_trip_is_held_in_a_real_cgroup_20_of_20() {
    held_runs(
        "held-128",
        400 << 20,
        "idle_threads",
        &["100", "128", "4085"],
        "256",
        20,
    );
}

/// 1,000 threads each allocating 3.5 MiB against 64 MiB, in a real
/// 256 MiB cgroup, with both cores busy.
#[test]
fn a_thousand_threads_are_held_in_a_256_mib_cgroup_10_of_10() {
    held_runs(
        "held-1000",
        256 << 20,
        "idle_threads",
        &["0", "1000", "3584"],
        "64",
        10,
    );
}
