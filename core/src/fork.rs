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
//! - another process-local lock that another thread of the parent held at the fork (a pool's
//!   `Sync` wrapper's, say) stays held in the child, as with any fork of a threaded program.
//!   The caches' locks are the exception: a typed
//!   [`PoolAllocator`](crate::cache::PoolAllocator) and a [`Depot`](crate::cache::Depot) made
//!   by hand drop, in the child, what they held and release such locks at their first use
//!   (`Epoch`), and the thread caches' own are taken by the fork handlers;
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

/// Whether forks are counted in this process yet ([`watch`] registered its handlers).
#[cfg(all(test, unix, feature = "std", not(loom), target_has_atomic = "64"))]
pub(crate) fn watched() -> bool {
    STATE.load(Ordering::Acquire) == 0
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

/// The fork generation that a structure's process-local state belongs to, for state that a
/// forked child must start afresh: a cache's lists, and the locks that guard them, which a
/// thread of the parent may have held at the fork. That thread does not run in the child, so
/// without this the child would wait for ever on its first lock.
///
/// Every entry into the structure calls [`enter`](Self::enter) before it takes any of the
/// structure's locks. In the generation the structure was last used in, that is one load and
/// one compare. In a forked child, the first entry runs the structure's reset (once; entries
/// meanwhile wait for it, and see what it wrote). At that point no thread of the child holds one
/// of the structure's locks, since each takes them only after its own `enter`: whatever lock is
/// held belongs to a thread of the parent, and the reset may release it.
#[cfg(any(loom, all(unix, feature = "std", target_has_atomic = "64")))]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) struct Epoch(crate::sync::atomic::AtomicU64);

#[cfg(any(loom, all(unix, feature = "std", target_has_atomic = "64")))]
#[cfg_attr(loom, allow(dead_code))]
impl Epoch {
    /// Set, with the generation it runs in, while a reset runs. A reset of another generation
    /// than this process's was under way in a thread of an ancestor at the fork: that thread does
    /// not run here, and the first entry here takes the reset over rather than wait for it.
    const RESETTING: u64 = 1 << 63;

    /// The epoch of a structure not entered yet: its first entry, in whatever generation, goes
    /// through the reset (on a structure that no thread has locked yet, since every locker
    /// enters first), which makes sure forks are counted ([`watch`]) before any lock of the
    /// structure is taken. (Without that, a child forked while a thread of the parent held one
    /// would find the generation unchanged and wait for ever on that lock.) It reads as a reset of
    /// a generation that is never reached.
    const NEVER_ENTERED: u64 = u64::MAX;

    /// The epoch of a structure not entered yet.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Epoch(crate::sync::atomic::AtomicU64::new(Self::NEVER_ENTERED))
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Epoch(crate::sync::atomic::AtomicU64::new(Self::NEVER_ENTERED))
    }

    /// Marks the structure as belonging to this process's generation without a reset: for a
    /// fork handler that has made its state the child's own (the locks it held through the fork
    /// released, what the child may not use dropped), and holds its locks meanwhile.
    #[cfg(not(loom))]
    pub(crate) fn adopt(&self) {
        self.0.store(generation(), crate::sync::atomic::Ordering::Release);
    }

    /// Runs `reset` if this is the structure's first entry, or its first since a fork; `reset`
    /// may release the structure's locks (see the type's docs) and must not panic.
    #[inline]
    pub(crate) fn enter(&self, reset: impl FnOnce()) {
        self.enter_at(generation(), reset);
    }

    /// [`enter`](Self::enter) in generation `now`.
    #[inline(always)]
    fn enter_at(&self, now: u64, reset: impl FnOnce()) {
        use crate::sync::atomic::Ordering;
        if self.0.load(Ordering::Acquire) != now {
            self.start_afresh(now, reset);
        }
    }

    #[cold]
    #[inline(never)]
    fn start_afresh(&self, now: u64, reset: impl FnOnce()) {
        use crate::sync::atomic::Ordering;
        // Before any lock of the structure is taken (a failure: see `crate::fork`'s docs).
        // Registering does not change the generation, so `now` stays this process's.
        let _ = watch();
        let mut attempt = 0u32;
        loop {
            let seen = self.0.load(Ordering::Acquire);
            if seen == now {
                return;
            }
            // A reset that another thread of this process runs is waited for; one of another
            // generation (or none) is taken over.
            if seen != Self::RESETTING | now
                && self.0.compare_exchange(seen, Self::RESETTING | now, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                reset();
                self.0.store(now, Ordering::Release);
                return;
            }
            // Another thread of this process is resetting: a few stores per lock.
            crate::sync::relax(attempt);
            attempt = attempt.saturating_add(1);
        }
    }
}

