//! How far past the threshold the heap is at the trip (over jemalloc):
//! `overshoot THREADS STEP_BYTES`.

use allocator_tests::audit::Audited;

/// Tallied by usable size, as memwatch counts over jemalloc.
#[global_allocator]
static GLOBAL: Audited<memwatch::Jemalloc> = Audited::new(
    memwatch::MemWatch::new(memwatch::Jemalloc),
    // SAFETY: every block tallied is a live block of jemalloc.
    |ptr, _| unsafe { tikv_jemallocator::usable_size(ptr) },
);

fn main() {
    let [threads, step] = allocator_tests::scenarios::args(["THREADS", "STEP_BYTES"]);
    allocator_tests::scenarios::overshoot(threads, step);
}
