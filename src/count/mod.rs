//! The count: every thread counts in a slot of its own, and what the slots
//! hold is folded into one shared total in batches. The fold is where the
//! threshold is checked ([`crate::latch`]).
//!
//! - [`slot`]: one thread's published delta and its fold (loom-checked).
//! - [`table`]: the slots of all threads, in memory never freed.
//! - [`own`]: memwatch's own count of requested sizes, over any allocator.
//! - [`jemalloc`]: over jemalloc on Linux, jemalloc's own per-thread
//!   counters, looked at every 64 KiB of a thread's activity.
//!
//! A thread joins on its first call through the allocator, whatever started
//! it, and leaves from a `pthread` key destructor, which the C library runs
//! after every thread-local destructor. A forked child keeps only its own
//! thread's slot and folds the others' last figures into the total.
//!
//! The exact reading ([`live_bytes`]) is every taken slot's pending delta
//! plus the total, in that order, so that a racing fold is never missed.

pub(crate) mod slot;
pub(crate) mod table;

#[cfg(not(loom))]
pub(crate) mod own;

#[cfg(memwatch_jemalloc_counts)]
pub(crate) mod jemalloc;

#[cfg(not(loom))]
pub(crate) use process::*;

/// Default per-thread slack, in bytes: 4 MiB, ClickHouse's default
/// `max_untracked_memory`. Alloc/free pairs up to this size never touch the
/// shared total, and a thread holds at most this much unfolded.
pub const DEFAULT_SLACK: usize = 4 << 20;

/// The largest slack [`crate::MemWatch::with_slack`] accepts: 2^61 bytes.
/// It keeps `2 * slack` below 2^62, so that a slot outside every window can
/// never be entered (see `slot::OUTSIDE`).
pub const MAX_SLACK: usize = isize::MAX as usize / 4;

#[cfg(not(loom))]
mod process {
    use std::ffi::c_void;
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

    use super::slot;
    use crate::latch;
    use crate::sync::{AtomicIsize, AtomicU8, AtomicUsize};

    /// The folded total of live bytes.
    pub(crate) static TOTAL: AtomicIsize = AtomicIsize::new(0);

    /// Adds `delta` to the shared total and lets the latch look at it: how
    /// a call that no slot counts (a thread past its exit, or before it
    /// could join) is counted.
    pub(crate) fn fold(delta: isize) {
        latch::observe(slot::add_to(&TOTAL, delta));
    }

    /// The exact reading: every taken slot's pending delta, then the total.
    ///
    /// Exact once threads are quiescent for memwatch's own count; over
    /// jemalloc, each other running thread may have up to 64 KiB of
    /// activity it has not published yet (the calling thread publishes its
    /// own first).
    pub(crate) fn live_bytes() -> isize {
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::publish_own();
        let mut sum: isize = 0;
        super::own::add_pending(&mut sum);
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::add_pending(&mut sum);
        // The total last, so that a fold racing with this reading is counted
        // once or twice, never missed (see `slot`). Relaxed: the Acquire
        // loads of the slots order it after them.
        sum.wrapping_add(TOTAL.load(Relaxed))
    }

    /// The folded total alone, what the threshold check compares.
    #[cfg(test)]
    pub(crate) fn folded_bytes() -> isize {
        // Relaxed: a statistic.
        TOTAL.load(Relaxed)
    }

    /// Process-wide set-up: not started, running, done, failed.
    const NOT_SET_UP: u8 = 0;
    const SETTING_UP: u8 = 1;
    const SET_UP: u8 = 2;
    const SET_UP_FAILED: u8 = 3;
    static SETUP: AtomicU8 = AtomicU8::new(NOT_SET_UP);
    /// The `pthread` key whose destructor is [`at_exit`], once set up.
    static EXIT_KEY: AtomicUsize = AtomicUsize::new(0);

    /// Arranges for [`at_exit`] to run when the calling thread ends, and
    /// returns whether it will. The first call in the process creates the
    /// key and installs the fork handler; a call that meets another thread
    /// doing so returns `false` at once rather than wait (the caller counts
    /// this call in the total and tries again on a later one). Neither
    /// allocates through Rust's allocator nor blocks.
    pub(crate) fn arm_exit() -> bool {
        // Acquire pairs with the Release store of `SET_UP`: the key is set.
        match SETUP.load(Acquire) {
            SET_UP => {}
            NOT_SET_UP => {
                // Acquire/Relaxed: the winner publishes with the Release
                // store below; a loser only learns that it lost.
                if SETUP
                    .compare_exchange(NOT_SET_UP, SETTING_UP, AcqRel, Relaxed)
                    .is_err()
                {
                    return false;
                }
                let done = set_up();
                // Release: see the load above.
                SETUP.store(if done { SET_UP } else { SET_UP_FAILED }, Release);
                if !done {
                    return false;
                }
            }
            _ => return false,
        }
        // Relaxed: ordered by the Acquire load of `SETUP` above.
        let key = EXIT_KEY.load(Relaxed) as libc::pthread_key_t;
        // SAFETY: `key` came from `pthread_key_create`; the value is a
        // non-null marker, never dereferenced.
        unsafe {
            libc::pthread_setspecific(key, std::ptr::NonNull::<u8>::dangling().as_ptr().cast()) == 0
        }
    }

    fn set_up() -> bool {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is writable; `at_exit` has the destructor's type.
        if unsafe { libc::pthread_key_create(&mut key, Some(at_exit)) } != 0 {
            return false;
        }
        // Relaxed: published by the Release store of `SET_UP`.
        EXIT_KEY.store(key as usize, Relaxed);
        // SAFETY: `after_fork_in_child` is an `extern "C" fn()` that stays
        // valid for the program's life.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) == 0 }
    }

    /// A thread's end: the C library runs key destructors after every
    /// thread-local destructor, Rust's included, so what the thread's whole
    /// life counted is folded here. Calls made after it (by later key
    /// destructors) count themselves in the total.
    unsafe extern "C" fn at_exit(_: *mut c_void) {
        super::own::leave();
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::leave();
    }

    /// In a child of `fork`, only the forking thread lives on: the other
    /// threads' slots are folded into the total (their heap was copied with
    /// the rest) and freed, so that nothing points at threads that are gone.
    extern "C" fn after_fork_in_child() {
        super::own::forget_other_threads();
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::forget_other_threads();
    }
}
