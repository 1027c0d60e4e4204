//! The whole-program workload: key-value churn in a hash map, as a small
//! store does under load. Inserts, overwrites and deletes of string keys and
//! byte-vector values of mixed sizes, driven by a fixed pseudo-random
//! sequence so every allocator sees the same calls.

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// A map with a fixed hash function: std's default seeds its hasher per
/// process, which would give every process its own probe lengths.
pub type Map = HashMap<String, Vec<u8>, BuildHasherDefault<DefaultHasher>>;

/// A xorshift generator: deterministic, no allocation.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The churn's state, so that it can run in pieces: a map of up to `keys`
/// keys and the generator that drives it.
pub struct Churn {
    pub map: Map,
    rng: Rng,
    keys: u64,
}

impl Churn {
    pub fn new(keys: u64, seed: u64) -> Self {
        Churn {
            map: Map::default(),
            rng: Rng::new(seed),
            keys,
        }
    }

    /// Runs `ops` more operations.
    pub fn step(&mut self, ops: usize) {
        for _ in 0..ops {
            let r = self.rng.next();
            let key = format!("user:{:08}", r % self.keys);
            match (r >> 32) % 10 {
                // Deletes: 20%.
                0 | 1 => {
                    self.map.remove(&key);
                }
                // Inserts and overwrites: 80%, values from 8 B to 4 KiB, a
                // few larger ones up to 64 KiB.
                _ => {
                    let size = if (r >> 40) % 50 == 0 {
                        4096 + (r >> 20) as usize % 61_440
                    } else {
                        8 + (r >> 20) as usize % 4088
                    };
                    self.map.insert(key, vec![(r >> 8) as u8; size]);
                }
            }
        }
    }
}

/// Runs `ops` operations on a map of up to `keys` keys and returns it, so
/// the caller decides when it is freed.
pub fn churn(ops: usize, keys: u64, seed: u64) -> Map {
    let mut c = Churn::new(keys, seed);
    c.step(ops);
    c.map
}

/// The environment variable that switches a `kv_*` bench binary to serving
/// paired rounds for `benches/kv_paired.py`.
pub const PAIRED_ENV: &str = "MEMWATCH_KV_PAIRED";

/// Operations run untimed first, to bring the map to its steady size.
const WARM_UP_OPS: usize = 200_000;

/// Serves paired rounds: the churn first runs [`WARM_UP_OPS`] untimed, then
/// every line `N` read from standard input runs `N` more operations on the
/// same map and answers with their wall time in nanoseconds. End of input
/// ends the process.
fn serve_paired_rounds() {
    use std::io::{BufRead, Write};
    let mut c = Churn::new(20_000, 42);
    c.step(WARM_UP_OPS);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let ops: usize = line.unwrap().trim().parse().expect("a count of operations");
        let start = std::time::Instant::now();
        c.step(ops);
        let ns = start.elapsed().as_nanos();
        writeln!(out, "{ns}").unwrap();
        out.flush().unwrap();
    }
}

/// The `main` of a `kv_*` bench binary: paired rounds when [`PAIRED_ENV`]
/// is set; otherwise (a plain `cargo bench`, or CI's `-- --test`) one timed
/// churn, which shows that the binary works. The comparison itself is
/// `benches/kv_paired.py`: one process timed alone is off by several percent
/// from the next (see there).
pub fn main(name: &str) {
    if std::env::var_os(PAIRED_ENV).is_some() {
        return serve_paired_rounds();
    }
    let start = std::time::Instant::now();
    let mut c = Churn::new(20_000, 42);
    c.step(WARM_UP_OPS);
    drop(std::hint::black_box(c));
    println!(
        "kv-churn/{name}: {WARM_UP_OPS} operations in {:.1} ms; \
         `python3 benches/kv_paired.py` compares the allocators",
        start.elapsed().as_secs_f64() * 1e3
    );
}
