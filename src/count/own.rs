//! memwatch's own count, over any inner allocator: each call adds its
//! requested size to the calling thread's slot, and a slot whose pending
//! delta leaves its window (the thread's allowance from the budget's pool,
//! at most the slack) is folded into the shared total.
//!
//! The design is the Linux kernel's `percpu_counter`, with threads in place
//! of CPUs: the fast path is a load, an add, one compare and a store on the
//! thread's own cache line; the fold, one `fetch_add` on the total.
//!
//! A thread's slot is found through a thread-local pointer that starts at a
//! slot outside every window, so that the first call of every thread, however
//! it was started, misses the fast path and claims a slot: no separate check.

use std::cell::Cell;

use super::slot::Slot;
use super::state::{ACTIVE, DIRECT, REGISTERING, UNREGISTERED};
use super::table::Table;
use super::{claim, fold, give_back, observe, settle, thread_joined, thread_left, TOTAL};

/// The slots of threads that count through memwatch's own count.
static TABLE: Table = Table::new();

/// The slot of no thread: every update misses its window.
static NOWHERE: Slot = Slot::outside();

thread_local! {
    // `const` initialisers and no `Drop`: plain thread-local words, usable
    // at any point of a thread's life, its start and its end included, and
    // touching them never allocates.
    static SLOT: Cell<&'static Slot> = const { Cell::new(&NOWHERE) };
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    /// The allowance the thread holds from the budget's pool: its slot's
    /// window, so its pending stays within it either way.
    static ALLOWANCE: Cell<usize> = const { Cell::new(0) };
}

/// Settles the calling thread's allowance for `slack` and empties its slot
/// with the new window, after moving its pending and `delta` into the total
/// (`fold`) or, at the join, from nothing. Returns the fold's new total.
fn refold(slot: &'static Slot, delta: Option<isize>, slack: usize) -> Option<isize> {
    let held = ALLOWANCE.with(Cell::get);
    let kept = settle(held, slack);
    let now = match delta {
        Some(delta) => Some(slot.fold_into(&TOTAL, delta, kept)),
        None => {
            slot.empty(kept);
            None
        }
    };
    // Given back only now: until the slot's new window was set, its old
    // pending was within the old allowance.
    give_back(held.saturating_sub(kept));
    ALLOWANCE.with(|a| a.set(kept));
    now
}

/// The allowance the calling thread holds (for the fork clean-up).
pub(crate) fn allowance() -> usize {
    ALLOWANCE.with(Cell::get)
}

/// The fast path: counts `delta` for the calling thread if its pending
/// delta stays within its window. If not, nothing changed and the caller
/// goes to its cold path, which calls [`record`].
#[inline(always)]
pub(crate) fn try_record(delta: isize) -> bool {
    SLOT.with(|s| s.get().add(delta))
}

/// [`try_record`] for a free of `size` bytes.
#[inline(always)]
pub(crate) fn try_record_free(size: usize) -> bool {
    SLOT.with(|s| s.get().take(size))
}

/// Records `delta` for the calling thread, folding if the fast path cannot
/// take it. `on_join` runs once per thread, as it joins.
#[inline]
pub(crate) fn record(delta: isize, slack: usize, on_join: impl Fn()) {
    if !try_record(delta) {
        record_cold(delta, slack, on_join);
    }
}

#[cold]
#[inline(never)]
fn record_cold(delta: isize, slack: usize, on_join: impl Fn()) {
    match STATE.with(Cell::get) {
        ACTIVE => {
            let slot = SLOT.with(Cell::get);
            if let Some(now) = refold(slot, Some(delta), slack) {
                observe(now);
            }
        }
        UNREGISTERED => {
            on_join();
            if join(slack) {
                return record(delta, slack, on_join);
            }
            fold(delta);
        }
        _ => fold(delta),
    }
}

/// Claims a slot for the calling thread; `false` if it could not (yet).
fn join(slack: usize) -> bool {
    STATE.with(|s| s.set(REGISTERING));
    let slot = match claim(&TABLE) {
        Ok(slot) => slot,
        Err(state) => {
            STATE.with(|s| s.set(state));
            return false;
        }
    };
    // Pending 0 before anyone reads it (the claim's fence orders it).
    refold(slot, None, slack);
    SLOT.with(|s| s.set(slot));
    STATE.with(|s| s.set(ACTIVE));
    thread_joined();
    true
}

/// The calling thread's end (from the exit key's destructor): folds what
/// is pending and frees the slot. Later calls count in the total.
pub(crate) fn leave() {
    if STATE.with(|s| s.replace(DIRECT)) != ACTIVE {
        return;
    }
    let slot = SLOT.with(|s| s.replace(&NOWHERE));
    observe(slot.drain_into(&TOTAL));
    give_back(ALLOWANCE.with(|a| a.replace(0)));
    TABLE.release(slot);
    thread_left();
}

/// Adds every taken slot's pending delta to `sum`, and the positive ones
/// to `ahead`, for a reading.
pub(crate) fn add_pending(sum: &mut isize, ahead: &mut isize) {
    TABLE.add_pending(sum, ahead);
}

/// In a forked child: folds and frees every slot but the calling thread's;
/// returns how many it freed.
pub(crate) fn forget_other_threads() -> usize {
    TABLE.forget_all_but(SLOT.with(Cell::get), &TOTAL)
}

/// How many threads hold a slot now.
#[cfg(test)]
pub(crate) fn threads_joined() -> usize {
    TABLE.taken()
}
