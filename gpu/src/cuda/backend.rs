//! [`CudaShmBackend`]: a POSIX shared-memory segment pinned and mapped for a CUDA device, so that
//! every process that attaches, and their kernels, share one region.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};
use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::{BackendKind, Error, MemoryBackend, OffsetPtr, Result};

use super::driver;
use super::interop::{region_view, DeviceView, ReadOnlyView};
use crate::pinned::{self, check_range, impl_pinned_segment, impl_shm_device_backend};

/// Options for [`CudaShmBackend`].
#[derive(Clone, Debug, Default)]
pub struct CudaShmOptions {
    /// The segment's options (id, mode, unlink on drop, attach timeout).
    pub shm: ShmOptions,
    /// The CUDA device (ordinal in this process) whose kernels see the segment.
    pub device: usize,
    /// Register the segment read-only for the device (kernels may read it, not write it), where
    /// the device supports it; elsewhere it is registered read-write, and
    /// [`CudaShmBackend::device_read_only`] says which happened.
    pub device_read_only: bool,
}

/// A POSIX shared-memory segment ([`BackendKind::Pinned`]) registered with `cuMemHostRegister`
/// (portable + device-mapped), so kernels read and write it at [`device_ptr`](MemoryBackend::device_ptr)
/// while CPU processes use it at [`base`](MemoryBackend::base).
///
/// Each process registers its own mapping when it creates or attaches, and unregisters it on drop,
/// after waiting for the work queued in every device's primary context in this process (copies
/// through [views](Self::device_view) and kernels, queued on any device's streams, may still use
/// the segment; work in contexts made with `cuCtxCreate` is not seen). So a drop also waits for
/// work that does not touch the segment: drop the backend before starting a kernel that runs
/// for good (a persistent kernel), or after stopping it. The segment's name follows
/// [`PosixShmBackend`]'s rules (the creator unlinks it on drop unless persisted).
///
/// # Errors
/// Creating or attaching fails as [`PosixShmBackend`] does, and as [`driver::driver`] and
/// [`driver::context`] do when no usable driver or device is present (before any segment is
/// made); a refused registration is [`hetmem_core::Error::Gpu`] with `call` "cuMemHostRegister".
#[derive(Debug)]
pub struct CudaShmBackend {
    shm: PosixShmBackend,
    ctx: Arc<CudaContext>,
    device_ptr: u64,
    read_only: bool,
    host_atomics: bool,
}

impl CudaShmBackend {
    /// Creates segment `name` with `size` bytes of data and registers it with the device.
    pub fn create(name: &str, size: usize, options: &CudaShmOptions) -> Result<Self> {
        let ctx = driver::context(options.device)?;
        let register = |shm| Self::register(shm, ctx, options.device_read_only);
        pinned::create_segment(name, size, &options.shm, BackendKind::Pinned, register, |b| &mut b.shm)
    }

    /// Attaches to segment `name` (made by [`create`](Self::create) in any process) and registers
    /// this process's mapping with the device.
    pub fn attach(name: &str, options: &CudaShmOptions) -> Result<Self> {
        let ctx = driver::context(options.device)?;
        let shm = PosixShmBackend::attach_kind(name, &options.shm, BackendKind::Pinned)?;
        Self::register(shm, ctx, options.device_read_only)
    }

