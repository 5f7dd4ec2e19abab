use super::*;
use crate::allocators::testing::{exercise, op_strategy, region_of, run_model};
use crate::testing::TestThreads;
use proptest::prelude::*;

type Tla = ThreadLocalAllocator<TestThreads>;

#[test]
fn serves_every_size_and_alignment_and_returns_to_empty() {
    let a = Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
    exercise(&a);
    a.trim().unwrap();
    a.check().unwrap();
}

#[test]
fn remote_frees_return_to_the_owner_and_exited_threads_give_their_heaps_back() {
    let a = Arc::new(Tla::create(region_of(8 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap());
    let start = a.stats().free_bytes();
    let blocks: Vec<u64> = {
        let a = a.clone();
        std::thread::spawn(move || (0..2000).map(|i| a.allocate(16 + i % 500, 8).unwrap().get()).collect())
            .join()
            .unwrap()
    };
    assert_eq!(a.owned_heaps().unwrap(), 0, "the exited thread released its heap");
    a.check().unwrap();
    for b in blocks {
        a.free(OffsetPtr::new(b)).unwrap();
    }
    a.check().unwrap();
    assert_eq!(a.stats().live_allocations, 0);
    assert_eq!(a.stats().free_bytes(), start);
    let p = a.allocate(100, 8).unwrap();
    a.free(p).unwrap();
    a.release_thread_heap().unwrap();
    a.check().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let a = Tla::create(region_of(24 << 20), AllocatorId::new(1, 0), &Default::default()).unwrap();
        run_model(&a, &ops);
    }
}
