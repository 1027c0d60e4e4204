//! Whole-process scenarios: each test runs a binary from `src/bin/` that has
//! memwatch as its global allocator, and checks what a user relies on.

mod common;

use std::time::Duration;

use common::{run, Run, GRACE, THRESHOLD};

const LIMIT: Duration = Duration::from_secs(60);

fn assert_crossing(bin: &str, jemalloc: bool) {
    let r = run(bin, &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    // Written straight to standard error once, and through the logger once.
    let errors = r.stderr_lines("[memwatch ERROR] memory threshold crossed");
    assert_eq!(errors.len(), 1, "one error line: {r:#?}");
    assert_eq!(
        r.stderr_lines("memory threshold crossed").len(),
        2,
        "the same line through the logger: {r:#?}"
    );
    let line = errors[0];
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("threshold 67108864 bytes (64 MiB)"), "{line}");
    assert!(line.contains("live heap "), "{line}");
    // jemalloc's figures are in the logger's line.
    let logged = r.stderr_lines("ERROR memwatch] memory threshold crossed");
    assert_eq!(logged.len(), 1, "{r:#?}");
    assert_eq!(
        logged[0].contains("resident="),
        jemalloc,
        "jemalloc figures present iff jemalloc is the inner allocator: {}",
        logged[0]
    );
    assert_eq!(r.trace, ["first", "second"], "hooks ran in order: {r:#?}");
    assert!(!r.stdout.contains("finished"), "{r:#?}");
    let effective = r.stderr_lines("memory watchdog on");
    assert_eq!(effective.len(), 1, "{r:#?}");
    assert!(effective[0].contains("grace 30s") && effective[0].contains("exit code 2"));
}

#[test]
fn crossing_the_threshold_exits_2_after_the_hooks_in_order() {
    assert_crossing("crosses_threshold", true);
}

#[test]
fn crossing_the_threshold_over_system() {
    assert_crossing("system_crosses_threshold", false);
}

fn assert_runs_to_end(bin: &str, value: Option<&str>) -> common::Run {
    let env: Vec<(&str, &str)> = value.map(|v| vec![(THRESHOLD, v)]).unwrap_or_default();
    let r = run(bin, &env, LIMIT);
    assert_eq!(r.code(), Some(0), "value {value:?}: {r:#?}");
    assert_eq!(r.fact("armed"), Some("false"), "{r:#?}");
    assert_eq!(r.fact("held MiB"), Some("512"), "{r:#?}");
    assert_eq!(
        r.fact("memwatch threads"),
        Some("[]"),
        "no watchdog thread: {r:#?}"
    );
    assert!(r.trace.is_empty(), "{r:#?}");
    assert!(r.stdout.contains("finished"), "{r:#?}");
    r
}

#[test]
fn off_when_unset_empty_or_zero() {
    for bin in ["runs_to_end", "system_runs_to_end"] {
        for value in [None, Some(""), Some("0"), Some("  0 ")] {
            let r = assert_runs_to_end(bin, value);
            assert_eq!(r.stderr_lines("memory watchdog off").len(), 1, "{r:#?}");
            assert!(r.stderr_lines("WARN").is_empty(), "{r:#?}");
        }
    }
}

#[test]
fn bad_threshold_values_warn_once_and_stay_off() {
    let past_u64 = "18446744073709551616"; // 2^64: not even a u64
    let bytes_overflow = (u64::MAX / (1 << 20) + 1).to_string(); // MiB × 2^20 > u64
    let past_isize = (isize::MAX as u64 / (1 << 20) + 1).to_string(); // > isize::MAX bytes
    for value in [
        "abc",
        "-5",
        "1.5",
        "0x40",
        past_u64,
        &bytes_overflow,
        &past_isize,
    ] {
        let r = assert_runs_to_end("runs_to_end", Some(value));
        r.one_warning(&[THRESHOLD, &format!("{value:?}"), "off"]);
    }
}

#[test]
fn bad_grace_values_warn_once_and_stay_off() {
    for value in ["10", "abc", "1.5s", "-1s", "5h"] {
        let env = [(THRESHOLD, "64"), (GRACE, value)];
        let r = run("runs_to_end", &env, LIMIT);
        assert_eq!(r.code(), Some(0), "{r:#?}");
        assert_eq!(r.fact("memwatch threads"), Some("[]"), "{r:#?}");
        r.one_warning(&[GRACE, &format!("{value:?}"), "off"]);
    }
}

