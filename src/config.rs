//! Reading the environment: the threshold and the grace period.

use std::fmt;
use std::time::Duration;

/// The threshold, in MiB. Unset, empty or `0` means off.
pub const THRESHOLD_ENV: &str = "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB";

/// How long the shutdown hooks may take, as `500ms`, `10s` or `2m`.
pub const GRACE_ENV: &str = "ELASTICKV_MEMORY_SHUTDOWN_GRACE";

/// How often the watchdog re-reads the memory limit while a level is a ratio
/// of it, as `500ms`, `10s` or `2m`; `0s` reads it once, at start.
pub const LIMIT_RECHECK_ENV: &str = "ELASTICKV_MEMORY_LIMIT_RECHECK";

/// The threshold as a fraction in (0, 1] of the effective memory limit (the
/// cgroup's, or RAM). The MiB form wins if both are set.
pub const THRESHOLD_RATIO_ENV: &str = "ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_RATIO";

/// The soft (shed) level in MiB: above it, [`pressure`](crate::pressure)
/// is true and the pressure callbacks run. Off by default; it must sit below
/// the shutdown threshold.
pub const SHED_ENV: &str = "ELASTICKV_MEMORY_SHED_THRESHOLD_MB";

/// The soft level as a fraction in (0, 1] of the effective memory limit.
pub const SHED_RATIO_ENV: &str = "ELASTICKV_MEMORY_SHED_THRESHOLD_RATIO";

/// The kernel trigger's level, as a fraction in (0, 1] of the memory
/// cgroup's limit: the shutdown starts when the part of the cgroup's charge
/// that reclaim cannot free (everything but file cache) reaches it. Off by
/// default; it needs a shutdown threshold too.
pub const CGROUP_RATIO_ENV: &str = "ELASTICKV_MEMORY_CGROUP_THRESHOLD_RATIO";

/// The heap past which, once the latch has tripped, an allocation waits for
/// the exit, in MiB (see `Watchdog::hold_ceiling_mb`); `0` never holds.
pub const HOLD_CEILING_ENV: &str = "ELASTICKV_MEMORY_HOLD_CEILING_MB";

/// How far below the soft level usage must fall to leave it, in percent of
/// the level: 10, so a 1000 MiB level is left below 900 MiB. Enough that a
/// heap oscillating around the level by a request's worth does not flap.
pub const DEFAULT_SHED_HYSTERESIS_PERCENT: u8 = 10;

/// The threshold unit: a MiB, 1,048,576 bytes, as in the Go watchdog this
/// crate follows (`ELASTICKV_MEMORY_SHUTDOWN_THRESHOLD_MB` × 1024 × 1024).
pub const BYTES_PER_MIB: u64 = 1 << 20;

/// The grace period when [`GRACE_ENV`] is unset: 30 seconds, the default
/// `terminationGracePeriodSeconds` of a Kubernetes pod, so hooks that fit a
/// normal stop fit here too.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The limit recheck period when [`LIMIT_RECHECK_ENV`] is unset: 10
/// seconds. A container resized while it runs (a Kubernetes in-place pod
/// resize, `systemctl set-property`) has its ratio levels moved within that.
/// Reading the limit costs a few small file reads on the watchdog thread.
pub const DEFAULT_LIMIT_RECHECK: Duration = Duration::from_secs(10);

/// The exit code of a memory-pressure shutdown: distinct from a normal stop
/// (0) and from a crash or a `main` returning an error (1), as in the Go
/// watchdog this crate follows.
pub const DEFAULT_EXIT_CODE: i32 = 2;

/// A malformed configuration value. Its `Display` names the variable, the
/// value and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    variable: &'static str,
    value: String,
    problem: ConfigErrorKind,
}

