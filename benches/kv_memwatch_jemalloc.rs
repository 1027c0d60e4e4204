//! Key-value churn with memwatch over jemalloc as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    kv::main("memwatch-jemalloc");
}
