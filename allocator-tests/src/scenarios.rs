//! One function per scenario; see the binaries of the same names.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use crate::{grow_until_tripped, init_logging, memwatch_threads, touched, trace, wait_for_exit};

/// Grows the heap 1 MiB at a time until the latch trips, then leaves the
/// exit to the watchdog. Prints a line only if nothing tripped.
fn grow_then_exit(watchdog: &memwatch::WatchdogHandle) {
    let _held = grow_until_tripped(1024, Duration::from_millis(1));
    watchdog.exit_if_tripped();
    println!("finished without a trip");
}

/// Grows the heap past the threshold from the environment; two hooks leave a
/// trace in order. Exits 2 through the watchdog (or `SCENARIO_EXIT_CODE`,
/// given to `Watchdog::exit_code`); exit 0 means it never fired.
pub fn crosses_threshold() {
    init_logging();
    let mut watchdog = memwatch::Watchdog::from_env();
    if let Some(code) = std::env::var("SCENARIO_EXIT_CODE")
        .ok()
        .and_then(|c| c.parse().ok())
    {
        watchdog = watchdog.exit_code(code);
    }
    let watchdog = watchdog
        .on_shutdown("first", || trace("first"))
        .on_shutdown("second", || trace("second"))
        .start();
    println!("armed: {}", watchdog.is_armed());
    let held = grow_until_tripped(1024, Duration::from_millis(1));
    watchdog.exit_if_tripped();
    println!("finished holding {} MiB", held.len());
}

/// Holds `HOLD_MIB` MiB (default 96) and waits up to 30 s for the latch, so
/// that a test can move the memory limit under it. Exits 2 through the
/// watchdog; exit 0 and "not tripped" means the levels never caught it.
pub fn holds_and_waits() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("flush", || trace("flush"))
        .start();
    let mib: usize = std::env::var("HOLD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96);
    let held: Vec<Vec<u8>> = (0..mib).map(|_| touched(1)).collect();
    println!("held MiB: {}", held.len());
    memwatch::wait_tripped_timeout(Duration::from_secs(30));
    watchdog.exit_if_tripped();
    println!("not tripped");
}

/// Starts the watchdog from the environment, allocates far beyond any
/// threshold used in the tests (holding 512 MiB at the peak), reports the
/// memwatch threads it has, and ends normally.
pub fn runs_to_end() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("never", || trace("hook ran"))
        .start();
    println!("armed: {}", watchdog.is_armed());
    let held: Vec<Vec<u8>> = (0..512).map(|_| touched(1)).collect();
    println!("held MiB: {}", held.len());
    println!("memwatch threads: {:?}", memwatch_threads());
    drop(held);
    watchdog.exit_if_tripped();
    println!("finished");
}

/// Eight threads cross the threshold together and keep allocating after it;
/// the one hook counts its runs in the trace.
pub fn many_threads_cross() {
    init_logging();
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("count", || {
            let n = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
            trace(&format!("hook run {n}"));
            // Stay in the hook a while so that usage stays high meanwhile.
            thread::sleep(Duration::from_millis(300));
        })
        .start();
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let mut held = Vec::new();
                for _ in 0..48 {
                    held.push(touched(1));
                }
                // Keep churning above the threshold.
                for _ in 0..2000 {
                    held.push(touched(1));
                    held.remove(0);
                }
                held.len()
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    watchdog.exit_if_tripped();
    println!("finished without a trip");
}

/// Holds more than the threshold before the watchdog starts.
pub fn above_at_start() {
    init_logging();
    let held: Vec<Vec<u8>> = (0..100).map(|_| touched(1)).collect();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || trace("hook ran"))
        .start();
    println!("armed: {}, holding {} MiB", watchdog.is_armed(), held.len());
    thread::sleep(Duration::from_secs(10));
    watchdog.exit_if_tripped();
    println!("finished without a trip");
}

