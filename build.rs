//! Names memwatch's one build-time choice, so that the code says it once:
//! `memwatch_jemalloc_counts`, set where `MemWatch<Jemalloc>` reads
//! jemalloc's own per-thread counters (the `jemalloc` feature, on Linux,
//! outside the loom model checks). Elsewhere it keeps its own count over
//! jemalloc as over any other allocator.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(memwatch_jemalloc_counts)");
    println!("cargo::rerun-if-changed=build.rs");
    let jemalloc = env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let loom = env::var_os("CARGO_CFG_LOOM").is_some();
    if jemalloc && linux && !loom {
        println!("cargo::rustc-cfg=memwatch_jemalloc_counts");
    }
}
