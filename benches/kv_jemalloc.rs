//! Key-value churn with bare jemalloc as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: memwatch::Jemalloc = memwatch::Jemalloc;

fn main() {
    kv::main("jemalloc");
}
