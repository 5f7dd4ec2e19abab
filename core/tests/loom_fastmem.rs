//! Loom models of fastmem's lock-free free stack: every interleaving of the schedules below must
//! hand each block to one owner at a time and lose none. The ABA schedule (a pop overtaken by
//! pop, pop, push of the same block) fails if the head's tag is taken away.
//! Bumps of the store's untouched part racing on its cursor get disjoint ranges.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --release --test loom_fastmem`
#![cfg(all(loom, not(feature = "critical-section")))]

use hetmem_core::fastmem::loom_api::{claim, pop, push};
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

/// Two threads bump blocks of 8 and 16 bytes off one cursor of a 40-byte store that lies 8 bytes
/// past a 16-byte boundary (so a 16-byte block may need padding): in every interleaving the
/// ranges claimed are aligned to their size, inside the store and disjoint; the requests that
/// find no room are refused; and the cursor ends at the end of the last range claimed.
#[test]
fn racing_bumps_claim_disjoint_ranges() {
    const ADDR: usize = 0x1008;
    const N: usize = 40;
    loom::model(|| {
        let cursor = Arc::new(AtomicUsize::new(0));
        let bump = |c: &AtomicUsize, size: usize| claim(c, ADDR, 0, N, size).ok().map(|start| (start, size));
        let t = {
            let cursor = cursor.clone();
            loom::thread::spawn(move || [bump(&cursor, 16), bump(&cursor, 8)])
        };
        let mine = [bump(&cursor, 8), bump(&cursor, 16)];
        let theirs = t.join().unwrap();
        let mut ranges: Vec<(usize, usize)> = mine.iter().chain(&theirs).flatten().copied().collect();
        assert!(ranges.len() < 4, "48 bytes and more claimed from a 40-byte store");
        for &(start, size) in &ranges {
            assert_eq!((ADDR + start) % size, 0, "a block of {size} bytes at {start} is misaligned");
            assert!(start + size <= N, "a block past the store's end");
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "two blocks overlap: {ranges:?}");
        }
        let end = ranges.iter().map(|&(start, size)| start + size).max().unwrap_or(0);
        assert_eq!(cursor.load(Ordering::Relaxed), end, "the cursor is not at the end of the last block");
    });
}
