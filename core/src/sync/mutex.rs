use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use super::atomic::{AtomicU64, Ordering};
use super::{owner_token, relax};

const FREE: u64 = 0;

/// A lock for shared memory that records who holds it.
///
/// The owner word holds an [`owner_token`] (process id and start time; 0 = free), so a
/// zero-filled segment holds a free mutex, and a process that finds the lock held by a process
/// that no longer exists can take it over with [`Mutex::recover`] and then repair what it guards.
/// Waiters spin briefly, then yield the CPU.
#[repr(C)]
pub struct Mutex<T> {
    owner: AtomicU64,
    data: UnsafeCell<T>,
}

// SAFETY: the mutex hands out access to `data` to one thread at a time.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: the mutex owns its `T`.
unsafe impl<T: Send> Send for Mutex<T> {}

impl<T> Mutex<T> {
    /// A free mutex guarding `value`.
    #[cfg(not(loom))]
    pub const fn new(value: T) -> Self {
        Mutex { owner: AtomicU64::new(FREE), data: UnsafeCell::new(value) }
    }

    /// A free mutex guarding `value`.
    #[cfg(loom)]
    pub fn new(value: T) -> Self {
        Mutex { owner: AtomicU64::new(FREE), data: UnsafeCell::new(value) }
    }

    /// Takes the mutex, waiting as long as it takes.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let me = owner_token();
        let mut attempt = 0u32;
        loop {
            if let Some(guard) = self.try_lock_as(me) {
                return guard;
            }
            while self.owner.load(Ordering::Relaxed) != FREE {
                relax(attempt);
                attempt = attempt.saturating_add(1);
            }
        }
    }

    /// Takes the mutex if it is free.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.try_lock_as(owner_token())
    }

    fn try_lock_as(&self, me: u64) -> Option<MutexGuard<'_, T>> {
        self.owner
            .compare_exchange(FREE, me, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| MutexGuard { mutex: self, _access: PhantomData })
    }

    /// The owner token of the holder, or `None` when free.
    pub fn owner(&self) -> Option<u64> {
        match self.owner.load(Ordering::Acquire) {
            FREE => None,
            token => Some(token),
        }
    }

    /// Takes over a mutex still held by `dead_owner`, a holder that has died.
    ///
    /// Returns `None` if the mutex is no longer held by `dead_owner` (it was released or
    /// recovered by someone else), or if the [`liveness`](crate::liveness) hook does not confirm
    /// that `dead_owner`'s process has ended (no hook installed, or it still runs): the token is
    /// public ([`owner`](Self::owner)), and taking a live holder's lock would hand out a second
    /// guard. A token that names no process (process id 0, which [`owner_token`](super::owner_token)
    /// never gives where there are processes: a stray write of another process put it there)
    /// counts as a dead holder's once a hook is installed. The data may be half-updated: the
    /// caller must check and repair it before releasing the guard.
    pub fn recover(&self, dead_owner: u64) -> Option<MutexGuard<'_, T>> {
        if !super::holder_gone(dead_owner) {
            return None;
        }
        self.owner
            .compare_exchange(dead_owner, owner_token(), Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| MutexGuard { mutex: self, _access: PhantomData })
    }

    /// Takes the mutex, waiting while a live process holds it; a holder found dead (through the
    /// [`liveness`](crate::liveness) hook, by process id and start time) is replaced, and
    /// `repair` runs on the guarded value, which the dead holder may have left half-updated,
    /// before the guard is handed out.
    pub fn lock_or_recover(&self, repair: impl FnOnce(&mut T)) -> MutexGuard<'_, T> {
        let me = owner_token();
        let mut attempt = 0u32;
        loop {
            if let Some(guard) = self.try_lock_as(me) {
                return guard;
            }
            attempt = attempt.wrapping_add(1);
            if attempt % 1024 == 0 {
                if let Some(mut guard) = self.owner().and_then(|owner| self.recover(owner)) {
                    repair(&mut guard);
                    return guard;
                }
            }
            relax(attempt);
        }
    }

    /// Takes the mutex if it is free, or, as [`lock_or_recover`](Self::lock_or_recover) does, if
    /// its holder is found dead (then `repair` runs first); `None` while a live process holds it.
    /// For callers that wait under a deadline of their own: a live holder may keep the lock for
    /// good (a process stopped in a debugger, or a stray write of another process naming one).
    /// Each call with the lock held asks the [`liveness`](crate::liveness) hook about its holder.
    pub fn try_lock_or_recover(&self, repair: impl FnOnce(&mut T)) -> Option<MutexGuard<'_, T>> {
        if let Some(guard) = self.try_lock() {
            return Some(guard);
        }
        let mut guard = self.owner().and_then(|owner| self.recover(owner))?;
        repair(&mut guard);
        Some(guard)
    }

    /// Mutable access without locking: the `&mut` proves no one else can hold it.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Access to a [`Mutex`]'s value; the mutex is released on drop.
