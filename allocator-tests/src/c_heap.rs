//! The C side of the c_heap scenarios (`c/heap.c`, `c/heap.cpp`), and the
//! figures the `exact` mode prints, shared by the binaries that invoke
//! `memwatch::c_heap!` with different slacks.

extern "C" {
    fn memwatch_test_c_malloc(n: usize, size: usize) -> usize;
    fn memwatch_test_c_free_all();
    fn memwatch_test_worker_start();
    fn memwatch_test_worker_alloc(n: usize, size: usize) -> usize;
    fn memwatch_test_worker_free();
    fn memwatch_test_worker_stop();
    fn memwatch_test_cxx_new_on_thread(n: usize, size: usize) -> usize;
    fn memwatch_test_cxx_delete_on_thread();
    fn memwatch_test_c_aligned_cases() -> i32;
}

/// Every figure is taken before anything is printed, so that the printing's
/// own allocations are not in them.
pub fn exact() {
    let live = || memwatch::live_bytes() as i64;
    let mut facts: Vec<(&str, i64)> = Vec::with_capacity(32);
    // SAFETY (every call below): the C functions of c/heap.c and
    // c/heap.cpp take plain numbers and keep their blocks themselves.
    unsafe {
        let base = live();
        let usable = memwatch_test_c_malloc(100, 1 << 20) as i64;
        facts.push(("main malloc usable", usable));
        facts.push(("main malloc moved", live() - base));
        memwatch_test_c_free_all();
        facts.push(("main freed moved", live() - base));

        memwatch_test_worker_start();
        let base = live();
        let usable = memwatch_test_worker_alloc(50, 1 << 20) as i64;
        facts.push(("worker large usable", usable));
        facts.push(("worker large moved", live() - base));
        let usable = usable + memwatch_test_worker_alloc(100_000, 100) as i64;
        facts.push(("worker all usable", usable));
        facts.push(("worker all moved", live() - base));
        memwatch_test_worker_free();
        facts.push(("worker freed moved", live() - base));
        facts.push((
            "reading error",
            memwatch::snapshot().reading_error_bytes as i64,
        ));
        memwatch_test_worker_stop();
        facts.push(("worker ended moved", live() - base));

        let base = live();
        facts.push((
            "aligned cases failed",
            memwatch_test_c_aligned_cases() as i64,
        ));
        facts.push(("aligned cases moved", live() - base));

        let base = live();
        let usable = memwatch_test_cxx_new_on_thread(64, 1 << 20) as i64;
        facts.push(("cxx new usable", usable));
        facts.push(("cxx new moved", live() - base));
        memwatch_test_cxx_delete_on_thread();
        facts.push(("cxx deleted moved", live() - base));
    }
    for (k, v) in facts {
        println!("{k}: {v}");
    }
}
