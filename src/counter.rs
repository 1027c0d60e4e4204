//! The per-thread batched counter: where every allocation and free is counted
//! (over jemalloc, jemalloc counts instead and this holds only the shared
//! total; see `crate::jemalloc_count`).
//!
//! The design is the Linux kernel's `percpu_counter`, with threads in place of
//! CPUs, and ClickHouse's per-thread "untracked memory" for the default slack:
//!
//! - each thread keeps its pending delta in its own thread-local [`Count`] and
//!   adds every allocation (+size) and free (-size) to it; nobody else writes
//!   that word, so the update is a plain load and store at a fixed offset from
//!   the thread pointer, on a cache line no other core writes;
//! - when `|pending|` exceeds the slack, the thread folds it into the shared
//!   [`TOTAL`] with one `fetch_add`, and that fold is where the threshold is
//!   checked (see [`crate::latch`]);
//! - a thread lists the address of its `Count` in a static table so that
//!   readers can sum it; when the thread exits, a thread-local destructor folds
//!   what is left, takes the address off the table, and waits until no reader
//!   is still looking at it;
//! - a thread without a table entry (while it registers, after its
//!   thread-locals are destroyed, or when all entries are taken) adds straight
//!   to `TOTAL`.
//!
//! The exact reading is every listed thread's pending delta plus `TOTAL`, read
//! in that order so that a racing fold is never missed (see [`crate::count`],
//! which holds the word and its fold). It is exact once threads are
//! quiescent. The shared `TOTAL` alone, which the threshold check sees, is
//! off by at most `slack` per listed thread.
//!
//! The wrapper ([`crate::MemWatch`]) calls [`try_record`] or
//! [`try_record_free`] before it calls the inner allocator, and its cold path
//! [`record`] or [`record_free`] after.
//!
//! Nothing on the allocation path allocates, locks, logs, panics or blocks.
//! Only an exiting thread's destructor waits, for readers that hold no lock
//! and finish in a few hundred loads.

use std::cell::Cell;
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering::Relaxed;

use crate::count::{self, Count};
use crate::latch;
use crate::registry::Registry;

/// Default per-thread slack, in bytes: 4 MiB, ClickHouse's default
/// `max_untracked_memory`. It makes alloc/free pairs up to 4 MiB free of any
/// shared write, and bounds the threshold check's error at 4 MiB per thread.
pub const DEFAULT_SLACK: usize = 4 << 20;

/// How many threads can be listed at once for memwatch's own count (over
/// any allocator but jemalloc), and over jemalloc where threads register on
/// their first call. Threads beyond this count stay exact but update the
/// shared total directly, which is slower under contention. Where threads
/// register as they start (Linux with glibc, over jemalloc), the table grows
/// instead.
pub const SLOTS: usize = 256;

/// The largest slack [`crate::MemWatch::with_slack`] accepts: 2^61 bytes.
/// It keeps `2 * slack` below 2^62, so that the counting window of a thread
/// that is not (or no longer) listed can never be entered (see
/// `count::OUTSIDE`).
pub const MAX_SLACK: usize = isize::MAX as usize / 4;

/// The addresses of live threads' `Count`s.
static TABLE: Registry<Count, SLOTS> = Registry::new();

/// The folded total of live bytes.
static TOTAL: AtomicIsize = AtomicIsize::new(0);

/// A thread's relation to the table.
const UNREGISTERED: u8 = 0;
/// Registering the exit destructor and taking an entry: allocations made by
/// the registration itself land here and go straight to `TOTAL`.
const REGISTERING: u8 = 1;
/// Listed in the table.
const ACTIVE: u8 = 2;
/// No entry for this thread, for good: its destructor ran, the table was
/// full, or the destructor could not be registered. Every call goes to
/// `TOTAL`.
const DIRECT: u8 = 3;

thread_local! {
    // `const` initialisers and no `Drop`: these are plain TLS words, usable
    // at any point of a thread's life, including while other thread-locals
    // are being destroyed. Touching them never allocates. `COUNT` lives until
    // the thread's thread-local block is freed, after every destructor ran.
    static COUNT: Count = const { Count::outside() };
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    static ENTRY: Cell<usize> = const { Cell::new(usize::MAX) };
    // The one thread-local with a destructor. It is touched only once per
    // thread, in `register`, under the `REGISTERING` state.
    static RELEASE: EntryRelease = const { EntryRelease };
}

/// The fast path: counts `delta` bytes for the calling thread if its pending
/// delta stays within `slack`, and returns whether it did. If not, nothing
/// changed and the caller goes to its cold path, which calls [`record`].
#[inline(always)]
pub(crate) fn try_record(delta: isize, slack: usize) -> bool {
    COUNT.with(|count| count.add(delta, slack))
}

/// [`try_record`] for a free of `size` bytes, one instruction shorter (see
/// [`Count::take`]).
#[inline(always)]
pub(crate) fn try_record_free(size: usize) -> bool {
    COUNT.with(|count| count.take(size))
}

