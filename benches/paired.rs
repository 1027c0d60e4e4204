//! Ratios to bare jemalloc measured pairwise: each round times one chunk of
//! bare jemalloc and one chunk of the other allocator back to back (the
//! order alternates), and the ratio of the two is that round's figure. The
//! median over rounds is the reported ratio.
//!
//! Why beside criterion: criterion measures each allocator in its own window
//! of a second or so, and on a shared virtual machine the speed of the host
//! drifts between windows by more than the few percent a wrapper costs. Two
//! chunks a millisecond apart see the same machine. Writes
//! `target/criterion/memwatch-paired.json`; `--test` runs a few rounds only.

use std::alloc::GlobalAlloc;
use std::sync::atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Release};
use std::sync::Arc;
use std::thread;

use common::Global;
use memwatch::Jemalloc;
use std::time::{Duration, Instant};

#[macro_use]
mod common;

/// The layout shift: `MEMWATCH_BENCH_SHIFT` bytes (read when the bench is
/// built) of one-byte no-ops in a function of their own, which moves the code
/// linked after it, memwatch's and jemalloc's included, by that much.
/// `benches/run` builds this bench at four shifts and reports the geometric
/// mean of the four: one build's layout alone moves a ratio by more than the
/// few percent being measured.
const SHIFT: usize = match option_env!("MEMWATCH_BENCH_SHIFT") {
    Some(s) => parse(s),
    None => 0,
};

const fn parse(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "MEMWATCH_BENCH_SHIFT is not a number"
        );
        n = n * 10 + (b[i] - b'0') as usize;
        i += 1;
    }
    n
}

#[inline(never)]
fn shift() {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    // SAFETY: `SHIFT` one-byte no-ops (0x90 on x86), run once: no memory,
    // stack or flags are touched.
    unsafe {
        std::arch::asm!(
            ".skip {pad}, 0x90",
            pad = const SHIFT,
            options(nomem, nostack, preserves_flags)
        )
    };
}

/// Starts the threads' chunks together without a system call: std's
/// `Barrier` wakes waiters through the kernel, and entering the kernel right
/// before a timed chunk (page-table and predictor flushes on a mitigated
/// kernel) adds more noise than the few percent being measured. With at most
/// as many threads as cores, spinning costs nothing; with more, a waiter
/// yields its core after a short spin, so that the threads still to arrive
/// can run.
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    spins_before_yield: u32,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        SpinBarrier {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            spins_before_yield: if threads > cores { 64 } else { u32::MAX },
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Acquire);
        if self.arrived.fetch_add(1, AcqRel) + 1 == self.threads {
            self.arrived.store(0, Release);
            self.generation.fetch_add(1, Release);
        } else {
            let mut spins = 0u32;
            while self.generation.load(Acquire) == generation {
                if spins < self.spins_before_yield {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    thread::yield_now();
                }
            }
        }
    }
}

/// One timed chunk: `n` pairs of `SIZE` bytes on `a`, in a loop of its own
/// that starts `PAD` bytes further into its function than it would
/// otherwise. `PAD` is the placement control: bare jemalloc against a copy of
/// itself placed elsewhere shows how much the ratio moves when only the
/// address of the loop changes.
#[inline(never)]
fn placed<const SIZE: usize, const PAD: usize, A: Global>(_: &A, n: u64) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if PAD > 0 {
        // SAFETY: `PAD` one-byte no-ops (0x90 on x86), run once: no memory,
        // stack or flags are touched.
        unsafe {
            std::arch::asm!(
                ".skip {pad}, 0x90",
                pad = const PAD,
                options(nomem, nostack, preserves_flags)
            )
        };
    }
    common::pairs::<SIZE, A>(n);
}

/// [`placed`] with the allocator's methods inlined into the loop instead of
/// called as a program calls them (see `common::pairs_inlined`).
#[inline(never)]
fn inlined<const SIZE: usize, A: GlobalAlloc>(a: &A, n: u64) {
    common::pairs_inlined::<SIZE, _>(a, n);
}

/// A timed chunk's loop: [`placed`] for one allocator type and placement.
type Run<A> = fn(&A, u64);

