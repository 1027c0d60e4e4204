//! Holds a fixed heap and waits for the latch, while a test moves the memory limit (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::holds_and_waits();
}