/// The hook allocates 1 GiB in 4 KiB pieces (holding up to 256 MiB) after the
/// trip: no second trip, no deadlock.
pub fn hooks_allocate() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("allocates", || {
            let mut total = 0usize;
            for _ in 0..4 {
                let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(65536);
                for _ in 0..65536 {
                    pieces.push(vec![1u8; 4096]);
                    total += 4096;
                }
                let mut map = HashMap::new();
                for (i, p) in pieces.into_iter().enumerate().take(1000) {
                    map.insert(i.to_string(), p);
                }
                drop(map);
            }
            trace(&format!("hook allocated {total} bytes"));
        })
        .on_shutdown("after", || trace("after"))
        .start();
    grow_then_exit(&watchdog);
}

/// The first hook never returns; the grace deadline ends the process.
pub fn hook_hangs() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("quick", || trace("quick"))
        .on_shutdown("hangs forever", || {
            trace("hanging");
            wait_for_exit();
        })
        .on_shutdown("never reached", || trace("never reached"))
        .start();
    grow_then_exit(&watchdog);
}

/// The first hook panics; the second still runs.
pub fn hook_panics() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("boom", || panic!("hook failure for the test"))
        .on_shutdown("after the panic", || trace("after the panic"))
        .start();
    grow_then_exit(&watchdog);
}

/// The hook asks `main` to stop and waits for it; `main` flushes, and returns
/// an error. The process still exits 2.
pub fn main_returns_error() -> Result<(), String> {
    init_logging();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let stop_tx = Mutex::new(stop_tx);
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("ask main to stop", move || {
            let _ = stop_tx.lock().unwrap().send(());
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
            // Give main time to reach its return before this hook ends.
            thread::sleep(Duration::from_millis(300));
            trace("hook saw main finish");
        })
        .start();
    let mut held = Vec::new();
    loop {
        if stop_rx.try_recv().is_ok() {
            break;
        }
        if held.len() < 1024 {
            held.push(touched(1));
        }
        thread::sleep(Duration::from_millis(1));
    }
    drop(held);
    trace("main flushed");
    done_tx.send(()).unwrap();
    let result = Err("listener closed during shutdown".to_owned());
    trace("main returning an error");
    watchdog.exit_if_tripped();
    result
}

/// A thousand short-lived threads, in waves of 50: each allocates, frees
/// blocks other threads allocated, reallocates, and leaks a known amount.
/// Afterwards the reading must equal the baseline plus the leaks exactly.
/// Prints `drift: N` and exits 0 only if N is 0.
///
/// `block_size` is what the reading counts for a block of `requested` bytes
/// at `ptr`: the requested size over most allocators, the usable size (the
/// size class) over jemalloc.
pub fn thread_churn(block_size: fn(*const u8, usize) -> usize) {
    // Warm up what the first spawn and the first print set up for good.
    thread::spawn(|| vec![0u8; 10]).join().unwrap();
    println!("warm");
    let baseline = memwatch::live_bytes() as isize;
    let pool: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::with_capacity(100_000)));
    let mut leaked = 0isize;
    for wave in 0..20 {
        let handles: Vec<_> = (0..50)
            .map(|t| {
                let pool = pool.clone();
                thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..200 {
                        let size = 1 + (wave * 7919 + t * 104_729 + i * 31) % 20_000;
                        let mut v = vec![i as u8; size];
                        if i % 10 == 0 {
                            v.resize(size * 3, 0);
                        }
                        if i % 2 == 0 {
                            pool.lock().unwrap().push(v);
                        } else {
                            mine.push(v);
                        }
                        if i % 3 == 0 {
                            // Free a block some other thread allocated.
                            drop(pool.lock().unwrap().pop());
                        }
                    }
                    let leak_size = 100 + t + wave;
                    // black_box: an allocation nothing reads may be elided.
                    let leak = std::hint::black_box(Vec::<u8>::with_capacity(leak_size));
                    let counted = block_size(leak.as_ptr(), leak_size);
                    std::mem::forget(leak);
                    drop(mine);
                    counted as isize
                })
            })
            .collect();
        for h in handles {
            leaked += h.join().unwrap();
        }
    }
    let pool = Arc::try_unwrap(pool).expect("all threads joined");
    drop(pool);
    let after = memwatch::live_bytes() as isize;
    let drift = after - baseline - leaked;
    println!("threads: 1000");
    println!("leaked: {leaked}");
    println!("baseline: {baseline}");
    println!("after: {after}");
    println!("drift: {drift}");
    std::process::exit(if drift == 0 { 0 } else { 1 });
}

