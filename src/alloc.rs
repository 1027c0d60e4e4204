//! The wrapper: a `GlobalAlloc` that forwards to an inner allocator and counts.

use std::alloc::{GlobalAlloc, Layout};

#[cfg(memwatch_jemalloc_counts)]
use crate::count::jemalloc::{self as je, Cold};
use crate::count::{hold_if_over, own, DEFAULT_SLACK, MAX_SLACK};
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
/// Over [`Jemalloc`](crate::Jemalloc) on Linux, the count is jemalloc's own
/// per-thread counters, in usable sizes: a call stays on the fast path while
/// a thread-local credit covers its weight (its size plus 16), and a call
/// it does not cover looks at the counters after jemalloc returns,
/// publishes them for readings, folds them into the shared total (where the
/// threshold is checked) once more than the thread's allowance is unfolded,
/// and sets the credit to the thread's interval again. Over any other inner allocator, memwatch
/// counts requested sizes itself, in per-thread batches of that allowance.
/// Either way every thread is counted from its first call, whatever started
/// it.
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

    /// Sets the per-thread slack in bytes: the most a thread's unfolded
    /// delta may grow before it is folded into the shared total that the
    /// threshold check reads. A thread's allowance from the process's error
    /// budget (see [`MIN_BUDGET`](crate::MIN_BUDGET)) is its share of a pool
    /// that all threads draw from; the slack caps it. `0` folds every call:
    /// exact, and as slow as one shared atomic.
    ///
    /// Over jemalloc, the counters are jemalloc's, looked at once one has
    /// moved by the thread's interval (48 KiB plus its allowance, and never
    /// more than `slack`), and folded once more than the allowance is
    /// unfolded.
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
// lossless, and so is the realloc difference of two such sizes.
//
// Each fast path does its bookkeeping first and ends in a jump into the inner
// allocator; a miss jumps to a never-inlined cold path that takes the
// caller's arguments in order, `this` last (docs/design.md, "Counting at
// jemalloc speed", also for what counting first means for a refused call).
//
// SAFETY: every method forwards to the inner allocator with the caller's
// arguments unchanged and returns its result unchanged, so `MemWatch`
// upholds `GlobalAlloc`'s contract exactly when `A` does. The bookkeeping
// touches only atomics, allocation-free thread-locals and, off the fast
// path, jemalloc's `mallctl` and `sallocx`, the C library's `pthread` key and
// fork-handler calls and `mmap`, none of which calls back into Rust's
// allocator; it never touches the memory itself and never unwinds.
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
        #[cfg(memwatch_jemalloc_counts)]
        if self.jemalloc_counts() {
            return if je::take(layout) {
                // SAFETY: the caller guarantees `ptr` came from this
                // allocator (hence from `inner`, since every method
                // forwards) with `layout`.
                unsafe { self.inner.dealloc(ptr, layout) }
            } else {
                // SAFETY: as above.
                unsafe { Self::dealloc_looking(ptr, layout, self) }
            };
        }
        if own::try_record_free(layout.size()) {
            // SAFETY: as above.
            unsafe { self.inner.dealloc(ptr, layout) }
        } else {
            // SAFETY: as above.
            unsafe { Self::dealloc_cold(ptr, layout, self) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        #[cfg(memwatch_jemalloc_counts)]
        if self.jemalloc_counts() {
            return if je::resize(layout, new_size) {
                // SAFETY: the caller upholds `realloc`'s contract; `ptr`
                // came from `inner` as in `dealloc`.
                unsafe { self.inner.realloc(ptr, layout, new_size) }
            } else {
                // SAFETY: as above.
                unsafe { Self::realloc_looking(ptr, layout, new_size, self) }
            };
        }
        let delta = new_size as isize - layout.size() as isize;
        if own::try_record(delta) {
            // SAFETY: as above.
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
        #[cfg(memwatch_jemalloc_counts)]
        if self.jemalloc_counts() {
            return if je::add(layout) {
                // SAFETY: the caller upholds the contract for `layout`.
                unsafe { self.inner_alloc(layout, zeroed) }
            } else {
                // SAFETY: as above.
                unsafe { Self::alloc_looking(layout, zeroed, self) }
            };
        }
        if own::try_record(layout.size() as isize) {
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

// memwatch's own count, off the fast path: the call falls outside the
// thread's slack window (a fold is due, the request is large, or the thread
// has no slot yet). Each calls the inner allocator first and counts only
// what succeeded.
impl<A: GlobalAlloc + 'static> MemWatch<A> {
    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_cold(layout: Layout, zeroed: bool, this: &Self) -> *mut u8 {
        hold_if_over(layout.size());
        // SAFETY: the caller upholds the contract for `layout`.
        let ptr = unsafe { this.inner_alloc(layout, zeroed) };
        if !ptr.is_null() {
            own::record(layout.size() as isize, this.slack, note_inner::<A>);
        }
        ptr
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_cold(ptr: *mut u8, layout: Layout, this: &Self) {
        own::record(-(layout.size() as isize), this.slack, note_inner::<A>);
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
        hold_if_over(new_size.saturating_sub(layout.size()));
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe { this.inner.realloc(ptr, layout, new_size) };
        // A null result leaves the old block allocated: nothing changed.
        if !new.is_null() {
            own::record(
                new_size as isize - layout.size() as isize,
                this.slack,
                note_inner::<A>,
            );
        }
        new
    }
}

// Over jemalloc, off the fast path: the call's credit does not cover it
// (or it is aligned, or the thread has no slot
// yet). `je::cold` joins the thread if it never tried; the call then looks
// at the counters right after it, so that the reading sees it at once, and
// a thread without a slot counts the block's usable size itself.
#[cfg(memwatch_jemalloc_counts)]
impl<A: GlobalAlloc + 'static> MemWatch<A> {
    /// Whether jemalloc's own counters count this allocator's calls: `A` is
    /// jemalloc. A constant wherever it is inlined.
    #[inline(always)]
    fn jemalloc_counts(&self) -> bool {
        std::any::TypeId::of::<A>() == std::any::TypeId::of::<tikv_jemallocator::Jemalloc>()
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`] (or `alloc_zeroed` if `zeroed`).
    #[cold]
    #[inline(never)]
    unsafe fn alloc_looking(layout: Layout, zeroed: bool, this: &Self) -> *mut u8 {
        let cold = je::cold(layout, false, this.slack);
        hold_if_over(layout.size());
        // SAFETY: the caller upholds the contract for `layout`.
        let ptr = unsafe { this.inner_alloc(layout, zeroed) };
        match cold {
            Cold::Fits => {}
            Cold::Look => je::look_now(this.slack),
            Cold::CountItself if !ptr.is_null() => {
                // SAFETY: `ptr` is a live block of `inner`, which is jemalloc.
                je::count_itself(unsafe { je::usable_size(ptr) });
            }
            Cold::CountItself => {}
        }
        ptr
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::dealloc`].
    #[cold]
    #[inline(never)]
    unsafe fn dealloc_looking(ptr: *mut u8, layout: Layout, this: &Self) {
        let cold = je::cold(layout, true, this.slack);
        if cold == Cold::CountItself {
            // SAFETY: the caller guarantees `ptr` is a live block of
            // `inner`, which is jemalloc.
            je::count_itself(-unsafe { je::usable_size(ptr) });
        }
        // SAFETY: the caller guarantees `ptr` came from `inner` with
        // `layout`.
        unsafe { this.inner.dealloc(ptr, layout) };
        if cold == Cold::Look {
            je::look_now(this.slack);
        }
    }

    /// # Safety
    ///
    /// As [`GlobalAlloc::realloc`].
    #[cold]
    #[inline(never)]
    unsafe fn realloc_looking(
        ptr: *mut u8,
        layout: Layout,
        new_size: usize,
        this: &Self,
    ) -> *mut u8 {
        let cold = je::cold_resize(this.slack);
        hold_if_over(new_size.saturating_sub(layout.size()));
        let old = if cold == Cold::CountItself {
            // SAFETY: the caller guarantees `ptr` is a live block of
            // `inner`, which is jemalloc.
            unsafe { je::usable_size(ptr) }
        } else {
            0
        };
        // SAFETY: the caller upholds `realloc`'s contract.
        let new = unsafe { this.inner.realloc(ptr, layout, new_size) };
        match cold {
            Cold::Fits => {}
            Cold::Look => je::look_now(this.slack),
            // A null result leaves the old block allocated: nothing changed.
            Cold::CountItself if !new.is_null() => {
                // SAFETY: `new` is a live block of jemalloc.
                je::count_itself(unsafe { je::usable_size(new) } - old);
            }
            Cold::CountItself => {}
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
