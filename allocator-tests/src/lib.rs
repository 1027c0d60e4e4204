//! Scenario bodies shared by the binaries in `src/bin/`.
//!
//! Each binary installs memwatch as its `#[global_allocator]` (over jemalloc,
//! or over `System` for the `system_*` ones) and calls one function here. The
//! integration tests in `tests/` run the binaries as child processes and check
//! exit codes, output and the trace files the hooks leave.
//!
//! Conventions: `SCENARIO_TRACE` names a file that hooks append lines to;
//! standard output carries facts the test reads (`key: value`), standard
//! error carries the logs.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

pub mod audit;
pub mod c_heap;
pub mod cgroup;
pub mod outside_heap;
pub mod scenarios;
pub mod wal;

/// Installs env_logger at `info` (overridable with `RUST_LOG`) on stderr.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
}

/// Appends `line` to the file named by `SCENARIO_TRACE`, if set, and syncs it.
pub fn trace(line: &str) {
    let Ok(path) = std::env::var("SCENARIO_TRACE") else {
        return;
    };
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open trace file");
    writeln!(f, "{line}").expect("write trace");
    f.sync_all().expect("sync trace");
}

/// A buffer of `mib` MiB with every page written, so it is resident.
pub fn touched(mib: usize) -> Vec<u8> {
    // `black_box`: a block that is only written and then dropped is one
    // the optimizer may remove, allocation and all.
    std::hint::black_box(vec![0xA5; mib << 20])
}

/// Allocates 1 MiB at a time, holding all of it, until the latch trips or
/// `max_mib` is reached; returns what it holds.
pub fn grow_until_tripped(max_mib: usize, pause: Duration) -> Vec<Vec<u8>> {
    let mut held = Vec::new();
    while held.len() < max_mib && !memwatch::tripped() {
        held.push(touched(1));
        std::thread::sleep(pause);
    }
    held
}

/// The names of this process's threads that start with `memwatch`.
pub fn memwatch_threads() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
        let comm = entry.expect("task entry").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            let name = name.trim().to_owned();
            if name.starts_with("memwatch") {
                names.push(name);
            }
        }
    }
    names
}

/// Sleeps forever (until the watchdog ends the process).
pub fn wait_for_exit() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
