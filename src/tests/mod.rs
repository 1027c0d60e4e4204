//! Unit tests of the counter and the latch, driven through a `MemWatch`
//! instance called directly: here memwatch's own count (over `System`) and
//! the drivers both backends share; `jemalloc.rs`, the same over jemalloc's
//! counters. This test binary's global allocator is the
//! default one, so only these calls move the shared count; the tests that
//! touch it run one at a time through `serial`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::mpsc;
use std::thread;

use parking_lot::Mutex;

use crate::count::{self as counter, own};
use crate::{MemWatch, DEFAULT_SLACK};

static LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` alone among the tests that touch the shared count, on a thread
/// of its own that has ended, thread-local destructors included, before the
/// next such test starts. A thread that counted folds what it holds when it
/// exits; had `f` run on the test harness's thread, that fold would land in
/// the middle of the next test.
fn serial<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let _g = LOCK.lock();
    // Joining waits for the thread's end, destructors included (leaving the
    // scope alone does not).
    thread::scope(|s| s.spawn(f).join().unwrap())
}

static SMALL: MemWatch<System> = MemWatch::new(System).with_slack(64 << 10);

struct Block(*mut u8, Layout);
// SAFETY: a `Block` is an owned heap allocation; freeing it from another
// thread is what the allocator contract allows.
unsafe impl Send for Block {}

fn alloc<A: GlobalAlloc + 'static>(a: &MemWatch<A>, size: usize) -> Block {
    let layout = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: `layout` has a non-zero size.
    let p = unsafe { a.alloc(layout) };
    assert!(!p.is_null());
    Block(p, layout)
}

fn free<A: GlobalAlloc + 'static>(a: &MemWatch<A>, b: Block) {
    // SAFETY: `b` came from `alloc` on a `MemWatch<A>`, which forwards to `A`
    // whatever its slack, with this layout.
    unsafe { a.dealloc(b.0, b.1) }
}

/// 20 waves of 8 threads through `a`: each allocates 500 blocks of sizes up
/// to 3000 B, frees blocks other threads allocated, reallocates up to 200 KB
/// and back, and leaks one block of 1000 + t bytes. Checks that the reading
/// rose by exactly what the leaks count as (`counted`), frees them, checks
/// that it is back where it started, and returns the leaks' count.
fn churn<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
) -> usize {
    let before = counter::live_bytes();
    let (tx, rx) = mpsc::channel::<Block>();
    let rx = std::sync::Arc::new(Mutex::new(rx));
    let mut leaked = Vec::new();
    let mut expected_leak = 0usize;
    for round in 0..20 {
        let mut handles = Vec::new();
        for t in 0..8 {
            let tx = tx.clone();
            let rx = rx.clone();
            handles.push(thread::spawn(move || {
                let mut keep = Vec::new();
                for i in 0..500 {
                    let size = 1 + (i * 37 + t * 101 + round) % 3000;
                    let b = alloc(a, size);
                    if i % 3 == 0 {
                        tx.send(b).unwrap();
                    } else if i % 3 == 1 {
                        keep.push(b);
                    } else {
                        free(a, b);
                    }
                    // Free a block that another thread allocated.
                    if let Ok(b) = rx.lock().try_recv() {
                        free(a, b);
                    }
                    // Realloc up and down.
                    if i % 50 == 0 {
                        let b = alloc(a, 100);
                        // SAFETY: `b` came from `a` with `b.1`.
                        let p = unsafe { a.realloc(b.0, b.1, 200_000) };
                        assert!(!p.is_null());
                        let l = Layout::from_size_align(200_000, 8).unwrap();
                        // SAFETY: as above, now with the new layout.
                        let p = unsafe { a.realloc(p, l, 10) };
                        free(a, Block(p, Layout::from_size_align(10, 8).unwrap()));
                    }
                }
                // Leak one known block; free the rest on exit.
                let leak = alloc(a, 1000 + t);
                for b in keep {
                    free(a, b);
                }
                let n = counted(&leak);
                (leak.0 as usize, leak.1, n)
            }));
        }
        for h in handles {
            let (p, l, n) = h.join().unwrap();
            expected_leak += n;
            leaked.push(Block(p as *mut u8, l));
        }
    }
    drop(tx);
    for b in rx.lock().try_iter() {
        free(a, b);
    }
    assert_eq!(counter::live_bytes() - before, expected_leak as isize);
    for b in leaked {
        free(a, b);
    }
    assert_eq!(counter::live_bytes(), before);
    expected_leak
}

#[test]
fn exact_under_threads_with_cross_thread_frees_and_exits() {
    serial(|| {
        // Over `System` a block counts as its requested size.
        let leaked = churn(&SMALL, |b| b.1.size());
        assert_eq!(leaked, (0..8).map(|t| 1000 + t).sum::<usize>() * 20);
        // The slots of exited threads are free again.
        assert!(own::threads_joined() <= 2, "{}", own::threads_joined());
    })
}

#[test]
fn large_allocation_goes_straight_to_the_folded_total() {
    serial(|| {
        let folded = counter::folded_bytes();
        let b = alloc(&SMALL, 1 << 20);
        assert_eq!(counter::folded_bytes() - folded, 1 << 20);
        free(&SMALL, b);
        assert_eq!(counter::folded_bytes(), folded);
    })
}

#[test]
fn one_thread_using_instances_with_different_slacks_stays_exact() {
    static EXACT: MemWatch<System> = MemWatch::new(System).with_slack(0);
    static WIDE: MemWatch<System> = MemWatch::new(System).with_slack(1 << 20);
    serial(|| {
        // A fresh thread, so that the slot it claims is biased by whichever
        // instance it touches first.
        thread::spawn(|| {
            let start = counter::live_bytes();
            let mut held: Vec<(Block, &MemWatch<System>)> = Vec::new();
            let mut expect = 0isize;
            for i in 0..3000usize {
                let size = 1 + (i * 7919) % 70_000;
                let a: &MemWatch<System> = [&SMALL, &EXACT, &WIDE][i % 3];
                if i % 4 == 3 {
                    if let Some((b, from)) = held.pop() {
                        expect -= b.1.size() as isize;
                        free(from, b);
                    }
                } else {
                    held.push((alloc(a, size), a));
                    expect += size as isize;
                }
                assert_eq!(counter::live_bytes() - start, expect, "step {i}");
                // The shared total lags the truth by at most the widest slack.
                let lag = (counter::live_bytes() - counter::folded_bytes()).abs();
                assert!(lag <= 1 << 20, "step {i}: folded total off by {lag}");
            }
            for (b, from) in held {
                free(from, b);
            }
            assert_eq!(counter::live_bytes(), start);
        })
        .join()
        .unwrap();
    })
}

#[test]
fn readings_taken_while_threads_exit_stay_bounded_and_end_exact() {
    readings_while_threads_exit(&SMALL);
}

/// A reader sums other threads' counts through the table while 300 waves of
/// 4 threads list themselves, allocate and free through `a`, and take
/// themselves off on exit.
fn readings_while_threads_exit<A: GlobalAlloc + Sync + 'static>(a: &'static MemWatch<A>) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    serial(|| {
        let before = counter::live_bytes();
        let stop = AtomicBool::new(false);
        thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u64;
                while !stop.load(SeqCst) {
                    let off = counter::live_bytes() - before;
                    // 4 threads, each holding under 64 KiB and an unfolded
                    // count of at most 64 KiB.
                    assert!(off.abs() <= 1 << 20, "reading off by {off}");
                    reads += 1;
                }
                reads
            });
            for _ in 0..300 {
                let workers: Vec<_> = (0..4)
                    .map(|t| {
                        s.spawn(move || {
                            let blocks: Vec<_> = (0..20).map(|i| alloc(a, 100 + i * t)).collect();
                            for b in blocks {
                                free(a, b);
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().unwrap();
                }
            }
            stop.store(true, SeqCst);
            assert!(reader.join().unwrap() > 0);
        });
        assert_eq!(counter::live_bytes(), before);
    })
}

#[test]
fn a_thread_that_only_frees_is_counted() {
    only_frees(&SMALL, |b| b.1.size(), 0);
}

/// A consumer thread that never allocates through `a` frees what a producer
/// allocated (a channel's far end, a thread that drops values for others):
/// its frees must come off the reading, while it runs and after it exits.
/// `counted` is what a block counts as; `lag` how far a reading may be
/// off while the consumer runs (what it may not have published yet).
fn only_frees<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
    lag: usize,
) {
    serial(|| {
        let before = counter::live_bytes();
        let (tx, rx) = mpsc::channel::<Block>();
        let (freed_tx, freed_rx) = mpsc::channel::<()>();
        let consumer = thread::spawn(move || {
            for b in rx {
                free(a, b);
                freed_tx.send(()).unwrap();
            }
        });
        let mut sent = 0isize;
        for i in 0..2000 {
            let b = alloc(a, 16 + (i * 131) % 4000);
            sent += counted(&b) as isize;
            tx.send(b).unwrap();
            if i == 999 {
                // Half way, with the consumer still running, everything sent so
                // far is freed: the reading is back where it started.
                for _ in 0..1000 {
                    freed_rx.recv().unwrap();
                }
                let off = counter::live_bytes() - before;
                assert!(
                    off.unsigned_abs() <= lag,
                    "{sent} bytes sent and freed, reading off by {off}"
                );
            }
        }
        drop(tx);
        consumer.join().unwrap();
        assert_eq!(counter::live_bytes(), before);
    })
}

#[test]
fn calls_from_destructors_that_run_after_the_exit_fold_are_counted() {
    late_destructor(&SMALL, |b| b.1.size());
}

/// A thread-local whose destructor calls `a` after memwatch's own exit
/// destructor has folded the thread's count: it allocates, frees, and leaks
/// one block to the test. Destructors run in the reverse order of first use,
/// so touching the thread-local before the first call through `a` puts its
/// destructor after memwatch's. The leak must count, and the frees must come
/// off. `counted` is what a block counts as.
fn late_destructor<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
) {
    use std::cell::RefCell;

    struct Late<A: GlobalAlloc + 'static> {
        a: &'static MemWatch<A>,
        leak_to: mpsc::Sender<Block>,
    }
    impl<A: GlobalAlloc + 'static> Drop for Late<A> {
        fn drop(&mut self) {
            let held: Vec<_> = (0..50).map(|i| alloc(self.a, 100 + i * 97)).collect();
            for b in held {
                free(self.a, b);
            }
            self.leak_to.send(alloc(self.a, 3000)).unwrap();
        }
    }
    thread_local! {
        static LATE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
    }

    serial(|| {
        let before = counter::live_bytes();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            LATE.with(|l| *l.borrow_mut() = Some(Box::new(Late { a, leak_to: tx })));
            // The first call through `a`: memwatch's destructor comes later.
            let blocks: Vec<_> = (0..20).map(|i| alloc(a, 64 + i)).collect();
            for b in blocks {
                free(a, b);
            }
        })
        .join()
        .unwrap();
        let leak = rx.recv().unwrap();
        let off = counter::live_bytes() - before;
        assert_eq!(off, counted(&leak) as isize, "after the thread's end");
        free(a, leak);
        assert_eq!(counter::live_bytes(), before);
    })
}

#[test]
fn threads_beyond_the_first_chunk_of_slots_count_exactly() {
    beyond_the_table(&SMALL, |b| b.1.size(), own::threads_joined);
}

/// `CHUNK + 44` threads each allocate, grow and hold a block through `a`
/// at once. `counted` is what a block counts as, `listed` how many threads
/// hold a slot: the table grows to hold them all.
fn beyond_the_table<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
    listed: fn() -> usize,
) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Barrier;

    serial(|| {
        let before = counter::live_bytes();
        let threads = crate::count::table::CHUNK + 44;
        let all_allocated = Barrier::new(threads + 1);
        let may_free = Barrier::new(threads + 1);
        let held = AtomicUsize::new(0);
        thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (all_allocated, may_free, held) = (&all_allocated, &may_free, &held);
                    s.spawn(move || {
                        let b = alloc(a, 500 + t);
                        let grown = Layout::from_size_align(1000 + t, 8).unwrap();
                        // SAFETY: `b` came from `a` with `b.1`.
                        let b = Block(unsafe { a.realloc(b.0, b.1, grown.size()) }, grown);
                        assert!(!b.0.is_null());
                        held.fetch_add(counted(&b), SeqCst);
                        // A reading publishes the caller's own count.
                        counter::live_bytes();
                        all_allocated.wait();
                        may_free.wait();
                        free(a, b);
                    })
                })
                .collect();
            all_allocated.wait();
            let (now_listed, now_live) = (listed(), counter::live_bytes() - before);
            // Let the workers go before asserting: a failed assertion here
            // would otherwise leave them at the barrier and the scope waiting.
            may_free.wait();
            assert!(now_listed >= threads, "{now_listed} listed");
            assert_eq!(now_live, held.load(SeqCst) as isize);
            // Joining waits for each thread's end, thread-local destructors
            // included (leaving the scope alone does not).
            for w in workers {
                w.join().unwrap();
            }
        });
        assert_eq!(counter::live_bytes(), before);
        // The workers' slots are free again: this thread's may be left.
        assert!(listed() <= 1, "{} listed", listed());
    })
}

/// An inner allocator that refuses every request.
struct Refuse;

// SAFETY: never hands out memory, so there is nothing to misuse.
unsafe impl GlobalAlloc for Refuse {
    unsafe fn alloc(&self, _: Layout) -> *mut u8 {
        std::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[test]
fn with_no_slack_a_refused_request_counts_nothing() {
    serial(|| {
        let a = MemWatch::new(Refuse).with_slack(0);
        let before = counter::live_bytes();
        let layout = Layout::from_size_align(4096, 8).unwrap();
        // SAFETY: non-zero size; the result is null and never used.
        unsafe {
            assert!(a.alloc(layout).is_null());
            assert!(a.alloc_zeroed(layout).is_null());
        }
        assert_eq!(counter::live_bytes(), before);
    })
}

/// Calls within the slack window count before the inner allocator runs (so
/// that the wrapper ends in a jump); a refusal of such a call stays counted,
/// the documented error. Anything larger than twice the slack is counted
/// only once it succeeded.
#[test]
fn a_refused_request_stays_counted_only_within_the_slack_window() {
    static COUNTED: MemWatch<System> = MemWatch::new(System);
    serial(|| {
        thread::spawn(|| {
            // List this thread, with the default slack, through an allocator
            // that succeeds.
            free(&COUNTED, alloc(&COUNTED, 16));
            let a = MemWatch::new(Refuse);
            let before = counter::live_bytes();
            let large = Layout::from_size_align(2 * DEFAULT_SLACK + 1, 8).unwrap();
            let small = Layout::from_size_align(4096, 8).unwrap();
            // SAFETY: non-zero sizes; the results are null and never used.
            unsafe {
                assert!(a.alloc(large).is_null());
                assert!(a.alloc_zeroed(large).is_null());
                assert_eq!(counter::live_bytes(), before, "a refused large request");
                assert!(a.alloc(small).is_null());
                assert_eq!(counter::live_bytes(), before + 4096, "a refused small one");
            }
            // Take the documented error back out, so later tests start even.
            own::record(-4096, DEFAULT_SLACK, || {});
            assert_eq!(counter::live_bytes(), before);
        })
        .join()
        .unwrap();
    })
}

#[test]
fn latch_fires_once_and_wakes_the_watchdog_thread() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    serial(|| {
        static WAKES: AtomicUsize = AtomicUsize::new(0);
        let fake_watchdog = thread::spawn(|| {
            while crate::latch::tripped_at().is_none() {
                thread::park();
            }
            WAKES.fetch_add(1, Ordering::SeqCst);
        });
        let base = counter::live_bytes();
        let threshold = base + (8 << 20);
        crate::latch::arm(threshold, fake_watchdog.thread().clone());
        assert!(!crate::tripped());
        // Many threads cross together and stay above.
        let held: Vec<_> = (0..8)
            .map(|_| thread::spawn(|| (0..4).map(|_| alloc(&SMALL, 1 << 20)).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        fake_watchdog.join().unwrap();
        let at = crate::latch::tripped_at().expect("tripped");
        assert!(at > threshold, "tripped at {at}, threshold {threshold}");
        // More crossings do not move the latch.
        let more = alloc(&SMALL, 16 << 20);
        free(&SMALL, more);
        assert_eq!(crate::latch::tripped_at(), Some(at));
        assert_eq!(WAKES.load(Ordering::SeqCst), 1);
        for b in held {
            free(&SMALL, b);
        }
        std::thread::sleep(Duration::from_millis(1));
        assert!(crate::peak_bytes() as isize >= at);
    })
}

#[test]
fn calls_from_pthread_key_destructors_after_the_exit_fold_are_counted() {
    key_destructor_after_exit(&SMALL, |b| b.1.size());
}

/// A `pthread` key created after memwatch's own, so that at a thread's end
/// its destructor runs after memwatch's exit fold: what it allocates and
/// keeps must count, and what it frees must come off.
fn key_destructor_after_exit<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
) {
    use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};

    // One key per allocator type: a `static` in a generic function is
    // shared by every instance of it, so the allocator is passed through
    // the key's value.
    static LEAK: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
    static ALLOC: AtomicUsize = AtomicUsize::new(0);
    const SIZE: usize = 3000;

    unsafe extern "C" fn late<A: GlobalAlloc + Sync + 'static>(_: *mut std::ffi::c_void) {
        // SAFETY: `ALLOC` holds the `&'static MemWatch<A>` stored below.
        let a = unsafe { &*(ALLOC.load(SeqCst) as *const MemWatch<A>) };
        for i in 0..50 {
            free(a, alloc(a, 100 + i * 97));
        }
        LEAK.store(alloc(a, SIZE).0, SeqCst);
    }

    serial(|| {
        ALLOC.store(std::ptr::from_ref(a) as usize, SeqCst);
        // memwatch's key exists once some thread has counted.
        free(a, alloc(a, 64));
        let mut key = 0;
        // SAFETY: `key` is writable; `late` has the destructor's type.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(late::<A>)) };
        assert_eq!(rc, 0);
        let before = counter::live_bytes();
        thread::spawn(move || {
            free(a, alloc(a, 64));
            // SAFETY: a key just created; the value is only a marker.
            assert_eq!(unsafe { libc::pthread_setspecific(key, 1 as *const _) }, 0);
        })
        .join()
        .unwrap();
        let leak = Block(
            LEAK.swap(std::ptr::null_mut(), SeqCst),
            Layout::from_size_align(SIZE, 8).unwrap(),
        );
        assert!(!leak.0.is_null());
        assert_eq!(counter::live_bytes() - before, counted(&leak) as isize);
        free(a, leak);
        assert_eq!(counter::live_bytes(), before);
        // SAFETY: no thread holds a value for it any more.
        unsafe { libc::pthread_key_delete(key) };
    })
}

