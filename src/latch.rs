//! The one-shot latch and the soft level: the fold that first takes the
//! shared total above the threshold records the figure and wakes the
//! watchdog; folds that cross the soft level flip the pressure flag.
//!
//! The decisions live in [`Latch`], which `loom` model-checks (the `loom`
//! cfg swaps its atomics); the process's one instance and the wake-up of the
//! watchdog thread are the free functions below it.
//!
//! # Atomic orderings
//!
//! The promise: once [`Latch::tripped_at`] returns `Some`, everything the
//! tripping thread did before its fold is visible to the reader. The
//! compare-and-swap in `trip` is a Release (as part of `AcqRel`) and the
//! load in `tripped_at` is Acquire; they pair. The same holds for the
//! pressure flag. The levels are set by the watchdog before it looks at the
//! reading, with SeqCst on both sides, so a fold either sees the new levels
//! or happened before the watchdog's own check at start, which then catches
//! it.

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicIsize};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, SeqCst};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicIsize};

/// The latch's state. One instance per process (`LATCH`, below).
pub(crate) struct Latch {
    /// The threshold in bytes; `isize::MAX` while the watchdog is off.
    threshold: AtomicIsize,
    /// 0 until the latch trips, then the folded total that tripped it
    /// (above a threshold of at least 1, so never 0).
    tripped_at: AtomicIsize,
    /// The highest folded total seen.
    peak: AtomicIsize,
    /// A fold above `shed_enter` enters pressure, one below `shed_leave`
    /// leaves it. Off: never above `isize::MAX`, never below `isize::MIN`.
    shed_enter: AtomicIsize,
    shed_leave: AtomicIsize,
    /// Whether usage is above the soft level (with hysteresis).
    pressure: AtomicBool,
}

macro_rules! latch_new {
    () => {
        Latch {
            threshold: AtomicIsize::new(isize::MAX),
            tripped_at: AtomicIsize::new(0),
            peak: AtomicIsize::new(0),
            shed_enter: AtomicIsize::new(isize::MAX),
            shed_leave: AtomicIsize::new(isize::MIN),
            pressure: AtomicBool::new(false),
        }
    };
}

