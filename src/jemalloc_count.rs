//! Over jemalloc, the count is jemalloc's own: what `MemWatch<Jemalloc>`
//! reads instead of keeping a count of its own.
//!
//! jemalloc already adds the usable size of every allocation to a per-thread
//! counter, and of every free to another, on its fast path (`thread.allocated`
//! and `thread.deallocated` in its `mallctl` names). Every 64 KiB of either on
//! a thread it runs that thread's activity callback
//! (`experimental.thread.activity_callback`) with both counters. So the
//! wrapper does nothing per call but look at one thread-local byte to learn
//! whether the calling thread is set up:
//!
//! - on its first call, a thread registers: it reads the addresses of its two
//!   counters, lists a [`Thread`] with them in a static table, and installs
//!   the callback;
//! - the callback folds what changed since the last fold into the shared
//!   total, as a full slack window does for [`crate::counter`], and the latch
//!   looks at the result, so the threshold check is at most 64 KiB behind per
//!   thread;
//! - the exact reading adds, for every listed thread, its counters minus what
//!   was already folded; once threads are quiescent that is exact;
//! - at exit, a thread-local destructor uninstalls the callback, folds what is
//!   left and takes the thread off the table; a thread without an entry
//!   (while it registers, after its destructor ran, or when the table is full)
//!   counts each call itself, by the usable size jemalloc reports for the
//!   block, straight into the shared total.
//!
//! A byte counted this way is what jemalloc's `stats.allocated` counts: the
//! size class, not the requested size. That is also what the heap holds.
//!
//! jemalloc counts every allocation it makes on a listed thread, including
//! any that bypass the wrapper (a direct call to [`crate::Jemalloc`]).
//!
//! Nothing here allocates, locks or logs. Registration and exit go through
//! jemalloc's `mallctl`, which is jemalloc's code and never calls back into
//! Rust's allocator.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicIsize, AtomicPtr};

use tikv_jemalloc_sys as sys;

use crate::count::Folded;
use crate::counter::{self, SLOTS};
use crate::registry::Registry;

/// How much allocation, or free, jemalloc lets pass on a thread between two
/// calls of its activity callback (`PEAK_EVENT_WAIT` in jemalloc 5.3).
/// Also the least slack for which `MemWatch<Jemalloc>` uses this mode: a
/// smaller slack asks for a tighter threshold check than jemalloc's
/// callback gives, and gets memwatch's own per-call count instead.
pub(crate) const EVENT_BYTES: usize = 64 << 10;

/// jemalloc's activity callback thunk (`activity_callback_thunk_t`).
#[repr(C)]
struct Thunk {
    callback: Option<unsafe extern "C" fn(*mut c_void, u64, u64)>,
    uctx: *mut c_void,
}

/// One thread's counters, as listed for readers.
pub(crate) struct Thread {
    /// Addresses of jemalloc's `thread.allocated` and `thread.deallocated`
    /// counters for this thread: in jemalloc's thread-specific data, which
    /// lives as long as the thread. Set before listing, never changed while
    /// listed.
    allocated: AtomicPtr<u64>,
    deallocated: AtomicPtr<u64>,
    /// `allocated - deallocated` when the thread registered: what jemalloc
    /// counted on it before memwatch did. Set before listing.
    base: AtomicIsize,
    /// How much of the thread's net count (since `base`) is in the shared
    /// total. Folded only by the owning thread (its callback and its exit).
    folded: Folded,
}

impl Thread {
    const fn new() -> Self {
        Thread {
            allocated: AtomicPtr::new(ptr::null_mut()),
            deallocated: AtomicPtr::new(ptr::null_mut()),
            base: AtomicIsize::new(0),
            folded: Folded::new(),
        }
    }