/// Records `delta` bytes for the calling thread, folding if the fast path
/// cannot take it. `slack` is the batching bound: pending deltas whose
/// magnitude passes it are folded. `on_register` runs once per thread, when
/// the thread is first listed; it is a generic (usually zero-sized) function
/// rather than a pointer, so the call passes two words, not three.
#[inline]
pub(crate) fn record<R: Fn()>(delta: isize, slack: usize, on_register: R) {
    if !try_record(delta, slack) {
        record_cold(delta, slack, on_register);
    }
}

/// [`record`] for a free of `size` bytes.
#[inline]
pub(crate) fn record_free<R: Fn()>(size: usize, slack: usize, on_register: R) {
    if !try_record_free(size) {
        record_cold((size as isize).wrapping_neg(), slack, on_register);
    }
}

#[cold]
#[inline(never)]
fn record_cold<R: Fn()>(delta: isize, slack: usize, on_register: R) {
    if STATE.with(Cell::get) != ACTIVE {
        if STATE.with(Cell::get) == UNREGISTERED {
            on_register();
            register(slack);
            if STATE.with(Cell::get) == ACTIVE {
                return record(delta, slack, on_register);
            }
        }
        return fold(delta);
    }
    latch::observe(COUNT.with(|count| count.fold_into(&TOTAL, delta, slack)));
}

/// Adds `delta` to the shared total and lets the latch look at the result.
pub(crate) fn fold(delta: isize) {
    latch::observe(count::add_to(&TOTAL, delta));
}

/// Folds a running count kept elsewhere into the shared total (see
/// [`count::Folded`]) and lets the latch look at the result if it moved.
#[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
pub(crate) fn fold_net(folded: &count::Folded, net: isize) {
    if let Some(now) = folded.fold_into(&TOTAL, net) {
        latch::observe(now);
    }
}

/// Lists the calling thread in the table and arranges for its removal at
/// exit.
fn register(slack: usize) {
    STATE.with(|s| s.set(REGISTERING));
    // The first touch of `RELEASE` registers its destructor. That can
    // allocate (glibc's `__cxa_thread_atexit_impl` callocs, std's fallback
    // pushes to a Vec) and so re-enter the allocator; the re-entrant calls see
    // `REGISTERING` and go straight to `TOTAL`, so this cannot recurse.
    if RELEASE.try_with(|_| ()).is_err() {
        // The thread is already tearing its locals down.
        STATE.with(|s| s.set(DIRECT));
        return;
    }
    COUNT.with(|count| {
        // Pending 0 before anyone can see it; listing the count publishes
        // it (a Release in `Registry::list`).
        count.empty(slack);
        // SAFETY: `COUNT` stays valid until this thread's thread-local block
        // is freed, which happens after every thread-local destructor has
        // run, including `EntryRelease`'s, which retires the entry first.
        match unsafe { TABLE.list(count) } {
            Some(i) => {
                ENTRY.with(|e| e.set(i));
                STATE.with(|s| s.set(ACTIVE));
            }
            None => {
                // Table full: back outside every window, for good.
                count.close();
                STATE.with(|s| s.set(DIRECT));
            }
        }
    });
}

/// Folds the exiting thread's pending delta and takes it off the table.
struct EntryRelease;

impl Drop for EntryRelease {
    fn drop(&mut self) {
        // From now on, this thread's calls (other thread-locals' destructors
        // free memory too) go straight to `TOTAL`, once the level is
        // `OUTSIDE` below.
        STATE.with(|s| s.set(DIRECT));
        let entry = ENTRY.with(|e| e.replace(usize::MAX));
        COUNT.with(|count| {
            if entry != usize::MAX {
                // Fold first, then empty: a reader may briefly count the
                // remainder twice, never lose it (see `count`).
                latch::observe(count.drain_into(&TOTAL));
                // Waits only for readers already summing (see `Registry`).
                TABLE.retire(entry);
            }
            // Nobody can reach this count any more; every later call of
            // this thread misses the window and goes to `TOTAL`.
            count.close();
        });
    }
}

/// The exact reading: the folded total plus every listed thread's pending
/// delta.
///
/// Exact once threads are quiescent; while they run, off by what they are
/// folding at that instant. Costs one load per table entry (256) and two
/// per listed thread, no lock.
pub(crate) fn live_bytes() -> isize {
    let mut sum: isize = 0;
    TABLE.for_each(|count| sum = sum.wrapping_add(count.pending()));
    #[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
    crate::jemalloc_count::add_unfolded(&mut sum);
    // The total last, so that a fold racing with this reading is counted
    // once or twice, never missed (see `count`). Relaxed: the Acquire loads
    // in `pending` order it after them.
    sum.wrapping_add(TOTAL.load(Relaxed))
}

/// The folded total alone, what the threshold check compares. Relaxed: a
/// statistic.
#[cfg(test)]
pub(crate) fn folded_bytes() -> isize {
    TOTAL.load(Relaxed)
}

/// How many threads are listed now. Relaxed: a statistic.
#[cfg(test)]
pub(crate) fn threads_with_slots() -> usize {
    TABLE.listed()
}
