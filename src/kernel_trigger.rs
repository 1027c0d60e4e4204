//! The kernel-pushed trigger: a second way to trip the latch, for memory
//! outside the Rust heap (C libraries, `mmap`, thread stacks, page tables).
//!
//! The figure is what the memory cgroup is charged and reclaim cannot take
//! back: the charge minus the file pages on the LRU lists (active and
//! inactive), which the kernel drops or writes back before it OOM-kills.
//! Page cache therefore never trips it; anonymous memory, shared memory and
//! kernel memory do. The `memwatch-cgroup` thread sleeps in `poll` until
//! the kernel signals, reads the figure and trips at the level:
//!
//! - cgroup v1: usage threshold events (`cgroup.event_control` with
//!   `memory.usage_in_bytes`, at the level and in steps above it up to the
//!   limit) and memory pressure events (`memory.pressure_level`, `low`: every
//!   reclaim, so that usage held at the limit by page cache still wakes it
//!   as the anonymous part grows).
//! - cgroup v2: changes of `memory.events` (`high`, `max`, `oom`) and a PSI
//!   trigger on `memory.pressure`. v2 has no usage threshold event: the
//!   first signal comes when usage reaches `memory.high`, or the limit.
//!
//! There is no timer. The trip line names the signal and the figures.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use log::Level;
use parking_lot::Mutex;

use crate::limits::{self, LimitingCgroup};
use crate::watchdog::emit;
use crate::{latch, stats};

/// How a trip by this trigger is reported: set by the thread that won the
/// latch, under the lock, before it wakes the watchdog.
static TRIPPED: Mutex<Option<String>> = Mutex::new(None);

/// The trip line's text if this trigger tripped the latch. The watchdog
/// calls it once it sees the latch set: this trigger tries the latch and,
/// if it won, writes the text, both under this lock, so a watchdog that saw
/// the latch set and then takes the lock finds the text.
pub(crate) fn tripped() -> Option<String> {
    TRIPPED.lock().clone()
}

/// In a child of `fork`: the trigger's thread is not there, and a lock it
/// held at the fork is released.
pub(crate) fn forget_in_child() {
    if TRIPPED.is_locked() {
        // SAFETY: the holder was a thread of the parent, which the child
        // does not have; the child's only thread holds no guard of it.
        unsafe { TRIPPED.force_unlock() };
    }
    *TRIPPED.lock() = None;
}

/// Starts the trigger at `ratio` of the limiting cgroup's limit, re-read
/// every `recheck` (zero: never) so that the level follows a resize. Returns
/// the line that says what it watches, or why it is unavailable.
pub(crate) fn start(ratio: f64, recheck: Duration) -> Result<String, String> {
    let cgroup = limits::limiting_cgroup_at(Path::new("/"))
        .ok_or_else(|| "no memory cgroup with a limit holds this process".to_owned())?;
    let watch = Watch::open(&cgroup, ratio, recheck)?;
    let level = watch.level;
    let now = watch
        .figures()
        .map_err(|e| format!("reading {}: {e}", cgroup.dir.display()))?;
    let signals: Vec<&str> = watch.signals.iter().map(|s| s.name).collect();
    let line = format!(
        "kernel trigger on: cgroup v{} {}, limit {} bytes, level {level} bytes (ratio {ratio}); \
         charged {} bytes of which file cache {} bytes, so {} bytes reclaim cannot free; \
         woken by {}; limit {}",
        cgroup.version,
        cgroup.dir.display(),
        cgroup.limit,
        now.charged,
        now.file,
        now.unreclaimable(),
        signals.join(", "),
        if recheck.is_zero() {
            "read once".to_owned()
        } else {
            format!("rechecked every {recheck:?}")
        },
    );
    thread::Builder::new()
        .name("memwatch-cgroup".into())
        .spawn(move || {
            crate::count::exempt_current_thread();
            watch.run()
        })
        .map_err(|e| format!("could not spawn its thread: {e}"))?;
    Ok(line)
}

/// The cgroup's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Figures {
    /// What the cgroup is charged (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`).
    pub(crate) charged: u64,
    /// File pages on the LRU lists, which reclaim can take back.
    pub(crate) file: u64,
}

impl Figures {
    /// The part of the charge that reclaim cannot free.
    pub(crate) fn unreclaimable(&self) -> u64 {
        self.charged.saturating_sub(self.file)
    }
}

/// The trigger's level for `limit` at `ratio`.
fn level_of(limit: u64, ratio: f64) -> u64 {
    (limit as f64 * ratio) as u64
}