/// The cgroup workload: appends checksummed, fsynced records to the log file
/// named by the first argument while its heap grows by 1 MiB per record.
/// Prints `ack N` after record N is durable. The hook stops the writer,
/// fsyncs and closes the log. Without a threshold, it grows until killed.
pub fn wal_writer() {
    use crate::wal;
    use std::io::Write as _;

    init_logging();
    let path = std::env::args().nth(1).expect("usage: wal_writer LOG_PATH");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open log");
    let log: Arc<Mutex<Option<std::fs::File>>> = Arc::new(Mutex::new(Some(file)));
    let hook_log = log.clone();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("close the log", move || {
            // Taking the lock waits for an append in flight to finish.
            let mut guard = hook_log.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(file) = guard.take() {
                file.sync_all().expect("fsync log");
                trace("log closed");
            }
        })
        .start();
    let mut held = Vec::new();
    let mut out = std::io::stdout().lock();
    for seq in 0u64.. {
        held.push(touched(1));
        let mut guard = log.lock().unwrap();
        let Some(file) = guard.as_mut() else {
            break;
        };
        wal::append(file, &wal::payload(seq, 4096)).expect("append");
        drop(guard);
        writeln!(out, "ack {seq}").unwrap();
        out.flush().unwrap();
    }
    drop(out);
    watchdog.exit_if_tripped();
}

/// The soft level: grows above it, falls into the hysteresis band (still
/// shedding), falls below the leave level, and rises above it again. The
/// callbacks trace each change; `pressure()` is checked at each step.
/// Needs a shutdown threshold well above the soft level. Exits 0.
pub fn shed_levels() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_pressure(|e| {
            trace(if e.shedding { "entered" } else { "left" });
        })
        .start();
    let shed = memwatch::snapshot().shed_bytes.expect("a shed level") >> 20;
    println!("shed MiB: {shed}");
    let wait_for = |want: bool| {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while memwatch::pressure() != want && std::time::Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        memwatch::pressure()
    };
    // Each 1 MiB allocation is below the 4 MiB slack, so folds come every
    // few MiB; a hop of 16 MiB past each mark makes sure one happens.
    let mut held: Vec<Vec<u8>> = Vec::new();
    let hold = |mib: usize, held: &mut Vec<Vec<u8>>| {
        while held.len() < mib {
            held.push(touched(1));
        }
        while held.len() > mib {
            held.pop();
        }
    };
    hold(shed / 2, &mut held);
    println!("below: {}", wait_for(false));
    hold(shed + 16, &mut held);
    println!("above: {}", wait_for(true));
    // Inside the band: 2% below the level, above the 10% leave mark.
    hold(shed - shed / 50 - 1, &mut held);
    thread::sleep(Duration::from_millis(200));
    println!("in band: {}", memwatch::pressure());
    hold(shed - shed / 10 - 16, &mut held);
    println!("below leave: {}", wait_for(false));
    hold(shed + 16, &mut held);
    println!("above again: {}", wait_for(true));
    // Let the watchdog run the last callback before exiting; keep the
    // memory, so that freeing it does not make one more change.
    thread::sleep(Duration::from_millis(200));
    std::mem::forget(held);
    watchdog.exit_if_tripped();
    println!("finished");
}

