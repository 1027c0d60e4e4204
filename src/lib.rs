//! memwatch counts live heap bytes in the global allocator and, the moment
//! they cross a threshold, shuts the process down in order with exit code 2,
//! before the kernel OOM-killer can SIGKILL it mid-write.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: memwatch::MemWatch = memwatch::MemWatch::new(memwatch::Jemalloc);
//!
//! fn main() {
//!     let watchdog = memwatch::Watchdog::from_env() // ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB
//!         .on_shutdown("flush", || { /* stop intake, flush, fsync */ })
//!         .start();
//!     // ... serve ...
//!     watchdog.exit_if_tripped();
//! }
//! ```
//!
//! # How it works
//!
//! - [`MemWatch`] wraps an inner allocator (jemalloc by default,
//!   [`std::alloc::System`] or any other [`GlobalAlloc`](std::alloc::GlobalAlloc)).
//!   Every alloc, realloc and free is counted in the calling thread's own
//!   counters, and what a thread counted is folded into one shared total in
//!   batches. There is no polling.
//! - Over jemalloc on Linux, the counters are jemalloc's own: it adds every
//!   block's usable size to per-thread counters on its fast path anyway.
//!   memwatch's fast path only takes the call's weight (its size plus 16)
//!   from a thread-local credit; a call the credit does not cover is made
//!   and then the thread reads its counters, publishes them for readings,
//!   folds them into the shared total once they exceed its allowance from
//!   the error budget, and sets the credit to its interval again. Over any
//!   other allocator, memwatch adds the requested size to the thread's own
//!   delta and folds it when it exceeds that allowance.
//! - A thread joins on its first call through the allocator, whatever
//!   started it (std, tokio, C code, the C library itself, a `dlopen`'d
//!   library), and leaves from a `pthread` key destructor at its end.
//! - The fold that first takes the shared total above the threshold flips a
//!   one-shot latch and wakes the watchdog thread, without allocating.
//! - The [`Watchdog`] logs one error line with the figures, runs the
//!   application's shutdown hooks in order on its own thread, bounded by a
//!   grace period, and exits with code 2.
//!
//! # Configuration
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB` | threshold in MiB (× 1,048,576 bytes); unset, empty or `0` is off | off |
//! | `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO` | threshold as a fraction in (0, 1] of the effective memory limit (cgroup or RAM); the MiB form wins | off |
//! | `ELASTICKV_MEMORY_SHUTDOWN_GRACE` | time the hooks may take: `500ms`, `10s`, `2m`; `0s` skips them; at most a day (longer is clamped, with a warning) | `30s` |
//! | `ELASTICKV_MEMORY_SHED_THRESHOLD_MB` | soft level in MiB, below the threshold: [`pressure`] turns true above it | off |
//! | `ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO` | soft level as a fraction of the effective memory limit | off |
//! | `ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO` | the kernel trigger: a fraction in (0, 1] of the memory cgroup's limit, for the charge that reclaim cannot free (see [`Watchdog::cgroup_threshold_ratio`]) | off |
//! | `ELASTICKV_MEMORY_HOLD_CEILING_MB` | once tripped, an allocation that would take the heap past this many MiB waits for the exit (see [`Watchdog::hold_ceiling_mb`]); `0` never holds | halfway from the threshold to the cgroup limit, or the threshold plus the error budget |
//! | `ELASTICKV_MEMORY_LIMIT_RECHECK` | how often a ratio level re-reads the memory limit and follows a resize; `0s` reads it once; at most a day (longer is clamped, with a warning) | `10s` |
//!
//! A malformed value gives one warning naming the variable and the value; a
//! bad threshold or grace leaves the watchdog off, a bad soft level leaves
//! only the soft level off, a bad kernel trigger ratio only that trigger.
//! Warnings go through the [`log`] crate; if the
//! application installed no logger, warnings and errors go to standard error.
//!
//! # Shedding load first
//!
//! Above the soft level, [`pressure`] is true (one atomic load) and the
//! callbacks given to [`Watchdog::on_pressure`] run on the watchdog thread;
//! usage must fall 10% below the level to leave it. A handler refuses work
//! while the server can still answer:
//!
//! ```
//! fn handle_write() -> Result<(), &'static str> {
//!     if memwatch::pressure() {
//!         return Err("busy, try later");
//!     }
//!     // ... accept the write ...
//!     Ok(())
//! }
//! # assert!(handle_write().is_ok());
//! ```
//!
//! # Exit codes
//!
//! 0 is a normal stop, 1 a crash or an error returned from `main`, and 2 a
//! memory-pressure shutdown ([`Watchdog::exit_code`] changes it).
//!
//! # Accuracy
//!
//! These bounds hold for every sequence of calls: any sizes, alignments,
//! reallocations and cross-thread frees, any number of threads
//! (`docs/design.md`, "The error bound", derives them; seeded random
//! sequences test them). [`live_bytes`] is exact for threads that have
//! ended and for the calling thread, however many threads came and went.
//! Over memwatch's own count it is exact for every quiescent thread; over
//! jemalloc, every other live thread may hold less than 1.25 times its
//! interval unpublished (the interval is 48 KiB plus the
//! thread's allowance, at most the slack;
//! [`Snapshot::reading_error_bytes`] gives the sum now). The threshold has
//! one error budget for the whole process, the larger of 16 MiB
//! ([`MIN_BUDGET`]) and 2% of the threshold: the trip comes at most that
//! much plus 64 KiB per thread (over jemalloc) early or late, however many
//! threads there are and whether they are busy or idle. The threads share
//! a pool of allowances drawn from the budget; a thread folds its count
//! once it exceeds its allowance, and a fold that could cross a level sums
//! every thread's pending count before the latch decides.
//! [`MemWatch::with_slack`] caps the allowance.
//!
//! Over jemalloc, a block counts as its usable size (its size class, what
//! jemalloc's `stats.allocated` counts), and jemalloc counts every block it
//! hands a counted thread, including any allocated by calling [`Jemalloc`]
//! directly. Over other allocators a block counts as its requested size,
//! and a small request (up to twice the slack) that the inner allocator
//! refuses stays counted, because the count comes before the call;
//! allocators refuse such requests only when the kernel gives them no
//! memory. Not counted in the heap: allocator metadata, `mmap` and thread
//! stacks (the kernel trigger sees them), and memory that C libraries
//! `malloc` directly unless the binary invokes [`c_heap!`], which routes
//! the C library's allocation functions through memwatch so they count
//! exactly like Rust's. See `docs/design.md`.
//!
//! # Memory outside the heap
//!
//! The kernel OOM-kills on what the memory cgroup is charged. With
//! [`Watchdog::cgroup_threshold_ratio`] (or its variable), a thread of
//! memwatch's sleeps until the kernel signals the cgroup (usage threshold and
//! pressure events on cgroup v1, `memory.events` and PSI on v2), reads the
//! charge less the file cache, which reclaim can always take back, and
//! starts the same shutdown at the level. Page cache never trips it.
//!
//! After `fork` without `exec`, the child keeps its own thread's count and
//! folds the other threads' last published figures into the total (over
//! jemalloc, what each did since its last look is lost: less than 1.25
//! times its interval); it runs no
//! watchdog unless it starts one.
//!
//! # Crate features
//!
//! - `jemalloc` (default): re-exports [`Jemalloc`] as the default inner
//!   allocator, counts through jemalloc's own per-thread counters on Linux
//!   and adds jemalloc's own figures to the trip report
//!   ([`jemalloc_stats`]). It takes tikv-jemallocator 0.6 or 0.7, whichever
//!   the program's dependency graph holds. With it, on Linux, a binary may
//!   invoke [`c_heap!`].
//!
//! # Why `unsafe`
//!
//! Implementing [`GlobalAlloc`](std::alloc::GlobalAlloc) is unsafe by
//! definition; the wrapper forwards every call unchanged. Each thread
//! counts in a slot of a table that is never freed (`src/count/table.rs`),
//! so readers load only atomics that the owner stores and never follow a
//! pointer into another thread's memory; the fold of a slot into the shared
//! total, a slot changing owners and the latch are model-checked with
//! `loom`. Over jemalloc each thread reads its own jemalloc counters
//! through the addresses jemalloc gave it (`src/count/jemalloc.rs`), and no
//! other thread ever reads them. memwatch defines no C library symbol
//! unless a binary invokes [`c_heap!`]. Each
//! `unsafe` block says why it is sound.
//!
//! # MSRV
//!
//! Rust 1.83.