/// What is wrong with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// Not a whole, non-negative decimal number of MiB.
    NotANumber,
    /// The number of MiB, multiplied to bytes, does not fit in 64 bits.
    Overflow,
    /// The byte count is larger than any allocation this platform can hold
    /// (`isize::MAX`).
    TooLarge,
    /// Not a duration of the form `<integer><ms|s|m>`.
    NotADuration,
    /// Not a decimal fraction in (0, 1], such as `0.7`.
    NotARatio,
    /// The soft level is not below the shutdown threshold.
    ShedNotBelowShutdown,
    /// A ratio is set but no memory limit could be read.
    NoMemoryLimit,
}

impl ConfigError {
    pub(crate) fn new(variable: &'static str, value: &str, problem: ConfigErrorKind) -> Self {
        ConfigError {
            variable,
            value: value.to_owned(),
            problem,
        }
    }

    /// The same problem, attributed to `variable`.
    pub(crate) fn renamed(self, variable: &'static str) -> Self {
        ConfigError { variable, ..self }
    }

    /// The environment variable that held the value.
    pub fn variable(&self) -> &'static str {
        self.variable
    }

    /// The value as it was read.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What is wrong with it.
    pub fn kind(&self) -> ConfigErrorKind {
        self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.problem {
            ConfigErrorKind::NotANumber => "expected a whole number of MiB, such as 2048".to_owned(),
            ConfigErrorKind::Overflow => "the number of MiB times 1,048,576 overflows 64 bits".to_owned(),
            ConfigErrorKind::TooLarge => format!(
                "the threshold in bytes exceeds the largest size this platform can allocate ({} bytes)",
                isize::MAX
            ),
            ConfigErrorKind::NotADuration => "expected a duration such as 500ms, 10s or 2m".to_owned(),
            ConfigErrorKind::NotARatio => "expected a fraction in (0, 1], such as 0.7".to_owned(),
            ConfigErrorKind::ShedNotBelowShutdown => {
                "the shed level must sit below the shutdown threshold".to_owned()
            }
            ConfigErrorKind::NoMemoryLimit => {
                "no memory limit could be read (cgroup or /proc/meminfo)".to_owned()
            }
        };
        // A long value is cut, so that one bad variable makes one short line.
        const SHOWN: usize = 64;
        if self.value.chars().count() > SHOWN {
            let head: String = self.value.chars().take(SHOWN).collect();
            write!(
                f,
                "invalid {}={:?}... ({} bytes): {}",
                self.variable,
                head,
                self.value.len(),
                why
            )
        } else {
            write!(f, "invalid {}={:?}: {}", self.variable, self.value, why)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses a threshold in MiB into bytes. `None` means off (empty or zero).
///
/// Surrounding whitespace is ignored; anything but ASCII digits is rejected
/// (no sign, no fraction, no hex), as is a value whose bytes overflow 64 bits
/// or exceed `isize::MAX`.
pub fn parse_threshold_mb(raw: &str) -> Result<Option<u64>, ConfigError> {
    let err = |problem| ConfigError::new(THRESHOLD_ENV, raw, problem);
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(ConfigErrorKind::NotANumber));
    }
    // All digits: the only way `parse` fails now is a number past u64.
    let mib: u64 = text.parse().map_err(|_| err(ConfigErrorKind::Overflow))?;
    if mib == 0 {
        return Ok(None);
    }
    let bytes = mib
        .checked_mul(BYTES_PER_MIB)
        .ok_or_else(|| err(ConfigErrorKind::Overflow))?;
    if isize::try_from(bytes).is_err() {
        return Err(err(ConfigErrorKind::TooLarge));
    }
    Ok(Some(bytes))
}

/// Parses a grace period: a whole number followed by `ms`, `s` or `m`.
/// Empty means the default, [`DEFAULT_GRACE`].
pub fn parse_grace(raw: &str) -> Result<Duration, ConfigError> {
    parse_duration(GRACE_ENV, raw, DEFAULT_GRACE)
}

/// Parses a limit recheck period, in the form of [`parse_grace`]; `0s` is
/// off. Empty means the default, [`DEFAULT_LIMIT_RECHECK`].
pub fn parse_limit_recheck(raw: &str) -> Result<Duration, ConfigError> {
    parse_duration(LIMIT_RECHECK_ENV, raw, DEFAULT_LIMIT_RECHECK)
}

