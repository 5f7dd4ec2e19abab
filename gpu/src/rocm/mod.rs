//! ROCm/HIP (feature `rocm`): memory that CPU processes and AMD GPU kernels share.
//!
//! - [`RocmShmBackend`] (`backend.rs`): a shared-memory segment registered with a HIP device.
//! - [`RocmDeviceResource`] (`resource.rs`): device memory as the upstream of pools.
//! - `runtime.rs`: the only file that calls the HIP runtime's raw API; [`hip_sys`] is re-exported
//!   for copies and launches.
//!
//! hip-sys links `libamdhip64`: building needs the HIP headers and library (Debian:
//! `libamdhip64-dev`, with `HIP_PATH=/usr`), and a program built with this feature needs the
//! library to start.
//!
//! # Errors
//! Every constructor first checks for a device ([`runtime()`]) and returns, never panics:
//! no device is [`Error::Gpu`](hetmem_core::Error::Gpu) from `hipGetDeviceCount`
//! (`hipErrorNoDevice`); a device ordinal that does not exist is
//! [`Error::NotFound`](hetmem_core::Error::NotFound); in a forked child of a process that had
//! started the runtime, [`Error::Unsupported`](hetmem_core::Error::Unsupported) (HIP does not
//! survive `fork()`).

mod backend;
mod resource;
mod runtime;

pub use backend::{RocmShmBackend, RocmShmOptions};
pub use resource::{RocmDeviceResource, DEVICE_ALLOC_ALIGN};
pub use runtime::{runtime, RuntimeInfo};

pub use hip_sys;
