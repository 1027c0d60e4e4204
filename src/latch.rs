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

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicIsize};
use std::sync::OnceLock;
use std::thread::Thread;

/// The threshold in bytes; `isize::MAX` while the watchdog is off.
static THRESHOLD: AtomicIsize = AtomicIsize::new(isize::MAX);

/// 0 until the latch trips, then the folded total that tripped it (which is
/// above a threshold of at least 1, so never 0).
static TRIPPED_AT: AtomicIsize = AtomicIsize::new(0);

/// The highest folded total seen.
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// The soft level: a fold above `SHED_ENTER` enters pressure, a fold below
/// `SHED_LEAVE` leaves it. Off: never above `isize::MAX`, never below
/// `isize::MIN`.
static SHED_ENTER: AtomicIsize = AtomicIsize::new(isize::MAX);
static SHED_LEAVE: AtomicIsize = AtomicIsize::new(isize::MIN);

/// Whether usage is above the soft level (with hysteresis).
static PRESSURE: AtomicBool = AtomicBool::new(false);

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
    // The soft level: one compare each way. Relaxed loads of the levels:
    // they are set once at start, before the watchdog looks at the reading
    // (see `arm_shed`).
    if now > SHED_ENTER.load(Relaxed) {
        shift(true);
    } else if now < SHED_LEAVE.load(Relaxed) {
        shift(false);
    }
}

/// Moves the pressure flag to `to`, waking the watchdog if it moved.
#[cold]
#[inline(never)]
fn shift(to: bool) {
    // The plain load first: while usage stays above the level (or below),
    // every fold lands here and must not write the shared line.
    // AcqRel on the exchange: the watchdog's Acquire load of `PRESSURE`
    // sees the state as of this fold. A failed exchange (another thread
    // moved it first) does nothing, so its ordering is Relaxed.
    if PRESSURE.load(Relaxed) != to && PRESSURE.compare_exchange(!to, to, AcqRel, Relaxed).is_ok() {
        wake();
    }
}

#[cold]
#[inline(never)]
fn trip(now: isize) {
    // Only the first crossing wins; later ones (other threads, or usage that
    // stays high) find the latch set and do nothing. The Release half of
    // AcqRel publishes this thread's prior writes to `tripped_at` readers.
    // A lost exchange does nothing, so its failure ordering is Relaxed.
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

/// Sets the soft level: enter above `enter`, leave below `leave`.
/// Called once at start, before `arm`'s threshold store (SeqCst), so a fold
/// that sees the threshold sees these too.
pub(crate) fn arm_shed(enter: isize, leave: isize) {
    debug_assert!(leave <= enter);
    SHED_LEAVE.store(leave, SeqCst);
    SHED_ENTER.store(enter, SeqCst);
}

/// Whether usage is above the soft level. Acquire pairs with the exchange
/// in `shift`.
pub(crate) fn pressure() -> bool {
    PRESSURE.load(Acquire)
}

/// The soft level's enter and leave figures, if set.
pub(crate) fn shed_levels() -> Option<(isize, isize)> {
    match SHED_ENTER.load(SeqCst) {
        isize::MAX => None,
        enter => Some((enter, SHED_LEAVE.load(SeqCst))),
    }
}

/// Enters or leaves pressure from outside a fold (the watchdog's check at
/// start).
pub(crate) fn shift_now(to: bool) {
    shift(to);
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

/// The highest folded total seen so far. Relaxed: a statistic.
pub(crate) fn peak() -> isize {
    PEAK.load(Relaxed)
}
