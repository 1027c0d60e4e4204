//! Key-value churn with bare jemalloc as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: memwatch::Jemalloc = memwatch::Jemalloc;

kv_bench!("jemalloc");
