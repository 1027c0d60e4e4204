//! The shutdown: what the watchdog thread does once the latch trips, the
//! grace thread that bounds it, and the exit.
//!
//! `memwatch-watchdog` sleeps until the latch wakes it (moving the soft
//! level and following the memory limit meanwhile), then logs the trip,
//! runs the hooks and exits with the exit code. `memwatch-grace` sleeps
//! until the trip, then ends the process with `_exit` if the hooks or the
//! exit itself overrun the deadline. Every line logged after the trip goes
//! through a thread of its own, so that a blocked standard error holds up
//! nothing.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use log::Level;
use parking_lot::{Condvar, Mutex};

use crate::config;
use crate::watchdog::{emit, Follow, Hook, PressureCallback, PressureEvent};
use crate::{kernel_trigger, latch, stats};

/// Blocks until the latch trips and the watchdog begins the shutdown.
/// Returns at once if that has already happened; never returns if no
/// watchdog is armed and nothing trips the latch.
pub fn wait_tripped() {
    let mut seq = SEQUENCE.lock();
    while seq.phase == Phase::Waiting {
        SEQUENCE_CHANGED.wait(&mut seq);
    }
}

/// Like [`wait_tripped`], with a timeout. Returns whether the latch tripped.
pub fn wait_tripped_timeout(timeout: Duration) -> bool {
    let Some(deadline) = Instant::now().checked_add(timeout) else {
        // Past the end of time: no deadline.
        wait_tripped();
        return true;
    };
    let mut seq = SEQUENCE.lock();
    while seq.phase == Phase::Waiting {
        if SEQUENCE_CHANGED.wait_until(&mut seq, deadline).timed_out() {
            return seq.phase != Phase::Waiting;
        }
    }
    true
}

static EXITING: AtomicBool = AtomicBool::new(false);

/// In a child of `fork` (from the watchdog's fork handler): the sequence
/// starts over. A lock that a parent thread held at the fork is released:
/// that thread does not exist in the child, and no other thread of the
/// child has run yet.
pub(crate) fn forget_in_child() {
    if SEQUENCE.is_locked() {
        // SAFETY: the holder was a thread of the parent, which the child
        // does not have; the child's only thread holds no guard of it.
        unsafe { SEQUENCE.force_unlock() };
    }
    let mut seq = SEQUENCE.lock();
    seq.phase = Phase::Waiting;
    seq.tripped = None;
    seq.current_hook = None;
    drop(seq);
    TRIP_LINE_WRITTEN.store(false, SeqCst);
    latch::forget_trip_time();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Done,
}

struct Sequence {
    phase: Phase,
    /// When the latch tripped, once it has.
    tripped: Option<Instant>,
    current_hook: Option<String>,
}

static SEQUENCE: Mutex<Sequence> = Mutex::new(Sequence {
    phase: Phase::Waiting,
    tripped: None,
    current_hook: None,
});
static SEQUENCE_CHANGED: Condvar = Condvar::new();

/// What the shutdown needs to know, fixed at start.
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    /// The threshold at start (a resize may move the armed one).
    pub(crate) threshold: isize,
    /// How long the hooks may take.
    pub(crate) grace: Duration,
    /// The exit code of a memory-pressure shutdown.
    pub(crate) exit_code: i32,
    /// How many shutdown hooks there are.
    pub(crate) hooks: usize,
}

