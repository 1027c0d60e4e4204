//! The wrapper: a `GlobalAlloc` that forwards to an inner allocator and counts.

use std::alloc::{GlobalAlloc, Layout};

use crate::counter::{self, DEFAULT_SLACK, MAX_SLACK};
#[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
use crate::jemalloc_count as je;
#[cfg(feature = "jemalloc")]
use crate::stats;

/// The inner allocator used when none is named: jemalloc with the `jemalloc`
/// feature (the default), `std::alloc::System` without it.
#[cfg(feature = "jemalloc")]
pub type DefaultInner = tikv_jemallocator::Jemalloc;
/// The inner allocator used when none is named: jemalloc with the `jemalloc`
/// feature (the default), `std::alloc::System` without it.
#[cfg(not(feature = "jemalloc"))]
pub type DefaultInner = std::alloc::System;

/// A global allocator that counts live heap bytes in-band and trips the
/// shutdown latch when they cross the threshold.
///
/// Every `MemWatch` in a process shares one counter and one latch: a process
/// has one global allocator, and the count is the process's.
///
/// Over [`Jemalloc`](crate::Jemalloc), the count is jemalloc's own
/// per-thread counters, in usable sizes, folded into the shared total
/// (where the threshold is checked) every 64 KiB of a thread's allocation
/// or free once more than the slack is unfolded. On Linux with glibc,
/// memwatch registers each thread as it starts, from its own
/// `pthread_create`, and the wrapper adds nothing to a call: threads that a
/// shared library starts with its own `pthread_create` are not counted (the
/// `register-on-first-call` feature counts them, with a check on every
/// call). Over any other inner allocator, memwatch counts requested sizes
/// itself, in per-thread batches of `slack` bytes.
///
/// ```
/// use memwatch::MemWatch;
///
/// #[global_allocator]
/// static GLOBAL: MemWatch = MemWatch::new(memwatch::Jemalloc);
/// # fn main() { let v = vec![0u8; 1024]; assert!(memwatch::live_bytes() >= v.len()); }
/// ```
pub struct MemWatch<A = DefaultInner> {
    inner: A,
    slack: usize,
}

impl<A> MemWatch<A> {
    /// Wraps `inner` with the default slack, [`DEFAULT_SLACK`] (4 MiB).
    pub const fn new(inner: A) -> Self {
        MemWatch {
            inner,
            slack: DEFAULT_SLACK,
        }
    }

    /// Sets the per-thread slack in bytes: how far a thread's uncounted delta
    /// may grow before it is folded into the shared total that the threshold
    /// check reads. The check can be late (or early) by at most `slack`
    /// per thread. `0` folds every call: exact, and as slow as one shared
    /// atomic.
    ///
    /// Over jemalloc, the counters are jemalloc's, looked at every 64 KiB
    /// of a thread's allocation or free and folded once more than the
    /// default slack is unfolded: with a slack of [`DEFAULT_SLACK`] or more
    /// the check is late by less than the default slack plus 64 KiB per
    /// thread, at no cost per call. A smaller slack also looks after every
    /// call and folds once more than the slack is unfolded, which costs a
    /// few loads per call.
    ///
    /// # Panics
    ///
    /// If `slack` exceeds [`MAX_SLACK`] (2^61 bytes; in a `static`, a
    /// compile error).
    pub const fn with_slack(mut self, slack: usize) -> Self {
        assert!(slack <= MAX_SLACK, "slack exceeds MAX_SLACK");
        self.slack = slack;
        self
    }

    /// The per-thread slack in bytes.
    pub const fn slack(&self) -> usize {
        self.slack
    }

    /// The inner allocator.
    pub const fn inner(&self) -> &A {
        &self.inner
    }
}

