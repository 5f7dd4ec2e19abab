//! Whether another process is still alive: the hook shared-memory allocators use to recover
//! locks and heaps that a killed process left behind.
//!
//! Asking the OS is platform code, which core does not contain: a platform crate installs a
//! [`ProcessLiveness`] once per process ([`install`]); `hetmem-backends` does so for its
//! shared-memory backends (Linux: `/proc/<pid>/stat` start time). Without a hook every process
//! counts as alive, so nothing is ever reclaimed by mistake.
//!
//! A process is named by a [`ProcessStamp`]: its id and its start time, so a recycled pid is not
//! mistaken for the process that died. A stamp whose start time is unknown (0: the process could
//! not read it) is only as good as its pid: once that process dies and its pid is reused, what it
//! held (a lock, a slot) stays held while the new process runs, since nothing in the stamp tells
//! the two apart and calling the writer dead while it runs would hand out what it still uses.

use core::sync::atomic::{AtomicPtr, Ordering};

/// A process: its id and its start time in an OS-defined unit (0 = unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProcessStamp {
    /// The process id.
    pub pid: u32,
    /// When it started (Linux: clock ticks since boot), or 0 if unknown.
    pub start_time: u64,
}

impl ProcessStamp {
    /// The stamp in one `u64`: the pid in the high half and the start time's low 32 bits, for
    /// places with room for one word. [`ProcessStamp::from_word`] reverses it.
    pub const fn to_word(self) -> u64 {
        ((self.pid as u64) << 32) | (self.start_time & 0xffff_ffff)
    }

    /// The inverse of [`ProcessStamp::to_word`] (the start time keeps only its low 32 bits).
    pub const fn from_word(word: u64) -> Self {
        ProcessStamp { pid: (word >> 32) as u32, start_time: word & 0xffff_ffff }
    }
}

/// Asks the OS about processes.
///
/// # Safety
/// The span allocators and locks take what a process they are told is dead held (its heaps,
/// caches and, with `DeadProcessBlocks::Free`, its live blocks) and hand it out again, from safe
/// calls. So an implementation promises that [`is_alive`](Self::is_alive) answers `false` only
/// for a process that has ended (when unsure, `true`), and that [`current`](Self::current) names
/// the calling process: calling a running process dead would hand out memory it still uses.
///
/// ```compile_fail,E0200
/// use hetmem_core::liveness::{ProcessLiveness, ProcessStamp};
/// struct Reaper;
/// impl ProcessLiveness for Reaper { // needs `unsafe impl`
///     fn current(&self) -> ProcessStamp {
///         ProcessStamp::default()
///     }
///     fn is_alive(&self, _: ProcessStamp) -> bool {
///         false // every other process "dead": its memory handed out again
///     }
/// }
/// ```
pub unsafe trait ProcessLiveness: Sync {
    /// The calling process's stamp. A forked child is another process: a hook that caches the
    /// stamp must key it by [`fork::generation`](crate::fork::generation) (after a successful
    /// [`fork::watch`](crate::fork::watch)), or read it each time.
    fn current(&self) -> ProcessStamp;

    /// Whether the process `stamp` names still runs. A start time of 0, or one shortened by
    /// [`ProcessStamp::to_word`], must be accepted: compare only the bits given. When unsure,
    /// answer `true`.
    fn is_alive(&self, stamp: ProcessStamp) -> bool;
}

static HOOK: AtomicPtr<&'static dyn ProcessLiveness> = AtomicPtr::new(core::ptr::null_mut());

/// Installs `hook` for this process unless one is installed already; returns whether it was.
pub fn install(hook: &'static &'static dyn ProcessLiveness) -> bool {
    let ptr = hook as *const &'static dyn ProcessLiveness as *mut &'static dyn ProcessLiveness;
    HOOK.compare_exchange(core::ptr::null_mut(), ptr, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// The installed hook, if any.
pub fn hook() -> Option<&'static dyn ProcessLiveness> {
    let ptr = HOOK.load(Ordering::Acquire);
    // SAFETY: only `install` stores here, from a `&'static &'static dyn`, so a non-null value is
    // a valid shared reference for the whole program.
    unsafe { ptr.as_ref() }.copied()
}

/// The calling process's stamp, or pid 0 (never reclaimed) without a hook.
pub fn current() -> ProcessStamp {
    hook().map(|h| h.current()).unwrap_or_default()
}

/// Whether `stamp` names a process known to be gone. Unknown (no hook, pid 0) is not dead.
pub fn is_dead(stamp: ProcessStamp) -> bool {
    stamp.pid != 0 && hook().is_some_and(|h| !h.is_alive(stamp))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_one_word() {
        let s = ProcessStamp { pid: 4242, start_time: 0x1_2345_6789 };
        let back = ProcessStamp::from_word(s.to_word());
        assert_eq!(back.pid, 4242);
        assert_eq!(back.start_time, 0x2345_6789);
        assert!(!is_dead(ProcessStamp::default()), "pid 0 is never dead");
    }
}
