//! Instructions per 16-byte alloc+free pair, counted by valgrind's callgrind:
//! unlike wall time, the count is the same from run to run on a busy or
//! virtualised machine, so it shows the wrapper's own cost exactly.
//!
//! Each allocator runs twice in a child process under callgrind, with 1 and
//! 2 million pairs; the difference divided by a million is the cost of one
//! pair, start-up excluded. Writes `target/criterion/memwatch-instructions.json`.
//! With `--test`, or without valgrind, it runs each child once natively.

use std::process::Command;

#[macro_use]
mod common;

fn child(which: &str, n: u64) {
    fn maybe<A: common::Global>(which: &str, n: u64, name: &str, _: &A) {
        if which == name {
            common::pairs::<16, A>(n);
        }
    }
    for_each_allocator!(maybe, (which, n));
}

fn count(which: &str, n: u64) -> Option<u64> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(exe)
        .args(["--child", which, &n.to_string()])
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
        child(&args[i + 1], args[i + 2].parse().unwrap());
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
            child(name, 1000);
        }
        println!("instructions: test mode (no valgrind run)");
        return;
    }
    let mut rows = Vec::new();
    for name in names {
        let (Some(one), Some(two)) = (count(name, 1_000_000), count(name, 2_000_000)) else {
            eprintln!("callgrind gave no count for {name}");
            return;
        };
        let per_pair = (two - one) as f64 / 1e6;
        println!("{name:>20}: {per_pair:.1} instructions per 16 B pair");
        rows.push(format!("\"{name}\": {per_pair:.1}"));
    }
    common::write_rows("memwatch-instructions.json", &rows);
}
