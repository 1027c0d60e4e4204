//! The count: every thread counts in a slot of its own, and what the slots
//! hold is folded into one shared total in batches. The fold is where the
//! threshold is checked ([`crate::latch`]).
//!
//! - [`slot`]: one thread's published delta and its fold (loom-checked).
//! - [`table`]: the slots of all threads, in memory never freed.
//! - [`own`]: memwatch's own count of requested sizes, over any allocator.
//! - [`jemalloc`]: over jemalloc on Linux, jemalloc's own per-thread
//!   counters, looked at once a call's weight is more than the credit left
//!   of the thread's interval.
//!
//! The threads draw their allowances (how much each may keep unfolded, and
//! over jemalloc its interval past the floor) from one pool, 4/13 of the
//! error budget, so that the error bound holds however the thread count
//! moved since each thread last decided (docs/design.md, "The error
//! bound").
//!
//! A thread joins on its first call through the allocator, whatever started
//! it, and leaves from a `pthread` key destructor, which the C library runs
//! after every thread-local destructor. A forked child keeps only its own
//! thread's slot and folds the others' last figures into the total.
//!
//! The exact reading ([`live_bytes`]) is every taken slot's pending delta
//! plus the total, in that order, so that a racing fold is never missed.

pub(crate) mod slot;
pub(crate) mod table;

#[cfg(not(loom))]
pub(crate) mod own;

#[cfg(memwatch_jemalloc_counts)]
pub(crate) mod jemalloc;

#[cfg(not(loom))]
pub(crate) use process::*;

/// Where a thread stands with a table, in its thread-local state word.
#[cfg(not(loom))]
pub(crate) mod state {
    /// Not in the table yet; the next cold call tries to join.
    pub(crate) const UNREGISTERED: u8 = 0;
    /// Joining: calls made meanwhile count in the total.
    pub(crate) const REGISTERING: u8 = 1;
    /// In the table.
    pub(crate) const ACTIVE: u8 = 2;
    /// Past its exit, or unable to join: every call counts in the total.
    pub(crate) const DIRECT: u8 = 3;
}

/// Default per-thread slack, in bytes: 4 MiB, ClickHouse's default
/// `max_untracked_memory`. A thread folds what it counted into the shared
/// total once more than its share of the process's error budget, and never
/// more than this, is unfolded; alloc/free pairs up to that size never
/// touch the shared total.
pub const DEFAULT_SLACK: usize = 4 << 20;

/// The least error budget: the process-wide bound on what all threads
/// together may hold unfolded is the larger of this (16 MiB) and 2% of the
/// threshold. See `docs/design.md`, "The error bound".
pub const MIN_BUDGET: usize = 16 << 20;

/// The largest slack [`crate::MemWatch::with_slack`] accepts: 2^61 bytes.
/// It keeps `2 * slack` below 2^62, so that a slot outside every window can
/// never be entered (see `slot::OUTSIDE`).
pub const MAX_SLACK: usize = isize::MAX as usize / 4;

#[cfg(not(loom))]
mod process {
    use std::ffi::c_void;
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

    use super::{slot, MIN_BUDGET};
    use crate::latch;
    use crate::sync::{fence, AtomicIsize, AtomicU8, AtomicUsize};

    /// The folded total of live bytes.
    pub(crate) static TOTAL: AtomicIsize = AtomicIsize::new(0);

    /// Threads holding a slot, in either table.
    static THREADS: AtomicUsize = AtomicUsize::new(0);

    /// The process's error budget in bytes (see [`pool`]).
    static BUDGET: AtomicUsize = AtomicUsize::new(MIN_BUDGET);

    /// The sum of the positive pending deltas at the last exact check: what
    /// the folds add to the total before they compare it with the levels.
    static AHEAD: AtomicIsize = AtomicIsize::new(0);

    /// Adds `delta` to the shared total and lets the latch look at it: how
    /// a call that no slot counts (a thread past its exit, or before it
    /// could join) is counted.
    pub(crate) fn fold(delta: isize) {
        observe(slot::add_to(&TOTAL, delta));
    }

    /// The allowances the threads hold now, in bytes: what every thread
    /// took from the pool at its last decision and has not given back.
    /// Never above [`pool`] (but after the budget was lowered, until the
    /// threads next decide).
    static HELD: AtomicUsize = AtomicUsize::new(0);

    /// A thread's fair share of the pool: the pool split among the threads,
    /// kept up to date by [`reshare`] so that a decision reads one word.
    static SHARE: AtomicUsize = AtomicUsize::new(pool_of(MIN_BUDGET));

