//! Allocation overhead, every allocator side by side in one run: alloc+free
//! pairs by size and thread count, realloc growth, a batch pattern, and
//! cross-thread frees. `benches/report.py` turns the results into the table
//! and chart in docs/benchmarks.md.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

mod common;

type Alloc = &'static (dyn GlobalAlloc + Sync);

const SIZES: [usize; 6] = [16, 64, 256, 4 << 10, 64 << 10, 1 << 20];
const THREADS: [usize; 4] = [1, 2, 4, 8];

/// Runs `work(iters)` on `threads` threads started together; returns the
/// wall time of the slowest, so the figure is time per iteration per thread
/// while all of them run.
fn on_threads(threads: usize, iters: u64, work: fn(Alloc, u64), a: Alloc) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                // Warm this thread's caches (tcache, memwatch slot) first.
                work(a, 64);
                barrier.wait();
                let start = Instant::now();
                work(a, iters);
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

fn pair<const SIZE: usize>(a: Alloc, iters: u64) {
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    for _ in 0..iters {
        // SAFETY: non-zero size; freed with the same layout and allocator.
        unsafe {
            let p = a.alloc(layout);
            black_box(p);
            a.dealloc(p, layout);
        }
    }
}

fn pairs(c: &mut Criterion) {
    fn run<const SIZE: usize>(c: &mut Criterion) {
        for threads in THREADS {
            let mut g = c.benchmark_group(format!("pair/{SIZE}/{threads}t"));
            for (name, a) in common::all() {
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter_custom(|iters| on_threads(threads, iters, pair::<SIZE>, a))
                });
            }
            g.finish();
        }
    }
    const _: () = assert!(SIZES.len() == 6);
    run::<16>(c);
    run::<64>(c);
    run::<256>(c);
    run::<4096>(c);
    run::<65536>(c);
    run::<1048576>(c);
}

/// Grows one block from 8 B to 1 MiB by doubling, then frees it.
fn realloc_growth(a: Alloc, iters: u64) {
    for _ in 0..iters {
        let mut layout = Layout::from_size_align(8, 8).unwrap();
        // SAFETY: each realloc passes the block's current layout; the final
        // dealloc uses the last one.
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

/// Allocates 64 blocks of 64 B, then frees all 64.
fn batch(a: Alloc, iters: u64) {
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

fn patterns(c: &mut Criterion) {
    for threads in [1, 4] {
        let mut g = c.benchmark_group(format!("realloc-8B-to-1MiB/{threads}t"));
        for (name, a) in common::all() {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| on_threads(threads, iters, realloc_growth, a))
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("batch-64x64B/{threads}t"));
        for (name, a) in common::all() {
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter_custom(|iters| on_threads(threads, iters, batch, a))
            });
        }
        g.finish();
    }
}

struct Block(*mut u8);
// SAFETY: an owned heap block, freed by whichever thread receives it.
unsafe impl Send for Block {}

/// One producer allocates 256 B blocks, one consumer frees them; the time is
/// per block, end to end.
fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross-thread-free/256");
    for (name, a) in common::all() {
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
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
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(900))
        .sample_size(20)
        .without_plots()
}

criterion_group! { name = benches; config = config(); targets = pairs, patterns, cross_thread }
criterion_main!(benches);
