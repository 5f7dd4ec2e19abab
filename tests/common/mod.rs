//! What the multi-process tests (`shm_processes.rs`, `fork.rs`) share. Include with `mod common;`.

use hetmem::allocators::ThreadLocalAllocator;
use hetmem::prelude::*;

#[path = "../../examples/common/xorshift.rs"]
mod xorshift;
/// The examples' deterministic generator, for the processes' operation sequences.
pub use xorshift::XorShift as Rng;

/// The span allocators' recovery of what dead processes left, then a trim of what the calling
/// thread holds but does not use.
pub trait Recover: AllocatorType {
    fn recover(&self);
}

impl Recover for ThreadLocalAllocator {
    fn recover(&self) {
        self.reclaim().unwrap();
        self.trim().unwrap();
    }
}

impl Recover for ScalablePageAllocator {
    fn recover(&self) {
        self.reclaim().unwrap();
        self.trim().unwrap();
    }
}
