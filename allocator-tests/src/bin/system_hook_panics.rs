//! A hook that panics: logged, the next hook runs, exit 2 (over System).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    allocator_tests::scenarios::hook_panics();
}
