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

#[test]
fn spin_lock_excludes() {
    loom::model(|| {
        let lock = Arc::new(SpinLock::new(()));
        let counter = Arc::new(AtomicUsize::new(0));
        let t = {
            let (lock, counter) = (lock.clone(), counter.clone());
            thread::spawn(move || {
                let _g = lock.lock();
                bump(&counter);
            })
        };
        {
            let _g = lock.lock();
            bump(&counter);
        }
        t.join().unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    });
}

#[test]
fn mutex_excludes_and_try_lock_never_overlaps() {
    loom::model(|| {
        let lock = Arc::new(Mutex::new(()));
        let counter = Arc::new(AtomicUsize::new(0));
        let t = {
            let (lock, counter) = (lock.clone(), counter.clone());
            thread::spawn(move || {
                if let Some(_g) = lock.try_lock() {
                    bump(&counter);
                } else {
                    let _g = lock.lock();
                    bump(&counter);
                }
            })
        };
        {
            let _g = lock.lock();
            bump(&counter);
        }
        t.join().unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 2);
        assert!(lock.owner().is_none());
    });
}
