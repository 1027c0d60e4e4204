//! One thread whose frees and allocations differ in size mix (over
//! `System`): `system_size_mix hide|inflate`.

#[global_allocator]
static GLOBAL: memwatch::MemWatch<std::alloc::System> = memwatch::MemWatch::new(std::alloc::System);

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    allocator_tests::scenarios::size_mix(&mode);
}
