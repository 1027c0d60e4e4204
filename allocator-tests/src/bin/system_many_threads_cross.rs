//! Many threads cross together and usage stays high: the hooks run once (over System).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    allocator_tests::scenarios::many_threads_cross();
}
