//! Idle threads holding most of the heap (over `System`):
//! `system_idle_threads MAIN_MIB THREADS PER_THREAD_KIB`.

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    let [main_mib, threads, kib] = allocator_tests::scenarios::args(["MAIN_MIB", "THREADS", "KIB"]);
    allocator_tests::scenarios::idle_threads(main_mib, threads, kib);
}
