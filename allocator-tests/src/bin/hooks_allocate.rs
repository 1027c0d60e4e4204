//! Hooks that allocate heavily after the trip: no second trip, no deadlock, exit 2.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::hooks_allocate();
}
