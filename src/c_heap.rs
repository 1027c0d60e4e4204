//! The C library's allocation functions, routed through memwatch into the
//! same jemalloc, for [`c_heap!`](crate::c_heap): what C and C++ code
//! allocates (`malloc`, `new`) then counts exactly like the Rust heap.
//!
//! Each function joins the thread on its first call if it has not joined
//! yet and calls jemalloc, then compares the thread's own jemalloc counters
//! with their marks and looks once one reached its mark
//! (`count::jemalloc::c_after`; C gives no size for a free, so the check
//! comes after the call). Between two calls both counters stay below their
//! marks, as for Rust calls, and the error bound is the Rust heap's. A
//! thread without a slot counts each call by its usable size.
//!
//! Only the macro calls these; they are public so that its expansion, in
//! the binary's crate, can.

use std::ffi::{c_int, c_void};

use tikv_jemalloc_sys as sys;

use crate::count::hold_if_over;
use crate::count::jemalloc::{c_after, c_ready, count_itself, usable_size};

/// After an allocation that returned `block` (null: refused): the count.
///
/// # Safety
///
/// `block` is null or a live jemalloc block; `counted` is what
/// [`c_ready`] returned before the call.
#[inline]
unsafe fn allocated(counted: bool, block: *mut c_void) {
    if counted {
        c_after();
    } else if !block.is_null() {
        // SAFETY: a live block jemalloc just returned.
        count_itself(unsafe { usable_size(block.cast()) });
    }
}

/// `malloc`.
///
/// # Safety
///
/// As C's `malloc`.
#[doc(hidden)]
#[inline]
pub unsafe fn malloc(size: usize) -> *mut c_void {
    let counted = c_ready();
    hold_if_over(size);
    // SAFETY: C's contract, which jemalloc's `malloc` implements.
    let block = unsafe { sys::malloc(size) };
    // SAFETY: null or the block jemalloc returned.
    unsafe { allocated(counted, block) };
    block
}

/// `calloc`.
///
/// # Safety
///
/// As C's `calloc`.
#[doc(hidden)]
#[inline]
pub unsafe fn calloc(count: usize, size: usize) -> *mut c_void {
    let counted = c_ready();
    hold_if_over(count.saturating_mul(size));
    // SAFETY: C's contract; jemalloc checks the product for overflow.
    let block = unsafe { sys::calloc(count, size) };
    // SAFETY: null or the block jemalloc returned.
    unsafe { allocated(counted, block) };
    block
}

/// `realloc`.
///
/// # Safety
///
/// As C's `realloc`: `block` is null or a live block of these functions.
#[doc(hidden)]
#[inline]
pub unsafe fn realloc(block: *mut c_void, size: usize) -> *mut c_void {
    if crate::stats::tripped() {
        let old = if block.is_null() {
            0
        } else {
            // SAFETY: a live block (the caller's contract).
            unsafe { sys::malloc_usable_size(block) }
        };
        hold_if_over(size.saturating_sub(old));
    }
    if c_ready() {
        // SAFETY: the caller's contract.
        let moved = unsafe { sys::realloc(block, size) };
        c_after();
        return moved;
    }
    let before = if block.is_null() {
        0
    } else {
        // SAFETY: a live block (the caller's contract).
        unsafe { usable_size(block.cast()) }
    };
    // SAFETY: the caller's contract.
    let moved = unsafe { sys::realloc(block, size) };
    if !moved.is_null() {
        // SAFETY: the live block jemalloc returned.
        count_itself(unsafe { usable_size(moved.cast()) } - before);
    } else if size == 0 {
        // jemalloc frees the block for a size of 0 and returns null.
        count_itself(-before);
    }
    moved
}

/// `free`.
///
/// # Safety
///
/// As C's `free`: `block` is null or a live block of these functions.
#[doc(hidden)]
#[inline]
pub unsafe fn free(block: *mut c_void) {
    if block.is_null() {
        return;
    }
    if c_ready() {
        // SAFETY: the caller's contract.
        unsafe { sys::free(block) };
        c_after();
    } else {
        // SAFETY: a live block, read before it is freed.
        let size = unsafe { usable_size(block.cast()) };
        // SAFETY: the caller's contract.
        unsafe { sys::free(block) };
        count_itself(-size);
    }
}

/// `posix_memalign`.
///
/// # Safety
///
/// As C's `posix_memalign`: `out` is valid for a write.
#[doc(hidden)]
#[inline]
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    let counted = c_ready();
    hold_if_over(size);
    // SAFETY: the caller's contract; jemalloc checks the alignment.
    let rc = unsafe { sys::posix_memalign(out, align, size) };
    // SAFETY: on success `*out` is the new block; otherwise nothing was
    // allocated (null).
    unsafe { allocated(counted, if rc == 0 { *out } else { std::ptr::null_mut() }) };
    rc
}

/// `aligned_alloc`.
///
/// # Safety
///
/// As C's `aligned_alloc`.
#[doc(hidden)]
#[inline]
pub unsafe fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    let counted = c_ready();
    hold_if_over(size);
    // SAFETY: the caller's contract; jemalloc checks the alignment.
    let block = unsafe { sys::aligned_alloc(align, size) };
    // SAFETY: null or the block jemalloc returned.
    unsafe { allocated(counted, block) };
    block
}

