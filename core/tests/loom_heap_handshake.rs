//! loom models of the two hand-shakes by which a thread-local heap that its thread lets go is
//! never left with work no one will do (core/src/allocators/thread_local/heap.rs and
//! recovery.rs):
//!
//! - a remote free (`Shared::free_remote`: push on the owner's remote list, `SeqCst` fence, read
//!   the owner word, drain the heap if it is let go) racing with the owner letting its heap go
//!   (`Shared::release_heap`: collect, store 0 in the owner word, `SeqCst` fence, look for
//!   remote frees again);
//! - a repairer posting a dead freer's heap to the orphan slot of the block's owner
//!   (`Shared::hand_over_in_flight`, then `Shared::nudge`) racing with that owner letting its
//!   heap go, whose collection settles the orphan (`Shared::settle_orphan`).
//!
//! Each side stores, then loads what the other stores: the `SeqCst` fences on both sides make
//! at least one of them see the other. The models use the allocator's own remote list
//! (`TaggedOffsetList`) and the same orderings as the code, step for step; a model without the
//! fences must fail (it is the store-buffer pattern), which shows loom explores the reordering.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --test loom_heap_handshake --release`.
#![cfg(loom)]

use hetmem_core::sync::atomic::{fence, AtomicU64, Ordering};
use hetmem_core::sync::tagged_list::{decode, encode, walk};
use hetmem_core::sync::{LinkStore, TaggedOffsetList};
use hetmem_core::Result;
use loom::sync::Arc;

/// The owner word of a heap under repair that waits for the owner of a block to settle it.
const AWAITING_OWNER: u64 = u64::MAX;
/// The freer identity an orphan slot names (the dead freer's heap).
const FREER: u64 = 0x100;

/// Block links in loom atomics: the block at offset `o` uses slot `o / 16`.
struct Links(Vec<AtomicU64>);

impl LinkStore for Links {
    fn load_link(&self, offset: u64) -> Result<Option<u64>> {
        Ok(decode(self.0[(offset / 16) as usize].load(Ordering::Relaxed)))
    }
    fn store_link(&self, offset: u64, next: Option<u64>) {
        self.0[(offset / 16) as usize].store(encode(next), Ordering::Relaxed);
    }
}

/// One heap as the hand-shakes see it: its owner word, its remote list for one class, its orphan
/// slot for that class, and what its collections took.
struct Heap {
    owner: AtomicU64,
    remote: TaggedOffsetList,
    links: Links,
    orphan: AtomicU64,
    /// The owner word of the dead freer's heap the orphan slot may name.
    freer_owner: AtomicU64,
    collected: AtomicU64,
    settled: AtomicU64,
    /// Whether the hand-shakes keep their `SeqCst` fences (false: the broken variant).
    fenced: bool,
}

impl Heap {
    fn new(owner: u64, freer_owner: u64, fenced: bool) -> Self {
        Heap {
            owner: AtomicU64::new(owner),
            remote: TaggedOffsetList::new(),
            links: Links((0..4).map(|_| AtomicU64::new(0)).collect()),
            orphan: AtomicU64::new(0),
            freer_owner: AtomicU64::new(freer_owner),
            collected: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            fenced,
        }
    }

    fn fence(&self) {
        if self.fenced {
            fence(Ordering::SeqCst);
        }
    }

    /// `awaits_collection`: remote frees to collect, or an orphan slot naming a heap that
    /// awaits its owner.
    fn awaits_collection(&self) -> bool {
        !self.remote.is_empty()
            || (self.orphan.load(Ordering::Acquire) != 0 && self.freer_owner.load(Ordering::Acquire) == AWAITING_OWNER)
    }

    /// `collect`: takes the remote list, then settles an orphan the slot names.
    fn collect(&self, token: u64) {
        let taken = walk(&self.links, self.remote.take_all(), 8, |_| Ok(())).expect("remote chain");
        self.collected.fetch_add(taken, Ordering::Relaxed);
        let freer = self.orphan.load(Ordering::Acquire);
        if freer != 0 {
            self.settle_orphan(freer, token);
        }
    }

