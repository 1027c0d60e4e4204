//! The whole-program workload: key-value churn in a hash map, as a small
//! store does under load. Inserts, overwrites and deletes of string keys and
//! byte-vector values of mixed sizes, driven by a fixed pseudo-random
//! sequence so every allocator sees the same calls.

#![allow(dead_code)]

use std::collections::HashMap;

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

/// Runs `ops` operations on a map of up to `keys` keys and returns it, so
/// the caller decides when it is freed.
pub fn churn(ops: usize, keys: u64, seed: u64) -> HashMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed);
    let mut map = HashMap::new();
    for _ in 0..ops {
        let r = rng.next();
        let key = format!("user:{:08}", r % keys);
        match (r >> 32) % 10 {
            // Deletes: 20%.
            0 | 1 => {
                map.remove(&key);
            }
            // Inserts and overwrites: 80%, values from 8 B to 4 KiB, a few
            // larger ones up to 64 KiB.
            _ => {
                let size = if (r >> 40) % 50 == 0 {
                    4096 + (r >> 20) as usize % 61_440
                } else {
                    8 + (r >> 20) as usize % 4088
                };
                map.insert(key, vec![(r >> 8) as u8; size]);
            }
        }
    }
    map
}

/// One criterion measurement of the churn, named `kv-<allocator>`.
#[macro_export]
macro_rules! kv_bench {
    ($name:literal) => {
        fn bench(c: &mut criterion::Criterion) {
            let mut g = c.benchmark_group("kv-churn");
            g.sample_size(20)
                .warm_up_time(std::time::Duration::from_millis(500))
                .measurement_time(std::time::Duration::from_secs(3));
            g.bench_function(concat!("kv-", $name), |b| {
                b.iter(|| drop(std::hint::black_box(kv::churn(200_000, 20_000, 42))))
            });
            g.finish();
        }
        criterion::criterion_group!(benches, bench);
        criterion::criterion_main!(benches);
    };
}
