//! Allocates 1 MiB at a time, up to 256 MiB, holding all of it.
//!
//! With `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB=64` the watchdog trips near
//! 64 MiB, logs the figures, runs the shutdown hook and exits with code 2.
//! With the variable unset, it runs to the end and exits 0.
//!
//! ```text
//! ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB=64 cargo run --release --example demo; echo "exit code $?"
//! ```

use std::time::Duration;

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("stop intake", || log::info!("demo: intake stopped"))
        .on_shutdown("flush and fsync", || {
            std::thread::sleep(Duration::from_millis(50));
            log::info!("demo: state flushed");
        })
        .start();

    let mut held: Vec<Vec<u8>> = Vec::new();
    for mib in 1..=256 {
        if watchdog.is_armed() && memwatch::tripped() {
            // The watchdog owns the shutdown now; stop allocating.
            break;
        }
        held.push(vec![0xA5; 1 << 20]);
        if mib % 16 == 0 {
            log::info!(
                "demo: holding {mib} MiB, memwatch reads {} bytes",
                memwatch::live_bytes()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    watchdog.exit_if_tripped();
    log::info!(
        "demo: done, held {} MiB, peak {} bytes; exiting 0",
        held.len(),
        memwatch::peak_bytes()
    );
}
