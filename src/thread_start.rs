//! Registers every thread with jemalloc's counters as it starts, so that
//! `MemWatch<Jemalloc>`'s fast path has nothing to check (built where the
//! cfg `memwatch_thread_start` is set; see `build.rs`).
//!
//! jemalloc offers no hook that runs when a thread starts, and neither does
//! Rust's standard library, so memwatch defines `pthread_create` itself, as
//! jemalloc does in its lazy-lock mode and as heap profilers do. Linked into
//! a program, this definition takes the place of the C library's for every
//! call made from the program's own code: `std::thread`, and every runtime
//! and C library linked in statically. It starts the thread through the C
//! library's `pthread_create` (found with `dlsym(RTLD_NEXT)`) on a trampoline
//! that registers the thread before it runs the thread's own start routine.
//! The main thread registers from a constructor, before `main`.
//!
//! A thread that a shared library starts with its own call to
//! `pthread_create` is not registered: what it allocates through Rust's
//! allocator is not counted, and what it frees of other threads' blocks
//! counts against them. The `register-on-first-call` feature covers such
//! threads, at the price of a check on every call.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

/// A thread's start routine, as `pthread_create` takes it.
type Start = extern "C" fn(*mut c_void) -> *mut c_void;

/// The C library's `pthread_create`.
type Create = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    Start,
    *mut c_void,
) -> c_int;

/// The C library's `pthread_create`, once found; 0 before.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The C library's `pthread_create`.
fn next_create() -> Option<Create> {
    // Relaxed: the word is the whole message, an address in the C library
    // that every thread computes alike; nothing else is published with it.
    let mut found = NEXT.load(Relaxed);
    if found == 0 {
        // SAFETY: the name is NUL-terminated; `dlsym` only reads it.
        found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) } as usize;
        if found == 0 || found == pthread_create as Create as usize {
            return None;
        }
        NEXT.store(found, Relaxed);
    }
    // SAFETY: `found` is the address of the C library's `pthread_create`,
    // whose type is `Create`.
    Some(unsafe { std::mem::transmute::<usize, Create>(found) })
}

/// What the trampoline runs once it has registered the thread.
struct Call {
    start: Start,
    arg: *mut c_void,
}

/// Starts a thread through the C library's `pthread_create`, registered with
/// jemalloc's counters before `start` runs. Same contract as the C
/// library's.
///
/// # Safety
///
/// As `pthread_create(3)`: `thread` is writable, `attr` is null or an
/// initialised attribute object, and `start(arg)` may run on a new thread.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: Start,
    arg: *mut c_void,
) -> c_int {
    let Some(create) = next_create() else {
        // SAFETY: `dlerror` returns null or a NUL-terminated message.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "not found".into()
        } else {
            // SAFETY: as above.
            unsafe { CStr::from_ptr(why) }.to_string_lossy()
        };
        eprintln!("memwatch: cannot start a thread: the C library's pthread_create: {why}");
        return libc::EAGAIN;
    };
    let call = Box::into_raw(Box::new(Call { start, arg }));
    // SAFETY: the caller upholds `pthread_create`'s contract for `thread`
    // and `attr`; `trampoline` takes ownership of `call` on the new thread.
    let rc = unsafe { create(thread, attr, trampoline, call.cast()) };
    if rc != 0 {
        // SAFETY: no thread was started, so `call` is still ours.
        drop(unsafe { Box::from_raw(call) });
    }
    rc
}

/// The new thread's first code: registers it, then runs its start routine.
extern "C" fn trampoline(call: *mut c_void) -> *mut c_void {
    // First, so that freeing `call`, which the starting thread allocated,
    // counts on this one.
    crate::jemalloc_count::register_at_start();
    // SAFETY: `pthread_create` above passes a `Box<Call>` it gave up, and
    // only this thread receives it.
    let Call { start, arg } = *unsafe { Box::from_raw(call.cast::<Call>()) };
    start(arg)
}

/// Registers the main thread before `main` runs (every other thread
/// registers in `trampoline`).
extern "C" fn register_main_thread() {
    crate::jemalloc_count::register_at_start();
}

/// The C library runs every function in `.init_array` on the main thread,
/// once it is set up and before `main`.
#[used]
#[link_section = ".init_array"]
static REGISTER_MAIN_THREAD: extern "C" fn() = register_main_thread;
