//! Over jemalloc on Linux, the count is jemalloc's own: it adds the usable
//! size of every allocation to a per-thread counter, and of every free to
//! another, on its fast path anyway (`thread.allocated` and
//! `thread.deallocated` in its `mallctl` names, maintained by every
//! jemalloc 5.3 build). memwatch reads them, on the thread that owns them,
//! and publishes what moved:
//!
//! - at every **look** the thread reads its two counters, publishes in its
//!   slot the part of their net that the shared total does not hold yet
//!   (its pending; once that exceeds the thread's allowance either way, it
//!   folds the excess into the total) and sets two **credits**, one
//!   for allocations and one for frees, to its interval (the floor plus its
//!   allowance, at most the slack);
//! - the fast path of an allocation takes the call's weight (its size plus
//!   16) from the allocation credit, a free from the free credit, and jumps
//!   into jemalloc unless the credit ran out (a subtraction from a
//!   thread-local word and a branch on its borrow: the whole of memwatch's
//!   part). A call the credit does not cover goes to the cold path, which
//!   makes the call and then looks;
//! - jemalloc's usable size is at most 1.25 times a call's weight, and the
//!   two credits never add back what the other side took, so between two
//!   looks each counter moves by less than 1.25 times the interval,
//!   **whatever the sizes, alignments, reallocations and cross-thread
//!   frees** (docs/design.md, "The error bound");
//! - a thread's first call through the allocator, whatever started the
//!   thread, finds credits of 0, so it goes to the cold path, which claims a
//!   slot and reads the addresses of the thread's two counters;
//! - at the thread's end, what is left is folded and the slot freed.
//!
//! Only the owner ever reads its jemalloc counters, so no memory that
//! another thread writes non-atomically is read; readers sum the slots,
//! which the owner writes atomically.
//!
//! Calls of a thread that has no slot (while it joins, past its end, or
//! when the kernel refuses the table memory) count the usable size that
//! jemalloc reports for the block, straight into the total.
//!
//! This relies on no experimental jemalloc control, so it works the same on
//! tikv-jemalloc-sys 0.6 (jemalloc 5.3.0) and 0.7 (5.3.1).

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::Ordering::Relaxed;

use tikv_jemalloc_sys as sys;

use super::slot::Slot;
use super::state::{ACTIVE, DIRECT, REGISTERING, UNREGISTERED};
use super::table::Table;
use super::{claim, fold, give_back, observe, settle, thread_joined, thread_left, TOTAL};
use crate::sync::{AtomicBool, AtomicUsize};

/// The least interval between two looks, whatever the thread's allowance
/// (a thread of a process with many threads may hold none): 48 KiB. Each
/// thread's unpublished count then stays below 1.25 × 48 KiB, under
/// 64 KiB, beside its share of the budget's pool.
pub(crate) const FLOOR: usize = 48 << 10;

/// The interval of a thread that holds `allowance` from the pool, for an
/// allocator with `slack`: the floor plus the allowance, never more than
/// the slack (a slack of 0 looks after every call).
#[inline]
pub(crate) const fn interval(allowance: usize, slack: usize) -> usize {
    let wide = FLOOR + allowance;
    if slack < wide {
        slack
    } else {
        wide
    }
}

/// The most a thread with `interval` can hold unpublished, either way:
/// the calls it made since its last look weigh less than the interval, and
/// their usable sizes are at most 1.25 times their weight (see [`weight`]).
#[cfg(test)]
pub(crate) const fn unpublished_bound(interval: usize) -> usize {
    interval + interval / 4
}

/// What the counters of a thread that counts nothing point at: 0 (it has
/// credits of 0 too, so that every call misses the fast path).
static NOT_COUNTING: u64 = 0;

/// The slots of threads whose jemalloc counters memwatch reads.
static TABLE: Table = Table::new();