#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
// Under `--cfg loom` only the slots, the table and the latch are built, for
// their model checks.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

// The index. In-band, on the allocator path:
/// The C library's allocation functions for [`c_heap!`]: jemalloc's, counted.
#[cfg(all(memwatch_jemalloc_counts, not(loom)))]
#[doc(hidden)]
#[path = "c_heap.rs"]
pub mod __c_heap;
/// The wrapper: `GlobalAlloc` over an inner allocator.
#[cfg(not(loom))]
mod alloc;
/// The per-thread counts, the thread table, the shared total, the budget.
mod count;
/// The one-shot latch and the soft level, decided on exact readings.
mod latch;
/// std's atomics, or loom's under `--cfg loom`, chosen once.
mod sync;

// Off the allocator path, on the application's and the watchdog's threads:
/// Environment variables and their parsing.
#[cfg(not(loom))]
mod config;
/// The kernel-pushed trigger: the memory cgroup's unreclaimable charge.
#[cfg(not(loom))]
mod kernel_trigger;
/// The effective memory limit (cgroup v2, v1, RAM).
#[cfg(not(loom))]
mod limits;
/// The watchdog and grace threads after the trip, and the exit.
#[cfg(not(loom))]
mod shutdown;
/// The readings a program or a metrics endpoint takes.
#[cfg(not(loom))]
mod stats;
/// The builder, its start and its handle.
#[cfg(not(loom))]
mod watchdog;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(not(loom))]
pub use crate::alloc::{DefaultInner, MemWatch};
#[cfg(not(loom))]
pub use crate::config::{
    parse_grace, parse_limit_recheck, parse_ratio, parse_threshold_mb, ConfigError,
    ConfigErrorKind, BYTES_PER_MIB, CGROUP_RATIO_ENV, DEFAULT_EXIT_CODE, DEFAULT_GRACE,
    DEFAULT_LIMIT_RECHECK, DEFAULT_SHED_HYSTERESIS_PERCENT, GRACE_ENV, HOLD_CEILING_ENV,
    LIMIT_RECHECK_ENV, SHED_ENV, SHED_RATIO_ENV, THRESHOLD_ENV, THRESHOLD_RATIO_ENV,
};
#[cfg(not(loom))]
pub use crate::count::{DEFAULT_SLACK, MAX_SLACK, MIN_BUDGET};
#[cfg(not(loom))]
pub use crate::limits::{memory_limit, memory_limit_at, LimitSource, MemoryLimit};
#[cfg(not(loom))]
pub use crate::shutdown::{wait_tripped, wait_tripped_timeout};

