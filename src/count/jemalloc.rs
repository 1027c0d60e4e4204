//! Over jemalloc on Linux, the count is jemalloc's own: it adds the usable
//! size of every allocation to a per-thread counter, and of every free to
//! another, on its fast path anyway (`thread.allocated` and
//! `thread.deallocated` in its `mallctl` names, maintained by every
//! jemalloc 5.3 build). memwatch only looks at them now and then:
//!
//! - a thread-local countdown of bytes starts at 0, so a thread's first call
//!   through the allocator, whatever started the thread, goes to the cold
//!   path, which claims a slot and reads the addresses of the thread's two
//!   counters;
//! - every call subtracts its size from the countdown (`sub`, `jb` and the
//!   jump into jemalloc: the whole fast path); when it runs out, after
//!   [`WINDOW`] bytes of allocation and free, the cold path reads the two
//!   counters, publishes what is not folded yet in the thread's slot, folds
//!   it into the shared total once it exceeds the slack, and starts the
//!   countdown again;
//! - at the thread's end, what is left is folded and the slot freed.
//!
//! Only the owner ever reads its jemalloc counters, so no memory that
//! another thread writes non-atomically is read; readers sum the slots,
//! which the owner writes atomically. A running thread's slot lags its
//! counters by at most `WINDOW` bytes of activity.
//!
//! Calls of a thread that has no slot (while it joins, past its end, or
//! when the kernel refuses the table memory) count the usable size that
//! jemalloc reports for the block, straight into the total.
//!
//! This relies on no experimental jemalloc control, so it works the same on
//! tikv-jemalloc-sys 0.6 (jemalloc 5.3.0) and 0.7 (5.3.1).

use std::cell::Cell;
use std::ptr;

use tikv_jemalloc_sys as sys;

use super::slot::Slot;
use super::table::Table;
use super::{arm_exit, fold, fold_size, observe, thread_joined, thread_left, TOTAL};

/// Bytes of a thread's allocation and free between two looks at its
/// counters: jemalloc's own event interval for its peak tracking
/// (`PEAK_EVENT_WAIT` in jemalloc 5.3). A loop of 16 B pairs looks once
/// every 2,048 pairs; a published slot lags by at most this much.
pub(crate) const WINDOW: usize = 64 << 10;

/// The slots of threads whose jemalloc counters memwatch reads.
static TABLE: Table = Table::new();

const UNREGISTERED: u8 = 0;
const REGISTERING: u8 = 1;
const ACTIVE: u8 = 2;
/// Past its exit, or unable to join: every call counts itself.
const DIRECT: u8 = 3;

thread_local! {
    // `const` initialisers, no `Drop`: plain thread-local words, usable at
    // any point of a thread's life. `LEFT` is the countdown; 0 sends the
    // next call to the cold path.
    static LEFT: Cell<usize> = const { Cell::new(0) };
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    static SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    static ALLOCATED: Cell<*const u64> = const { Cell::new(ptr::null()) };
    static DEALLOCATED: Cell<*const u64> = const { Cell::new(ptr::null()) };
    /// `allocated - deallocated` as of the last fold (or the join).
    static FOLDED: Cell<u64> = const { Cell::new(0) };
}

/// The fast path: spends `bytes` of the calling thread's countdown and
/// returns `true`, or returns `false` with nothing spent when the countdown
/// cannot cover them (the caller goes to its cold path).
#[inline(always)]
pub(crate) fn spend(bytes: usize) -> bool {
    LEFT.with(|left| match left.get().checked_sub(bytes) {
        Some(rest) => {
            left.set(rest);
            true
        }
        None => false,
    })
}

/// The countdown's length for `slack`: [`WINDOW`], or the slack if smaller
/// (a slack of 0 looks after every call).
#[inline]
fn window(slack: usize) -> usize {
    slack.min(WINDOW)
}

/// Off the fast path, before the call: makes sure the calling thread has a
/// slot, publishes its count if it has, and restarts the countdown so that
/// it covers `bytes` for the call about to be made. Returns what the call
/// must do afterwards.
#[inline]
pub(crate) fn before(bytes: usize, slack: usize) -> After {
    if !joined(slack) {
        return After::CountItself;
    }
    let window = window(slack);
    if bytes <= window {
        look(fold_size(slack));
        LEFT.with(|l| l.set(window - bytes));
        After::Nothing
    } else {
        After::Look
    }
}

/// What a cold call does after the inner allocator returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// The countdown covers the call: nothing.
    Nothing,
    /// A call larger than the countdown: look at the counters right after
    /// it, so that the total sees it at once ([`after`]).
    Look,
    /// The thread has no slot: count the call by its usable size.
    CountItself,
}