/// The calling thread's words, in one thread-local so that code touching
/// several of them computes the thread-local address once.
struct Thread {
    /// What the thread's allocations may still weigh before it looks: the
    /// interval at its last look, less the weight of every allocation
    /// since. 0 while the thread counts nothing, so that every call goes to
    /// the cold path (which also puts back a credit that a call took below
    /// zero).
    alloc_credit: Cell<u64>,
    /// The same for frees.
    free_credit: Cell<u64>,
    /// jemalloc's `thread.allocated` of this thread, or [`NOT_COUNTING`].
    allocated: Cell<*const u64>,
    /// jemalloc's `thread.deallocated` of this thread, or [`NOT_COUNTING`].
    deallocated: Cell<*const u64>,
    /// The two counters at the last look, and the interval set then: what
    /// a C call, which has no size to weigh before it, is checked against
    /// after it.
    looked: Cell<(u64, u64)>,
    step: Cell<u64>,
    state: Cell<u8>,
    slot: Cell<*const Slot>,
    /// The part of `allocated - deallocated` that the total holds: the
    /// net at the join plus every fold since.
    folded: Cell<u64>,
    /// What the thread holds from the budget's pool: its pending stays
    /// within it, and its interval is the floor plus it.
    allowance: Cell<usize>,
    /// The slack of the allocator that made the thread's last look: what a
    /// look from outside a call (a reading, a C call) decides with.
    slack: Cell<usize>,
}

thread_local! {
    // A `const` initialiser and no `Drop`: plain thread-local words, usable
    // at any point of a thread's life.
    static THREAD: Thread = const {
        Thread {
            alloc_credit: Cell::new(0),
            free_credit: Cell::new(0),
            allocated: Cell::new(&NOT_COUNTING),
            deallocated: Cell::new(&NOT_COUNTING),
            looked: Cell::new((0, 0)),
            step: Cell::new(0),
            state: Cell::new(UNREGISTERED),
            slot: Cell::new(ptr::null()),
            folded: Cell::new(0),
            allowance: Cell::new(0),
            slack: Cell::new(UNKNOWN),
        }
    };
}

/// The slack of the allocator that made the last join through a Rust call:
/// what a thread that joins through a C call ([`crate::c_heap!`]) decides
/// with. Relaxed: a process has one global allocator, so one slack.
static SLACK: AtomicUsize = AtomicUsize::new(UNKNOWN);

/// [`SLACK`] before any Rust call has looked, and the slack of a thread
/// that joined through a C call then: until a Rust call tells the slack,
/// such a thread looks and folds after every call (exact, as a slack of 0
/// is), and the first Rust call of any thread, finding no credit, looks and
/// tells it.
const UNKNOWN: usize = usize::MAX;

/// The alignment jemalloc gives every block without being asked (C's
/// `max_align_t`): tikv-jemallocator calls plain `malloc` for blocks
/// aligned to at most this and at most their size.
const PLAIN_ALIGN: usize = if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
    16
} else {
    8
};

/// Whether jemalloc serves `layout` through its plain entry points, as the
/// fast path does.
#[inline(always)]
pub(crate) const fn plain(layout: Layout) -> bool {
    layout.align() <= PLAIN_ALIGN && layout.align() <= layout.size()
}

/// What a call of `layout` weighs against a credit: its size plus 16, and
/// for an aligned block its alignment too (and 256 KiB more past 4 KiB).
/// jemalloc's usable size for it is at most 1.25 times that: a request of up
/// to 8 bytes gets 8, up to 128 bytes a multiple of 16, a larger one one of
/// four classes per doubling (or, on 5.3.1, a large one whole pages, which
/// is finer), so less than a quarter more; an aligned one is first padded to
/// its alignment, and one aligned past a page is a large block of at least
/// four pages (the 256 KiB covers pages of up to 64 KiB).
#[inline(always)]
pub(crate) const fn weight(layout: Layout) -> u64 {
    let size = layout.size() as u64 + 16;
    if plain(layout) {
        size
    } else if layout.align() <= 4096 {
        size + layout.align() as u64
    } else {
        size + layout.align() as u64 + (256 << 10)
    }
}

