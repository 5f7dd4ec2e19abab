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
//!
//! Where a stamp must fit in less room, it keeps only the low 16 or 32 bits of the start time
//! ([`ProcessStamp::shortened`], [`ProcessStamp::to_word`]). A known start time whose low bits
//! are all 0 keeps all 1s instead: shortened to 0 it would read as unknown, and what its process
//! held would stay held for good once it died and its pid was reused. A hook compares a start
//! time it reads with a stamp's through [`ProcessStamp::may_have_started_at`], which shortens it
//! the same way.

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

/// How much of a start time a shortened [`ProcessStamp`] keeps: its low 16 or 32 bits, the
/// widths [`ProcessStamp::may_have_started_at`] (and so every hook) accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StartTimeBits {
    /// The low 16 bits.
    Low16 = 16,
    /// The low 32 bits.
    Low32 = 32,
}

impl StartTimeBits {
    /// The bits kept, all 1s.
    const fn mask(self) -> u64 {
        (1 << self as u32) - 1
    }
}

impl ProcessStamp {
    /// The stamp with only the low `bits` of its start time, for places with less room. A known
    /// start time (not 0) whose low bits are all 0 keeps all 1s instead, so that it never reads
    /// as unknown; an unknown one stays 0.
    pub const fn shortened(self, bits: StartTimeBits) -> Self {
        let low = self.start_time & bits.mask();
        let start_time = if low == 0 && self.start_time != 0 { bits.mask() } else { low };
        ProcessStamp { pid: self.pid, start_time }
    }

    /// The stamp in one `u64`: the pid in the high half and the start time
    /// [`shortened`](Self::shortened) to its low 32 bits, for places with room for one word.
    /// [`ProcessStamp::from_word`] reverses it.
    pub const fn to_word(self) -> u64 {
        ((self.pid as u64) << 32) | self.shortened(StartTimeBits::Low32).start_time
    }

    /// The inverse of [`ProcessStamp::to_word`] (the start time as it was shortened to 32 bits).
    pub const fn from_word(word: u64) -> Self {
        ProcessStamp { pid: (word >> 32) as u32, start_time: word & 0xffff_ffff }
    }

    /// Whether a process of this stamp's pid that started at `start_time` (known: not 0) may be
    /// the one this stamp names, as far as the bits it kept tell: its start time is the stamp's,
    /// or [`shortened`](Self::shortened) to a width the stamp's fits in, it is. A stamp
    /// shortened from `start_time` is always accepted; so may be another process's whose start
    /// time agrees in the bits kept. A stamp of unknown start time (0) names any process of its
    /// pid, and is always accepted.
    pub const fn may_have_started_at(self, start_time: u64) -> bool {
        let s = self.start_time;
        let read = ProcessStamp { pid: self.pid, start_time };
        let (low16, low32) = (StartTimeBits::Low16, StartTimeBits::Low32);
        s == 0
            || s == start_time
            || (s <= low16.mask() && read.shortened(low16).start_time == s)
            || (s <= low32.mask() && read.shortened(low32).start_time == s)
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

    /// Whether the process `stamp` names still runs. A start time of 0 (unknown), or one
    /// shortened to 16 or 32 bits ([`ProcessStamp::shortened`], [`ProcessStamp::to_word`]), must
    /// be accepted: compare a start time read with the stamp's through
    /// [`ProcessStamp::may_have_started_at`], which shortens it as the stamp's was. When unsure,
    /// answer `true`.
    ///
    /// Earlier releases (region layout version 1) asked hooks to compare the start time's kept
    /// bits as they are. Since layout version 2 a known start time whose kept bits are all 0 is
    /// shortened to all 1s, so such a hook would call a live process dead: compare through
    /// `may_have_started_at`.
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
        let unknown = ProcessStamp { pid: 4242, start_time: 0 };
        assert_eq!(ProcessStamp::from_word(unknown.to_word()), unknown, "unknown stays unknown");
    }

    /// A known start time whose kept bits were all 0 was shortened to 0, "unknown": what its
    /// process held was never taken back once it died and its pid was reused.
    #[test]
    fn a_known_start_time_never_shortens_to_unknown() {
        for start_time in [1 << 16, 1 << 32, 0x7_0000_0000, 0x5_0000, 0xffff_0000, u64::MAX << 16] {
            let s = ProcessStamp { pid: 7, start_time };
            for bits in [StartTimeBits::Low16, StartTimeBits::Low32] {
                assert_ne!(s.shortened(bits).start_time, 0, "{start_time:#x} to {bits:?}");
            }
            assert_ne!(ProcessStamp::from_word(s.to_word()).start_time, 0, "{start_time:#x} in a word");
        }
    }

    /// A stamp whose start time is unknown (0) names whichever process has its pid, whenever it
    /// started. `may_have_started_at` said no process could be the one it names, so a hook that
    /// compared through it, as `ProcessLiveness::is_alive` asks, called a live process dead.
    #[test]
    fn a_stamp_of_unknown_start_time_may_have_started_at_any_time() {
        let unknown = ProcessStamp { pid: 7, start_time: 0 };
        for t in [1, 14, 0xffff, 1 << 16, 0x1234_5678, 1 << 32, u64::MAX] {
            assert!(unknown.may_have_started_at(t), "{t:#x}");
            for bits in [StartTimeBits::Low16, StartTimeBits::Low32] {
                assert!(unknown.shortened(bits).may_have_started_at(t), "{t:#x} to {bits:?}");
            }
            assert!(ProcessStamp::from_word(unknown.to_word()).may_have_started_at(t), "{t:#x} in a word");
        }
    }

    /// Whatever its start time, a process's own stamp, shortened or not, matches the start time
    /// it was made from (a live process is never called dead); another start time matches only
    /// where the bits kept agree.
    #[test]
    fn a_shortened_stamp_matches_its_own_start_time_and_no_other_of_other_bits() {
        let times = [1, 14, 0xffff, 1 << 16, 0x1_ffff, 0x12_3456, 0xffff_ffff, 1 << 32, 0x3_0001_0000, u64::MAX];
        for &t in &times {
            let s = ProcessStamp { pid: 7, start_time: t };
            assert!(s.may_have_started_at(t));
            assert!(s.shortened(StartTimeBits::Low16).may_have_started_at(t), "{t:#x} to 16 bits");
            assert!(s.shortened(StartTimeBits::Low32).may_have_started_at(t), "{t:#x} to 32 bits");
            assert!(ProcessStamp::from_word(s.to_word()).may_have_started_at(t), "{t:#x} in a word");
        }
        // A process that started at a time whose low bits are 0 died; its pid now runs another.
        let dead = ProcessStamp { pid: 7, start_time: 0x2_0000_0000 };
        for bits in [StartTimeBits::Low16, StartTimeBits::Low32] {
            assert!(!dead.shortened(bits).may_have_started_at(0x2_0000_0123), "{bits:?}");
        }
        assert!(!ProcessStamp::from_word(dead.to_word()).may_have_started_at(0x2_0000_0123));
        // Agreeing in the bits kept, the two cannot be told apart: alive, as the trait asks.
        assert!(dead.shortened(StartTimeBits::Low16).may_have_started_at(0x7_0000_0000));
        assert!(dead.shortened(StartTimeBits::Low16).may_have_started_at(0x7_0000_ffff));
    }
}
