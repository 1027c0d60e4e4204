//! The soft level is entered and left with hysteresis; callbacks once per change.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::shed_levels();
}
