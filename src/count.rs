//! One thread's pending delta, and how it moves into the shared total
//! without a concurrent reading losing it.
//!
//! [`crate::counter`] gives every thread one [`Count`] in its thread-local
//! block and lists it for readers; this file is the protocol on the words
//! themselves, which `loom` model-checks (the `loom` cfg swaps the atomics).
//!
//! # Atomic orderings
//!
//! The promise: a reading that sums every listed count's pending delta and
//! then loads the total never misses bytes that a fold moved from one to the
//! other while it ran. It may count them twice for that instant, which the
//! reading's documented error (what threads are folding at that instant)
//! already covers; losing them would also hide bytes that were counted long
//! before the reading started.
//!
//! A fold adds to the total and then stores the count's new level; every
//! store of a level is a Release, and the reader's load of it an Acquire, so
//! a reader that sees a level written after a fold also sees that fold in
//! the total it loads next. On x86-64 a Release store is the same `mov` as a
//! Relaxed one. Everything else is Relaxed: only the owning thread writes
//! its count, so it reads its own last stores, and the total is a statistic.

#[cfg(loom)]
use loom::sync::atomic::AtomicIsize;
#[cfg(not(loom))]
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// The level of a count that is not listed: so far outside any window that
/// every update misses the fast path, which is how the fast path learns that
/// there is no entry without a separate branch. It is never stored to by the
/// fast path, for the same reason: with the slack at most
/// [`crate::MAX_SLACK`], `2 * slack < 2^62`, and no delta of an allocation
/// that can succeed brings `isize::MIN / 2` into `0..=2 * slack`.
const OUTSIDE: isize = isize::MIN / 2;

/// One thread's pending delta.
///
/// The delta is kept biased: `level = pending + bias`, with `bias` the slack
/// of the allocator that last folded it. The window `-slack <= pending <=
/// slack` then reads `0 <= level <= 2 * slack`, one unsigned compare on the
/// value just computed.
pub(crate) struct Count {
    /// `pending + bias`. Written only by the owning thread; read by anyone
    /// summing the exact reading.
    level: AtomicIsize,
    /// The slack the level is biased by. Written only by the owner, off the
    /// fast path; it changes only when one thread uses two `MemWatch`
    /// instances with different slacks.
    bias: AtomicIsize,
}

impl Count {
    /// A count that is not listed: every update misses the fast path.
    #[cfg(not(loom))]
    pub(crate) const fn outside() -> Self {
        Count {
            level: AtomicIsize::new(OUTSIDE),
            bias: AtomicIsize::new(0),
        }
    }

    /// A count that is not listed (loom's atomics have no `const`
    /// constructor).
    #[cfg(loom)]
    pub(crate) fn outside() -> Self {
        Count {
            level: AtomicIsize::new(OUTSIDE),
            bias: AtomicIsize::new(0),
        }
    }

    /// The fast path: adds `delta` and returns `true` if the pending delta
    /// stays within `slack`; otherwise changes nothing and returns `false`
    /// (the caller folds). Always `false` for a count that is not listed.
    #[inline(always)]
    pub(crate) fn add(&self, delta: isize, slack: usize) -> bool {
        // Relaxed: only this thread writes its level.
        let level = self.level.load(Relaxed).wrapping_add(delta);
        // `0 <= level <= 2 * slack` as one unsigned compare: a negative
        // level is above `isize::MAX` as a `usize`. (`slack <= MAX_SLACK`,
        // so `2 * slack` cannot overflow.) `OUTSIDE` never passes.
        if level as usize <= slack * 2 {
            // Release: see "Atomic orderings".
            self.level.store(level, Release);
            true
        } else {
            false
        }
    }

    /// [`Self::add`] for a free of `size` bytes. A free only lowers the
    /// level, so only the window's lower end can be crossed, and
    /// `level < 0` is the sign flag of the subtraction itself: one
    /// instruction fewer. `OUTSIDE` minus any size is negative too.
    #[inline(always)]
    pub(crate) fn take(&self, size: usize) -> bool {
        // Relaxed: only this thread writes its level.
        let level = self.level.load(Relaxed).wrapping_sub(size as isize);
        if level >= 0 {
            // Release: see "Atomic orderings".
            self.level.store(level, Release);
            true
        } else {
            false
        }
    }

    /// The pending delta, for a reading. Acquire: pairs with the Release
    /// stores of the level (see "Atomic orderings"); the bias is stored
    /// before the level it goes with.
    pub(crate) fn pending(&self) -> isize {
        let level = self.level.load(Acquire);
        level.wrapping_sub(self.bias.load(Relaxed))
    }