// `Layout::size()` is at most `isize::MAX`, so the `as isize` casts below are
// lossless; the realloc difference of two such sizes cannot overflow either.
//
// Over jemalloc (with at least the default slack) each method jumps into
// jemalloc, which counts, after checking that it counts for the calling
// thread where threads register on their first call; see `jemalloc_count`.
// Otherwise each method counts first, in memwatch's own
// per-thread count, and then hands the call to the inner allocator as its
// last act. Compiled into `__rust_alloc` and friends, that last act is a
// jump, not a call: no stack frame, no register saved across the call, no
// return through this function. Counting after the call instead (to count
// only what succeeded) made a small alloc+free pair cost a program 1.2x to
// 1.3x what bare jemalloc costs; counting first, 1.03x to 1.13x (see
// docs/design.md). The price: an allocation or growth that the inner
// allocator refuses has been counted anyway. Only calls that stay within the
// thread's slack window count first, so each such error is at most twice the
// slack, and an allocator refuses such small requests only when the kernel
// has no memory to give; calls outside the window (every request larger than
// twice the slack among them) take the cold path, which counts only what
// succeeded.
//
// SAFETY: every method forwards to the inner allocator with the caller's
// arguments unchanged and returns its result unchanged, so `MemWatch` upholds
// `GlobalAlloc`'s contract exactly when `A` does. Counting touches only
// atomics and allocation-free thread-locals (see `counter`), and over
// jemalloc, on the cold paths, jemalloc's own `mallctl` and `sallocx`, which
// never call back into Rust's allocator; it never touches the memory itself
// and never unwinds.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for MemWatch<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        unsafe { self.alloc_either(layout, false) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc_zeroed`'s contract for `layout`.
        unsafe { self.alloc_either(layout, true) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
        if self.jemalloc_counts() {
            return if self.slack < je::CALLBACK_FOLD {
                // SAFETY: the caller's contract, passed on.
                unsafe { Self::dealloc_settled(ptr, layout, self) }
            } else if je::listed() {
                // SAFETY: the caller guarantees `ptr` came from this
                // allocator, hence from `inner`, with `layout`.
                unsafe { self.inner.dealloc(ptr, layout) }
            } else {
                // SAFETY: as above.
                unsafe { Self::dealloc_unlisted(ptr, layout, self) }
            };
        }
        if counter::try_record_free(layout.size()) {
            // SAFETY: the caller guarantees `ptr` came from this allocator
            // (hence from `inner`, since every method forwards) with
            // `layout`.
            unsafe { self.inner.dealloc(ptr, layout) }
        } else {
            // SAFETY: as above.
            unsafe { Self::dealloc_cold(ptr, layout, self) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
        if self.jemalloc_counts() {
            return if self.slack < je::CALLBACK_FOLD {
                // SAFETY: the caller's contract, passed on.
                unsafe { Self::realloc_settled(ptr, layout, new_size, self) }
            } else if je::listed() {
                // SAFETY: the caller upholds `realloc`'s contract; `ptr`
                // came from `inner` as in `dealloc`.
                unsafe { self.inner.realloc(ptr, layout, new_size) }
            } else {
                // SAFETY: as above.
                unsafe { Self::realloc_unlisted(ptr, layout, new_size, self) }
            };
        }
        let delta = new_size as isize - layout.size() as isize;
        if counter::try_record(delta, self.slack) {
            // SAFETY: the caller upholds `realloc`'s contract; `ptr` came
            // from `inner` as in `dealloc`.
            unsafe { self.inner.realloc(ptr, layout, new_size) }
        } else {
            // SAFETY: as above.
            unsafe { Self::realloc_cold(ptr, layout, new_size, self) }
        }
    }
}

// The fast paths' shared body.
impl<A: GlobalAlloc + 'static> MemWatch<A> {
    /// `alloc`, or `alloc_zeroed` if `zeroed`: one body for both, with
    /// `zeroed` a constant wherever it is inlined.
    ///
    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[inline(always)]
    unsafe fn alloc_either(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        #[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
        if self.jemalloc_counts() {
            return if self.slack < je::CALLBACK_FOLD {
                // SAFETY: the caller's contract, passed on.
                unsafe { Self::alloc_settled(layout, zeroed, self) }
            } else if je::listed() {
                // SAFETY: the caller upholds the contract for `layout`.
                unsafe { self.inner_alloc(layout, zeroed) }
            } else {
                // SAFETY: as above.
                unsafe { Self::alloc_unlisted(layout, zeroed, self) }
            };
        }
        if counter::try_record(layout.size() as isize, self.slack) {
            // SAFETY: the caller upholds the contract for `layout`.
            unsafe { self.inner_alloc(layout, zeroed) }
        } else {
            // SAFETY: as above.
            unsafe { Self::alloc_cold(layout, zeroed, self) }
        }
    }

    /// The inner allocator's `alloc`, or `alloc_zeroed` if `zeroed`.
    ///
    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[inline(always)]
    unsafe fn inner_alloc(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: the caller upholds the contract for `layout`.
        unsafe {
            if zeroed {
                self.inner.alloc_zeroed(layout)
            } else {
                self.inner.alloc(layout)
            }
        }
    }
}

