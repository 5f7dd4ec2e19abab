use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use super::atomic::{AtomicU32, Ordering};
use super::relax;

const UNLOCKED: u32 = 0;
const LOCKED: u32 = 1;

/// A spin lock that may be placed in shared memory and used from several processes.
///
/// Its whole state is one `u32` (0 = free), so a zero-filled segment holds a free lock. Hold it
/// only for a few instructions: a holder that is descheduled makes every waiter spin. For longer
/// sections, or where a holder may die, use [`Mutex`](super::Mutex).
///
/// It records no owner, so nothing can tell a held lock from a dead or damaged one: a process
/// killed while holding it, or a stray write of any non-zero value into its word (another
/// process scribbling on the segment), leaves it locked for good, and [`lock`](Self::lock)
/// then spins for ever. Where other processes may die or misbehave, use
/// [`Mutex::lock_or_recover`](super::Mutex::lock_or_recover), or [`try_lock`](Self::try_lock)
/// under a deadline of the caller's. (hetmem itself keeps its spin locks in process memory.)
#[repr(C)]
pub struct SpinLock<T> {
    state: AtomicU32,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `data` to one thread at a time, so sharing the lock is
// as safe as sending `T` between threads.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: the lock owns its `T`; moving it moves the `T`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A free lock guarding `value`.
    #[cfg(not(loom))]
    pub const fn new(value: T) -> Self {
        SpinLock { state: AtomicU32::new(UNLOCKED), data: UnsafeCell::new(value) }
    }

    /// A free lock guarding `value`.
    #[cfg(loom)]
    pub fn new(value: T) -> Self {
        SpinLock { state: AtomicU32::new(UNLOCKED), data: UnsafeCell::new(value) }
    }

    /// Takes the lock, spinning until it is free: for ever if its holder died or a stray write
    /// set it (see the type's docs).
    pub fn lock(&self) -> SpinLockGuard<'_, T> {
        let mut attempt = 0u32;
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            // Wait on a plain load so waiters do not bounce the cache line with failed writes.
            while self.state.load(Ordering::Relaxed) != UNLOCKED {
                relax(attempt);
                attempt = attempt.saturating_add(1);
            }
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinLockGuard<'_, T>> {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinLockGuard { lock: self, _access: PhantomData })
    }

    /// Takes the lock and keeps it past this call, for fork handlers; [`force_unlock`] gives it
    /// back.
    ///
    /// [`force_unlock`]: Self::force_unlock
    #[cfg(all(unix, feature = "std", not(loom)))]
    pub(crate) fn lock_and_keep(&self) {
        core::mem::forget(self.lock());
    }

    /// The value of a lock this thread took with [`lock_and_keep`](Self::lock_and_keep).
    ///
    /// # Safety
    /// As for [`force_unlock`](Self::force_unlock), and the reference is gone before that.
    #[cfg(all(unix, feature = "std", not(loom)))]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn kept_value(&self) -> &mut T {
        // SAFETY: the caller holds the lock, so no other reference to the value is live.
        unsafe { &mut *self.data.get() }
    }

    /// Releases a lock taken with [`lock_and_keep`](Self::lock_and_keep).
    ///
    /// # Safety
    /// The lock was taken with `lock_and_keep` (in this process or, after a fork, in its parent)
    /// and not released since; no guard of it is live.
    #[cfg(all(unix, feature = "std", not(loom)))]
    pub(crate) unsafe fn force_unlock(&self) {
        self.state.store(UNLOCKED, Ordering::Release);
    }

    /// Whether some thread holds the lock right now.
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }

    /// Mutable access without locking: the `&mut` proves no one else can hold it.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Access to a [`SpinLock`]'s value; the lock is released on drop.
///
/// `Sync` only when `T` is: a shared guard hands out `&T` to every thread that holds it.
pub struct SpinLockGuard<'a, T> {
    lock: &'a SpinLock<T>,
    /// What the guard gives, for its auto traits: `&SpinLock<T>` alone would make it `Sync`
    /// for any `T: Send`, a `Cell` say.
    _access: PhantomData<&'a mut T>,
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the lock, so no other reference
        // to the data is live.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.state.store(UNLOCKED, Ordering::Release);
    }
}

#[cfg(all(test, not(loom), feature = "std"))]
mod tests {
    use super::*;
    use crate::sync::NotSync;
    use std::sync::Arc;

    #[test]
    fn a_guard_is_shared_between_threads_only_if_its_value_may_be() {
        let () = <SpinLockGuard<'static, core::cell::Cell<u32>> as NotSync<_>>::CHECKED;
        fn sync<T: Sync>() {}
        sync::<SpinLockGuard<'static, u32>>();
    }

    #[test]
    fn excludes_other_threads() {
        let lock = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        *lock.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 80_000);
    }

    #[test]
    fn try_lock_fails_while_held() {
        let lock = SpinLock::new(());
        let g = lock.lock();
        assert!(lock.is_locked());
        assert!(lock.try_lock().is_none());
        drop(g);
        assert!(lock.try_lock().is_some());
    }

    #[test]
    fn zeroed_memory_is_a_free_lock() {
        // SAFETY: SpinLock<u64> is an AtomicU32 and a u64; all-zero bytes are valid for both.
        let lock: SpinLock<u64> = unsafe { core::mem::zeroed() };
        assert!(!lock.is_locked());
        assert_eq!(*lock.lock(), 0);
    }
}
