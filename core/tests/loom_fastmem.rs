//! Loom models of fastmem's lock-free free stack: every interleaving of the schedules below must
//! hand each block to one owner at a time and lose none. The ABA schedule (a pop overtaken by
//! pop, pop, push of the same block) fails if the head's tag is taken away.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --release --test loom_fastmem`
#![cfg(all(loom, not(feature = "critical-section")))]

use hetmem_core::fastmem::loom_api::{pop, push};
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use loom::sync::Arc;

/// A free stack of `blocks` blocks named 1..=blocks, with a flag per block that catches a block
/// handed out twice.
struct Stack {
    head: AtomicUsize,
    links: Vec<AtomicU32>,
    held: Vec<AtomicBool>,
}

impl Stack {
    fn new(blocks: usize) -> Arc<Self> {
        let s = Stack {
            head: AtomicUsize::new(0),
            links: (0..=blocks).map(|_| AtomicU32::new(0)).collect(),
            held: (0..=blocks).map(|_| AtomicBool::new(false)).collect(),
        };
        for link in 1..=blocks {
            push(&s.head, link, &s.links[link]);
        }
        Arc::new(s)
    }

    fn pop(&self) -> Option<usize> {
        let link = pop(&self.head, |l| &self.links[l])?;
        assert!(!self.held[link].swap(true, Ordering::Relaxed), "block {link} handed out twice");
        Some(link)
    }

    fn push(&self, link: usize) {
        self.held[link].store(false, Ordering::Relaxed);
        push(&self.head, link, &self.links[link]);
    }

    fn drain(&self) -> Vec<usize> {
        let mut out: Vec<usize> = std::iter::from_fn(|| self.pop()).collect();
        out.sort_unstable();
        out
    }
}

#[test]
fn pop_racing_pop_pop_push_never_hands_a_block_out_twice() {
    loom::model(|| {
        let s = Stack::new(3);
        let t = {
            let s = s.clone();
            loom::thread::spawn(move || {
                if let Some(a) = s.pop() {
                    s.push(a);
                }
            })
        };
        let x = s.pop().unwrap();
        let y = s.pop().unwrap();
        s.push(x);
        t.join().unwrap();
        s.push(y);
        assert_eq!(s.drain(), [1, 2, 3]);
    });
}

#[test]
fn concurrent_pushes_lose_no_block() {
    loom::model(|| {
        let s = Stack::new(2);
        let a = s.pop().unwrap();
        let b = s.pop().unwrap();
        let t = {
            let s = s.clone();
            loom::thread::spawn(move || s.push(a))
        };
        s.push(b);
        t.join().unwrap();
        assert_eq!(s.drain(), [1, 2]);
    });
}

#[test]
fn concurrent_pops_split_the_blocks() {
    loom::model(|| {
        let s = Stack::new(2);
        let t = {
            let s = s.clone();
            loom::thread::spawn(move || s.pop())
        };
        let mine = s.pop();
        let theirs = t.join().unwrap();
        let mut got = [mine.unwrap(), theirs.unwrap()];
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        assert_eq!(s.pop(), None);
    });
}
