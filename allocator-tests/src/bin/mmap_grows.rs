//! Anonymous `mmap` growth, outside any allocator, until the kernel
//! trigger's shutdown hook stops it.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::outside_heap::mmap_grows();
}
