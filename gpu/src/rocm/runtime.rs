//! The one place that calls the HIP runtime's raw API (hip-sys): its error codes as [`Error`]s, the
//! device check every constructor starts with, and thin wrappers over the calls the rest of the
//! module makes. An address 0 that a call answers with success is no memory, and comes back as an
//! error.

use std::ffi::{c_void, CStr};

use hetmem_core::{Error, Result, ShortStr};

use crate::aligned::driver_address;
use crate::fork_once::ForkOnce;
use hip_sys::hiprt::{self, hipError_t};

/// What the HIP runtime reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// `hipRuntimeGetVersion`.
    pub version: i32,
    /// How many HIP devices this process sees (at least one: none is an error).
    pub device_count: usize,
}

/// Checks once per process that the HIP runtime has a device.
///
/// # Errors
/// [`Error::Gpu`] from `hipGetDeviceCount`, e.g. `hipErrorNoDevice` on a machine without an AMD
/// GPU (or without access to `/dev/kfd`). [`Error::Unsupported`] in a forked child of a process
/// that had started the runtime (or had a thread starting it at the fork): HIP does not survive
/// `fork()`, so nothing here calls it there, and dropping the parent's backends in the child
/// leaves their registrations to the parent.
pub fn runtime() -> Result<RuntimeInfo> {
    static STATE: ForkOnce<RuntimeInfo> = ForkOnce::new();
    STATE.get(
        start,
        "this process was forked after it started the HIP runtime, which a forked child cannot use \
         (exec a new program to use HIP)",
    )
}

fn start() -> Result<RuntimeInfo> {
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer.
    check("hipGetDeviceCount", unsafe { hiprt::hipGetDeviceCount(&mut count) })?;
    if count <= 0 {
        return Err(Error::Gpu { call: "hipGetDeviceCount", code: 0, name: "no HIP device" });
    }
    let mut version = 0;
    // SAFETY: `version` is a valid out-pointer.
    check("hipRuntimeGetVersion", unsafe { hiprt::hipRuntimeGetVersion(&mut version) })?;
    Ok(RuntimeInfo { version, device_count: count as usize })
}

/// Checks the runtime and makes `device` current on this thread until the returned guard drops,
/// which makes current again the device that was: a hetmem call leaves the caller's thread on
/// the device it found it on, as RMM's device guards do.
///
/// # Errors
/// As [`runtime`]; [`Error::NotFound`] if there is no device `device`.
pub(crate) fn use_device(device: usize) -> Result<DeviceGuard> {
    if device >= runtime()?.device_count {
        return Err(Error::NotFound { what: "HIP device", name: ShortStr::new(&device.to_string()) });
    }
    let mut previous = 0;
    // SAFETY: a valid out-pointer.
    check("hipGetDevice", unsafe { hiprt::hipGetDevice(&mut previous) })?;
    if previous != device as i32 {
        // SAFETY: a valid device ordinal (checked).
        check("hipSetDevice", unsafe { hiprt::hipSetDevice(device as i32) })?;
    }
    Ok(DeviceGuard { previous })
}

/// A guard that makes current again, when it drops, the device that was current on this thread
/// when it was made (see [`use_device`]).
#[must_use = "dropping the guard makes the previous device current again at once"]
pub(crate) struct DeviceGuard {
    previous: i32,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        let mut now = self.previous;
        // SAFETY: a valid out-pointer; the runtime answered when the guard was made.
        let asked = unsafe { hiprt::hipGetDevice(&mut now) };
        if asked == hipError_t::hipSuccess && now != self.previous {
            // SAFETY: the ordinal the runtime gave for this thread's device. Errors cannot be
            // reported from drop; the thread is then left on the call's device.
            let _ = unsafe { hiprt::hipSetDevice(self.previous) };
        }
    }
}

/// `Ok` for `hipSuccess`, else the error with the runtime's name for the code.
pub(crate) fn check(call: &'static str, code: hipError_t) -> Result<()> {
    if code == hipError_t::hipSuccess {
        return Ok(());
    }
    // SAFETY: hipGetErrorName takes any code and returns a static string (or null).
    let text = unsafe { hiprt::hipGetErrorName(code) };
    let name = if text.is_null() {
        "unknown HIP error"
    } else {
        // SAFETY: a NUL-terminated string in the runtime's static data; the runtime is linked into
        // the program, so it lives as long as the process.
        let text: &'static CStr = unsafe { CStr::from_ptr(text) };
        text.to_str().unwrap_or("HIP error with a non-UTF-8 name")
    };
    Err(Error::Gpu { call, code: code as i32, name })
}