/// A whole number followed by `ms`, `s` or `m`; empty is `default`.
fn parse_duration(
    variable: &'static str,
    raw: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let err = || ConfigError::new(variable, raw, ConfigErrorKind::NotADuration);
    let text = raw.trim();
    if text.is_empty() {
        return Ok(default);
    }
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(err());
    }
    let n: u64 = number.parse().map_err(|_| err())?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        _ => return Err(err()),
    };
    Ok(duration)
}

/// Parses a ratio: a plain decimal fraction in (0, 1] (`0.7`, `.9`, `1`).
/// Empty means unset. `variable` names the variable in the error.
pub fn parse_ratio(variable: &'static str, raw: &str) -> Result<Option<f64>, ConfigError> {
    let err = || ConfigError::new(variable, raw, ConfigErrorKind::NotARatio);
    let text = raw.trim();
    if text.is_empty() {
        return Ok(None);
    }
    // Digits and at most one dot: no sign, exponent, `inf` or `nan`.
    let dots = text.bytes().filter(|&b| b == b'.').count();
    if dots > 1 || text == "." || !text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(err());
    }
    let r: f64 = text.parse().map_err(|_| err())?;
    if r > 0.0 && r <= 1.0 {
        Ok(Some(r))
    } else {
        Err(err())
    }
}

/// A level as configured: absolute, or relative to the memory limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Level {
    /// Bytes.
    Bytes(u64),
    /// A fraction of the effective memory limit, and the variable it came
    /// from.
    Ratio(f64, &'static str),
}

/// The configuration read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EnvConfig {
    /// Shutdown threshold; `None` is off.
    pub(crate) threshold: Option<Level>,
    /// Soft level, or the reason it is off.
    pub(crate) shed: Result<Option<Level>, ConfigError>,
    pub(crate) grace: Duration,
    /// How often to re-read the memory limit, or why it is read only once.
    pub(crate) limit_recheck: Result<Duration, ConfigError>,
    /// The kernel trigger's ratio, or the reason it is off.
    pub(crate) cgroup_ratio: Result<Option<f64>, ConfigError>,
    /// The hold ceiling: a malformed one is one warning and the default.
    pub(crate) hold_ceiling: Result<HoldCeiling, ConfigError>,
    /// Warnings that leave the configuration on (both forms of a level set).
    pub(crate) notes: Vec<String>,
}

/// Reads a level from its MiB variable and its ratio variable; the MiB form
/// wins, with a note, if both are set.
fn level(
    mib_env: &'static str,
    ratio_env: &'static str,
    notes: &mut Vec<String>,
) -> Result<Option<Level>, ConfigError> {
    let mib = match read(mib_env, ConfigErrorKind::NotANumber)? {
        Some(raw) => parse_threshold_mb(&raw).map_err(|e| e.renamed(mib_env))?,
        None => None,
    };
    let ratio = match read(ratio_env, ConfigErrorKind::NotARatio)? {
        Some(raw) => parse_ratio(ratio_env, &raw)?,
        None => None,
    };
    match (mib, ratio) {
        (Some(bytes), Some(r)) => {
            notes.push(format!(
                "both {mib_env} and {ratio_env}={r} are set; {mib_env} wins"
            ));
            Ok(Some(Level::Bytes(bytes)))
        }
        (Some(bytes), None) => Ok(Some(Level::Bytes(bytes))),
        (None, Some(r)) => Ok(Some(Level::Ratio(r, ratio_env))),
        (None, None) => Ok(None),
    }
}