/// `fork` without `exec` from a parent with 40 parked threads, each holding
/// 1 MiB, and one thread taking readings in a loop: 20 children, one after
/// another. Each child reads, starts and joins 8 threads that allocate,
/// free and leak, reads again and exits 0 if the reading still holds the
/// parent's heap and moved by exactly what [`crate::audit::tally`] moved;
/// 1 if not. The binary's global allocator must be
/// [`crate::audit::Audited`]. Prints how many children exited 0, and how
/// many did not finish.
pub fn fork_children() {
    use std::sync::atomic::AtomicBool;

    let stop = Arc::new(AtomicBool::new(false));
    let parked: Vec<_> = (0..40)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let held = touched(1);
                while !stop.load(Ordering::SeqCst) {
                    thread::park_timeout(Duration::from_millis(50));
                }
                drop(held);
            })
        })
        .collect();
    let reader = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::hint::black_box(memwatch::live_bytes());
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    let (mut ok, mut hung) = (0, 0);
    for _ in 0..20 {
        // SAFETY: the child only runs Rust code that memwatch and std
        // support after fork (jemalloc's own fork handlers keep its locks
        // consistent) and ends with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if fork_child_checks() { 0 } else { 1 };
            // SAFETY: ends the child without running the parent's exit
            // handlers a second time.
            unsafe { libc::_exit(code) };
        }
        match wait_child(pid, Duration::from_secs(10)) {
            Some(0) => ok += 1,
            Some(_) => {}
            None => hung += 1,
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in parked {
        t.thread().unpark();
        t.join().unwrap();
    }
    reader.join().unwrap();
    println!("children ok: {ok}");
    println!("children hung: {hung}");
}

/// In a forked child: the reading holds the parent's 40 MiB, and 8 threads
/// started and joined here move it by exactly what the audit's tally moved
/// (their leaks, and whatever std frees of the parent's, such as the entry
/// of a parent thread whose stack a new thread reuses).
fn fork_child_checks() -> bool {
    // The fork handler left the child's table with its one thread.
    let threads = memwatch::snapshot().threads;
    if threads != 1 {
        eprintln!("child: {threads} threads listed, not 1");
        return false;
    }
    let tally = crate::audit::tally();
    let start = memwatch::live_bytes();
    if start < 40 << 20 {
        eprintln!("child: reading {start} does not hold the parent's 40 MiB");
        return false;
    }
    let mut leaked = 0;
    for t in 0..8 {
        let leak = thread::spawn(move || {
            let churn: Vec<Vec<u8>> = (0..200).map(|i| vec![1u8; 100 + i * 13]).collect();
            drop(std::hint::black_box(churn));
            std::hint::black_box(vec![7u8; 5000 + t]).leak().len()
        });
        leaked += leak.join().unwrap();
    }
    let moved = memwatch::live_bytes() as isize - start as isize;
    let expect = crate::audit::tally() - tally;
    let threads = memwatch::snapshot().threads;
    if threads != 1 {
        eprintln!("child: {threads} threads listed after the joins, not 1");
        return false;
    }
    // The tally moves by the leaks, less what std frees of the parent's
    // (a stack map node when a child's thread reuses a parent thread's
    // stack, 544 B): both must move, and together.
    if moved != expect || expect < leaked as isize - 4096 {
        eprintln!("child: reading moved by {moved}, the tally by {expect}, {leaked} B leaked");
        return false;
    }
    true
}

