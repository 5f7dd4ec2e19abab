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
//! empty, without handing back what it names: that belongs to the parent. On unix, [`watch`]
//! registers (once) the `pthread_atfork` handler that counts; the shared-memory allocators call
//! it when a handle is made. Elsewhere, and without `std`, the generation stays 0.
//!
//! What this does not cover: a process-local lock that another thread of the parent held at
//! the fork stays held in the child, as with any fork of a threaded program.

use core::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many forks lie between this process and the first one that called [`watch`].
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// Makes sure forks are counted from now on (registers the `pthread_atfork` handler once).
pub fn watch() {
    #[cfg(all(unix, feature = "std", not(loom)))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: `in_child` is an `extern "C" fn()` that lives as long as the program.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
            // ENOMEM is the only documented failure; without the handler a forked child would
            // use its parent's slots, so an allocator must not run on.
            assert_eq!(rc, 0, "pthread_atfork failed: {rc}");
        });
    }
}

/// Runs in the child, on the thread that called `fork` (the child's only thread), before
/// `fork` returns there: it only stores to atomics and to that thread's plain TLS cells.
#[cfg(all(unix, feature = "std", not(loom)))]
extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "alloc")]
    crate::allocators::forget_thread_slots_after_fork();
}
