//! Statistics every caching tier keeps: [`CacheStats`].

/// What a caching tier did: how often it served a request from cached memory, how often it had
/// to pass one on, and how much memory it holds and has given back.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CacheStats {
    /// Requests served from memory the tier held.
    pub hits: u64,
    /// Requests the tier could not serve itself (passed on to the next tier or the upstream).
    pub misses: u64,
    /// Bytes the tier holds now, ready for reuse.
    pub bytes_cached: u64,
    /// Bytes the tier has handed back to the upstream (over a limit, on trim, at thread exit).
    pub bytes_returned: u64,
    /// Blocks the tier (or requests passing through it) asked of the upstream, refused requests
    /// (out of memory) included.
    pub upstream_allocations: u64,
}

impl CacheStats {
    /// The share of requests served from cached memory (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// Field-wise sum.
    pub fn add(&mut self, other: &CacheStats) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.bytes_cached += other.bytes_cached;
        self.bytes_returned += other.bytes_returned;
        self.upstream_allocations += other.upstream_allocations;
    }
}

/// Counters that one thread writes and any thread may read.
///
/// Owner-only updates use a plain load and store (no read-modify-write), which costs what a
/// non-atomic increment costs; [`Counters::add_shared`] is for counters several threads update.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) bytes_returned: Counter,
    pub(crate) upstream_allocations: Counter,
}

impl Counters {
    pub(crate) const fn new() -> Self {
        Counters {
            hits: Counter::new(),
            misses: Counter::new(),
            bytes_returned: Counter::new(),
            upstream_allocations: Counter::new(),
        }
    }

    /// A snapshot, with `bytes_cached` filled in by the caller.
    pub(crate) fn snapshot(&self, bytes_cached: u64) -> CacheStats {
        CacheStats {
            hits: self.hits.get(),
            misses: self.misses.get(),
            bytes_cached,
            bytes_returned: self.bytes_returned.get(),
            upstream_allocations: self.upstream_allocations.get(),
        }
    }

    /// Adds a snapshot's counts into counters several threads share.
    pub(crate) fn add_shared(&self, s: &CacheStats) {
        self.hits.add_shared(s.hits);
        self.misses.add_shared(s.misses);
        self.bytes_returned.add_shared(s.bytes_returned);
        self.upstream_allocations.add_shared(s.upstream_allocations);
    }

    /// Zeroes the counters (owner only).
    pub(crate) fn reset(&self) {
        for c in [&self.hits, &self.misses, &self.bytes_returned, &self.upstream_allocations] {
            c.0.store(0, Ordering::Relaxed);
        }
    }
}

use core::sync::atomic::{AtomicU64, Ordering};

/// One counter.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds `n`; only the owning thread may call this.
    #[inline(always)]
    pub(crate) fn add_owned(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Adds `n` from any thread.
    #[inline]
    pub(crate) fn add_shared(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