// The cold paths: the call falls outside the thread's slack window (a fold
// is due, the request is large, or the thread has no table entry yet). Each
// calls the inner allocator first and counts only what succeeded. They are
// never inlined, so that the fast paths above stay a count and a jump, and
// they take the caller's arguments in the caller's order with `this` last,
// so that the jump to them moves no register on the way.
impl<A: GlobalAlloc + 'static> MemWatch<A> {
    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_cold(layout: Layout, zeroed: bool, this: &Self) -> *mut u8 {
        // SAFETY: the caller upholds the contract for `layout`.
        let ptr = unsafe { this.inner_alloc(layout, zeroed) };
        if !ptr.is_null() {
            counter::record(layout.size() as isize, this.slack, note_inner::<A>);
        }
        ptr
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_cold(ptr: *mut u8, layout: Layout, this: &Self) {
        counter::record_free(layout.size(), this.slack, note_inner::<A>);
        // SAFETY: the caller guarantees `ptr` came from `inner` with
        // `layout`.
        unsafe { this.inner.dealloc(ptr, layout) }
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::realloc`].
    #[cold]
    #[inline(never)]
    unsafe fn realloc_cold(ptr: *mut u8, layout: Layout, new_size: usize, this: &Self) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe { this.inner.realloc(ptr, layout, new_size) };
        // A null result leaves the old block allocated: nothing changed.
        if !new.is_null() {
            counter::record(
                new_size as isize - layout.size() as isize,
                this.slack,
                note_inner::<A>,
            );
        }
        new
    }
}

// Over jemalloc, jemalloc counts (see `jemalloc_count`): the fast paths
// above only check that it does so for the calling thread. The calls of a
// thread it does not count (not yet registered, exiting, or without a table
// entry) come here and count the usable size of the block themselves.
#[cfg(all(feature = "jemalloc", target_pointer_width = "64"))]
impl<A: GlobalAlloc + 'static> MemWatch<A> {
    /// Whether jemalloc's own counters count this allocator's calls: `A` is
    /// jemalloc. A constant wherever it is inlined, as is the slack of a
    /// `static`, so the compiler keeps one path.
    #[inline(always)]
    fn jemalloc_counts(&self) -> bool {
        std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
    }

    // A slack under the default asks for a tighter threshold check than
    // jemalloc's callback gives: these fold after every call whose thread
    // has more than the slack unfolded.

    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[inline(never)]
    unsafe fn alloc_settled(layout: Layout, zeroed: bool, this: &Self) -> *mut u8 {
        // SAFETY: the caller upholds the contract for `layout`.
        let ptr = unsafe {
            if je::listed() {
                this.inner_alloc(layout, zeroed)
            } else {
                Self::alloc_unlisted(layout, zeroed, this)
            }
        };
        je::settle(this.slack);
        ptr
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::dealloc`].
    #[inline(never)]
    unsafe fn dealloc_settled(ptr: *mut u8, layout: Layout, this: &Self) {
        // SAFETY: the caller guarantees `ptr` came from `inner` with
        // `layout`.
        unsafe {
            if je::listed() {
                this.inner.dealloc(ptr, layout)
            } else {
                Self::dealloc_unlisted(ptr, layout, this)
            }
        }
        je::settle(this.slack);
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::realloc`].
    #[inline(never)]
    unsafe fn realloc_settled(
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        this: &Self,
    ) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe {
            if je::listed() {
                this.inner.realloc(ptr, layout, new_size)
            } else {
                Self::realloc_unlisted(ptr, layout, new_size, this)
            }
        };
        je::settle(this.slack);
        new
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_unlisted(layout: Layout, zeroed: bool, this: &Self) -> *mut u8 {
        let listed = je::register_or_direct();
        // SAFETY: the caller upholds the contract for `layout`.
        let ptr = unsafe { this.inner_alloc(layout, zeroed) };
        if !listed && !ptr.is_null() {
            // SAFETY: `ptr` is a live block of `inner`, which is jemalloc.
            counter::fold(unsafe { je::usable_size(ptr) });
        }
        ptr
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_unlisted(ptr: *mut u8, layout: Layout, this: &Self) {
        if !je::register_or_direct() {
            // SAFETY: the caller guarantees `ptr` is a live block of
            // `inner`, which is jemalloc.
            counter::fold(-unsafe { je::usable_size(ptr) });
        }
        // SAFETY: the caller guarantees `ptr` came from `inner` with
        // `layout`.
        unsafe { this.inner.dealloc(ptr, layout) }
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::realloc`].
    #[cold]
    #[inline(never)]
    unsafe fn realloc_unlisted(
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        this: &Self,
    ) -> *mut u8 {
        if je::register_or_direct() {
            // SAFETY: the caller upholds `realloc`'s contract.
            return unsafe { this.inner.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `ptr` is a live block of `inner`,
        // which is jemalloc.
        let old = unsafe { je::usable_size(ptr) };
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe { this.inner.realloc(ptr, layout, new_size) };
        // A null result leaves the old block allocated: nothing changed.
        if !new.is_null() {
            // SAFETY: `new` is a live block of jemalloc.
            counter::fold(unsafe { je::usable_size(new) } - old);
        }
        new
    }
}

/// Runs once per thread, off the fast path: notes whether the allocator in
/// use wraps jemalloc, so that the trip report shows jemalloc's figures only
/// when they describe this heap. `TypeId` comparison neither allocates nor
/// locks.
#[cold]
fn note_inner<A: 'static>() {
    #[cfg(feature = "jemalloc")]
    if std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>() {
        stats::note_jemalloc_inner();
    }
}