#[test]
fn a_thread_the_c_library_starts_is_counted() {
    c_thread(&SMALL, |b| b.1.size());
}

/// A thread started by the C library's `pthread_create`, as C code or a
/// shared library starts one, leaks 8 MiB and frees 4 MiB that the test
/// thread allocated: both count.
fn c_thread<A: GlobalAlloc + Sync + 'static>(
    a: &'static MemWatch<A>,
    counted: fn(&Block) -> usize,
) {
    use std::ffi::c_void;

    struct Work {
        alloc_leak: Box<dyn Fn() -> Block + Send>,
        free_given: Box<dyn FnOnce() + Send>,
        leak: Option<Block>,
    }
    extern "C" fn body(arg: *mut c_void) -> *mut c_void {
        // SAFETY: `arg` is the `Work` below, which outlives the thread.
        let work = unsafe { &mut *arg.cast::<Work>() };
        work.leak = Some((work.alloc_leak)());
        let free_given = std::mem::replace(&mut work.free_given, Box::new(|| {}));
        free_given();
        std::ptr::null_mut()
    }

    serial(|| {
        let given = alloc(a, 4 << 20);
        let given_bytes = counted(&given);
        let before = counter::live_bytes();
        let mut work = Work {
            alloc_leak: Box::new(move || alloc(a, 8 << 20)),
            free_given: Box::new(move || free(a, given)),
            leak: None,
        };
        let mut id = 0;
        // SAFETY: `id` is writable, no attributes; `work` outlives the
        // thread, which is joined below.
        let rc = unsafe {
            libc::pthread_create(&mut id, std::ptr::null(), body, (&raw mut work).cast())
        };
        assert_eq!(rc, 0);
        // SAFETY: a thread just started, joined once.
        assert_eq!(unsafe { libc::pthread_join(id, std::ptr::null_mut()) }, 0);
        let leak = work.leak.take().unwrap();
        let off = counter::live_bytes() - before;
        assert_eq!(off, counted(&leak) as isize - given_bytes as isize);
        free(a, leak);
        assert_eq!(counter::live_bytes(), before - given_bytes as isize);
    })
}

/// Over jemalloc on Linux the count is jemalloc's own per-thread counters,
/// in usable sizes.
#[cfg(memwatch_jemalloc_counts)]
mod jemalloc;
mod random;
