//! The tests of the count over jemalloc on Linux: jemalloc's own
//! per-thread counters, in usable sizes. The drivers are shared with the
//! tests of memwatch's own count, in `mod.rs`.

use super::random;
use super::*;
use crate::count::jemalloc::{self, interval, unpublished_bound, FLOOR};
use crate::Jemalloc;

static JE: MemWatch<Jemalloc> = MemWatch::new(Jemalloc);

/// What the reading counts for a block: jemalloc's usable size.
fn usable(b: &Block) -> usize {
    // SAFETY: `b` is a live jemalloc block.
    unsafe { tikv_jemallocator::usable_size(b.0) }
}

#[test]
fn the_reading_counts_usable_sizes_exactly_under_threads_that_come_and_go() {
    serial(|| {
        let leaked = churn(&JE, usable);
        // 1000 + t bytes round up to 1024 in jemalloc's size classes.
        assert_eq!(leaked, 160 * 1024);
        // The 160 threads that came and went gave their slots back.
        let joined = jemalloc::threads_joined();
        assert!(joined <= 1, "{joined} hold a slot");
    })
}

#[test]
fn readings_taken_while_threads_exit_stay_bounded_and_end_exact() {
    readings_while_threads_exit(&JE);
}

#[test]
fn a_thread_that_only_frees_is_counted_by_usable_size() {
    // While it runs, the consumer may not have published what it freed
    // since its last look: less than its interval and a quarter, which is
    // at most the floor plus the whole pool (or the slack).
    let widest = interval(counter::pool(), DEFAULT_SLACK);
    only_frees(&JE, usable, unpublished_bound(widest));
}

#[test]
fn calls_from_destructors_that_run_after_the_exit_fold_are_counted_by_usable_size() {
    late_destructor(&JE, usable);
}

#[test]
fn calls_from_pthread_key_destructors_after_the_exit_fold_are_counted_by_usable_size() {
    key_destructor_after_exit(&JE, usable);
}

#[test]
fn a_thread_the_c_library_starts_is_counted_by_usable_size() {
    c_thread(&JE, usable);
}

#[test]
fn threads_beyond_the_first_chunk_of_slots_count_exactly_by_usable_size() {
    beyond_the_table(&JE, usable, jemalloc::threads_joined);
}

/// The calling thread's reading publishes its own count first, so what the
/// shared total lags its reading by is that thread's published pending:
/// within its allowance, at most the slack.
#[test]
fn the_threshold_check_lags_the_reading_by_at_most_the_slack() {
    serial(|| {
        let start = counter::live_bytes();
        let mut held = Vec::new();
        for i in 0..4000usize {
            if i % 5 == 4 {
                free(&JE, held.swap_remove(i % held.len()));
            } else if i % 7 == 0 {
                held.push(alloc(&JE, (48 << 10) + 1 + (i * 7919) % (400 << 10)));
            } else {
                held.push(alloc(&JE, 64 + (i * 7919) % 40_000));
            }
            let lag = counter::live_bytes() - counter::folded_bytes();
            assert!(
                lag.unsigned_abs() <= DEFAULT_SLACK,
                "step {i}: the shared total lags by {lag}"
            );
        }
        let held_bytes: usize = held.iter().map(usable).sum();
        assert!(held_bytes > 10 * DEFAULT_SLACK, "{held_bytes}");
        assert_eq!(counter::live_bytes() - start, held_bytes as isize);
        assert!(counter::folded_bytes() - start >= (held_bytes - DEFAULT_SLACK) as isize);
        for b in held {
            free(&JE, b);
        }
        assert_eq!(counter::live_bytes(), start);
    })
}

/// A loop of alloc+free pairs moves a thread's count by one block at
/// most, so it never folds into the shared total, which every thread
/// writes.
#[test]
fn loops_of_alloc_free_pairs_up_to_the_slack_never_touch_the_shared_total() {
    serial(|| {
        let (live, folded) = (counter::live_bytes(), counter::folded_bytes());
        for size in [16, 4096, 64 << 10, 1 << 20] {
            for _ in 0..2000 {
                let b = alloc(&JE, size);
                assert_eq!(counter::folded_bytes(), folded, "{size} B");
                assert_eq!(counter::live_bytes() - live, usable(&b) as isize);
                free(&JE, b);
            }
        }
        assert_eq!(counter::live_bytes(), live);
    })
}

/// A thread whose heap swings by more than its allowance but less than
/// twice it (a loop of blocks larger than the allowance, each freed before
/// the next is made) folds only the excess, so its pending rests at the
/// allowance's edge: after the first pair it never folds again, where
/// folding the whole pending would write the shared total at every call.
#[test]
fn a_heap_swinging_within_twice_the_allowance_folds_once_and_then_never() {
    static SWING: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(100 << 10);
    serial(|| {
        free(&SWING, alloc(&SWING, 16));
        let allowance = jemalloc::allowance();
        assert_eq!(allowance, 100 << 10, "the pool had less to give");
        let size = 150 << 10;
        // SAFETY: `nallocx` computes a size class; it allocates nothing.
        let usable = unsafe { tikv_jemalloc_sys::nallocx(size, 0) };
        assert!(usable > allowance && usable <= 2 * allowance, "{usable}");
        let live = counter::live_bytes();
        for _ in 0..2 {
            free(&SWING, alloc(&SWING, size));
        }
        let folded = counter::folded_bytes();
        for i in 0..2000 {
            let b = alloc(&SWING, size);
            assert_eq!(counter::folded_bytes(), folded, "allocation {i} folded");
            assert_eq!(counter::live_bytes() - live, usable as isize, "pair {i}");
            free(&SWING, b);
            assert_eq!(counter::folded_bytes(), folded, "free {i} folded");
        }
        assert_eq!(counter::live_bytes(), live);
    })
}

