//! C and C++ allocations counted through `memwatch::c_heap!`:
//! `c_heap exact` prints how the reading moved against the usable bytes the
//! C code allocated, on the calling thread, on a live idle C thread, and on
//! C++ threads that ended; `c_heap trip` lets a C thread grow until the
//! heap threshold trips, with no Rust allocation growing at all.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

#[cfg(not(memwatch_test_no_c_heap))]
memwatch::c_heap!();

extern "C" {
    fn memwatch_test_c_malloc(n: usize, size: usize) -> usize;
    fn memwatch_test_c_free_all();
    fn memwatch_test_worker_start();
    fn memwatch_test_worker_alloc(n: usize, size: usize) -> usize;
    fn memwatch_test_worker_free();
    fn memwatch_test_worker_stop();
    fn memwatch_test_c_grow_forever();
    fn memwatch_test_cxx_new_on_thread(n: usize, size: usize) -> usize;
    fn memwatch_test_cxx_delete_on_thread();
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "exact" => exact(),
        "trip" => trip(),
        _ => panic!("usage: c_heap exact|trip"),
    }
}

/// Every figure is taken before anything is printed, so that the printing's
/// own allocations are not in them.
fn exact() {
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

fn trip() {
    allocator_tests::init_logging();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("flush", || allocator_tests::trace("flush"))
        .start();
    // SAFETY: starts a detached C thread that only allocates.
    unsafe { memwatch_test_c_grow_forever() };
    // The Rust side allocates nothing more: only C code grows.
    std::thread::sleep(std::time::Duration::from_secs(20));
    println!("not tripped");
    watchdog.exit_if_tripped();
}