/// Exempts the calling thread from the hold after the trip: its allocations
/// never wait at the hold ceiling (see
/// [`Watchdog::hold_ceiling_mb`]). Call it on the threads the shutdown
/// hooks need to finish (the workers that drain in-flight requests, the
/// thread that flushes a write-ahead log) when their drain may take the
/// heap past the ceiling; memwatch's own threads are exempt already.
#[cfg(not(loom))]
pub fn exempt_from_hold() {
    count::exempt_current_thread();
}
#[cfg(not(loom))]
pub use crate::stats::{
    armed_threshold_bytes, jemalloc_stats, live_bytes, peak_bytes, pressure, snapshot, tripped,
    wraps_jemalloc, JemallocStats, Snapshot,
};
#[cfg(not(loom))]
pub use crate::watchdog::{PressureEvent, Watchdog, WatchdogHandle};

/// Routes the C library's allocation functions through memwatch: here, where
/// memwatch does not count over jemalloc's own counters (not Linux, or
/// without the `jemalloc` feature), it stops the build with the reason.
#[cfg(not(memwatch_jemalloc_counts))]
#[macro_export]
macro_rules! c_heap {
    () => {
        compile_error!("memwatch::c_heap! needs the `jemalloc` feature on Linux");
    };
}

/// jemalloc, the default inner allocator (re-exported from `tikv-jemallocator`).
#[cfg(all(feature = "jemalloc", not(loom)))]
pub use tikv_jemallocator::Jemalloc;
