//! What the GPU backends share: each is a [`PosixShmBackend`] (kind [`BackendKind::Pinned`] for the
//! registered segments, [`BackendKind::Device`] for CUDA IPC) plus the device address of its offset
//! 0 in this process, and each checks ranges the same way; the registered segments of both
//! platforms also share their accessors and what they say about atomics.
//!
//! [`PosixShmBackend`]: hetmem_backends::PosixShmBackend
//! [`BackendKind::Pinned`]: hetmem_core::BackendKind::Pinned
//! [`BackendKind::Device`]: hetmem_core::BackendKind::Device

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::header::HEADER_SIZE;
use hetmem_core::{BackendKind, Error, Result};

/// Creates segment `name` and hands it to `finish` (which registers it with the device, or gives
/// it device memory). A segment `finish` refuses is removed as it drops, whatever
/// `options.unlink_on_drop` says: it was never handed out, so no one can be meant to find it. The
/// backend `finish` makes keeps the name past its drop where `options` says so (`segment` names
/// its [`PosixShmBackend`]).
pub(crate) fn create_segment<B>(
    name: &str,
    size: usize,
    options: &ShmOptions,
    kind: BackendKind,
    finish: impl FnOnce(PosixShmBackend) -> Result<B>,
    segment: impl FnOnce(&mut B) -> &mut PosixShmBackend,
) -> Result<B> {
    let removed_on_failure = ShmOptions { unlink_on_drop: true, ..options.clone() };
    let shm = PosixShmBackend::create_kind(name, size, &removed_on_failure, kind)?;
    let mut backend = finish(shm)?;
    if !options.unlink_on_drop {
        segment(&mut backend).persist();
    }
    Ok(backend)
}

/// Implements [`MemoryBackend`](hetmem_core::MemoryBackend) for a type with fields
/// `shm: PosixShmBackend` and `device_ptr: u64` by delegating to the segment.
macro_rules! impl_shm_device_backend {
    ($ty:ty) => {
        // SAFETY: base, length, header and kind are the segment's, a `PosixShmBackend` that
        // keeps those promises, owned by the backend for its life.
        unsafe impl hetmem_core::MemoryBackend for $ty {
            fn kind(&self) -> hetmem_core::BackendKind {
                self.shm.kind()
            }
            fn name(&self) -> Option<&str> {
                self.shm.name()
            }
            fn base(&self) -> *mut u8 {
                self.shm.base()
            }
            fn len(&self) -> u64 {
                self.shm.len()
            }
            fn header(&self) -> &hetmem_core::RegionHeader {
                self.shm.header()
            }
            fn is_creator(&self) -> bool {
                self.shm.is_creator()
            }
            fn device_ptr(&self) -> Option<u64> {
                Some(self.device_ptr)
            }
            fn destroy(&self) -> hetmem_core::Result<()> {
                self.shm.destroy()
            }
        }
    };
}
pub(crate) use impl_shm_device_backend;

/// Adds the methods a pinned segment's backend has on every platform (`CudaShmBackend`,
/// `RocmShmBackend`) to a type with fields `shm: PosixShmBackend` and `host_atomics: bool` (what
/// `$attribute`, the platform's device attribute, says of this process's device).
macro_rules! impl_pinned_segment {
    ($ty:ty, $attribute:literal) => {
        impl $ty {
            /// Whether kernels and CPU threads may work on the same words of the segment with
            /// atomics at the same time: the device's link to the host carries atomics natively
            /// (NVLink-C2C on Grace Hopper, not PCIe), as the device attribute
            #[doc = concat!($attribute, " says.")]
            ///
            /// Where it is false, a device atomic on the segment is atomic among the device's
            /// threads only, not against the CPU's: a heap in the segment that kernels allocate in
            /// ([`device::BITMAP_HEADER`](crate::device::BITMAP_HEADER)) is used by kernels and by
            /// the CPU in turns. The CPU allocates and frees before a kernel that uses the heap is
            /// launched, or after it has finished (its stream synchronized), never while it runs.
            /// The same holds between devices: the segment is registered portable, and other
            /// processes may register it with other GPUs, whose atomics over PCIe are not atomic
            /// against each other's. So the heap is shared at once only by kernels of one device,
            /// or by CPU threads and processes, unless every device whose kernels use it answers
            /// `true` here (each process asks of its own).
            pub fn host_native_atomics(&self) -> bool {
                self.host_atomics
            }

            /// The underlying segment.
            pub fn shm(&self) -> &hetmem_backends::PosixShmBackend {
                &self.shm
            }

            /// Keeps the segment after this (creating) process drops its backend.
            pub fn persist(&mut self) {
                self.shm.persist();
            }
        }
    };
}
pub(crate) use impl_pinned_segment;

/// Checks that `count` elements of `elem_size` bytes and alignment `elem_align` starting at
/// `offset` lie inside a region of `region_len` bytes and past its header, and that their address
/// (the region mapped at `base`) is aligned; returns their length in bytes.
///
/// The address, not only the offset: a region is mapped at a page boundary, so for an alignment
/// past the page size an offset that is a multiple of it can still give a misaligned address.
pub(crate) fn check_range(
    base: u64,
    region_len: u64,
    offset: u64,
    count: usize,
    elem_size: usize,
    elem_align: usize,
) -> Result<usize> {
    let bytes = count
        .checked_mul(elem_size)
        .ok_or(Error::InvalidSize { size: count as u64, reason: "element count overflows" })?;
    let end = offset.checked_add(bytes as u64);
    if offset < HEADER_SIZE || end.is_none_or(|end| end > region_len) {
        return Err(Error::OutOfBounds { offset, len: bytes as u64, region_len });
    }
    if base.wrapping_add(offset) % elem_align as u64 != 0 {
        return Err(Error::InvalidAlignment { align: elem_align as u64 });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned base, like a mapping's.
    const BASE: u64 = 0x7f00_0000_1000;

    #[test]
    fn ranges_must_lie_in_the_data_area_and_be_aligned() {
        let len = HEADER_SIZE + 8192;
        assert_eq!(check_range(BASE, len, HEADER_SIZE, 2048, 4, 4).unwrap(), 8192);
        assert_eq!(check_range(BASE, len, HEADER_SIZE + 8192, 0, 4, 4).unwrap(), 0);
        assert!(matches!(check_range(BASE, len, 0, 1, 4, 4), Err(Error::OutOfBounds { .. })), "the header is not data");
        assert!(matches!(check_range(BASE, len, HEADER_SIZE, 2049, 4, 4), Err(Error::OutOfBounds { .. })));
        assert!(matches!(check_range(BASE, len, u64::MAX - 2, 1, 4, 4), Err(Error::OutOfBounds { .. })));
        assert!(matches!(check_range(BASE, len, HEADER_SIZE, usize::MAX, 4, 4), Err(Error::InvalidSize { .. })));
        assert!(matches!(check_range(BASE, len, HEADER_SIZE + 2, 1, 4, 4), Err(Error::InvalidAlignment { .. })));
        // An offset that is a multiple of 8192 at a base that is not: the address is misaligned.
        let big = 4 * 8192;
        assert!(matches!(check_range(BASE, big, 8192, 1, 8192, 8192), Err(Error::InvalidAlignment { .. })));
        assert_eq!(check_range(BASE, big, 3 * HEADER_SIZE, 1, 8192, 8192).unwrap(), 8192);
    }
}
