//! Names memwatch's build-time choices, so that the code says each once:
//! `memwatch_jemalloc_counts`, set where `MemWatch<Jemalloc>` reads
//! jemalloc's own per-thread counters (the `jemalloc` feature, on Linux,
//! outside the loom model checks); elsewhere it keeps its own count over
//! jemalloc as over any other allocator. And `memwatch_counters_renamed`,
//! for a test build only.

use std::env;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(memwatch_jemalloc_counts)");
    println!("cargo::rustc-check-cfg=cfg(memwatch_counters_renamed)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=MEMWATCH_TEST_RENAME_COUNTERS");
    // A test build: jemalloc's per-thread counters under a name no jemalloc
    // has, to check that counting goes on without them (see .ci/run).
    if env::var_os("MEMWATCH_TEST_RENAME_COUNTERS").is_some() {
        println!("cargo::rustc-cfg=memwatch_counters_renamed");
    }
    let jemalloc = env::var_os("CARGO_FEATURE_JEMALLOC").is_some();
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let loom = env::var_os("CARGO_CFG_LOOM").is_some();
    if jemalloc && linux && !loom {
        println!("cargo::rustc-cfg=memwatch_jemalloc_counts");
    }
}
