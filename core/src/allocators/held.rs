//! The slots threads hold through one allocator handle (process memory), so that the handle's
//! drop gives back those of threads that outlive it (a pool's): their exit would give them back,
//! but a handle that is gone no longer hears of it (its TLS key is deleted), and the slots, with
//! what their caches hold, would stay taken for as long as the process runs.
//!
//! Each slot is given back once, by whichever comes first: its thread (at exit, or asked to) or
//! the handle's drop. The list is lock-free, so a fork never leaves it locked in the child: a
//! lock held by a thread the child does not have would stop every later attach there.

use core::ptr;

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A thread holds the slot.
const HELD: u32 = 0;
/// Given back: the node is free for another thread's slot.
const GIVEN: u32 = 1;
/// Being filled in for another thread's slot.
const FILLING: u32 = 2;

/// One thread's slot on the list.
pub(crate) struct HeldSlot {
    slot: AtomicU64,
    /// The fork generation it was taken in: in a forked child, the slot is the parent's.
    generation: AtomicU64,
    state: AtomicU32,
    /// The next node; set before the node is published, never changed after.
    next: *mut HeldSlot,
}

impl HeldSlot {
    /// Claims the slot for giving back: true for the first caller only.
    pub(crate) fn take(&self) -> bool {
        self.state.compare_exchange(HELD, GIVEN, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// A lock-free list of [`HeldSlot`]s; nodes are reused once given back, and freed with the list.
pub(crate) struct HeldSlots {
    head: core::sync::atomic::AtomicPtr<HeldSlot>,
}

// SAFETY: the nodes are reached only through atomics, and freed only by `drop` (`&mut self`).
unsafe impl Send for HeldSlots {}
// SAFETY: as above.
unsafe impl Sync for HeldSlots {}

impl HeldSlots {
    /// An empty list.
    pub(crate) const fn new() -> Self {
        HeldSlots { head: core::sync::atomic::AtomicPtr::new(ptr::null_mut()) }
    }

    fn nodes(&self) -> impl Iterator<Item = &HeldSlot> {
        let mut at = self.head.load(Ordering::Acquire);
        core::iter::from_fn(move || {
            // SAFETY: nodes are leaked boxes, published by a Release CAS and freed only by `drop`.
            let node = unsafe { at.as_ref() }?;
            at = node.next;
            Some(node)
        })
    }

    /// Records that the calling thread holds `slot`, taken in fork generation `generation`;
    /// the node lives as long as the list.
    pub(crate) fn note(&self, slot: u64, generation: u64) -> &HeldSlot {
        for node in self.nodes() {
            if node.state.compare_exchange(GIVEN, FILLING, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                node.slot.store(slot, Ordering::Relaxed);
                node.generation.store(generation, Ordering::Relaxed);
                node.state.store(HELD, Ordering::Release);
                return node;
            }
        }
        let node = Box::into_raw(Box::new(HeldSlot {
            slot: AtomicU64::new(slot),
            generation: AtomicU64::new(generation),
            state: AtomicU32::new(HELD),
            next: ptr::null_mut(),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the node is ours until the CAS publishes it.
            unsafe { (*node).next = head };
            match self.head.compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed) {
                // SAFETY: published, it lives until the list is dropped.
                Ok(_) => return unsafe { &*node },
                Err(seen) => head = seen,
            }
        }
    }

    /// Takes every slot of fork generation `generation` that is still held, for the handle's
    /// drop to give back. Not while a [`note`](Self::note) may run (the handle's drop: no thread
    /// can reach the handle to attach then): a node taken here and reused at once by `note`
    /// would have its new slot read instead of the one taken. Threads may give theirs back
    /// ([`HeldSlot::take`]) meanwhile: each slot is taken once.
    pub(crate) fn take_all(&self, generation: u64) -> Vec<u64> {
        self.nodes()
            .filter(|n| n.state.load(Ordering::Acquire) == HELD && n.generation.load(Ordering::Relaxed) == generation)
            .filter(|n| n.take())
            .map(|n| n.slot.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for HeldSlots {
    fn drop(&mut self) {
        let mut at = *self.head.get_mut();
        while !at.is_null() {
            // SAFETY: every node is a leaked box on this list alone, and `&mut self` means no
            // one else reaches it now.
            let node = unsafe { Box::from_raw(at) };
            at = node.next;
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn each_slot_is_taken_once_and_nodes_are_reused() {
        let list = HeldSlots::new();
        let a = list.note(64, 1) as *const HeldSlot;
        let b = list.note(128, 1) as *const HeldSlot;
        let parents = list.note(192, 0);
        // SAFETY: nodes live as long as the list.
        assert!(unsafe { &*a }.take(), "its thread gives the slot back first");
        assert_eq!(list.take_all(1), [128], "the drop takes what is still held, of this generation");
        // SAFETY: as above.
        assert!(!unsafe { &*b }.take(), "a slot the drop took is not given back twice");
        assert!(parents.take(), "a parent's slot is left alone");
        list.note(256, 1);
        assert_eq!(list.nodes().count(), 3, "a node given back serves again");
    }
}
