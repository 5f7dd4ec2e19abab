//! loom models of the bitmap allocator's two steps (`hetmem_core::sync::bits`): claims racing
//! for the last clear bits of a word, two releases of one bit, and a claim after a release. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hetmem-core --test loom_bits --release`.
#![cfg(loom)]

use hetmem_core::sync::atomic::{AtomicU64, Ordering};
use hetmem_core::sync::bits::{claim_bit, release_bit};
use loom::sync::Arc;

/// Three claimers, two clear bits: two get distinct bits, one gets none, and the word ends full.
#[test]
fn claims_never_share_a_bit() {
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(!0b101));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let word = word.clone();
                loom::thread::spawn(move || claim_bit(&word))
            })
            .collect();
        let mine = claim_bit(&word);
        let mut got: Vec<u32> = threads.into_iter().filter_map(|t| t.join().unwrap()).chain(mine).collect();
        got.sort_unstable();
        assert_eq!(got, [0, 2]);
        assert_eq!(word.load(Ordering::Relaxed), u64::MAX);
    });
}

/// Two frees of one block at once (no claim between them): exactly one succeeds.
#[test]
fn of_two_releases_of_one_bit_one_succeeds() {
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(1 << 5));
        let other = {
            let word = word.clone();
            loom::thread::spawn(move || release_bit(&word, 5))
        };
        let mine = release_bit(&word, 5);
        assert!(mine ^ other.join().unwrap(), "exactly one of two frees of one block succeeds");
        assert_eq!(word.load(Ordering::Relaxed), 0);
    });
}

/// What a block's owner wrote before freeing it is visible to whoever claims it next (loom
/// reports a data race on the cell if the release and the claim do not order the two).
#[test]
fn a_claim_sees_what_the_releaser_wrote() {
    loom::model(|| {
        let word = Arc::new(AtomicU64::new(u64::MAX));
        let block = Arc::new(loom::cell::UnsafeCell::new(0u32));
        let owner = {
            let (word, block) = (word.clone(), block.clone());
            loom::thread::spawn(move || {
                // SAFETY: the owner holds the block until its release below.
                block.with_mut(|b| unsafe { *b = 42 });
                assert!(release_bit(&word, 9));
            })
        };
        let bit = loop {
            if let Some(bit) = claim_bit(&word) {
                break bit;
            }
            loom::thread::yield_now();
        };
        assert_eq!(bit, 9);
        // SAFETY: the claimer holds the block now.
        assert_eq!(block.with(|b| unsafe { *b }), 42);
        owner.join().unwrap();
    });
}
