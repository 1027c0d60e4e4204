//! Allocation overhead, every allocator side by side in one run: alloc+free
//! pairs by size and thread count, realloc growth, a batch pattern, and
//! cross-thread frees. `benches/report.py` turns the results into the table
//! and chart in docs/benchmarks.md.

use std::alloc::{GlobalAlloc, Layout};

use common::Global;
use std::hint::black_box;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};

#[macro_use]
mod common;

const THREADS: [usize; 4] = [1, 2, 4, 8];

/// A workload, run `iters` times against one allocator.
trait Work {
    fn run<A: Global>(a: &A, iters: u64);
}

/// Runs `W` on `threads` threads started together; returns the wall time of
/// the slowest, so the figure is time per iteration per thread while all of
/// them run.
fn on_threads<W: Work, A: Global>(threads: usize, iters: u64, a: &'static A) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                // Warm this thread's caches (tcache, memwatch slot) first.
                W::run(a, 64);
                barrier.wait();
                let start = Instant::now();
                W::run(a, iters);
                start.elapsed()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .max()
        .unwrap()
}

fn add<W: Work, A: Global>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    threads: usize,
    name: &str,
    a: &'static A,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| on_threads::<W, A>(threads, iters, a))
    });
}

fn group<W: Work>(c: &mut Criterion, label: &str, threads: usize) {
    let mut g = c.benchmark_group(label);
    for_each_allocator!(add::<W, _>, (&mut g, threads));
    g.finish();
}

/// Allocates and frees one block of `SIZE` bytes.
struct Pair<const SIZE: usize>;

impl<const SIZE: usize> Work for Pair<SIZE> {
    fn run<A: Global>(_: &A, iters: u64) {
        common::pairs::<SIZE, A>(iters);
    }
}

fn pairs(c: &mut Criterion) {
    fn sized<const SIZE: usize>(c: &mut Criterion) {
        for threads in THREADS {
            group::<Pair<SIZE>>(c, &format!("pair/{SIZE}/{threads}t"), threads);
        }
    }
    sized::<16>(c);
    sized::<64>(c);
    sized::<256>(c);
    sized::<4096>(c);
    sized::<65536>(c);
    sized::<1048576>(c);
}

/// Grows one block from 8 B to 1 MiB by doubling, then frees it.
struct ReallocGrowth;

impl Work for ReallocGrowth {
    fn run<A: Global>(a: &A, iters: u64) {
        for _ in 0..iters {
            let mut layout = Layout::from_size_align(8, 8).unwrap();
            // SAFETY: each realloc passes the block's current layout; the
            // final dealloc uses the last one.
            unsafe {
                let mut p = a.alloc(layout);
                while layout.size() < (1 << 20) {
                    let new_size = layout.size() * 2;
                    p = a.realloc(p, layout, new_size);
                    layout = Layout::from_size_align(new_size, 8).unwrap();
                }
                black_box(p);
                a.dealloc(p, layout);
            }
        }
    }
}

/// Allocates 64 blocks of 64 B, then frees all 64.
struct Batch;

impl Work for Batch {
    fn run<A: Global>(a: &A, iters: u64) {
        let layout = Layout::from_size_align(64, 8).unwrap();
        let mut ptrs = [std::ptr::null_mut(); 64];
        for _ in 0..iters {
            // SAFETY: every pointer is freed once with its layout.
            unsafe {
                for p in ptrs.iter_mut() {
                    *p = a.alloc(layout);
                }
                black_box(&ptrs);
                for p in ptrs {
                    a.dealloc(p, layout);
                }
            }
        }
    }
}

fn patterns(c: &mut Criterion) {
    for threads in [1, 4] {
        group::<ReallocGrowth>(c, &format!("realloc-8B-to-1MiB/{threads}t"), threads);
        group::<Batch>(c, &format!("batch-64x64B/{threads}t"), threads);
    }
}

struct Block(*mut u8);
// SAFETY: an owned heap block, freed by whichever thread receives it.
unsafe impl Send for Block {}

/// One producer allocates 256 B blocks, one consumer frees them; the time
/// is per block, end to end.
fn cross_one<A: GlobalAlloc + Sync + 'static>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    a: &'static A,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let layout = Layout::from_size_align(256, 8).unwrap();
            let (tx, rx) = mpsc::sync_channel::<Vec<Block>>(64);
            let start = Instant::now();
            let consumer = thread::spawn(move || {
                for batch in rx {
                    for blk in batch {
                        // SAFETY: allocated by the producer with `layout`.
                        unsafe { a.dealloc(blk.0, layout) };
                    }
                }
            });
            let mut left = iters;
            while left > 0 {
                let n = left.min(256);
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    // SAFETY: non-zero size.
                    v.push(Block(unsafe { a.alloc(layout) }));
                }
                tx.send(v).unwrap();
                left -= n;
            }
            drop(tx);
            consumer.join().unwrap();
            start.elapsed()
        })
    });
}

fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross-thread-free/256");
    for_each_allocator!(cross_one, (&mut g));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .sample_size(20)
        .nresamples(5_000)
        .without_plots()
}

criterion_group! { name = benches; config = config(); targets = pairs, patterns, cross_thread }
criterion_main!(benches);