/// After a call larger than the countdown: publishes (or folds) at once and
/// restarts the countdown.
pub(crate) fn after(slack: usize) {
    look(fold_size(slack));
    LEFT.with(|l| l.set(window(slack)));
}

/// Whether the calling thread has a slot, joining if it never tried.
fn joined(slack: usize) -> bool {
    match STATE.with(Cell::get) {
        ACTIVE => true,
        UNREGISTERED => join(slack),
        _ => false,
    }
}

fn join(_slack: usize) -> bool {
    STATE.with(|s| s.set(REGISTERING));
    // SAFETY: jemalloc documents both as `uint64_t *`.
    let counters = unsafe {
        (
            read::<*mut u64>(c"thread.allocatedp"),
            read::<*mut u64>(c"thread.deallocatedp"),
        )
    };
    let (Some(a), Some(d)) = counters else {
        STATE.with(|s| s.set(DIRECT));
        return false;
    };
    if !arm_exit() {
        STATE.with(|s| s.set(UNREGISTERED));
        return false;
    }
    let Some(slot) = TABLE.claim() else {
        STATE.with(|s| s.set(DIRECT));
        return false;
    };
    slot.empty(0);
    ALLOCATED.with(|c| c.set(a));
    DEALLOCATED.with(|c| c.set(d));
    SLOT.with(|s| s.set(slot));
    FOLDED.with(|f| f.set(net()));
    STATE.with(|s| s.set(ACTIVE));
    crate::stats::note_jemalloc_inner();
    thread_joined();
    true
}

/// The calling thread's `allocated - deallocated`, from its own counters.
fn net() -> u64 {
    let (a, d) = (ALLOCATED.with(Cell::get), DEALLOCATED.with(Cell::get));
    // SAFETY: only called on an `ACTIVE` thread, whose two pointers jemalloc
    // gave for this very thread: they point into its thread-specific data,
    // which lives in the thread's static thread-local block until the thread
    // is gone. Only this thread writes them (inside jemalloc's calls, which
    // are not running now on this thread), so a plain read is no race.
    unsafe { (*a).wrapping_sub(*d) }
}

/// Publishes what the thread counted since its last fold, folding it into
/// the total once it exceeds `fold` bytes either way.
fn look(fold: usize) {
    let net = net();
    let pending = net.wrapping_sub(FOLDED.with(Cell::get)) as isize;
    // SAFETY: an `ACTIVE` thread's slot, claimed by it and held until it
    // frees it in `leave`; slots are never unmapped.
    let slot = unsafe { &*SLOT.with(Cell::get) };
    if pending.unsigned_abs() > fold {
        FOLDED.with(|f| f.set(net));
        observe(slot.fold_published(&TOTAL, pending));
    } else {
        slot.publish(pending);
    }
}

/// Publishes the calling thread's count, so that a reading it takes is
/// exact for its own calls.
pub(crate) fn publish_own() {
    if STATE.with(Cell::get) == ACTIVE {
        // `usize::MAX`: publish only; any fold waits for the next look.
        look(usize::MAX);
    }
}

/// The calling thread's end (from the exit key's destructor): folds all it
/// counted and frees its slot. Later calls count themselves.
pub(crate) fn leave() {
    if STATE.with(Cell::get) != ACTIVE {
        STATE.with(|s| s.set(DIRECT));
        return;
    }
    look(0);
    STATE.with(|s| s.set(DIRECT));
    LEFT.with(|l| l.set(0));
    let slot = SLOT.with(|s| s.replace(ptr::null()));
    // SAFETY: as in `look`.
    TABLE.release(unsafe { &*slot });
    thread_left();
}

/// Adds every taken slot's published delta to `sum`, and the positive ones
/// to `ahead`, for a reading.
pub(crate) fn add_pending(sum: &mut isize, ahead: &mut isize) {
    TABLE.for_each(|s| {
        let p = s.pending();
        *sum = sum.wrapping_add(p);
        *ahead = ahead.saturating_add(p.max(0));
    });
}

/// In a forked child: folds and frees every slot but the calling thread's;
/// returns how many it freed. What the other threads did since they last
/// published is lost: at most [`WINDOW`] bytes of activity each.
pub(crate) fn forget_other_threads() -> usize {
    let mine = SLOT.with(Cell::get);
    let mut freed = 0;
    TABLE.for_each(|s| {
        if !ptr::eq(s, mine) {
            s.drain_into(&TOTAL);
            TABLE.release(s);
            freed += 1;
        }
    });
    freed
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

/// How many threads hold a slot now.
#[cfg(test)]
pub(crate) fn threads_joined() -> usize {
    TABLE.taken()
}
