//! The atomics and the lock of the slot generations, the key table and the pthreads model's
//! count of sets under way: std's normally, loom's under `--cfg loom`, so their protocol is
//! model-checked (`thread-models/tests/loom_*.rs`).

#[cfg(all(loom, unix))]
pub(crate) use loom::sync::atomic::{fence, AtomicU32};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(all(loom, any(windows, feature = "std")))]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(all(loom, unix))]
pub(crate) use loom::thread::yield_now;

#[cfg(all(not(loom), unix))]
pub(crate) use std::sync::atomic::{fence, AtomicU32};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(all(not(loom), any(windows, feature = "std")))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(all(not(loom), unix))]
pub(crate) use std::thread::yield_now;