    /// The pool of allowances for the budget `budget`: 4/13 of it. The
    /// error bound spends the pool 3.25 times over (docs/design.md, "The
    /// error bound": twice for pendings that swing from one side to the
    /// other between exact checks, 1.25 times for what jemalloc's counters
    /// hold unpublished), so that the three together stay within the
    /// budget.
    const fn pool_of(budget: usize) -> usize {
        budget / 13 * 4
    }

    /// The pool for the budget in force.
    pub(crate) fn pool() -> usize {
        pool_of(BUDGET.load(Relaxed))
    }

    /// The allowance a thread asks for at a decision: its fair share of the
    /// pool, never more than `slack`. Relaxed: a read-mostly figure; what a
    /// thread may actually hold is settled by [`grow`] on [`HELD`].
    #[inline]
    pub(crate) fn wanted(slack: usize) -> usize {
        slack.min(SHARE.load(Relaxed))
    }

    /// Takes up to `want - held` more from the pool for a thread that holds
    /// `held`, as much as the pool has left; returns what the thread holds
    /// then (`held` if the pool is spent). `want > held`.
    ///
    /// Relaxed throughout: [`HELD`] is a count of a resource and publishes
    /// no other memory; the read-modify-write alone keeps the sum of the
    /// allowances within the pool.
    #[cold]
    pub(crate) fn grow(held: usize, want: usize) -> usize {
        debug_assert!(want > held);
        let pool = pool();
        let mut now = HELD.load(Relaxed);
        loop {
            let take = (want - held).min(pool.saturating_sub(now));
            if take == 0 {
                return held;
            }
            match HELD.compare_exchange_weak(now, now + take, Relaxed, Relaxed) {
                Ok(_) => return held + take,
                Err(seen) => now = seen,
            }
        }
    }

    /// Gives `amount` of a thread's allowance back to the pool: after the
    /// thread stopped relying on it (its pending is within what it keeps).
    pub(crate) fn give_back(amount: usize) {
        if amount != 0 {
            // Relaxed: see `grow`.
            HELD.fetch_sub(amount, Relaxed);
        }
    }

    /// The allowance a thread settles on at a decision, holding `held`
    /// before it, for an allocator with `slack`: at most its fair share,
    /// grown from the pool if it asks for more. The caller gives back
    /// `held - kept` with [`give_back`] once it keeps its pending within
    /// the new allowance.
    #[inline]
    pub(crate) fn settle(held: usize, slack: usize) -> usize {
        let want = wanted(slack);
        if want > held {
            grow(held, want)
        } else {
            want
        }
    }

    /// The allowances held now.
    #[cfg(all(test, memwatch_jemalloc_counts))]
    pub(crate) fn held() -> usize {
        HELD.load(Relaxed)
    }

    /// Recomputes [`SHARE`] after the threads or the budget changed. Of two
    /// racing callers, the one that stores a stale share sees the count move
    /// and stores again, so the last store is the current share.
    fn reshare() {
        loop {
            let (threads, budget) = (THREADS.load(SeqCst), BUDGET.load(SeqCst));
            SHARE.store(pool_of(budget) / threads.max(1), SeqCst);
            if THREADS.load(SeqCst) == threads && BUDGET.load(SeqCst) == budget {
                return;
            }
        }
    }

    /// Sets the budget for `threshold`: the larger of [`MIN_BUDGET`] and 2%
    /// of it.
    pub(crate) fn set_budget(threshold: isize) {
        let budget = (threshold.max(0) as usize / 50).max(MIN_BUDGET);
        BUDGET.store(budget, SeqCst);
        reshare();
    }

    /// The budget in bytes.
    pub(crate) fn budget() -> usize {
        BUDGET.load(SeqCst)
    }

    /// Threads holding a slot now. Relaxed: a statistic.
    pub(crate) fn threads() -> usize {
        THREADS.load(Relaxed)
    }

    /// A thread took a slot: the budget's shares shrink, and the slots that
    /// hold more than the new share are looked at now (see
    /// [`check_exact`]).
    pub(crate) fn thread_joined() {
        THREADS.fetch_add(1, SeqCst);
        reshare();
        if latch::armed() {
            check_exact();
        }
    }

    /// A thread gave its slot back.
    pub(crate) fn thread_left() {
        THREADS.fetch_sub(1, SeqCst);
        reshare();
    }

