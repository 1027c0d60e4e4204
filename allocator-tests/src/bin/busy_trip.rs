//! A trip while every core is busy with threads that churn the heap (over
//! jemalloc): `BUSY` threads, 128 unless set.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::busy_trip();
}
