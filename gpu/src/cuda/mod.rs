//! CUDA (feature `cuda`): memory that CPU processes and NVIDIA GPU kernels share.
//!
//! - [`CudaShmBackend`] (`backend.rs`): a shared-memory segment pinned and mapped for kernels.
//! - [`CudaIpcBackend`] (`ipc.rs`): device memory opened by several processes through IPC handles.
//! - [`CudaDeviceResource`], [`CudaPinnedResource`] (`resource.rs`): upstreams for device-memory
//!   and pinned-memory pools.
//! - [`DeviceView`] (`interop.rs`): hetmem memory handed to cudarc copies and kernel launches
//!   without copying. [`cudarc`] is re-exported so the versions match.
//! - [`compile_ptx`] (`nvrtc.rs`): CUDA C++ compiled at run time by NVRTC.
//! - `driver.rs`: the only file that calls the driver's raw API.
//!
//! cudarc loads `libcuda` and `libnvrtc` at run time, so this builds on machines without CUDA.
//!
//! # Errors
//! Every constructor first checks the driver ([`driver()`]) and returns, never panics:
//! - no driver library: [`Error::Unsupported`](hetmem_core::Error::Unsupported);
//! - a driver too old: [`Error::NotFound`](hetmem_core::Error::NotFound) naming the missing
//!   function, or `Unsupported` for a version below [`MIN_DRIVER_VERSION`];
//! - no device, or the driver refusing to start: [`Error::Gpu`](hetmem_core::Error::Gpu) from
//!   `cuInit` (e.g. `CUDA_ERROR_NO_DEVICE`); a device ordinal that does not exist: `NotFound`;
//! - NVRTC missing: `Unsupported` from [`compile_ptx`] and [`nvrtc_available`];
//! - in a forked child of a process that had loaded the driver: `Unsupported` (CUDA does not
//!   survive `fork()`); the child's copies of the parent's backends, resources and views drop
//!   without calling the driver or touching what they share with the parent (the cudarc streams
//!   and contexts they hold are kept, not released).

mod backend;
mod driver;
mod interop;
mod ipc;
mod nvrtc;
mod resource;

pub use backend::{CudaShmBackend, CudaShmOptions};
pub use driver::{context, driver, DriverInfo, DRIVER_ENV, MIN_DRIVER_VERSION};
pub use interop::{DeviceView, ReadOnlyView};
pub use ipc::{CudaIpcBackend, CudaIpcOptions};
pub use nvrtc::{compile_ptx, compile_ptx_with, nvrtc_available, CompileError, NVRTC_ENV};
pub use resource::{CudaDeviceResource, CudaPinnedResource, PinnedFlags, DEVICE_ALLOC_ALIGN};

pub use cudarc;