/// The file pages (`active_file` + `inactive_file`, v1's hierarchical
/// `total_` forms) in a `memory.stat` text.
pub(crate) fn file_pages(stat: &str, version: u8) -> Option<u64> {
    let (active, inactive) = if version == 1 {
        ("total_active_file", "total_inactive_file")
    } else {
        ("active_file", "inactive_file")
    };
    let value = |key: &str| {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    value(active)?.checked_add(value(inactive)?)
}

/// The usage thresholds registered on cgroup v1: the level, then steps up
/// to the limit, so that a charge that crosses the level while file pages
/// keep the figure below it is looked at again as it grows.
pub(crate) fn thresholds(level: u64, limit: u64) -> Vec<u64> {
    const STEPS: u64 = 16;
    let step = ((limit.saturating_sub(level)) / STEPS).max(1 << 20);
    (0..=STEPS)
        .map(|i| level + i * step)
        .take_while(|&t| t < limit || t == level)
        .collect()
}

/// The PSI trigger on cgroup v2: 100 ms of stall in any 2 s window (a
/// window that a process without CAP_SYS_RESOURCE may set too).
const PSI_TRIGGER: &[u8] = b"some 100000 2000000\0";

/// One source of wake-ups.
struct Signal {
    fd: OwnedFd,
    name: &'static str,
    /// What `poll` waits for on it.
    events: libc::c_short,
    /// Reading it re-arms it: an eventfd's counter, or a kernfs file that
    /// signals again only after a read.
    rearm: Rearm,
}

enum Rearm {
    EventFd,
    ReadFile,
    Nothing,
}

/// The open files the thread needs.
struct Watch {
    version: u8,
    path: PathBuf,
    dir: String,
    limit: u64,
    ratio: f64,
    recheck: Duration,
    level: u64,
    charged: File,
    stat: File,
    signals: Vec<Signal>,
}

impl Watch {
    fn open(cgroup: &LimitingCgroup, ratio: f64, recheck: Duration) -> Result<Watch, String> {
        let open = |name: &str| {
            File::open(cgroup.dir.join(name))
                .map_err(|e| format!("{}: {e}", cgroup.dir.join(name).display()))
        };
        let charged = open(if cgroup.version == 1 {
            "memory.usage_in_bytes"
        } else {
            "memory.current"
        })?;
        let stat = open("memory.stat")?;
        let mut watch = Watch {
            version: cgroup.version,
            path: cgroup.dir.clone(),
            dir: cgroup.dir.display().to_string(),
            limit: cgroup.limit,
            ratio,
            recheck,
            level: level_of(cgroup.limit, ratio),
            charged,
            stat,
            signals: Vec::new(),
        };
        if cgroup.version == 1 {
            watch.signals_v1()?;
        } else {
            watch.signals_v2(cgroup)?;
        }
        Ok(watch)
    }

    /// Registers `efd` for cgroup v1's event on `target` with `arg`, one
    /// write to `cgroup.event_control` each.
    fn register_v1(&self, efd: &OwnedFd, target: &File, args: &[String]) -> Result<(), String> {
        let control_path = self.path.join("cgroup.event_control");
        let mut control = OpenOptions::new()
            .write(true)
            .open(&control_path)
            .map_err(|e| format!("{}: {e}", control_path.display()))?;
        for arg in args {
            let line = format!("{} {} {arg}", efd.as_raw_fd(), target.as_raw_fd());
            control
                .write_all(line.as_bytes())
                .map_err(|e| format!("{} ({line}): {e}", control_path.display()))?;
        }
        Ok(())
    }

    /// A new eventfd registered for the usage thresholds of the current
    /// level and limit (v1).
    fn usage_thresholds(&self) -> Result<OwnedFd, String> {
        let usage = eventfd()?;
        let args: Vec<String> = thresholds(self.level, self.limit)
            .iter()
            .map(u64::to_string)
            .collect();
        self.register_v1(&usage, &self.charged, &args)?;
        Ok(usage)
    }

    fn signals_v1(&mut self) -> Result<(), String> {
        // The usage thresholds first: `follow_limit` replaces them.
        let usage = self.usage_thresholds()?;
        self.signals.push(Signal {
            fd: usage,
            name: "usage threshold events",
            events: libc::POLLIN,
            rearm: Rearm::EventFd,
        });
        let pressure_path = self.path.join("memory.pressure_level");
        let pressure_file =
            File::open(&pressure_path).map_err(|e| format!("{}: {e}", pressure_path.display()))?;
        let pressure = eventfd()?;
        self.register_v1(&pressure, &pressure_file, &["low".to_owned()])?;
        self.signals.push(Signal {
            fd: pressure,
            name: "memory pressure events",
            events: libc::POLLIN,
            rearm: Rearm::EventFd,
        });
        Ok(())
    }

    fn signals_v2(&mut self, cgroup: &LimitingCgroup) -> Result<(), String> {
        let events_path = cgroup.dir.join("memory.events");
        let events =
            File::open(&events_path).map_err(|e| format!("{}: {e}", events_path.display()))?;
        // A kernfs file signals a change since its last read: read it once.
        let mut buf = [0u8; 512];
        let _ = events.read_at(&mut buf, 0);
        self.signals.push(Signal {
            fd: events.into(),
            name: "memory.events changes",
            events: libc::POLLPRI,
            rearm: Rearm::ReadFile,
        });
        // Optional: kernels without PSI still have memory.events.
        let psi_path = cgroup.dir.join("memory.pressure");
        if let Ok(mut psi) = OpenOptions::new().read(true).write(true).open(&psi_path) {
            if psi.write_all(PSI_TRIGGER).is_ok() {
                self.signals.push(Signal {
                    fd: psi.into(),
                    name: "a PSI trigger (100 ms stalled in 2 s)",
                    events: libc::POLLPRI,
                    rearm: Rearm::Nothing,
                });
            }
        }
        Ok(())
    }

    fn figures(&self) -> io::Result<Figures> {
        let mut buf = [0u8; 16 * 1024];
        let n = read_whole(&self.charged, &mut buf)?;
        let charged = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or_else(|| io::Error::other("the charge is not a number"))?;
        let n = read_whole(&self.stat, &mut buf)?;
        let file = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| file_pages(t, self.version))
            .ok_or_else(|| io::Error::other("memory.stat has no active_file/inactive_file"))?;
        Ok(Figures { charged, file })
    }

    /// The limit recheck: if the cgroup's limit moved (a resize), moves
    /// the level with it and, on v1, registers the usage thresholds anew.
    /// Returns whether it moved.
    fn follow_limit(&mut self) -> bool {
        let Some(now) = limits::limiting_cgroup_at(Path::new("/")) else {
            return false;
        };
        if now.dir != self.path || now.limit == self.limit {
            return false;
        }
        let old = self.limit;
        self.limit = now.limit;
        self.level = level_of(now.limit, self.ratio);
        emit(
            Level::Info,
            format_args!(
                "kernel trigger: the limit of {} moved from {old} to {} bytes; level now {} bytes",
                self.dir, self.limit, self.level
            ),
        );
        if self.version == 1 {
            match self.usage_thresholds() {
                // The old eventfd is closed, which unregisters its events.
                Ok(fd) => self.signals[0].fd = fd,
                Err(e) => emit(
                    Level::Warn,
                    format_args!(
                        "kernel trigger: could not move its usage thresholds ({e}); \
                         pressure events still wake it"
                    ),
                ),
            }
        }
        true
    }

    /// The thread: look, sleep until the kernel signals (or the limit
    /// recheck finds a resize), look again.
    fn run(mut self) {
        let pollfds = |signals: &[Signal]| -> Vec<libc::pollfd> {
            signals
                .iter()
                .map(|s| libc::pollfd {
                    fd: s.fd.as_raw_fd(),
                    events: s.events,
                    revents: 0,
                })
                .collect()
        };
        let mut fds = pollfds(&self.signals);
        // The limit is re-read every recheck period, on a clock of its own:
        // kernel events that keep waking the thread (pressure on every
        // reclaim, PSI every window) do not postpone it. No recheck: only
        // the kernel wakes the thread.
        let mut recheck_at = Instant::now() + self.recheck;
        let mut woken_by = "the check at start";
        loop {
            match self.figures() {
                Ok(f) if f.unreclaimable() >= self.level => {
                    self.trip(f, woken_by);
                    return;
                }
                Ok(f) => log::debug!(
                    "kernel trigger woken by {woken_by}: {} bytes reclaim cannot free, \
                     level {}",
                    f.unreclaimable(),
                    self.level
                ),
                Err(e) => {
                    emit(
                        Level::Warn,
                        format_args!("kernel trigger off: reading {}: {e}", self.dir),
                    );
                    return;
                }
            }
            let resized = loop {
                let timeout = if self.recheck.is_zero() {
                    -1
                } else {
                    let left = recheck_at.saturating_duration_since(Instant::now());
                    // Rounded up, so that a wake-up is never early.
                    (left.as_micros().div_ceil(1000)).min(i32::MAX as u128) as libc::c_int
                };
                // SAFETY: `fds` is a live, initialised array of `fds.len()`
                // pollfd structures, and each fd stays open for the loop.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
                let e = io::Error::last_os_error();
                if !self.recheck.is_zero() && Instant::now() >= recheck_at {
                    recheck_at = Instant::now() + self.recheck;
                    // The figures are read again only if the limit moved;
                    // signals that came meanwhile stay pending for the next
                    // poll.
                    if self.follow_limit() {
                        fds = pollfds(&self.signals);
                        break true;
                    }
                }
                if n > 0 {
                    break false;
                }
                if n < 0 && e.kind() != io::ErrorKind::Interrupted {
                    emit(Level::Warn, format_args!("kernel trigger off: poll: {e}"));
                    return;
                }
            };
            if resized {
                woken_by = "a resize of the limit";
                continue;
            }
            for (pfd, signal) in fds.iter_mut().zip(&self.signals) {
                if pfd.revents == 0 {
                    continue;
                }
                pfd.revents = 0;
                woken_by = signal.name;
                let mut buf = [0u8; 512];
                match signal.rearm {
                    Rearm::EventFd => {
                        // SAFETY: reads at most 8 bytes into a 512-byte
                        // buffer from an eventfd this thread owns.
                        let _ = unsafe {
                            libc::read(signal.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8)
                        };
                    }
                    Rearm::ReadFile => {
                        // SAFETY: reads into a buffer of the length given,
                        // from a file this thread owns.
                        let _ = unsafe {
                            libc::pread(signal.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 512, 0)
                        };
                    }
                    Rearm::Nothing => {}
                }
            }
        }
    }

    fn trip(&self, f: Figures, woken_by: &str) {
        let text = format!(
            "woken by {woken_by}, cgroup v{} {} is charged {} bytes of which file cache {} \
             bytes, so {} bytes reclaim cannot free >= level {} bytes of the limit {} bytes",
            self.version,
            self.dir,
            f.charged,
            f.file,
            f.unreclaimable(),
            self.level,
            self.limit,
        );
        let mut slot = TRIPPED.lock();
        if latch::trip_only(stats::live_bytes() as isize) {
            *slot = Some(text);
            drop(slot);
            latch::wake_watchdog();
        }
    }
}