    /// Looks at a fold's new total. The total misses what the slots hold
    /// unfolded; adding what they held ahead at the last exact check, a
    /// fold that could cross a level makes an exact check, so the levels
    /// are compared with the whole reading. Far from the levels this is one
    /// fence and two loads.
    #[inline]
    pub(crate) fn observe(total: isize) {
        // SeqCst: the fold's add comes before the levels are loaded, and
        // the watchdog stores the levels before its own check (Dekker's
        // pattern): the fold or that check sees the other.
        fence(SeqCst);
        latch::note_peak(total);
        // Relaxed: a figure of the last check; the exact check decides.
        if latch::needs_look(total.saturating_add(AHEAD.load(Relaxed)), total) {
            check_exact();
        }
    }

    /// Compares the whole reading (every slot's pending delta and the
    /// total) with the levels, and notes how much the slots hold ahead of
    /// the total. Allocates nothing, takes no lock: a walk of the table.
    pub(crate) fn check_exact() {
        // SeqCst: see `observe`.
        fence(SeqCst);
        let (now, ahead) = reading();
        AHEAD.store(ahead, Relaxed);
        latch::observe(now);
    }

    /// The exact reading and the sum of the positive pending deltas.
    fn reading() -> (isize, isize) {
        let (mut sum, mut ahead) = (0isize, 0isize);
        super::own::add_pending(&mut sum, &mut ahead);
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::add_pending(&mut sum, &mut ahead);
        // The total last, so that a fold racing with this reading is counted
        // once or twice, never missed (see `slot`). Relaxed: the Acquire
        // loads of the slots order it after them.
        (sum.wrapping_add(TOTAL.load(Relaxed)), ahead)
    }

    /// The exact reading: every taken slot's pending delta, then the total.
    ///
    /// Exact once threads are quiescent for memwatch's own count; over
    /// jemalloc, each other live thread may hold less than 1.25 times its
    /// interval unpublished (the calling thread publishes its
    /// own first).
    pub(crate) fn live_bytes() -> isize {
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::publish_own();
        reading().0
    }

    /// The heap a thread may take the process to after the trip before its
    /// next allocation waits for the exit (see [`hold_if_over`]);
    /// `isize::MAX` (never) until the watchdog sets it.
    static CEILING: AtomicIsize = AtomicIsize::new(isize::MAX);

    /// Sets the ceiling; `isize::MAX` turns the hold off.
    pub(crate) fn set_ceiling(bytes: isize) {
        // Relaxed: read only once the latch has tripped, which the
        // watchdog's start orders after this store (SeqCst on the levels).
        CEILING.store(bytes, Relaxed);
    }

    /// The ceiling in force, if any.
    pub(crate) fn ceiling() -> Option<isize> {
        // Relaxed: see `set_ceiling`.
        match CEILING.load(Relaxed) {
            isize::MAX => None,
            c => Some(c),
        }
    }

    std::thread_local! {
        /// Whether the calling thread never waits at the ceiling: memwatch's
        /// own threads (the hooks run on one) and threads the application
        /// names with [`crate::exempt_from_hold`].
        static EXEMPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Exempts the calling thread from the hold at the ceiling.
    pub(crate) fn exempt_current_thread() {
        EXEMPT.with(|e| e.set(true));
    }

    /// Before an allocation that may take the heap up by `size` bytes, on
    /// the cold path: once the latch has tripped, a thread whose allocation
    /// would take the exact reading past the ceiling waits until the heap
    /// falls below it (the hooks free memory) or the process ends, which the
    /// grace deadline bounds. Far from the trip this is one load. The wait
    /// is a sleep of 1 ms at a time: no allocation, no lock.
    #[inline]
    pub(crate) fn hold_if_over(size: usize) {
        if latch::tripped_at().is_some() {
            hold_cold(size);
        }
    }

    #[cold]
    #[inline(never)]
    fn hold_cold(size: usize) {
        let Some(ceiling) = ceiling() else {
            return;
        };
        if EXEMPT.with(std::cell::Cell::get) {
            return;
        }
        let size = size.min(isize::MAX as usize) as isize;
        let over = || reading().0.saturating_add(size) > ceiling;
        if !over() {
            return;
        }
        HOLDING.fetch_add(1, Relaxed);
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        while over() {
            // SAFETY: `nanosleep` reads one valid timespec and writes no
            // remainder (null); it neither allocates nor locks.
            unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
        }
        HOLDING.fetch_sub(1, Relaxed);
    }

    /// How many threads wait at the ceiling now. Relaxed: a statistic.
    static HOLDING: AtomicUsize = AtomicUsize::new(0);

    /// How many threads wait at the ceiling now.
    pub(crate) fn holding() -> usize {
        HOLDING.load(Relaxed)
    }

    /// The most a reading taken now can miss, either way, of what the live
    /// threads other than the caller did: over jemalloc, what they may
    /// hold unpublished (see `jemalloc::unpublished_in_all`); over
    /// memwatch's own count, nothing once they are quiescent.
    pub(crate) fn reading_error() -> usize {
        #[cfg(memwatch_jemalloc_counts)]
        if crate::stats::wraps_jemalloc() {
            return super::jemalloc::unpublished_in_all(threads().saturating_sub(1));
        }
        0
    }

    /// The folded total alone, what the threshold check compares.
    #[cfg(test)]
    pub(crate) fn folded_bytes() -> isize {
        // Relaxed: a statistic.
        TOTAL.load(Relaxed)
    }

    /// Process-wide set-up: not started, running, done, failed.
    const NOT_SET_UP: u8 = 0;
    const SETTING_UP: u8 = 1;
    const SET_UP: u8 = 2;
    const SET_UP_FAILED: u8 = 3;
    static SETUP: AtomicU8 = AtomicU8::new(NOT_SET_UP);
    /// The `pthread` key whose destructor is [`at_exit`], once set up.
    static EXIT_KEY: AtomicUsize = AtomicUsize::new(0);

    /// Arms the calling thread's exit and claims it a slot of `table`; on
    /// failure, the state the thread takes: try again on a later call while
    /// another thread sets the process up, count every call in the total if
    /// the kernel refused the table memory.
    pub(crate) fn claim(
        table: &'static super::table::Table,
    ) -> Result<&'static super::slot::Slot, u8> {
        if !arm_exit() {
            return Err(super::state::UNREGISTERED);
        }
        table.claim().ok_or(super::state::DIRECT)
    }