/// How a chunk is timed. While the threads fit the cores, by the wall
/// clock, and a chunk's time is the slowest thread's: the threads really
/// run at once, so what they do to each other (a shared cache line) shows.
/// With more threads than cores, the wall clock mostly measures the
/// scheduler (which thread ran when, for slices longer than a chunk), so
/// each thread times its own CPU time and a chunk's time is their sum: the
/// work the chunk cost, contention's stalls included.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    ThreadCpu,
}

impl Clock {
    fn for_threads(threads: usize) -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        if threads > cores {
            Clock::ThreadCpu
        } else {
            Clock::Wall
        }
    }

    /// Times `run` on the calling thread.
    fn time(self, run: &dyn Fn()) -> Duration {
        match self {
            Clock::Wall => {
                let start = Instant::now();
                run();
                start.elapsed()
            }
            Clock::ThreadCpu => {
                let start = thread_cpu();
                run();
                thread_cpu() - start
            }
        }
    }

    /// A chunk's time from its threads' times.
    fn chunk(self, times: impl Iterator<Item = Duration>) -> Duration {
        match self {
            Clock::Wall => times.max().unwrap(),
            Clock::ThreadCpu => times.sum(),
        }
    }
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid `timespec` to write; the clock id is a
    // constant every Linux kernel has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `rounds` rounds on `threads` threads. A round times, for each pair of
/// loops in `runs`, one chunk of `n` pairs per thread on `base` and one on
/// `other`, back to back (the order alternates), each started together on
/// every thread by a barrier; a chunk's time is the slowest thread's, or
/// with more threads than cores the sum of their CPU times ([`Clock`]). The
/// round's ratio is other/base, or with several pairs of loops the geometric
/// mean of their ratios. Returns the per-round ratios.
fn rounds<B, O>(
    base: &'static B,
    other: &'static O,
    runs: &[(Run<B>, Run<O>)],
    threads: usize,
    n: u64,
    rounds: usize,
) -> Vec<f64>
where
    B: GlobalAlloc + Sync + 'static,
    O: GlobalAlloc + Sync + 'static,
{
    let barrier = Arc::new(SpinBarrier::new(threads));
    let clock = Clock::for_threads(threads);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            let runs = runs.to_vec();
            thread::spawn(move || {
                // Warm every loop: tcache, memwatch's thread entry.
                for (b, o) in &runs {
                    b(base, n);
                    o(other, n);
                }
                let mut times = Vec::with_capacity(rounds * runs.len());
                for r in 0..rounds {
                    for (b, o) in &runs {
                        let time = |run: &dyn Fn()| {
                            barrier.wait();
                            clock.time(run)
                        };
                        let (tb, to) = if r % 2 == 0 {
                            let tb = time(&|| b(base, n));
                            (tb, time(&|| o(other, n)))
                        } else {
                            let to = time(&|| o(other, n));
                            (time(&|| b(base, n)), to)
                        };
                        times.push((tb, to));
                    }
                }
                times
            })
        })
        .collect();
    let per_thread: Vec<Vec<(Duration, Duration)>> =
        workers.into_iter().map(|w| w.join().unwrap()).collect();
    let k = runs.len();
    (0..rounds)
        .map(|r| {
            let log_sum: f64 = (r * k..(r + 1) * k)
                .map(|i| {
                    let tb = clock.chunk(per_thread.iter().map(|t| t[i].0));
                    let to = clock.chunk(per_thread.iter().map(|t| t[i].1));
                    (to.as_secs_f64() / tb.as_secs_f64()).ln()
                })
                .sum();
            (log_sum / k as f64).exp()
        })
        .collect()
}