/// A loop of pairs looks at the counters once each counter has moved by
/// the interval: at most twice per interval of blocks, and never for most
/// pairs.
#[test]
fn loops_of_alloc_free_pairs_look_once_per_interval() {
    serial(|| {
        free(&JE, alloc(&JE, 16));
        for size in [16, 256, 4096, 16 << 10, 64 << 10] {
            let before = jemalloc::looks();
            let step = jemalloc::own_interval();
            assert!(step >= FLOOR, "interval {step}");
            let pairs = 100_000;
            for _ in 0..pairs {
                free(&JE, alloc(&JE, size));
            }
            let looks = jemalloc::looks() - before;
            // SAFETY: `nallocx` computes a size class; it allocates nothing.
            let usable = unsafe { tikv_jemalloc_sys::nallocx(size, 0) };
            let most = 2 * (pairs * usable / step + 1);
            assert!(
                looks <= most,
                "{size} B pairs looked {looks} times, more than {most}"
            );
            if size <= 256 {
                assert!(looks * 100 < pairs, "{size} B pairs looked {looks} times");
            }
        }
    })
}

/// A slack of 0 looks and folds after every call; a slack of 1000 looks
/// once a counter moves by 1000 bytes and folds beyond 1000, so the shared
/// total lags the caller's own reading by at most 1000. Another thread's
/// reading may miss what it did since its last look: less than 1250 bytes.
#[test]
fn a_slack_below_the_floor_looks_and_folds_that_much_sooner() {
    static EXACT: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(0);
    static TIGHT: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(1000);
    for (a, bound) in [(&EXACT, 0), (&TIGHT, 1000)] {
        serial(|| {
            let start = counter::live_bytes();
            let mut held = Vec::new();
            for i in 0..2000usize {
                if i % 3 == 2 {
                    free(a, held.swap_remove(i % held.len()));
                } else {
                    held.push(alloc(a, 16 + (i * 7919) % 900));
                }
                assert_eq!(jemalloc::own_interval(), bound);
                let lag = counter::live_bytes() - counter::folded_bytes();
                assert!(lag.unsigned_abs() <= bound, "step {i}: lag {lag} > {bound}");
            }
            for b in held {
                free(a, b);
            }
            assert_eq!(counter::live_bytes(), start);
        })
    }
    assert_eq!(unpublished_bound(1000), 1250);
}

/// A call that reaches a mark is published as soon as jemalloc returns (a
/// block at least the interval always does), and so is its free: another
/// thread's reading sees both while the owner sits idle. Smaller calls of
/// an idle owner are read within its unpublished bound.
#[test]
fn calls_that_reach_a_mark_are_seen_by_other_threads_at_once() {
    use std::sync::mpsc;
    serial(|| {
        let start = counter::live_bytes();
        let (to_owner, owner_rx) = mpsc::channel::<()>();
        let (to_reader, reader_rx) = mpsc::channel::<(usize, usize)>();
        let owner = std::thread::spawn(move || {
            free(&JE, alloc(&JE, 16));
            let step = jemalloc::own_interval();
            let big = alloc(&JE, step);
            to_reader.send((usable(&big), 0)).unwrap();
            owner_rx.recv().unwrap();
            free(&JE, big);
            to_reader.send((0, 0)).unwrap();
            owner_rx.recv().unwrap();
            let step = jemalloc::own_interval();
            let small: Vec<_> = (0..100).map(|i| alloc(&JE, 100 + i)).collect();
            let held = small.iter().map(usable).sum();
            to_reader.send((held, unpublished_bound(step))).unwrap();
            owner_rx.recv().unwrap();
            for b in small {
                free(&JE, b);
            }
        });
        let (size, _) = reader_rx.recv().unwrap();
        assert_eq!(counter::live_bytes() - start, size as isize);
        to_owner.send(()).unwrap();
        reader_rx.recv().unwrap();
        assert_eq!(counter::live_bytes(), start);
        to_owner.send(()).unwrap();
        let (held, slop) = reader_rx.recv().unwrap();
        let seen = counter::live_bytes() - start;
        assert!(
            (seen - held as isize).unsigned_abs() <= slop,
            "the idle owner holds {held} B, the reading moved by {seen} (bound {slop})"
        );
        to_owner.send(()).unwrap();
        owner.join().unwrap();
        assert_eq!(counter::live_bytes(), start);
    })
}

/// Every seed's reading stays within the bound of what the workers may hold
/// unpublished, over jemalloc with the default slack and with a 64 KiB one
/// (where the bound is sharpest); the allowances never exceed the pool.
#[test]
fn random_sequences_stay_within_the_bound_over_jemalloc() {
    static TIGHT: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(64 << 10);
    for (name, a) in [("default slack", &JE), ("64 KiB slack", &TIGHT)] {
        let worst = random::run(
            a,
            usable,
            jemalloc::own_interval,
            unpublished_bound,
            |seed| {
                let (held, pool) = (counter::held(), counter::pool());
                assert!(held <= pool, "seed {seed}: allowances {held} > pool {pool}");
            },
        );
        eprintln!(
            "jemalloc, {name}: {} seeds, {} checks, worst error {} bytes against a bound of {} ({:.1}%)",
            worst.seeds,
            worst.checks,
            worst.error,
            worst.bound,
            worst.ratio * 100.0
        );
    }
}