/// Reads every variable. A malformed shutdown threshold or grace is an
/// error (the watchdog stays off); a malformed soft level turns off only
/// the soft level. A value that is not valid Unicode is malformed too.
pub(crate) fn from_env() -> Result<EnvConfig, ConfigError> {
    let mut notes = Vec::new();
    let threshold = level(THRESHOLD_ENV, THRESHOLD_RATIO_ENV, &mut notes)?;
    let grace = match read(GRACE_ENV, ConfigErrorKind::NotADuration)? {
        Some(raw) => parse_grace(&raw)?,
        None => DEFAULT_GRACE,
    };
    let shed = level(SHED_ENV, SHED_RATIO_ENV, &mut notes);
    let limit_recheck =
        read(LIMIT_RECHECK_ENV, ConfigErrorKind::NotADuration).and_then(|raw| match raw {
            Some(raw) => parse_limit_recheck(&raw),
            None => Ok(DEFAULT_LIMIT_RECHECK),
        });
    let cgroup_ratio =
        read(CGROUP_RATIO_ENV, ConfigErrorKind::NotARatio).and_then(|raw| match raw {
            Some(raw) => parse_ratio(CGROUP_RATIO_ENV, &raw),
            None => Ok(None),
        });
    let hold_ceiling = read(HOLD_CEILING_ENV, ConfigErrorKind::NotANumber)
        .and_then(|raw| raw.map_or(Ok(HoldCeiling::Default), |r| parse_hold_ceiling(&r)));
    Ok(EnvConfig {
        threshold,
        shed,
        grace,
        limit_recheck,
        cgroup_ratio,
        hold_ceiling,
        notes,
    })
}

/// Where allocations wait once the latch has tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldCeiling {
    /// Halfway from the threshold to the cgroup's limit, or the threshold
    /// plus the error budget where no cgroup limit is known.
    Default,
    /// Never hold.
    Off,
    /// At this many bytes.
    Bytes(u64),
}

/// Parses the hold ceiling in MiB: empty is the default, `0` is off.
pub(crate) fn parse_hold_ceiling(raw: &str) -> Result<HoldCeiling, ConfigError> {
    if raw.trim().is_empty() {
        return Ok(HoldCeiling::Default);
    }
    Ok(
        match parse_threshold_mb(raw).map_err(|e| e.renamed(HOLD_CEILING_ENV))? {
            None => HoldCeiling::Off,
            Some(bytes) => HoldCeiling::Bytes(bytes),
        },
    )
}

