//! Locks that can live in shared memory: `#[repr(C)]`, atomics only, no pointers, no OS handles.
//!
//! - [`SpinLock`]: a test-and-test-and-set lock for very short critical sections. It records no
//!   owner: a holder that dies, or a stray write into it, leaves it held for ever.
//! - [`Mutex`]: records its owner (process id and start time) so a lock left by a dead process
//!   can be found and taken over ([`Mutex::lock_or_recover`]); spins briefly, then yields.
//! - [`TaggedOffsetList`]: a lock-free stack of offsets with an ABA tag, for free lists shared
//!   by processes.
//! - [`BindOnce`]: a value bound once by the first of racing threads (a depot's upstream).
//! - [`bits`]: claiming and releasing bits of bitmap words without a lock, for the bitmap
//!   allocator that CPU threads, processes and GPU kernels share.
//!
//! All atomics come through [`atomic`], which swaps in loom's under `--cfg loom` so these
//! algorithms are model-checked (`core/tests/loom_*.rs`).

pub mod atomic;
#[cfg(target_has_atomic = "32")]
mod bind_once;
#[cfg(target_has_atomic = "64")]
pub mod bits;
#[cfg(target_has_atomic = "64")]
mod mutex;
// Targets without compare-and-swap (e.g. Cortex-M0, thumbv6m) have no spin lock.
#[cfg(target_has_atomic = "32")]
mod spin_lock;
#[cfg(target_has_atomic = "64")]
pub mod tagged_list;

#[cfg(target_has_atomic = "32")]
pub use bind_once::BindOnce;
#[cfg(target_has_atomic = "64")]
pub use mutex::{Mutex, MutexGuard};
#[cfg(target_has_atomic = "32")]
pub use spin_lock::{SpinLock, SpinLockGuard};
#[cfg(target_has_atomic = "64")]
pub use tagged_list::{LinkStore, TaggedOffsetList};

/// Compiles only for a `T` that is not `Sync`: `<T as NotSync<_>>::CHECKED` names one impl
/// exactly when the `Sync` one does not apply (for the guards' tests).
#[cfg(all(test, not(loom), feature = "std"))]
pub(crate) trait NotSync<A> {
    const CHECKED: () = ();
}
#[cfg(all(test, not(loom), feature = "std"))]
impl<T: ?Sized> NotSync<()> for T {}
#[cfg(all(test, not(loom), feature = "std"))]
impl<T: ?Sized + Sync> NotSync<u8> for T {}

/// Waits politely inside a lock's retry loop: lets another thread run where there is a
/// scheduler, and hints the CPU otherwise.
#[inline]
#[cfg_attr(not(target_has_atomic = "32"), allow(dead_code))]
pub(crate) fn relax(attempt: u32) {
    if attempt < 64 {
        core::hint::spin_loop();
        #[cfg(loom)]
        loom::thread::yield_now();
        return;
    }
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(not(loom), feature = "std"))]
    std::thread::yield_now();
    #[cfg(all(not(loom), not(feature = "std")))]
    core::hint::spin_loop();
}

/// A token naming the calling process, for lock and slot owners: its [`ProcessStamp`] as one
/// word (the process id in the high 32 bits, its start time shortened to the low 32, never to 0
/// for a known one, see [`ProcessStamp::to_word`]), so a holder that died is told apart from a
/// later process that got the same id. Without a [`liveness`](crate::liveness) hook the start time is 0 (unknown)
/// and only the id is compared. Never zero.
///
/// [`ProcessStamp`]: crate::liveness::ProcessStamp
/// [`ProcessStamp::to_word`]: crate::liveness::ProcessStamp::to_word
#[cfg(all(feature = "std", not(loom)))]
pub fn owner_token() -> u64 {
    let stamp = crate::liveness::current();
    if stamp.pid != 0 {
        stamp.to_word()
    } else {
        (std::process::id() as u64) << 32
    }
}

/// A token naming the caller, for lock owners. Without `std` there is no process id to read,
/// so every caller shares one token.
#[cfg(any(not(feature = "std"), loom))]
pub fn owner_token() -> u64 {
    1
}

/// The process id recorded in an owner token.
pub const fn owner_pid(token: u64) -> u32 {
    (token >> 32) as u32
}

/// The process an owner token names, with as much of its start time as the token kept.
#[cfg(target_has_atomic = "ptr")]
pub const fn owner_stamp(token: u64) -> crate::liveness::ProcessStamp {
    crate::liveness::ProcessStamp::from_word(token)
}

/// Whether the owner word `token` (0 = free) names a holder that is gone, so that what it holds
/// may be taken over: a process the [`liveness`](crate::liveness) hook calls dead, or no process
/// at all. With `std` every process's [`owner_token`] carries its (non-zero) process id, so a
/// token of process id 0 is a stray write of another process (a small number, an offset), which
/// no one would ever take over otherwise (the hook never calls pid 0 dead). Without `std` (and
/// under loom) every caller's token is 1, of pid 0: there it is a holder's. Only with a hook
/// installed, as for any take-over: a process that knows no other process takes nothing over.
#[cfg(target_has_atomic = "ptr")]
// Its callers (the mutex, the shared-memory allocators) are not built for small bare-metal targets.
#[cfg_attr(not(any(target_has_atomic = "64", feature = "alloc")), allow(dead_code))]
pub(crate) fn holder_gone(token: u64) -> bool {
    let no_process = cfg!(all(feature = "std", not(loom))) && owner_pid(token) == 0;
    token != 0
        && if no_process { crate::liveness::hook().is_some() } else { crate::liveness::is_dead(owner_stamp(token)) }
}
