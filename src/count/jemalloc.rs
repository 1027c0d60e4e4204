//! Over jemalloc on Linux, the count is jemalloc's own: it adds the usable
//! size of every allocation to a per-thread counter, and of every free to
//! another, on its fast path anyway (`thread.allocated` and
//! `thread.deallocated` in its `mallctl` names, maintained by every
//! jemalloc 5.3 build). memwatch only looks at them now and then:
//!
//! - a thread-local level holds the thread's net since its last look, in
//!   weighted bytes (a block weighs its size plus 16, or plus its
//!   alignment past 16; see [`weight`]). It starts far outside its window, so a thread's first
//!   call through the allocator, whatever started the thread, goes to the
//!   cold path, which claims a slot and reads the addresses of the
//!   thread's two counters;
//! - every allocation adds its weight and every free subtracts it (a load,
//!   an add, a compare, a branch and a store, then the jump into jemalloc:
//!   the whole fast path). A loop of alloc/free pairs never leaves the
//!   window, whatever the size. A call that would take the net more than
//!   [`WINDOW`] either way goes to the cold path, which reads the two
//!   counters, publishes what is not folded yet in the thread's slot, folds
//!   it into the shared total once it exceeds the thread's share of the
//!   error budget, and re-centres the level; a reallocation always does;
//! - a plain call larger than the window takes a short path of its own
//!   ([`alloc_large`], [`free_large`]): it publishes the block's usable
//!   size, which it computes as jemalloc does, and leaves the level alone,
//!   so the reading sees the block at once;
//! - at the thread's end, what is left is folded and the slot freed.
//!
//! Only the owner ever reads its jemalloc counters, so no memory that
//! another thread writes non-atomically is read; readers sum the slots,
//! which the owner writes atomically. A running thread's slot lags its
//! counters by at most 1.25 times `WINDOW`: 60 KiB.
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
use super::{claim, fold, fold_size, observe, thread_joined, thread_left, TOTAL};
use crate::sync::{AtomicBool, AtomicUsize};

/// How far the calling thread's net (weighted, below) may move either way
/// between two looks at its counters: 48 KiB. Weighted bytes bound usable
/// bytes to 1.25 times as much (see [`weight`]), so a published slot lags
/// its thread's counters by at most 60 KiB plus the call in flight, under
/// the 64 KiB per thread of the error bound.
pub(crate) const WINDOW: usize = 48 << 10;

/// The most a running thread's published count lags its counters: 1.25
/// times the window, under 64 KiB.
#[cfg(test)]
pub(crate) const UNPUBLISHED: usize = 64 << 10;

/// The level of a thread that counts nothing (not joined, or past its
/// exit): so far outside the window that every call misses the fast path,
/// allocations and frees alike.
const OUTSIDE: isize = isize::MIN / 2;

/// The slots of threads whose jemalloc counters memwatch reads.
static TABLE: Table = Table::new();

/// The calling thread's words, in one thread-local so that code touching
/// several of them computes the thread-local address once.
struct Thread {
    /// The thread's weighted net since its last look, biased by the
    /// window: `0..=2 * window` is the fast path; it starts far outside,
    /// so a thread's first call joins.
    level: Cell<isize>,
    state: Cell<u8>,
    slot: Cell<*const Slot>,
    allocated: Cell<*const u64>,
    deallocated: Cell<*const u64>,
    /// `allocated - deallocated` as of the last fold (or the join).
    folded: Cell<u64>,
    /// How this jemalloc rounds a large request ([`large_rounding`]); 0
    /// while the thread has no slot, or if the rounding is not known, and
    /// large calls then look at the counters instead.
    large: Cell<usize>,
}

thread_local! {
    // A `const` initialiser and no `Drop`: plain thread-local words, usable
    // at any point of a thread's life.
    static THREAD: Thread = const {
        Thread {
            level: Cell::new(OUTSIDE),
            state: Cell::new(UNREGISTERED),
            slot: Cell::new(ptr::null()),
            allocated: Cell::new(ptr::null()),
            deallocated: Cell::new(ptr::null()),
            folded: Cell::new(0),
            large: Cell::new(0),
        }
    };
}

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

