//! One thread's published count: the word a reading sums, and how it moves
//! into the shared total without a concurrent reading losing it.
//!
//! Slots live in the thread table ([`super::table`]), in memory that is
//! never freed, so a reader may load any slot at any time: no pointer into
//! another thread's stack or thread-local block is ever followed.
//!
//! # Atomic orderings
//!
//! The promise: a reading that sums every slot's pending delta and then
//! loads the total never misses bytes that a fold moved from one to the
//! other while it ran. It may count them twice for that instant, which the
//! reading's documented error already covers.
//!
//! A fold adds to the total, issues a Release fence, then stores the slot's
//! new level; a reader loads each level with Acquire and the total after
//! them. A Release fence synchronizes with an Acquire load that reads any
//! store sequenced after it, so a reader that sees a level written after a
//! fold also sees that fold in the total. The fence is on the cold path only
//! (on x86-64 it emits no instruction); the owner's other stores are Relaxed:
//! only the owner writes its slot's level, so it reads its own last stores.

use crate::sync::{fence, AtomicBool, AtomicIsize, AtomicUsize};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// The level of a slot that counts nothing: so far outside any window that
/// every update misses the fast path. With the slack at most
/// [`crate::MAX_SLACK`], `2 * slack < 2^62`, and no delta of an allocation
/// that can succeed brings `isize::MIN / 2` into `0..=2 * slack`.
const OUTSIDE: isize = isize::MIN / 2;

/// One thread's pending delta, on a cache line of its own: memwatch's own
/// count writes it on every call, and no other thread's slot may share the
/// line (128 bytes: two 64-byte lines, which x86's adjacent-line prefetcher
/// fetches as a pair; crossbeam's `CachePadded` uses the same figure).
///
/// The delta is kept biased: `level = pending + bias`, with `bias` the
/// window the owner chose at its last fold. The window `-bias <= pending <=
/// bias` then reads `0 <= level <= limit` (`limit = 2 * bias`), one
/// unsigned compare. A slot that only publishes (over jemalloc) keeps a
/// bias of 0.
#[repr(align(128))]
pub(crate) struct Slot {
    /// `pending + bias`. Written only by the owner.
    level: AtomicIsize,
    /// The window the level is biased by. Written only by the owner, off
    /// the fast path.
    bias: AtomicIsize,
    /// `2 * bias`: the fast path's bound. Written only by the owner, off the
    /// fast path; 0 (with the level far outside) for a slot of no thread.
    limit: AtomicUsize,
    /// Whether a thread owns the slot (see [`super::table`]).
    pub(super) taken: AtomicBool,
}

impl Slot {
    /// A slot that counts nothing: every update misses the fast path.
    #[cfg(not(loom))]
    pub(crate) const fn outside() -> Self {
        Slot {
            level: AtomicIsize::new(OUTSIDE),
            bias: AtomicIsize::new(0),
            limit: AtomicUsize::new(0),
            taken: AtomicBool::new(false),
        }
    }

    /// A slot that counts nothing (loom's atomics have no `const`
    /// constructor).
    #[cfg(loom)]
    pub(crate) fn outside() -> Self {
        Slot {
            level: AtomicIsize::new(OUTSIDE),
            bias: AtomicIsize::new(0),
            limit: AtomicUsize::new(0),
            taken: AtomicBool::new(false),
        }
    }

    /// The fast path: adds `delta` and returns `true` if the pending delta
    /// stays within the window; otherwise changes nothing and returns
    /// `false` (the caller folds). Always `false` for a slot outside every
    /// window.
    #[inline(always)]
    pub(crate) fn add(&self, delta: isize) -> bool {
        // Relaxed: only the owner writes its level and limit.
        let level = self.level.load(Relaxed).wrapping_add(delta);
        // `0 <= level <= limit` as one unsigned compare: a negative level is
        // above `isize::MAX` as a `usize`.
        if level as usize <= self.limit.load(Relaxed) {
            // Relaxed: the fence of the last fold orders it for readers.
            self.level.store(level, Relaxed);
            true
        } else {
            false
        }
    }

