//! main finishes its own shutdown first and returns an error: still exit 2.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() -> Result<(), String> {
    allocator_tests::scenarios::main_returns_error()
}