fn read(variable: &'static str, problem: ConfigErrorKind) -> Result<Option<String>, ConfigError> {
    match std::env::var(variable) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => {
            Err(ConfigError::new(variable, &raw.to_string_lossy(), problem))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_ceiling_parses_as_mib_with_0_off_and_empty_the_default() {
        assert_eq!(parse_hold_ceiling(""), Ok(HoldCeiling::Default));
        assert_eq!(parse_hold_ceiling(" "), Ok(HoldCeiling::Default));
        assert_eq!(parse_hold_ceiling("0"), Ok(HoldCeiling::Off));
        assert_eq!(parse_hold_ceiling("300"), Ok(HoldCeiling::Bytes(300 << 20)));
        let e = parse_hold_ceiling("300MB").unwrap_err();
        assert_eq!(e.variable(), HOLD_CEILING_ENV);
        assert_eq!(e.value(), "300MB");
    }

    #[test]
    fn threshold_table() {
        let max_mib_in_u64 = u64::MAX / BYTES_PER_MIB; // 17592186044415
        let max_mib_in_isize = isize::MAX as u64 / BYTES_PER_MIB;
        let cases: Vec<(String, Result<Option<u64>, ConfigErrorKind>)> = vec![
            ("".into(), Ok(None)),
            ("   ".into(), Ok(None)),
            ("0".into(), Ok(None)),
            ("000".into(), Ok(None)),
            ("64".into(), Ok(Some(64 << 20))),
            (" 64\n".into(), Ok(Some(64 << 20))),
            ("\t2048 ".into(), Ok(Some(2048 << 20))),
            ("1".into(), Ok(Some(1 << 20))),
            ("abc".into(), Err(ConfigErrorKind::NotANumber)),
            ("-5".into(), Err(ConfigErrorKind::NotANumber)),
            ("+5".into(), Err(ConfigErrorKind::NotANumber)),
            ("1.5".into(), Err(ConfigErrorKind::NotANumber)),
            ("0x40".into(), Err(ConfigErrorKind::NotANumber)),
            ("64MB".into(), Err(ConfigErrorKind::NotANumber)),
            ("6 4".into(), Err(ConfigErrorKind::NotANumber)),
            (
                "18446744073709551616".into(),
                Err(ConfigErrorKind::Overflow),
            ),
            (
                (max_mib_in_u64 + 1).to_string(),
                Err(ConfigErrorKind::Overflow),
            ),
            (
                max_mib_in_isize.to_string(),
                Ok(Some(max_mib_in_isize << 20)),
            ),
        ];
        if cfg!(target_pointer_width = "64") {
            // Fits in u64 bytes, but not in isize: past what this platform
            // can allocate.
            let e = parse_threshold_mb(&max_mib_in_u64.to_string()).unwrap_err();
            assert_eq!(e.kind(), ConfigErrorKind::TooLarge);
        }
        for (raw, want) in cases {
            let got = parse_threshold_mb(&raw).map_err(|e| e.kind());
            assert_eq!(got, want, "input {raw:?}");
        }
    }

    #[test]
    fn grace_table() {
        let ok = [
            ("", DEFAULT_GRACE),
            ("10s", Duration::from_secs(10)),
            (" 500ms ", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("0s", Duration::ZERO),
        ];
        for (raw, want) in ok {
            assert_eq!(parse_grace(raw), Ok(want), "input {raw:?}");
        }
        for raw in [
            "10",
            "abc",
            "1.5s",
            "-1s",
            "10 s",
            "s",
            "5h",
            "10S",
            "99999999999999999999s",
        ] {
            let e = parse_grace(raw).unwrap_err();
            assert_eq!(e.variable(), GRACE_ENV);
            assert_eq!(e.kind(), ConfigErrorKind::NotADuration, "input {raw:?}");
        }
    }

    #[test]
    fn limit_recheck_table() {
        for (raw, want) in [
            ("", DEFAULT_LIMIT_RECHECK),
            ("1s", Duration::from_secs(1)),
            ("250ms", Duration::from_millis(250)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_limit_recheck(raw), Ok(want), "input {raw:?}");
        }
        for raw in ["10", "off", "1.5s", "-1s"] {
            let e = parse_limit_recheck(raw).unwrap_err();
            assert_eq!(e.variable(), LIMIT_RECHECK_ENV, "input {raw:?}");
            assert_eq!(e.kind(), ConfigErrorKind::NotADuration, "input {raw:?}");
        }
    }

    #[test]
    fn ratio_table() {
        for (raw, want) in [
            ("0.7", 0.7),
            (" 1 ", 1.0),
            (".9", 0.9),
            ("1.0", 1.0),
            ("0.05", 0.05),
        ] {
            assert_eq!(
                parse_ratio(THRESHOLD_RATIO_ENV, raw),
                Ok(Some(want)),
                "{raw:?}"
            );
        }
        assert_eq!(parse_ratio(THRESHOLD_RATIO_ENV, ""), Ok(None));
        for raw in [
            "0", "0.0", "1.5", "-0.5", "abc", "1e-1", "inf", "nan", ".", "0.5.1", "70%",
        ] {
            let e = parse_ratio(SHED_RATIO_ENV, raw).unwrap_err();
            assert_eq!(e.kind(), ConfigErrorKind::NotARatio, "{raw:?}");
            assert_eq!(e.variable(), SHED_RATIO_ENV);
        }
    }

    #[test]
    fn error_names_variable_and_value() {
        let e = parse_threshold_mb("abc").unwrap_err();
        let text = e.to_string();
        assert!(text.contains(THRESHOLD_ENV), "{text}");
        assert!(text.contains("\"abc\""), "{text}");
    }
}
