//! Already above the threshold when the watchdog starts: it fires at once.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::above_at_start();
}
