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
    /// The pool's [`Pool::host_accessible`], which the memory's kind does not tell.
    host_accessible: bool,
    pool: Mutex<P>,
}

impl<P: Pool> SyncPool<P> {
    /// Wraps `pool`.
    pub fn new(pool: P) -> Self {
        SyncPool {
            name: String::from(pool.name()),
            kind: pool.memory_kind(),
            host_accessible: pool.host_accessible(),
            pool: Mutex::new(pool),
        }
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
// behind a lock, so any thread may call; `kind` and `host_accessible` are the pool's.
unsafe impl<P: Pool> MemoryResource for SyncPool<P> {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> MemoryKind {
        self.kind
    }

    fn host_accessible(&self) -> bool {
        self.host_accessible
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
    use crate::pool::{CoalesceHeuristic, HostResource, LimitedResource, QuickPool, QuickPoolConfig, Releasable};
    use std::sync::atomic::{AtomicBool, Ordering};
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

    /// A heuristic that panics, in its answer or in its floor, whenever the test says so.
    struct Panicky(Arc<AtomicBool>);

    impl CoalesceHeuristic for Panicky {
        fn should_coalesce(&mut self, stats: &PoolStats) -> Option<usize> {
            assert!(!self.0.load(Ordering::Relaxed), "heuristic panics in should_coalesce");
            (stats.releasable_blocks >= 2).then_some(stats.actual_size)
        }
        fn releasable_floor(&self, actual_size: usize) -> Releasable {
            assert!(!self.0.load(Ordering::Relaxed), "heuristic panics in releasable_floor");
            Releasable { bytes: 0, blocks: 2, actual_size }
        }
        fn every_free(&self) -> bool {
            false
        }
    }

    /// The lock is free again after a user heuristic panics under it (it does not poison), and
    /// the pool behind it is whole: its figures right, its upstream blocks all its own or handed
    /// back, and its next free asks the heuristic as it should. Before, a floor that panicked as
    /// the pool grew left the actual high watermark below the actual size (`check` said Corrupt)
    /// and a stale floor (a debug build's next free failed its assertion), and one that panicked
    /// as the pool released left the blocks it had taken out of the pool in no one's hands.
    #[test]
    fn a_heuristic_that_panics_leaves_the_pool_whole() {
        let upstream = LimitedResource::new(HostResource, 1 << 20);
        let config = QuickPoolConfig { first_block_size: 4096, next_block_size: 4096, ..Default::default() };
        let panics = Arc::new(AtomicBool::new(false));
        let heuristic = Panicky(Arc::clone(&panics));
        let pool = SyncPool::new(QuickPool::with_config(&upstream, config).unwrap().with_heuristic(heuristic));
        let panicking = |f: &mut dyn FnMut()| {
            panics.store(true, Ordering::Relaxed);
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
            panics.store(false, Ordering::Relaxed);
            assert!(unwound, "the heuristic was not asked");
            pool.check().unwrap();
            let s = pool.stats();
            assert_eq!(upstream.held(), s.actual_size);
            assert_eq!(s.actual_high_watermark, s.actual_size.max(8192));
        };
        let a = pool.allocate(4096, 16).unwrap();
        // Growing: the new block's floor panics.
        panicking(&mut || {
            let _ = pool.allocate(4096, 16);
        });
        assert_eq!(pool.stats().upstream_allocations, 2);
        let b = pool.allocate(4096, 16).unwrap();
        assert_eq!(pool.stats().upstream_blocks, 2);
        pool.deallocate(a).unwrap();
        // A free that leaves both blocks wholly free asks, and the answer panics: the free is done.
        panicking(&mut || {
            let _ = pool.deallocate(b);
        });
        assert_eq!((pool.stats().allocation_count, pool.stats().releasable_blocks), (0, 2));
        // Releasing: the floor for the smaller pool panics, after the blocks went back.
        panicking(&mut || {
            pool.lock().release();
        });
        assert_eq!(pool.stats().actual_size, 0);
        // The lock is free and the pool asks its heuristic again.
        let (a, b) = (pool.allocate(4096, 16).unwrap(), pool.allocate(4096, 16).unwrap());
        pool.deallocate(a).unwrap();
        pool.deallocate(b).unwrap();
        assert_eq!(pool.stats().coalesce_count, 1);
        pool.check().unwrap();
    }

    /// Host memory that its resource says the CPU may not touch, as a backend whose memory is
    /// mapped for a device alone says of itself (its kind is still private or shared memory).
    struct NotForTheCpu;

    // SAFETY: forwards every block to and from `HostResource`; it only claims less.
    unsafe impl MemoryResource for NotForTheCpu {
        fn name(&self) -> &str {
            "not-for-the-cpu"
        }
        fn kind(&self) -> MemoryKind {
            MemoryKind::Host
        }
        fn host_accessible(&self) -> bool {
            false
        }
        fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
            HostResource.allocate(size, align)
        }
        unsafe fn deallocate(&self, ptr: NonNull<u8>, size: usize, align: usize) {
            // SAFETY: the caller's contract, passed on to the resource that gave the block.
            unsafe { HostResource.deallocate(ptr, size, align) }
        }
    }

    /// A sync pool says the CPU may touch its blocks only where its pool's upstream says so, not
    /// wherever the memory's kind is not device memory: the caches that write their links into
    /// a resource's blocks believe it. Before, a sync pool over such an upstream said yes, and a
    /// typed pool over it took its blocks, to link them through their first word once freed.
    #[test]
    fn a_sync_pool_is_host_accessible_only_where_its_upstream_is() {
        use crate::pool::{FixedPool, FixedPoolConfig};
        let config = QuickPoolConfig { first_block_size: 4096, ..Default::default() };
        let quick = SyncPool::new(QuickPool::with_config(NotForTheCpu, config).unwrap());
        let fixed = SyncPool::new(FixedPool::new(NotForTheCpu, FixedPoolConfig::new(64)).unwrap());
        let traced = SyncPool::new(crate::pool::trace::TracedPool::new(QuickPool::new(NotForTheCpu)));
        let host = SyncPool::new(QuickPool::with_config(HostResource, config).unwrap());
        assert_eq!(MemoryResource::kind(&quick), MemoryKind::Host);
        for resource in [&quick as &dyn MemoryResource, &fixed, &traced] {
            assert!(!resource.host_accessible(), "{}", resource.name());
        }
        assert!(MemoryResource::host_accessible(&host));
        // A typed pool, which keeps its free blocks on a list linked through them, refuses it.
        // (Not under loom, whose step builds these tests without the caches.)
        #[cfg(not(loom))]
        {
            use crate::cache::{PoolAllocator, Upstream};
            let quick: &'static SyncPool<_> = std::boxed::Box::leak(std::boxed::Box::new(quick));
            let typed = PoolAllocator::<u64>::with_upstream(4, Upstream::Resource(quick));
            assert!(matches!(typed.allocate(), Err(crate::Error::Unsupported(_))));
            assert_eq!(quick.stats().allocation_count, 0);
        }
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
