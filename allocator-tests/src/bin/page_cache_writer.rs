//! Streams a file through the page cache: `page_cache_writer PATH MIB`.

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib = args[2].parse().expect("MiB");
    allocator_tests::outside_heap::page_cache_writer(&args[1], mib);
}
