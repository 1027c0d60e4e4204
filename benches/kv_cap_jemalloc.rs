//! Key-value churn with cap over jemalloc as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: cap::Cap<memwatch::Jemalloc> = cap::Cap::new(memwatch::Jemalloc, usize::MAX);

fn main() {
    kv::main("cap-jemalloc");
}
