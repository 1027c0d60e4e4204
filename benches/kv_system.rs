//! Key-value churn with std's System as the global allocator.

mod kv;

#[global_allocator]
static GLOBAL: std::alloc::System = std::alloc::System;

fn main() {
    kv::main("system");
}