/// Loom: threads of a forked child entering one structure at once. Run:
/// `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --release --lib fork::loom_epoch`.
#[cfg(all(test, loom))]
mod loom_epoch {
    use super::Epoch;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// Two threads enter `epoch` at generation 1, each running the reset (which bumps a cell) if
    /// it is the one to, then reading the cell; returns what this thread and the other read.
    fn two_threads_enter(epoch: Epoch) -> (u32, u32) {
        let epoch = Arc::new(epoch);
        let state = Arc::new(UnsafeCell::new(0u32));
        let enter = |epoch: &Epoch, state: &UnsafeCell<u32>| {
            // SAFETY: only the one reset writes the cell (loom checks it).
            epoch.enter_at(1, || state.with_mut(|v| unsafe { *v += 1 }));
            // SAFETY: every read follows an `enter`, after the reset's write (loom checks it).
            state.with(|v| unsafe { *v })
        };
        let t = {
            let (epoch, state) = (epoch.clone(), state.clone());
            loom::thread::spawn(move || enter(&epoch, &state))
        };
        let mine = enter(&epoch, &state);
        (mine, t.join().unwrap())
    }

    /// Two threads enter in a new generation: the reset runs once, and both see what it wrote
    /// (loom reports a read of the cell that the reset's write does not happen before).
    #[test]
    fn the_reset_runs_once_and_every_entry_sees_it() {
        loom::model(|| {
            let seen = two_threads_enter(Epoch::new());
            assert_eq!(seen, (1, 1), "the reset ran once, before either went on");
        });
    }

    /// A reset of the parent's generation was under way at the fork (by a thread that does not
    /// run in the child), and two threads of the child enter: one takes the reset over, once,
    /// and both see what it wrote.
    #[test]
    fn a_reset_left_by_the_parent_is_taken_over_once() {
        loom::model(|| {
            let seen = two_threads_enter(Epoch(loom::sync::atomic::AtomicU64::new(Epoch::RESETTING)));
            assert_eq!(seen, (1, 1), "the parent's reset was taken over once, before either went on");
        });
    }
}

#[cfg(all(test, unix, feature = "std", not(loom), target_has_atomic = "64"))]
mod tests {
    use super::*;
    use crate::testing::in_a_forked_child;
    use std::sync::mpsc;

    /// A child forked while a thread of its parent is inside a structure's reset: that thread
    /// does not run in the child, so the child must run the reset itself, not wait for it.
    #[test]
    fn a_child_forked_during_a_reset_in_its_parent_runs_the_reset_itself() {
        watch().unwrap();
        // Last used in another generation: the next entry here resets it.
        let epoch: &'static Epoch = Box::leak(Box::new(Epoch(AtomicU64::new(generation() + 1))));
        let (inside, in_reset) = mpsc::channel();
        let (go, released) = mpsc::channel::<()>();
        let resetter = std::thread::spawn(move || {
            epoch.enter(|| {
                inside.send(()).unwrap();
                let _ = released.recv();
            })
        });
        in_reset.recv().unwrap();
        let child = in_a_forked_child(|| {
            let mut ran = false;
            epoch.enter(|| ran = true);
            ran && epoch.0.load(Ordering::Relaxed) == generation()
        });
        go.send(()).unwrap();
        resetter.join().unwrap();
        assert!(child, "the forked child waited for a reset that a thread of its parent was running");
        assert_eq!(epoch.0.load(Ordering::Relaxed), generation(), "the parent's reset finished");
    }
}
