//! A child of `fork` starts a watchdog of its own (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::fork_child_watchdog();
}
