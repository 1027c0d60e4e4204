//! The allocators the benches compare, all reached through `GlobalAlloc` on
//! instances in one binary, and the naive design as a reference.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

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

/// A wrapper over jemalloc whose only work is one compare of a flag that
/// the first call sets, with memwatch's shape: on the fast path the compare
/// and then the jump into jemalloc, the first call through a cold function.
/// [`ThreadCheck`] keeps the flag in a thread-local, as any design that
/// keeps something per thread must (memwatch over jemalloc does exactly
/// this on its fast path); [`StaticCheck`] in an ordinary static, which no
/// such design can use. Side by side in the paired table, the first shows
/// what the compare costs, the difference between the two what the
/// thread-local load costs.
pub struct Check<F>(PhantomData<F>);

/// Where a [`Check`] keeps its flag.
pub trait Flag: 'static {
    fn is_set() -> bool;
    fn set();
}

pub enum InThread {}
pub enum InStatic {}

thread_local! {
    static SEEN: Cell<bool> = const { Cell::new(false) };
}

static STATIC_SEEN: AtomicBool = AtomicBool::new(false);

impl Flag for InThread {
    #[inline]
    fn is_set() -> bool {
        SEEN.with(Cell::get)
    }
    fn set() {
        SEEN.with(|s| s.set(true));
    }
}

// A flag read only by this bench's own compare: Relaxed is enough.
impl Flag for InStatic {
    #[inline]
    fn is_set() -> bool {
        STATIC_SEEN.load(Relaxed)
    }
    fn set() {
        STATIC_SEEN.store(true, Relaxed);
    }
}

pub type ThreadCheck = Check<InThread>;
pub type StaticCheck = Check<InStatic>;

impl<F: Flag> Check<F> {
    /// # Safety
    ///
    /// As `GlobalAlloc::alloc`.
    #[cold]
    #[inline(never)]
    unsafe fn first_alloc(layout: Layout) -> *mut u8 {
        F::set();
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { Jemalloc.alloc(layout) }
    }

    /// # Safety
    ///
    /// As `GlobalAlloc::dealloc`.
    #[cold]
    #[inline(never)]
    unsafe fn first_dealloc(ptr: *mut u8, layout: Layout) {
        F::set();
        // SAFETY: `ptr` came from jemalloc with `layout`.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }
}

// SAFETY: forwards every call unchanged to jemalloc.
unsafe impl<F: Flag> GlobalAlloc for Check<F> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if F::is_set() {
            // SAFETY: the caller upholds `alloc`'s contract.
            unsafe { Jemalloc.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { Self::first_alloc(layout) }
        }
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if F::is_set() {
            // SAFETY: `ptr` came from jemalloc with `layout`.
            unsafe { Jemalloc.dealloc(ptr, layout) }
        } else {
            // SAFETY: as above.
            unsafe { Self::first_dealloc(ptr, layout) }
        }
    }
}

pub static THREAD_CHECK: ThreadCheck = Check(PhantomData);
pub static STATIC_CHECK: StaticCheck = Check(PhantomData);
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
    StaticCheck => STATIC_CHECK,
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
