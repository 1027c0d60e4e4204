//! The atomics every concurrent part of memwatch uses: std's, or loom's
//! under `--cfg loom`, chosen here once so that the model checks run the
//! same code as the program.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicIsize, AtomicU8, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicIsize, AtomicU8, AtomicUsize};
