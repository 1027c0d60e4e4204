//! What `memwatch::c_heap!` costs a C caller: `malloc`/`free` pairs through
//! memwatch's routed symbols against the same pairs on bare jemalloc
//! (`_rjem_malloc`/`_rjem_free`), measured pairwise: each round times one
//! chunk of each back to back (the order alternates), and the median of the
//! rounds' ratios is the figure. Prints one line per cell and writes them to
//! `target/criterion/memwatch-c-heap.json` for `benches/report.py`;
//! `--test` runs a few rounds only and writes nothing.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use tikv_jemalloc_sys as je;

mod common;

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);
memwatch::c_heap!();

#[inline(never)]
fn routed(size: usize, n: u64) {
    for _ in 0..n {
        // SAFETY: a block from malloc, freed once.
        unsafe { libc::free(black_box(libc::malloc(size))) };
    }
}

#[inline(never)]
fn bare(size: usize, n: u64) {
    for _ in 0..n {
        // SAFETY: a block from jemalloc's malloc, freed once by its free.
        unsafe { je::free(black_box(je::malloc(size))) };
    }
}

/// Per-round ratios routed/bare, each chunk's time the slowest thread's,
/// and bare jemalloc's median nanoseconds per pair.
fn ratios(size: usize, threads: usize, rounds: usize) -> (Vec<f64>, f64) {
    let n = {
        let start = Instant::now();
        bare(size, 10_000);
        ((2.5e-4 / (start.elapsed().as_secs_f64() / 1e4)) as u64).clamp(1_000, 1_000_000)
    };
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                routed(size, n);
                bare(size, n);
                (0..rounds)
                    .map(|r| {
                        let time = |f: fn(usize, u64)| {
                            barrier.wait();
                            let start = Instant::now();
                            f(size, n);
                            start.elapsed().as_secs_f64()
                        };
                        if r % 2 == 0 {
                            let b = time(bare);
                            (b, time(routed))
                        } else {
                            let o = time(routed);
                            (time(bare), o)
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let per: Vec<Vec<(f64, f64)>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let slowest =
        |r: usize, f: fn(&(f64, f64)) -> f64| per.iter().map(|t| f(&t[r])).fold(0.0, f64::max);
    let mut bare_ns: Vec<f64> = (0..rounds)
        .map(|r| slowest(r, |t| t.0) * 1e9 / n as f64)
        .collect();
    bare_ns.sort_by(f64::total_cmp);
    let ratios = (0..rounds)
        .map(|r| slowest(r, |t| t.1) / slowest(r, |t| t.0))
        .collect();
    (ratios, bare_ns[rounds / 2])
}

fn main() {
    let test = std::env::args().any(|a| a == "--test");
    let rounds = if test { 5 } else { 2001 };
    let mut cells = Vec::new();
    // MEMWATCH_C_HEAP_SIZES=16,4096: only those sizes, for a quick look.
    let sizes: Vec<usize> = std::env::var("MEMWATCH_C_HEAP_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 4096, 65536]);
    for threads in [1, 2] {
        for &size in &sizes {
            let (mut r, bare_ns) = ratios(size, threads, rounds);
            r.sort_by(f64::total_cmp);
            let q = |p: f64| r[((r.len() - 1) as f64 * p).round() as usize];
            println!(
                "c_heap/{size}/{threads}t: {:.3}x bare jemalloc (p10 {:.3}, p90 {:.3}); \
                 bare {bare_ns:.1} ns a pair, routed {:.1} ns",
                q(0.5),
                q(0.1),
                q(0.9),
                bare_ns * q(0.5)
            );
            cells.push(format!(
                "\"c_heap/{size}/{threads}t\": {{\"median\": {:.4}, \
                 \"p10\": {:.4}, \"p90\": {:.4}, \"bare_ns\": {bare_ns:.2}}}",
                q(0.5),
                q(0.1),
                q(0.9)
            ));
        }
    }
    if !test && std::env::var_os("MEMWATCH_C_HEAP_SIZES").is_none() {
        common::write_rows("memwatch-c-heap.json", &cells);
    }
}