#[test]
fn bad_limit_recheck_values_warn_once_and_read_the_limit_once() {
    const RECHECK: &str = "ELASTICKV_MEMORY_LIMIT_RECHECK";
    for value in ["10", "off", "1.5s", "-1s"] {
        // Half of the memory limit: far above the 512 MiB the scenario holds.
        let env = [
            ("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO", "0.5"),
            (RECHECK, value),
        ];
        let r = run("runs_to_end", &env, LIMIT);
        assert_eq!(r.code(), Some(0), "{r:#?}");
        r.one_warning(&[RECHECK, &format!("{value:?}"), "read once, at start"]);
        assert_eq!(
            r.stderr_lines("memory watchdog on").len(),
            1,
            "still on: {r:#?}"
        );
        assert!(limit_line(&r).ends_with("read once"), "{r:#?}");
    }
    let r = run(
        "runs_to_end",
        &[("ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO", "0.5")],
        LIMIT,
    );
    assert!(r.stderr_lines("WARN").is_empty(), "{r:#?}");
    assert!(
        limit_line(&r).ends_with("rechecked every 10s"),
        "the default: {r:#?}"
    );
}

/// The line that logs the memory limit at start.
fn limit_line(r: &Run) -> &str {
    let lines: Vec<&str> = r
        .stderr_lines("memory limit ")
        .into_iter()
        .filter(|l| l.contains(" bytes ("))
        .collect();
    assert_eq!(lines.len(), 1, "{r:#?}");
    lines[0]
}

