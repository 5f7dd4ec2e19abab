//! A thread whose first `HetAlloc` request comes in the last round of its thread-local
//! destructors still returns its caches and leaves the list of live threads. On Windows std
//! destroys thread-locals in at most five rounds (a value set during one destroyed in the next),
//! so the exit guard that request registers never ran there; elsewhere the chain below just runs
//! through, and the request comes from a destructor as any other.
//!
//! One test in its own binary, so the counts of live thread caches are its own, and the
//! thread-locals below (and the caches' exit guard) are first used by the test's thread.
#![cfg(not(loom))]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::RefCell;

use hetmem_core::cache::{self, HetAlloc};

static A: HetAlloc = HetAlloc::new();

/// Its destructor sets the next thread-local of the chain, or, the fifth, makes the thread's
/// first request.
struct Link(usize);

thread_local! {
    static L0: RefCell<Option<Link>> = const { RefCell::new(None) };
    static L1: RefCell<Option<Link>> = const { RefCell::new(None) };
    static L2: RefCell<Option<Link>> = const { RefCell::new(None) };
    static L3: RefCell<Option<Link>> = const { RefCell::new(None) };
    static L4: RefCell<Option<Link>> = const { RefCell::new(None) };
}

impl Drop for Link {
    fn drop(&mut self) {
        // Each link is a thread-local not used before, so its value is destroyed after this one
        // (in the next round on Windows).
        let next = match self.0 {
            0 => &L1,
            1 => &L2,
            2 => &L3,
            3 => &L4,
            _ => {
                let l = Layout::from_size_align(48, 8).unwrap();
                // SAFETY: a non-zero layout; the block is freed once, with it.
                unsafe {
                    let p = A.alloc(l);
                    assert!(!p.is_null());
                    A.dealloc(p, l);
                }
                return;
            }
        };
        let _ = next.try_with(|n| *n.borrow_mut() = Some(Link(self.0 + 1)));
    }
}

#[test]
fn a_first_request_in_the_last_round_of_destructors_leaves_no_thread_listed() {
    let before = cache::live_threads();
    let requests = A.stats().hits + A.stats().misses;
    std::thread::spawn(|| L0.with(|l| *l.borrow_mut() = Some(Link(0)))).join().unwrap();
    let s = A.stats();
    assert_eq!(s.hits + s.misses, requests + 1, "the last link made its request: {s:?}");
    assert_eq!(cache::live_threads(), before, "the thread that started a cache has left the list");
}
