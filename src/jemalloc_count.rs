//! Over jemalloc, the count is jemalloc's own: what `MemWatch<Jemalloc>`
//! reads instead of keeping a count of its own.
//!
//! jemalloc already adds the usable size of every allocation to a per-thread
//! counter, and of every free to another, on its fast path (`thread.allocated`
//! and `thread.deallocated` in its `mallctl` names). Every 64 KiB of either on
//! a thread it runs that thread's activity callback
//! (`experimental.thread.activity_callback`) with both counters. So the
//! wrapper does nothing per call, once the thread is set up:
//!
//! - a thread registers: it reads the addresses of its two counters, lists a
//!   [`Thread`] with them in a static table, and installs the callback. On
//!   Linux with glibc it does so as it starts, from memwatch's own
//!   `pthread_create` (`crate::thread_start`), and the fast path checks
//!   nothing; elsewhere, or with the `register-on-first-call` feature, on
//!   its first call, and the fast path checks one thread-local byte;
//! - the callback folds what changed since the last fold into the shared
//!   total once more than the default slack (4 MiB) is unfolded, as a full
//!   slack window does for [`crate::counter`], and the latch looks at the
//!   result, so the threshold check is less than 4 MiB + 64 KiB behind per
//!   thread (a smaller slack folds after every call that leaves more than
//!   the slack unfolded: [`settle`]);
//! - the exact reading adds, for every listed thread, its counters minus what
//!   was already folded; once threads are quiescent that is exact;
//! - at exit the thread folds what is left and takes itself off the table:
//!   registered as it started, from a `pthread` key destructor, which glibc
//!   runs after every thread-local destructor; registered on its first call,
//!   from a thread-local destructor, after which (and while it registers, or
//!   when the table is full) each call counts itself, by the usable size
//!   jemalloc reports for the block, straight into the shared total.
//!
//! A byte counted this way is what jemalloc's `stats.allocated` counts: the
//! size class, not the requested size. That is also what the heap holds.
//!
//! jemalloc counts every allocation it makes on a listed thread, including
//! any that bypass the wrapper (a direct call to [`crate::Jemalloc`]).
//!
//! Nothing on the allocator path allocates, locks or logs. Registration
//! and exit go through jemalloc's `mallctl`, which is jemalloc's code and
//! never calls back into Rust's allocator; registration as a thread starts
//! runs before the thread's own code, where it may allocate (the table grows
//! in chunks).

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
/// calls of its activity callback (`PEAK_EVENT_WAIT` in jemalloc 5.3). The
/// tests' bound on the threshold check's lag.
#[cfg(test)]
pub(crate) const EVENT_BYTES: usize = 64 << 10;

/// How much of a thread's count the callback leaves unfolded: it folds only
/// beyond this, the default slack. Folding is a `fetch_add` on the one shared
/// total; folding at every callback cost a loop of 4 KiB alloc+free pairs
/// on two threads 12% (a fold every 8 pairs, on a cache line both cores
/// write) and one of 64 KiB pairs 25% to 34%, measured against the same
/// threads with the callback removed. Within the bound a loop of pairs of
/// any size up to 4 MiB never folds. A smaller slack than this folds after
/// each call instead ([`settle`]).
pub(crate) const CALLBACK_FOLD: usize = crate::counter::DEFAULT_SLACK;

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
/// Registered as it started, now past its exit fold: off the table, but
/// jemalloc's callback, still installed, keeps folding what the thread's
/// last destructors do (see `at_exit`).
#[cfg(memwatch_thread_start)]
const EXITED: u8 = 4;

thread_local! {
    // `const` initialisers, no `Drop`: plain TLS words, usable at any point
    // of a thread's life. `THREAD` lives until the thread's thread-local
    // block is freed, after every destructor ran.
    static STATE: Cell<u8> = const { Cell::new(UNREGISTERED) };
    static ENTRY: Cell<usize> = const { Cell::new(usize::MAX) };
    static THREAD: Thread = const { Thread::new() };
}