/// Pairs per chunk so that one chunk of bare jemalloc takes about 0.25 ms.
fn chunk<const SIZE: usize>() -> u64 {
    let probe = 10_000;
    let start = Instant::now();
    common::pairs::<SIZE, Jemalloc>(probe);
    let per_pair = start.elapsed().as_secs_f64() / probe as f64;
    ((2.5e-4 / per_pair) as u64).clamp(1_000, 1_000_000)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The paired rows of one size and thread count. `all`: every allocator and
/// control; otherwise only memwatch over jemalloc and the two designs it
/// is compared with under contention, cap and one shared atomic.
fn workload<const SIZE: usize>(threads: usize, n_rounds: usize, all: bool, rows: &mut Vec<String>) {
    let n = chunk::<SIZE>();
    let name = format!("pair/{SIZE}/{threads}t");
    let mut cells = Vec::new();
    let mut one = |who: &str, mut ratios: Vec<f64>| {
        ratios.sort_by(f64::total_cmp);
        let (p10, med, p90) = (
            quantile(&ratios, 0.1),
            quantile(&ratios, 0.5),
            quantile(&ratios, 0.9),
        );
        println!("{name:>16} {who:>18}: {med:.3}x (p10 {p10:.3}, p90 {p90:.3})");
        cells.push(format!(
            "\"{who}\": {{\"median\": {med:.4}, \"p10\": {p10:.4}, \"p90\": {p90:.4}}}"
        ));
    };
    fn run<const SIZE: usize, O: Global>(
        one: &mut dyn FnMut(&str, Vec<f64>),
        threads: usize,
        n: u64,
        n_rounds: usize,
        who: &str,
        other: &'static O,
    ) {
        if who != "jemalloc" {
            let runs: [(Run<Jemalloc>, Run<O>); 1] = [(placed::<SIZE, 0, _>, placed::<SIZE, 0, _>)];
            one(
                who,
                rounds(&common::JEMALLOC, other, &runs, threads, n, n_rounds),
            );
        }
    }
    if !all {
        let m = &common::MEMWATCH_JEMALLOC;
        run::<SIZE, _>(&mut one, threads, n, n_rounds, "memwatch-jemalloc", m);
        if memwatch_only() && threads <= 2 {
            // The two floors beside it, over the same layouts.
            let c = &common::THREAD_CHECK;
            run::<SIZE, _>(&mut one, threads, n, n_rounds, "thread-check", c);
            let c = &common::STATIC_CHECK;
            run::<SIZE, _>(&mut one, threads, n, n_rounds, "static-check", c);
        }
        if quick().is_some() || memwatch_only() {
            rows.push(format!("\"{name}\": {{{}}}", cells.join(", ")));
            return;
        }
        let c = &common::CAP_JEMALLOC;
        run::<SIZE, _>(&mut one, threads, n, n_rounds, "cap-jemalloc", c);
        let a = &common::ATOMIC_JEMALLOC;
        run::<SIZE, _>(&mut one, threads, n, n_rounds, "atomic-jemalloc", a);
        rows.push(format!("\"{name}\": {{{}}}", cells.join(", ")));
        return;
    }
    for_each_allocator!(run::<SIZE, _>, (&mut one, threads, n, n_rounds));
    // The floor: a wrapper that only compares a thread-local byte.
    run::<SIZE, _>(
        &mut one,
        threads,
        n,
        n_rounds,
        "thread-check",
        &common::THREAD_CHECK,
    );
    // The same compare on a byte in an ordinary static.
    run::<SIZE, _>(
        &mut one,
        threads,
        n,
        n_rounds,
        "static-check",
        &common::STATIC_CHECK,
    );
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let j = &common::JEMALLOC;
        // The placement control: bare jemalloc against itself, its loop
        // moved.
        let base: Run<Jemalloc> = placed::<SIZE, 0, _>;
        let moved: [(&str, Run<Jemalloc>); 3] = [
            ("jemalloc+16B", placed::<SIZE, 16, _>),
            ("jemalloc+32B", placed::<SIZE, 32, _>),
            ("jemalloc+48B", placed::<SIZE, 48, _>),
        ];
        for (who, run) in moved {
            one(who, rounds(j, j, &[(base, run)], threads, n, n_rounds));
        }
        // memwatch against bare jemalloc with both loops at four
        // placements: the geometric mean cancels what placement alone does.
        let m = &common::MEMWATCH_JEMALLOC;
        let runs: [(Run<Jemalloc>, Run<memwatch::MemWatch<Jemalloc>>); 4] = [
            (placed::<SIZE, 0, _>, placed::<SIZE, 0, _>),
            (placed::<SIZE, 16, _>, placed::<SIZE, 16, _>),
            (placed::<SIZE, 32, _>, placed::<SIZE, 32, _>),
            (placed::<SIZE, 48, _>, placed::<SIZE, 48, _>),
        ];
        one(
            "memwatch-jemalloc@4",
            rounds(j, m, &runs, threads, n, n_rounds),
        );
    }
    // Both with the allocator's methods inlined into the loop: the counting
    // alone, without the call a program makes around it.
    let runs: [(Run<Jemalloc>, Run<memwatch::MemWatch<Jemalloc>>); 1] =
        [(inlined::<SIZE, _>, inlined::<SIZE, _>)];
    one(
        "memwatch-jemalloc-inlined",
        rounds(
            &common::JEMALLOC,
            &common::MEMWATCH_JEMALLOC,
            &runs,
            threads,
            n,
            n_rounds,
        ),
    );
    rows.push(format!("\"{name}\": {{{}}}", cells.join(", ")));
}