/// The fast path of an allocation of `layout`: takes its weight from the
/// thread's allocation credit and returns whether the credit covered it,
/// so that the call may go straight to jemalloc. Only plain blocks: the
/// compiler then knows that the call into jemalloc that follows is plain
/// `malloc`, and merges the two tests. A call the credit does not cover
/// leaves it below zero (wrapped) for the cold path to set again.
#[inline(always)]
pub(crate) fn add(layout: Layout) -> bool {
    plain(layout) && THREAD.with(|t| spend(&t.alloc_credit, layout.size() as u64 + 16))
}

/// The fast path of a free of `layout`: the same on the free credit.
#[inline(always)]
pub(crate) fn take(layout: Layout) -> bool {
    plain(layout) && THREAD.with(|t| spend(&t.free_credit, layout.size() as u64 + 16))
}

/// The fast path of a reallocation of a block of `layout` to `new_size`
/// bytes: jemalloc moves the allocated counter by the new block and the
/// deallocated one by the old, so each weighs on its credit.
#[inline(always)]
pub(crate) fn resize(layout: Layout, new_size: usize) -> bool {
    // Plain at both sizes: tikv-jemallocator then calls plain `realloc`.
    plain(layout)
        && layout.align() <= new_size
        && THREAD.with(|t| {
            spend(&t.alloc_credit, new_size as u64 + 16)
                & spend(&t.free_credit, layout.size() as u64 + 16)
        })
}

/// Takes `weight` from `credit`; whether it covered it. Wrapping: a
/// request is at most `isize::MAX`, so a credit taken below zero wraps to
/// far above any interval, and the cold path, which every such call
/// reaches, sets it again.
#[inline(always)]
fn spend(credit: &Cell<u64>, weight: u64) -> bool {
    let (left, short) = credit.get().overflowing_sub(weight);
    credit.set(left);
    !short
}

/// What a call that missed the fast path does around the inner call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cold {
    /// An aligned call that its credit covers: the call alone.
    Fits,
    /// The call, then a look at the counters ([`look_now`]).
    Look,
    /// The thread has no slot: count the call by its usable size.
    CountItself,
}

/// Off the fast path, before an allocation of `layout` (or with `free`, a
/// free): makes sure the thread has a slot and says what the call does.
#[inline]
pub(crate) fn cold(layout: Layout, free: bool, slack: usize) -> Cold {
    if !joined(slack) {
        return Cold::CountItself;
    }
    if plain(layout) {
        return Cold::Look;
    }
    let fits = THREAD.with(|t| {
        let credit = if free {
            &t.free_credit
        } else {
            &t.alloc_credit
        };
        credit.get() >= weight(layout) && spend(credit, weight(layout))
    });
    if fits {
        Cold::Fits
    } else {
        Cold::Look
    }
}

/// Off the fast path, before a reallocation: [`Cold::Look`] or
/// [`Cold::CountItself`].
#[inline]
pub(crate) fn cold_resize(slack: usize) -> Cold {
    if joined(slack) {
        Cold::Look
    } else {
        Cold::CountItself
    }
}

/// After a cold call on a thread with a slot: a look with the allocator's
/// `slack`.
#[inline]
pub(crate) fn look_now(slack: usize) {
    // A thread that joined through a C call took the process's slack as it
    // stood then; the Rust calls keep it up to date for the next C join.
    note_slack(slack);
    THREAD.with(|t| {
        t.slack.set(slack);
        look(t);
    });
}

/// Whether the calling thread has a slot, joining if it never tried.
#[inline]
fn joined(slack: usize) -> bool {
    let joined = match THREAD.with(|t| t.state.get()) {
        ACTIVE => true,
        UNREGISTERED => join(slack),
        _ => false,
    };
    if !joined {
        // The fast path took the credits below zero: back to 0, so that
        // every call of a thread that counts nothing comes here.
        THREAD.with(|t| {
            t.alloc_credit.set(0);
            t.free_credit.set(0);
        });
    }
    joined
}

