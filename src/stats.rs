//! Readings: memwatch's own count and, where jemalloc is in use, jemalloc's.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::{count, latch};

/// A point-in-time reading of memwatch's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Live heap bytes allocated and not yet freed (see [`live_bytes`]).
    pub live_bytes: usize,
    /// The highest folded total seen (low by at most the error bound; see
    /// [`peak_bytes`]).
    pub peak_bytes: usize,
    /// The armed threshold in bytes, if the watchdog runs.
    pub threshold_bytes: Option<usize>,
    /// The folded total that tripped the latch, if it has tripped.
    pub tripped_at_bytes: Option<usize>,
    /// Whether usage is above the soft level.
    pub shedding: bool,
    /// The soft level in bytes, if one is set.
    pub shed_bytes: Option<usize>,
    /// Threads that hold a slot in memwatch's table now (every thread that
    /// has called the allocator and not ended).
    pub threads: usize,
    /// The process's error budget in bytes: the trip comes at most this
    /// much, plus 64 KiB per thread over jemalloc, before or after the heap
    /// crosses the threshold (see [`MIN_BUDGET`](crate::MIN_BUDGET)).
    pub error_budget_bytes: usize,
    /// The most [`live_bytes`] may be off by now, either way, from what the
    /// other live threads have not published yet: over jemalloc less than
    /// 1.25 times each one's interval (docs/design.md, "The
    /// error bound"); over memwatch's own count 0 for quiescent threads.
    pub reading_error_bytes: usize,
    /// Threads waiting at the hold ceiling now (after the trip; see
    /// [`Watchdog::hold_ceiling_mb`](crate::Watchdog::hold_ceiling_mb)).
    pub held_threads: usize,
}

/// Live heap bytes through the memwatch allocator: allocated and not yet
/// freed, by every thread. Over jemalloc a block counts as its usable size
/// (what jemalloc's `stats.allocated` counts); over other allocators, as its
/// requested size.
///
/// Exact for threads that have ended and for the calling thread's own
/// calls; over memwatch's own count, exact for every quiescent thread. Over
/// jemalloc, each other live thread may hold allocations or frees it has not
/// published yet: less than 1.25 times its interval, the
/// interval being 48 KiB plus the thread's allowance from the error budget
/// and at most the slack ([`Snapshot::reading_error_bytes`] gives the sum
/// now). Costs one load per thread slot (256
/// at least) and no lock: fine for a metrics endpoint, and no thread ever
/// waits for a reading.
pub fn live_bytes() -> usize {
    let now = count::live_bytes();
    // A reading is a figure seen too: the peak never reads below it.
    latch::note_peak(now);
    clamp(now)
}

/// The highest live-bytes figure seen at a fold or by [`live_bytes`]: never
/// below a reading taken before it. Folds happen when a thread's count has
/// moved by more than its allowance from the error budget since its last
/// fold, so a peak that no fold or reading saw can be missed by up to the
/// error bound (see [`Snapshot::error_budget_bytes`]).
pub fn peak_bytes() -> usize {
    clamp(latch::peak())
}

/// The threshold in bytes, if a watchdog armed one.
pub fn armed_threshold_bytes() -> Option<usize> {
    latch::threshold().map(clamp)
}

/// Whether the latch has tripped. One atomic load.
pub fn tripped() -> bool {
    latch::tripped_at().is_some()
}

/// Whether live usage is above the soft (shed) level, with hysteresis: the
/// cheap check a request handler makes before accepting work. One atomic
/// load. Always `false` without a shed level.
pub fn pressure() -> bool {
    latch::pressure()
}

/// All of memwatch's figures at once.
pub fn snapshot() -> Snapshot {
    Snapshot {
        live_bytes: live_bytes(),
        peak_bytes: peak_bytes(),
        threshold_bytes: armed_threshold_bytes(),
        tripped_at_bytes: latch::tripped_at().map(clamp),
        shedding: latch::pressure(),
        shed_bytes: latch::shed_levels().map(|(enter, _)| clamp(enter)),
        threads: count::threads(),
        error_budget_bytes: count::budget(),
        reading_error_bytes: count::reading_error(),
        held_threads: count::holding(),
    }
}

fn clamp(n: isize) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// jemalloc's own figures, in bytes (see jemalloc's `stats.*` mallctl names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct JemallocStats {
    /// `stats.allocated`: bytes in live allocations, rounded up to size classes.
    pub allocated: usize,
    /// `stats.active`: bytes in active pages (a multiple of the page size).
    pub active: usize,
    /// `stats.resident`: bytes in physically resident data pages.
    pub resident: usize,
    /// `stats.mapped`: bytes in extents mapped by the allocator.
    pub mapped: usize,
    /// `stats.retained`: bytes retained (unmapped from use but kept virtual).
    pub retained: usize,
}

impl fmt::Display for JemallocStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "jemalloc allocated={} active={} resident={} mapped={} retained={}",
            self.allocated, self.active, self.resident, self.mapped, self.retained
        )
    }
}

/// Set once a thread has allocated through a `MemWatch<Jemalloc>`.
static JEMALLOC_INNER: AtomicBool = AtomicBool::new(false);

/// Called from the allocator's once-per-thread slow path.
#[cfg_attr(not(feature = "jemalloc"), allow(dead_code))]
pub(crate) fn note_jemalloc_inner() {
    // Relaxed is enough: a flag read only for reporting. The load first
    // keeps threads from writing a shared line that is already set.
    if !JEMALLOC_INNER.load(Relaxed) {
        JEMALLOC_INNER.store(true, Relaxed);
    }
}

/// Whether memwatch wraps jemalloc in this process (some thread has
/// allocated through a `MemWatch<Jemalloc>`).
pub fn wraps_jemalloc() -> bool {
    JEMALLOC_INNER.load(Relaxed)
}

/// Reads jemalloc's statistics after advancing its epoch, or `None` when the
/// `jemalloc` feature is off or a read fails. They describe this process's
/// heap only where jemalloc is the inner allocator ([`wraps_jemalloc`]).
///
/// Call it off the allocator path: it goes through jemalloc's `mallctl`.
pub fn jemalloc_stats() -> Option<JemallocStats> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        epoch::advance().ok()?;
        Some(JemallocStats {
            allocated: stats::allocated::read().ok()?,
            active: stats::active::read().ok()?,
            resident: stats::resident::read().ok()?,
            mapped: stats::mapped::read().ok()?,
            retained: stats::retained::read().ok()?,
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    {
        None
    }
}
