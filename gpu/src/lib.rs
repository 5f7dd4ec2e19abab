//! hetmem-gpu: GPU memory for hetmem.
//!
//! | feature | module | what it gives |
//! |---|---|---|
//! | `cuda` | `cuda` | `CudaShmBackend`, `CudaIpcBackend`, `CudaDeviceResource`, `CudaPinnedResource`, views, NVRTC |
//! | `rocm` | `rocm` | `RocmShmBackend`, `RocmDeviceResource` |
//! | (always) | [`device`] | the C header of the bitmap allocator for CUDA and HIP kernels |
//!
//! In `cuda`: `CudaShmBackend` is a shared segment pinned and mapped for kernels, `CudaIpcBackend`
//! device memory shared between processes, and `CudaDeviceResource` and `CudaPinnedResource` are
//! upstreams for pools; views of this memory are what cudarc's copies and launches accept, and
//! NVRTC compiles kernels at run time.
//!
//! Both platforms live in folders with the same file names (`backend.rs`, `resource.rs`, and
//! `driver.rs`/`runtime.rs` for the raw calls). The features are Linux-only (the pinned backends are
//! POSIX shared memory): enabled elsewhere they build and add nothing.
//!
//! Nothing here panics when the GPU stack is missing: no driver library, no device, or a driver too
//! old each give a [`hetmem_core::Error`] (see each module's "Errors" section), so a program built
//! with a GPU feature still runs, and can fall back, on a machine without a GPU.
#![cfg_attr(
    hetmem_cuda,
    doc = "\nIn this build: [`cuda`] ([`cuda::CudaShmBackend`], [`cuda::CudaIpcBackend`], \
           [`cuda::CudaDeviceResource`], [`cuda::CudaPinnedResource`])."
)]
#![cfg_attr(hetmem_rocm, doc = "\nIn this build: [`rocm`] ([`rocm::RocmShmBackend`], [`rocm::RocmDeviceResource`]).")]
#![warn(missing_docs)]

#[cfg(any(hetmem_cuda, hetmem_rocm))]
mod aligned;
#[cfg(any(hetmem_cuda, hetmem_rocm))]
mod fork_once;
#[cfg(any(hetmem_cuda, hetmem_rocm))]
mod pinned;

#[cfg(hetmem_cuda)]
pub mod cuda;
pub mod device;
#[cfg(hetmem_rocm)]
pub mod rocm;

/// The GPU platforms compiled into this build ("cuda", "rocm"). Whether a machine can use them is
/// answered by `cuda::driver()` and `rocm::runtime()`.
pub const PLATFORMS: &[&str] = &[
    #[cfg(hetmem_cuda)]
    "cuda",
    #[cfg(hetmem_rocm)]
    "rocm",
];

#[cfg(test)]
mod tests {
    #[test]
    fn platforms_follow_the_features() {
        assert_eq!(super::PLATFORMS.contains(&"cuda"), cfg!(all(feature = "cuda", target_os = "linux")));
        assert_eq!(super::PLATFORMS.contains(&"rocm"), cfg!(all(feature = "rocm", target_os = "linux")));
    }
}