/// The `mallctl` names of the thread's two counters. A test build renames
/// them (`MEMWATCH_TEST_RENAME_COUNTERS` at build time), to check the
/// fallback when they are missing.
#[cfg(not(memwatch_counters_renamed))]
const COUNTERS: [&std::ffi::CStr; 2] = [c"thread.allocatedp", c"thread.deallocatedp"];
#[cfg(memwatch_counters_renamed)]
const COUNTERS: [&std::ffi::CStr; 2] = [c"thread.allocatedp.renamed", c"thread.deallocatedp"];

/// Set when a thread could not read its counters and counts every call
/// itself; the watchdog reports it.
static COUNTERS_MISSING: AtomicBool = AtomicBool::new(false);

/// Whether some thread found jemalloc's per-thread counters missing and
/// counts every call itself, into the shared total.
pub(crate) fn counters_missing() -> bool {
    // Relaxed: a report, read by the watchdog.
    COUNTERS_MISSING.load(Relaxed)
}

#[cold]
#[inline(never)]
fn join(slack: usize) -> bool {
    THREAD.with(|t| t.state.set(REGISTERING));
    note_slack(slack);
    crate::stats::note_jemalloc_inner();
    // SAFETY: jemalloc documents both as `uint64_t *`.
    let counters = unsafe { (read::<*mut u64>(COUNTERS[0]), read::<*mut u64>(COUNTERS[1])) };
    let (Some(a), Some(d)) = counters else {
        // Still counted: each call by its usable size, straight into the
        // total (one shared atomic per call). Relaxed: see the reader.
        COUNTERS_MISSING.store(true, Relaxed);
        THREAD.with(|t| t.state.set(DIRECT));
        return false;
    };
    let slot = match claim(&TABLE) {
        Ok(slot) => slot,
        Err(state) => {
            THREAD.with(|t| t.state.set(state));
            return false;
        }
    };
    slot.empty(0);
    THREAD.with(|t| {
        t.slot.set(slot);
        t.folded.set(counted(a, d));
        t.slack.set(slack);
        t.state.set(ACTIVE);
        // The counters last: the look below reads them and sets the credits.
        t.allocated.set(a);
        t.deallocated.set(d);
        look(t);
    });
    thread_joined();
    true
}

/// `*allocated - *deallocated` for the calling thread's own counters.
fn counted(allocated: *const u64, deallocated: *const u64) -> u64 {
    // SAFETY: the two pointers jemalloc gave for this very thread: they
    // point into its thread-specific data, which lives in the thread's
    // static thread-local block until the thread is gone. Only this thread
    // writes them (inside jemalloc's calls, which are not running now on
    // this thread), so a plain read is no race.
    unsafe { (*allocated).wrapping_sub(*deallocated) }
}

/// Publishes what the thread counted that the total does not hold, folding
/// the excess into the total once it exceeds the thread's allowance either
/// way, settles the allowance and sets both credits to its interval.
#[inline(always)]
fn look(t: &Thread) {
    #[cfg(test)]
    LOOKS.with(|l| l.set(l.get() + 1));
    let (a, d) = (t.allocated.get(), t.deallocated.get());
    // SAFETY: as in `counted`: an `ACTIVE` thread's own counters.
    let (allocated, deallocated) = unsafe { (*a, *d) };
    let net = allocated.wrapping_sub(deallocated);
    let pending = net.wrapping_sub(t.folded.get()) as isize;
    let slack = match t.slack.get() {
        UNKNOWN => match SLACK.load(Relaxed) {
            // Relaxed: see `SLACK`.
            UNKNOWN => 0,
            known => {
                t.slack.set(known);
                known
            }
        },
        slack => slack,
    };
    let held = t.allowance.get();
    let kept = settle(held, slack);
    // SAFETY: an `ACTIVE` thread's slot, claimed by it and held until it
    // frees it in `leave`; slots are never unmapped.
    let slot = unsafe { &*t.slot.get() };
    if pending.unsigned_abs() > kept {
        // Only the excess is folded: the pending stays at the edge of the
        // allowance it left, so a thread whose heap swings by less than
        // twice its allowance (a loop of blocks larger than its allowance,
        // each freed before the next) folds once and then never again.
        // `kept` is at most the slack, below `isize::MAX`.
        let edge = if pending > 0 {
            kept as isize
        } else {
            -(kept as isize)
        };
        fold_now(t, slot, pending - edge, edge);
    } else {
        slot.publish(pending);
    }
    // Given back only now: until the new pending was published, the old
    // one was within the old allowance.
    if kept < held {
        give_back(held - kept);
    }
    t.allowance.set(kept);
    let step = interval(kept, slack) as u64;
    t.alloc_credit.set(step);
    t.free_credit.set(step);
    t.looked.set((allocated, deallocated));
    t.step.set(step);
}

