//! loom models of the lock-free paths the span allocators use: pops and pushes racing on one
//! tagged list (the shared free lists), and pushes racing with a take-all (remote frees
//! collected by their owner). Run with `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --test
//! loom_tagged_list --release`.
#![cfg(loom)]

use hetmem_core::sync::atomic::{AtomicU64, Ordering};
use hetmem_core::sync::tagged_list::{decode, encode, walk};
use hetmem_core::sync::{LinkStore, TaggedOffsetList};
use hetmem_core::Result;
use loom::sync::Arc;

/// Links in loom atomics: the element at offset `o` uses slot `o / 16`.
struct Links(Vec<AtomicU64>);

impl Links {
    fn new(n: usize) -> Self {
        Links((0..n).map(|_| AtomicU64::new(0)).collect())
    }
}

impl LinkStore for Links {
    fn load_link(&self, offset: u64) -> Result<Option<u64>> {
        Ok(decode(self.0[(offset / 16) as usize].load(Ordering::Relaxed)))
    }
    fn store_link(&self, offset: u64, next: Option<u64>) {
        self.0[(offset / 16) as usize].store(encode(next), Ordering::Relaxed);
    }
}

fn drain(list: &TaggedOffsetList, links: &Links) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(o) = list.pop(links).unwrap() {
        out.push(o);
    }
    out.sort_unstable();
    out
}

#[test]
fn concurrent_pops_and_pushes_never_lose_or_duplicate() {
    loom::model(|| {
        let links = Arc::new(Links::new(4));
        let list = Arc::new(TaggedOffsetList::new());
        for o in [16, 32, 48] {
            list.push(&*links, o);
        }
        // Thread A pops one and pushes it back (the ABA pattern); B pops one and keeps it.
        let a = {
            let (links, list) = (links.clone(), list.clone());
            loom::thread::spawn(move || {
                if let Some(o) = list.pop(&*links).unwrap() {
                    list.push(&*links, o);
                }
            })
        };
        let b = {
            let (links, list) = (links.clone(), list.clone());
            loom::thread::spawn(move || list.pop(&*links).unwrap())
        };
        a.join().unwrap();
        let kept = b.join().unwrap().expect("three elements, one popped by B");
        let mut rest = drain(&list, &links);
        rest.push(kept);
        rest.sort_unstable();
        assert_eq!(rest, vec![16, 32, 48]);
    });
}

#[test]
fn pushes_racing_a_take_all_are_each_seen_once() {
    loom::model(|| {
        let links = Arc::new(Links::new(4));
        let list = Arc::new(TaggedOffsetList::new());
        let pushers: Vec<_> = [16u64, 32]
            .into_iter()
            .map(|o| {
                let (links, list) = (links.clone(), list.clone());
                loom::thread::spawn(move || list.push(&*links, o))
            })
            .collect();
        let mut seen = Vec::new();
        let first = list.take_all();
        walk(&*links, first, 4, |o| {
            seen.push(o);
            Ok(())
        })
        .unwrap();
        for p in pushers {
            p.join().unwrap();
        }
        seen.extend(drain(&list, &links));
        seen.sort_unstable();
        assert_eq!(seen, vec![16, 32]);
    });
}
