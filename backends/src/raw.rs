//! What every backend shares: a base address and a length, header access, and the wait for a
//! creator to finish initialising.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use hetmem_core::header::{HeaderState, HEADER_SIZE};
use hetmem_core::{BackendId, BackendKind, Error, RegionHeader, Result};

/// A mapped region: base address and length, with the header at the base.
#[derive(Debug)]
pub struct RawRegion {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: a RawRegion is an address range; the backends that own one guarantee the memory stays
// mapped for their life, and everything in it is accessed through atomics, shm-safe locks, or
// allocations the caller owns.
unsafe impl Send for RawRegion {}
// SAFETY: as above.
unsafe impl Sync for RawRegion {}

impl RawRegion {
    /// Describes `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` is valid for reads and writes of `len` bytes, page-aligned, for as long as the
    /// `RawRegion` is used, and `len` is at least [`HEADER_SIZE`] ([`header`](Self::header) reads
    /// that much without checking).
    pub unsafe fn new(base: NonNull<u8>, len: u64) -> Self {
        RawRegion { base, len }
    }

    /// Writes a fresh header: the region becomes a hetmem region.
    ///
    /// # Safety
    /// Nothing else uses the header until this returns: no reference that
    /// [`header`](Self::header) gave is alive, and no other thread or process reads it but for
    /// the ready flag that attachers wait on. The header is rewritten with plain writes, so a
    /// region in use (another `RawRegion` over a live backend's memory, say) must not be
    /// initialised again: a safe call could have raced with its users' reads.
    ///
    /// ```compile_fail,E0133
    /// use hetmem_backends::raw::RawRegion;
    /// use hetmem_core::{BackendId, BackendKind};
    ///
    /// fn wipe(live: &RawRegion) {
    ///     let _ = live.initialize(BackendKind::Private, BackendId(1));
    /// }
    /// ```
    pub unsafe fn initialize(&self, kind: BackendKind, id: BackendId) -> Result<()> {
        // SAFETY: `new`'s contract gives `len` writable bytes at `base`; ours, that nothing else
        // uses the header until this returns (attachers wait for the ready flag it sets).
        unsafe { RegionHeader::initialize(self.base.as_ptr(), self.len, kind, id, std::process::id()) }.map(|_| ())
    }

    /// Waits until the creator has marked the header ready (or `timeout` passes), then checks it
    /// against the mapped length and the expected kind.
    pub fn wait_ready(&self, kind: BackendKind, timeout: Duration) -> Result<()> {
        self.wait_ready_while(kind, timeout, || Ok(()))
    }

    /// [`wait_ready`](Self::wait_ready), asking `worth_waiting` before each pause whether a
    /// creator may still finish: its error ends the wait (a segment whose name is gone, say).
    pub fn wait_ready_while(
        &self,
        kind: BackendKind,
        timeout: Duration,
        worth_waiting: impl Fn() -> Result<()>,
    ) -> Result<()> {
        if self.len < HEADER_SIZE {
            return Err(Error::InvalidSize { size: self.len, reason: "region is smaller than its header page" });
        }
        let started = Instant::now();
        loop {
            match self.header().state() {
                HeaderState::Ready | HeaderState::BadMagic(_) => return self.header().validate(self.len, kind),
                HeaderState::Initialising if started.elapsed() >= timeout => {
                    return Err(Error::TimedOut {
                        what: "the segment's creator to initialise it",
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
                HeaderState::Initialising => {
                    worth_waiting()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// The header.
    pub fn header(&self) -> &RegionHeader {
        // SAFETY: `new`'s contract gives at least HEADER_SIZE >= size_of::<RegionHeader>() valid
        // bytes, page-aligned, and the header holds only integers and atomics, valid for any bytes.
        unsafe { self.base.cast::<RegionHeader>().as_ref() }
    }

    /// The base address.
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The total length of a region whose data area holds `size` bytes: the header page plus `size`
/// rounded up to whole pages.
pub fn region_len(size: usize) -> Result<u64> {
    if size == 0 {
        return Err(Error::InvalidSize { size: 0, reason: "a backend needs a non-zero size" });
    }
    (size as u64)
        .checked_next_multiple_of(HEADER_SIZE)
        .and_then(|s| s.checked_add(HEADER_SIZE))
        .filter(|&total| total <= isize::MAX as u64)
        .ok_or(Error::InvalidSize { size: size as u64, reason: "too large" })
}

/// Implements [`MemoryBackend`](hetmem_core::MemoryBackend) for a type with a `raw: RawRegion`
/// field, given its kind and creator flag expressions.
macro_rules! impl_backend {
    ($ty:ty, kind = |$k:ident| $kind:expr, creator = |$s:ident| $creator:expr $(, $extra:item)* $(,)?) => {
        // SAFETY: base, length and header are the `RawRegion`'s, whose maker promised (in
        // `RawRegion::new`) `len` bytes valid at `base`, page-aligned, while it is used: the
        // backend owns it and unmaps it only when dropped. Host memory, whatever its kind.
        unsafe impl hetmem_core::MemoryBackend for $ty {
            fn kind(&self) -> hetmem_core::BackendKind {
                let $k = self;
                $kind
            }
            fn base(&self) -> *mut u8 {
                self.raw.base()
            }
            fn len(&self) -> u64 {
                self.raw.len()
            }
            fn header(&self) -> &hetmem_core::RegionHeader {
                self.raw.header()
            }
            fn is_creator(&self) -> bool {
                let $s = self;
                $creator
            }
            $($extra)*
        }
    };
}
pub(crate) use impl_backend;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_len_rounds_to_pages_plus_header() {
        assert_eq!(region_len(1).unwrap(), 2 * HEADER_SIZE);
        assert_eq!(region_len(4096).unwrap(), 2 * HEADER_SIZE);
        assert_eq!(region_len(4097).unwrap(), 3 * HEADER_SIZE);
        assert!(matches!(region_len(0), Err(Error::InvalidSize { .. })));
        assert!(matches!(region_len(usize::MAX), Err(Error::InvalidSize { .. })));
    }
}
