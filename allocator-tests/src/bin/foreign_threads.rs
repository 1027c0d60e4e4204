//! Threads memwatch did not start (over jemalloc): `foreign_threads KIND...`
//! with KIND one of `timer`, `c`, `dlopen`.

use allocator_tests::audit::Audited;

/// Tallied by usable size, as memwatch counts over jemalloc.
#[global_allocator]
static GLOBAL: Audited<memwatch::Jemalloc> = Audited::new(
    memwatch::MemWatch::new(memwatch::Jemalloc),
    // SAFETY: every block tallied is a live block of jemalloc.
    |ptr, _| unsafe { tikv_jemallocator::usable_size(ptr) },
);

fn main() {
    let kinds: Vec<String> = std::env::args().skip(1).collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    allocator_tests::scenarios::foreign_threads(&kinds);
}
