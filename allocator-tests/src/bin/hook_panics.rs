//! A hook that panics: logged, the next hook runs, exit 2.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::hook_panics();
}
