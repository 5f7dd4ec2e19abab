//! The atomics and the lock of the slot generations and the key table: std's normally, loom's
//! under `--cfg loom`, so their protocol is model-checked (`thread-models/tests/loom_*.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(all(loom, any(windows, feature = "std")))]
pub(crate) use loom::sync::{Mutex, MutexGuard};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(all(not(loom), any(windows, feature = "std")))]
pub(crate) use std::sync::{Mutex, MutexGuard};
