//! Off or misconfigured: runs to the end with exit 0 and no watchdog thread (over System).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    allocator_tests::scenarios::runs_to_end();
}