/// A block's weight: its size plus 16, or plus its alignment if that is
/// larger. jemalloc's usable size is at most 1.25 times that for every size
/// class and alignment (8 for 1 byte, 160 for 129, a quarter more at most
/// from 128 bytes up, the alignment at most for a block smaller than it),
/// so the weighted net bounds the usable one. An alloc/free pair weighs
/// nothing in all.
#[inline(always)]
pub(crate) const fn weight(layout: Layout) -> usize {
    if layout.align() <= 16 {
        layout.size().wrapping_add(16)
    } else {
        layout.size().wrapping_add(layout.align())
    }
}

/// What an allocation (or with `free`, a free) of `layout` moves the
/// thread's level by.
#[inline]
pub(crate) fn delta(layout: Layout, free: bool) -> isize {
    let w = weight(layout) as isize;
    if free {
        -w
    } else {
        w
    }
}

/// The fast path of an allocation of `layout`: adds its weight to the
/// thread's level and returns `true` if the level stays within the window;
/// otherwise changes nothing and returns `false` (the caller goes to its
/// cold path).
#[inline(always)]
pub(crate) fn add(layout: Layout, slack: usize) -> bool {
    // Only plain blocks: the compiler then knows that the call into
    // jemalloc that follows is plain `malloc`, and merges the two tests.
    plain(layout)
        && THREAD.with(|t| {
            let l = &t.level;
            let level = l.get().wrapping_add(weight(layout) as isize);
            // `0 <= level <= 2 * window` as one unsigned compare.
            if level as usize <= 2 * window(slack) {
                l.set(level);
                true
            } else {
                false
            }
        })
}

/// The fast path of a free of `layout`: only the window's lower end can be
/// crossed, and `level < 0` is the sign of the subtraction itself.
#[inline(always)]
pub(crate) fn take(layout: Layout) -> bool {
    plain(layout)
        && THREAD.with(|t| {
            let l = &t.level;
            let level = l.get().wrapping_sub(weight(layout) as isize);
            if level >= 0 {
                l.set(level);
                true
            } else {
                false
            }
        })
}

/// The window for `slack`: [`WINDOW`], or the slack if smaller (a slack of
/// 0 looks after every call).
#[inline(always)]
const fn window(slack: usize) -> usize {
    if slack < WINDOW {
        slack
    } else {
        WINDOW
    }
}

/// Off the fast path, before a call that moves the thread's net by `delta`
/// weighted bytes: makes sure the thread has a slot, and if the call is
/// small, publishes its counters now and re-centres its level with the call
/// counted in it. Returns what the call must do afterwards.
#[inline]
pub(crate) fn before(delta: isize, slack: usize) -> After {
    if !joined() {
        return After::CountItself;
    }
    let window = window(slack);
    if delta.unsigned_abs() <= window {
        THREAD.with(|t| {
            look(t, fold_size(slack));
            t.level.set(window as isize + delta);
        });
        After::Nothing
    } else {
        After::Look
    }
}

/// What a cold call does after the inner allocator returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// The level covers the call: nothing.
    Nothing,
    /// A call larger than the window: look at the counters right after it,
    /// so that the total sees it at once ([`after`]).
    Look,
    /// The thread has no slot: count the call by its usable size.
    CountItself,
}

/// Whether the calling thread, which has a plain call larger than
/// [`WINDOW`] to make, may skip the cold path: it has its slot, and its
/// exact usable size ([`large_usable`]) is published at once, without a
/// look ([`alloc_large`], [`free_large`]).
#[inline(always)]
pub(crate) fn large_ready() -> bool {
    THREAD.with(|t| t.large.get()) != 0
}

/// [`large_rounding`]: jemalloc's size classes, four per doubling.
const CLASSES: usize = usize::MAX;
/// [`LARGE`] before the first join has looked.
const NOT_YET: usize = 1;

/// How this process's jemalloc rounds a plain request larger than
/// [`WINDOW`]: [`CLASSES`], or a page mask (jemalloc 5.3.1 rounds large
/// requests up to whole pages by default, `opt.disable_large_size_classes`),
/// or 0 if neither agrees with `nallocx`. Found by the first join.
static LARGE: AtomicUsize = AtomicUsize::new(NOT_YET);

