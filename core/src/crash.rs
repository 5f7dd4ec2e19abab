//! Crash points: the places between two stores to shared memory where a process may die and
//! leave work half done for a recovery to finish.
//!
//! Built with `--cfg hetmem_crash_points` (on Unix, with `std`), each point counts itself, and
//! the process kills itself with `SIGKILL` at the point `HETMEM_CRASH_AT` names (counting
//! from 0), after printing where to stderr if `HETMEM_CRASH_TRACE` is set (`where`: the point's
//! file and line; anything else: a backtrace as well). A test then runs one process per point,
//! so that recovery is tried after a death at every point of a sequence of operations, rather
//! than at the points a timer happens to hit (`tests/crash_points.rs`). Unit tests die at a
//! point inside one call instead (`testing::die_at`). In every other build a crash point is
//! empty.

/// Marks a place where the process may die (see the [module docs](self)).
#[inline(always)]
#[cfg_attr(all(hetmem_crash_points, feature = "std", unix), track_caller)]
// Its callers (the shared-memory allocators and lists) are not built for small bare-metal targets.
#[cfg_attr(not(any(target_has_atomic = "64", feature = "alloc")), allow(dead_code))]
pub(crate) fn point() {
    #[cfg(all(hetmem_crash_points, feature = "std", unix))]
    imp::hit(core::panic::Location::caller());
    #[cfg(all(test, feature = "std"))]
    testing::hit();
}

/// Deaths inside one call, for unit tests: [`die_at`](testing::die_at) unwinds out of a
/// function at its `n`th crash point, leaving what it wrote so far as a killed process would
/// (locks aside: their guards are dropped on the way out, so a test that needs a lock held by
/// the dead marks it so itself). [`write_at`](testing::write_at) runs another process's write
/// there instead.
#[cfg(all(test, feature = "std"))]
pub(crate) mod testing {
    use std::cell::{Cell, RefCell};

    std::thread_local! {
        /// Points left before the death (`None`: no death armed on this thread).
        static LEFT: Cell<Option<u64>> = const { Cell::new(None) };
        /// What happens there instead of the death, if anything.
        static WRITE: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    /// The payload a death unwinds with.
    struct Killed;

    pub(super) fn hit() {
        LEFT.with(|left| match left.get() {
            Some(0) => {
                left.set(None);
                if let Some(write) = WRITE.with(|w| w.borrow_mut().take()) {
                    return write();
                }
                std::panic::resume_unwind(Box::new(Killed));
            }
            Some(n) => left.set(Some(n - 1)),
            None => {}
        });
    }

    /// Runs `f` and dies at its crash point `n` (counting from 0): `None` if it died there,
    /// else what it returned (it passed fewer than `n + 1` points).
    #[cfg_attr(loom, allow(dead_code))] // its tests are not built under loom
    pub(crate) fn die_at<R>(n: u64, f: impl FnOnce() -> R) -> Option<R> {
        LEFT.with(|left| left.set(Some(n)));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        LEFT.with(|left| left.set(None));
        match out {
            Ok(r) => Some(r),
            Err(payload) if payload.is::<Killed>() => None,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// Runs `f` and, at its crash point `n` (counting from 0), `write`: what another process
    /// may write to shared memory between two of `f`'s stores. Returns what `f` returned, and
    /// whether `write` ran (`f` passed more than `n` points).
    #[cfg_attr(loom, allow(dead_code))] // its tests are not built under loom
    pub(crate) fn write_at<R>(n: u64, write: impl FnOnce() + 'static, f: impl FnOnce() -> R) -> (R, bool) {
        WRITE.with(|w| *w.borrow_mut() = Some(Box::new(write)));
        LEFT.with(|left| left.set(Some(n)));
        let r = f();
        LEFT.with(|left| left.set(None));
        let ran = WRITE.with(|w| w.borrow_mut().take()).is_none();
        (r, ran)
    }
}

/// How many crash points this process has passed (only with `--cfg hetmem_crash_points`).
#[cfg(all(hetmem_crash_points, feature = "std", unix))]
pub fn points_passed() -> u64 {
    imp::PASSED.load(core::sync::atomic::Ordering::Relaxed)
}

#[cfg(all(hetmem_crash_points, feature = "std", unix))]
mod imp {
    use core::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    pub(super) static PASSED: AtomicU64 = AtomicU64::new(0);

    /// The point to die at, from `HETMEM_CRASH_AT` (none: never).
    fn target() -> u64 {
        static AT: OnceLock<u64> = OnceLock::new();
        *AT.get_or_init(|| std::env::var("HETMEM_CRASH_AT").ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX))
    }

    pub(super) fn hit(at: &core::panic::Location<'_>) {
        let n = PASSED.fetch_add(1, Ordering::Relaxed);
        if n == target() {
            match std::env::var("HETMEM_CRASH_TRACE").as_deref() {
                Ok("where") => std::eprintln!("killed at point {n}, {at}"),
                Ok(_) => std::eprintln!("killed at point {n}, {at}:\n{}", std::backtrace::Backtrace::force_capture()),
                Err(_) => {}
            }
            // SAFETY: kill(2) on this process; SIGKILL cannot be caught, so nothing runs after.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
