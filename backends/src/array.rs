//! [`ArrayBackend`]: a buffer the caller provides.

use std::ptr::NonNull;
use std::time::Duration;

use hetmem_core::header::HEADER_SIZE;
use hetmem_core::{BackendId, BackendKind, Error, Result};

use crate::raw::{impl_backend, RawRegion};

/// A backend over a buffer the caller owns (a static array, memory from another mechanism).
///
/// The buffer must be page-aligned (4096) so that allocators' alignment guarantees hold, and
/// larger than the header page.
#[derive(Debug)]
pub struct ArrayBackend {
    raw: RawRegion,
    creator: bool,
}

impl ArrayBackend {
    /// Makes `buf` a new region with id `id`.
    pub fn create(buf: &'static mut [u8], id: BackendId) -> Result<Self> {
        // SAFETY: a `&'static mut` slice is valid and exclusively ours for the program's life.
        let raw = unsafe { Self::raw(buf.as_mut_ptr(), buf.len())? };
        // SAFETY: the buffer is ours alone (`&'static mut`), and no reference to its header exists.
        unsafe { raw.initialize(BackendKind::Private, id)? };
        Ok(ArrayBackend { raw, creator: true })
    }

    /// Attaches to a buffer that already holds a region (made by [`ArrayBackend::create`],
    /// possibly in another process that shares the memory), checking its header.
    ///
    /// It does not wait: a region whose header is not ready yet (its creator, in another process
    /// say, still setting it up, or a buffer never made a region: all zeros) is `TimedOut` at
    /// once. [`attach_timeout`](Self::attach_timeout) waits for the creator, as
    /// `PosixShmBackend::attach` does.
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `len` bytes for the backend's whole life, and all
    /// other users of that memory access it only as a hetmem region.
    pub unsafe fn attach(ptr: *mut u8, len: usize) -> Result<Self> {
        // SAFETY: the caller's contract.
        unsafe { Self::attach_timeout(ptr, len, Duration::ZERO) }
    }

    /// [`attach`](Self::attach), waiting up to `timeout` for the region's creator to finish
    /// setting it up (`TimedOut` after that: the creator died or is slow, or no creator ever
    /// came).
    ///
    /// # Safety
    /// As for [`attach`](Self::attach).
    pub unsafe fn attach_timeout(ptr: *mut u8, len: usize, timeout: Duration) -> Result<Self> {
        // SAFETY: the caller's contract.
        let raw = unsafe { Self::raw(ptr, len)? };
        raw.wait_ready(BackendKind::Private, timeout)?;
        Ok(ArrayBackend { raw, creator: false })
    }

    /// # Safety
    /// `ptr` is valid for reads and writes of `len` bytes for as long as the region is used.
    unsafe fn raw(ptr: *mut u8, len: usize) -> Result<RawRegion> {
        let base = NonNull::new(ptr).ok_or(Error::InvalidSize { size: len as u64, reason: "null buffer" })?;
        if (len as u64) <= HEADER_SIZE {
            return Err(Error::InvalidSize {
                size: len as u64,
                reason: "buffer must be larger than the 4096-byte header",
            });
        }
        if ptr.align_offset(HEADER_SIZE as usize) != 0 {
            return Err(Error::InvalidAlignment { align: HEADER_SIZE });
        }
        // SAFETY: the caller's contract, and page alignment checked above.
        Ok(unsafe { RawRegion::new(base, len as u64) })
    }
}

impl_backend!(ArrayBackend, kind = |_s| BackendKind::Private, creator = |s| s.creator);

#[cfg(test)]
mod tests {
    use super::*;
    use hetmem_core::MemoryBackend;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    fn pages(n: usize) -> &'static mut [u8] {
        let v: Vec<Page> = (0..n).map(|_| Page([0; 4096])).collect();
        let pages = Box::leak(v.into_boxed_slice());
        // SAFETY: `Page` is `repr(C)` bytes; the slice covers exactly the leaked pages.
        unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), n * 4096) }
    }

    #[test]
    fn create_then_attach_sees_the_same_region() {
        let buf = pages(4);
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let a = ArrayBackend::create(buf, BackendId(5)).unwrap();
        assert_eq!(a.id(), BackendId(5));
        // SAFETY: the leaked buffer lives forever and is used only as this region.
        let b = unsafe { ArrayBackend::attach(ptr, len) }.unwrap();
        assert_eq!(b.id(), BackendId(5));
        assert!(!b.is_creator());
    }

    /// `attach` said nothing of not waiting, and there was no way to wait: a region whose
    /// creator (another process sharing the buffer, say) was still setting it up could not be
    /// attached, however short the wait.
    #[test]
    fn attach_does_not_wait_for_the_creator_and_attach_timeout_does() {
        let buf = pages(2);
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: the leaked buffer lives forever and is used only as this region.
        let early = unsafe { ArrayBackend::attach(ptr, len) };
        // No creator is at work yet: had attach waited, it would have waited in vain.
        assert!(matches!(early, Err(Error::TimedOut { .. })), "{:?}", early.err());
        let address = ptr as usize;
        let creator = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let (kind, id) = (BackendKind::Private, BackendId(6));
            // SAFETY: the leaked buffer's `len` bytes, page-aligned; the attacher only waits for
            // the ready flag meanwhile.
            unsafe { hetmem_core::RegionHeader::initialize(address as *mut u8, len as u64, kind, id, 1) }.map(|_| ())
        });
        // SAFETY: as above.
        let attached = unsafe { ArrayBackend::attach_timeout(ptr, len, Duration::from_secs(10)) };
        creator.join().unwrap().unwrap();
        assert_eq!(attached.unwrap().id(), BackendId(6));
    }

    #[test]
    fn refuses_small_unaligned_or_foreign_buffers() {
        let buf = pages(2);
        let ptr = buf.as_mut_ptr();
        // SAFETY: the leaked buffer lives forever; these attempts fail before writing.
        assert!(matches!(unsafe { ArrayBackend::attach(ptr.wrapping_add(8), 4096) }, Err(Error::InvalidSize { .. })));
        assert!(matches!(
            unsafe { ArrayBackend::attach(ptr.wrapping_add(8), 6000) },
            Err(Error::InvalidAlignment { align: HEADER_SIZE })
        ));
        assert!(matches!(
            unsafe { ArrayBackend::attach(std::ptr::null_mut(), 6000) },
            Err(Error::InvalidSize { size: 6000, reason: "null buffer" })
        ));
        buf[..8].copy_from_slice(b"NOTHETMM");
        assert!(matches!(
            unsafe { ArrayBackend::attach(ptr, 8192) },
            Err(Error::HeaderMismatch { field: "magic", .. })
        ));
    }
}