    /// [`Self::add`] for a free of `size` bytes: only the window's lower end
    /// can be crossed, and `level < 0` is the sign of the subtraction itself.
    #[inline(always)]
    pub(crate) fn take(&self, size: usize) -> bool {
        // Relaxed: only the owner writes its level.
        let level = self.level.load(Relaxed).wrapping_sub(size as isize);
        if level >= 0 {
            // Relaxed: the fence of the last fold orders it for readers.
            self.level.store(level, Relaxed);
            true
        } else {
            false
        }
    }

    /// The pending delta, for a reading. Acquire: pairs with the Release
    /// fence of the last fold. While the owner changes its bias (two
    /// allocators with different slacks) the result can be off by the
    /// change, for that instant.
    pub(crate) fn pending(&self) -> isize {
        let level = self.level.load(Acquire);
        level.wrapping_sub(self.bias.load(Relaxed))
    }

    /// Moves the pending delta plus `delta` into `total`, leaving the slot
    /// empty with a window of `window`. Returns the new total. Owner only.
    pub(crate) fn fold_into(&self, total: &AtomicIsize, delta: isize, window: usize) -> isize {
        // Relaxed: owner-only words.
        let bias = self.bias.load(Relaxed);
        let level = self.level.load(Relaxed).wrapping_add(delta);
        let now = add_to(total, level.wrapping_sub(bias));
        fence(Release);
        self.empty(window);
        now
    }

    /// Moves `amount` of what the owner's count kept elsewhere has not
    /// folded yet into `total`, and publishes the rest, `left`, as the
    /// slot's delta. Returns the new total. Owner only.
    ///
    /// A reading that loads the slot before the new delta is stored and the
    /// total after the add counts `amount` twice for that instant; one that
    /// sees the new delta sees the add too (the Release fence), so it is
    /// never missed.
    #[cfg_attr(not(any(loom, memwatch_jemalloc_counts)), allow(dead_code))]
    pub(crate) fn fold_published(&self, total: &AtomicIsize, amount: isize, left: isize) -> isize {
        let now = add_to(total, amount);
        fence(Release);
        self.publish(left);
        now
    }

    /// Publishes `pending` as the slot's delta (bias 0), for a count kept
    /// elsewhere that the owner reads itself. Owner only; ordered for
    /// readers by the fence of the fold before it.
    #[cfg_attr(not(any(loom, memwatch_jemalloc_counts)), allow(dead_code))]
    #[inline]
    pub(crate) fn publish(&self, pending: isize) {
        // Relaxed: see above.
        self.level.store(pending, Relaxed);
    }

    /// Pending 0 with a window of `window` bytes either way: a slot just
    /// claimed or just folded. Owner only.
    pub(crate) fn empty(&self, window: usize) {
        let window = window as isize;
        // Relaxed: owner-only words, ordered for readers by the fold's
        // fence or by the claim's Release.
        let bias = self.bias.load(Relaxed);
        if bias != window {
            // Pending 0 under the old bias, then under the new one: a reader
            // between the two stores is off by `bias - window` for that
            // instant.
            self.level.store(bias, Relaxed);
            self.bias.store(window, Relaxed);
            self.limit.store(2 * window as usize, Relaxed);
        }
        self.level.store(window, Relaxed);
    }

    /// Back outside every window: the slot of no thread. Owner only, after
    /// the last fold.
    pub(crate) fn close(&self) {
        // Relaxed: pending stays 0 under the current bias until the level
        // leaves it, and nobody reads a free slot (see `table`).
        let bias = self.bias.load(Relaxed);
        self.level.store(bias, Relaxed);
    }

    /// Moves what is pending into `total` and leaves pending 0. Returns the
    /// new total. Owner only (or the only thread left, after `fork`).
    pub(crate) fn drain_into(&self, total: &AtomicIsize) -> isize {
        let now = add_to(total, self.pending());
        fence(Release);
        self.close();
        now
    }
}

/// Adds `delta` to `total` and returns the result. Relaxed: the total is a
/// statistic; the Release fence after every fold and the latch's own
/// compare-and-swap carry the orderings that matter.
#[inline]
pub(crate) fn add_to(total: &AtomicIsize, delta: isize) -> isize {
    total.fetch_add(delta, Relaxed).wrapping_add(delta)
}

