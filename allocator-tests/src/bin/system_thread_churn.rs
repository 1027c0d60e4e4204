//! A thousand short-lived threads: the reading afterwards has zero drift (over System).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    // Over any allocator but jemalloc the reading counts requested sizes.
    allocator_tests::scenarios::thread_churn(|_, requested| requested);
}