///
/// `Sync` only when `T` is: a shared guard hands out `&T` to every thread that holds it.
pub struct MutexGuard<'a, T> {
    mutex: &'a Mutex<T>,
    /// What the guard gives, for its auto traits: `&Mutex<T>` alone would make it `Sync` for
    /// any `T: Send`, a `Cell` say.
    _access: PhantomData<&'a mut T>,
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this thread holds the mutex.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        self.mutex.owner.store(FREE, Ordering::Release);
    }
}

#[cfg(all(test, not(loom), feature = "std"))]
mod tests {
    use super::*;
    use crate::sync::{owner_pid, NotSync};
    use std::sync::Arc;

    #[test]
    fn a_guard_is_shared_between_threads_only_if_its_value_may_be() {
        // Through a shared guard, two threads would reach a `Cell` at once.
        let () = <MutexGuard<'static, core::cell::Cell<u32>> as NotSync<_>>::CHECKED;
        fn sync<T: Sync>() {}
        sync::<MutexGuard<'static, u32>>();
    }

    #[test]
    fn excludes_other_threads_and_records_owner() {
        let m = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for j in 0..1000 {
                        let mut g = m.lock();
                        assert_eq!(owner_pid(m.owner().unwrap()), std::process::id());
                        g.push(i * 1000 + j);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.lock().len(), 3000);
        assert_eq!(m.owner(), None);
    }

    #[test]
    fn recover_takes_over_only_from_the_named_owner() {
        crate::testing::install_test_liveness();
        let m = Mutex::new(5u32);
        let dead = crate::testing::dead_token();
        m.owner.store(dead, Ordering::Release); // as if a dead process held it
        assert!(m.try_lock().is_none());
        assert!(m.recover(dead + 1).is_none());
        let mut g = m.recover(dead).expect("recovered");
        *g = 6;
        drop(g);
        assert_eq!(*m.lock(), 6);
    }

    #[test]
    fn recover_refuses_a_holder_that_still_runs() {
        // Without a hook no process is known dead; with one, this process runs.
        let m = Mutex::new(5u32);
        let held = m.lock();
        let me = m.owner().unwrap();
        assert!(m.recover(me).is_none(), "recovered from a live holder without a liveness hook");
        crate::testing::install_test_liveness();
        assert!(m.recover(me).is_none(), "two guards of one mutex at once");
        drop(held);
        assert!(m.try_lock().is_some());
    }

    #[test]
    fn a_lock_a_dead_process_holds_is_taken_over_and_repaired() {
        crate::testing::install_test_liveness();
        let m = Mutex::new(5u32);
        m.owner.store(crate::testing::dead_token(), Ordering::Release);
        let mut repaired = false;
        let g = m.lock_or_recover(|v| {
            *v = 7;
            repaired = true;
        });
        assert!(repaired && *g == 7);
        assert_eq!(crate::sync::owner_pid(m.owner().unwrap()), std::process::id());
        drop(g);
        // A live holder is waited for, not taken over.
        let held = m.lock();
        let waiter = {
            let m = &m;
            std::thread::scope(|s| {
                let t = s.spawn(move || *m.lock_or_recover(|_| panic!("a live holder was taken over")));
                std::thread::sleep(std::time::Duration::from_millis(20));
                drop(held);
                t.join().unwrap()
            })
        };
        assert_eq!(waiter, 7);
    }

    #[test]
    fn try_lock_or_recover_takes_a_free_or_dead_holders_lock_and_never_a_live_ones() {
        crate::testing::install_test_liveness();
        let m = Mutex::new(5u32);
        drop(m.try_lock_or_recover(|_| panic!("a free lock was repaired")).expect("a free lock"));
        m.owner.store(crate::testing::dead_token(), Ordering::Release);
        let g = m.try_lock_or_recover(|v| *v = 8).expect("a dead holder's lock");
        assert_eq!(*g, 8);
        assert!(m.try_lock_or_recover(|_| panic!("a live holder was taken over")).is_none());
        drop(g);
        assert_eq!(m.owner(), None);
    }
}
