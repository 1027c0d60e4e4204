//! An independent tally to check memwatch's reading against: a global
//! allocator that forwards to memwatch and adds every block's size to one
//! shared atomic. Slow (one shared `fetch_add` per call), exact, and blind
//! to memwatch's design, so a test can assert that the reading moved by
//! exactly what the program's allocations moved, whatever std or the C
//! library did meanwhile (std's own maps are freed by threads that never
//! allocated them, for instance).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering::SeqCst};

use memwatch::MemWatch;

/// Bytes live through [`Audited`], counted as memwatch counts them.
static TALLY: AtomicIsize = AtomicIsize::new(0);

/// What [`Audited`] tallies since the process started.
pub fn tally() -> isize {
    TALLY.load(SeqCst)
}

/// memwatch over `A`, with every block also tallied in [`tally`] by
/// `size(block, requested)`: the requested size over `System`, the usable
/// size over jemalloc (what memwatch counts there).
pub struct Audited<A: 'static> {
    inner: MemWatch<A>,
    size: fn(*mut u8, usize) -> usize,
}

impl<A> Audited<A> {
    /// Wraps `inner`, tallying blocks by `size`.
    pub const fn new(inner: MemWatch<A>, size: fn(*mut u8, usize) -> usize) -> Self {
        Audited { inner, size }
    }
}

// SAFETY: every call is forwarded unchanged to `inner`, a `GlobalAlloc`;
// the tally only reads the block's size.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for Audited<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            TALLY.fetch_add((self.size)(p, layout.size()) as isize, SeqCst);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            TALLY.fetch_add((self.size)(p, layout.size()) as isize, SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        TALLY.fetch_sub((self.size)(ptr, layout.size()) as isize, SeqCst);
        // SAFETY: `ptr` came from `inner` with `layout`.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = (self.size)(ptr, layout.size()) as isize;
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            TALLY.fetch_add((self.size)(p, new_size) as isize - old, SeqCst);
        }
        p
    }
}
