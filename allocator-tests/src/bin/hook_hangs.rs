//! A hook that hangs: exit 2 at the grace deadline.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::hook_hangs();
}