/// Reads a whole (small) kernel file from its start.
fn read_whole(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn eventfd() -> Result<OwnedFd, String> {
    // SAFETY: eventfd takes no pointers; a negative result is an error.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(format!("eventfd: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_pages_v1_uses_the_hierarchical_totals() {
        let stat = "cache 100\nactive_file 1\ninactive_file 2\n\
                    total_active_file 4096\ntotal_inactive_file 8192\n";
        assert_eq!(file_pages(stat, 1), Some(12288));
        assert_eq!(file_pages(stat, 2), Some(3));
        assert_eq!(file_pages("anon 5\n", 2), None);
    }

    #[test]
    fn unreclaimable_is_the_charge_less_file_pages() {
        let f = Figures {
            charged: 300,
            file: 100,
        };
        assert_eq!(f.unreclaimable(), 200);
        let f = Figures {
            charged: 100,
            file: 300,
        };
        assert_eq!(f.unreclaimable(), 0, "never negative");
    }

    /// The kernel's own parser takes the PSI trigger: `/proc/pressure/memory`
    /// reads triggers as a cgroup's `memory.pressure` does. Skipped where
    /// the kernel has no PSI or the file is not writable (not root).
    #[test]
    fn the_kernel_takes_the_psi_trigger() {
        let path = "/proc/pressure/memory";
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(mut f) => f
                .write_all(PSI_TRIGGER)
                .unwrap_or_else(|e| panic!("{path} refused the trigger: {e}")),
            Err(e) => eprintln!("SKIPPED: {path}: {e}"),
        }
    }

    #[test]
    fn thresholds_start_at_the_level_and_stay_below_the_limit() {
        let mib = 1u64 << 20;
        let t = thresholds(179 * mib, 256 * mib);
        assert_eq!(t[0], 179 * mib);
        assert_eq!(t.len(), 16, "the 17th step would be the limit itself");
        assert!(t.iter().all(|&x| x < 256 * mib));
        assert!(t.windows(2).all(|w| w[0] < w[1]));
        // A level at the limit still registers the level itself.
        assert_eq!(thresholds(256 * mib, 256 * mib), vec![256 * mib]);
        // Steps are at least 1 MiB.
        let t = thresholds(100 * mib, 104 * mib);
        assert_eq!(t, vec![100 * mib, 101 * mib, 102 * mib, 103 * mib]);
    }
}
