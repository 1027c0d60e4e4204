//! Memory the heap threshold cannot see, for the kernel trigger's tests:
//! anonymous `mmap` that no allocator made, and page cache.
//!
//! `SCENARIO_CGROUP` names the memory cgroup the process runs in; the
//! grower reads it itself to note when the charge that reclaim cannot free
//! crossed the level, independently of memwatch.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use crate::init_logging;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every thread.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The cgroup's charge less its file pages, as the test reads it: v1
/// `memory.usage_in_bytes` less `total_(in)active_file`, v2
/// `memory.current` less `(in)active_file`.
pub fn unreclaimable(cgroup: &str) -> Option<u64> {
    let read = |f: &str| std::fs::read_to_string(format!("{cgroup}/{f}")).ok();
    let (charged, prefix) = match read("memory.usage_in_bytes") {
        Some(t) => (t, "total_"),
        None => (read("memory.current")?, ""),
    };
    let stat = read("memory.stat")?;
    let value = |key: String| {
        stat.lines().find_map(|l| {
            l.strip_prefix(&format!("{key} "))?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let file = value(format!("{prefix}active_file"))? + value(format!("{prefix}inactive_file"))?;
    Some(charged.trim().parse::<u64>().ok()?.saturating_sub(file))
}

/// The cgroup's limit.
pub fn limit(cgroup: &str) -> Option<u64> {
    ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| {
            std::fs::read_to_string(format!("{cgroup}/{f}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

/// Maps and writes anonymous memory, 256 KiB at a time, until the shutdown
/// hook stops intake (or twice the cgroup's limit is mapped). Prints
/// `crossed_ns` when its own reading first reaches
/// `ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO` of the limit, and the hook
/// prints `hooks_started_ns`. `GROW_PAUSE_US` pauses between steps;
/// `GROW_UNTIL_MIB` stops growing there, prints `held MiB: N` and waits up
/// to 20 s for the shutdown (then prints `not tripped`).
pub fn mmap_grows() {
    static STOP: AtomicBool = AtomicBool::new(false);
    init_logging();
    let cgroup = std::env::var("SCENARIO_CGROUP").expect("SCENARIO_CGROUP");
    let ratio: f64 = std::env::var("ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1.0);
    let limit = limit(&cgroup).expect("the cgroup's limit");
    let level = (limit as f64 * ratio) as u64;
    let pause = Duration::from_micros(
        std::env::var("GROW_PAUSE_US")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
    );
    let until = std::env::var("GROW_UNTIL_MIB")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
        .map(|m| m << 20);
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("stop intake", || {
            let at = monotonic_ns();
            STOP.store(true, SeqCst);
            println!("hooks_started_ns: {at}");
            crate::trace("stop intake");
        })
        .start();
    const STEP: usize = 256 << 10;
    let page = 4096;
    let mut mapped = 0u64;
    let mut crossed = false;
    while !STOP.load(SeqCst) && mapped < 2 * limit {
        // SAFETY: a new private anonymous mapping; nothing else refers to
        // it, and it is never unmapped while the process lives.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STEP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        for off in (0..STEP).step_by(page) {
            // SAFETY: within the mapping just made, writable.
            unsafe { p.cast::<u8>().add(off).write_volatile(0xA5) };
        }
        mapped += STEP as u64;
        if !crossed && unreclaimable(&cgroup).is_some_and(|u| u >= level) {
            crossed = true;
            println!("crossed_ns: {}", monotonic_ns());
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if until.is_some_and(|u| mapped >= u) {
            println!("held MiB: {}", mapped >> 20);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !STOP.load(SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !STOP.load(SeqCst) {
                println!("not tripped");
            }
            break;
        }
    }
    println!("mapped_mib: {}", mapped >> 20);
    let _ = std::io::stdout().flush();
    watchdog.exit_if_tripped();
}

/// Streams `MIB` MiB into the file `PATH` through the page cache, 1 MiB a
/// write, then removes it and exits 0 (2 if the latch tripped).
pub fn page_cache_writer(path: &str, mib: usize) {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("flush", || crate::trace("flush"))
        .start();
    let block = vec![0x5Au8; 1 << 20];
    let mut file = std::fs::File::create(path).expect("create");
    let mut wrote = 0;
    while wrote < mib && !memwatch::tripped() {
        file.write_all(&block).expect("write");
        wrote += 1;
    }
    drop(file);
    let _ = std::fs::remove_file(path);
    println!("wrote_mib: {wrote}");
    watchdog.exit_if_tripped();
}
