//! One thread whose frees and allocations differ in size mix (over
//! jemalloc): `size_mix hide|inflate`.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    allocator_tests::scenarios::size_mix(&mode);
}