/// [`look`]'s fold, out of line: `amount` of the thread's pending into the
/// total, `left` of it published.
#[cold]
#[inline(never)]
fn fold_now(t: &Thread, slot: &Slot, amount: isize, left: isize) {
    t.folded.set(t.folded.get().wrapping_add(amount as u64));
    observe(slot.fold_published(&TOTAL, amount, left));
}

/// Before a call of the C library's allocation functions routed through
/// memwatch ([`crate::c_heap!`]): whether the calling thread has a slot,
/// joining if it never tried (with the slack of the process's allocator).
/// If not, the caller counts the call by its usable size
/// ([`count_itself`]).
#[inline]
pub(crate) fn c_ready() -> bool {
    // Relaxed: see `SLACK`.
    joined(SLACK.load(Relaxed))
}

/// After a C call on a thread with a slot (C gives no size for a free, so
/// the check comes after the call): a look once either counter has moved by
/// the interval since the last look; otherwise each credit is cut to what is
/// left of the interval, so that Rust calls after it cannot take the
/// counter further than Rust calls alone could. Between two calls both
/// counters stay within 1.25 times the interval of the last look, as for
/// Rust calls.
#[inline]
pub(crate) fn c_after() {
    THREAD.with(|t| {
        // SAFETY: as in `counted`: an `ACTIVE` thread's own counters.
        let (a, d) = unsafe { (*t.allocated.get(), *t.deallocated.get()) };
        let (la, ld) = t.looked.get();
        let step = t.step.get();
        let (moved_a, moved_d) = (a.wrapping_sub(la), d.wrapping_sub(ld));
        if moved_a >= step || moved_d >= step {
            look(t);
        } else {
            t.alloc_credit.set(t.alloc_credit.get().min(step - moved_a));
            t.free_credit.set(t.free_credit.get().min(step - moved_d));
        }
    });
}

/// Notes the slack of the allocator whose call joins a thread, for threads
/// that join through C calls.
#[inline]
fn note_slack(slack: usize) {
    // Relaxed: see `SLACK`. The load first: the word is read by every C
    // join and written once.
    if slack != UNKNOWN && SLACK.load(Relaxed) != slack {
        SLACK.store(slack, Relaxed);
    }
}

/// The most that `threads` live threads other than the caller can hold
/// unpublished in all, either way: each less than 1.25 times its interval,
/// each interval at most the slack and at most the floor
/// plus the thread's allowance, and the allowances within the pool
/// together.
pub(crate) fn unpublished_in_all(threads: usize) -> usize {
    // Relaxed: see `SLACK`. Unknown: the largest a slack can be.
    let slack = SLACK.load(Relaxed);
    let intervals = threads
        .saturating_mul(slack)
        .min(threads.saturating_mul(FLOOR).saturating_add(super::pool()));
    intervals.saturating_add(intervals / 4)
}