/// The watchdog thread's body: waits for the latch, then shuts down.
///
/// Nothing this thread does before the trip can hold it up for long: what
/// it logs goes to the `memwatch-log` thread (a standard error that nobody
/// reads blocks that thread, not this one), and the pressure callbacks run
/// on a `memwatch-pressure` thread of their own. The grace thread starts
/// the deadline from the trip itself in any case.
pub(crate) fn watchdog_thread(
    plan: Plan,
    hooks: Vec<Hook>,
    callbacks: Vec<PressureCallback>,
    mut follow: Option<Follow>,
) {
    crate::count::exempt_current_thread();
    raise_priority();
    let log = LogThread::start();
    log.defer_this_threads_lines();
    let mut pressure = PressureThread::start(callbacks);
    let mut shedding = false;
    let mut next_recheck = follow.as_ref().map(|f| Instant::now() + f.every);
    let tripped_at = loop {
        if let Some(at) = latch::tripped_at() {
            break at;
        }
        if latch::pressure() != shedding {
            shedding = !shedding;
            pressure.changed(shedding);
        }
        // Spurious wake-ups just loop.
        match (&mut follow, next_recheck) {
            (Some(f), Some(at)) => {
                let now = Instant::now();
                if now >= at {
                    f.recheck();
                    next_recheck = Some(now + f.every);
                } else {
                    thread::park_timeout(at - now);
                }
            }
            _ => thread::park(),
        }
    };
    let started = trip_instant();
    {
        let mut seq = SEQUENCE.lock();
        // A grace of 0 skips the hooks: the sequence is done at once.
        seq.phase = if plan.grace.is_zero() {
            Phase::Done
        } else {
            Phase::Running
        };
        seq.tripped = Some(started);
    }
    SEQUENCE_CHANGED.notify_all();

    // The trip line first, before any hook can print: straight to standard
    // error (never blocking), then through `log` where a logger is set.
    write_trip_line_once(&trip_line(&plan, tripped_at, false));
    if log::max_level() != log::LevelFilter::Off {
        log.emit_trip(plan, tripped_at);
    }

    if !plan.grace.is_zero() {
        for hook in hooks {
            SEQUENCE.lock().current_hook = Some(hook.name.clone());
            let began = Instant::now();
            match panic::catch_unwind(AssertUnwindSafe(hook.run)) {
                Ok(()) => log.emit(
                    Level::Info,
                    format!(
                        "shutdown hook {:?} done in {:?}",
                        hook.name,
                        began.elapsed()
                    ),
                ),
                Err(payload) => log.emit(
                    Level::Error,
                    format!(
                        "shutdown hook {:?} panicked after {:?}: {}; running the next one",
                        hook.name,
                        began.elapsed(),
                        panic_message(&payload)
                    ),
                ),
            }
        }
        {
            let mut seq = SEQUENCE.lock();
            seq.phase = Phase::Done;
            seq.current_hook = None;
        }
        SEQUENCE_CHANGED.notify_all();
        log.emit(
            Level::Info,
            format!(
                "shutdown hooks finished in {:?}; exiting with code {}",
                started.elapsed(),
                plan.exit_code
            ),
        );
    }
    // Give the log lines a moment to go out (no more than that: a blocked
    // standard error must not hold the exit).
    log.flush(LOG_FLUSH);
    exit_once(plan.exit_code);
}

/// The moment of the trip, as an `Instant`: from the time the tripping
/// thread noted, so that a watchdog or grace thread that got a core late
/// still counts the deadline from the trip.
fn trip_instant() -> Instant {
    let now = Instant::now();
    match latch::tripped_ns() {
        Some(at) => {
            let ago = Duration::from_nanos(latch::monotonic_ns().saturating_sub(at));
            now.checked_sub(ago).unwrap_or(now)
        }
        None => now,
    }
}

/// The trip's one error line: what crossed, the figures, what happens next.
///
/// With `figures`, jemalloc's own figures are in it: reading them takes
/// jemalloc's locks, which threads busy in jemalloc may hold for a while,
/// so the line written straight to standard error goes without them and
/// the log thread adds them to the one it logs.
fn trip_line(plan: &Plan, tripped_at: isize, figures: bool) -> String {
    // The armed threshold: the plan's, or where a resize moved it.
    let threshold = latch::threshold().unwrap_or(plan.threshold);
    let jemalloc = if !stats::wraps_jemalloc() {
        "no jemalloc figures (jemalloc is not the inner allocator)".to_owned()
    } else if !figures {
        "jemalloc's figures in the log".to_owned()
    } else {
        match stats::jemalloc_stats().filter(|_| stats::wraps_jemalloc()) {
            Some(s) => s.to_string(),
            None => "no jemalloc figures (jemalloc is not the inner allocator)".to_owned(),
        }
    };
    let then = if plan.grace.is_zero() {
        "a grace of 0s skips the shutdown hooks; exiting with code".to_owned()
    } else {
        format!(
            "running {} shutdown hook(s) within {:?}, then exiting with code",
            plan.hooks, plan.grace
        )
    };
    match kernel_trigger::tripped() {
        Some(kernel) => format!(
            "memory cgroup level crossed (kernel trigger): {kernel}; live heap {} bytes \
             (threshold {} bytes); {}; {then} {}",
            stats::live_bytes(),
            threshold,
            jemalloc,
            plan.exit_code,
        ),
        None => format!(
            "memory threshold crossed: live heap {} bytes > threshold {} bytes ({} MiB); \
             live now {} bytes; {}; {then} {}",
            tripped_at,
            threshold,
            threshold as u64 / config::BYTES_PER_MIB,
            stats::live_bytes(),
            jemalloc,
            plan.exit_code,
        ),
    }
}

