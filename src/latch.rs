//! The one-shot latch: the fold that first takes the shared total above the
//! threshold records the figure and wakes the watchdog.
//!
//! # Atomic orderings
//!
//! The promise: once [`tripped_at`] returns `Some`, everything the tripping
//! thread did before its fold is visible to the reader. The compare-and-swap
//! in [`observe`] is a Release (as part of `AcqRel`) and the loads in
//! [`tripped_at`] are Acquire; they pair. The threshold itself is set by the
//! watchdog before it looks at the reading, with SeqCst on both sides, so a
//! fold either sees the new threshold or happened before the watchdog's own
//! check at start, which then catches it.

use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::sync::OnceLock;
use std::thread::Thread;

/// The threshold in bytes; `isize::MAX` while the watchdog is off.
static THRESHOLD: AtomicIsize = AtomicIsize::new(isize::MAX);

/// 0 until the latch trips, then the folded total that tripped it (which is
/// above a threshold of at least 1, so never 0).
static TRIPPED_AT: AtomicIsize = AtomicIsize::new(0);

/// The highest folded total seen.
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// The watchdog's thread, to unpark. `Thread::unpark` is an atomic swap and,
/// if the thread sleeps, one futex wake: it neither allocates nor locks.
static WATCHDOG: OnceLock<Thread> = OnceLock::new();

/// Called on every fold with the new folded total.
#[inline]
pub(crate) fn observe(now: isize) {
    // Relaxed is enough for the peak: a statistic. The load first keeps the
    // common case (no new peak) free of a read-modify-write.
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
    // Relaxed load of the threshold: see the module docs; a fold racing with
    // the watchdog's start is caught by the watchdog's own check.
    if now > THRESHOLD.load(Relaxed) {
        trip(now);
    }
}

#[cold]
#[inline(never)]
fn trip(now: isize) {
    // Only the first crossing wins; later ones (other threads, or usage that
    // stays high) find the latch set and do nothing. The Release half of
    // AcqRel publishes this thread's prior writes to `tripped_at` readers.
    if TRIPPED_AT.compare_exchange(0, now, AcqRel, Relaxed).is_ok() {
        wake();
    }
}

fn wake() {
    if let Some(thread) = WATCHDOG.get() {
        thread.unpark();
    }
}

/// Arms the latch at `threshold` bytes, or trips it at once if `current`
/// already exceeds it. Called by the watchdog thread once, at start.
pub(crate) fn arm(threshold: isize, watchdog: Thread) {
    debug_assert!(threshold > 0);
    // `set` fails only if a watchdog was armed before, which the watchdog's
    // single-start guard rules out.
    let _ = WATCHDOG.set(watchdog);
    THRESHOLD.store(threshold, SeqCst);
}

/// Trips the latch from outside a fold (the watchdog's check at start).
pub(crate) fn trip_now(now: isize) {
    trip(now.max(1));
}

/// The folded total that tripped the latch, if it has tripped.
pub(crate) fn tripped_at() -> Option<isize> {
    match TRIPPED_AT.load(Acquire) {
        0 => None,
        n => Some(n),
    }
}

/// The armed threshold, if any.
pub(crate) fn threshold() -> Option<isize> {
    match THRESHOLD.load(SeqCst) {
        isize::MAX => None,
        n => Some(n),
    }
}

/// The highest folded total seen so far.
pub(crate) fn peak() -> isize {
    PEAK.load(Relaxed)
}
