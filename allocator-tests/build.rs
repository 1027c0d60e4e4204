//! Builds `c/heap.c` and `c/heap.cpp` (C and C++ allocations for the
//! `c_heap` scenario), and `c/threads.c` twice: as a static library linked into the scenario
//! binaries (a C thread), and as a shared library that the `foreign_threads`
//! scenario loads with `dlopen` (a thread of a loaded library). The shared
//! library's path reaches the scenario as `MEMWATCH_TEST_DL`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-changed=c/threads.c");
    println!("cargo::rerun-if-changed=c/heap.c");
    println!("cargo::rerun-if-changed=c/heap.cpp");
    // C and C++ allocations for the c_heap scenario (only its binary
    // refers to them, so only it links them).
    cc::Build::new()
        .file("c/heap.c")
        .compile("memwatch_test_heap");
    cc::Build::new()
        .cpp(true)
        .file("c/heap.cpp")
        .compile("memwatch_test_cxx");
    cc::Build::new()
        .file("c/threads.c")
        .compile("memwatch_test_threads");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let so = out.join("libmemwatch_test_dl.so");
    let compiler = cc::Build::new().get_compiler();
    let status = compiler
        .to_command()
        .args([
            "-shared",
            "-fPIC",
            "-O2",
            "-DENTRY=memwatch_test_dl_thread",
            "-o",
        ])
        .arg(&so)
        .arg("c/threads.c")
        .arg("-lpthread")
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "building {} failed", so.display());
    println!("cargo::rustc-env=MEMWATCH_TEST_DL={}", so.display());
}
