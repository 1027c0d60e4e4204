//! Threads memwatch did not start (over `System`): `system_foreign_threads
//! KIND...` with KIND one of `timer`, `c`, `dlopen`.

use allocator_tests::audit::Audited;
use std::alloc::System;

/// Tallied by requested size, as memwatch counts over `System`.
#[global_allocator]
static GLOBAL: Audited<System> = Audited::new(memwatch::MemWatch::new(System), |_, size| size);

fn main() {
    let kinds: Vec<String> = std::env::args().skip(1).collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    allocator_tests::scenarios::foreign_threads(&kinds);
}
