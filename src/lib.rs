//! # hetmem
//!
//! One memory model for CPU threads, for several processes, and for GPU kernels.
//!
//! - **Backends** ([`backends`]) say where bytes live: private memory, POSIX shared memory, and
//!   (features `cuda`, `rocm`) the same segment pinned for a GPU, or device memory.
//! - **Region allocators** ([`allocators`]) keep all of their state inside the region as offsets,
//!   so any process that maps it, at any address, can allocate and free in it.
//! - **Thread models** ([`thread_models`]) say what a thread is: pthreads, Windows or std threads.
//! - The **[`MemoryManager`]** registers backends and allocators by id and turns a [`ShmPtr`]
//!   from another process into a local address.
//!
//! ```no_run
//! use hetmem::prelude::*;
//!
//! let mm = MemoryManager::new();
//! let shm = mm.add_backend(PosixShmBackend::create("/hetmem-doc", 1 << 20, &ShmOptions::default())?)?;
//! let id = AllocatorId::new(1, 0);
//! mm.create_allocator::<StackAllocator>(shm.id(), id, 0, &Default::default())?;
//! let p = mm.allocate(id, 64, 8)?; // p.shm can be sent to any process that attaches
//! mm.free(p.shm)?;
//! mm.destroy_backend(shm.id())?;
//! # Ok::<(), hetmem::Error>(())
//! ```
#![warn(missing_docs)]

pub use hetmem_core as core;
pub use hetmem_core::{
    check_layout, AllocStats, AllocatorId, AllocatorType, BackendId, BackendKind, Error, FullPtr, MemoryBackend,
    MemoryKind, MemoryManager, MemoryResource, OffsetPtr, Region, RegionAllocator, Result, ShmPtr, ThreadModel,
};

/// Region allocators.
pub mod allocators {
    pub use hetmem_core::allocators::*;

    /// [`ThreadLocalAllocator`](hetmem_core::allocators::ThreadLocalAllocator) with this
    /// platform's thread model.
    pub type ThreadLocalAllocator =
        hetmem_core::allocators::ThreadLocalAllocator<hetmem_thread_models::DefaultThreadModel>;
}

/// Memory backends.
pub mod backends {
    pub use hetmem_backends::*;
}

/// Thread models.
pub mod thread_models {
    pub use hetmem_thread_models::*;
}

/// Process-private caching tiers: thread caches ([`cache::HetAlloc`], also as the global
/// allocator), typed pools, recycled async-task frames.
pub mod cache {
    pub use hetmem_core::cache::*;
}

/// Pools over any upstream resource: coalescing, fixed-size, thread-safe, traced.
pub mod pool {
    pub use hetmem_core::pool::*;
}

/// Locks that can live in shared memory.
pub mod sync {
    pub use hetmem_core::sync::*;
}

/// fastmem: an O(1) allocator over a static store, for `no_std` targets (also in `hetmem-core`
/// without `std` or `alloc`).
pub mod fastmem {
    pub use hetmem_core::fastbox_unsize;
    pub use hetmem_core::fastmem::*;
}

/// GPU backends and resources (features `cuda`, `rocm`).
pub mod gpu {
    pub use hetmem_gpu::*;
}

/// The names most programs need.
pub mod prelude {
    pub use crate::allocators::ThreadLocalAllocator;
    pub use hetmem_backends::{ArrayBackend, MallocBackend, PosixMmapBackend, PosixShmBackend, ShmOptions};
    pub use hetmem_core::allocators::{
        BitmapAllocator, BitmapConfig, DeadProcessBlocks, ScalablePageAllocator, ScalablePageConfig, StackAllocator,
        ThreadLocalConfig,
    };
    pub use hetmem_core::cache::{HetAlloc, PoolAllocator};
    pub use hetmem_core::{
        AllocatorId, AllocatorType, BackendId, Error, FullPtr, MemoryBackend, MemoryManager, OffsetPtr,
        RegionAllocator, Result, ShmPtr, ThreadModel,
    };
    pub use hetmem_thread_models::DefaultThreadModel;
}