    /// The thread's net count since it registered, from jemalloc's counters.
    ///
    /// # Safety
    ///
    /// The thread must be listed (or the caller must be the thread itself),
    /// so that the counters' addresses are set and valid.
    unsafe fn net(&self) -> isize {
        // Relaxed: set before the item was published; a reader reaches it
        // through the table's Acquire load, the owner wrote it itself.
        let (a, d) = (self.allocated.load(Relaxed), self.deallocated.load(Relaxed));
        // SAFETY: both point into jemalloc's thread-specific data of a live
        // thread (the caller's contract; the table's exit protocol keeps a
        // listed thread's block alive while a reader walks it). jemalloc
        // updates each counter with single aligned 8-byte stores, and only
        // on the owning thread; such a load is single-copy atomic on every
        // 64-bit target this module is built for, so another thread reads a
        // value the owner stored, perhaps not the latest: off by what the
        // thread is allocating at that instant, like any reading of a
        // running thread. Volatile: the compiler may neither cache nor split
        // the load.
        let (a, d) = unsafe { (ptr::read_volatile(a), ptr::read_volatile(d)) };
        (a.wrapping_sub(d) as isize).wrapping_sub(self.base.load(Relaxed))
    }

    /// What a reading adds for this thread: its net count not yet folded.
    ///
    /// # Safety
    ///
    /// As [`Self::net`].
    unsafe fn unfolded(&self) -> isize {
        // SAFETY: the caller's contract.
        self.folded.unfolded(|| unsafe { self.net() })
    }

    /// Moves the thread's net count `net` into the shared total and lets the
    /// latch look at it. Owner only.
    fn fold(&self, net: isize) {
        counter::fold_net(&self.folded, net);
    }
}

/// The listed threads.
static TABLE: Registry<Thread, SLOTS> = Registry::new();

const UNREGISTERED: u8 = 0;
/// Registering: calls made by the registration itself count themselves.
const REGISTERING: u8 = 1;
/// Listed, callback installed: jemalloc counts.
const ACTIVE: u8 = 2;
/// No entry, for good: every call counts itself.
const DIRECT: u8 = 3;

thread_local! {
    // `const` initialisers, no `Drop`: plain TLS words, usable at any point
    // of a thread's life. `THREAD` lives until the thread's thread-local
    // block is freed, after every destructor ran.
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    static ENTRY: Cell<usize> = const { Cell::new(usize::MAX) };
    static THREAD: Thread = const { Thread::new() };
    // The one with a destructor, touched once per thread in `register`.
    static EXIT: Exit = const { Exit };
}

/// Whether jemalloc counts the calling thread's calls: the fast path's one
/// check.
#[inline(always)]
pub(crate) fn listed() -> bool {
    STATE.with(Cell::get) == ACTIVE
}

/// Off the fast path: registers the calling thread if it never tried, and
/// returns whether jemalloc counts its calls now. When it returns `false`,
/// the caller counts the call itself, by [`usable_size`].
#[cold]
pub(crate) fn register_or_direct() -> bool {
    if STATE.with(Cell::get) == UNREGISTERED {
        register();
    }
    listed()
}

/// The usable size jemalloc gives `block`: what a call on a thread that
/// jemalloc does not count for us counts itself.
///
/// # Safety
///
/// `block` is a live jemalloc allocation.
pub(crate) unsafe fn usable_size(block: *mut u8) -> isize {
    // SAFETY: the caller's contract; `sallocx` reads jemalloc's metadata of
    // a live block and does not allocate.
    unsafe { sys::sallocx(block.cast(), 0) as isize }
}

/// Sums every listed thread's unfolded count into `sum`: part of the exact
/// reading, taken before the shared total (see `counter::live_bytes`).
pub(crate) fn add_unfolded(sum: &mut isize) {
    TABLE.for_each(|t| {
        // SAFETY: `t` is listed for the duration of this call.
        *sum = sum.wrapping_add(unsafe { t.unfolded() });
    });
}