    /// Arranges for [`at_exit`] to run when the calling thread ends, and
    /// returns whether it will. The first call in the process creates the
    /// key and installs the fork handler; a call that meets another thread
    /// doing so returns `false` at once rather than wait (the caller counts
    /// this call in the total and tries again on a later one). Neither
    /// allocates through Rust's allocator nor blocks.
    pub(crate) fn arm_exit() -> bool {
        // Acquire pairs with the Release store of `SET_UP`: the key is set.
        match SETUP.load(Acquire) {
            SET_UP => {}
            NOT_SET_UP => {
                // Acquire/Relaxed: the winner publishes with the Release
                // store below; a loser only learns that it lost.
                if SETUP
                    .compare_exchange(NOT_SET_UP, SETTING_UP, AcqRel, Relaxed)
                    .is_err()
                {
                    return false;
                }
                let done = set_up();
                // Release: see the load above.
                SETUP.store(if done { SET_UP } else { SET_UP_FAILED }, Release);
                if !done {
                    return false;
                }
            }
            _ => return false,
        }
        // Relaxed: ordered by the Acquire load of `SETUP` above.
        let key = EXIT_KEY.load(Relaxed) as libc::pthread_key_t;
        // SAFETY: `key` came from `pthread_key_create`; the value is a
        // non-null marker, never dereferenced.
        unsafe {
            libc::pthread_setspecific(key, std::ptr::NonNull::<u8>::dangling().as_ptr().cast()) == 0
        }
    }

    fn set_up() -> bool {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is writable; `at_exit` has the destructor's type.
        if unsafe { libc::pthread_key_create(&mut key, Some(at_exit)) } != 0 {
            return false;
        }
        // Relaxed: published by the Release store of `SET_UP`.
        EXIT_KEY.store(key as usize, Relaxed);
        // SAFETY: `after_fork_in_child` is an `extern "C" fn()` that stays
        // valid for the program's life.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) == 0 }
    }

    /// A thread's end: the C library runs key destructors after every
    /// thread-local destructor, Rust's included, so what the thread's whole
    /// life counted is folded here. Calls made after it (by later key
    /// destructors) count themselves in the total.
    unsafe extern "C" fn at_exit(_: *mut c_void) {
        super::own::leave();
        #[cfg(memwatch_jemalloc_counts)]
        super::jemalloc::leave();
    }

    /// In a child of `fork`, only the forking thread lives on: the other
    /// threads' slots are folded into the total (their heap was copied with
    /// the rest) and freed, so that nothing points at threads that are gone.
    extern "C" fn after_fork_in_child() {
        #[allow(unused_mut)]
        let mut freed = super::own::forget_other_threads();
        #[cfg(memwatch_jemalloc_counts)]
        {
            freed += super::jemalloc::forget_other_threads();
        }
        THREADS.fetch_sub(freed, SeqCst);
        // The other threads' allowances went with them: only the forking
        // thread's own are held now.
        #[allow(unused_mut)]
        let mut kept = super::own::allowance();
        #[cfg(memwatch_jemalloc_counts)]
        {
            kept += super::jemalloc::allowance();
        }
        HELD.store(kept, Relaxed);
        reshare();
    }
}