#[cfg(not(memwatch_thread_start))]
thread_local! {
    // The one with a destructor, touched once per thread in `register`.
    static EXIT: Exit = const { Exit };
}

#[cfg(memwatch_thread_start)]
thread_local! {
    // How many times `at_exit` ran on this thread.
    static EXIT_ROUNDS: Cell<u8> = const { Cell::new(0) };
}

/// Whether jemalloc counts the calling thread's calls: the fast path's one
/// check, where threads register on their first call. Where every thread
/// registered as it started (`memwatch_thread_start`), there is nothing to
/// check, and this is the constant `true`.
#[inline(always)]
pub(crate) fn listed() -> bool {
    cfg!(memwatch_thread_start) || STATE.with(Cell::get) == ACTIVE
}

/// Whether jemalloc's counters of the calling thread are read: it is listed
/// (or, registered as it started, past its exit fold, where its callback
/// still folds).
fn counted() -> bool {
    let state = STATE.with(Cell::get);
    #[cfg(memwatch_thread_start)]
    if state == EXITED {
        return true;
    }
    state == ACTIVE
}

/// For a slack under [`CALLBACK_FOLD`]: folds the calling thread's count if
/// what is not folded yet exceeds `slack`, after each call through the
/// allocator, so that the threshold check is within `slack` of the truth.
pub(crate) fn settle(slack: usize) {
    if !counted() {
        return;
    }
    THREAD.with(|t| {
        // SAFETY: the calling thread is counted: its own counters are set.
        let net = unsafe { t.net() };
        if t.folded.pending(net).unsigned_abs() > slack {
            t.fold(net);
        }
    });
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

#[cfg(not(memwatch_thread_start))]
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
    // SAFETY: `EXIT`'s destructor, now registered, retires the entry before
    // the thread's thread-local block is freed.
    enlist(|t| unsafe { TABLE.list(t) });
}

/// Every thread registered as it started: nothing is left to do here, which
/// only the cold paths reach, and the fast path never takes them.
#[cfg(memwatch_thread_start)]
fn register() {}

/// Reads the calling thread's counters, lists it with `list` and installs
/// its callback; `STATE` ends `ACTIVE`, or `DIRECT` if a step failed. The
/// caller has arranged for a listed entry to be retired before the thread's
/// thread-local block is freed.
fn enlist(list: impl FnOnce(&Thread) -> Option<usize>) {
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
        // `THREAD` stays valid until this thread's thread-local block is
        // freed, after every destructor ran.
        let Some(entry) = list(t) else {
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

/// Registers the calling thread as it starts (from `thread_start`'s
/// trampoline, or before `main` for the main thread): lists it, in a table
/// that grows as needed, and arms `at_exit` for its end.
#[cfg(memwatch_thread_start)]
pub(crate) fn register_at_start() {
    if STATE.with(Cell::get) != UNREGISTERED {
        return;
    }
    STATE.with(|s| s.set(REGISTERING));
    // Armed before listing: a listed thread always retires its entry.
    if !exit_key().is_some_and(arm) {
        STATE.with(|s| s.set(DIRECT));
        return;
    }
    // SAFETY: `at_exit`, armed above, retires the entry before the thread's
    // thread-local block is freed.
    enlist(|t| Some(unsafe { TABLE.list_or_grow(t) }));
}

/// Whether the calling thread is registered: where threads register as
/// they start, a thread that is not was started by another `pthread_create`
/// than memwatch's.
#[cfg(memwatch_thread_start)]
pub(crate) fn registered() -> bool {
    counted()
}

/// How many rounds of destructors glibc runs at most when a thread ends
/// (`PTHREAD_DESTRUCTOR_ITERATIONS`, POSIX's least value).
#[cfg(memwatch_thread_start)]
const EXIT_ROUNDS_MAX: u8 = 4;

/// The `pthread` key whose destructor is `at_exit`, created once.
#[cfg(memwatch_thread_start)]
fn exit_key() -> Option<libc::pthread_key_t> {
    static KEY: std::sync::OnceLock<Option<libc::pthread_key_t>> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let mut key = 0;
        // SAFETY: `key` is writable; `at_exit` has the destructor's type.
        (unsafe { libc::pthread_key_create(&mut key, Some(at_exit)) } == 0).then_some(key)
    })
}