/// The usable size jemalloc gives, and adds to the thread's counters for, a
/// plain request of `size` bytes, `WINDOW < size <= isize::MAX`, rounded as
/// `rounding` says ([`large_rounding`], not 0). A request past jemalloc's
/// largest class fails, so no block of it is ever counted.
#[inline(always)]
pub(crate) const fn large_usable(size: usize, rounding: usize) -> usize {
    let mask = if rounding == CLASSES {
        // Classes `2^(lg - 3)` apart below `2^lg = ceil(log2(size))`.
        let lg = usize::BITS - (size - 1).leading_zeros();
        (1usize << (lg - 3)) - 1
    } else {
        rounding
    };
    (size + mask) & !mask
}

/// [`LARGE`], found once: jemalloc's own option and page size say which
/// rounding it uses, and `nallocx` must agree ([`agrees_with_jemalloc`]),
/// else large calls keep looking at the counters. Racing first joins find
/// the same.
pub(crate) fn large_rounding() -> usize {
    // Relaxed: a value found from jemalloc alone; any thread finds the same.
    let known = LARGE.load(Relaxed);
    if known != NOT_YET {
        return known;
    }
    // SAFETY: jemalloc documents both types (the option exists from 5.3.1).
    let (pages, page) = unsafe {
        (
            read::<bool>(c"opt.disable_large_size_classes").unwrap_or(false),
            read::<usize>(c"arenas.page"),
        )
    };
    let rounding = match (pages, page) {
        (false, _) => CLASSES,
        (true, Some(page)) if page.is_power_of_two() => page - 1,
        (true, _) => 0,
    };
    let found = if agrees_with_jemalloc(rounding) {
        rounding
    } else {
        0
    };
    // Relaxed: as the load above; a racing first join stores the same.
    LARGE.store(found, Relaxed);
    found
}

/// Whether [`large_usable`] with `rounding` gives what `nallocx` gives at,
/// and one byte either side of, every size-class boundary from 64 KiB to
/// 2^40 and every 4 KiB page from the window to four times it.
pub(crate) fn agrees_with_jemalloc(rounding: usize) -> bool {
    if rounding == 0 {
        return false;
    }
    let agrees = |size: usize| {
        // SAFETY: `nallocx` computes a size class; it allocates nothing.
        large_usable(size, rounding) == unsafe { sys::nallocx(size, 0) }
    };
    let classes = (16..40).flat_map(|lg| (4..8).map(move |q| q << (lg - 2)));
    let pages = (WINDOW >> 12..(4 * WINDOW) >> 12).map(|p| p << 12);
    classes
        .chain(pages)
        .filter(|&b| b > WINDOW + 1)
        .all(|b| agrees(b - 1) && agrees(b) && agrees(b + 1))
}

/// A plain allocation (`zeroed`: plain `calloc`) larger than [`WINDOW`], on
/// a thread with a slot: jemalloc's call, then its usable size published
/// (no look at the counters, which a program of 64 KiB blocks would make
/// on every call). Inlined into the allocator's cold dispatch: one call
/// less per large call (86.6 instructions over bare jemalloc per 64 KiB
/// pair, against 106 with it out of line).
///
/// # Safety
///
/// As `GlobalAlloc::alloc` for a plain layout of `size > WINDOW` bytes, on
/// a thread for which [`large_ready`] holds.
#[inline(always)]
pub(crate) unsafe fn alloc_large(size: usize, zeroed: bool, slack: usize) -> *mut u8 {
    // SAFETY: plain `malloc`/`calloc`, as tikv-jemallocator calls them for a
    // plain layout ([`plain`]); the caller's contract.
    let ptr = unsafe {
        if zeroed {
            sys::calloc(1, size)
        } else {
            sys::malloc(size)
        }
    };
    // Only once jemalloc succeeded: a refused request counts nothing.
    if !ptr.is_null() {
        THREAD.with(|t| {
            // SAFETY: as in `look`: an `ACTIVE` thread's own slot.
            let slot = unsafe { &*t.slot.get() };
            if let Some(pending) = publish_large(t, slot, size, 1, slack) {
                fold_pending(t, slot, pending);
            }
        });
    }
    ptr.cast()
}

