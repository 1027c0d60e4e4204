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
//! before the reading started. (A thread that counts through two `MemWatch`
//! instances with different slacks re-biases its count; a reading at that
//! instant can be off by the difference of the slacks, either way.)
//!
//! A fold adds to the total, then issues a Release fence, then stores the
//! count's new level; the reader loads each level with Acquire. A Release
//! fence synchronizes with an Acquire load that reads the value of any store
//! sequenced after the fence, so a reader that sees a level written after a
//! fold (by the fold itself or by any later fast-path update) also sees that
//! fold in the total it loads next. The fence is on the cold path only (on
//! x86-64 it emits no instruction); the fast path's store stays Relaxed.
//! Everything else is Relaxed: only the owning thread writes its count, so
//! it reads its own last stores, and the total is a statistic.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicIsize};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicIsize};

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
            // Relaxed: only this thread writes its level; the fence of the
            // last fold orders this store for readers.
            self.level.store(level, Relaxed);
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
            // Relaxed: only this thread writes its level; the fence of the
            // last fold orders this store for readers.
            self.level.store(level, Relaxed);
            true
        } else {
            false
        }
    }

    /// The pending delta, for a reading. Acquire: pairs with the Release
    /// fence of the last fold (see "Atomic orderings"). The two words are
    /// read apart, so while the owner changes its bias (see [`Self::empty`])
    /// the result can be off by the change, for that instant.
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
        // Fold, fence, then empty: see "Atomic orderings".
        let now = add_to(total, level.wrapping_sub(bias));
        fence(Release);
        self.empty(slack);
        now
    }

    /// Moves what is pending into `total` and empties the count under its
    /// current bias, for an exiting thread. Returns the new total.
    pub(crate) fn drain_into(&self, total: &AtomicIsize) -> isize {
        let now = add_to(total, self.pending());
        // Fold, fence, then empty: see "Atomic orderings". Relaxed: an
        // owner-only word.
        fence(Release);
        self.level.store(self.bias.load(Relaxed), Relaxed);
        now
    }

    /// Pending 0, biased by `slack`: the count of a thread just listed or
    /// just folded. Owner only; Relaxed throughout, ordered for readers by
    /// the fence of the fold before it or by the listing after it.
    pub(crate) fn empty(&self, slack: usize) {
        let slack = slack as isize;
        let bias = self.bias.load(Relaxed);
        if bias != slack {
            // Pending 0 under the old bias, then under the new one. A reader
            // that loads the level and the bias on either side of a store
            // here is off by `bias - slack`, either way, for that instant.
            // Only a thread that counts through two `MemWatch` instances
            // with different slacks ever gets here.
            self.level.store(bias, Relaxed);
            self.bias.store(slack, Relaxed);
        }
        self.level.store(slack, Relaxed);
    }

    /// Back outside every window, for a count that is no longer listed (or
    /// never was). Owner only; nobody reads it any more.
    pub(crate) fn close(&self) {
        self.level.store(OUTSIDE, Relaxed);
        self.bias.store(0, Relaxed);
    }
}

/// How much of a running net count kept elsewhere (jemalloc's per-thread
/// counters, for [`crate::jemalloc_count`]) has been folded into the total:
/// the same protocol as [`Count`]'s fold, for a count this crate only reads.
#[cfg(any(loom, all(feature = "jemalloc", target_pointer_width = "64")))]
pub(crate) struct Folded {
    /// The net count as of the last fold. Written only by the owner.
    folded: AtomicIsize,
}

#[cfg(any(loom, all(feature = "jemalloc", target_pointer_width = "64")))]
impl Folded {
    /// Nothing folded yet.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Folded {
            folded: AtomicIsize::new(0),
        }
    }

    /// Nothing folded yet (loom's atomics have no `const` constructor).
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Folded {
            folded: AtomicIsize::new(0),
        }
    }

    /// What a reading adds: `net()`, the running count read now, minus what
    /// was folded. `net` is called after `folded` is loaded: the count only
    /// moves on past what a fold saw.
    pub(crate) fn unfolded(&self, net: impl FnOnce() -> isize) -> isize {
        // Acquire pairs with the Release fence in `fold_into`: a reading
        // that sees a fold's `folded` also sees that fold in the total it
        // loads afterwards.
        let folded = self.folded.load(Acquire);
        net().wrapping_sub(folded)
    }

    /// Folds the running count `net` into `total`; returns the new total, or
    /// `None` if nothing changed since the last fold. Owner only.
    pub(crate) fn fold_into(&self, total: &AtomicIsize, net: isize) -> Option<isize> {
        // Relaxed: only the owner writes `folded`.
        let delta = net.wrapping_sub(self.folded.load(Relaxed));
        if delta == 0 {
            return None;
        }
        // Fold, fence, then record: see "Atomic orderings".
        let now = add_to(total, delta);
        fence(Release);
        self.folded.store(net, Relaxed);
        Some(now)
    }

    /// How much of the running count `net` is not folded yet. Owner only.
    #[cfg(not(loom))]
    pub(crate) fn pending(&self, net: isize) -> isize {
        // Relaxed: only the owner writes `folded`.
        net.wrapping_sub(self.folded.load(Relaxed))
    }

    /// Nothing folded, for a count just listed. Owner only, before listing.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.folded.store(0, Relaxed);
    }
}