/// `hipMalloc` on the current device; out of memory is [`Error::OutOfMemory`].
pub(crate) fn malloc(size: usize) -> Result<u64> {
    let mut ptr: *mut c_void = std::ptr::null_mut();
    // SAFETY: `ptr` is a valid out-pointer.
    let code = unsafe { hiprt::hipMalloc(&mut ptr, size) };
    if code == hipError_t::hipErrorOutOfMemory {
        let (mut free, mut total) = (0, 0);
        // SAFETY: valid out-pointers.
        let _ = unsafe { hiprt::hipMemGetInfo(&mut free, &mut total) };
        return Err(Error::OutOfMemory { requested: size as u64, available: free as u64 });
    }
    check("hipMalloc", code)?;
    driver_address("hipMalloc", ptr as u64)
}

/// `hipFree`.
///
/// # Safety
/// `ptr` came from [`malloc`] and is not used again.
pub(crate) unsafe fn free(ptr: u64) -> Result<()> {
    // SAFETY: the caller's contract.
    check("hipFree", unsafe { hiprt::hipFree(ptr as *mut c_void) })
}

/// `hipHostRegister` (portable + mapped).
///
/// # Safety
/// `ptr..ptr + len` is a mapping that stays valid until [`host_unregister`] is called on it.
pub(crate) unsafe fn host_register(ptr: *mut u8, len: usize) -> Result<()> {
    let flags = hiprt::hipHostRegisterPortable | hiprt::hipHostRegisterMapped;
    // SAFETY: the caller's contract.
    check("hipHostRegister", unsafe { hiprt::hipHostRegister(ptr.cast(), len, flags) })
}

/// `hipHostUnregister`.
///
/// # Safety
/// `ptr` was registered by [`host_register`]; no device work that uses it is still running.
pub(crate) unsafe fn host_unregister(ptr: *mut u8) -> Result<()> {
    // SAFETY: the caller's contract.
    check("hipHostUnregister", unsafe { hiprt::hipHostUnregister(ptr.cast()) })
}

/// Waits for the work queued on every device of this process (`hipDeviceSynchronize` on each),
/// leaving the caller's thread on the device it was on. A drop that unregisters host memory calls
/// it first: the memory is registered portable, so copies and kernels on any device may still use
/// it, and `hipHostUnregister` is not documented to wait for them. A device that fails to
/// synchronise (an error state) runs nothing any more, so failures are not reported.
pub(crate) fn synchronize_all() {
    let Ok(info) = runtime() else { return };
    for device in 0..info.device_count {
        if let Ok(_device) = use_device(device) {
            // SAFETY: no arguments; the runtime answered above.
            let _ = unsafe { hiprt::hipDeviceSynchronize() };
        }
    }
}

/// Whether `device` and the CPU can work on the same words of host memory with atomics at the
/// same time (`hipDeviceAttributeHostNativeAtomicSupported`). HIP documents the attribute for
/// CUDA devices; a runtime that does not answer it is taken as "no", the safe answer.
pub(crate) fn host_native_atomics(device: usize) -> bool {
    let mut value = 0;
    // SAFETY: a valid out-pointer; the caller checked `device` with `use_device`.
    let code = unsafe {
        hiprt::hipDeviceGetAttribute(
            &mut value,
            hiprt::hipDeviceAttribute_t::hipDeviceAttributeHostNativeAtomicSupported,
            device as i32,
        )
    };
    code == hipError_t::hipSuccess && value != 0
}

/// The device address of registered, mapped host memory at `ptr`.
pub(crate) fn host_device_pointer(ptr: *mut u8) -> Result<u64> {
    let mut dptr: *mut c_void = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the runtime only looks `ptr` up.
    check("hipHostGetDevicePointer", unsafe { hiprt::hipHostGetDevicePointer(&mut dptr, ptr.cast(), 0) })?;
    driver_address("hipHostGetDevicePointer", dptr as u64)
}
