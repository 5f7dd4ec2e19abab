//! Loom models of the shm-safe locks: every interleaving of two threads incrementing a counter
//! under the lock must end with both increments (a broken lock loses one).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --release --test loom_sync`
#![cfg(loom)]

use hetmem_core::sync::atomic::{AtomicUsize, Ordering};
use hetmem_core::sync::{Mutex, SpinLock};
use loom::sync::Arc;
use loom::thread;

/// A read-modify-write split in two, so only mutual exclusion keeps it from losing updates.
fn bump(counter: &AtomicUsize) {
    let v = counter.load(Ordering::Relaxed);
    counter.store(v + 1, Ordering::Relaxed);
}

/// Runs `this_thread` here and `other_thread` on a second thread, each given the lock and a counter
/// to bump once under it, and checks that neither bump was lost; returns the lock, both threads
/// done with it.
fn both_bumps_land<L: Send + Sync + 'static>(
    lock: L,
    this_thread: impl Fn(&L, &AtomicUsize),
    other_thread: impl Fn(&L, &AtomicUsize) + Send + 'static,
) -> Arc<L> {
    let lock = Arc::new(lock);
    let counter = Arc::new(AtomicUsize::new(0));
    let t = {
        let (lock, counter) = (lock.clone(), counter.clone());
        thread::spawn(move || other_thread(&lock, &counter))
    };
    this_thread(&lock, &counter);
    t.join().unwrap();
    assert_eq!(counter.load(Ordering::Relaxed), 2);
    lock
}

#[test]
fn spin_lock_excludes() {
    let lock_and_bump = |lock: &SpinLock<()>, counter: &AtomicUsize| {
        let _g = lock.lock();
        bump(counter);
    };
    loom::model(move || {
        both_bumps_land(SpinLock::new(()), lock_and_bump, lock_and_bump);
    });
}

#[test]
fn mutex_excludes_and_try_lock_never_overlaps() {
    let lock_and_bump = |lock: &Mutex<()>, counter: &AtomicUsize| {
        let _g = lock.lock();
        bump(counter);
    };
    loom::model(move || {
        let lock = both_bumps_land(Mutex::new(()), lock_and_bump, move |lock, counter| {
            if let Some(_g) = lock.try_lock() {
                bump(counter);
            } else {
                lock_and_bump(lock, counter);
            }
        });
        assert!(lock.owner().is_none());
    });
}
