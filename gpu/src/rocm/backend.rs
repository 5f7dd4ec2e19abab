//! [`RocmShmBackend`]: a POSIX shared-memory segment registered with a HIP device, so every process
//! that attaches, and their kernels, share one region.

use hetmem_backends::{PosixShmBackend, ShmOptions};
use hetmem_core::{BackendKind, MemoryBackend, Result};

use super::runtime;
use crate::pinned::{self, check_range, impl_pinned_segment, impl_shm_device_backend};

/// Options for [`RocmShmBackend`].
#[derive(Clone, Debug, Default)]
pub struct RocmShmOptions {
    /// The segment's options (id, mode, unlink on drop, attach timeout).
    pub shm: ShmOptions,
    /// The HIP device whose kernels see the segment.
    pub device: usize,
}

/// A POSIX shared-memory segment ([`BackendKind::Pinned`]) registered with `hipHostRegister`
/// (portable + mapped); kernels use it at [`device_ptr`](MemoryBackend::device_ptr), from
/// `hipHostGetDevicePointer`. Each process registers its own mapping and unregisters it on drop.
///
/// # Errors
/// As [`PosixShmBackend`], and as [`runtime::runtime`] when there is no HIP device (checked before
/// any segment is made); a refused registration is [`hetmem_core::Error::Gpu`].
#[derive(Debug)]
pub struct RocmShmBackend {
    shm: PosixShmBackend,
    device: usize,
    device_ptr: u64,
    host_atomics: bool,
}

impl RocmShmBackend {
    /// Creates segment `name` with `size` bytes of data and registers it with the device.
    pub fn create(name: &str, size: usize, options: &RocmShmOptions) -> Result<Self> {
        let _device = runtime::use_device(options.device)?;
        let register = |shm| Self::register(shm, options.device);
        pinned::create_segment(name, size, &options.shm, BackendKind::Pinned, register, |b| &mut b.shm)
    }

    /// Attaches to segment `name` and registers this process's mapping with the device.
    pub fn attach(name: &str, options: &RocmShmOptions) -> Result<Self> {
        let _device = runtime::use_device(options.device)?;
        let shm = PosixShmBackend::attach_kind(name, &options.shm, BackendKind::Pinned)?;
        Self::register(shm, options.device)
    }

    fn register(shm: PosixShmBackend, device: usize) -> Result<Self> {
        let host_atomics = runtime::host_native_atomics(device);
        // SAFETY: the mapping is `len` bytes at `base` and stays mapped until the returned backend
        // drops, which unregisters first.
        unsafe { runtime::host_register(shm.base(), shm.len() as usize)? };
        match runtime::host_device_pointer(shm.base()) {
            Ok(device_ptr) => Ok(RocmShmBackend { shm, device, device_ptr, host_atomics }),
            Err(e) => {
                // SAFETY: registered just above; no device work has used it.
                let _ = unsafe { runtime::host_unregister(shm.base()) };
                Err(e)
            }
        }
    }

    /// The HIP device the segment is registered with.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The device address of the `len` bytes at `offset` (past the header page), for HIP copies
    /// and kernel arguments.
    ///
    /// # Errors
    /// [`hetmem_core::Error::OutOfBounds`] for a range outside the data area.
    pub fn device_address(&self, offset: u64, len: usize) -> Result<u64> {
        check_range(self.device_ptr, self.shm.len(), offset, len, 1, 1)?;
        Ok(self.device_ptr + offset)
    }
}

impl_shm_device_backend!(RocmShmBackend);
// `host_native_atomics`, `shm` and `persist`, as every platform's pinned segment has them.
impl_pinned_segment!(
    RocmShmBackend,
    "`hipDeviceAttributeHostNativeAtomicSupported` (false where the runtime does not answer it)"
);

impl Drop for RocmShmBackend {
    fn drop(&mut self) {
        // In a forked child `use_device` fails and nothing is unregistered: the registration is
        // the parent's.
        if let Ok(_device) = runtime::use_device(self.device) {
            // Copies and kernels queued on any device with the segment's device addresses may
            // still be running when the backend drops.
            runtime::synchronize_all();
            // SAFETY: registered in `register`; no device work is queued any more.
            let _ = unsafe { runtime::host_unregister(self.shm.base()) };
        }
    }
}
