//! `fork` without `exec` from a process with parked threads and a reader
//! (over `System`).

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    // Over `System` a block counts as its requested size.
    allocator_tests::scenarios::fork_children(|_, size| size);
}
