//! [`PoolModel`]: what a correct [`Pool`] must agree with, for testing any pool over any resource.
//!
//! A model holds the live allocations a test has made (address, size, alignment and a tag of the
//! test's own, such as the seed it filled the block with). [`add`](PoolModel::add) refuses an
//! allocation that is misaligned or overlaps a live one; [`agrees_with`](PoolModel::agrees_with)
//! runs the pool's `check()` and compares its statistics and its report of live allocations
//! with the model. The model never touches the memory, so it serves device pools as well.
//! hetmem's own property tests use it for host pools and, on a GPU, for device pools; a user
//! testing a resource or heuristic of their own can drive it the same way.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use core::ptr::NonNull;

use super::Pool;

/// One live allocation of a [`PoolModel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelAllocation {
    /// Where the pool placed it.
    pub ptr: NonNull<u8>,
    /// The size asked for.
    pub size: usize,
    /// The alignment asked for.
    pub align: usize,
    /// The test's own tag (what it wrote into the block, say).
    pub tag: u64,
}

/// Live allocations, by address, and the checks every pool must pass against them.
///
/// [`add`](Self::add) refuses an allocation that is misaligned or overlaps a live one;
/// [`agrees_with`](Self::agrees_with) runs the pool's `check()` and compares its statistics and
/// its report of live allocations with the model. The model never touches the memory, so it
/// serves device pools as well.
#[derive(Debug, Default)]
pub struct PoolModel {
    live: BTreeMap<usize, ModelAllocation>,
}

impl PoolModel {
    /// A model with no live allocation.
    pub fn new() -> Self {
        PoolModel::default()
    }

    /// How many allocations are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no allocation is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The live allocations, by address.
    pub fn iter(&self) -> impl Iterator<Item = &ModelAllocation> {
        self.live.values()
    }

    /// The live allocation at `addr`, if any.
    pub fn get(&self, addr: usize) -> Option<&ModelAllocation> {
        self.live.get(&addr)
    }

    /// Bytes asked for by the live allocations.
    pub fn requested_bytes(&self) -> usize {
        self.live.values().map(|a| a.size).sum()
    }

    /// Records an allocation the pool made; an error says why the pool was wrong to make it
    /// (misaligned, or overlapping a live allocation).
    pub fn add(&mut self, ptr: NonNull<u8>, size: usize, align: usize, tag: u64) -> Result<(), String> {
        let addr = ptr.as_ptr() as usize;
        if !align.is_power_of_two() || addr % align != 0 {
            return Err(format!("allocation at {addr:#x} is not aligned to {align}"));
        }
        let end = addr.checked_add(size).ok_or_else(|| format!("allocation at {addr:#x} of {size} bytes wraps"))?;
        if let Some((&a, before)) = self.live.range(..=addr).next_back() {
            if a + before.size > addr || a == addr {
                return Err(format!("allocation at {addr:#x} overlaps the live allocation at {a:#x}"));
            }
        }
        if let Some((&a, _)) = self.live.range(addr..).next() {
            if end > a {
                return Err(format!("allocation at {addr:#x} of {size} bytes overlaps the live allocation at {a:#x}"));
            }
        }
        self.live.insert(addr, ModelAllocation { ptr, size, align, tag });
        Ok(())
    }

    /// Removes and returns a live allocation, the `pick % len`-th by address (`None` when none is
    /// live), for the test to free.
    pub fn take(&mut self, pick: usize) -> Option<ModelAllocation> {
        let addr = *self.live.keys().nth(pick % self.live.len().max(1))?;
        self.live.remove(&addr)
    }

    /// Frees one live allocation (as [`take`](Self::take) picks it) through `pool`, and checks
    /// that freeing it again is refused.
    pub fn free_one(&mut self, pool: &mut dyn Pool, pick: usize) -> Result<(), String> {
        let Some(a) = self.take(pick) else {
            return Ok(());
        };
        pool.deallocate(a.ptr).map_err(|e| format!("free of {:p}: {e}", a.ptr))?;
        match pool.deallocate(a.ptr) {
            Err(crate::Error::InvalidFree { .. }) => Ok(()),
            other => Err(format!("second free of {:p} answered {other:?}, not InvalidFree", a.ptr)),
        }
    }

    /// Frees every live allocation through `pool`.
    pub fn free_all(&mut self, pool: &mut dyn Pool) -> Result<(), String> {
        while let Some(a) = self.take(0) {
            pool.deallocate(a.ptr).map_err(|e| format!("free of {:p}: {e}", a.ptr))?;
        }
        Ok(())
    }

    /// Runs the pool's `check()` and compares its statistics and live-allocation report with the
    /// model.
    pub fn agrees_with(&self, pool: &dyn Pool) -> Result<(), String> {
        pool.check().map_err(|e| format!("check: {e}"))?;
        let s = pool.stats();
        let requested = self.requested_bytes();
        if s.allocation_count != self.live.len() || s.requested_size != requested {
            return Err(format!(
                "pool reports {} allocations of {} bytes, the model {} of {requested}",
                s.allocation_count,
                s.requested_size,
                self.live.len()
            ));
        }
        if s.current_size < s.requested_size || s.current_size > s.high_watermark {
            return Err(format!(
                "current size {} outside [requested {}, high watermark {}]",
                s.current_size, s.requested_size, s.high_watermark
            ));
        }
        if s.actual_size > s.actual_high_watermark || s.releasable_bytes > s.actual_size {
            return Err(format!(
                "actual size {} above its watermark {}, or releasable {} above it",
                s.actual_size, s.actual_high_watermark, s.releasable_bytes
            ));
        }
        let live = pool.live_allocations();
        if live.len() != self.live.len() {
            return Err(format!("pool lists {} live allocations, the model {}", live.len(), self.live.len()));
        }
        if let Some(a) = live.iter().find(|a| self.live.get(&a.addr).map(|m| m.size) != Some(a.size)) {
            return Err(format!("pool lists a live allocation the model lacks: {a:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: usize) -> NonNull<u8> {
        NonNull::new(core::ptr::without_provenance_mut(addr)).unwrap()
    }

    #[test]
    fn refuses_misaligned_and_overlapping_allocations() {
        let mut m = PoolModel::new();
        m.add(at(0x1000), 0x100, 16, 1).unwrap();
        assert!(m.add(at(0x1008), 8, 16, 2).is_err(), "misaligned");
        assert!(m.add(at(0x10f0), 0x20, 16, 2).is_err(), "overlaps the end of the first");
        assert!(m.add(at(0x0ff0), 0x20, 16, 2).is_err(), "overlaps its start");
        assert!(m.add(at(0x1000), 0, 16, 2).is_err(), "same address");
        m.add(at(0x1100), 0x10, 256, 3).unwrap();
        assert_eq!((m.len(), m.requested_bytes()), (2, 0x110));
        let a = m.take(1).unwrap();
        assert_eq!((a.ptr, a.size, a.tag), (at(0x1100), 0x10, 3));
        assert!(m.take(7).is_some() && m.take(0).is_none() && m.is_empty());
    }
}