    /// `settle_orphan`: holds the freer's heap, settles its block if the slot still names it,
    /// clears the slot, lets the freer's heap go, and looks for what arrived meanwhile.
    fn settle_orphan(&self, freer: u64, token: u64) {
        if self.freer_owner.compare_exchange(AWAITING_OWNER, token, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return;
        }
        if self.orphan.load(Ordering::Acquire) == freer {
            self.settled.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.orphan.compare_exchange(freer, 0, Ordering::AcqRel, Ordering::Relaxed);
        self.freer_owner.store(0, Ordering::Release);
        self.fence();
    }

    /// `release_heap`: collect, let go, and take the heap back while work arrived meanwhile.
    fn release_heap(&self, token: u64) {
        loop {
            self.collect(token);
            self.owner.store(0, Ordering::Release);
            self.fence();
            let pending = self.awaits_collection();
            if !pending || self.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_err() {
                return;
            }
        }
    }

    /// `drain`: collects a heap no thread owns, unless someone else does.
    fn drain(&self, token: u64) {
        if self.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            self.release_heap(token);
        }
    }

    /// `free_remote`, from the push on: push, then read the owner word; drain a heap let go.
    fn free_remote(&self, block: u64, token: u64) {
        self.remote.push(&self.links, block);
        self.fence();
        if self.owner.load(Ordering::Acquire) == 0 {
            self.drain(token);
        }
    }

    /// `hand_over_in_flight` then `nudge`: post the freer's heap, mark it awaiting its owner,
    /// then read the owner word; drain a heap let go.
    fn post_orphan(&self, token: u64) {
        self.orphan.compare_exchange(0, FREER, Ordering::AcqRel, Ordering::Acquire).expect("the slot was free");
        self.freer_owner.store(AWAITING_OWNER, Ordering::Release);
        self.fence();
        if self.owner.load(Ordering::Acquire) == 0 {
            self.drain(token);
        }
    }
}

/// Every interleaving of the owner (token 1) letting a heap go with `other` acting on it on this
/// thread (the heap built with the orphan's heap held as `freer_owner`); `then` checks the end.
fn race_release(fenced: bool, freer_owner: u64, other: fn(&Heap), then: fn(&Heap)) {
    loom::model(move || {
        let heap = Arc::new(Heap::new(1, freer_owner, fenced));
        let owner = {
            let heap = heap.clone();
            loom::thread::spawn(move || heap.release_heap(1))
        };
        other(&heap);
        owner.join().unwrap();
        then(&heap);
        assert_eq!(heap.owner.load(Ordering::Relaxed), 0, "the heap is let go");
    });
}

/// Another thread (token 2) frees one of the heap's blocks: afterwards the block has been
/// collected once, and the list is empty. (A third thread makes the model too large to explore
/// exhaustively.)
fn remote_free_against_release(fenced: bool) {
    race_release(
        fenced,
        0,
        |heap| heap.free_remote(16, 2),
        |heap| {
            assert_eq!(heap.collected.load(Ordering::Relaxed), 1, "the remote free was not collected");
            assert!(heap.remote.is_empty());
        },
    );
}

/// A repairer (token 2, holding the dead freer's heap as token 3) posts that heap to the
/// owner's orphan slot: afterwards the orphan has been settled once, the slot is clear and the
/// freer's heap is let go.
fn orphan_post_against_release(fenced: bool) {
    race_release(
        fenced,
        3,
        |heap| heap.post_orphan(2),
        |heap| {
            assert_eq!(heap.settled.load(Ordering::Relaxed), 1, "the posted orphan was not settled");
            assert_eq!(heap.orphan.load(Ordering::Relaxed), 0);
            assert_eq!(heap.freer_owner.load(Ordering::Relaxed), 0);
        },
    );
}

#[test]
fn a_remote_free_racing_a_release_is_always_collected() {
    remote_free_against_release(true);
}

#[test]
#[should_panic(expected = "the remote free was not collected")]
fn without_the_fences_a_remote_free_can_be_left_behind() {
    remote_free_against_release(false);
}

#[test]
fn an_orphan_posted_while_its_owner_lets_go_is_always_settled() {
    orphan_post_against_release(true);
}

#[test]
#[should_panic(expected = "the posted orphan was not settled")]
fn without_the_fences_a_posted_orphan_can_be_left_behind() {
    orphan_post_against_release(false);
}
