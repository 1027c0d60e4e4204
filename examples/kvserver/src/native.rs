//! A cache outside the Rust heap, for `demo-native`: every acknowledged
//! value is also copied into anonymous memory mapped with `mmap`, as a C or
//! C++ library's block cache would hold it. memwatch's heap count never sees
//! it; the kernel charges it to the memory cgroup all the same.
//!
//! On when `KVSERVER_NATIVE_CACHE=1`.

use parking_lot::Mutex;

/// The size of each mapping.
const CHUNK: usize = 1 << 20;

/// Mapped chunks, filled one after the other; never unmapped (the cache
/// only grows, which is what the demo is about).
pub struct NativeCache {
    current: Mutex<(usize, usize)>,
}

impl NativeCache {
    /// The cache, if `KVSERVER_NATIVE_CACHE=1`.
    pub fn from_env() -> Option<NativeCache> {
        (std::env::var("KVSERVER_NATIVE_CACHE").as_deref() == Ok("1")).then(|| NativeCache {
            current: Mutex::new((0, CHUNK)),
        })
    }

    /// Copies `value` into the mapped memory.
    pub fn keep(&self, value: &[u8]) {
        let mut cur = self.current.lock();
        let (base, used) = &mut *cur;
        for part in value.chunks(CHUNK) {
            if *used + part.len() > CHUNK {
                // SAFETY: a new private anonymous mapping of CHUNK bytes;
                // nothing else refers to it.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        CHUNK,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED, "mmap of the native cache");
                *base = p as usize;
                *used = 0;
            }
            // SAFETY: `part` fits in the rest of the mapping at `base`,
            // which this lock guards and which is never unmapped.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    part.as_ptr(),
                    (*base as *mut u8).add(*used),
                    part.len(),
                )
            };
            *used += part.len();
        }
    }
}
