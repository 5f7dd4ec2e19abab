//! [`RocmDeviceResource`]: HIP device memory as the upstream of device-memory pools.

use std::ptr::NonNull;

use hetmem_core::{MemoryKind, MemoryResource, Result};

use super::runtime;
use crate::aligned::AlignedBlocks;

/// The alignment every `hipMalloc` result has.
pub const DEVICE_ALLOC_ALIGN: usize = 256;

/// Device memory from `hipMalloc` as a [`MemoryResource`] ([`MemoryKind::Device`]). Blocks are
/// device addresses: the CPU must not dereference them.
///
/// # Errors
/// Construction fails as [`runtime::runtime`] does, or with
/// [`Error::NotFound`](hetmem_core::Error::NotFound) for a device that does not exist; allocation
/// returns [`Error::OutOfMemory`](hetmem_core::Error::OutOfMemory) when the device is full (the
/// resource stays usable), other failures as [`Error::Gpu`](hetmem_core::Error::Gpu).
#[derive(Debug)]
pub struct RocmDeviceResource {
    device: usize,
    moved: AlignedBlocks,
}

impl RocmDeviceResource {
    /// Device memory of HIP device `device`.
    pub fn new(device: usize) -> Result<Self> {
        let _device = runtime::use_device(device)?;
        Ok(RocmDeviceResource { device, moved: AlignedBlocks::new(DEVICE_ALLOC_ALIGN) })
    }

    /// The HIP device blocks come from.
    pub fn device(&self) -> usize {
        self.device
    }
}

// SAFETY: blocks from `hipMalloc` on the resource's device, over-sized and offset where the
// runtime's alignment falls short of the one asked for (`AlignedBlocks`), freed with `hipFree`
// from their base; device memory, which the resource says the CPU may not touch.
unsafe impl MemoryResource for RocmDeviceResource {
    fn name(&self) -> &str {
        "rocm-device"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Device
    }

    fn allocate(&self, size: usize, align: usize) -> Result<NonNull<u8>> {
        let _device = runtime::use_device(self.device)?;
        let alloc = |n| runtime::malloc(n);
        let free = |p| {
            // SAFETY: a block freed here was allocated just before and never handed out.
            let _ = unsafe { runtime::free(p) };
        };
        self.moved.allocate(size, align, "hipMalloc", alloc, free)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _size: usize, align: usize) {
        let bind = || runtime::use_device(self.device);
        let free = |base| {
            // SAFETY: `deallocate`'s contract: the block came from `allocate` and is not used again.
            let _ = unsafe { runtime::free(base) };
        };
        self.moved.deallocate(ptr.as_ptr() as u64, align, bind, free);
    }
}
