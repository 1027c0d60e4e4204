//! Off or misconfigured: runs to the end with exit 0 and no watchdog thread (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::runs_to_end();
}
