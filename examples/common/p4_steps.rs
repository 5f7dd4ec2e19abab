//! P4's requests, shared by the examples that run it (`pools`, `p4_cycles`), so both run the same
//! ones. Include with `#[path = "common/p4_steps.rs"] mod p4_steps;` beside `mod xorshift`.

use crate::xorshift::XorShift;

/// P4's initial sizes (one per slot) and its steps (slot, new size), uniform in 1 KiB..4 MiB.
pub fn random_steps(slots: usize, steps: usize) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let initial = (0..slots).map(|_| rng.range(1 << 10, 4 << 20)).collect();
    let steps = (0..steps).map(|_| (rng.below(slots), rng.range(1 << 10, 4 << 20))).collect();
    (initial, steps)
}
