//! The memwatch demo: a write-ahead-logged key-value server that memwatch
//! shuts down in order, and a demo mode that proves no acknowledged write is
//! lost.
//!
//! ```text
//! kvserver                      # the demo: serve, load until the trip, restart, verify
//! kvserver demo [THRESHOLD_MB]  # the same, with another threshold (default 256)
//! kvserver demo-shed [T [S]]    # the soft level: a load that backs off, then one that does not
//! kvserver demo-native          # growth outside the heap in a 256 MiB cgroup: the kernel trigger (root)
//! kvserver serve [ADDR] [WAL]   # just the server (default 127.0.0.1:6380, ./kvserver.wal)
//! kvserver load ADDR SECONDS    # the demo's writers alone: prints `acked N` per connection
//! kvserver verify ADDR N...     # reads back N writes per connection: prints `recovered N`
//! ```
//!
//! The server takes its threshold from `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB`.
//! On the trip its shutdown hook stops intake, lets in-flight commands finish,
//! fsyncs and closes the log, and the process exits 2. SIGTERM and SIGINT take
//! the same path and exit 0.

mod demo;
mod native;
mod resp;
mod server;
mod wal;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("demo") => {
            let threshold = args.get(1).map(String::as_str).unwrap_or("256");
            demo::run(threshold)
        }
        Some("demo-native") => demo::run_native(),
        Some("demo-shed") => {
            let threshold = args.get(1).map(String::as_str).unwrap_or("256");
            let shed = args.get(2).map(String::as_str).unwrap_or("192");
            demo::run_shed(threshold, shed)
        }
        Some("serve") => {
            let addr = args
                .get(1)
                .cloned()
                .unwrap_or_else(|| "127.0.0.1:6380".into());
            let wal = args
                .get(2)
                .cloned()
                .unwrap_or_else(|| "kvserver.wal".into());
            serve(&addr, PathBuf::from(wal))
        }
        Some("load") if args.len() == 3 => {
            let secs = args[2].parse().unwrap_or(5);
            for l in demo::load_all(&args[1], std::time::Duration::from_secs(secs)) {
                println!("acked {}", l.acked);
            }
            ExitCode::SUCCESS
        }
        Some("verify") if args.len() >= 2 => {
            let acked: Vec<u64> = args[2..].iter().filter_map(|a| a.parse().ok()).collect();
            println!("recovered {}", demo::verify(&args[1], &acked));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("unknown command {other:?}; usage: kvserver [demo [THRESHOLD_MB] | demo-shed [THRESHOLD_MB [SHED_MB]] | demo-native | serve [ADDR] [WAL] | load ADDR SECONDS | verify ADDR N...]");
            ExitCode::from(64)
        }
    }
}

/// Monotonic clock in nanoseconds, comparable across processes.
pub use allocator_tests::outside_heap::monotonic_ns;

fn serve(addr: &str, wal_path: PathBuf) -> ExitCode {
    // Block SIGTERM and SIGINT in every thread (threads inherit the mask) so
    // that the signal thread alone receives them with sigwait.
    let signals = block_stop_signals();

    let (server, replay) = match server::Server::open(&wal_path) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot open the log {}: {e}", wal_path.display());
            return ExitCode::from(1);
        }
    };
    if replay.torn_bytes > 0 {
        log::warn!(
            "log {}: torn tail of {} bytes after {} valid bytes, truncated",
            wal_path.display(),
            replay.torn_bytes,
            replay.valid_len
        );
    }
    println!(
        "replayed {} records, torn tail {} bytes",
        replay.ops.len(),
        replay.torn_bytes
    );

    let report = || {
        println!("tripped {} peak={}", monotonic_ns(), memwatch::peak_bytes());
        let _ = std::io::stdout().flush();
    };
    let hook_server = server.clone();
    let watchdog = memwatch::Watchdog::from_env()
        .on_shutdown("report", report)
        .on_shutdown(
            "stop intake, finish in-flight commands, fsync and close the log",
            move || hook_server.shutdown(),
        )
        .start();

    let signal_server = server.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_signal(&signals);
            log::info!("signal {sig}: shutting down");
            signal_server.shutdown();
            std::process::exit(0);
        })
        .expect("spawn the signal thread");

    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            log::error!("cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    println!("listening {}", listener.local_addr().unwrap());
    let _ = std::io::stdout().flush();
    let result = server.serve(listener);
    // Intake stopped, by the watchdog's hook or a signal: wait for the rest
    // of the shutdown, then let a tripped latch decide the exit code.
    server.shutdown();
    watchdog.exit_if_tripped();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server: {e}");
            ExitCode::from(1)
        }
    }
}

fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` was initialised by `block_stop_signals`; `sig` is writable.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}
