//! A small, fast, deterministic generator shared by the examples: every peer sees the same
//! requests. Include with `#[path = "common/xorshift.rs"] mod xorshift;`.

/// Marsaglia's xorshift64; the seed must not be zero.
pub struct XorShift(pub u64);

#[allow(dead_code)] // each example uses the part it needs
impl XorShift {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `lo..=hi_inclusive`.
    pub fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + (self.next() % (hi_inclusive - lo + 1) as u64) as usize
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
