//! `fork` without `exec` from a process with parked threads and a reader
//! (over `System`).

use allocator_tests::audit::Audited;
use std::alloc::System;

/// Tallied by requested size, as memwatch counts over `System`.
#[global_allocator]
static GLOBAL: Audited<System> = Audited::new(memwatch::MemWatch::new(System), |_, size| size);

fn main() {
    allocator_tests::scenarios::fork_children();
}