/// Adds `delta` to `total` and returns the result. Relaxed: the total is a
/// statistic; the Release fence that follows every fold of a count, and the
/// latch's own compare-and-swap, carry the orderings that matter.
#[inline]
pub(crate) fn add_to(total: &AtomicIsize, delta: isize) -> isize {
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

    /// The true total after the first `n` of `ops`.
    fn counted(ops: &[(isize, usize)], n: usize) -> isize {
        ops[..n].iter().map(|&(delta, _)| delta).sum()
    }

    /// A thread counts `ops` (each a delta and the slack it is counted
    /// with); a reader takes one reading as the reading does (every pending
    /// delta, then the total). Whatever the interleaving, it reads at least
    /// the smallest true total of any moment after it started, and at most
    /// the largest plus `folded`, what a fold moves (counted twice for that
    /// instant); `tear` widens both bounds, for a change of bias. Once the
    /// thread is done, the reading is exact.
    fn check(ops: &'static [(isize, usize)], folded: isize, tear: isize) {
        loom::model(move || {
            let total = Arc::new(AtomicIsize::new(0));
            let count = Arc::new(Count::outside());
            count.empty(ops[0].1);
            let done = Arc::new(AtomicUsize::new(0));
            let owner = {
                let (total, count, done) = (total.clone(), count.clone(), done.clone());
                thread::spawn(move || {
                    for (i, &(delta, slack)) in ops.iter().enumerate() {
                        let fast = if delta > 0 {
                            count.add(delta, slack)
                        } else {
                            count.take(delta.unsigned_abs())
                        };
                        if !fast {
                            count.fold_into(&total, delta, slack);
                        }
                        done.store(i + 1, Release);
                    }
                })
            };
            let started = done.load(Acquire);
            let reading = count.pending().wrapping_add(total.load(Relaxed));
            owner.join().unwrap();
            let low = (started..=ops.len()).map(|n| counted(ops, n)).min();
            let high = (started..=ops.len()).map(|n| counted(ops, n)).max();
            let (low, high) = (low.unwrap(), high.unwrap());
            assert!(
                reading >= low - tear,
                "read {reading}, below {low} - {tear}"
            );
            assert!(
                reading <= high + folded + tear,
                "read {reading}, above {high} + {folded} + {tear}"
            );
            let exact = count.pending() + total.load(Relaxed);
            assert_eq!(exact, counted(ops, ops.len()));
        });
    }

    /// A running count kept elsewhere (jemalloc's counters, written by
    /// their owner alone) moves by `deltas`; the owner folds it after each
    /// step whose flag is set, as jemalloc's callback does. A reader takes
    /// one reading as `jemalloc_count` does (the unfolded count, then the
    /// total): at least the smallest true count of any moment after it
    /// started, at most the largest plus one fold; exact once done.
    fn check_folded(steps: &'static [(isize, bool)], fold: isize) {
        use super::Folded;
        loom::model(move || {
            let total = Arc::new(AtomicIsize::new(0));
            let net = Arc::new(AtomicIsize::new(0));
            let folded = Arc::new(Folded::new());
            let done = Arc::new(AtomicUsize::new(0));
            let owner = {
                let (total, net, folded, done) =
                    (total.clone(), net.clone(), folded.clone(), done.clone());
                thread::spawn(move || {
                    let mut mine = 0;
                    for (i, &(delta, fold)) in steps.iter().enumerate() {
                        mine += delta;
                        net.store(mine, Relaxed);
                        if fold {
                            folded.fold_into(&total, mine);
                        }
                        done.store(i + 1, Release);
                    }
                })
            };
            let truth = |n: usize| steps[..n].iter().map(|s| s.0).sum::<isize>();
            let started = done.load(Acquire);
            let reading = folded
                .unfolded(|| net.load(Relaxed))
                .wrapping_add(total.load(Relaxed));
            owner.join().unwrap();
            let low = (started..=steps.len()).map(truth).min().unwrap();
            let high = (started..=steps.len()).map(truth).max().unwrap();
            assert!(reading >= low, "read {reading}, below {low}");
            assert!(
                reading <= high + fold,
                "read {reading}, above {high} + {fold}"
            );
            let exact = folded.unfolded(|| net.load(Relaxed)) + total.load(Relaxed);
            assert_eq!(exact, truth(steps.len()));
        });
    }

    /// 100 allocated and folded, 100 more and folded, 50 freed, 10
    /// allocated: every kind of move of the count comes after a fold.
    #[test]
    fn a_reading_of_a_count_kept_elsewhere_never_misses_a_fold() {
        check_folded(&[(100, true), (100, true), (-50, false), (10, false)], 200);
    }

    /// Two allocations of 100 bytes with a slack of 150 (the second folds
    /// 200 into the total), a free of 50 and an allocation of 10: every
    /// kind of store of a level comes after the fold.
    #[test]
    fn a_reading_never_misses_what_a_fold_moved() {
        check(&[(100, 150), (100, 150), (-50, 150), (10, 150)], 200, 0);
    }

    /// The second allocation comes through an allocator with a slack of 20
    /// instead of 150, and the fourth through one with 150 again: each fold
    /// re-biases the count. A reading at that instant is off by at most the
    /// difference, 130, either way (the bound the module docs state).
    #[test]
    fn a_change_of_bias_tears_a_reading_by_at_most_the_difference() {
        check(&[(100, 150), (100, 20), (10, 20), (300, 150)], 310, 130);
    }
}
