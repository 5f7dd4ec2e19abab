//! Alignment on top of driver allocators that only promise their own.
//!
//! `cuMemAlloc`, `cuMemHostAlloc` and `hipMalloc` take no alignment. A request whose alignment the
//! driver's result happens to meet is returned as is; otherwise the block is allocated again with
//! room to align, and the aligned address is remembered with the driver's base, so that
//! `deallocate` (which gets the aligned address back) frees the right one. Device memory cannot
//! hold a hidden header, so the record lives here, in host memory. Requests at or below the
//! alignment the driver promises are never moved (so their frees skip the record), and a result
//! that breaks that promise is refused.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Mutex;

use hetmem_core::{check_layout, fork, Error, Result};

/// `addr`, an address a driver call (`call`) answered with success, unless it is 0: that is no
/// memory anyone can use or free (a driver bug), so it is [`Error::Gpu`] with code 0, and nothing
/// is recorded for it.
pub(crate) fn driver_address(call: &'static str, addr: u64) -> Result<u64> {
    if addr == 0 {
        return Err(address_0(call));
    }
    Ok(addr)
}

fn address_0(call: &'static str) -> Error {
    Error::Gpu { call, code: 0, name: "success with address 0" }
}

/// Blocks handed out at an address other than the driver's base.
#[derive(Debug)]
pub(crate) struct AlignedBlocks {
    moved: Mutex<HashMap<u64, u64>>,
    /// The alignment the driver promises every allocation: no block asked with at most this
    /// alignment is moved, so freeing one does not look in the table.
    guaranteed: usize,
    /// The fork generation ([`fork`]) the table was made in: a forked child's copy is its
    /// parent's, and its lock may have been held by a parent's thread at the fork.
    generation: u64,
}

impl AlignedBlocks {
    /// An empty table for a driver whose allocations are all aligned to `guaranteed`.
    pub(crate) fn new(guaranteed: usize) -> Self {
        // Forks are counted from here on (the platform's start-up has registered this already);
        // if the system refused, the generation stays 0 and the table is always used.
        let _ = fork::watch();
        AlignedBlocks { moved: Mutex::default(), guaranteed, generation: fork::generation() }
    }

