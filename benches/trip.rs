//! Two figures criterion cannot take, written to
//! `target/criterion/memwatch-extra.json` for `benches/report.py`:
//!
//! - the trip: from just before the allocation that crosses the threshold to
//!   the moment the parent sees the child's exit, over 100 child processes
//!   (no hooks; the error line goes to /dev/null), with 0, 16 and 128 other
//!   threads of the child churning the heap on every core meanwhile;
//! - the reading against the truth: after the key-value churn, memwatch's
//!   live bytes against jemalloc's `stats.allocated` and the process RSS.
//!
//! With `--test` (as `cargo bench -- --test` passes) it does one trip and
//! skips the file.

mod kv;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

const CHILD: &str = "MEMWATCH_TRIP_CHILD";
/// How many busy threads the child starts before it trips.
const BUSY: &str = "MEMWATCH_TRIP_BUSY";

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is
    // supported on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The child: holds 40 MiB under a 64 MiB threshold (busy threads hold up
/// to 64 KiB each on top), reports the clock, and makes the crossing
/// allocation. The watchdog ends it with code 2.
fn child() -> ! {
    let _w = memwatch::Watchdog::new().threshold_mb(64).start();
    let held: Vec<Vec<u8>> = (0..40).map(|_| vec![1u8; 1 << 20]).collect();
    let busy: usize = std::env::var(BUSY)
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    for _ in 0..busy {
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| loop {
                drop(std::hint::black_box(vec![0u8; 64 << 10]));
            })
            .expect("spawn a busy thread");
    }
    if busy > 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!("t0 {}", monotonic_ns());
    // 32 MiB, above the slack: folded at once, and it crosses.
    let crossing = std::hint::black_box(vec![1u8; 32 << 20]);
    loop {
        std::hint::black_box((&held, &crossing));
        std::thread::park();
    }
}

/// One trip, in milliseconds, with `busy` threads churning in the child.
fn trip_once(busy: usize) -> f64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, "1")
        .env(BUSY, busy.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read t0");
    let status = child.wait().expect("wait child");
    let t1 = monotonic_ns();
    assert_eq!(status.code(), Some(2), "the child exits 2");
    let t0: u64 = line
        .trim()
        .strip_prefix("t0 ")
        .expect("t0 line")
        .parse()
        .unwrap();
    (t1 - t0) as f64 / 1e6
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child();
    }
    if std::env::args().any(|a| a == "--test") {
        println!("trip: {:.2} ms (test mode, one run)", trip_once(16));
        return;
    }
    let mut loads = Vec::new();
    let (mut median, mut worst, mut runs) = (0.0, 0.0, 0);
    for busy in [0, 16, 128] {
        let mut trips: Vec<f64> = (0..100).map(|_| trip_once(busy)).collect();
        trips.sort_by(f64::total_cmp);
        let (m, p99, max) = (
            trips[trips.len() / 2],
            trips[trips.len() * 99 / 100 - 1],
            trips[trips.len() - 1],
        );
        println!(
            "trip to exit with {busy} busy threads over {} runs: median {m:.2} ms, \
             p99 {p99:.2} ms, max {max:.2} ms",
            trips.len()
        );
        if busy == 0 {
            (median, worst, runs) = (m, max, trips.len());
        }
        loads.push(format!(
            "{{\"busy\": {busy}, \"runs\": {}, \"median_ms\": {m:.2}, \"p99_ms\": {p99:.2}, \"max_ms\": {max:.2}}}",
            trips.len()
        ));
    }

    let map = kv::churn(200_000, 20_000, 42);
    let live = memwatch::live_bytes();
    let je = memwatch::jemalloc_stats().expect("jemalloc stats");
    let rss = rss_bytes();
    let gap = |other: usize| {
        format!(
            "{:+.1}%",
            (other as f64 - live as f64) / live as f64 * 100.0
        )
    };
    println!(
        "reading: memwatch {live} B, jemalloc allocated {} B ({}), RSS {rss} B ({})",
        je.allocated,
        gap(je.allocated),
        gap(rss)
    );
    drop(map);

    let json = format!(
        "{{\"trip\": {{\"runs\": {runs}, \"median_ms\": \"{median:.2}\", \"worst_ms\": \"{worst:.2}\"}}, \
         \"trip_load\": [{}], \
         \"accuracy\": {{\"live\": {live}, \"jemalloc_allocated\": {}, \"gap_allocated\": \"{}\", \
         \"rss\": {rss}, \"gap_rss\": \"{}\"}}}}",
        loads.join(", "),
        je.allocated,
        gap(je.allocated),
        gap(rss)
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("memwatch-extra.json"), json).unwrap();
}
