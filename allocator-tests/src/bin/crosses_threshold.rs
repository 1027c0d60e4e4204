//! Crossing the threshold exits 2 after the hooks ran in order (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::crosses_threshold();
}
