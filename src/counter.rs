//! The per-thread batched counter: where every allocation and free is counted.
//!
//! The design is the Linux kernel's `percpu_counter`, with threads in place of
//! CPUs, and ClickHouse's per-thread "untracked memory" for the default slack:
//!
//! - each thread owns one cache-padded [`Slot`] in a static table and adds every
//!   allocation (+size) and free (-size) to its slot's pending delta; nobody
//!   else writes that word, so the update is a plain load and store on a cache
//!   line no other core touches;
//! - when `|pending|` exceeds the slack, the thread folds it into the shared
//!   [`TOTAL`] with one `fetch_add`, and that fold is where the threshold is
//!   checked (see [`crate::latch`]);
//! - when a thread exits, a thread-local destructor folds what is left and frees
//!   the slot for the next thread;
//! - a thread without a slot (while it registers, after its thread-locals are
//!   destroyed, or when all slots are taken) adds straight to `TOTAL`.
//!
//! The exact reading is `TOTAL` plus every slot's pending delta. It is exact
//! once threads are quiescent. The shared `TOTAL` alone, which the threshold
//! check sees, is off by at most `slack` per thread that holds a slot.
//!
//! Nothing here allocates, locks, logs, panics or blocks.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::latch;

/// Default per-thread slack, in bytes: 4 MiB, ClickHouse's default
/// `max_untracked_memory`. It makes alloc/free pairs up to 4 MiB free of any
/// shared write, and bounds the threshold check's error at 4 MiB per thread.
pub const DEFAULT_SLACK: usize = 4 << 20;

/// How many threads can hold a slot at once. Threads beyond this count stay
/// exact but update the shared total directly, which is slower under
/// contention. 256 slots of 128 bytes are 32 KiB of static memory.
pub const SLOTS: usize = 256;

/// One thread's pending delta, alone on its cache line pair.
///
/// The delta is kept biased: `level = pending + bias`, with `bias` the slack
/// of the allocator that last folded it. The window `-slack <= pending <=
/// slack` then reads `0 <= level <= 2 * slack`, which is one unsigned
/// compare on the value just computed, with no add to re-centre it: two
/// instructions fewer per call than an unbiased count.
///
/// 128 bytes, not 64: on x86_64 the spatial prefetcher pulls cache lines in
/// pairs, so two 64-byte neighbours still false-share (crossbeam-utils'
/// `CachePadded` uses 128 bytes on x86_64 and aarch64 for the same reason).
#[repr(align(128))]
pub(crate) struct Slot {
    /// `pending + bias`, where pending is the bytes allocated minus bytes
    /// freed by the owning thread and not yet folded. Written only by the
    /// owner; read by anyone summing the exact reading.
    level: AtomicIsize,
    /// The slack the level is biased by. Written only by the owner, in the
    /// cold path; it changes only when one thread uses two `MemWatch`
    /// instances with different slacks.
    bias: AtomicIsize,
    /// Whether a live thread owns this slot.
    taken: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            level: AtomicIsize::new(0),
            bias: AtomicIsize::new(0),
            taken: AtomicBool::new(false),
        }
    }

    /// The pending delta. Relaxed loads: a statistic, see `record`.
    fn pending(&self) -> isize {
        self.level
            .load(Relaxed)
            .wrapping_sub(self.bias.load(Relaxed))
    }
}

/// The largest slack [`crate::MemWatch::with_slack`] accepts: 2^61 bytes.
/// It keeps `2 * slack` below 2^62, so that the no-slot sentinel (a level of
/// `isize::MIN / 2`) stays outside every window after any delta smaller than
/// 2^62 bytes, which every allocation that can succeed is.
pub const MAX_SLACK: usize = isize::MAX as usize / 4;

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// The folded total of live bytes.
static TOTAL: AtomicIsize = AtomicIsize::new(0);

/// A thread's relation to the slot table.
const UNREGISTERED: u8 = 0;
/// Claiming a slot and registering the exit destructor: allocations made by
/// the registration itself land here and go straight to `TOTAL`.
const REGISTERING: u8 = 1;
/// Holds a slot (`MINE` points to it).
const ACTIVE: u8 = 2;
/// No slot for this thread, for good: its destructor ran, the table was full,
/// or the destructor could not be registered. Every call goes to `TOTAL`.
const DIRECT: u8 = 3;

/// Where `MINE` points while a thread holds no slot. Its level sits so far
/// outside any window (see [`MAX_SLACK`]) that every update misses the fast
/// path, which is how the fast path learns that there is no slot without a
/// separate branch. It is never written.
static NO_SLOT: Slot = Slot {
    level: AtomicIsize::new(isize::MIN / 2),
    bias: AtomicIsize::new(0),
    taken: AtomicBool::new(true),
};

thread_local! {
    // `const` initialisers and no `Drop`: these are plain TLS words, usable
    // at any point of a thread's life, including while other thread-locals
    // are being destroyed. Touching them never allocates.
    static MINE: Cell<&'static Slot> = const { Cell::new(&NO_SLOT) };
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    // The one thread-local with a destructor. It is touched only once per
    // thread, in `register`, under the `REGISTERING` state.
    static RELEASE: SlotRelease = const { SlotRelease };
}