impl Latch {
    /// An unarmed latch.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        latch_new!()
    }

    /// An unarmed latch (loom's atomics have no `const` constructor).
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        latch_new!()
    }

    /// Notes `now` for the peak.
    #[inline]
    pub(crate) fn note_peak(&self, now: isize) {
        // Relaxed is enough for the peak: a statistic. The load first keeps
        // the common case (no new peak) free of a read-modify-write.
        if now > self.peak.load(Relaxed) {
            self.peak.fetch_max(now, Relaxed);
        }
    }

    /// Whether a reading between `low` and `high` could trip the latch or
    /// move the pressure flag: then the caller takes the exact reading and
    /// hands it to [`Self::observe`]. Relaxed loads: see the module docs;
    /// the caller's SeqCst fence orders them after its fold.
    #[inline]
    pub(crate) fn needs_look(&self, high: isize, low: isize) -> bool {
        let pressure = self.pressure.load(Relaxed);
        (high > self.threshold.load(Relaxed) && self.tripped_at.load(Relaxed) == 0)
            || (!pressure && high > self.shed_enter.load(Relaxed))
            || (pressure && low < self.shed_leave.load(Relaxed))
    }

    /// Whether a threshold or a soft level is armed and the latch has not
    /// tripped yet.
    pub(crate) fn armed(&self) -> bool {
        self.tripped_at.load(Relaxed) == 0
            && (self.threshold.load(Relaxed) != isize::MAX
                || self.shed_enter.load(Relaxed) != isize::MAX)
    }

    /// Looks at a reading; returns whether the watchdog must be woken (the
    /// latch tripped, or the pressure flag moved).
    #[inline]
    pub(crate) fn observe(&self, now: isize) -> bool {
        self.note_peak(now);
        let mut wake = false;
        // Relaxed load of the threshold: see the module docs; a fold racing
        // with the watchdog's start is caught by the watchdog's own check.
        if now > self.threshold.load(Relaxed) {
            wake |= self.trip(now);
        }
        // The soft level: one compare each way, Relaxed for the same reason.
        if now > self.shed_enter.load(Relaxed) {
            wake |= self.shift(true);
        } else if now < self.shed_leave.load(Relaxed) {
            wake |= self.shift(false);
        }
        wake
    }

    /// Sets the latch to `now` if it is not set yet; true for the one
    /// caller that set it.
    #[cold]
    #[inline(never)]
    pub(crate) fn trip(&self, now: isize) -> bool {
        // Only the first crossing wins; later ones (other threads, or usage
        // that stays high) find the latch set and do nothing. The Release
        // half of AcqRel publishes this thread's prior writes to
        // `tripped_at` readers. A lost exchange does nothing, so its failure
        // ordering is Relaxed.
        self.tripped_at
            .compare_exchange(0, now.max(1), AcqRel, Relaxed)
            .is_ok()
    }

    /// Moves the pressure flag to `to`; true if this call moved it.
    #[cold]
    #[inline(never)]
    pub(crate) fn shift(&self, to: bool) -> bool {
        // The plain load first: while usage stays on one side, every fold
        // lands here and must not write the shared line. AcqRel on the
        // exchange pairs with the Acquire in `pressure`; a failed exchange
        // (another thread moved it first) does nothing, hence Relaxed.
        self.pressure.load(Relaxed) != to
            && self
                .pressure
                .compare_exchange(!to, to, AcqRel, Relaxed)
                .is_ok()
    }

    /// Arms the threshold.
    pub(crate) fn arm(&self, threshold: isize) {
        debug_assert!(threshold > 0);
        self.threshold.store(threshold, SeqCst);
    }

    /// Sets the soft level: enter above `enter`, leave below `leave`. Called
    /// before `arm` at start, so a fold that sees the threshold sees these
    /// too, and again when the memory limit moves. The bound that widens the
    /// band moves first, so a fold in between never sees leave above enter.
    pub(crate) fn arm_shed(&self, enter: isize, leave: isize) {
        debug_assert!(leave <= enter);
        if enter >= self.shed_enter.load(SeqCst) {
            self.shed_enter.store(enter, SeqCst);
            self.shed_leave.store(leave, SeqCst);
        } else {
            self.shed_leave.store(leave, SeqCst);
            self.shed_enter.store(enter, SeqCst);
        }
    }

    /// Turns the soft level off: never entered, never left.
    pub(crate) fn disarm_shed(&self) {
        self.arm_shed(isize::MAX, isize::MIN);
    }

    /// The folded total that tripped the latch, if it has tripped.
    pub(crate) fn tripped_at(&self) -> Option<isize> {
        match self.tripped_at.load(Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// Whether usage is above the soft level.
    pub(crate) fn pressure(&self) -> bool {
        self.pressure.load(Acquire)
    }

    /// The armed threshold, if any.
    pub(crate) fn threshold(&self) -> Option<isize> {
        match self.threshold.load(SeqCst) {
            isize::MAX => None,
            n => Some(n),
        }
    }

    /// The soft level's enter and leave figures, if set.
    pub(crate) fn shed_levels(&self) -> Option<(isize, isize)> {
        match self.shed_enter.load(SeqCst) {
            isize::MAX => None,
            enter => Some((enter, self.shed_leave.load(SeqCst))),
        }
    }

    /// The highest folded total seen so far. Relaxed: a statistic.
    pub(crate) fn peak(&self) -> isize {
        self.peak.load(Relaxed)
    }
}

#[cfg(not(loom))]
pub(crate) use process::*;

/// The process's latch and the watchdog wake-up.
#[cfg(not(loom))]
mod process {
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
    use std::sync::atomic::{AtomicPtr, AtomicU64};
    use std::thread::Thread;

    use super::Latch;

    static LATCH: Latch = Latch::new();

    /// The watchdog's thread, to unpark: a handle leaked at start, so that
    /// a child of `fork` can start a watchdog of its own and replace it.
    /// `Thread::unpark` is an atomic swap and, if the thread sleeps, one
    /// futex wake: it neither allocates nor locks.
    static WATCHDOG: AtomicPtr<Thread> = AtomicPtr::new(std::ptr::null_mut());

    /// The grace thread, woken with the watchdog: it starts the deadline
    /// from the trip itself, whatever the watchdog thread is doing.
    static GRACE: AtomicPtr<Thread> = AtomicPtr::new(std::ptr::null_mut());

    /// `CLOCK_MONOTONIC` at the trip, in nanoseconds; 0 before it.
    static TRIPPED_NS: AtomicU64 = AtomicU64::new(0);

    fn wake() {
        for handle in [&WATCHDOG, &GRACE] {
            // Acquire pairs with the Release in `arm`: the handle is
            // complete.
            let thread = handle.load(Acquire);
            if !thread.is_null() {
                // SAFETY: a handle leaked in `arm`, never freed. In a child
                // of `fork` it may name a thread that is not there;
                // unparking it then wakes nobody.
                unsafe { (*thread).unpark() };
            }
        }
    }

    /// `CLOCK_MONOTONIC` now, in nanoseconds: a vDSO call that neither
    /// allocates nor locks, so the tripping fold may take it.
    pub(crate) fn monotonic_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: one valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
        (t.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(t.tv_nsec as u64)
    }

    /// After a caller that moved the latch or the flag: if the latch has
    /// tripped, notes the time once (the first to get here after the trip,
    /// microseconds after it at most), then wakes the threads.
    fn moved() {
        if LATCH.tripped_at().is_some() && TRIPPED_NS.load(Relaxed) == 0 {
            // Relaxed: the grace thread reads it after the Acquire load of
            // the latch that this thread's trip published; a racing second
            // caller finds it set, or sets nearly the same time.
            let _ = TRIPPED_NS.compare_exchange(0, monotonic_ns().max(1), Relaxed, Relaxed);
        }
        wake();
    }

    /// `CLOCK_MONOTONIC` nanoseconds at the trip, once it is noted.
    pub(crate) fn tripped_ns() -> Option<u64> {
        // Relaxed: see `moved`.
        match TRIPPED_NS.load(Relaxed) {
            0 => None,
            ns => Some(ns),
        }
    }

    /// In a child of `fork`: the parent's trip time is not the child's.
    pub(crate) fn forget_trip_time() {
        TRIPPED_NS.store(0, Relaxed);
    }

    /// Names the grace thread to wake with the watchdog.
    pub(crate) fn arm_grace(grace: Thread) {
        // Release: see `wake`.
        GRACE.store(Box::into_raw(Box::new(grace)), Release);
    }

    /// Called with an exact reading.
    #[inline]
    pub(crate) fn observe(now: isize) {
        if LATCH.observe(now) {
            moved();
        }
    }

    /// Notes a folded total for the peak.
    #[inline]
    pub(crate) fn note_peak(now: isize) {
        LATCH.note_peak(now);
    }

    /// Whether a reading between `low` and `high` could act on the latch.
    #[inline]
    pub(crate) fn needs_look(high: isize, low: isize) -> bool {
        LATCH.needs_look(high, low)
    }

    /// Whether a level is armed and the latch has not tripped.
    pub(crate) fn armed() -> bool {
        LATCH.armed()
    }

    /// Arms the latch at `threshold` bytes and names the thread to wake.
    /// Called once per process at start (once more in a child of `fork`
    /// that starts its own watchdog; the parent's handle is leaked).
    pub(crate) fn arm(threshold: isize, watchdog: Thread) {
        // Release: see `wake`.
        WATCHDOG.store(Box::into_raw(Box::new(watchdog)), Release);
        LATCH.arm(threshold);
    }

    /// Sets the soft level; called before `arm`.
    pub(crate) fn arm_shed(enter: isize, leave: isize) {
        LATCH.arm_shed(enter, leave);
    }

    /// Moves the armed levels (the memory limit changed). `None` turns the
    /// soft level off.
    pub(crate) fn rearm(threshold: isize, shed: Option<(isize, isize)>) {
        match shed {
            Some((enter, leave)) => LATCH.arm_shed(enter, leave),
            None => LATCH.disarm_shed(),
        }
        LATCH.arm(threshold);
    }

    /// Trips the latch from outside a fold (the watchdog's check at start).
    pub(crate) fn trip_now(now: isize) {
        if LATCH.trip(now) {
            moved();
        }
    }

    /// Trips the latch from outside a fold without waking the watchdog;
    /// true for the one caller that set it, which then wakes it with
    /// [`wake_watchdog`] once it has recorded why (the kernel trigger).
    pub(crate) fn trip_only(now: isize) -> bool {
        LATCH.trip(now)
    }

    /// Wakes the watchdog thread.
    pub(crate) fn wake_watchdog() {
        moved();
    }

    /// Enters or leaves pressure from outside a fold.
    pub(crate) fn shift_now(to: bool) {
        if LATCH.shift(to) {
            moved();
        }
    }

    /// The folded total that tripped the latch, if it has tripped.
    pub(crate) fn tripped_at() -> Option<isize> {
        LATCH.tripped_at()
    }

    /// Whether usage is above the soft level.
    pub(crate) fn pressure() -> bool {
        LATCH.pressure()
    }

    /// The armed threshold, if any.
    pub(crate) fn threshold() -> Option<isize> {
        LATCH.threshold()
    }

    /// The soft level's enter and leave figures, if set.
    pub(crate) fn shed_levels() -> Option<(isize, isize)> {
        LATCH.shed_levels()
    }

    /// The highest folded total seen so far.
    pub(crate) fn peak() -> isize {
        LATCH.peak()
    }
}

/// Model checks: every interleaving loom can find of folds racing on the
/// latch and the pressure flag. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::Latch;
    use loom::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use loom::sync::Arc;
    use loom::thread;

    /// Folds each of `totals` on its own thread; returns how many of the
    /// folds asked for the watchdog to be woken.
    fn fold_concurrently(latch: &Arc<Latch>, totals: &[isize]) -> usize {
        let folds: Vec<_> = totals
            .iter()
            .map(|&now| {
                let latch = latch.clone();
                thread::spawn(move || latch.observe(now))
            })
            .collect();
        folds
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&w| w)
            .count()
    }

    #[test]
    fn two_crossings_trip_once() {
        loom::model(|| {
            let latch = Arc::new(Latch::new());
            latch.arm(100);
            let wakes = fold_concurrently(&latch, &[150, 200]);
            assert_eq!(wakes, 1, "exactly one fold wakes the watchdog");
            let at = latch.tripped_at().expect("tripped");
            assert!(at == 150 || at == 200);
            // Usage that stays high trips nothing more.
            assert!(!latch.observe(300));
            assert_eq!(latch.tripped_at(), Some(at));
        });
    }

    #[test]
    fn the_watchdog_sees_what_the_tripping_thread_wrote() {
        loom::model(|| {
            let latch = Arc::new(Latch::new());
            latch.arm(100);
            let data = Arc::new(AtomicUsize::new(0));
            let fold = {
                let latch = latch.clone();
                let data = data.clone();
                thread::spawn(move || {
                    data.store(42, Relaxed);
                    latch.observe(150);
                })
            };
            // The watchdog: wait for the latch, then read.
            loop {
                if latch.tripped_at().is_some() {
                    assert_eq!(data.load(Relaxed), 42, "Release/Acquire pair");
                    break;
                }
                thread::yield_now();
            }
            fold.join().unwrap();
        });
    }

    #[test]
    fn each_wake_is_one_change_of_the_pressure_flag() {
        loom::model(|| {
            let latch = Arc::new(Latch::new());
            latch.arm_shed(100, 90);
            latch.arm(1_000);
            let wakes = fold_concurrently(&latch, &[150, 50]);
            // Starting from "no pressure", each successful change flips the
            // flag once, so the final state is the parity of the wakes.
            assert_eq!(latch.pressure(), wakes % 2 == 1, "wakes {wakes}");
            assert!(latch.tripped_at().is_none());
        });
    }
}
