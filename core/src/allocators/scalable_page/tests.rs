use super::*;
use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
use proptest::prelude::*;

#[test]
fn serves_every_size_and_alignment_and_returns_to_empty() {
    let a = ScalablePageAllocator::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exercise(&a);
}

#[test]
fn blocks_freed_by_one_class_serve_another_after_trim() {
    let a = ScalablePageAllocator::create(region_of(1 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    let mut small = Vec::new();
    while let Ok(p) = a.allocate(64, 8) {
        small.push(p);
    }
    assert!(small.len() > 5000);
    for p in small {
        a.free(p).unwrap();
    }
    a.check().unwrap();
    // All of it comes back for large requests: the spans are trimmed on shortage.
    let big = a.allocate(600 * 1024, 8).unwrap();
    a.free(big).unwrap();
    a.check().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let a = ScalablePageAllocator::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        run_model(&a, &ops);
    }
}
