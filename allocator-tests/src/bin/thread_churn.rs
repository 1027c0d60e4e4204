//! A thousand short-lived threads: the reading afterwards has zero drift (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::thread_churn();
}
