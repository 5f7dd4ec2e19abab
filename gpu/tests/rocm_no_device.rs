//! Without an AMD GPU (CI), every ROCm entry point returns the runtime's error, leaves nothing
//! behind, and never panics. On a machine with a HIP device this says so and checks nothing.

use hetmem_backends::PosixShmBackend;
use hetmem_core::Error;
use hetmem_gpu::rocm::{runtime, RocmDeviceResource, RocmShmBackend, RocmShmOptions};

#[test]
fn without_a_device_every_entry_point_returns_the_runtime_error() {
    let err = match runtime() {
        Ok(info) => {
            println!("skipped: this machine has {} HIP device(s); rocm_gpu tests them", info.device_count);
            return;
        }
        Err(e) => e,
    };
    assert!(matches!(err, Error::Gpu { call: "hipGetDeviceCount", .. }), "{err:?}");
    println!("no HIP device: {err}");
    let name = format!("/hetmem-rocm-nodev-{}", std::process::id());
    let r = RocmShmBackend::create(&name, 1 << 16, &RocmShmOptions::default());
    assert_eq!(r.err(), Some(err));
    assert!(!PosixShmBackend::exists(&name).unwrap(), "a failed create must not leave a segment behind");
    assert_eq!(RocmShmBackend::attach(&name, &RocmShmOptions::default()).err(), Some(err));
    assert_eq!(RocmDeviceResource::new(0).err(), Some(err));
    assert_eq!(runtime().err(), Some(err), "the answer is cached, not retried");
}