    /// The fork generation the table was made in.
    #[cfg_attr(not(hetmem_cuda), allow(dead_code))] // CUDA's resources only
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Allocates `size` bytes aligned to `align` with `alloc` (which returns a driver address or
    /// an error), freeing with `free` whatever is not handed out. `call` names the driver call in
    /// the error for an address 0 (see [`driver_address`]), which is neither freed nor recorded,
    /// and for an address that breaks the driver's promised alignment or has no aligned address
    /// below the top of memory.
    pub(crate) fn allocate(
        &self,
        size: usize,
        align: usize,
        call: &'static str,
        mut alloc: impl FnMut(usize) -> Result<u64>,
        mut free: impl FnMut(u64),
    ) -> Result<NonNull<u8>> {
        check_layout(size, align)?;
        let first = alloc(size)?;
        if first % align as u64 == 0 {
            return block_at(call, first); // address 0 too: no block, nothing to free
        }
        free(first);
        if align <= self.guaranteed {
            // The driver broke its promise. A block moved now would be freed at its aligned
            // address, as `deallocate` does not look such blocks up.
            return Err(Error::Gpu { call, code: 0, name: "success with an address below the promised alignment" });
        }
        let padded = size
            .checked_add(align - 1)
            .ok_or(Error::InvalidSize { size: size as u64, reason: "size overflows when aligned" })?;
        let base = block_at(call, alloc(padded)?)?.as_ptr() as u64;
        // The driver's block of `padded` bytes at `base` (not 0) holds the next multiple of
        // `align`, which is not 0 either, unless the driver's address is so high that it wraps
        // (a driver bug): then the block is given back, not moved to address 0.
        let Some(aligned) = base.checked_next_multiple_of(align as u64).and_then(|a| NonNull::new(a as *mut u8)) else {
            free(base);
            return Err(Error::Gpu { call, code: 0, name: "success with an address at the top of memory" });
        };
        self.lock().insert(aligned.as_ptr() as u64, base);
        Ok(aligned)
    }

    /// Frees the block handed out at `addr` with alignment `align`: forgets its record, then,
    /// if `bind` (which makes the driver's context current for `free`) succeeds, calls `free`
    /// with the driver address. At or below the promised alignment no block was moved, and the
    /// table is not consulted.
    ///
    /// The record goes whether or not the driver can be reached: the block is not used again, and
    /// a record left behind would send a later block handed out unmoved at the same address (the
    /// driver may reuse it once the context's memory is gone) to the wrong base when it is freed.
    /// In a forked child (which cannot reach the parent's driver) the table is left alone.
    pub(crate) fn deallocate<G>(
        &self,
        addr: u64,
        align: usize,
        bind: impl FnOnce() -> Result<G>,
        free: impl FnOnce(u64),
    ) {
        let base = self.base_of(addr, align);
        if let Ok(_bound) = bind() {
            free(base);
        }
    }

    fn base_of(&self, addr: u64, align: usize) -> u64 {
        if align <= self.guaranteed {
            return addr;
        }
        if fork::generation() != self.generation {
            // A forked child dropping its copy of the parent's blocks: the platform refuses it
            // (`bind` fails), so no base is needed, and the table's lock is not taken: a thread
            // of the parent that held it at the fork does not run here to give it back.
            return addr;
        }
        self.lock().remove(&addr).unwrap_or(addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        // The table stays consistent even if a holder panicked: each operation is one insert or
        // remove.
        self.moved.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The block at address `addr`, which driver call `call` answered with success: an error if it is
/// 0 (see [`driver_address`]).
fn block_at(call: &'static str, addr: u64) -> Result<NonNull<u8>> {
    NonNull::new(addr as *mut u8).ok_or(address_0(call))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fork_once::in_child;
    use std::cell::RefCell;

    /// A fake driver that hands out addresses aligned to 256 only, and records frees.
    struct Fake {
        next: RefCell<u64>,
        live: RefCell<Vec<(u64, usize)>>,
    }

    impl Fake {
        fn new() -> Self {
            Fake { next: RefCell::new(0x1_0000_0100), live: RefCell::new(Vec::new()) }
        }
        fn alloc(&self, size: usize) -> Result<u64> {
            let at = *self.next.borrow();
            *self.next.borrow_mut() = (at + size as u64).next_multiple_of(256) + 256;
            self.live.borrow_mut().push((at, size));
            Ok(at)
        }
        fn free(&self, at: u64) {
            let mut live = self.live.borrow_mut();
            let i = live.iter().position(|&(a, _)| a == at).expect("freeing a block the fake never gave");
            live.remove(i);
        }
    }

    #[test]
    fn blocks_meet_their_alignment_and_free_their_driver_base() {
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        for align in [1usize, 8, 256, 4096, 1 << 20] {
            let a = blocks.allocate(1000, align, "fake", |s| fake.alloc(s), |p| fake.free(p)).unwrap().as_ptr() as u64;
            assert_eq!(a % align as u64, 0, "align {align}");
            let (base, size) = *fake.live.borrow().last().unwrap();
            assert!(a >= base && a + 1000 <= base + size as u64, "the block lies inside the driver's");
            blocks.deallocate(a, align, || Ok(()), |p| fake.free(p));
        }
        assert!(fake.live.borrow().is_empty(), "every driver block was freed once");
        assert!(blocks.lock().is_empty());
    }

    /// A block whose free cannot reach the driver (its context cannot be made current) is still
    /// forgotten: a later block handed out unmoved at the same address is freed there, not at the
    /// first block's base.
    #[test]
    fn a_free_that_cannot_bind_still_forgets_the_block() {
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        let a = blocks.allocate(1000, 4096, "fake", |s| fake.alloc(s), |p| fake.free(p)).unwrap().as_ptr() as u64;
        let (base, _) = *fake.live.borrow().last().unwrap();
        assert_ne!(a, base, "the fake's addresses are not 4096-aligned, so the block moved");
        let unreachable = || Err::<(), _>(Error::Unsupported("the context is gone"));
        blocks.deallocate(a, 4096, unreachable, |_| panic!("freed without a context"));
        assert!(blocks.lock().is_empty(), "the record of a block freed without a context is gone");
        let mut freed = Vec::new();
        blocks.deallocate(a, 4096, || Ok(()), |p| freed.push(p));
        assert_eq!(freed, [a], "a block at the same address handed out unmoved is freed at that address");
    }

    /// A forked child dropping its copies of the parent's moved blocks (a pool over a device
    /// resource, dropped there) must not wait on the table's lock, which a thread of the parent
    /// allocating or freeing at the fork holds for ever in the child.
    #[test]
    fn a_forked_child_frees_without_waiting_on_the_parents_lock() {
        hetmem_core::fork::watch().unwrap();
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        let a = blocks.allocate(1000, 4096, "fake", |s| fake.alloc(s), |p| fake.free(p)).unwrap().as_ptr() as u64;
        // Held across the fork, as a thread of the parent in `allocate` or `deallocate` holds it.
        let held = blocks.lock();
        let child = in_child(|| {
            let refused = || Err::<(), _>(Error::Unsupported("forked"));
            blocks.deallocate(a, 4096, refused, |_| {});
            true
        });
        assert_eq!(child, Some(true), "the child waited on a lock its parent's thread held at the fork");
        drop(held);
        blocks.deallocate(a, 4096, || Ok(()), |p| fake.free(p));
        assert!(fake.live.borrow().is_empty(), "the parent still frees its block at the driver's base");
    }

    /// A driver that answers success with address 0 gave no block: the allocation is an error,
    /// nothing is recorded for address 0 (a later block there would be freed at the wrong base),
    /// and the block allocated before it is freed.
    #[test]
    fn an_address_0_from_the_driver_is_an_error_and_recorded_nowhere() {
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        let address_0 = |r: Result<NonNull<u8>>| matches!(r, Err(Error::Gpu { call: "fake", code: 0, .. }));
        assert!(address_0(blocks.allocate(1000, 256, "fake", |_| Ok(0), |_| panic!("freed address 0"))));
        // The first block is misaligned for 4096 and given back; the padded one comes at 0.
        let mut calls = 0;
        let second_at_0 = |s| {
            calls += 1;
            if calls == 2 {
                Ok(0)
            } else {
                fake.alloc(s)
            }
        };
        assert!(address_0(blocks.allocate(1000, 4096, "fake", second_at_0, |p| fake.free(p))));
        assert!(blocks.lock().is_empty(), "a block at address 0 was recorded");
        assert!(fake.live.borrow().is_empty(), "the first block was not given back");
    }

    /// A block at or below the alignment the driver promises is never looked up when it is freed,
    /// so one the driver hands out misaligned for it (a broken promise) must not be moved: moved,
    /// it would be freed at its aligned address, which the driver never gave, and its base kept.
    #[test]
    fn a_block_misaligned_for_the_drivers_promise_is_refused() {
        // The fake hands out addresses aligned to 256 only, below the 4096 promised here.
        let blocks = AlignedBlocks::new(4096);
        let fake = Fake::new();
        let r = blocks.allocate(1000, 1024, "fake", |s| fake.alloc(s), |p| fake.free(p));
        if let Ok(block) = r {
            blocks.deallocate(block.as_ptr() as u64, 1024, || Ok(()), |p| fake.free(p));
        }
        assert!(matches!(r, Err(Error::Gpu { call: "fake", code: 0, .. })), "{r:?}");
        assert!(fake.live.borrow().is_empty(), "the misaligned block was not given back");
        assert!(blocks.lock().is_empty());
    }

    /// A driver block whose address is within the alignment of the top of memory (a driver bug)
    /// has no aligned address in it: working one out overflowed (a panic in a debug build; the
    /// address wrapped to 0 in a release build, an error that left the block allocated). It is
    /// now an error, and the block is given back.
    #[test]
    fn a_driver_block_at_the_top_of_memory_is_an_error_and_given_back() {
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        let mut calls = 0;
        let second_at_the_top = |s| {
            calls += 1;
            if calls == 2 {
                fake.live.borrow_mut().push((u64::MAX - 255, s));
                Ok(u64::MAX - 255)
            } else {
                fake.alloc(s)
            }
        };
        let r = blocks.allocate(1000, 4096, "fake", second_at_the_top, |p| fake.free(p));
        assert!(matches!(r, Err(Error::Gpu { call: "fake", code: 0, .. })), "{r:?}");
        assert!(blocks.lock().is_empty(), "a block was recorded");
        assert!(fake.live.borrow().is_empty(), "a block was not given back");
    }

    #[test]
    fn bad_layouts_and_driver_errors_come_back() {
        let blocks = AlignedBlocks::new(256);
        let fake = Fake::new();
        let fail = |_| Err(Error::OutOfMemory { requested: 1, available: 0 });
        assert!(matches!(blocks.allocate(0, 8, "fake", |s| fake.alloc(s), |_| {}), Err(Error::InvalidSize { .. })));
        assert!(matches!(
            blocks.allocate(8, 3, "fake", |s| fake.alloc(s), |_| {}),
            Err(Error::InvalidAlignment { .. })
        ));
        assert!(matches!(blocks.allocate(8, 8, "fake", fail, |_| {}), Err(Error::OutOfMemory { .. })));
        assert!(fake.live.borrow().is_empty());
    }
}
