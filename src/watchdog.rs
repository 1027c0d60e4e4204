//! The watchdog's builder, its start and its handle: the configuration is
//! resolved into one plan (levels in bytes, grace, exit code), the latch is
//! armed, and the two threads of [`crate::shutdown`] are spawned, none
//! later, so that nothing has to be created while memory is short.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use log::Level;

use crate::config::{
    self, ConfigError, ConfigErrorKind, Level as Configured, DEFAULT_EXIT_CODE, DEFAULT_GRACE,
    DEFAULT_LIMIT_RECHECK, DEFAULT_SHED_HYSTERESIS_PERCENT,
};
use crate::shutdown::{exit_once, grace_thread, watchdog_thread, Plan};
use crate::{count, kernel_trigger, latch, limits, stats};

/// A shutdown hook: a name for the logs and the work.
pub(crate) struct Hook {
    pub(crate) name: String,
    pub(crate) run: Box<dyn FnOnce() + Send + 'static>,
}

/// A pressure callback.
pub(crate) type PressureCallback = Box<dyn FnMut(PressureEvent) + Send + 'static>;

/// A change of the soft level, as the pressure callbacks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PressureEvent {
    /// `true`: usage rose above the soft level, shed load. `false`: it fell
    /// below the leave level, accept load again.
    pub shedding: bool,
    /// Live heap bytes when the watchdog handled the change.
    pub live_bytes: usize,
    /// The soft level in bytes (entered above it).
    pub enter_bytes: usize,
    /// The leave level in bytes (left below it).
    pub leave_bytes: usize,
}

