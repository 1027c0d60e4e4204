//! Crossing the threshold exits 2 after the hooks ran in order (over System).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    allocator_tests::scenarios::crosses_threshold();
}