/// A plain free larger than [`WINDOW`] on a thread with a slot: its usable
/// size is published first, then the free is jemalloc's, as a jump. A
/// reading in between sees the block gone an instant early.
///
/// # Safety
///
/// As `GlobalAlloc::dealloc`: `block` is a live block of this allocator of
/// `size > WINDOW` bytes, with a plain layout, on a thread for which
/// [`large_ready`] holds.
#[inline(always)]
pub(crate) unsafe fn free_large(block: *mut u8, size: usize, slack: usize) {
    let due = THREAD.with(|t| {
        // SAFETY: as in `look`: an `ACTIVE` thread's own slot.
        publish_large(t, unsafe { &*t.slot.get() }, size, -1, slack)
    });
    if let Some(pending) = due {
        // SAFETY: the caller's contract.
        return unsafe { fold_then_free(block, size, pending) };
    }
    // SAFETY: sized free with no flags, as tikv-jemallocator frees a plain
    // layout; the caller's contract.
    unsafe { sys::sdallocx(block.cast(), size, 0) };
}

/// [`free_large`] when its free makes a fold due: the fold, then the free.
/// Out of line, so that the common case saves no register.
///
/// # Safety
///
/// As [`free_large`].
#[cold]
#[inline(never)]
unsafe fn fold_then_free(block: *mut u8, size: usize, pending: isize) {
    THREAD.with(|t| {
        // SAFETY: as in `look`.
        fold_pending(t, unsafe { &*t.slot.get() }, pending);
    });
    // SAFETY: as in `free_large`.
    unsafe { sys::sdallocx(block.cast(), size, 0) };
}

/// Adds the usable size of a large call of `size` bytes, `sign` 1 for an
/// allocation and -1 for a free, to what thread `t` published in `slot`.
/// Returns the new pending delta, unpublished, if it is more than the
/// thread's share either way and must be folded ([`fold_pending`]). The
/// next look publishes `net - folded` again, which has the block in it:
/// jemalloc's counters move by exactly that usable size.
#[inline(always)]
fn publish_large(t: &Thread, slot: &Slot, size: usize, sign: isize, slack: usize) -> Option<isize> {
    let usable = large_usable(size, t.large.get()) as isize;
    let pending = slot.published().wrapping_add(sign * usable);
    if pending.unsigned_abs() > fold_size(slack) {
        Some(pending)
    } else {
        slot.publish(pending);
        None
    }
}

/// The fold of a large call, out of line: `pending` moves into the total
/// and into what the next look subtracts from the counters' net.
#[cold]
#[inline(never)]
fn fold_pending(t: &Thread, slot: &Slot, pending: isize) {
    t.folded.set(t.folded.get().wrapping_add(pending as u64));
    observe(slot.fold_published(&TOTAL, pending));
}

/// After a call larger than the window: publishes (or folds) at once and
/// re-centres the level.
#[inline(always)]
pub(crate) fn after(slack: usize) {
    THREAD.with(|t| {
        look(t, fold_size(slack));
        t.level.set(window(slack) as isize);
    });
}

/// Whether the calling thread has a slot, joining if it never tried.
#[inline]
fn joined() -> bool {
    match THREAD.with(|t| t.state.get()) {
        ACTIVE => true,
        UNREGISTERED => join(),
        _ => false,
    }
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
fn join() -> bool {
    THREAD.with(|t| t.state.set(REGISTERING));
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
        t.allocated.set(a);
        t.deallocated.set(d);
        t.slot.set(slot);
        t.folded.set(net(t));
        t.large.set(large_rounding());
        t.state.set(ACTIVE);
    });
    thread_joined();
    true
}

/// The calling thread's `allocated - deallocated`, from its own counters.
#[inline(always)]
fn net(t: &Thread) -> u64 {
    let (a, d) = (t.allocated.get(), t.deallocated.get());
    // SAFETY: only called on an `ACTIVE` thread, whose two pointers jemalloc
    // gave for this very thread: they point into its thread-specific data,
    // which lives in the thread's static thread-local block until the thread
    // is gone. Only this thread writes them (inside jemalloc's calls, which
    // are not running now on this thread), so a plain read is no race.
    unsafe { (*a).wrapping_sub(*d) }
}