/// Set once the trip line has been written to standard error.
static TRIP_LINE_WRITTEN: AtomicBool = AtomicBool::new(false);

/// Writes the trip line to standard error, once in the process (the
/// watchdog thread, or the grace thread if it gets there first), without
/// blocking: `[memwatch ERROR] ` and the line.
fn write_trip_line_once(line: &str) {
    if !TRIP_LINE_WRITTEN.swap(true, SeqCst) {
        write_now(&format!("[memwatch ERROR] {line}\n"));
    }
}

/// How long the exit waits for the log lines written after the trip.
const LOG_FLUSH: Duration = Duration::from_millis(100);

/// How long `exit` itself may take (atexit handlers, C++ static
/// destructors, the flush of standard output) before the grace thread ends
/// the process with `_exit`.
const EXIT_MARGIN: Duration = Duration::from_millis(500);

/// The lines the watchdog thread logs, written by a thread of their own
/// ("memwatch-log"), so that a logger blocked on a full pipe holds up
/// neither the watchdog, the hooks nor the exit.
struct LogThread {
    lines: Option<mpsc::Sender<Line>>,
    done: mpsc::Receiver<()>,
}

/// What the log thread writes.
enum Line {
    /// A line as it is.
    Plain(Level, String),
    /// The trip line, with jemalloc's figures read on the log thread.
    Trip(Plan, isize),
}

std::thread_local! {
    /// Where [`crate::watchdog::emit`] sends the lines of this thread
    /// instead of writing them: the watchdog thread's log thread.
    static DEFERRED: std::cell::RefCell<Option<mpsc::Sender<Line>>> =
        const { std::cell::RefCell::new(None) };
}

/// Hands a line of the calling thread to its log thread, if it has one;
/// returns whether it did.
pub(crate) fn deferred(level: Level, args: std::fmt::Arguments<'_>) -> bool {
    DEFERRED.with(|d| match &*d.borrow() {
        Some(tx) => tx.send(Line::Plain(level, args.to_string())).is_ok(),
        None => false,
    })
}

impl LogThread {
    fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Line>();
        let (done_tx, done) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("memwatch-log".into())
            .spawn(move || {
                crate::count::exempt_current_thread();
                for line in rx {
                    match line {
                        Line::Plain(level, line) => emit(level, format_args!("{line}")),
                        Line::Trip(plan, at) => {
                            emit(Level::Error, format_args!("{}", trip_line(&plan, at, true)))
                        }
                    }
                    let _ = done_tx.send(());
                }
            });
        match spawned {
            Ok(_) => LogThread {
                lines: Some(tx),
                done,
            },
            // No thread for it: log from here.
            Err(_) => LogThread {
                lines: None,
                done: mpsc::channel().1,
            },
        }
    }

    /// Sends every line the calling thread logs through `emit` here.
    fn defer_this_threads_lines(&self) {
        if let Some(tx) = &self.lines {
            DEFERRED.with(|d| *d.borrow_mut() = Some(tx.clone()));
        }
    }

    fn emit(&self, level: Level, line: String) {
        match &self.lines {
            Some(tx) => {
                if let Err(mpsc::SendError(Line::Plain(level, line))) =
                    tx.send(Line::Plain(level, line))
                {
                    write_now(&format!("[memwatch {level}] {line}\n"));
                }
            }
            None => emit(level, format_args!("{line}")),
        }
    }

    /// Logs the trip line through `log`, with jemalloc's figures.
    fn emit_trip(&self, plan: Plan, tripped_at: isize) {
        let sent = self
            .lines
            .as_ref()
            .is_some_and(|tx| tx.send(Line::Trip(plan, tripped_at)).is_ok());
        if !sent {
            emit(
                Level::Error,
                format_args!("{}", trip_line(&plan, tripped_at, true)),
            );
        }
    }

    /// Waits up to `limit` for every line sent so far to be written.
    fn flush(mut self, limit: Duration) {
        let Some(tx) = self.lines.take() else {
            return;
        };
        drop(tx);
        DEFERRED.with(|d| *d.borrow_mut() = None);
        let until = Instant::now().checked_add(limit);
        // One `done` per line written; the channel closes when the writer
        // has written them all.
        loop {
            let left = until.map_or(Duration::ZERO, |u| {
                u.saturating_duration_since(Instant::now())
            });
            match self.done.recv_timeout(left) {
                Ok(()) => continue,
                Err(_) => return,
            }
        }
    }
}