#[test]
fn warnings_reach_stderr_without_a_logger() {
    // `RUST_LOG=off` makes env_logger's maximum level Off, as if no logger
    // were installed: the warning must still be printed.
    let r = run(
        "runs_to_end",
        &[(THRESHOLD, "abc"), ("RUST_LOG", "off")],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{r:#?}");
    let lines = r.stderr_lines(THRESHOLD);
    assert_eq!(lines.len(), 1, "{r:#?}");
    assert!(lines[0].starts_with("[memwatch WARN]"), "{}", lines[0]);
}

fn assert_fires_once(bin: &str) {
    let r = run(bin, &[(THRESHOLD, "128")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["hook run 1"], "the hook ran exactly once: {r:#?}");
    assert_eq!(
        r.stderr_lines("[memwatch ERROR] memory threshold crossed")
            .len(),
        1,
        "{r:#?}"
    );
}

#[test]
fn many_threads_crossing_together_fire_once() {
    assert_fires_once("many_threads_cross");
}

#[test]
fn many_threads_crossing_together_fire_once_over_system() {
    assert_fires_once("system_many_threads_cross");
}

#[test]
fn already_above_at_start_fires_at_once() {
    let r = run("above_at_start", &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["hook ran"], "{r:#?}");
    // The scenario would sleep 10 s before ending on its own.
    assert!(r.elapsed < Duration::from_secs(5), "took {:?}", r.elapsed);
}

#[test]
fn hooks_that_allocate_heavily_do_not_deadlock() {
    let r = run("hooks_allocate", &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(
        r.trace,
        ["hook allocated 1073741824 bytes", "after"],
        "{r:#?}"
    );
    assert_eq!(
        r.stderr_lines("[memwatch ERROR] memory threshold crossed")
            .len(),
        1,
        "{r:#?}"
    );
}

#[test]
fn a_hanging_hook_ends_at_the_grace_deadline() {
    let r = run("hook_hangs", &[(THRESHOLD, "64"), (GRACE, "500ms")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["quick", "hanging"], "{r:#?}");
    let lines = r.stderr_lines("grace deadline");
    assert_eq!(lines.len(), 1, "{r:#?}");
    assert!(
        lines[0].contains("\"hangs forever\""),
        "names the hook: {}",
        lines[0]
    );
    // Growing to 64 MiB takes well under a second; the deadline is 500 ms.
    assert!(r.elapsed < Duration::from_secs(4), "took {:?}", r.elapsed);
}

fn assert_panicking_hook(bin: &str) {
    let r = run(bin, &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["after the panic"], "{r:#?}");
    let lines = r.stderr_lines("panicked");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"boom\"") && l.contains("hook failure for the test")),
        "{r:#?}"
    );
}

#[test]
fn a_panicking_hook_is_logged_and_the_next_runs() {
    assert_panicking_hook("hook_panics");
}

#[test]
fn a_panicking_hook_over_system() {
    assert_panicking_hook("system_hook_panics");
}

#[test]
fn main_returning_an_error_after_its_own_shutdown_still_exits_2() {
    let r = run("main_returns_error", &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(
        r.trace,
        [
            "main flushed",
            "main returning an error",
            "hook saw main finish"
        ],
        "{r:#?}"
    );
}

fn assert_no_drift(bin: &str) {
    let r = run(bin, &[], LIMIT);
    assert_eq!(r.fact("threads"), Some("1000"), "{r:#?}");
    assert_eq!(r.fact("drift"), Some("0"), "{r:#?}");
    assert_eq!(r.code(), Some(0), "{r:#?}");
}

#[test]
fn thread_churn_leaves_zero_drift() {
    assert_no_drift("thread_churn");
}

#[test]
fn thread_churn_leaves_zero_drift_over_system() {
    assert_no_drift("system_thread_churn");
}

const SHED: &str = "ELASTICKV_MEMORY_SHED_THRESHOLD_MB";
const RATIO: &str = "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO";
const SHED_RATIO: &str = "ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO";

#[test]
fn the_shed_level_is_entered_and_left_with_hysteresis() {
    let r = run("shed_levels", &[(THRESHOLD, "1024"), (SHED, "128")], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert_eq!(r.fact("shed MiB"), Some("128"));
    assert_eq!(r.fact("below"), Some("false"), "{r:#?}");
    assert_eq!(r.fact("above"), Some("true"), "{r:#?}");
    assert_eq!(
        r.fact("in band"),
        Some("true"),
        "hysteresis holds the level: {r:#?}"
    );
    assert_eq!(r.fact("below leave"), Some("false"), "{r:#?}");
    assert_eq!(r.fact("above again"), Some("true"), "{r:#?}");
    assert_eq!(
        r.trace,
        ["entered", "left", "entered"],
        "one callback per change: {r:#?}"
    );
    assert_eq!(r.stderr_lines("shedding load").len(), 2, "{r:#?}");
    assert_eq!(r.stderr_lines("accepting load").len(), 1, "{r:#?}");
}

#[test]
fn bad_shed_values_turn_off_only_the_shed_level() {
    for (env, needle) in [
        (vec![(THRESHOLD, "4096"), (SHED, "abc")], SHED),
        (vec![(THRESHOLD, "4096"), (SHED, "5000")], "must sit below"),
        (vec![(THRESHOLD, "4096"), (SHED, "4096")], "must sit below"),
        (vec![(THRESHOLD, "4096"), (SHED_RATIO, "2")], SHED_RATIO),
    ] {
        // runs_to_end holds 512 MiB at its peak: far below 4096.
        let r = run("runs_to_end", &env, LIMIT);
        assert_eq!(r.code(), Some(0), "{r:#?}");
        r.one_warning(&[needle, "shed level is off"]);
        assert_eq!(
            r.fact("armed"),
            Some("true"),
            "the shutdown threshold stays: {r:#?}"
        );
    }
}

#[test]
fn a_shed_level_without_a_shutdown_threshold_warns_once() {
    let r = run("runs_to_end", &[(SHED, "128")], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert_eq!(r.fact("armed"), Some("false"), "{r:#?}");
    r.one_warning(&[SHED, "needs a shutdown threshold"]);
}

#[test]
fn bad_ratio_values_warn_once_and_stay_off() {
    for value in ["1.5", "0", "-0.5", "abc", "70%", "1e-1"] {
        let r = run("runs_to_end", &[(RATIO, value)], LIMIT);
        assert_eq!(r.code(), Some(0), "{r:#?}");
        assert_eq!(r.fact("armed"), Some("false"), "{r:#?}");
        r.one_warning(&[RATIO, &format!("{value:?}"), "off"]);
    }
}

const CGROUP_RATIO: &str = "ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO";

#[test]
fn bad_kernel_trigger_values_warn_once_and_turn_off_only_that_trigger() {
    for value in ["1.5", "0", "abc", "0.9 ", "NaN"] {
        let r = run(
            "runs_to_end",
            &[(THRESHOLD, "4096"), (CGROUP_RATIO, value)],
            LIMIT,
        );
        assert_eq!(r.code(), Some(0), "{r:#?}");
        if value.trim() == "0.9" {
            // Surrounding white space is accepted, as for every variable.
            assert!(r.stderr_lines("WARN").is_empty(), "{r:#?}");
            assert_eq!(r.stderr_lines("kernel trigger").len(), 1, "{r:#?}");
            continue;
        }
        r.one_warning(&[CGROUP_RATIO, &format!("{value:?}"), "kernel trigger is off"]);
        assert_eq!(
            r.fact("armed"),
            Some("true"),
            "the heap threshold stays: {r:#?}"
        );
    }
}

#[test]
fn the_kernel_trigger_without_a_shutdown_threshold_warns_once() {
    let r = run("runs_to_end", &[(CGROUP_RATIO, "0.9")], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert_eq!(r.fact("armed"), Some("false"), "{r:#?}");
    r.one_warning(&[CGROUP_RATIO, "needs a shutdown threshold"]);
}

#[test]
fn the_mib_form_wins_over_the_ratio_with_a_warning() {
    let r = run(
        "crosses_threshold",
        &[(THRESHOLD, "64"), (RATIO, "0.5")],
        LIMIT,
    );
    assert_eq!(r.code(), Some(2), "{r:#?}");
    r.one_warning(&[THRESHOLD, RATIO, "wins"]);
    assert_eq!(
        r.stderr_lines("threshold 64 MiB (67108864 bytes)").len(),
        1,
        "{r:#?}"
    );
}

#[test]
fn nothing_on_the_allocator_path_allocates() {
    let r = run("hot_path_reentrance", &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.fact("churn done, nested so far"), Some("0"), "{r:#?}");
    assert_eq!(r.fact("nested"), Some("0"), "{r:#?}");
}

fn assert_fork_children(bin: &str) {
    let r = run(bin, &[], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert_eq!(r.fact("children hung"), Some("0"), "{r:#?}");
    assert_eq!(r.fact("children ok"), Some("20"), "{r:#?}");
}

/// A child of `fork` keeps a reading that holds the parent's heap, with no
/// entry left of the parent's other threads: 20 of 20 children read, start
/// and join threads and count exactly, while the parent has 40 parked
/// threads and a reader looping.
#[test]
fn forked_children_read_and_count_exactly() {
    assert_fork_children("fork_children");
}

#[test]
fn forked_children_read_and_count_exactly_over_system() {
    assert_fork_children("system_fork_children");
}

/// Durations past any deadline arithmetic (2^64 - 1 seconds) are clamped to
/// a day with one warning each, naming the variable, and the trip still
/// runs the hooks and exits 2.
#[test]
fn huge_durations_are_clamped_with_a_warning_and_still_exit_2() {
    let huge = "18446744073709551615s";
    let r = run(
        "crosses_threshold",
        &[
            (THRESHOLD, "64"),
            (GRACE, huge),
            ("ELASTICKV_MEMORY_LIMIT_RECHECK", huge),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["first", "second"], "hooks ran in order: {r:#?}");
    let warnings = r.stderr_lines("WARN");
    assert_eq!(warnings.len(), 2, "{r:#?}");
    for (warning, variable) in warnings
        .iter()
        .zip([GRACE, "ELASTICKV_MEMORY_LIMIT_RECHECK"])
    {
        assert!(
            warning.contains(variable) && warning.contains("using 86400s"),
            "{warning}"
        );
    }
    let on = r.stderr_lines("memory watchdog on");
    assert!(on[0].contains("grace 86400s"), "{r:#?}");
}

/// Runs `stderr_blocked` with `env`, its standard error a pipe held open
/// and never read; returns its exit status, how long it ran and the hooks'
/// trace.
fn run_with_stderr_unread(
    name: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, Duration, String) {
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let dir = common::scratch(name);
    let trace = dir.join("trace");
    let mut cmd = Command::new(common::bin_path("stderr_blocked"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .env("SCENARIO_TRACE", &trace)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Hold the read end open, unread, until the child is gone.
    let _unread = child.stderr.take();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("still running after 20 s with standard error blocked");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let hooks = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status, took, hooks)
}

/// Standard error is a pipe that nobody reads and that is full when the
/// latch trips: every log line would block. The hook still runs and the
/// process exits 2 within the grace period plus a second.
#[test]
fn a_full_stderr_pipe_holds_up_neither_the_hooks_nor_the_exit() {
    let (status, took, hooks) =
        run_with_stderr_unread("stderr-blocked", &[(THRESHOLD, "64"), (GRACE, "2s")]);
    assert_eq!(status.code(), Some(2), "{status:?}");
    // 0.3 s before the heap grows, the 2 s grace, a second for the rest.
    assert!(took < Duration::from_millis(3300), "took {took:?}");
    assert_eq!(hooks.trim(), "hook ran", "the hook ran");
}

/// A grace of 0s skips the hooks: the trip line, then the exit code.
#[test]
fn a_grace_of_0s_skips_the_hooks_and_exits_2() {
    for _ in 0..4 {
        let r = run(
            "crosses_threshold",
            &[(THRESHOLD, "64"), (GRACE, "0s")],
            LIMIT,
        );
        assert_eq!(r.code(), Some(2), "{r:#?}");
        assert!(r.trace.is_empty(), "no hook ran: {r:#?}");
        let line = r.stderr_lines("[memwatch ERROR] memory threshold crossed");
        assert_eq!(line.len(), 1, "{r:#?}");
        assert!(
            line[0].contains("a grace of 0s skips the shutdown hooks"),
            "{r:#?}"
        );
    }
}

/// The hooks finish but `exit` hangs in an `atexit` handler: the process
/// still ends with code 2, half a second past the grace deadline (3 s at
/// most for a 1 s grace, start-up included).
#[test]
fn a_hanging_atexit_handler_does_not_keep_the_process_alive() {
    let r = run("atexit_hangs", &[(THRESHOLD, "64"), (GRACE, "1s")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["hook ran"], "{r:#?}");
    assert!(r.elapsed < Duration::from_secs(3), "{r:#?}");
    assert_eq!(r.stderr_lines("exit did not finish").len(), 1, "{r:#?}");
}

/// A shed ratio at or above the threshold ratio is named as the user set
/// it: the ratio variable and its fraction, not a MiB variable they never
/// set.
#[test]
fn a_shed_ratio_above_the_threshold_names_the_ratio_variable() {
    let env = [(RATIO, "0.5"), (SHED_RATIO, "0.9")];
    let r = run("runs_to_end", &env, LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    let line = r.one_warning(&[SHED_RATIO, "\"0.9\"", "must sit below", "shed level is off"]);
    assert!(!line.contains(SHED), "{line}");
}

/// A 10,000-character bad value is echoed as its first 64 characters and
/// its length: one short line.
#[test]
fn a_long_bad_value_is_cut_in_the_warning() {
    let long = "x".repeat(10_000);
    let r = run("runs_to_end", &[(THRESHOLD, &long)], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    let line = r.one_warning(&[THRESHOLD, &"x".repeat(64), "(10000 bytes)", "off"]);
    assert!(line.len() < 300, "{line}");
}

/// Threads memwatch did not start: a thread the C library starts for a
/// `timer_create` notification, a C thread, and a thread of a library
/// loaded with `dlopen`. Each leaks and frees a block the main thread
/// allocated, 20 rounds each: the reading moves exactly with an
/// independent tally every round, and nothing drifts.
fn assert_foreign_threads(bin: &str) {
    let r = common::run_with_args(bin, &["timer", "c", "dlopen"], &[], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    for kind in ["timer", "c", "dlopen"] {
        assert_eq!(
            r.fact(kind),
            Some("20 rounds, reading moved with the tally, drift 0"),
            "{r:#?}"
        );
    }
}

#[test]
fn threads_memwatch_did_not_start_count_exactly() {
    assert_foreign_threads("foreign_threads");
}

#[test]
fn threads_memwatch_did_not_start_count_exactly_over_system() {
    assert_foreign_threads("system_foreign_threads");
}

/// jemalloc's per-thread counters missing (a build with
/// `MEMWATCH_TEST_RENAME_COUNTERS` set asks jemalloc for a name it does not
/// have; `.ci/run` runs this test in such a build too): counting goes on,
/// every call by itself, the trip still comes and exits 2, and one warning
/// names the cause. In an ordinary build there is no such warning.
#[test]
fn without_jemallocs_counters_counting_goes_on_with_one_warning() {
    let renamed = option_env!("MEMWATCH_TEST_RENAME_COUNTERS").is_some();
    let r = run("crosses_threshold", &[(THRESHOLD, "64")], LIMIT);
    assert_eq!(r.code(), Some(2), "{r:#?}");
    assert_eq!(r.trace, ["first", "second"], "{r:#?}");
    let warnings = r.stderr_lines("thread.allocatedp");
    if renamed {
        assert_eq!(warnings.len(), 1, "{r:#?}");
        assert!(warnings[0].contains("WARN") && warnings[0].contains("counts every call itself"));
    } else {
        assert!(warnings.is_empty(), "{r:#?}");
    }
}

/// A child of `fork` has no watchdog of its parent's but may start its own,
/// which trips, runs the child's hook and exits 2; the parent's hook does
/// not run.
#[test]
fn a_forked_child_starts_a_watchdog_of_its_own() {
    let r = run("fork_child_watchdog", &[(THRESHOLD, "100000")], LIMIT);
    assert_eq!(r.code(), Some(0), "{r:#?}");
    assert_eq!(r.fact("child exit"), Some("Some(2)"), "{r:#?}");
    assert_eq!(r.trace, ["child hook ran"], "{r:#?}");
}

/// `Watchdog::exit_code` takes a code a supervisor can tell from a normal
/// stop; 256 (which the kernel would turn into 0) and 0 are refused with a
/// warning naming the code, and the shutdown exits 2.
#[test]
fn an_exit_code_outside_1_to_255_is_refused_with_a_warning() {
    let r = run(
        "crosses_threshold",
        &[(THRESHOLD, "64"), ("SCENARIO_EXIT_CODE", "7")],
        LIMIT,
    );
    assert_eq!(r.code(), Some(7), "{r:#?}");
    for bad in ["256", "0", "-1"] {
        let r = run(
            "crosses_threshold",
            &[(THRESHOLD, "64"), ("SCENARIO_EXIT_CODE", bad)],
            LIMIT,
        );
        assert_eq!(r.code(), Some(2), "exit code {bad}: {r:#?}");
        let warned = r.stderr_lines(&format!("exit code {bad} is outside 1..=255"));
        assert_eq!(warned.len(), 1, "exit code {bad}: {r:#?}");
        assert!(warned[0].contains("WARN"), "{r:#?}");
    }
}

/// The trip line comes out in every run with 128 threads keeping both
/// cores busy and a logger installed: it is written to standard error by
/// the watchdog (or the grace) thread at the trip, before any hook, not left
/// to a log thread that may not get a core before the exit.
#[test]
fn the_trip_line_is_written_with_every_core_busy_in_100_of_100_runs() {
    let mut missing = Vec::new();
    for run_no in 0..100 {
        let r = run("busy_trip", &[(THRESHOLD, "64"), (GRACE, "1s")], LIMIT);
        assert_eq!(r.code(), Some(2), "run {run_no}: {r:#?}");
        let raw = r.stderr_lines("[memwatch ERROR] memory threshold crossed");
        if raw.len() != 1 {
            missing.push(run_no);
        }
        let first = r
            .stderr
            .lines()
            .position(|l| l.contains("memory threshold crossed"));
        let hook = r
            .stderr
            .lines()
            .position(|l| l.contains("shutdown hook \"mark\""));
        if let (Some(first), Some(hook)) = (first, hook) {
            assert!(
                first < hook,
                "run {run_no}: a hook's line came first: {r:#?}"
            );
        }
    }
    assert!(missing.is_empty(), "no trip line in runs {missing:?}");
}

/// Standard error is a pipe that nobody reads and that is full from before
/// the shed level is crossed: the shed warning, and every line after it,
/// would block. The watchdog thread hands its lines to threads of their own,
/// so the trip still runs the hook, and the grace deadline counts from the
/// trip: exit 2 within the grace period and a second.
#[test]
fn a_full_stderr_pipe_from_before_the_shed_level_holds_up_nothing() {
    let (status, took, hooks) = run_with_stderr_unread(
        "stderr-blocked-shed",
        &[
            (THRESHOLD, "200"),
            ("ELASTICKV_MEMORY_SHED_THRESHOLD_MB", "100"),
            (GRACE, "1s"),
        ],
    );
    assert_eq!(status.code(), Some(2), "{status:?}");
    // 0.3 s before the heap grows, its growth to 200 MiB, the 1 s grace,
    // a second for the rest.
    assert!(took < Duration::from_millis(2800), "took {took:?}");
    assert_eq!(hooks.trim(), "hook ran", "the hook ran");
}
