//! [`BindOnce`]: a value written once by whichever thread gets there first, then read by all.
//!
//! The thread caches' depots bind their upstream with it. `core/tests/loom_bind_once.rs` checks
//! the protocol under loom (`--cfg loom`).

use crate::sync::atomic::{AtomicU32, Ordering};

/// No value yet.
const UNBOUND: u32 = 0;
/// A thread is writing the value.
const BINDING: u32 = 1;
/// The value is written, and never written again.
const BOUND: u32 = 2;

#[cfg(not(loom))]
type Cell<T> = core::cell::UnsafeCell<T>;
#[cfg(loom)]
type Cell<T> = loom::cell::UnsafeCell<T>;

/// A value bound once, by the first of any number of racing threads.
///
/// The state word moves `UNBOUND -> BINDING -> BOUND` and never back (but see
/// [`forget_binding`](Self::forget_binding)). The thread whose compare-exchange moves it out of
/// `UNBOUND` is the only writer of the value; it publishes the value by storing `BOUND` with
/// release ordering, and readers read the value only after an acquire load of `BOUND`. A thread
/// that finds `BINDING` waits for `BOUND`: the writer is two stores away from it.
pub struct BindOnce<T> {
    state: AtomicU32,
    /// Written once, between `BINDING` and `BOUND`.
    value: Cell<T>,
}

// SAFETY: `value` is written by one thread only (the one whose compare-exchange left UNBOUND),
// before it stores BOUND with release ordering, and read only after an acquire load of BOUND,
// after which it is never written again. Values are copied out, so a `T` that may be sent and
// shared may be shared through it.
unsafe impl<T: Copy + Send + Sync> Sync for BindOnce<T> {}

impl<T: Copy + PartialEq> BindOnce<T> {
    /// Not bound yet. `placeholder` fills the value's place until then; it is never read.
    #[cfg(not(loom))]
    pub const fn new(placeholder: T) -> Self {
        BindOnce { state: AtomicU32::new(UNBOUND), value: Cell::new(placeholder) }
    }

    /// Not bound yet. `placeholder` fills the value's place until then; it is never read.
    #[cfg(loom)]
    pub fn new(placeholder: T) -> Self {
        BindOnce { state: AtomicU32::new(UNBOUND), value: Cell::new(placeholder) }
    }

    /// The bound value, if a binding has finished.
    #[inline]
    pub fn get(&self) -> Option<T> {
        // SAFETY: after an acquire load of BOUND the value is written and never written again.
        (self.state.load(Ordering::Acquire) == BOUND).then(|| unsafe { self.read() })
    }

    /// Binds `value` if nothing is bound yet (waiting for a binding under way to finish), and
    /// says whether what is bound now equals `value`.
    pub fn bind(&self, value: T) -> bool {
        let mut attempt = 0u32;
        loop {
            match self.state.load(Ordering::Acquire) {
                // SAFETY: as in `get`.
                BOUND => return unsafe { self.read() } == value,
                UNBOUND => {
                    if self.state.compare_exchange(UNBOUND, BINDING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                        // SAFETY: the compare-exchange made this thread the only writer, and no
                        // reader reads the value before BOUND is stored.
                        unsafe { self.write(value) };
                        self.state.store(BOUND, Ordering::Release);
                        return true;
                    }
                }
                // Another thread is binding: two stores away.
                _ => {
                    crate::sync::relax(attempt);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Takes back a binding that was begun and never finished, so that the next
    /// [`bind`](Self::bind) binds afresh: in a forked child, whose parent had a thread binding
    /// at the fork. A finished binding stays.
    ///
    /// # Safety
    /// No thread of this process is binding: one that is would write the value beside the next
    /// binder.
    pub unsafe fn forget_binding(&self) {
        let _ = self.state.compare_exchange(BINDING, UNBOUND, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Leaves the state as a binder that stopped between its two stores would (for tests of
    /// what a forked child does with it).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn stop_mid_binding(&self) {
        self.state.store(BINDING, Ordering::Relaxed);
    }

    /// Reads the value.
    ///
    /// # Safety
    /// No thread writes it now (an acquire load of BOUND came first).
    #[inline(always)]
    unsafe fn read(&self) -> T {
        #[cfg(not(loom))]
        // SAFETY: the caller's contract.
        return unsafe { *self.value.get() };
        #[cfg(loom)]
        // SAFETY: the caller's contract (loom checks it).
        return self.value.with(|p| unsafe { *p });
    }

    /// Writes the value.
    ///
    /// # Safety
    /// This thread is the only writer, and no thread reads it until BOUND is stored.
    #[inline(always)]
    unsafe fn write(&self, value: T) {
        #[cfg(not(loom))]
        // SAFETY: the caller's contract.
        unsafe {
            *self.value.get() = value
        };
        #[cfg(loom)]
        // SAFETY: the caller's contract (loom checks it).
        self.value.with_mut(|p| unsafe { *p = value });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_first_binding_stays() {
        let once = BindOnce::new(0u32);
        assert_eq!(once.get(), None);
        assert!(once.bind(7));
        assert_eq!(once.get(), Some(7));
        assert!(!once.bind(8), "a second value is refused");
        assert!(once.bind(7), "the bound value is accepted again");
        // SAFETY: no thread is binding.
        unsafe { once.forget_binding() };
        assert_eq!(once.get(), Some(7), "a finished binding is not forgotten");
    }

    #[test]
    fn a_binding_left_under_way_is_forgotten() {
        let once = BindOnce::new(0u32);
        once.stop_mid_binding();
        assert_eq!(once.get(), None);
        // SAFETY: no thread is binding (the state was set by hand).
        unsafe { once.forget_binding() };
        assert!(once.bind(3));
        assert_eq!(once.get(), Some(3));
    }

    #[test]
    fn racing_threads_agree_on_one_value() {
        for _ in 0..50 {
            let once = BindOnce::new(0usize);
            let won: Vec<bool> = std::thread::scope(|s| {
                let threads: Vec<_> = (1..=4)
                    .map(|v| {
                        s.spawn({
                            let once = &once;
                            move || once.bind(v)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert_eq!(won.iter().filter(|&&w| w).count(), 1, "exactly one value is bound: {won:?}");
            let bound = once.get().unwrap();
            assert!(won[bound - 1], "the winner's value is the bound one");
        }
    }
}