/// Records `delta` bytes for the calling thread. `slack` is the batching
/// bound: pending deltas whose magnitude passes it are folded. `on_register`
/// runs once per thread, when the thread first claims a slot.
///
/// `on_register` is a generic (usually zero-sized) function rather than a
/// pointer so that the call to the cold path passes two words, not five: the
/// fewer registers the hot path must keep alive around it, the less it costs
/// the caller's loop.
#[inline(always)]
pub(crate) fn record<R: Fn()>(delta: isize, slack: usize, on_register: R) {
    let slot = MINE.with(Cell::get);
    // Relaxed is enough: only this thread writes its slot's level, so it
    // reads its own last store; readers summing the table tolerate a stale
    // value (the reading is only promised exact once threads are quiescent,
    // and joining or otherwise synchronising with a thread publishes its
    // stores).
    let level = slot.level.load(Relaxed).wrapping_add(delta);
    // `0 <= level <= 2 * slack` as one unsigned compare: a negative level is
    // above `isize::MAX` as a `usize`. (`slack <= MAX_SLACK`, so `2 * slack`
    // cannot overflow.) `NO_SLOT` never passes, see `MAX_SLACK`.
    if level as usize <= slack * 2 {
        slot.level.store(level, Relaxed);
    } else {
        record_cold(delta, slack, on_register);
    }
}

#[cold]
#[inline(never)]
fn record_cold<R: Fn()>(delta: isize, slack: usize, on_register: R) {
    // The same slot and level the fast path computed: only this thread
    // changes either.
    let slot = MINE.with(Cell::get);
    let level = slot.level.load(Relaxed).wrapping_add(delta);
    if ptr::eq(slot, &NO_SLOT) {
        if STATE.with(Cell::get) == UNREGISTERED {
            on_register();
            register(slack);
            if !ptr::eq(MINE.with(Cell::get), &NO_SLOT) {
                return record(delta, slack, on_register);
            }
        }
        return fold(delta);
    }
    // Relaxed: only this thread writes the bias (see `record`).
    let bias = slot.bias.load(Relaxed);
    // Fold first, then re-centre: a concurrent reader may briefly count the
    // delta twice, never lose it from both places at once.
    fold(level.wrapping_sub(bias));
    rebias(slot, bias, slack as isize);
}

/// Empties the calling thread's slot: pending 0, biased by `slack`.
fn rebias(slot: &Slot, bias: isize, slack: isize) {
    if bias != slack {
        slot.bias.store(slack, Relaxed);
    }
    slot.level.store(slack, Relaxed);
}

/// Adds `delta` to the shared total and lets the latch look at the result.
#[inline]
fn fold(delta: isize) {
    // Relaxed is enough: `TOTAL` is a statistic. The latch's own
    // compare-and-swap carries the ordering that the watchdog relies on.
    let now = TOTAL.fetch_add(delta, Relaxed).wrapping_add(delta);
    latch::observe(now);
}

/// Claims a slot for the calling thread and arranges for its release at exit.
fn register(slack: usize) {
    STATE.with(|s| s.set(REGISTERING));
    let Some(slot) = claim() else {
        STATE.with(|s| s.set(DIRECT));
        return;
    };
    // The first touch of `RELEASE` registers its destructor. That can
    // allocate (glibc's `__cxa_thread_atexit_impl` callocs, std's fallback
    // pushes to a Vec) and so re-enter the allocator; the re-entrant calls see
    // `REGISTERING` and go straight to `TOTAL`, so this cannot recurse.
    if RELEASE.try_with(|_| ()).is_ok() {
        // The previous owner left pending at 0; centre it for this slack.
        rebias(slot, slot.bias.load(Relaxed), slack as isize);
        MINE.with(|m| m.set(slot));
        STATE.with(|s| s.set(ACTIVE));
    } else {
        // The thread is already tearing its locals down.
        slot.taken.store(false, Release);
        STATE.with(|s| s.set(DIRECT));
    }
}

fn claim() -> Option<&'static Slot> {
    TABLE.iter().find(|slot| {
        // A cheap look before the read-modify-write keeps the scan from
        // bouncing cache lines that other threads own. Relaxed: only a hint;
        // the compare-and-swap decides, and its failure needs no ordering.
        !slot.taken.load(Relaxed)
            // Acquire pairs with the Release in `SlotRelease::drop`: the new
            // owner sees the previous owner's final level and bias.
            && slot
                .taken
                .compare_exchange(false, true, Acquire, Relaxed)
                .is_ok()
    })
}

/// Folds the exiting thread's pending delta and frees its slot.
struct SlotRelease;

impl Drop for SlotRelease {
    fn drop(&mut self) {
        let slot = MINE.with(|m| m.replace(&NO_SLOT));
        // From now on, this thread's calls (other thread-locals' destructors
        // free memory too) go straight to `TOTAL`.
        STATE.with(|s| s.set(DIRECT));
        if ptr::eq(slot, &NO_SLOT) {
            return;
        }
        // Relaxed: this thread is the slot's only writer (see `record`);
        // the Release store of `taken` below publishes the final state.
        let bias = slot.bias.load(Relaxed);
        fold(slot.pending());
        slot.level.store(bias, Relaxed);
        // Release pairs with the Acquire in `claim`.
        slot.taken.store(false, Release);
    }
}

/// The exact reading: the folded total plus every thread's pending delta.
///
/// Exact once threads are quiescent; while they run, off by what they are
/// folding at that instant. Costs one load per slot (256), no lock.
pub(crate) fn live_bytes() -> isize {
    // Relaxed loads: a statistic, see `record`.
    TABLE.iter().fold(TOTAL.load(Relaxed), |sum, slot| {
        sum.wrapping_add(slot.pending())
    })
}

/// The folded total alone, what the threshold check compares. Relaxed: a
/// statistic.
#[cfg(test)]
pub(crate) fn folded_bytes() -> isize {
    TOTAL.load(Relaxed)
}

/// How many slots live threads hold now. Relaxed: a statistic.
#[cfg(test)]
pub(crate) fn threads_with_slots() -> usize {
    TABLE.iter().filter(|s| s.taken.load(Relaxed)).count()
}
