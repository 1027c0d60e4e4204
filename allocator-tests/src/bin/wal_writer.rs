//! The cgroup workload: fsynced WAL appends while the heap grows.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    allocator_tests::scenarios::wal_writer();
}
