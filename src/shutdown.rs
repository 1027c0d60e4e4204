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
}

/// The watchdog thread's body: waits for the latch, then shuts down.
pub(crate) fn watchdog_thread(
    plan: Plan,
    hooks: Vec<Hook>,
    mut callbacks: Vec<PressureCallback>,
    mut follow: Option<Follow>,
) {
    let mut shedding = false;
    let mut next_recheck = follow.as_ref().map(|f| Instant::now() + f.every);
    let tripped_at = loop {
        if let Some(at) = latch::tripped_at() {
            break at;
        }
        if latch::pressure() != shedding {
            shedding = !shedding;
            pressure_changed(shedding, &mut callbacks);
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
    let started = Instant::now();
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
    // From here on nothing the watchdog logs may hold it up: a standard
    // error that nobody reads must not keep the hooks from running or the
    // process from ending (the grace thread ends it at the deadline anyway).
    let log = AfterTrip::start();

    // The armed threshold: the plan's, or where a resize moved it.
    let threshold = latch::threshold().unwrap_or(plan.threshold);
    let jemalloc = match stats::jemalloc_stats().filter(|_| stats::wraps_jemalloc()) {
        Some(s) => s.to_string(),
        None => "no jemalloc figures (jemalloc is not the inner allocator)".to_owned(),
    };
    let then = if plan.grace.is_zero() {
        "a grace of 0s skips the shutdown hooks; exiting with code".to_owned()
    } else {
        format!(
            "running {} shutdown hook(s) within {:?}, then exiting with code",
            hooks.len(),
            plan.grace
        )
    };
    let line = match kernel_trigger::tripped() {
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
    };
    log.emit(Level::Error, line);

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

/// How long the exit waits for the log lines written after the trip.
const LOG_FLUSH: Duration = Duration::from_millis(100);

/// How long `exit` itself may take (atexit handlers, C++ static
/// destructors, the flush of standard output) before the grace thread ends
/// the process with `_exit`.
const EXIT_MARGIN: Duration = Duration::from_millis(500);

/// The lines the watchdog logs after the trip, written by a thread of
/// their own ("memwatch-log"), so that a logger blocked on a full pipe
/// holds up neither the hooks nor the exit.
struct AfterTrip {
    lines: Option<std::sync::mpsc::Sender<(Level, String)>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl AfterTrip {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(Level, String)>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let spawned = thread::Builder::new()
            .name("memwatch-log".into())
            .spawn(move || {
                for (level, line) in rx {
                    emit(level, format_args!("{line}"));
                    let _ = done_tx.send(());
                }
            });
        match spawned {
            Ok(_) => AfterTrip {
                lines: Some(tx),
                done,
            },
            // No thread for it: log from here, as before the trip.
            Err(_) => AfterTrip {
                lines: None,
                done: std::sync::mpsc::channel().1,
            },
        }
    }

    fn emit(&self, level: Level, line: String) {
        match &self.lines {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError((level, line))) = tx.send((level, line)) {
                    emit(level, format_args!("{line}"));
                }
            }
            None => emit(level, format_args!("{line}")),
        }
    }

    /// Waits up to `limit` for every line sent so far to be written.
    fn flush(mut self, limit: Duration) {
        let Some(tx) = self.lines.take() else {
            return;
        };
        drop(tx);
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

/// Ends the process at the deadline, whatever the watchdog is doing: `grace`
/// after the trip if a hook is still running (logged, without blocking),
/// and [`EXIT_MARGIN`] later if the hooks finished but `exit` has not
/// returned. Both end with `_exit`: no atexit handler or destructor that
/// might hang runs on the way.
pub(crate) fn grace_thread(plan: Plan) {
    let mut seq = SEQUENCE.lock();
    let started = loop {
        if let Some(d) = seq.tripped {
            break d;
        }
        SEQUENCE_CHANGED.wait(&mut seq);
    };
    // Clamped to a day at start, so neither can overflow; checked anyway.
    let hooks_end = started.checked_add(plan.grace);
    let exit_end = hooks_end.and_then(|d| d.checked_add(EXIT_MARGIN));
    while seq.phase != Phase::Done {
        let Some(end) = hooks_end else {
            SEQUENCE_CHANGED.wait(&mut seq);
            continue;
        };
        if SEQUENCE_CHANGED.wait_until(&mut seq, end).timed_out() && seq.phase != Phase::Done {
            let hook = seq
                .current_hook
                .clone()
                .unwrap_or_else(|| "(none)".to_owned());
            drop(seq);
            write_now(&format!(
                "[memwatch ERROR] shutdown hook {:?} still running at the {:?} grace deadline; \
                 exiting with code {} anyway\n",
                hook, plan.grace, plan.exit_code
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
