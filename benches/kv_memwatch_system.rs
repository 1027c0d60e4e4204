//! Key-value churn with memwatch over System as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    kv::main("memwatch-system");
}
