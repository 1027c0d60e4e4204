//! Instructions per alloc+free pair, counted by valgrind's callgrind: unlike
//! wall time, the count is the same from run to run on a busy or
//! virtualised machine, so it shows the wrapper's own cost exactly. Every
//! allocator on 16-byte pairs; bare jemalloc and memwatch over it also on
//! the paired table's larger sizes.
//!
//! Each allocator runs twice in a child process under callgrind, with `n`
//! and `2 n` pairs; the difference divided by `n` is the cost of one pair,
//! start-up excluded; jemalloc's time-driven purging is off in the children,
//! so large pairs count the same work every run. Writes
//! `target/criterion/memwatch-instructions.json`.
//! With `--test`, or without valgrind, it runs each child once natively.
//!
//! One more subject, `jemalloc+event-hook`, is bare jemalloc with the one
//! per-thread callback jemalloc 5.3.1 offers registered
//! (`experimental.hooks.thread_event`, every 64 KiB of allocation and of
//! freeing on each thread, the interval memwatch's error bound allows):
//! what counting through jemalloc's events instead of in the wrapper
//! would cost, the callback doing what memwatch's look does with the two
//! figures it is given. jemalloc 5.3.0 has no such control; the child then
//! prints that and the row is left out.

use std::process::Command;

#[macro_use]
mod common;

/// The sizes counted for bare jemalloc and memwatch over it.
const SIZES: [usize; 4] = [16, 4096, 65536, 1 << 20];

/// The event hook's subject: registers the hook, then bare jemalloc's
/// pairs. Exits 3 if this jemalloc has no such control.
mod event_hook {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicI64, Ordering::Release};
    use tikv_jemalloc_sys as sys;

    /// jemalloc's `user_hook_object_t`.
    #[repr(C)]
    struct Hook {
        callback: extern "C" fn(bool, u64, u64),
        interval: u64,
        alloc_only: bool,
    }

    thread_local! {
        static FOLDED: Cell<u64> = const { Cell::new(0) };
    }
    static SLOT: AtomicI64 = AtomicI64::new(0);
    static TOTAL: AtomicI64 = AtomicI64::new(0);

    /// What memwatch's look does with a thread's two figures: the net
    /// not yet folded is published, or folded once past 4 MiB. Release:
    /// a reader's Acquire load sees the figures this store publishes.
    extern "C" fn on_event(_: bool, allocated: u64, deallocated: u64) {
        let net = allocated.wrapping_sub(deallocated);
        let pending = net.wrapping_sub(FOLDED.with(Cell::get)) as i64;
        if pending.unsigned_abs() > 4 << 20 {
            TOTAL.fetch_add(pending, Release);
            FOLDED.with(|f| f.set(net));
            SLOT.store(0, Release);
        } else {
            SLOT.store(pending, Release);
        }
    }

    pub fn register() -> bool {
        let hook = Hook {
            callback: on_event,
            interval: 64 << 10,
            alloc_only: false,
        };
        // SAFETY: the control takes a `user_hook_object_t` by value, which
        // `Hook` lays out; `on_event` allocates nothing and lives as long
        // as the process.
        let rc = unsafe {
            sys::mallctl(
                c"experimental.hooks.thread_event".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&hook as *const Hook).cast_mut().cast(),
                std::mem::size_of::<Hook>(),
            )
        };
        rc == 0
    }
}

/// The name of the event hook's subject.
const HOOK: &str = "jemalloc+event-hook";

fn child(which: &str, size: usize, n: u64) {
    let which = if which == HOOK {
        if !event_hook::register() {
            println!("{HOOK}: this jemalloc has no experimental.hooks.thread_event");
            std::process::exit(3);
        }
        "jemalloc"
    } else {
        which
    };
    fn maybe<A: common::Global>(which: &str, size: usize, n: u64, name: &str, _: &A) {
        if which == name {
            match size {
                16 => common::pairs::<16, A>(n),
                4096 => common::pairs::<4096, A>(n),
                65536 => common::pairs::<65536, A>(n),
                1048576 => common::pairs::<1048576, A>(n),
                _ => panic!("no pairs of {size} B"),
            }
        }
    }
    for_each_allocator!(maybe, (which, size, n));
}

fn count(which: &str, size: usize, n: u64) -> Option<u64> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        // jemalloc's decay of unused pages runs on a clock, which under
        // callgrind moves at another pace in every run: off, so that large
        // pairs count the same work each time.
        .env("_RJEM_MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")
        .arg(exe)
        .args(["--child", which, &size.to_string(), &n.to_string()])
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .find_map(|l| {
            l.split_once("Collected : ")
                .map(|(_, n)| n.trim().parse().ok())
        })
        .flatten()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let (size, n) = (args[i + 2].parse().unwrap(), args[i + 3].parse().unwrap());
        child(&args[i + 1], size, n);
        return;
    }
    let names = [
        "system",
        "jemalloc",
        "memwatch-jemalloc",
        "memwatch-system",
        "cap-jemalloc",
        "atomic-jemalloc",
    ];
    let have_valgrind = Command::new("valgrind").arg("--version").output().is_ok();
    if args.iter().any(|a| a == "--test") || !have_valgrind {
        for name in names {
            child(name, 16, 1000);
        }
        let hook = Command::new(std::env::current_exe().unwrap())
            .args(["--child", HOOK, "16", "1000"])
            .status()
            .expect("the event hook's child");
        assert!(matches!(hook.code(), Some(0 | 3)), "{HOOK}: {hook}");
        for size in SIZES {
            child("memwatch-jemalloc", size, 100);
        }
        println!("instructions: test mode (no valgrind run)");
        return;
    }
    let mut rows = Vec::new();
    let mut cells = names.map(|name| (name, 16)).to_vec();
    for size in &SIZES[1..] {
        cells.push(("jemalloc", *size));
        cells.push(("memwatch-jemalloc", *size));
    }
    let hook = Command::new(std::env::current_exe().unwrap())
        .args(["--child", HOOK, "16", "1"])
        .status()
        .is_ok_and(|s| s.success());
    if hook {
        cells.extend(SIZES.map(|size| (HOOK, size)));
    }
    for (name, size) in cells {
        // Large pairs take jemalloc's slower paths: fewer of them.
        let n = if size > 4096 { 100_000 } else { 1_000_000 };
        let (Some(one), Some(two)) = (count(name, size, n), count(name, size, 2 * n)) else {
            eprintln!("callgrind gave no count for {name}");
            return;
        };
        let per_pair = (two - one) as f64 / n as f64;
        println!("{name:>20}: {per_pair:.1} instructions per {size} B pair");
        let key = if size == 16 && name != HOOK {
            name.to_string()
        } else {
            format!("{name}/{size}")
        };
        rows.push(format!("\"{key}\": {per_pair:.1}"));
    }
    common::write_rows("memwatch-instructions.json", &rows);
}
