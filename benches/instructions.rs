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

use std::process::Command;

#[macro_use]
mod common;

/// The sizes counted for bare jemalloc and memwatch over it.
const SIZES: [usize; 4] = [16, 4096, 65536, 1 << 20];

fn child(which: &str, size: usize, n: u64) {
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
    for (name, size) in cells {
        // Large pairs take jemalloc's slower paths: fewer of them.
        let n = if size > 4096 { 100_000 } else { 1_000_000 };
        let (Some(one), Some(two)) = (count(name, size, n), count(name, size, 2 * n)) else {
            eprintln!("callgrind gave no count for {name}");
            return;
        };
        let per_pair = (two - one) as f64 / n as f64;
        println!("{name:>20}: {per_pair:.1} instructions per {size} B pair");
        let key = if size == 16 {
            name.to_string()
        } else {
            format!("{name}/{size}")
        };
        rows.push(format!("\"{key}\": {per_pair:.1}"));
    }
    common::write_rows("memwatch-instructions.json", &rows);
}
