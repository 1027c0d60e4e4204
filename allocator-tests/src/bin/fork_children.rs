//! `fork` without `exec` from a process with parked threads and a reader
//! (over jemalloc).

use allocator_tests::audit::Audited;

/// Tallied by usable size, as memwatch counts over jemalloc.
#[global_allocator]
static GLOBAL: Audited<memwatch::Jemalloc> = Audited::new(
    memwatch::MemWatch::new(memwatch::Jemalloc),
    // SAFETY: every block tallied is a live block of jemalloc.
    |ptr, _| unsafe { tikv_jemallocator::usable_size(ptr) },
);

fn main() {
    allocator_tests::scenarios::fork_children();
}