/// The soft level's changes, handled on a thread of their own
/// ("memwatch-pressure"): its log line and the application's callbacks,
/// which may block or take long, never hold up the watchdog thread.
struct PressureThread {
    /// The callbacks, until the first change starts the thread.
    callbacks: Option<Vec<PressureCallback>>,
    changes: Option<mpsc::Sender<bool>>,
}

impl PressureThread {
    fn start(callbacks: Vec<PressureCallback>) -> Self {
        PressureThread {
            callbacks: Some(callbacks),
            changes: None,
        }
    }

    /// The soft level was entered (`true`) or left: hands it to the thread,
    /// starting it at the first change. Never blocks on the thread.
    fn changed(&mut self, shedding: bool) {
        if let Some(mut callbacks) = self.callbacks.take() {
            let (tx, rx) = mpsc::channel::<bool>();
            let spawned = thread::Builder::new()
                .name("memwatch-pressure".into())
                .spawn(move || {
                    crate::count::exempt_current_thread();
                    for shedding in rx {
                        pressure_changed(shedding, &mut callbacks);
                    }
                });
            match spawned {
                Ok(_) => self.changes = Some(tx),
                Err(e) => emit(
                    Level::Warn,
                    format_args!("memory pressure changes not handled: no thread for them: {e}"),
                ),
            }
        }
        if let Some(tx) = &self.changes {
            let _ = tx.send(shedding);
        }
    }
}

/// Logs a change of the soft level and runs the callbacks, each isolated.
fn pressure_changed(shedding: bool, callbacks: &mut [PressureCallback]) {
    let (enter, leave) = latch::shed_levels().unwrap_or((0, 0));
    let event = PressureEvent {
        shedding,
        live_bytes: stats::live_bytes(),
        enter_bytes: enter.max(0) as usize,
        leave_bytes: leave.max(0) as usize,
    };
    if shedding {
        emit(
            Level::Warn,
            format_args!(
                "memory pressure: live heap {} bytes above the shed level {} bytes; shedding load",
                event.live_bytes, event.enter_bytes
            ),
        );
    } else {
        emit(
            Level::Info,
            format_args!(
                "memory pressure over: live heap {} bytes below {} bytes; accepting load",
                event.live_bytes, event.leave_bytes
            ),
        );
    }
    for callback in callbacks.iter_mut() {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| callback(event))) {
            emit(
                Level::Error,
                format_args!("pressure callback panicked: {}", panic_message(&payload)),
            );
        }
    }
}

