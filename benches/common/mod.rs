//! The allocators the benches compare, all reached through `GlobalAlloc` on
//! instances in one binary, and the naive design as a reference.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use memwatch::{Jemalloc, MemWatch};

/// The naive design: one shared atomic updated on every call.
pub struct SharedAtomic<A> {
    inner: A,
    live: AtomicUsize,
}

impl<A> SharedAtomic<A> {
    pub const fn new(inner: A) -> Self {
        SharedAtomic {
            inner,
            live: AtomicUsize::new(0),
        }
    }
}

// SAFETY: forwards every call unchanged to `inner`.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SharedAtomic<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            // A statistic: Relaxed is enough.
            self.live.fetch_add(layout.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `inner` with `layout`.
        unsafe { self.inner.dealloc(ptr, layout) };
        self.live.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.live.fetch_add(new_size, Relaxed);
            self.live.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

/// The floor of any design that keeps something per thread: before jumping
/// into jemalloc it compares one thread-local byte, which the thread's first
/// call sets, and does nothing else. memwatch over jemalloc does exactly
/// this on its fast path; the paired table shows what the compare alone
/// costs.
pub struct ThreadCheck;

thread_local! {
    static SEEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cold]
#[inline(never)]
fn first_call() {
    SEEN.with(|s| s.set(true));
}

// SAFETY: forwards every call unchanged to jemalloc.
unsafe impl GlobalAlloc for ThreadCheck {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !SEEN.with(std::cell::Cell::get) {
            first_call();
        }
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { Jemalloc.alloc(layout) }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !SEEN.with(std::cell::Cell::get) {
            first_call();
        }
        // SAFETY: `ptr` came from jemalloc with `layout`.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }
}

pub static THREAD_CHECK: ThreadCheck = ThreadCheck;
pub static SYSTEM: System = System;
pub static JEMALLOC: Jemalloc = Jemalloc;
pub static MEMWATCH_JEMALLOC: MemWatch<Jemalloc> = MemWatch::new(Jemalloc);
pub static MEMWATCH_SYSTEM: MemWatch<System> = MemWatch::new(System);
pub static CAP_JEMALLOC: cap::Cap<Jemalloc> = cap::Cap::new(Jemalloc, usize::MAX);
pub static ATOMIC_JEMALLOC: SharedAtomic<Jemalloc> = SharedAtomic::new(Jemalloc);

/// Calls `$f::<Type>(name, &STATIC)` for every allocator under test, in the
/// order the report uses: monomorphised, so each is called the way a
/// `#[global_allocator]` would be, without dynamic dispatch.
#[macro_export]
macro_rules! for_each_allocator {
    ($f:expr, ( $($arg:expr),* )) => {{
        use $crate::common::*;
        $f($($arg,)* "system", &SYSTEM);
        $f($($arg,)* "jemalloc", &JEMALLOC);
        $f($($arg,)* "memwatch-jemalloc", &MEMWATCH_JEMALLOC);
        $f($($arg,)* "memwatch-system", &MEMWATCH_SYSTEM);
        $f($($arg,)* "cap-jemalloc", &CAP_JEMALLOC);
        $f($($arg,)* "atomic-jemalloc", &ATOMIC_JEMALLOC);
    }};
}

/// An allocator under test as a program reaches its `#[global_allocator]`:
/// through a static, so that what the wrapper reads of itself (memwatch's
/// slack) is a constant, as it is in a real binary.
pub trait Global: GlobalAlloc + Sync + 'static {
    fn get() -> &'static Self;
}

macro_rules! global {
    ($($ty:ty => $static:ident),* $(,)?) => {
        $(impl Global for $ty {
            fn get() -> &'static Self {
                &$static
            }
        })*
    };
}

global! {
    System => SYSTEM,
    Jemalloc => JEMALLOC,
    MemWatch<Jemalloc> => MEMWATCH_JEMALLOC,
    MemWatch<System> => MEMWATCH_SYSTEM,
    cap::Cap<Jemalloc> => CAP_JEMALLOC,
    SharedAtomic<Jemalloc> => ATOMIC_JEMALLOC,
    ThreadCheck => THREAD_CHECK,
}

/// What rustc generates as `__rust_alloc` for a `#[global_allocator]`: a
/// function of its own that every allocation in the program calls, with
/// the allocator's `alloc` inlined into it.
///
/// # Safety
///
/// As `GlobalAlloc::alloc`, with `size` and `align` a valid non-zero layout.
#[inline(never)]
pub unsafe fn rust_alloc<A: Global>(size: usize, align: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid layout.
    unsafe { A::get().alloc(Layout::from_size_align_unchecked(size, align)) }
}

/// What rustc generates as `__rust_dealloc`; see [`rust_alloc`].
///
/// # Safety
///
/// As `GlobalAlloc::dealloc`.
#[inline(never)]
pub unsafe fn rust_dealloc<A: Global>(ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: the caller passes a block of `A` with its layout.
    unsafe { A::get().dealloc(ptr, Layout::from_size_align_unchecked(size, align)) }
}

/// `n` alloc+free pairs of `SIZE` bytes, each call through [`rust_alloc`]
/// and [`rust_dealloc`], as a program makes them: the small-block workload
/// of every pair bench.
#[inline]
pub fn pairs<const SIZE: usize, A: Global>(n: u64) {
    for _ in 0..n {
        // SAFETY: non-zero size; freed with the same layout and allocator.
        unsafe {
            let p = rust_alloc::<A>(SIZE, 8);
            black_box(p);
            rust_dealloc::<A>(p, SIZE, 8);
        }
    }
}

/// [`pairs`] with the allocator's methods inlined into the loop, as no
/// program calls them: the wrapper's cost without the call around it.
#[inline]
pub fn pairs_inlined<const SIZE: usize, A: GlobalAlloc>(a: &A, n: u64) {
    let layout = Layout::from_size_align(SIZE, 8).unwrap();
    for _ in 0..n {
        // SAFETY: non-zero size; freed with the same layout and allocator.
        unsafe {
            let p = a.alloc(layout);
            black_box(p);
            a.dealloc(p, layout);
        }
    }
}

/// Writes `rows` as one JSON object to `target/criterion/<file>`, where
/// `benches/report.py` looks for the figures that criterion does not keep.
pub fn write_rows(file: &str, rows: &[String]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), format!("{{{}}}", rows.join(", "))).unwrap();
}
