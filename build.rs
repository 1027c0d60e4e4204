//! Decides how `MemWatch<Jemalloc>` learns of the threads it counts.
//!
//! Where the C library is glibc, linked dynamically, memwatch registers every
//! thread as it starts, from its own `pthread_create` (`src/thread_start.rs`),
//! and the allocator's fast path checks nothing: the cfg
//! `memwatch_thread_start`. Elsewhere, or with the `register-on-first-call`
//! feature, a thread registers on its first call through the allocator,
//! which checks a thread-local byte on every call.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(memwatch_thread_start)");
    println!("cargo::rerun-if-changed=build.rs");
    let cfg = |name: &str| env::var(format!("CARGO_CFG_{name}")).unwrap_or_default();
    let feature = |name: &str| env::var_os(format!("CARGO_FEATURE_{name}")).is_some();
    let at_start = feature("JEMALLOC")
        && !feature("REGISTER_ON_FIRST_CALL")
        && cfg("TARGET_OS") == "linux"
        && cfg("TARGET_ENV") == "gnu"
        && cfg("TARGET_POINTER_WIDTH") == "64"
        && !cfg("TARGET_FEATURE").split(',').any(|f| f == "crt-static")
        && env::var_os("CARGO_CFG_LOOM").is_none();
    if at_start {
        println!("cargo::rustc-cfg=memwatch_thread_start");
    }
}