/// Ends the process at the deadline, whatever the watchdog is doing. The
/// latch wakes this thread with the watchdog, and the deadline counts from
/// the trip itself: `grace` after it if the shutdown has not finished (a
/// hook still running, or a watchdog thread that never got to the hooks),
/// and [`EXIT_MARGIN`] later if the hooks finished but `exit` has not
/// returned. Both end with `_exit`: no atexit handler or destructor that
/// might hang runs on the way. If the watchdog thread has not written the
/// trip line by the time this thread wakes, this thread writes it.
pub(crate) fn grace_thread(plan: Plan) {
    crate::count::exempt_current_thread();
    raise_priority();
    let tripped_at = loop {
        if let Some(at) = latch::tripped_at() {
            break at;
        }
        thread::park();
    };
    let started = trip_instant();
    if !TRIP_LINE_WRITTEN.load(SeqCst) {
        // Give the watchdog thread a moment to write it with its own
        // figures; then write it from here.
        thread::sleep(TRIP_LINE_WAIT);
        if !TRIP_LINE_WRITTEN.load(SeqCst) {
            write_trip_line_once(&trip_line(&plan, tripped_at, false));
        }
    }
    // Clamped to a day at start, so neither can overflow; checked anyway.
    let hooks_end = started.checked_add(plan.grace);
    let exit_end = hooks_end.and_then(|d| d.checked_add(EXIT_MARGIN));
    let mut seq = SEQUENCE.lock();
    while seq.phase != Phase::Done {
        let Some(end) = hooks_end else {
            SEQUENCE_CHANGED.wait(&mut seq);
            continue;
        };
        if SEQUENCE_CHANGED.wait_until(&mut seq, end).timed_out() && seq.phase != Phase::Done {
            let what = match (&seq.current_hook, seq.phase) {
                (Some(hook), _) => format!("shutdown hook {hook:?} still running"),
                (None, Phase::Waiting) => {
                    "the watchdog thread had not begun the shutdown (held up before the \
                     hooks)"
                        .to_owned()
                }
                (None, _) => "the shutdown not finished".to_owned(),
            };
            drop(seq);
            write_now(&format!(
                "[memwatch ERROR] {what} at the {:?} grace deadline; exiting with code {} \
                 anyway\n",
                plan.grace, plan.exit_code
            ));
            exit_now(plan.exit_code);
        }
    }
    drop(seq);
    // The hooks are done and the watchdog is in `exit`; if that hangs, end
    // the process anyway.
    if let Some(end) = exit_end {
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            thread::sleep(left);
        }
        write_now(&format!(
            "[memwatch ERROR] exit did not finish within {EXIT_MARGIN:?} of the hooks' \
             deadline; ending the process with code {}\n",
            plan.exit_code
        ));
        exit_now(plan.exit_code);
    }
}

/// Asks the kernel to run the calling thread before the process's others
/// when they compete for a core (nice -10, where the process may raise its
/// priority: root, or `CAP_SYS_NICE`); silently nothing where it may not.
/// The thread sleeps until the trip, so this costs the others nothing
/// before it.
fn raise_priority() {
    // SAFETY: `gettid` takes nothing; `setpriority` on this thread's own id
    // changes only its nice value, and a refusal changes nothing.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, WATCHDOG_NICE);
    }
}

/// The nice value of the watchdog and grace threads: -10.
const WATCHDOG_NICE: libc::c_int = -10;

/// How long the grace thread leaves the watchdog thread to write the trip
/// line before it writes it itself.
const TRIP_LINE_WAIT: Duration = Duration::from_millis(20);

/// Writes `line` to standard error only if that cannot block: a pipe that
/// nobody reads is skipped.
fn write_now(line: &str) {
    let mut fd = libc::pollfd {
        fd: libc::STDERR_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid `pollfd`, a zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) } == 1 && fd.revents & libc::POLLOUT != 0;
    if ready {
        let bytes = &line.as_bytes()[..line.len().min(libc::PIPE_BUF)];
        // SAFETY: writes `bytes.len()` bytes from a live buffer. A writable
        // pipe has room for a write of at most `PIPE_BUF` bytes.
        unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
    }
}

/// Ends the process with `code` at once: no atexit handlers, no
/// destructors, no flush.
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` ends the process; it is always safe to call.
    unsafe { libc::_exit(code) }
}

/// Ends the process with `code`, once: of two threads racing here (the
/// watchdog finishing as the grace deadline passes), one calls `exit` and the
/// other sleeps until the process is gone.
pub(crate) fn exit_once(code: i32) -> ! {
    if EXITING.swap(true, SeqCst) {
        loop {
            thread::park();
        }
    }
    std::process::exit(code)
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}