/// Publishes what the thread counted since its last fold, folding it into
/// the total once it exceeds `fold` bytes either way.
#[inline(always)]
fn look(t: &Thread, fold: usize) {
    #[cfg(test)]
    LOOKS.with(|l| l.set(l.get() + 1));
    let net = net(t);
    let pending = net.wrapping_sub(t.folded.get()) as isize;
    // SAFETY: an `ACTIVE` thread's slot, claimed by it and held until it
    // frees it in `leave`; slots are never unmapped.
    let slot = unsafe { &*t.slot.get() };
    if pending.unsigned_abs() > fold {
        fold_now(t, slot, net, pending);
    } else {
        slot.publish(pending);
    }
}

/// [`look`]'s fold, out of line.
#[cold]
#[inline(never)]
fn fold_now(t: &Thread, slot: &Slot, net: u64, pending: isize) {
    t.folded.set(net);
    observe(slot.fold_published(&TOTAL, pending));
}

/// Before a call of the C library's allocation functions routed through
/// memwatch ([`crate::c_heap!`]): whether the calling thread has a slot,
/// joining if it never tried. If not, the caller counts the call by its
/// usable size ([`count_itself`]).
#[inline]
pub(crate) fn c_ready() -> bool {
    joined()
}

/// After a C `malloc` (or `calloc`) of `size` bytes on a thread with a
/// slot: the Rust fast path's own step, the block's weight added to the
/// level (a C block is plain: aligned to 16, so its weight bounds its
/// usable size as a Rust block's does), and the exact look of [`c_after`]
/// only when the level leaves the window.
#[inline]
pub(crate) fn c_allocated(size: usize) {
    THREAD.with(|t| {
        let level = t.level.get().wrapping_add(size.wrapping_add(16) as isize);
        if level as usize <= 2 * WINDOW {
            t.level.set(level);
        } else {
            c_exact(t);
        }
    });
}

/// After any other C call on a thread with a slot (a free, whose size C
/// does not give; a reallocation): [`c_exact`].
#[inline]
pub(crate) fn c_after() {
    THREAD.with(c_exact);
}

/// The thread's exact movement since its last look, read from its own
/// counters, either re-centres the level (usable bytes stand in for
/// weighted ones, which only brings the next look sooner) or, past the
/// window, makes the thread look now. Either way the level bounds what the
/// thread has not published, as for Rust calls.
#[inline]
fn c_exact(t: &Thread) {
    // SAFETY: as in `look`: the calling thread's own slot.
    let slot = unsafe { &*t.slot.get() };
    // The net at the last look: what was folded, plus what was published
    // since (the look either folds or publishes).
    let looked = t.folded.get().wrapping_add(slot.published() as u64);
    let moved = net(t).wrapping_sub(looked) as isize;
    if moved.unsigned_abs() > WINDOW {
        look(t, fold_size(super::DEFAULT_SLACK));
        t.level.set(WINDOW as isize);
    } else {
        t.level.set(WINDOW as isize + moved);
    }
}

/// Publishes the calling thread's count, so that a reading it takes is
/// exact for its own calls.
pub(crate) fn publish_own() {
    THREAD.with(|t| {
        if t.state.get() == ACTIVE {
            // `usize::MAX`: publish only; any fold waits for the next look.
            look(t, usize::MAX);
        }
    });
}

/// The calling thread's end (from the exit key's destructor): folds all it
/// counted and frees its slot. Later calls count themselves.
pub(crate) fn leave() {
    let slot = THREAD.with(|t| {
        if t.state.replace(DIRECT) != ACTIVE {
            return None;
        }
        look(t, 0);
        t.level.set(OUTSIDE);
        t.large.set(0);
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
/// published is lost: at most 60 KiB each.
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

/// How many threads hold a slot now.
#[cfg(test)]
pub(crate) fn threads_joined() -> usize {
    TABLE.taken()
}
