//! Running a scenario binary as a child process.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const THRESHOLD: &str = "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB";
pub const GRACE: &str = "ELASTICKV_MEMORY_SHUTDOWN_GRACE";

/// What a finished scenario left behind.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Lines the hooks appended to the trace file.
    pub trace: Vec<String>,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Lines of stderr that contain `needle`.
    pub fn stderr_lines(&self, needle: &str) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.contains(needle)).collect()
    }

    /// The one warning line on stderr, which must contain every needle
    /// (the variable, the value, what follows).
    pub fn one_warning(&self, needles: &[&str]) -> &str {
        let warnings = self.stderr_lines("WARN");
        assert_eq!(warnings.len(), 1, "exactly one warning: {self:#?}");
        for needle in needles {
            assert!(
                warnings[0].contains(needle),
                "{needle:?} missing: {}",
                warnings[0]
            );
        }
        warnings[0]
    }

    /// The value of the first `key: value` line on stdout.
    pub fn fact(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }
}

/// A fresh scratch directory for one run (tests run in parallel, several
/// of them running the same binary).
pub fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("memwatch-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `bin` with only the given memwatch variables set (any inherited ones
/// are removed), a trace file, and a time limit after which it is killed.
pub fn run(bin: &str, env: &[(&str, &str)], limit: Duration) -> Run {
    run_with_args(bin, &[], env, limit)
}

/// [`run`], with arguments.
pub fn run_with_args(bin: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let dir = scratch(bin);
    let trace = dir.join("trace");
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ELASTICKV_MEMORY_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("SCENARIO_TRACE", &trace)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn scenario");
    let pid = child.id();
    // A watchdog for the test itself: kill a scenario that overstays.
    let killer = std::thread::spawn(move || {
        let deadline = started + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().expect("wait scenario");
    let elapsed = started.elapsed();
    drop(killer);
    let trace = std::fs::read_to_string(&trace)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let run = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        trace,
        elapsed,
    };
    assert!(
        elapsed < limit,
        "{bin} ran past its {limit:?} limit and was killed: {run:#?}"
    );
    run
}

/// Every line a child with piped standard output and error writes on
/// either, in one channel, as it comes.
pub fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    lines
}

/// The real kernel as the baseline: runs `bin args` in a fresh memory
/// cgroup of `limit` bytes twice, without a heap threshold (the kernel must
/// OOM-kill it) and with `threshold_mib` (it must exit 2 with no OOM kill).
/// Returns early where the machine gives no cgroup (see
/// `allocator_tests::cgroup::cgroup_or_skip`).
pub fn oom_killed_or_exit_2(name: &str, limit: u64, bin: &str, args: &[&str], threshold_mib: &str) {
    use std::os::unix::process::ExitStatusExt;

    for threshold in [None, Some(threshold_mib)] {
        let name = format!("{name}-{}", threshold.unwrap_or("off"));
        let Some(cg) = allocator_tests::cgroup::cgroup_or_skip(&name, limit) else {
            return;
        };
        let mut cmd = cg.command(&bin_path(bin), args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ELASTICKV_MEMORY_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = threshold {
            cmd.env(THRESHOLD, t);
        }
        let out = cmd.output().expect("spawn the scenario");
        let kills = cg.oom_kills();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match threshold {
            None => {
                assert_eq!(out.status.signal(), Some(9), "the baseline: {stderr}");
                assert!(kills >= Some(1), "oom_kill {kills:?}: {stderr}");
            }
            Some(_) => {
                assert_eq!(out.status.code(), Some(2), "{stderr}");
                assert_eq!(kills, Some(0), "oom_kill {kills:?}: {stderr}");
            }
        }
        println!("{name}: {:?}, oom_kill {kills:?}", out.status);
    }
}

pub fn bin_path(bin: &str) -> PathBuf {
    // Cargo builds every binary of this package before its integration
    // tests and tells us where: CARGO_BIN_EXE_<name> at compile time. The
    // binaries sit beside the test's own deps directory's parent.
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    p.join(bin)
}