/// `memalign`, and with the page size `valloc` and `pvalloc`, as glibc
/// takes the alignment: one below 16 (0 included) is 16, one that is not a
/// power of two is rounded up to the next; past the largest power of two,
/// null with `EINVAL`.
///
/// # Safety
///
/// As glibc's `memalign`.
#[doc(hidden)]
#[inline]
pub unsafe fn memalign(align: usize, size: usize) -> *mut c_void {
    // As glibc: an alignment below the one every block has is that one (0
    // included), and one that is not a power of two is rounded up to the
    // next; past the largest power of two it fails with EINVAL.
    let Some(align) = align.max(16).checked_next_power_of_two() else {
        // SAFETY: the calling thread's errno.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return std::ptr::null_mut();
    };
    let counted = c_ready();
    hold_if_over(size);
    // MALLOCX_ALIGN(align) is log2(align); mallocx takes no size of 0.
    let flags = align.trailing_zeros() as c_int;
    // SAFETY: a non-zero size and a valid alignment flag.
    let block = unsafe { sys::mallocx(size.max(1), flags) };
    if block.is_null() {
        // SAFETY: the calling thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOMEM };
    }
    // SAFETY: null or the block jemalloc returned.
    unsafe { allocated(counted, block) };
    block
}

/// The page size, for `valloc` and `pvalloc`.
#[doc(hidden)]
pub fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// `malloc_usable_size`.
///
/// # Safety
///
/// `block` is null or a live block of these functions.
#[doc(hidden)]
#[inline]
pub unsafe fn malloc_usable_size(block: *const c_void) -> usize {
    if block.is_null() {
        return 0;
    }
    // SAFETY: the caller's contract.
    unsafe { sys::malloc_usable_size(block) }
}

/// Routes the C library's allocation functions (`malloc`, `calloc`,
/// `realloc`, `free`, `posix_memalign`, `aligned_alloc`, `memalign`,
/// `valloc`, `pvalloc`, `malloc_usable_size`, and glibc's `__libc_` forms)
/// through memwatch into the jemalloc under [`MemWatch`](crate::MemWatch),
/// so that what C and C++ libraries allocate (RocksDB, zstd, OpenSSL, and
/// every `new`) is counted exactly like the Rust heap, with the same error
/// bound, and trips the same threshold.
///
/// Invoke it once, in the binary, beside the global allocator, which must be
/// `MemWatch` over [`Jemalloc`](crate::Jemalloc):
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);
/// memwatch::c_heap!();
/// # fn main() {}
/// ```
///
/// What it changes for the whole process: the binary defines the C
/// library's allocation symbols, so every `malloc` in the process, from any
/// library or thread, is jemalloc's (glibc's allocator is not used at all).
/// Do not combine it with a second definition (a sanitizer runtime, another
/// allocator crate, or tikv-jemallocator's
/// `unprefixed_malloc_on_supported_platforms`): two in one link collide, and
/// the binary's wins over a shared library's. Use it in binaries, not in
/// libraries. Linux only, with the `jemalloc` feature; over `System` it
/// would count every block twice.
///
/// A C call costs a thread-local check and a compare of the thread's
/// jemalloc counters on top of jemalloc's own (docs/benchmarks.md).
#[macro_export]
macro_rules! c_heap {
    () => {
        const _: () = {
            use ::core::ffi::{c_int, c_void};

            #[unsafe(no_mangle)]
            unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::malloc(size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::calloc(count, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn realloc(block: *mut c_void, size: usize) -> *mut c_void {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::realloc(block, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn free(block: *mut c_void) {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::free(block) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn posix_memalign(
                out: *mut *mut c_void,
                align: usize,
                size: usize,
            ) -> c_int {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::posix_memalign(out, align, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::aligned_alloc(align, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
                // SAFETY: glibc's contract, passed on.
                unsafe { $crate::__c_heap::memalign(align, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
                // SAFETY: glibc's contract, passed on.
                unsafe { $crate::__c_heap::memalign($crate::__c_heap::page_size(), size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
                let page = $crate::__c_heap::page_size();
                let rounded = size.max(1).div_ceil(page).saturating_mul(page);
                // SAFETY: glibc's contract, passed on.
                unsafe { $crate::__c_heap::memalign(page, rounded) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn malloc_usable_size(block: *const c_void) -> usize {
                // SAFETY: C's contract, passed on.
                unsafe { $crate::__c_heap::malloc_usable_size(block) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
                // SAFETY: as `malloc`.
                unsafe { $crate::__c_heap::malloc(size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_calloc(count: usize, size: usize) -> *mut c_void {
                // SAFETY: as `calloc`.
                unsafe { $crate::__c_heap::calloc(count, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_realloc(block: *mut c_void, size: usize) -> *mut c_void {
                // SAFETY: as `realloc`.
                unsafe { $crate::__c_heap::realloc(block, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_free(block: *mut c_void) {
                // SAFETY: as `free`.
                unsafe { $crate::__c_heap::free(block) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
                // SAFETY: as `memalign`.
                unsafe { $crate::__c_heap::memalign(align, size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
                // SAFETY: as `valloc`.
                unsafe { $crate::__c_heap::memalign($crate::__c_heap::page_size(), size) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
                let page = $crate::__c_heap::page_size();
                let rounded = size.max(1).div_ceil(page).saturating_mul(page);
                // SAFETY: as `pvalloc`.
                unsafe { $crate::__c_heap::memalign(page, rounded) }
            }
            #[unsafe(no_mangle)]
            unsafe extern "C" fn __posix_memalign(
                out: *mut *mut c_void,
                align: usize,
                size: usize,
            ) -> c_int {
                // SAFETY: as `posix_memalign`.
                unsafe { $crate::__c_heap::posix_memalign(out, align, size) }
            }
        };
    };
}