/// `MEMWATCH_PAIRED_QUICK=16,65536`: only memwatch over jemalloc, only
/// these sizes, 1001 rounds, nothing written. For trying a change to the
/// fast path in a minute rather than the whole table's quarter hour.
/// `MEMWATCH_PAIRED_QUICK_THREADS=4,8` sets the thread counts (1 and 2).
fn quick() -> Option<Vec<usize>> {
    let sizes = std::env::var("MEMWATCH_PAIRED_QUICK").ok()?;
    Some(
        sizes
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
    )
}

/// `MEMWATCH_PAIRED_MEMWATCH_ONLY=1`: every cell of the table, memwatch over
/// jemalloc only (and on 1 and 2 threads the two check-only controls),
/// written as usual. `benches/run` builds the bench at 28
/// more code shifts this way: the report's memwatch column is then the
/// geometric mean of 32 layouts, whose spread is what a few percent of
/// difference must be told from.
fn memwatch_only() -> bool {
    std::env::var_os("MEMWATCH_PAIRED_MEMWATCH_ONLY").is_some()
}

fn main() {
    shift();
    let test = std::env::args().any(|a| a == "--test");
    // `cargo bench` passes `--bench`; any other argument is a filter for
    // criterion benches and means nothing here.
    let n_rounds = if test { 3 } else { 501 };
    let mut rows = Vec::new();
    if let Some(sizes) = quick() {
        let threads: Vec<usize> = std::env::var("MEMWATCH_PAIRED_QUICK_THREADS")
            .ok()
            .map(|t| t.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or(vec![1, 2]);
        for threads in threads {
            for size in sizes.iter().copied() {
                match size {
                    16 => workload::<16>(threads, 1001, false, &mut rows),
                    64 => workload::<64>(threads, 1001, false, &mut rows),
                    256 => workload::<256>(threads, 1001, false, &mut rows),
                    4096 => workload::<4096>(threads, 1001, false, &mut rows),
                    65536 => workload::<65536>(threads, 1001, false, &mut rows),
                    1048576 => workload::<{ 1 << 20 }>(threads, 1001, false, &mut rows),
                    _ => eprintln!("MEMWATCH_PAIRED_QUICK: no workload of {size} bytes"),
                }
            }
        }
        return;
    }
    let all = !memwatch_only();
    for threads in [1, 2] {
        workload::<16>(threads, n_rounds, all, &mut rows);
        workload::<64>(threads, n_rounds, all, &mut rows);
        workload::<256>(threads, n_rounds, all, &mut rows);
        workload::<4096>(threads, n_rounds, all, &mut rows);
        workload::<65536>(threads, n_rounds, all, &mut rows);
        workload::<{ 1 << 20 }>(threads, n_rounds, all, &mut rows);
    }
    // More threads than this machine's two cores: what oversubscription
    // does to each design.
    for threads in [4, 8] {
        workload::<16>(threads, n_rounds, false, &mut rows);
        workload::<256>(threads, n_rounds, false, &mut rows);
        workload::<4096>(threads, n_rounds, false, &mut rows);
        workload::<65536>(threads, n_rounds, false, &mut rows);
        workload::<{ 1 << 20 }>(threads, n_rounds, false, &mut rows);
    }
    if test {
        println!("paired: test mode, nothing written");
        return;
    }
    common::write_rows(&format!("memwatch-paired-{SHIFT}.json"), &rows);
}
