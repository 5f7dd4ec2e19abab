//! Process-private caching tiers: small allocations that repeat are served from memory kept
//! near the thread instead of from the system allocator.
//!
//! - [`ThreadCache`]: per-thread power-of-two buckets, each with a byte limit ([`CacheConfig`],
//!   per [`ThreadRole`] or per thread); over the limit, memory goes to a shared [`Depot`] of
//!   batches, then upstream ([`Upstream`]: the system allocator, the global allocator, or any
//!   [`MemoryResource`](crate::MemoryResource)). A thread's caches return their memory when it
//!   exits.
//! - [`HetAlloc`]: those caches as a `GlobalAlloc` (`#[global_allocator]`) and an
//!   `allocator_api2` allocator.
//! - [`PoolAllocator<T>`]: a private cache for one layout with a set limit.
//! - [`frame`]: recycled frames for async tasks.
//!
//! Every tier reports [`CacheStats`]: hits, misses, bytes cached, bytes returned upstream.

mod config;
mod depot;
pub mod frame;
mod het_alloc;
mod os;
mod pool;
mod size_class;
mod stats;
mod thread_cache;
mod tls;
#[cfg(unix)]
pub(crate) use tls::fork as fork_handlers;
mod upstream;

pub use config::{configure_role, env_error, role_config, CacheConfig, ThreadRole};
pub use depot::Depot;
pub use het_alloc::HetAlloc;
pub use pool::PoolAllocator;
pub use size_class::{block_size, class_of, upstream_layout, BLOCK_ALIGN, MAX_BLOCK, MAX_BUCKETS};
pub use stats::CacheStats;
pub use thread_cache::ThreadCache;
pub use tls::{flush_thread, set_thread_config, set_thread_role, thread_config, thread_role};
pub use upstream::Upstream;

/// The `allocator_api2` crate this module's allocators implement, for naming `Vec<T, A>` and
/// `Box<T, A>` without a second dependency.
pub use allocator_api2;

/// Threads whose caches are live (started and not yet exited).
pub fn live_threads() -> usize {
    tls::live_threads()
}