/// Waits for child `pid` up to `limit`; its exit code, or `None` after
/// killing it if it did not finish.
fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is writable.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if got == pid {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        if start.elapsed() > limit {
            // SAFETY: our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The numbers after the binary's name: `N` for each of `names`, in order.
pub fn args<const N: usize>(names: [&str; N]) -> [usize; N] {
    let given: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a whole number"))
        .collect();
    assert_eq!(given.len(), N, "usage: {}", names.join(" "));
    std::array::from_fn(|i| given[i])
}

/// Idle threads that hide the heap: `main_mib` MiB on the main thread, then
/// `threads` threads that start together (each joins memwatch's table with
/// its first allocation) and then each allocate `per_thread_kib` KiB in
/// 64 KiB blocks (every page written) and park holding it, as the workers
/// of a pool do between requests. With the threshold crossed the watchdog exits
/// 2 (the workers stop allocating once the latch has tripped, as a server
/// stops intake). If every worker holds its share without a trip, it prints
/// the reading and exits 0.
pub fn idle_threads(main_mib: usize, threads: usize, per_thread_kib: usize) {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || {
            trace(&format!(
                "tripped at {} bytes",
                memwatch::snapshot().tripped_at_bytes.unwrap_or(0)
            ))
        })
        .start();
    let main = touched(main_mib);
    let started = Arc::new(Barrier::new(threads));
    let holding = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (started, holding) = (started.clone(), holding.clone());
            thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let mut held = Vec::with_capacity(1024);
                    started.wait();
                    let mut left = per_thread_kib << 10;
                    while left > 0 && !memwatch::tripped() {
                        let block = left.min(64 << 10);
                        held.push(vec![0xA5u8; block]);
                        left -= block;
                    }
                    holding.wait();
                    // Idle, holding it, until the process ends.
                    loop {
                        thread::park();
                        std::hint::black_box(&held);
                    }
                })
                .expect("spawn a worker")
        })
        .collect();
    holding.wait();
    // Give a trip that came with the last block time to act.
    thread::sleep(Duration::from_millis(500));
    watchdog.exit_if_tripped();
    println!("reading: {}", memwatch::live_bytes());
    println!("tripped: {}", memwatch::tripped());
    std::hint::black_box((&main, &workers));
}

/// How far past the threshold the heap is when the latch trips: `threads`
/// threads allocate `step` bytes at a time (holding all of it) until the
/// latch trips. The binary's global allocator is [`crate::audit::Audited`];
/// the hook waits for the threads to stop and prints the tally at the trip
/// (`heap at trip`, which includes at most one step per thread taken after
/// it) and the threshold.
pub fn overshoot(threads: usize, step: usize) {
    use std::sync::atomic::AtomicIsize;
    static AT_TRIP: AtomicIsize = AtomicIsize::new(0);
    static STOPPED: AtomicUsize = AtomicUsize::new(0);
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("report", move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while STOPPED.load(Ordering::SeqCst) < threads && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            println!("heap at trip: {}", AT_TRIP.load(Ordering::SeqCst));
            println!(
                "threshold: {}",
                memwatch::armed_threshold_bytes().unwrap_or(0)
            );
            println!(
                "tripped at: {}",
                memwatch::snapshot().tripped_at_bytes.unwrap_or(0)
            );
        })
        .start();
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut held = Vec::new();
                while !memwatch::tripped() {
                    held.push(vec![1u8; step]);
                }
                AT_TRIP.fetch_max(crate::audit::tally(), Ordering::SeqCst);
                STOPPED.fetch_add(1, Ordering::SeqCst);
                loop {
                    thread::park();
                    std::hint::black_box(&held);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(60));
    watchdog.exit_if_tripped();
    println!("no trip");
    std::hint::black_box(&workers);
}

/// Standard error stops being read: after the watchdog starts, a thread
/// writes to standard error until the pipe is full and its write blocks
/// (the test never reads the pipe); then the heap grows past the threshold.
/// The trip must still run the hooks and end the process with the exit
/// code within the grace period, though every log line would block.
pub fn stderr_blocked() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || trace("hook ran"))
        .start();
    thread::spawn(|| {
        let line = [b'x'; 1023];
        loop {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), &line);
            let _ = std::io::Write::write_all(&mut std::io::stderr(), b"\n");
        }
    });
    thread::sleep(Duration::from_millis(300));
    let held = grow_until_tripped(1024, Duration::ZERO);
    watchdog.exit_if_tripped();
    println!("finished without a trip, holding {} MiB", held.len());
}

/// An `atexit` handler (as a C library or a C++ static destructor might
/// have) hangs: the exit that follows the hooks never returns. The process
/// must still end with the exit code by the deadline.
pub fn atexit_hangs() {
    extern "C" fn hang() {
        thread::sleep(Duration::from_secs(3600));
    }
    init_logging();
    // SAFETY: registers a plain `extern "C" fn()` that lives for the program.
    unsafe { libc::atexit(hang) };
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || trace("hook ran"))
        .start();
    let held = grow_until_tripped(1024, Duration::ZERO);
    watchdog.exit_if_tripped();
    println!("finished without a trip, holding {} MiB", held.len());
}

