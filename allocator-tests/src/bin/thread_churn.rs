//! A thousand short-lived threads: the reading afterwards has zero drift (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    // Over jemalloc the reading counts jemalloc's usable size of each block.
    allocator_tests::scenarios::thread_churn(|ptr, _| {
        // SAFETY: `ptr` is a live block of jemalloc, the inner allocator.
        unsafe { tikv_jemallocator::usable_size(ptr) }
    });
}