/// Publishes the calling thread's count, so that a reading it takes is
/// exact for its own calls.
pub(crate) fn publish_own() {
    THREAD.with(|t| {
        if t.state.get() == ACTIVE {
            look(t);
        }
    });
}

/// The allowance the calling thread holds (for the fork clean-up).
pub(crate) fn allowance() -> usize {
    THREAD.with(|t| t.allowance.get())
}

/// The calling thread's end (from the exit key's destructor): folds all it
/// counted and frees its slot. Later calls count themselves.
pub(crate) fn leave() {
    let slot = THREAD.with(|t| {
        if t.state.replace(DIRECT) != ACTIVE {
            return None;
        }
        // SAFETY: as in `look`.
        let slot = unsafe { &*t.slot.get() };
        let net = counted(t.allocated.get(), t.deallocated.get());
        let pending = net.wrapping_sub(t.folded.get()) as isize;
        if pending != 0 {
            fold_now(t, slot, pending, 0);
        } else {
            slot.publish(0);
        }
        give_back(t.allowance.replace(0));
        t.allocated.set(&NOT_COUNTING);
        t.deallocated.set(&NOT_COUNTING);
        t.alloc_credit.set(0);
        t.free_credit.set(0);
        Some(t.slot.replace(ptr::null()))
    });
    if let Some(slot) = slot {
        // SAFETY: as in `look`.
        TABLE.release(unsafe { &*slot });
        thread_left();
    }
}

/// Adds every taken slot's published delta to `sum`, and the positive ones
/// to `ahead`, for a reading.
pub(crate) fn add_pending(sum: &mut isize, ahead: &mut isize) {
    TABLE.add_pending(sum, ahead);
}

/// In a forked child: folds and frees every slot but the calling thread's;
/// returns how many it freed. What the other threads did since they last
/// looked is lost: less than 1.25 times their interval each.
pub(crate) fn forget_other_threads() -> usize {
    TABLE.forget_all_but(THREAD.with(|t| t.slot.get()), &TOTAL)
}

/// The usable size jemalloc gives `block`: what a call of a thread without
/// a slot counts.
///
/// # Safety
///
/// `block` is a live jemalloc allocation.
pub(crate) unsafe fn usable_size(block: *mut u8) -> isize {
    // SAFETY: the caller's contract; `sallocx` reads jemalloc's metadata of
    // a live block and does not allocate.
    unsafe { sys::sallocx(block.cast(), 0) as isize }
}

/// Counts a call of a thread without a slot: `delta` usable bytes.
pub(crate) fn count_itself(delta: isize) {
    fold(delta);
}

/// Reads a `mallctl` value by name.
///
/// # Safety
///
/// `T` is the type jemalloc documents for `name`.
unsafe fn read<T: Copy>(name: &std::ffi::CStr) -> Option<T> {
    let mut value = std::mem::MaybeUninit::<T>::uninit();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `name` is NUL-terminated; `value` has room for `len` bytes of
    // the documented type.
    let rc = unsafe {
        sys::mallctl(
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    // SAFETY: on success jemalloc wrote a `T`.
    (rc == 0 && len == std::mem::size_of::<T>()).then(|| unsafe { value.assume_init() })
}

#[cfg(test)]
thread_local! {
    /// How many times the calling thread looked at its counters.
    static LOOKS: Cell<usize> = const { Cell::new(0) };
}

/// How many times the calling thread looked at its counters.
#[cfg(test)]
pub(crate) fn looks() -> usize {
    LOOKS.with(Cell::get)
}

/// The calling thread's interval now (0 if it has no slot).
#[cfg(test)]
pub(crate) fn own_interval() -> usize {
    THREAD.with(|t| {
        if t.state.get() == ACTIVE && t.slack.get() != UNKNOWN {
            interval(t.allowance.get(), t.slack.get())
        } else {
            0
        }
    })
}

/// How many threads hold a slot now.
#[cfg(test)]
pub(crate) fn threads_joined() -> usize {
    TABLE.taken()
}