/// What a foreign thread is handed: a block the main thread allocated, for
/// it to free.
static HANDED: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
const HANDED_SIZE: usize = 4 << 20;
/// How much a foreign thread leaks each round.
const LEAK: usize = 300 << 10;

/// A foreign thread's work, as any thread would do it through Rust's global
/// allocator: churn of small blocks, a leak of 300 KiB in 1 KiB blocks,
/// and the free of the 4 MiB block the main thread handed over.
extern "C" fn foreign_work() {
    let churn: Vec<Vec<u8>> = (0..500).map(|i| vec![1u8; 16 + i * 7]).collect();
    drop(std::hint::black_box(churn));
    for _ in 0..LEAK / 1024 {
        // `black_box`: else the optimizer removes a leak nobody reads.
        std::mem::forget(std::hint::black_box(vec![2u8; 1024]));
    }
    let handed = HANDED.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !handed.is_null() {
        // SAFETY: the main thread allocated it with this layout and gave it
        // up.
        unsafe {
            std::alloc::dealloc(
                handed,
                std::alloc::Layout::from_size_align(HANDED_SIZE, 8).unwrap(),
            )
        };
    }
}

extern "C" {
    /// `c/threads.c`: runs the callback on a thread started with the C
    /// library's `pthread_create` and joins it.
    fn memwatch_test_c_thread(cb: extern "C" fn()) -> i32;
}

