//! hetmem-gpu: GPU memory for hetmem.
//!
//! This crate declares the `cuda` and `rocm` features. Their contents (pinned shared-memory
//! backends registered with the driver, device and pinned memory resources, the device-side
//! allocator, and the GPU thread model) land with the GPU issue; until then, enabling a feature
//! builds and [`available`] says that the support is not compiled in.
#![warn(missing_docs)]

use hetmem_core::{Error, Result};

/// The GPU platforms this build was compiled with.
pub const PLATFORMS: &[&str] = &[
    #[cfg(feature = "cuda")]
    "cuda",
    #[cfg(feature = "rocm")]
    "rocm",
];

/// Whether GPU support for `platform` ("cuda" or "rocm") can be used in this build.
pub fn available(platform: &str) -> Result<()> {
    if !PLATFORMS.contains(&platform) {
        return Err(Error::Unsupported("this GPU platform's feature is not enabled in this build"));
    }
    Err(Error::Unsupported("GPU backends are not implemented yet in this version of hetmem-gpu"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn platforms_without_support_say_so() {
        assert!(super::available("opencl").is_err());
        assert!(super::available("cuda").is_err());
    }
}