/// Gives the key a value on this thread, so that `at_exit` runs when the
/// thread ends.
#[cfg(memwatch_thread_start)]
fn arm(key: libc::pthread_key_t) -> bool {
    // SAFETY: `key` came from `pthread_key_create`; the value is only a
    // non-null marker, never dereferenced.
    unsafe { libc::pthread_setspecific(key, ptr::NonNull::<u8>::dangling().as_ptr().cast()) == 0 }
}

/// The end of a thread that registered as it started. glibc runs key
/// destructors after every thread-local destructor (Rust's included), so
/// the first round folds what the thread's life left and retires its entry
/// after all of them. Later rounds, which each round asks for by re-arming,
/// fold what other keys' destructors did meanwhile; jemalloc's callback,
/// left installed, folds beyond the default slack until the thread is gone.
#[cfg(memwatch_thread_start)]
unsafe extern "C" fn at_exit(_: *mut c_void) {
    let round = EXIT_ROUNDS.with(|r| {
        r.set(r.get().saturating_add(1));
        r.get()
    });
    match STATE.with(Cell::get) {
        ACTIVE => {
            STATE.with(|s| s.set(EXITED));
            leave();
        }
        // SAFETY: this is the owning thread; its counters stay set.
        EXITED => THREAD.with(|t| t.fold(unsafe { t.net() })),
        _ => return,
    }
    if round < EXIT_ROUNDS_MAX {
        if let Some(key) = exit_key() {
            arm(key);
        }
    }
}

/// Folds what is left of the calling thread's count and retires its entry.
fn leave() {
    let entry = ENTRY.with(|e| e.replace(usize::MAX));
    THREAD.with(|t| {
        // SAFETY: this is the owning thread, still listed.
        t.fold(unsafe { t.net() });
        // Waits only for readers already summing.
        TABLE.retire(entry);
    });
}

/// jemalloc's activity callback: runs on the owning thread, inside one of
/// its allocations or frees, every 64 KiB of either, and folds once more
/// than [`CALLBACK_FOLD`] is unfolded.
unsafe extern "C" fn on_activity(uctx: *mut c_void, allocated: u64, deallocated: u64) {
    // SAFETY: `uctx` is the calling thread's own `THREAD`, installed by
    // `enlist`; `THREAD` lives as long as the thread.
    let t = unsafe { &*uctx.cast::<Thread>() };
    let net = (allocated.wrapping_sub(deallocated) as isize).wrapping_sub(t.base.load(Relaxed));
    if t.folded.pending(net).unsigned_abs() > CALLBACK_FOLD {
        t.fold(net);
    }
    // Where threads register as they start, this is the first sign that
    // the heap is jemalloc's.
    crate::stats::note_jemalloc_inner();
}

/// Uninstalls the callback, folds what is left and retires the entry of an
/// exiting thread that registered on its first call.
#[cfg(not(memwatch_thread_start))]
struct Exit;

#[cfg(not(memwatch_thread_start))]
impl Drop for Exit {
    fn drop(&mut self) {
        if STATE.with(|s| s.replace(DIRECT)) != ACTIVE {
            return;
        }
        // Later calls of this thread count themselves: the callback must
        // not fold them as well.
        install(Thunk {
            callback: None,
            uctx: ptr::null_mut(),
        });
        leave();
    }
}

/// How many threads are listed now. Relaxed: a statistic.
#[cfg(test)]
pub(crate) fn threads_listed() -> usize {
    TABLE.listed()
}
