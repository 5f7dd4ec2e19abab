//! The atomics every hetmem structure uses: `core`'s normally, loom's under `--cfg loom`.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
// Microcontrollers such as Cortex-M have no 64-bit atomics; what needs them is left out there.
#[cfg(all(not(loom), target_has_atomic = "64"))]
pub use core::sync::atomic::AtomicU64;
