//! `c_heap exact` under a global allocator with no slack
//! (`MemWatch::with_slack(0)`): every C call, on every thread, looks and
//! folds, so the reading is exact for a live idle C thread too.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc).with_slack(0);

memwatch::c_heap!();

fn main() {
    allocator_tests::c_heap::exact();
}
