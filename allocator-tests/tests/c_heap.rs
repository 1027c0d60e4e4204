//! `memwatch::c_heap!`: C and C++ allocations, on the calling thread, on C
//! threads and on C++ threads, count exactly like the Rust heap and trip
//! the same threshold.

mod common;

use std::time::Duration;

use common::{run_with_args, THRESHOLD};

const LIMIT: Duration = Duration::from_secs(60);

/// A figure the scenario printed, as a number.
fn number(r: &common::Run, k: &str) -> i64 {
    r.fact(k)
        .unwrap_or_else(|| panic!("no {k:?}: {r:#?}"))
        .parse()
        .unwrap()
}

#[test]
fn c_and_cxx_allocations_count_like_the_rust_heap() {
    let r = run_with_args("c_heap", &["exact"], &[], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    let fact = |k: &str| number(&r, k);
    // The calling thread's reading is exact: 100 x 1 MiB from C's malloc.
    let usable = fact("main malloc usable");
    assert!(usable >= 100 << 20, "{usable}");
    assert_eq!(fact("main malloc moved"), usable, "{r:#?}");
    assert_eq!(fact("main freed moved"), 0, "{r:#?}");
    // A live C thread, idle between commands: within what the live threads
    // may hold unpublished (the process's reported reading error, at most
    // 1.25 times the floor plus the pool, and 16 bytes, a thread), for
    // blocks of 1 MiB and for 100,000 small ones alike.
    let unpublished = fact("reading error");
    assert!(unpublished > 0 && unpublished < 16 << 20, "{unpublished}");
    for what in ["worker large", "worker all"] {
        let usable = fact(&format!("{what} usable"));
        let moved = fact(&format!("{what} moved"));
        assert!(
            (moved - usable).abs() <= unpublished,
            "{what}: moved {moved}, usable {usable}"
        );
    }
    assert!(fact("worker freed moved").abs() <= unpublished, "{r:#?}");
    // Once the C thread has ended, exact again.
    assert_eq!(fact("worker ended moved"), 0, "{r:#?}");
    // memalign with the alignments glibc rounds (0, 24, 48), and glibc's
    // __libc_valloc and __libc_pvalloc: aligned blocks of jemalloc's that
    // free() takes back, counted in and out.
    assert_eq!(fact("aligned cases failed"), 0, "{r:#?}");
    assert_eq!(fact("aligned cases moved"), 0, "{r:#?}");
    // C++ `new` on one std::thread and `delete` on another, both ended.
    let usable = fact("cxx new usable");
    assert!(usable >= 64 << 20, "{usable}");
    assert_eq!(fact("cxx new moved"), usable, "{r:#?}");
    assert_eq!(fact("cxx deleted moved"), 0, "{r:#?}");
}

#[test]
fn c_allocations_alone_trip_the_heap_threshold() {
    let r = run_with_args("c_heap", &["trip"], &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(
        r.stderr_lines("[memwatch ERROR] memory threshold crossed")
            .len(),
        1,
        "{r:#?}"
    );
    assert_eq!(r.trace, ["flush"], "{r:#?}");
    assert!(r.fact("not tripped").is_none(), "{r:#?}");
    assert!(
        r.elapsed < Duration::from_secs(5),
        "64 MiB at 1 MiB a millisecond: {:?}",
        r.elapsed
    );
}

/// In a real 256 MiB memory cgroup: C allocations alone (a C thread
/// growing 1 MiB a millisecond) get the process OOM-killed without a
/// threshold, and with one at 128 MiB end in exit 2 with no OOM kill.
#[test]
fn c_heap_growth_exits_2_where_the_kernel_oom_kills() {
    common::oom_killed_or_exit_2("c-heap", 256 << 20, "c_heap", &["trip"], "128");
}

/// The macro is per binary: the binary that invokes it defines `malloc`,
/// the others in the same package do not.
#[test]
fn only_the_binary_that_invokes_the_macro_defines_malloc() {
    let defines_malloc = |bin: &str| {
        let out = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(common::bin_path(bin))
            .output()
            .expect("run nm");
        assert!(out.status.success(), "nm {bin}: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().last() == Some("malloc"))
    };
    assert!(defines_malloc("c_heap"));
    assert!(!defines_malloc("crosses_threshold"));
}

/// With `with_slack(0)` the C calls look and fold after every call, as the
/// Rust calls do: the reading is exact for a live idle C thread too.
#[test]
fn with_no_slack_c_allocations_are_read_exactly_on_every_thread() {
    let r = run_with_args("c_heap_no_slack", &[], &[], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    let fact = |k: &str| number(&r, k);
    for what in ["main malloc", "worker large", "worker all", "cxx new"] {
        assert_eq!(
            fact(&format!("{what} moved")),
            fact(&format!("{what} usable")),
            "{what}: {r:#?}"
        );
    }
    for what in ["main freed", "worker freed", "worker ended", "cxx deleted"] {
        assert_eq!(fact(&format!("{what} moved")), 0, "{what}: {r:#?}");
    }
}