/// Runs `foreign_work` on a thread of the kind named: `timer` (a thread the
/// C library starts for a `timer_create` notification), `c` (a C thread),
/// or `dlopen` (a thread started by a library loaded at run time), and
/// returns once that thread is gone.
fn on_foreign_thread(kind: &str) {
    match kind {
        "timer" => on_timer_thread(),
        // SAFETY: `foreign_work` is an `extern "C" fn()`, as the C side
        // expects.
        "c" => assert_eq!(unsafe { memwatch_test_c_thread(foreign_work) }, 0),
        "dlopen" => {
            type Entry = unsafe extern "C" fn(extern "C" fn()) -> i32;
            let path = std::ffi::CString::new(env!("MEMWATCH_TEST_DL")).unwrap();
            // SAFETY: a library built for this test, with no initialisers
            // beyond the C library's; the handle is never closed, so the
            // entry stays valid.
            let entry: Entry = unsafe {
                let lib = libc::dlopen(path.as_ptr(), libc::RTLD_NOW);
                assert!(!lib.is_null(), "dlopen {path:?}");
                let sym = libc::dlsym(lib, c"memwatch_test_dl_thread".as_ptr());
                assert!(!sym.is_null(), "dlsym");
                std::mem::transmute::<*mut libc::c_void, Entry>(sym)
            };
            // SAFETY: as for the C thread.
            assert_eq!(unsafe { entry(foreign_work) }, 0);
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Fires a `SIGEV_THREAD` timer once and waits until the C library's
/// notification thread has run `foreign_work` and ended.
fn on_timer_thread() {
    static TID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    extern "C" fn notify(_: libc::sigval) {
        // SAFETY: `gettid` has no preconditions.
        TID.store(unsafe { libc::gettid() } as i64, Ordering::SeqCst);
        foreign_work();
        TID.store(-TID.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    TID.store(0, Ordering::SeqCst);
    // SAFETY: a zeroed `sigevent` is valid; the fields set are those
    // SIGEV_THREAD reads. libc's struct does not name the union's function
    // member, so it is written at its offset, right after `sigev_notify`.
    let mut timer: libc::timer_t = std::ptr::null_mut();
    unsafe {
        let mut ev: libc::sigevent = std::mem::zeroed();
        ev.sigev_notify = libc::SIGEV_THREAD;
        let function = std::ptr::addr_of_mut!(ev.sigev_notify)
            .add(1)
            .cast::<usize>();
        function.write_unaligned(notify as *const () as usize);
        assert_eq!(
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut timer),
            0
        );
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            },
        };
        assert_eq!(
            libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()),
            0
        );
    }
    // Done once the tid is negative; gone once /proc no longer lists it.
    let tid = loop {
        let t = TID.load(Ordering::SeqCst);
        if t < 0 {
            break -t;
        }
        thread::sleep(Duration::from_millis(1));
    };
    while std::path::Path::new(&format!("/proc/self/task/{tid}")).exists() {
        thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: the timer created above, fired once.
    unsafe { libc::timer_delete(timer) };
}

/// Threads memwatch did not start count like any other: for each kind
/// given, 20 rounds in which the main thread allocates a 4 MiB block and a
/// foreign thread churns, leaks 300 KiB and frees the main thread's block.
/// After each round the reading must have moved by exactly what the
/// audit's tally moved (the leak, up to jemalloc's usable sizes), with no
/// drift. The binary's global allocator is [`crate::audit::Audited`].
/// Prints one line per kind and exits 1 at the first mismatch.
pub fn foreign_threads(kinds: &[&str]) {
    for kind in kinds {
        let (start, tally) = (memwatch::live_bytes(), crate::audit::tally());
        for round in 0..20 {
            let layout = std::alloc::Layout::from_size_align(HANDED_SIZE, 8).unwrap();
            // SAFETY: a non-zero size; freed by the foreign thread.
            let block = unsafe { std::alloc::alloc(layout) };
            assert!(!block.is_null());
            HANDED.store(block, Ordering::SeqCst);
            let before = (memwatch::live_bytes() as isize, crate::audit::tally());
            on_foreign_thread(kind);
            assert!(
                HANDED.load(Ordering::SeqCst).is_null(),
                "the block was freed"
            );
            let moved = memwatch::live_bytes() as isize - before.0;
            let truth = crate::audit::tally() - before.1;
            if moved != truth || truth < LEAK as isize - HANDED_SIZE as isize {
                println!("{kind}: round {round}: reading moved {moved}, the tally {truth}");
                std::process::exit(1);
            }
        }
        let drift =
            (memwatch::live_bytes() as isize - start as isize) - (crate::audit::tally() - tally);
        println!("{kind}: 20 rounds, reading moved with the tally, drift {drift}");
        if drift != 0 {
            std::process::exit(1);
        }
    }
}

/// A child of `fork` starts a watchdog of its own: the parent's watchdog
/// (threshold from the environment, far above what anyone holds) is not in
/// the child, so the child arms 64 MiB, grows past it and must exit 2 after
/// its hook. The parent prints the child's exit code and exits 0.
pub fn fork_child_watchdog() {
    init_logging();
    let parent = memwatch::Watchdog::from_env()
        .on_shutdown("parent", || trace("parent hook ran"))
        .start();
    // SAFETY: the child runs Rust code that memwatch, std and jemalloc
    // support after fork, and ends through the watchdog's exit or `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let child = memwatch::Watchdog::new()
            .threshold_mb(64)
            .on_shutdown("child", || trace("child hook ran"))
            .start();
        let armed = child.is_armed();
        let held = grow_until_tripped(1024, Duration::ZERO);
        child.exit_if_tripped();
        eprintln!("child: armed {armed}, no trip holding {} MiB", held.len());
        // SAFETY: ends the child without the parent's exit handlers.
        unsafe { libc::_exit(1) };
    }
    let code = wait_child(pid, Duration::from_secs(30));
    println!("child exit: {code:?}");
    parent.exit_if_tripped();
}

/// One thread whose frees and allocations differ in size mix, then parks:
/// `hide` allocates 8 Mi blocks of 8 bytes (with their pointers, 128 MiB),
/// then frees 172 of them for each block of 4112 bytes it allocates, until
/// the small ones are gone or the latch trips (a heap of about 314 MiB over
/// jemalloc, 268 MiB of requests, at the end); `inflate` allocates 80,000
/// blocks of 4112 bytes, then frees each one while allocating 172 of 8
/// bytes (about 220 MiB left of 390 MiB, pointers included), and the main
/// thread then adds 150 MiB. A trip's hook notes the reading that tripped
/// and, once the thread has stopped, jemalloc's own count of the heap.
/// Exits through the watchdog: 2 if it tripped, 0 if not.
pub fn size_mix(mode: &str) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    static STOPPED: AtomicBool = AtomicBool::new(false);

    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || {
            let start = std::time::Instant::now();
            while !STOPPED.load(SeqCst) && start.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(1));
            }
            let heap = memwatch::jemalloc_stats().map_or(0, |s| s.allocated);
            trace(&format!(
                "tripped at {} bytes",
                memwatch::snapshot().tripped_at_bytes.unwrap_or(0)
            ));
            trace(&format!("heap when stopped {heap} bytes"));
        })
        .start();
    let inflate = mode == "inflate";
    let mode = mode.to_owned();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    thread::Builder::new()
        .name("mixer".into())
        .spawn(move || {
            let mut keep: Vec<Box<[u8]>> = Vec::new();
            let mut small: Vec<Box<[u8; 8]>> = Vec::new();
            match mode.as_str() {
                "hide" => {
                    small = (0..8usize << 20)
                        .map(|i| std::hint::black_box(Box::new([i as u8; 8])))
                        .collect();
                    keep.reserve(small.len() / 172 + 1);
                    while small.len() >= 172 && !memwatch::tripped() {
                        small.truncate(small.len() - 172);
                        keep.push(std::hint::black_box(vec![1u8; 4112].into_boxed_slice()));
                    }
                }
                "inflate" => {
                    let mut large: Vec<Box<[u8]>> = (0..80_000)
                        .map(|_| std::hint::black_box(vec![1u8; 4112].into_boxed_slice()))
                        .collect();
                    small.reserve(80_000 * 172);
                    while let Some(b) = large.pop() {
                        drop(b);
                        small
                            .extend((0..172).map(|i| std::hint::black_box(Box::new([i as u8; 8]))));
                    }
                }
                _ => panic!("usage: size_mix hide|inflate"),
            }
            STOPPED.store(true, SeqCst);
            done_tx.send(()).unwrap();
            loop {
                thread::park();
                std::hint::black_box((&keep, &small));
            }
        })
        .expect("spawn the mixer");
    done_rx.recv().unwrap();
    let extra = if inflate { touched(150) } else { Vec::new() };
    // Give a trip that came with the last block time to act.
    thread::sleep(Duration::from_millis(500));
    let heap = memwatch::jemalloc_stats().map_or(0, |s| s.allocated);
    println!("live bytes: {}", memwatch::live_bytes());
    println!("jemalloc allocated: {heap}");
    println!("tripped: {}", memwatch::tripped());
    std::hint::black_box(&extra);
    watchdog.exit_if_tripped();
}

/// `BUSY` threads (128 unless set) churn alloc/free pairs of 64 KiB without
/// growing the heap, every core busy, while the main thread grows it 1 MiB
/// at a time until the trip; a hook leaves a trace. Exits 2 through the
/// watchdog.
pub fn busy_trip() {
    init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("mark", || trace("hook ran"))
        .start();
    let busy: usize = std::env::var("BUSY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    // Most of the way up first, while the cores are free; the last steps
    // with every core busy.
    let near = memwatch::armed_threshold_bytes()
        .unwrap_or(0)
        .saturating_sub(4 << 20)
        >> 20;
    let base: Vec<Vec<u8>> = (0..near).map(|_| touched(1)).collect();
    for _ in 0..busy {
        thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| loop {
                drop(std::hint::black_box(vec![0u8; 64 << 10]));
            })
            .expect("spawn a busy thread");
    }
    thread::sleep(Duration::from_millis(50));
    let held = grow_until_tripped(1024, Duration::ZERO);
    std::hint::black_box(&base);
    watchdog.exit_if_tripped();
    println!("finished without a trip, holding {} MiB", held.len());
}