/// Configures and starts the watchdog.
///
/// ```
/// use std::time::Duration;
///
/// let watchdog = memwatch::Watchdog::from_env()
///     .grace(Duration::from_secs(10))
///     .on_shutdown("stop intake", || { /* close the listener */ })
///     .on_shutdown("flush log", || { /* flush and fsync */ })
///     .start();
/// // ... serve ...
/// watchdog.exit_if_tripped();
/// ```
#[must_use = "a watchdog does nothing until `start` is called"]
pub struct Watchdog {
    threshold: Result<Option<Configured>, ConfigError>,
    shed: Result<Option<Configured>, ConfigError>,
    hysteresis_percent: u8,
    grace: Duration,
    limit_recheck: Result<Duration, ConfigError>,
    cgroup_ratio: Result<Option<f64>, ConfigError>,
    hold_ceiling: Result<config::HoldCeiling, ConfigError>,
    exit_code: i32,
    hooks: Vec<Hook>,
    pressure_callbacks: Vec<PressureCallback>,
    notes: Vec<String>,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog")
            .field("threshold", &self.threshold)
            .field("shed", &self.shed)
            .field("hysteresis_percent", &self.hysteresis_percent)
            .field("grace", &self.grace)
            .field("cgroup_ratio", &self.cgroup_ratio)
            .field("exit_code", &self.exit_code)
            .field(
                "hooks",
                &self.hooks.iter().map(|h| &h.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Watchdog {
    /// A watchdog with no threshold (off), the default grace of 30 s, exit
    /// code 2 and no hooks. Set a threshold in code with
    /// [`threshold_mb`](Self::threshold_mb) or use [`from_env`](Self::from_env).
    pub fn new() -> Self {
        Watchdog {
            threshold: Ok(None),
            shed: Ok(None),
            hysteresis_percent: DEFAULT_SHED_HYSTERESIS_PERCENT,
            grace: DEFAULT_GRACE,
            limit_recheck: Ok(DEFAULT_LIMIT_RECHECK),
            cgroup_ratio: Ok(None),
            hold_ceiling: Ok(config::HoldCeiling::Default),
            exit_code: DEFAULT_EXIT_CODE,
            hooks: Vec::new(),
            pressure_callbacks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A watchdog configured from the environment:
    ///
    /// - `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB` (MiB; unset, empty or `0`
    ///   is off) or `ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO` (a fraction
    ///   of the cgroup's memory limit, or of RAM);
    /// - `ELASTICKV_MEMORY_SHUTDOWN_GRACE` (default `30s`);
    /// - `ELASTICKV_MEMORY_SHED_THRESHOLD_MB` or
    ///   `ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO`, the soft level (off by
    ///   default);
    /// - `ELASTICKV_MEMORY_LIMIT_RECHECK`, how often a ratio level re-reads
    ///   the memory limit (default `10s`; `0s` reads it once, at start);
    /// - `ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO`, the kernel trigger (off
    ///   by default): see [`cgroup_threshold_ratio`](Self::cgroup_threshold_ratio).
    ///
    /// A malformed kernel trigger ratio is one warning, and that trigger is
    /// off.
    ///
    /// A malformed recheck period is one warning, and the limit is then read
    /// once, at start.
    ///
    /// A malformed threshold or grace is reported by [`start`](Self::start)
    /// as one warning naming the variable and the value, and the watchdog
    /// stays off; a malformed soft level turns off only the soft level.
    pub fn from_env() -> Self {
        let mut w = Watchdog::new();
        match config::from_env() {
            Ok(c) => {
                w.threshold = Ok(c.threshold);
                w.shed = c.shed;
                w.grace = c.grace;
                w.limit_recheck = c.limit_recheck;
                w.cgroup_ratio = c.cgroup_ratio;
                w.hold_ceiling = c.hold_ceiling;
                w.notes = c.notes;
            }
            Err(e) => w.threshold = Err(e),
        }
        w
    }

    /// Sets the threshold in MiB (1,048,576 bytes); `0` is off. Overrides
    /// the environment.
    pub fn threshold_mb(mut self, mib: u64) -> Self {
        self.threshold =
            config::parse_threshold_mb(&mib.to_string()).map(|b| b.map(Configured::Bytes));
        self
    }

    /// Sets the soft level in MiB; `0` is off. Above it [`pressure`](crate::pressure) is
    /// true and the pressure callbacks run; it must sit below the shutdown
    /// threshold. Overrides the environment.
    pub fn shed_threshold_mb(mut self, mib: u64) -> Self {
        self.shed = config::parse_threshold_mb(&mib.to_string())
            .map(|b| b.map(Configured::Bytes))
            .map_err(|e| e.renamed(config::SHED_ENV));
        self
    }

    /// Sets how far below the soft level usage must fall to leave it, in
    /// percent of the level (default 10; at most 100).
    pub fn shed_hysteresis_percent(mut self, percent: u8) -> Self {
        self.hysteresis_percent = percent.min(100);
        self
    }

    /// Adds a pressure callback, called on the watchdog thread when usage
    /// enters the soft level and when it leaves it. Entered and left
    /// alternate; changes faster than the watchdog can follow are merged.
    pub fn on_pressure(mut self, callback: impl FnMut(PressureEvent) + Send + 'static) -> Self {
        self.pressure_callbacks.push(Box::new(callback));
        self
    }

    /// Sets the threshold in bytes; `0` is off. Overrides the environment.
    pub fn threshold_bytes(mut self, bytes: u64) -> Self {
        self.threshold = match bytes {
            0 => Ok(None),
            b if isize::try_from(b).is_ok() => Ok(Some(Configured::Bytes(b))),
            _ => Err(ConfigError::in_code(
                "Watchdog::threshold_bytes",
                bytes,
                ConfigErrorKind::TooLarge,
            )),
        };
        self
    }

    /// Sets how often the watchdog re-reads the memory limit while the
    /// threshold or the soft level is a ratio of it; `Duration::ZERO` reads
    /// it once, at start. When the limit moves (the container was resized),
    /// the levels move with it, and a heap already above a lowered threshold
    /// starts the shutdown at once. Default 10 s. Overrides the environment.
    pub fn limit_recheck(mut self, every: Duration) -> Self {
        self.limit_recheck = Ok(every);
        self
    }

    /// Turns on the kernel trigger at `ratio` (in (0, 1]) of the memory
    /// cgroup's limit; `0.0` turns it off. Overrides the environment.
    ///
    /// The heap threshold sees only what goes through the global allocator.
    /// The kernel OOM-kills on what the cgroup is charged: C and C++
    /// libraries' heaps, `mmap`, thread stacks, page tables and page cache.
    /// With this trigger on, a thread of memwatch's sleeps until the kernel
    /// signals the cgroup (usage threshold and memory pressure events on
    /// cgroup v1; `memory.events` changes and a PSI trigger on v2), then
    /// reads the charge less the file cache, which reclaim can always take
    /// back, and starts the same shutdown once that reaches the level. It
    /// never trips on page cache. Its level follows a resize of the cgroup,
    /// read every limit recheck period ([`limit_recheck`](Self::limit_recheck)).
    /// It needs a shutdown threshold as well
    /// (the heap threshold arms the watchdog); where the process is in no
    /// memory cgroup with a limit, or cannot register for the events, one
    /// info line says why it is unavailable.
    ///
    /// ```no_run
    /// let watchdog = memwatch::Watchdog::new()
    ///     .threshold_mb(1536)
    ///     .cgroup_threshold_ratio(0.9) // 90% of the container's limit
    ///     .on_shutdown("flush", || { /* ... */ })
    ///     .start();
    /// # watchdog.exit_if_tripped();
    /// ```
    pub fn cgroup_threshold_ratio(mut self, ratio: f64) -> Self {
        self.cgroup_ratio = if ratio == 0.0 {
            Ok(None)
        } else {
            config::parse_ratio(config::CGROUP_RATIO_ENV, &ratio.to_string())
        };
        self
    }

    /// Sets how long the hooks may take in all. Past it the process ends
    /// with the exit code anyway (`_exit`), and the hook still running is
    /// logged if standard error can take the line. `Duration::ZERO` skips
    /// the hooks; more than a day is clamped to a day, with a warning.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Sets the hold ceiling in MiB; `0` never holds. Overrides the
    /// environment (`ELASTICKV_MEMORY_HOLD_CEILING_MB`).
    ///
    /// Once the latch has tripped, a thread whose allocation would take the
    /// heap past the ceiling waits (the allocation neither returns nor
    /// fails) until the heap falls below it or the process ends, which the
    /// grace deadline bounds: growth that goes on after the trip cannot
    /// outrun the exit into the kernel's OOM-killer while the watchdog
    /// waits for a core. Below the ceiling every thread proceeds, so the
    /// hooks can drain; memwatch's own threads (the hooks run on one) never
    /// wait, nor do threads that call [`exempt_from_hold`](crate::exempt_from_hold).
    /// By default the ceiling is halfway from the threshold to the memory
    /// cgroup's limit, or the threshold plus the error budget where no
    /// cgroup limit is known; one at or below the threshold is refused with
    /// a warning and the default is used. The start line states it.
    pub fn hold_ceiling_mb(mut self, mib: u64) -> Self {
        self.hold_ceiling = config::parse_hold_ceiling(&mib.to_string());
        self
    }

    /// Sets the exit code of a memory-pressure shutdown (default 2). Useful
    /// where 2 already means something else, such as a CLI usage error.
    /// It must be in `1..=255`: the kernel keeps only the low 8 bits of an
    /// exit status (256 would end as 0, a normal stop), and 0 is a normal
    /// stop; any other code is refused at start with a warning, and 2 is
    /// used.
    pub fn exit_code(mut self, code: i32) -> Self {
        self.exit_code = code;
        self
    }

    /// Adds a shutdown hook. Hooks run once, in the order added, on the
    /// watchdog thread; a hook that panics is logged and the next one runs.
    /// Hooks may allocate freely: the latch never trips twice, and the
    /// watchdog thread never waits at the hold ceiling.
    ///
    /// A hook should return rather than end the process itself: one that
    /// calls `std::process::exit(0)` ends it with that code (a supervisor
    /// then sees a normal stop) and skips the hooks after it. The trip line
    /// is written before the first hook runs, so it is there either way.
    pub fn on_shutdown(
        mut self,
        name: impl Into<String>,
        hook: impl FnOnce() + Send + 'static,
    ) -> Self {
        self.hooks.push(Hook {
            name: name.into(),
            run: Box::new(hook),
        });
        self
    }

    /// Starts the watchdog, if a threshold is set and valid, and returns a
    /// handle. Logs the effective configuration, or one line saying why the
    /// watchdog is off. If the heap is already above the threshold, the
    /// shutdown begins at once.
    ///
    /// Only the first call in a process can start a watchdog; later calls
    /// log a warning and return a handle that is not armed.
    pub fn start(self) -> WatchdogHandle {
        let off = WatchdogHandle {
            armed: false,
            exit_code: self.exit_code,
            grace: self.grace,
        };
        for note in &self.notes {
            emit(Level::Warn, format_args!("{note}"));
        }
        let mut limit = None;
        let threshold_cfg = self.threshold.clone().ok().flatten();
        let shed_cfg = self.shed.clone().ok().flatten();
        let threshold = match self.threshold.and_then(|t| resolve(t, &mut limit)) {
            Err(e) => {
                emit(Level::Warn, format_args!("{e}; the memory watchdog is off"));
                return off;
            }
            Ok(None) => {
                emit(
                    Level::Info,
                    format_args!(
                        "memory watchdog off: {} and {} are unset, empty or 0",
                        config::THRESHOLD_ENV,
                        config::THRESHOLD_RATIO_ENV
                    ),
                );
                if matches!(self.cgroup_ratio, Ok(Some(_))) {
                    emit(
                        Level::Warn,
                        format_args!(
                            "the kernel trigger ({}) needs a shutdown threshold; it is off",
                            config::CGROUP_RATIO_ENV
                        ),
                    );
                }
                if matches!(self.shed, Ok(Some(_))) {
                    emit(
                        Level::Warn,
                        format_args!(
                            "a shed level ({} or {}) needs a shutdown threshold; it is off",
                            config::SHED_ENV,
                            config::SHED_RATIO_ENV
                        ),
                    );
                }
                return off;
            }
            Ok(Some(bytes)) => bytes as isize,
        };
        let hysteresis = self.hysteresis_percent;
        let shed = match self.shed.and_then(|s| {
            resolve(s, &mut limit).and_then(|enter| shed_band(s, enter, threshold, hysteresis))
        }) {
            Ok(band) => band,
            Err(e) => {
                emit(Level::Warn, format_args!("{e}; the shed level is off"));
                None
            }
        };
        let grace = at_most_a_day(self.grace, "grace period", config::GRACE_ENV);
        let recheck = match self.limit_recheck {
            Ok(every) => at_most_a_day(every, "limit recheck period", config::LIMIT_RECHECK_ENV),
            Err(e) => {
                emit(
                    Level::Warn,
                    format_args!("{e}; the memory limit is read once, at start"),
                );
                Duration::ZERO
            }
        };
        let ratio = |c: &Option<Configured>| matches!(c, Some(Configured::Ratio(..)));
        let follow = match &limit {
            Some(l) if !recheck.is_zero() && (ratio(&threshold_cfg) || ratio(&shed_cfg)) => {
                threshold_cfg.map(|threshold| Follow {
                    every: recheck,
                    threshold,
                    shed: shed_cfg,
                    hysteresis,
                    limit: l.clone(),
                })
            }
            _ => None,
        };
        if STARTED.swap(true, SeqCst) {
            // (A child of `fork` may start one again: see `forget_in_child`.)
            emit(
                Level::Warn,
                format_args!("memory watchdog already started; this second start does nothing"),
            );
            return off;
        }
        forget_watchdog_in_forked_children();
        let plan = Plan {
            threshold,
            grace,
            exit_code: checked_exit_code(self.exit_code),
            hooks: self.hooks.len(),
        };
        let callbacks = self.pressure_callbacks;
        let names: Vec<String> = self.hooks.iter().map(|h| h.name.clone()).collect();
        let spawned = thread::Builder::new()
            .name("memwatch-grace".into())
            .spawn(move || grace_thread(plan))
            .and_then(|grace| {
                latch::arm_grace(grace.thread().clone());
                let hooks = self.hooks;
                thread::Builder::new()
                    .name("memwatch-watchdog".into())
                    .spawn(move || watchdog_thread(plan, hooks, callbacks, follow))
            });
        let watchdog = match spawned {
            Ok(handle) => handle,
            Err(e) => {
                emit(
                    Level::Error,
                    format_args!("memory watchdog off: could not spawn its threads: {e}"),
                );
                return off;
            }
        };
        count::set_budget(threshold);
        let ceiling = hold_ceiling(self.hold_ceiling, threshold, limit.as_ref());
        count::set_ceiling(ceiling.as_ref().map_or(isize::MAX, |(bytes, _)| *bytes));
        if let Some((enter, leave)) = shed {
            latch::arm_shed(enter, leave);
        }
        latch::arm(threshold, watchdog.thread().clone());
        let off = WatchdogHandle { grace, ..off };
        if let Some(l) = &limit {
            let rechecked = if recheck.is_zero() {
                "read once".to_owned()
            } else {
                format!("rechecked every {recheck:?}")
            };
            emit(
                Level::Info,
                format_args!(
                    "memory limit {} bytes ({} MiB) from {}, {rechecked}",
                    l.bytes,
                    l.bytes / config::BYTES_PER_MIB,
                    l.source
                ),
            );
        }
        #[cfg(memwatch_jemalloc_counts)]
        if count::jemalloc::counters_missing() {
            emit(
                Level::Warn,
                format_args!(
                    "jemalloc's per-thread counters (the mallctl names thread.allocatedp and \
                     thread.deallocatedp) could not be read; memwatch counts every call itself \
                     into one shared total: exact, but slower"
                ),
            );
        }
        let shed_text = describe_shed(shed);
        emit(
            Level::Info,
            format_args!(
                "memory watchdog on: threshold {} MiB ({} bytes), error budget {} MiB, \
                 {shed_text}, {}, grace {:?}, exit code {}, {} shutdown hook(s) {:?}, \
                 live heap now {} bytes",
                threshold as u64 / config::BYTES_PER_MIB,
                threshold,
                count::budget() as u64 / config::BYTES_PER_MIB,
                describe_ceiling(ceiling.as_ref()),
                plan.grace,
                plan.exit_code,
                names.len(),
                names,
                stats::live_bytes(),
            ),
        );
        // Folds before the levels were armed compared against none: look
        // once now.
        check_now(threshold, shed);
        match self.cgroup_ratio {
            Ok(None) => {}
            Ok(Some(ratio)) => match kernel_trigger::start(ratio, recheck) {
                Ok(line) => emit(Level::Info, format_args!("{line}")),
                Err(why) => emit(
                    Level::Info,
                    format_args!(
                        "kernel trigger unavailable ({}={ratio}): {why}",
                        config::CGROUP_RATIO_ENV
                    ),
                ),
            },
            Err(e) => emit(Level::Warn, format_args!("{e}; the kernel trigger is off")),
        }
        WatchdogHandle { armed: true, ..off }
    }
}

/// The hold ceiling in bytes and how it was chosen, or `None` for no hold:
/// the configured one if it is above the threshold, else halfway from the
/// threshold to a cgroup limit above it, else the threshold plus the budget.
fn hold_ceiling(
    configured: Result<config::HoldCeiling, ConfigError>,
    threshold: isize,
    limit: Option<&limits::MemoryLimit>,
) -> Option<(isize, String)> {
    use config::HoldCeiling;
    let configured = configured.unwrap_or_else(|e| {
        emit(
            Level::Warn,
            format_args!("{e}; the hold ceiling takes its default"),
        );
        HoldCeiling::Default
    });
    match configured {
        HoldCeiling::Off => return None,
        HoldCeiling::Bytes(b) if b as isize > threshold => {
            return Some((
                b as isize,
                format!("{} MiB, as set", b / config::BYTES_PER_MIB),
            ))
        }
        HoldCeiling::Bytes(b) => emit(
            Level::Warn,
            format_args!(
                "hold ceiling ({}) of {} MiB is not above the threshold of {} MiB; it takes \
                 its default",
                config::HOLD_CEILING_ENV,
                b / config::BYTES_PER_MIB,
                threshold as u64 / config::BYTES_PER_MIB
            ),
        ),
        HoldCeiling::Default => {}
    }
    let found;
    let limit = match limit {
        Some(l) => Some(l),
        None => {
            found = limits::memory_limit();
            found.as_ref()
        }
    };
    match limit {
        Some(l)
            if !matches!(l.source, limits::LimitSource::Ram)
                && l.bytes as i128 > threshold as i128 =>
        {
            let bytes = threshold + ((l.bytes as i128 - threshold as i128) / 2) as isize;
            Some((
                bytes,
                format!(
                    "halfway to the limit of {} MiB",
                    l.bytes / config::BYTES_PER_MIB
                ),
            ))
        }
        _ => {
            let bytes = threshold.saturating_add(count::budget() as isize);
            Some((bytes, "the threshold plus the error budget".to_owned()))
        }
    }
}

/// The start line's words for the hold ceiling.
fn describe_ceiling(ceiling: Option<&(isize, String)>) -> String {
    match ceiling {
        None => "no hold after the trip".to_owned(),
        Some((bytes, why)) => format!(
            "allocations held after the trip past {} MiB ({why})",
            *bytes as u64 / config::BYTES_PER_MIB
        ),
    }
}

/// `code` if a process can end with it and a supervisor tell it from a
/// normal stop (`1..=255`); otherwise [`DEFAULT_EXIT_CODE`], with a warning.
fn checked_exit_code(code: i32) -> i32 {
    if (1..=255).contains(&code) {
        return code;
    }
    emit(
        Level::Warn,
        format_args!(
            "memory watchdog: exit code {code} is outside 1..=255 (a process ends with the low \
             8 bits of its exit status, so {code} would end as {}); using {DEFAULT_EXIT_CODE}",
            code & 0xff
        ),
    );
    DEFAULT_EXIT_CODE
}

/// The longest grace or recheck period memwatch takes: a day. A longer one
/// is clamped to it with one warning, so that no deadline can overflow.
pub(crate) const MAX_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// `period`, or [`MAX_PERIOD`] with a warning naming `what` and `variable`
/// if it is longer.
fn at_most_a_day(period: Duration, what: &str, variable: &str) -> Duration {
    if period <= MAX_PERIOD {
        return period;
    }
    emit(
        Level::Warn,
        format_args!(
            "the {what} of {}s ({variable} or the builder) is longer than {}s, the \
             longest memwatch takes; using {}s",
            period.as_secs(),
            MAX_PERIOD.as_secs(),
            MAX_PERIOD.as_secs()
        ),
    );
    MAX_PERIOD
}

impl ConfigError {
    fn in_code(what: &'static str, value: u64, problem: ConfigErrorKind) -> Self {
        ConfigError::new(what, &value.to_string(), problem)
    }
}

/// Turns a configured level into bytes, reading the memory limit (once) for
/// a ratio.
fn resolve(
    level: Option<Configured>,
    limit: &mut Option<limits::MemoryLimit>,
) -> Result<Option<u64>, ConfigError> {
    match level {
        None => Ok(None),
        Some(Configured::Bytes(b)) => Ok(Some(b)),
        Some(Configured::Ratio(r, variable)) => {
            if limit.is_none() {
                *limit = limits::memory_limit();
            }
            let Some(l) = limit else {
                return Err(ConfigError::new(
                    variable,
                    &r.to_string(),
                    ConfigErrorKind::NoMemoryLimit,
                ));
            };
            let bytes = (l.bytes as f64 * r) as u64;
            let bytes = bytes.min(isize::MAX as u64);
            Ok(Some(bytes.max(1)))
        }
    }
}

/// The soft level's enter and leave figures for a level of `enter` bytes
/// (if any) under `threshold`.
fn shed_band(
    configured: Option<Configured>,
    enter: Option<u64>,
    threshold: isize,
    hysteresis_percent: u8,
) -> Result<Option<(isize, isize)>, ConfigError> {
    match enter {
        None => Ok(None),
        // Named as the user set it: the MiB variable and its MiB, or the
        // ratio variable and its fraction.
        Some(bytes) if bytes as isize >= threshold => Err(match configured {
            Some(Configured::Ratio(r, variable)) => ConfigError::new(
                variable,
                &r.to_string(),
                ConfigErrorKind::ShedNotBelowShutdown,
            ),
            _ => ConfigError::in_code(
                config::SHED_ENV,
                bytes / config::BYTES_PER_MIB,
                ConfigErrorKind::ShedNotBelowShutdown,
            ),
        }),
        Some(bytes) => {
            let enter = bytes as isize;
            Ok(Some((
                enter,
                enter - enter / 100 * hysteresis_percent as isize,
            )))
        }
    }
}

/// The soft level for the logs.
fn describe_shed(shed: Option<(isize, isize)>) -> String {
    match shed {
        Some((enter, leave)) => format!(
            "shed level {} MiB ({enter} bytes, left below {leave} bytes)",
            enter as u64 / config::BYTES_PER_MIB
        ),
        None => "no shed level".to_owned(),
    }
}

/// Compares the exact reading with the armed levels, for when they were
/// set or moved outside a fold.
fn check_now(threshold: isize, shed: Option<(isize, isize)>) {
    // Also notes what the slots hold ahead of the total, for the folds.
    count::check_exact();
    let now = count::live_bytes();
    match shed {
        Some((enter, _)) if now > enter => latch::shift_now(true),
        Some((_, leave)) if now >= leave => {}
        _ => latch::shift_now(false),
    }
    if now > threshold {
        latch::trip_now(now);
    }
}

/// What the watchdog needs to move ratio levels with the memory limit.
pub(crate) struct Follow {
    pub(crate) every: Duration,
    pub(crate) threshold: Configured,
    pub(crate) shed: Option<Configured>,
    pub(crate) hysteresis: u8,
    /// The limit the armed levels come from.
    pub(crate) limit: limits::MemoryLimit,
}

impl Follow {
    /// Re-reads the limit; if it moved, moves the levels, logs it, and
    /// compares the reading with the new levels.
    pub(crate) fn recheck(&mut self) {
        let Some(new) = limits::memory_limit() else {
            return;
        };
        if new.bytes == self.limit.bytes {
            return;
        }
        let old = std::mem::replace(&mut self.limit, new.clone());
        let mut limit = Some(new.clone());
        let Ok(Some(threshold)) = resolve(Some(self.threshold), &mut limit) else {
            return;
        };
        let threshold = threshold as isize;
        let shed = match resolve(self.shed, &mut limit)
            .and_then(|enter| shed_band(self.shed, enter, threshold, self.hysteresis))
        {
            Ok(band) => band,
            Err(e) => {
                emit(Level::Warn, format_args!("{e}; the shed level is off"));
                None
            }
        };
        count::set_budget(threshold);
        latch::rearm(threshold, shed);
        let shed_text = describe_shed(shed);
        emit(
            Level::Warn,
            format_args!(
                "memory limit changed from {} to {} bytes ({} MiB) in {}; threshold now {} MiB \
                 ({threshold} bytes), {shed_text}; live heap now {} bytes",
                old.bytes,
                new.bytes,
                new.bytes / config::BYTES_PER_MIB,
                new.source,
                threshold as u64 / config::BYTES_PER_MIB,
                stats::live_bytes(),
            ),
        );
        check_now(threshold, shed);
    }
}

/// What [`Watchdog::start`] returns: whether the watchdog is armed, and the
/// way for `main` to end with the memory-pressure exit code.
#[derive(Debug, Clone)]
pub struct WatchdogHandle {
    armed: bool,
    exit_code: i32,
    grace: Duration,
}

impl WatchdogHandle {
    /// Whether a watchdog thread runs with a threshold.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// If the latch has tripped, never returns: waits while the watchdog
    /// finishes the shutdown sequence, which ends the process with the exit
    /// code. Call it where `main` is about to return, so that a `main` that
    /// finished its own shutdown first (even with an error) still exits 2.
    pub fn exit_if_tripped(&self) {
        if !stats::tripped() {
            return;
        }
        // The watchdog (or the grace thread) exits within the grace period.
        // If neither has, something is badly wrong: exit from here.
        thread::sleep(self.grace.saturating_add(Duration::from_secs(5)));
        exit_once(self.exit_code);
    }
}

static STARTED: AtomicBool = AtomicBool::new(false);

/// In a child of `fork`: the parent's watchdog threads are not there, so
/// the child may start a watchdog of its own, with the shutdown sequence
/// as new (one of those threads may have held its lock at the fork).
extern "C" fn forget_in_child() {
    crate::shutdown::forget_in_child();
    crate::kernel_trigger::forget_in_child();
    STARTED.store(false, SeqCst);
}

/// Registers [`forget_in_child`] once per process.
fn forget_watchdog_in_forked_children() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: `forget_in_child` is an `extern "C" fn()` that stays valid
        // for the program's life.
        unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) };
    });
}
/// Logs through `log`; when no logger is installed (`log`'s maximum level is
/// `Off`), warnings and errors go to standard error instead, so that a bad
/// value or a trip is never silent.
pub(crate) fn emit(level: Level, args: fmt::Arguments<'_>) {
    // The watchdog thread's lines go through its log thread.
    if crate::shutdown::deferred(level, args) {
        return;
    }
    if log::max_level() == log::LevelFilter::Off {
        if level <= Level::Warn {
            // One write per line (stderr is unbuffered), so that lines from
            // several threads do not interleave.
            let line = format!("[memwatch {level}] {args}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        }
    } else {
        log::log!(target: "memwatch", level, "{args}");
    }
}
