//! [`SyncPool`]: one lock around any [`Pool`], so threads can share it.

use alloc::string::String;
use core::ptr::NonNull;

use super::{Pool, PoolStats};
use crate::error::Result;
use crate::resource::{MemoryKind, MemoryResource};
use crate::sync::{Mutex, MutexGuard};

/// A [`Pool`] behind a [`Mutex`]: `Sync`, and a [`MemoryResource`] itself, so one pool can feed
/// another (a [`FixedPool`](super::FixedPool) over a [`QuickPool`](super::QuickPool), say).
///
/// Every operation takes the lock for its whole length, upstream calls included; the lock spins
/// briefly, then yields.
pub struct SyncPool<P: Pool> {
    name: String,
    kind: MemoryKind,
    pool: Mutex<P>,
}

impl<P: Pool> SyncPool<P> {
    /// Wraps `pool`.
    pub fn new(pool: P) -> Self {
        SyncPool { name: String::from(pool.name()), kind: pool.memory_kind(), pool: Mutex::new(pool) }
    }

    /// Exclusive access to the pool, for several operations under one lock (introspection,
    /// `coalesce`, rendering).
    pub fn lock(&self) -> MutexGuard<'_, P> {
        self.pool.lock()
    }

    /// The pool, without locking: the `&mut` proves no one else holds it.
    pub fn get_mut(&mut self) -> &mut P {
        self.pool.get_mut()
    }

    /// See [`Pool::allocate`].
    pub fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        self.pool.lock().allocate(size, align)
    }

    /// See [`Pool::deallocate`].
    pub fn deallocate(&self, ptr: NonNull<u8>) -> Result<()> {
        self.pool.lock().deallocate(ptr)
    }

    /// See [`Pool::stats`].
    pub fn stats(&self) -> PoolStats {
        self.pool.lock().stats()
    }

    /// See [`Pool::check`].
    pub fn check(&self) -> Result<()> {
        self.pool.lock().check()
    }
}

// SAFETY: the blocks are the pool's, which keeps the same promises (`Pool` is an unsafe trait),
// behind a lock, so any thread may call; `kind` is the pool's.
unsafe impl<P: Pool> MemoryResource for SyncPool<P> {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> MemoryKind {
        self.kind
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        SyncPool::allocate(self, size, align)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _size: usize, _align: usize) {
        // The pool knows each block's size, and refuses pointers it did not hand out; the
        // trait gives no way to report that, and the block stays the pool's either way.
        let _ = SyncPool::deallocate(self, ptr);
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::pool::{HostResource, QuickPool, QuickPoolConfig};
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn threads_share_one_pool() {
        let config = QuickPoolConfig { first_block_size: 1 << 20, next_block_size: 1 << 16, ..Default::default() };
        let pool = Arc::new(SyncPool::new(QuickPool::with_config(HostResource, config).unwrap()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut live = Vec::new();
                    for i in 0..2000usize {
                        live.push(SyncPool::allocate(&pool, 16 + (i * 7 + t) % 3000, 16).unwrap());
                        if i % 3 == 0 {
                            let p = live.swap_remove((i * 13) % live.len());
                            SyncPool::deallocate(&pool, p).unwrap();
                        }
                    }
                    for p in live {
                        SyncPool::deallocate(&pool, p).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        pool.check().unwrap();
        assert_eq!(pool.stats().allocation_count, 0);
        assert_eq!(pool.stats().current_size, 0);
    }

    #[test]
    fn a_sync_pool_feeds_another_pool() {
        let inner = SyncPool::new(QuickPool::new(HostResource));
        let mut outer = QuickPool::with_config(
            &inner,
            QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, ..Default::default() },
        )
        .unwrap();
        let p = outer.allocate(100, 16).unwrap();
        assert_eq!(inner.stats().allocation_count, 1);
        outer.deallocate(p).unwrap();
        drop(outer);
        assert_eq!(inner.stats().allocation_count, 0);
        assert_eq!(MemoryResource::name(&inner), "quick");
    }
}