    /// Moves the pending delta plus `delta` into `total` and leaves the
    /// count empty, biased by `slack`. Returns the new total. Owner only.
    pub(crate) fn fold_into(&self, total: &AtomicIsize, delta: isize, slack: usize) -> isize {
        // Relaxed: owner-only words.
        let bias = self.bias.load(Relaxed);
        let level = self.level.load(Relaxed).wrapping_add(delta);
        // Fold first, then empty: see "Atomic orderings".
        let now = add(total, level.wrapping_sub(bias));
        self.empty(slack);
        now
    }

    /// Moves what is pending into `total` and empties the count under its
    /// current bias, for an exiting thread. Returns the new total.
    pub(crate) fn drain_into(&self, total: &AtomicIsize) -> isize {
        let now = add(total, self.pending());
        // Relaxed load: owner-only word. Release store: see "Atomic
        // orderings".
        self.level.store(self.bias.load(Relaxed), Release);
        now
    }

    /// Pending 0, biased by `slack`: the count of a thread just listed or
    /// just folded. Owner only.
    pub(crate) fn empty(&self, slack: usize) {
        let slack = slack as isize;
        // Relaxed: owner-only word.
        let bias = self.bias.load(Relaxed);
        if bias != slack {
            // Pending 0 under the old bias, then under the new one: a reader
            // between the stores is off by `bias - slack` for an instant, as
            // with any delta in flight.
            self.level.store(bias, Release);
            self.bias.store(slack, Relaxed);
        }
        self.level.store(slack, Release);
    }

    /// Back outside every window, for a count that is no longer listed (or
    /// never was). Owner only; nobody reads it any more.
    pub(crate) fn close(&self) {
        self.level.store(OUTSIDE, Relaxed);
        self.bias.store(0, Relaxed);
    }
}

/// Adds `delta` to `total` and returns the result. Relaxed: the total is a
/// statistic; the Release store of the level that follows every fold, and
/// the latch's own compare-and-swap, carry the orderings that matter.
#[inline]
pub(crate) fn add(total: &AtomicIsize, delta: isize) -> isize {
    total.fetch_add(delta, Relaxed).wrapping_add(delta)
}

/// Model checks: every interleaving loom can find of a fold racing with a
/// reading. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::Count;
    use loom::sync::atomic::{AtomicIsize, AtomicUsize};
    use loom::sync::Arc;
    use loom::thread;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

    const SLACK: usize = 150;
    /// Two allocations of 100 bytes (the second folds 200 into the total),
    /// a free of 50 and an allocation of 10: every kind of store of a level
    /// comes after the fold.
    const OPS: [isize; 4] = [100, 100, -50, 10];
    /// What the fold moves.
    const FOLDED: isize = 200;

    /// The true total after the first `n` operations.
    fn counted(n: usize) -> isize {
        OPS[..n].iter().sum()
    }

    /// A thread counts `OPS`; a reader takes one reading as the reading
    /// does (every pending delta, then the total). Whatever the
    /// interleaving, it reads at least the smallest true total of any
    /// moment after it started, and at most the largest plus what the fold
    /// moved (counted twice for that instant).
    #[test]
    fn a_reading_never_misses_what_a_fold_moved() {
        loom::model(|| {
            let total = Arc::new(AtomicIsize::new(0));
            let count = Arc::new(Count::outside());
            count.empty(SLACK);
            let done = Arc::new(AtomicUsize::new(0));
            let owner = {
                let (total, count, done) = (total.clone(), count.clone(), done.clone());
                thread::spawn(move || {
                    for (i, &delta) in OPS.iter().enumerate() {
                        let fast = if delta > 0 {
                            count.add(delta, SLACK)
                        } else {
                            count.take(delta.unsigned_abs())
                        };
                        if !fast {
                            count.fold_into(&total, delta, SLACK);
                        }
                        done.store(i + 1, Release);
                    }
                })
            };
            let started = done.load(Acquire);
            let reading = count.pending().wrapping_add(total.load(Relaxed));
            owner.join().unwrap();
            let low = (started..=OPS.len()).map(counted).min().unwrap();
            let high = (started..=OPS.len()).map(counted).max().unwrap();
            assert!(reading >= low, "read {reading}, below {low}");
            assert!(
                reading <= high + FOLDED,
                "read {reading}, above {high} + {FOLDED}"
            );
            // Quiescent: exact.
            assert_eq!(count.pending() + total.load(Relaxed), counted(OPS.len()));
        });
    }
}
