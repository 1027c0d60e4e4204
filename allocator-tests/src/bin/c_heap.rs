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
    fn memwatch_test_c_grow_forever();
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "exact" => allocator_tests::c_heap::exact(),
        "trip" => trip(),
        _ => panic!("usage: c_heap exact|trip"),
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