    fn register(shm: PosixShmBackend, ctx: Arc<CudaContext>, read_only: bool) -> Result<Self> {
        let _bound = driver::bind(&ctx)?;
        let read_only = read_only && driver::read_only_register_supported(&ctx)?;
        let host_atomics = driver::host_native_atomics(&ctx)?;
        let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        if read_only {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        // SAFETY: the segment's mapping is `len` bytes at `base` and stays mapped until the
        // returned backend drops, which unregisters first.
        unsafe { driver::host_register(shm.base(), shm.len() as usize, flags)? };
        let device_ptr = match driver::host_device_pointer(shm.base().cast()) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: registered just above; no device work has used it.
                let _ = unsafe { driver::host_unregister(shm.base()) };
                return Err(e);
            }
        };
        Ok(CudaShmBackend { shm, ctx, device_ptr, read_only, host_atomics })
    }

    /// The context (the device's primary context) the segment is registered in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether kernels see the segment read-only.
    pub fn device_read_only(&self) -> bool {
        self.read_only
    }

    /// A view of `len` elements of `T` at `offset` (past the header page), for cudarc copies and
    /// kernel launches on `stream` (which must belong to this backend's context).
    ///
    /// # Errors
    /// [`hetmem_core::Error::OutOfBounds`] or [`hetmem_core::Error::InvalidAlignment`] for a range
    /// outside the data area or misaligned for `T`; [`hetmem_core::Error::Unsupported`] when the
    /// segment is registered read-only for the device ([`device_read_only`](Self::device_read_only)),
    /// where a device write would fault: take a [`read_only_view`](Self::read_only_view) there.
    pub fn device_view<T>(&self, offset: u64, len: usize, stream: &Arc<CudaStream>) -> Result<DeviceView<'_, T>> {
        if self.read_only {
            return Err(Error::Unsupported(
                "the segment is registered read-only for the device: take a read_only_view of it",
            ));
        }
        // SAFETY: the whole segment is registered and device-mapped at `device_ptr` until `self`
        // drops.
        unsafe { region_view(self, offset, len, stream) }
    }

    /// A view of `len` elements of `T` at `offset` that copies and kernels only read: the only
    /// view of a segment registered read-only for the device, and a safe one of any other.
    ///
    /// # Errors
    /// [`hetmem_core::Error::OutOfBounds`] or [`hetmem_core::Error::InvalidAlignment`], as for
    /// [`device_view`](Self::device_view).
    pub fn read_only_view<T>(&self, offset: u64, len: usize, stream: &Arc<CudaStream>) -> Result<ReadOnlyView<'_, T>> {
        // SAFETY: as in `device_view`; the view it makes is only read through.
        unsafe { region_view(self, offset, len, stream) }.map(ReadOnlyView::from)
    }

    /// [`device_view`](Self::device_view) of an allocation's offset.
    pub fn device_view_at<T>(&self, ptr: OffsetPtr, len: usize, stream: &Arc<CudaStream>) -> Result<DeviceView<'_, T>> {
        // A null pointer's offset is far out of bounds, so the range check refuses it.
        self.device_view(ptr.get(), len, stream)
    }

    /// [`read_only_view`](Self::read_only_view) of an allocation's offset.
    pub fn read_only_view_at<T>(
        &self,
        ptr: OffsetPtr,
        len: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<ReadOnlyView<'_, T>> {
        self.read_only_view(ptr.get(), len, stream)
    }

    /// The `len` elements of `T` at `offset` as a host slice, which cudarc copies take as their
    /// host side (a copy from pinned memory runs at full speed and asynchronously).
    ///
    /// # Errors
    /// As [`device_view`](Self::device_view) (the alignment checked is the slice's address's).
    ///
    /// # Safety
    /// While the slice lives, no process, thread or kernel writes those bytes, and they are valid
    /// values of `T`.
    pub unsafe fn host_slice<T>(&self, offset: u64, len: usize) -> Result<&[T]> {
        check_range(self.shm.base() as u64, self.shm.len(), offset, len, size_of::<T>(), align_of::<T>())?;
        // SAFETY: in bounds and aligned (checked); the caller promises no writers and valid values.
        Ok(unsafe { std::slice::from_raw_parts(self.shm.base().add(offset as usize).cast(), len) })
    }

    /// Like [`host_slice`](Self::host_slice), writable.
    ///
    /// # Errors
    /// As [`device_view`](Self::device_view).
    ///
    /// # Safety
    /// While the slice lives, no other process, thread, kernel or slice reads or writes those
    /// bytes, and they are valid values of `T`.
    #[allow(clippy::mut_from_ref)] // the memory is shared by design; the caller's contract rules out aliasing
    pub unsafe fn host_slice_mut<T>(&self, offset: u64, len: usize) -> Result<&mut [T]> {
        check_range(self.shm.base() as u64, self.shm.len(), offset, len, size_of::<T>(), align_of::<T>())?;
        // SAFETY: in bounds and aligned (checked); the caller promises exclusive access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.shm.base().add(offset as usize).cast(), len) })
    }
}

impl_shm_device_backend!(CudaShmBackend);
// `host_native_atomics`, `shm` and `persist`, as every platform's pinned segment has them.
impl_pinned_segment!(CudaShmBackend, "`CU_DEVICE_ATTRIBUTE_HOST_NATIVE_ATOMIC_SUPPORTED`");

impl Drop for CudaShmBackend {
    fn drop(&mut self) {
        // Unregister before the segment unmaps (the `shm` field drops after this). Errors cannot
        // be reported from drop; the mapping goes away either way. In a forked child `bind` fails
        // and nothing is unregistered: the registration is the parent's.
        if let Ok(_bound) = driver::bind(&self.ctx) {
            // Copies through views and kernels may still be running: views borrow the backend,
            // but the work they queued outlives them, and unregistering is not documented to wait.
            // The segment is registered portable, so that work may be queued in any context. A
            // failure (a context in an error state) means nothing runs there any more.
            if !driver::synchronize_all_bound(&self.ctx) {
                return; // no context to unregister in, as when `bind` fails above
            }
            // SAFETY: registered in `register`; no device work is queued any more.
            let _ = unsafe { driver::host_unregister(self.shm.base()) };
        }
    }
}
