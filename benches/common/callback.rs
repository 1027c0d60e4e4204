//! memwatch's jemalloc callback, on or off for the calling thread.
//!
//! Where memwatch registers threads as they start (Linux with glibc), every
//! thread of a program that links memwatch, these benches included, has
//! memwatch's activity callback installed in jemalloc, whatever allocator
//! the program then calls. A program without memwatch has none. So bare
//! jemalloc, and every allocator but memwatch over jemalloc, is measured
//! with it removed from the measuring thread: the baseline is the jemalloc
//! of a program that does not link memwatch.

use std::ffi::c_void;
use std::ptr;

/// jemalloc's `activity_callback_thunk_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Thunk {
    callback: *mut c_void,
    uctx: *mut c_void,
}

/// No callback.
pub const NONE: Thunk = Thunk {
    callback: ptr::null_mut(),
    uctx: ptr::null_mut(),
};

/// Makes `new` the calling thread's callback and returns the one it had.
pub fn swap(new: Thunk) -> Thunk {
    let (mut old, mut new) = (NONE, new);
    let mut len = std::mem::size_of::<Thunk>();
    // SAFETY: the name is NUL-terminated; both buffers are jemalloc's
    // thunk type, and `len` is its size.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"experimental.thread.activity_callback".as_ptr(),
            ptr::from_mut(&mut old).cast(),
            &mut len,
            ptr::from_mut(&mut new).cast(),
            std::mem::size_of::<Thunk>(),
        )
    };
    assert_eq!(rc, 0, "experimental.thread.activity_callback");
    old
}

/// Whether `A` is memwatch over jemalloc, the one allocator measured with
/// memwatch's callback.
pub fn is_memwatch_jemalloc<A: 'static>() -> bool {
    std::any::TypeId::of::<A>() == std::any::TypeId::of::<memwatch::MemWatch<memwatch::Jemalloc>>()
}

/// Sets the calling thread up to measure `A`: memwatch's callback stays for
/// memwatch over jemalloc and goes for everything else. Returns the thread's
/// callback before, for [`swap`] to put back.
pub fn for_allocator<A: 'static>() -> Thunk {
    if is_memwatch_jemalloc::<A>() {
        let current = swap(NONE);
        swap(current);
        current
    } else {
        swap(NONE)
    }
}
