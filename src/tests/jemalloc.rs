//! The tests of the count over jemalloc on Linux: jemalloc's own
//! per-thread counters, in usable sizes. The drivers are shared with the
//! tests of memwatch's own count, in `mod.rs`.

use super::*;
use crate::count::jemalloc::{self, UNPUBLISHED};
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
    // While it runs, the consumer may not have published its last
    // 64 KiB of frees.
    only_frees(&JE, usable, UNPUBLISHED);
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

#[test]
fn the_threshold_check_lags_the_reading_by_less_than_the_slack_and_64_kib() {
    let bound = DEFAULT_SLACK + UNPUBLISHED;
    serial(|| {
        let start = counter::live_bytes();
        let mut held = Vec::new();
        for i in 0..4000usize {
            if i % 5 == 4 {
                free(&JE, held.swap_remove(i % held.len()));
            } else if i % 7 == 0 {
                // Larger than the window: published at once, folded by
                // what was published (not by a look at the counters).
                held.push(alloc(&JE, (48 << 10) + 1 + (i * 7919) % (400 << 10)));
            } else {
                held.push(alloc(&JE, 64 + (i * 7919) % 40_000));
            }
            let lag = counter::live_bytes() - counter::folded_bytes();
            assert!(
                lag.unsigned_abs() < bound,
                "step {i}: the shared total lags by {lag}"
            );
        }
        let held_bytes: usize = held.iter().map(usable).sum();
        assert!(held_bytes > 10 * DEFAULT_SLACK, "{held_bytes}");
        assert_eq!(counter::live_bytes() - start, held_bytes as isize);
        assert!(counter::folded_bytes() - start > (held_bytes - bound) as isize);
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

/// An alloc/free pair weighs nothing, so a loop of pairs of any size up
/// to the window never leaves the fast path: no look at the counters,
/// however many pairs (a countdown of activity looked every 64 KiB).
#[test]
fn loops_of_alloc_free_pairs_never_leave_the_fast_path() {
    serial(|| {
        // Join and centre the level first.
        free(&JE, alloc(&JE, 1 << 20));
        for size in [16, 256, 4096, 16 << 10] {
            let before = jemalloc::looks();
            for _ in 0..100_000 {
                free(&JE, alloc(&JE, size));
            }
            assert_eq!(jemalloc::looks() - before, 0, "{size} B pairs looked");
        }
    })
}

/// A slack of 0 looks and folds after every call; a slack of 1000
/// looks once the thread's weighted net moves by 1000 bytes (at most
/// 1250 usable) and folds beyond 1000, so the shared total lags by at
/// most 2250.
#[test]
fn a_slack_below_64_kib_looks_and_folds_that_much_sooner() {
    static EXACT: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(0);
    static TIGHT: MemWatch<Jemalloc> = MemWatch::new(Jemalloc).with_slack(1000);
    for (a, bound) in [(&EXACT, 0), (&TIGHT, 2250)] {
        serial(|| {
            let start = counter::live_bytes();
            let mut held = Vec::new();
            for i in 0..2000usize {
                if i % 3 == 2 {
                    free(a, held.swap_remove(i % held.len()));
                } else {
                    held.push(alloc(a, 16 + (i * 7919) % 900));
                }
                let lag = counter::live_bytes() - counter::folded_bytes();
                assert!(lag.unsigned_abs() <= bound, "step {i}: lag {lag} > {bound}");
            }
            for b in held {
                free(a, b);
            }
            assert_eq!(counter::live_bytes(), start);
        })
    }
}

/// A block larger than the window is published as soon as jemalloc
/// returns it, and its free as soon as jemalloc takes it back: another
/// thread's reading sees both while the owner sits idle.
#[test]
fn blocks_larger_than_the_window_are_seen_by_other_threads_at_once() {
    use std::sync::mpsc;
    serial(|| {
        let start = counter::live_bytes();
        let (to_owner, owner_rx) = mpsc::channel::<()>();
        let (to_reader, reader_rx) = mpsc::channel::<usize>();
        let owner = std::thread::spawn(move || {
            // Join first, so that the block takes the large path.
            free(&JE, alloc(&JE, 16));
            let b = alloc(&JE, 1 << 20);
            to_reader.send(usable(&b)).unwrap();
            owner_rx.recv().unwrap();
            free(&JE, b);
            to_reader.send(0).unwrap();
            owner_rx.recv().unwrap();
        });
        let size = reader_rx.recv().unwrap();
        let held = counter::live_bytes() - start;
        let slop = UNPUBLISHED as isize;
        assert!(
            (held - size as isize).abs() <= slop,
            "the idle owner holds {size} B, the reading moved by {held}"
        );
        to_owner.send(()).unwrap();
        reader_rx.recv().unwrap();
        let after = counter::live_bytes() - start;
        assert!(
            after.abs() <= slop,
            "freed, the reading still moved by {after}"
        );
        to_owner.send(()).unwrap();
        owner.join().unwrap();
        assert_eq!(counter::live_bytes(), start);
    })
}

/// A large call's usable size is computed, not read from jemalloc: it must
/// be jemalloc's own for every size past the window up to 128 KiB, and at
/// and around every page and class boundary up to 2^47, whichever rounding
/// this jemalloc uses (0.6: size classes; 0.7: whole pages).
#[test]
fn the_usable_size_of_a_large_call_is_jemallocs() {
    serial(|| free(&JE, alloc(&JE, 16)));
    let rounding = jemalloc::large_rounding();
    assert_ne!(rounding, 0, "this jemalloc's rounding was not recognised");
    let check = |size: usize| {
        // SAFETY: `nallocx` computes a size class; it allocates nothing.
        let je = unsafe { tikv_jemalloc_sys::nallocx(size, 0) };
        assert_eq!(jemalloc::large_usable(size, rounding), je, "{size} B");
    };
    (jemalloc::WINDOW + 1..=1 << 17).for_each(check);
    for lg in 17..48 {
        for quarter in 0..4 {
            let class = (4 + quarter) << (lg - 2);
            for size in [class - 1, class, class + 1, class + 4095, class + 4097] {
                check(size);
            }
        }
    }
}

/// The check that guards the computed sizes: the rounding this jemalloc
/// does not use (page rounding on 5.3.0, size classes on 5.3.1) and a wrong
/// page size are refused, so large calls would look at the counters
/// instead of publishing wrong sizes.
#[test]
fn a_rounding_jemalloc_does_not_use_is_refused() {
    serial(|| free(&JE, alloc(&JE, 16)));
    let rounding = jemalloc::large_rounding();
    assert!(jemalloc::agrees_with_jemalloc(rounding));
    let other = if rounding == usize::MAX {
        4095
    } else {
        usize::MAX
    };
    assert!(!jemalloc::agrees_with_jemalloc(other));
    assert!(!jemalloc::agrees_with_jemalloc(16383));
    assert!(!jemalloc::agrees_with_jemalloc(0));
}

/// Blocks larger than the window are published exactly, as jemalloc
/// counts them, without a look at the counters: an idle owner that made
/// only such calls since its last look is read exactly by another thread,
/// through every fold its calls make.
#[test]
fn large_calls_are_published_exactly_without_a_look() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    static STEP: AtomicUsize = AtomicUsize::new(0);
    const SIZES: [usize; 6] = [49 << 10, 64 << 10, 100_001, 1 << 20, 3 << 20, 5 << 20];
    serial(|| {
        STEP.store(0, SeqCst);
        let start = counter::live_bytes();
        let wait = |step| {
            while STEP.load(SeqCst) != step {
                std::thread::yield_now();
            }
        };
        let owner = std::thread::spawn(move || {
            free(&JE, alloc(&JE, 16));
            counter::live_bytes(); // a look: nothing unpublished
            let looks = jemalloc::looks();
            let blocks = SIZES.map(|size| alloc(&JE, size));
            assert_eq!(jemalloc::looks(), looks, "large allocations looked");
            STEP.store(1, SeqCst);
            wait(2);
            for b in blocks {
                free(&JE, b);
            }
            assert_eq!(jemalloc::looks(), looks, "large frees looked");
            STEP.store(3, SeqCst);
            wait(4);
        });
        wait(1);
        let rounding = jemalloc::large_rounding();
        let usable: usize = SIZES
            .iter()
            .map(|&s| jemalloc::large_usable(s, rounding))
            .sum();
        assert_eq!(counter::live_bytes() - start, usable as isize);
        STEP.store(2, SeqCst);
        wait(3);
        assert_eq!(counter::live_bytes(), start);
        STEP.store(4, SeqCst);
        owner.join().unwrap();
        assert_eq!(counter::live_bytes(), start);
    })
}
