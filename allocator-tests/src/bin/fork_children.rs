//! `fork` without `exec` from a process with parked threads and a reader
//! (over jemalloc).

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::fork_children(|ptr, _| {
        // SAFETY: `ptr` is a live block of jemalloc, the inner allocator.
        unsafe { tikv_jemallocator::usable_size(ptr) }
    });
}
