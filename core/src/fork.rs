//! Which side of a `fork()` the process is on, for state a child must not inherit.
//!
//! A forked child is a new process with a copy of its parent's memory: the thread that called
//! `fork` keeps its thread-local values, and process-wide caches keep what the parent put there.
//! For the shared-memory allocators some of that names the *parent*: the slot or heap the thread
//! held (in a segment both processes map, so using it would race with the parent), and the
//! process stamp that owners and blocks are marked with (so recovery would judge the child by
//! the parent's life).
//!
//! [`generation`] counts the forks on the way to this process: 0 in a process that was not
//! forked (or forked before [`watch`] was first called), one more in each child. Caches of such
//! state record the generation they were filled in and treat an entry of another generation as
//! empty, without handing back what it names: that belongs to the parent. (A
//! [`ProcessLiveness`](crate::liveness::ProcessLiveness) hook that caches its stamp must do the
//! same.) On unix, [`watch`] registers (once) the `pthread_atfork` handlers, the child's of which
//! counts; the shared-memory allocators and backends call it when they are opened, the thread
//! caches at their first request. Elsewhere, without `std`, and on targets without 64-bit
//! atomics, the generation stays 0.
//!
//! The same registration serves the thread caches ([`cache`](crate::cache): `HetAlloc`,
//! recycled frames): they take every lock of theirs before a fork and give them back on both
//! sides (see `cache/tls.rs`).
//!
//! What this does not cover:
//! - another process-local lock that another thread of the parent held at the fork (a typed
//!   [`PoolAllocator`](crate::cache::PoolAllocator)'s, a pool's `Sync` wrapper's) stays held in
//!   the child, as with any fork of a threaded program;
//! - bookkeeping of shared memory that a process keeps in its own memory: parent and child each
//!   get a copy and would hand out the same blocks. A
//!   [`BackendResource`](crate::pool::BackendResource) over shared, pinned or device memory
//!   therefore refuses to allocate in a forked child (an error, which pools and thread caches
//!   over it pass on; the caches drop, unfreed, the blocks they held); a child carves a range of
//!   its own instead.

#[cfg(target_has_atomic = "64")]
use core::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;

#[cfg(target_has_atomic = "64")]
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many forks lie between this process and the first one that called [`watch`].
#[inline]
pub fn generation() -> u64 {
    #[cfg(target_has_atomic = "64")]
    return GENERATION.load(Ordering::Relaxed);
    #[cfg(not(target_has_atomic = "64"))]
    0
}

/// The registration of the handler: [`UNTRIED`], [`REGISTERING`], 0 (registered) or the error
/// `pthread_atfork` returned.
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
static STATE: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(UNTRIED);
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
const UNTRIED: i32 = -1;
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
const REGISTERING: i32 = -2;

/// Makes sure forks are counted from now on: registers the `pthread_atfork` handler, once. Fails
/// (every time) with [`Error::Os`](crate::Error::Os) if the system refused it; a caller that
/// caches per-process state must then not rely on [`generation`].
pub fn watch() -> Result<()> {
    #[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
    {
        use core::sync::atomic::AtomicU32;
        // The process whose thread is registering: a child forked meanwhile (where that thread
        // does not run) registers again rather than wait for ever. A second registration counts
        // each fork twice, which is harmless.
        static REGISTRANT: AtomicU32 = AtomicU32::new(0);
        loop {
            match STATE.load(Ordering::Acquire) {
                0 => return Ok(()),
                UNTRIED => {
                    if STATE.compare_exchange(UNTRIED, REGISTERING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        REGISTRANT.store(std::process::id(), Ordering::Release);
                        // SAFETY: the handlers are `extern "C" fn()`s that live as long as the
                        // program.
                        let rc = unsafe { libc::pthread_atfork(Some(before), Some(in_parent), Some(in_child)) };
                        STATE.store(rc, Ordering::Release);
                    }
                }
                REGISTERING if REGISTRANT.load(Ordering::Acquire) != std::process::id() => {
                    let _ = STATE.compare_exchange(REGISTERING, UNTRIED, Ordering::AcqRel, Ordering::Acquire);
                }
                REGISTERING => std::thread::yield_now(),
                errno => return Err(crate::Error::Os { call: "pthread_atfork", errno }),
            }
        }
    }
    #[cfg(not(all(unix, feature = "std", not(loom), target_has_atomic = "64")))]
    Ok(())
}

/// Runs before a fork, on the thread that calls it: the thread caches take their locks.
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
extern "C" fn before() {
    crate::cache::fork_handlers::prepare();
}

/// Runs in the parent after a fork, on the thread that called it.
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
extern "C" fn in_parent() {
    crate::cache::fork_handlers::parent();
}

/// Runs in the child, on the thread that called `fork` (the child's only thread), before
/// `fork` returns there: it only adds to an atomic and stores to that thread's plain TLS cells.
#[cfg(all(unix, feature = "std", not(loom), target_has_atomic = "64"))]
extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // Registered, even if the parent forked before it recorded so.
    STATE.store(0, Ordering::Release);
    #[cfg(feature = "alloc")]
    crate::allocators::forget_thread_slots_after_fork();
    crate::cache::fork_handlers::child();
}