/// Reads a `mallctl` value by NUL-terminated `name`.
///
/// # Safety
///
/// `T` is the type jemalloc documents for `name`.
unsafe fn read<T: Copy>(name: &[u8]) -> Option<T> {
    let mut value = std::mem::MaybeUninit::<T>::uninit();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `name` is NUL-terminated; `value` has room for `len` bytes of
    // the documented type.
    let rc = unsafe {
        sys::mallctl(
            name.as_ptr().cast(),
            value.as_mut_ptr().cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    // SAFETY: on success jemalloc wrote a `T`.
    (rc == 0 && len == std::mem::size_of::<T>()).then(|| unsafe { value.assume_init() })
}

/// Installs `thunk` as the calling thread's activity callback.
fn install(thunk: Thunk) -> bool {
    let mut thunk = thunk;
    // SAFETY: the name is NUL-terminated and `Thunk` is jemalloc's
    // `activity_callback_thunk_t`, which the call copies.
    let rc: c_int = unsafe {
        sys::mallctl(
            c"experimental.thread.activity_callback".as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::from_mut(&mut thunk).cast(),
            std::mem::size_of::<Thunk>(),
        )
    };
    rc == 0
}

fn register() {
    // The trip report shows jemalloc's figures once some thread wraps it.
    crate::stats::note_jemalloc_inner();
    STATE.with(|s| s.set(REGISTERING));
    // The first touch of `EXIT` registers its destructor, which can
    // allocate and so re-enter the allocator; those calls see `REGISTERING`
    // and count themselves.
    if EXIT.try_with(|_| ()).is_err() {
        STATE.with(|s| s.set(DIRECT));
        return;
    }
    // SAFETY: jemalloc documents both as `uint64_t *`.
    let counters = unsafe {
        (
            read::<*mut u64>(b"thread.allocatedp\0"),
            read::<*mut u64>(b"thread.deallocatedp\0"),
        )
    };
    let (Some(a), Some(d)) = counters else {
        // A jemalloc built without statistics: count every call here.
        STATE.with(|s| s.set(DIRECT));
        return;
    };
    THREAD.with(|t| {
        t.allocated.store(a, Relaxed);
        t.deallocated.store(d, Relaxed);
        t.base.store(0, Relaxed);
        t.folded.reset();
        // SAFETY: the counters were just set; this is the owning thread.
        let base = unsafe { t.net() };
        t.base.store(base, Relaxed);
        // SAFETY: `THREAD` stays valid until this thread's thread-local
        // block is freed, after every destructor ran, including
        // `Exit`'s, which retires the entry first.
        let Some(entry) = (unsafe { TABLE.list(t) }) else {
            STATE.with(|s| s.set(DIRECT));
            return;
        };
        let thunk = Thunk {
            callback: Some(on_activity),
            uctx: ptr::from_ref(t).cast_mut().cast(),
        };
        if install(thunk) {
            ENTRY.with(|e| e.set(entry));
            STATE.with(|s| s.set(ACTIVE));
        } else {
            TABLE.retire(entry);
            STATE.with(|s| s.set(DIRECT));
        }
    });
}

/// jemalloc's activity callback: runs on the owning thread, inside one of
/// its allocations or frees, every 64 KiB of either.
unsafe extern "C" fn on_activity(uctx: *mut c_void, allocated: u64, deallocated: u64) {
    // SAFETY: `uctx` is the calling thread's own `THREAD`, installed by
    // `register` and uninstalled by `Exit` before the entry goes.
    let t = unsafe { &*uctx.cast::<Thread>() };
    let net = (allocated.wrapping_sub(deallocated) as isize).wrapping_sub(t.base.load(Relaxed));
    t.fold(net);
}

/// Uninstalls the callback, folds what is left and retires the entry of an
/// exiting thread.
struct Exit;

impl Drop for Exit {
    fn drop(&mut self) {
        if STATE.with(|s| s.replace(DIRECT)) != ACTIVE {
            return;
        }
        install(Thunk {
            callback: None,
            uctx: ptr::null_mut(),
        });
        let entry = ENTRY.with(|e| e.replace(usize::MAX));
        THREAD.with(|t| {
            // SAFETY: this is the owning thread, still listed.
            t.fold(unsafe { t.net() });
            // Waits only for readers already summing.
            TABLE.retire(entry);
        });
    }
}

/// How many threads are listed now. Relaxed: a statistic.
#[cfg(test)]
pub(crate) fn threads_listed() -> usize {
    TABLE.listed()
}