/// Model checks: every interleaving loom can find of a fold racing with a
/// reading. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::Slot;
    use loom::sync::atomic::{AtomicIsize, AtomicUsize};
    use loom::sync::Arc;
    use loom::thread;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

    /// The true total after the first `n` of `ops`.
    fn counted(ops: &[(isize, usize)], n: usize) -> isize {
        ops[..n].iter().map(|&(delta, _)| delta).sum()
    }

    /// A thread counts `ops` (each a delta and the slack it is counted
    /// with); a reader takes one reading (the pending delta, then the
    /// total). It reads at least the smallest true total of any moment after
    /// it started and at most the largest plus `folded` (counted twice for
    /// that instant); `tear` widens both bounds, for a change of bias. Once
    /// the thread is done, the reading is exact.
    fn check(ops: &'static [(isize, usize)], folded: isize, tear: isize) {
        loom::model(move || {
            let total = Arc::new(AtomicIsize::new(0));
            let slot = Arc::new(Slot::outside());
            slot.empty(ops[0].1);
            let done = Arc::new(AtomicUsize::new(0));
            let owner = {
                let (total, slot, done) = (total.clone(), slot.clone(), done.clone());
                thread::spawn(move || {
                    for (i, &(delta, slack)) in ops.iter().enumerate() {
                        let fast = if delta > 0 {
                            slot.add(delta)
                        } else {
                            slot.take(delta.unsigned_abs())
                        };
                        if !fast {
                            slot.fold_into(&total, delta, slack);
                        }
                        done.store(i + 1, Release);
                    }
                })
            };
            let started = done.load(Acquire);
            let reading = slot.pending().wrapping_add(total.load(Relaxed));
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
            assert_eq!(
                slot.pending() + total.load(Relaxed),
                counted(ops, ops.len())
            );
        });
    }

    /// Two allocations of 100 bytes with a slack of 150 (the second folds
    /// 200), a free of 50 and an allocation of 10: every kind of store of a
    /// level comes after the fold.
    #[test]
    fn a_reading_never_misses_what_a_fold_moved() {
        check(&[(100, 150), (100, 150), (-50, 150), (10, 150)], 200, 0);
    }

    /// The second allocation comes through an allocator with a slack of 20
    /// instead of 150: each fold re-biases the slot, and a reading at that
    /// instant is off by at most the difference, 130.
    #[test]
    fn a_change_of_bias_tears_a_reading_by_at_most_the_difference() {
        check(&[(100, 150), (100, 20), (10, 20), (300, 150)], 310, 130);
    }

    /// A count kept elsewhere (jemalloc's) moves by `steps`; after each the
    /// owner publishes what is not folded, folding all but 30 bytes of it
    /// where the flag is set (the rest stays published). A reading (the slot, then the total) never misses a fold and is
    /// exact once the owner is done.
    #[test]
    fn a_reading_of_a_published_count_never_misses_a_fold() {
        const STEPS: [(isize, bool); 4] = [(100, true), (100, true), (-50, false), (10, false)];
        loom::model(|| {
            let total = Arc::new(AtomicIsize::new(0));
            let slot = Arc::new(Slot::outside());
            slot.empty(0);
            let done = Arc::new(AtomicUsize::new(0));
            let owner = {
                let (total, slot, done) = (total.clone(), slot.clone(), done.clone());
                thread::spawn(move || {
                    let (mut net, mut folded) = (0, 0);
                    for (i, &(delta, fold)) in STEPS.iter().enumerate() {
                        net += delta;
                        if fold {
                            // Folds all but 30: the rest stays published.
                            slot.fold_published(&total, net - folded - 30, 30);
                            folded = net - 30;
                        } else {
                            slot.publish(net - folded);
                        }
                        done.store(i + 1, Release);
                    }
                })
            };
            let truth = |n: usize| STEPS[..n].iter().map(|s| s.0).sum::<isize>();
            let started = done.load(Acquire);
            let reading = slot.pending().wrapping_add(total.load(Relaxed));
            owner.join().unwrap();
            let low = (started..=STEPS.len()).map(truth).min().unwrap();
            let high = (started..=STEPS.len()).map(truth).max().unwrap();
            assert!(reading >= low, "read {reading}, below {low}");
            assert!(reading <= high + 200, "read {reading}, above {high} + 200");
            assert_eq!(slot.pending() + total.load(Relaxed), truth(STEPS.len()));
        });
    }
}
