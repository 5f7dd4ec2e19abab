//! The one place that calls the CUDA driver's raw API (cudarc's `sys` level): loading the driver
//! without panicking, its error codes as [`Error`]s, contexts, and thin wrappers over the calls
//! the rest of the module makes. Everything outside this file goes through these functions. An
//! address 0 that a call answers with success is no memory, and comes back as an error.
//!
//! cudarc resolves each driver function the first time it is called and panics if the library or
//! the symbol is missing. [`driver`] therefore checks, once per process, that the library loads,
//! that every function hetmem calls is exported, and that `cuInit` succeeds; nothing else here is
//! called before it has said yes.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use hetmem_core::{Error, Result, ShortStr};

use crate::aligned::driver_address;
use crate::fork_once::ForkOnce;

/// Environment variable naming the driver library to load (a path, e.g.
/// `/usr/local/nvidia/lib64/libcuda.so.1`). When set, that library is used or none is.
pub const DRIVER_ENV: &str = "HETMEM_CUDA_DRIVER";

/// The oldest driver hetmem runs on: CUDA 11.4, the oldest API cudarc binds (stream-ordered
/// allocation needs 11.2, read-only registration 11.1).
pub const MIN_DRIVER_VERSION: i32 = 11_040;

/// Every driver function hetmem (and the cudarc calls it makes: contexts, streams, copies, module
/// loading, launches) uses, by the exact name cudarc resolves.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetUuid_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxGetState",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemHostGetFlags",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuMemHostGetDevicePointer_v2",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuLaunchKernel",
];

/// Functions needed only for stream-ordered allocation; checked when it is asked for.
const ASYNC_ALLOC_SYMBOLS: &[&str] = &["cuMemAllocAsync", "cuMemFreeAsync"];

/// What the loaded driver reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// `cuDriverGetVersion`: 1000 × major + 10 × minor (e.g. 13000 for CUDA 13.0).
    pub version: i32,
    /// How many CUDA devices this process sees.
    pub device_count: usize,
}

/// Loads and initialises the CUDA driver once per process and says what it found.
///
/// # Errors
/// - [`Error::Unsupported`]: the driver library is not installed (or [`DRIVER_ENV`] names one that
///   does not load, is not the driver, or is not the one the loader would hand cudarc), or the
///   driver is older than [`MIN_DRIVER_VERSION`].
/// - [`Error::NotFound`] (`what`: "CUDA driver function"): the driver lacks a function hetmem
///   calls; it is too old.
/// - [`Error::Gpu`] (`call`: "cuInit"): the driver refused to start, e.g. `CUDA_ERROR_NO_DEVICE`
///   on a machine without a GPU, or `CUDA_ERROR_INSUFFICIENT_DRIVER`.
/// - [`Error::Unsupported`] in a forked child of a process that had loaded the driver (or had a
///   thread loading it at the fork): CUDA does not survive `fork()` (any driver call before an
///   `exec` is undefined behaviour), so nothing here calls it there, and dropping the parent's
///   backends in the child leaves them to the parent.
pub fn driver() -> Result<DriverInfo> {
    STATE.get(
        load,
        "this process was forked after it loaded the CUDA driver, which a forked child cannot use \
         (exec a new program to use CUDA)",
    )
}

/// Whether (and what) [`driver`] answered, and in which fork generation.
static STATE: ForkOnce<DriverInfo> = ForkOnce::new();

fn load() -> Result<DriverInfo> {
    let named = std::env::var_os(DRIVER_ENV);
    if let Some(path) = &named {
        preload(path)
            .ok_or(Error::Unsupported("HETMEM_CUDA_DRIVER names a CUDA driver library that could not be loaded"))?;
    }
    // SAFETY: loading the driver library runs its initialisers, which is what loading it is for.
    if !unsafe { sys::is_culib_present() } {
        return Err(match named {
            Some(_) => Error::Unsupported(
                "HETMEM_CUDA_DRIVER names a library that is not the CUDA driver (cudarc finds no libcuda.so.1 \
                 after loading it)",
            ),
            None => Error::Unsupported(
                "the CUDA driver library (libcuda.so.1) was not found: install the NVIDIA driver, or set \
                 HETMEM_CUDA_DRIVER to its path",
            ),
        });
    }
    require_symbols(REQUIRED_SYMBOLS)?;
    if let Some(path) = &named {
        // cudarc loads the driver by name, trying `libcuda.so` before the soname the preloaded
        // library answers to: another driver installed under that name would be used instead.
        if symbol_address(path, "cuInit") != culib_symbol_address("cuInit") {
            return Err(Error::Unsupported(
                "HETMEM_CUDA_DRIVER names one CUDA driver library, but the dynamic loader finds another one first \
                 (libcuda.so on its path), which would be used: unset the variable or remove the other library \
                 from the loader's path",
            ));
        }
    }
    // SAFETY: the library and cuInit are present (checked above); cuInit takes flags 0.
    check("cuInit", unsafe { sys::cuInit(0) })?;
    let mut version = 0;
    // SAFETY: `version` is a valid out-pointer.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
    if version < MIN_DRIVER_VERSION {
        return Err(Error::Unsupported("the CUDA driver is older than 11.4, the oldest hetmem supports"));
    }
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer; the driver is initialised.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
    Ok(DriverInfo { version, device_count: count.max(0) as usize })
}

/// Loads the library at `path` and keeps it loaded for the life of the process, so that cudarc's
/// own lookup by soname finds this copy. `None` if it does not load.
///
/// The handle is leaked rather than kept in a locked list: a forked child (which may look for
/// NVRTC itself) must not wait on a lock that a thread of its parent held at the fork.
pub(crate) fn preload(path: &std::ffi::OsStr) -> Option<()> {
    // SAFETY: loading a shared library runs its initialisers; the caller named a CUDA library.
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // Never unloaded: cudarc's handles and function pointers may point into it.
    std::mem::forget(lib);
    Some(())
}

/// The address of function `name` in the library at `path` (kept loaded by [`preload`]).
pub(crate) fn symbol_address(path: &std::ffi::OsStr, name: &str) -> Option<usize> {
    // SAFETY: the library is already loaded (preloaded), so this only counts one more reference.
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // SAFETY: the symbol is only looked up, never called through this type.
    let f = unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.ok()?;
    Some(*f as usize)
}

/// The address of function `name` in the driver library cudarc loaded.
fn culib_symbol_address(name: &str) -> Option<usize> {
    // SAFETY: only called once `is_culib_present` said the library loads, so `culib` does not panic.
    let lib = unsafe { sys::culib() };
    // SAFETY: the symbol is only looked up, never called through this type.
    let f = unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.ok()?;
    Some(*f as usize)
}

fn require_symbols(names: &[&'static str]) -> Result<()> {
    // SAFETY: only called once `is_culib_present` said the library loads, so `culib` does not panic.
    let lib = unsafe { sys::culib() };
    for &name in names {
        // SAFETY: the symbol is only looked up, never called through this type.
        if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
            return Err(Error::NotFound {
                what: "CUDA driver function (the driver is too old)",
                name: ShortStr::new(name),
            });
        }
    }
    Ok(())
}

/// Whether the driver has stream-ordered allocation (`cuMemAllocAsync`).
pub(crate) fn require_async_alloc() -> Result<()> {
    driver()?;
    require_symbols(ASYNC_ALLOC_SYMBOLS)
}

/// `Ok` for `CUDA_SUCCESS`, else the error with the driver's name for the code.
pub(crate) fn check(call: &'static str, code: CUresult) -> Result<()> {
    if code == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(cuda_error(call, code))
}

/// `code` as an [`Error::Gpu`].
pub(crate) fn cuda_error(call: &'static str, code: CUresult) -> Error {
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: an error code only exists after a driver call, so the library is loaded and
    // cuGetErrorName resolved (it is in REQUIRED_SYMBOLS); `text` is a valid out-pointer.
    let named = unsafe { sys::cuGetErrorName(code, &mut text) } == CUresult::CUDA_SUCCESS;
    let name = if named && !text.is_null() {
        // SAFETY: the driver returns a pointer to a static NUL-terminated string; the library stays
        // loaded for the life of the process (cudarc keeps it in a static), so it lives forever.
        let text: &'static CStr = unsafe { CStr::from_ptr(text) };
        text.to_str().unwrap_or("CUDA error with a non-UTF-8 name")
    } else {
        "unknown CUDA error"
    };
    Error::Gpu { call, code: code as i32, name }
}

/// A cudarc error as an [`Error::Gpu`].
pub(crate) fn from_driver(call: &'static str, e: DriverError) -> Error {
    cuda_error(call, e.0)
}

/// The primary context of device `ordinal`, retained once per process and shared: every hetmem
/// object on that device, and every cudarc object made from it, uses the same context, so device
/// addresses are valid across them.
///
/// # Errors
/// As [`driver`]; [`Error::NotFound`] if there is no device `ordinal`.
pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    static CONTEXTS: Mutex<Option<HashMap<usize, Arc<CudaContext>>>> = Mutex::new(None);
    let info = driver()?;
    if ordinal >= info.device_count {
        return Err(Error::NotFound { what: "CUDA device", name: ShortStr::new(&ordinal.to_string()) });
    }
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    let contexts = contexts.get_or_insert_with(HashMap::new);
    if let Some(ctx) = contexts.get(&ordinal) {
        return Ok(ctx.clone());
    }
    // cudarc makes a context it retains current: the caller's thread stays as it was.
    let _kept = keep_current()?;
    let ctx = CudaContext::new(ordinal).map_err(|e| from_driver("cuDevicePrimaryCtxRetain", e))?;
    contexts.insert(ordinal, ctx.clone());
    Ok(ctx)
}

/// Keeps `handle` (a cudarc context or stream that is about to drop) alive for good in a forked
/// child of a process that used the driver: cudarc releases a context and destroys a stream when
/// its last handle drops, which are driver calls a forked child must not make, and the driver
/// objects are the parent's. Elsewhere it does nothing, and the handle drops as usual.
///
/// `generation` is the fork generation ([`hetmem_core::fork`]) the handle was taken in, after
/// forks were watched: a handle of another generation is the parent's. The driver is not asked
/// (that could load it, and call `cuInit`, in the child of a process that used it only through
/// cudarc); only what [`driver`] already answered counts.
pub(crate) fn keep_in_forked_child<T>(handle: &Arc<T>, generation: u64) {
    if generation != hetmem_core::fork::generation() || STATE.started_before_a_fork() {
        std::mem::forget(handle.clone());
    }
}

/// The fork generation to give [`keep_in_forked_child`] for a handle taken now: forks are
/// watched from here on (if the system refuses, only [`driver`]'s answer tells a child).
pub(crate) fn handle_generation() -> u64 {
    let _ = hetmem_core::fork::watch();
    hetmem_core::fork::generation()
}

/// Makes `ctx` current on this thread (the driver's calls act on the current context) until the
/// returned guard drops, which makes current again the context that was (none, if none was):
/// a hetmem call leaves the caller's thread bound as it found it, as RMM's device guards do.
///
/// Calls the driver directly rather than `CudaContext::bind_to_thread`, which first reports (and
/// clears) any error cudarc recorded earlier for the context, e.g. from an unrelated drop: that
/// error belongs to whoever made it, not to the hetmem call at hand.
///
/// # Errors
/// As [`driver`] (in a forked child it calls nothing), or the driver's.
pub(crate) fn bind(ctx: &CudaContext) -> Result<Bound> {
    let bound = keep_current()?;
    if bound.previous != ctx.cu_ctx() {
        // SAFETY: `ctx` holds a retained primary context, valid while it lives.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx.cu_ctx()) })?;
    }
    Ok(bound)
}

/// A guard that makes current again, when it drops, the context that was current on this thread
/// when it was made (see [`bind`]).
#[must_use = "dropping the guard makes the previous context current again at once"]
pub(crate) struct Bound {
    previous: sys::CUcontext,
}

/// Records this thread's current context, to be made current again when the guard drops.
///
/// # Errors
/// As [`driver`] (in a forked child it calls nothing), or the driver's.
pub(crate) fn keep_current() -> Result<Bound> {
    driver()?;
    let mut previous = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the driver is initialised.
    check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut previous) })?;
    Ok(Bound { previous })
}

impl Drop for Bound {
    fn drop(&mut self) {
        let mut now = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the driver answered when the guard was made (in this
        // process: guards live within one call, on one thread).
        let asked = unsafe { sys::cuCtxGetCurrent(&mut now) };
        if asked == CUresult::CUDA_SUCCESS && now != self.previous {
            // SAFETY: the context that was current on this thread when the guard was made (or
            // null, none): its owner, who made it current, keeps it alive across our call. Errors
            // cannot be reported from drop; the thread is then left as the call left it.
            let _ = unsafe { sys::cuCtxSetCurrent(self.previous) };
        }
    }
}

/// `cuCtxSynchronize`: waits for all work queued in the current context (callers bind first).
pub(crate) fn synchronize() -> Result<()> {
    // SAFETY: no arguments; a context is current.
    check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
}

/// Waits for the work queued in every device's primary context that is in use in this process,
/// then makes `ctx` current again. Memory registered portable is reachable from every context,
/// and device memory from its peers, so work queued through any of them (a cudarc copy on another
/// device's stream into a view) may use a backend's memory, not only work in its own context.
/// Every context is tried; the first error is returned.
///
/// Contexts that are not primary contexts (made with `cuCtxCreate`) are not seen.
fn synchronize_all(ctx: &CudaContext) -> Result<()> {
    let mut outcome = Ok(());
    for ordinal in 0..driver()?.device_count {
        let synced = synchronize_primary(ordinal);
        if outcome.is_ok() {
            outcome = synced;
        }
    }
    // SAFETY: `ctx` holds a retained context, valid while it lives.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx.cu_ctx()) })?;
    outcome
}

/// [`synchronize_all`] for a drop that has bound `ctx` (see [`bind`]): `false` when `ctx` cannot
/// be made current again afterwards, so there is no context to release anything in. A failed
/// synchronisation (a context in an error state) means nothing runs there any more: `ctx` is
/// then made current again (its guard still restores the caller's context when it drops).
pub(crate) fn synchronize_all_bound(ctx: &CudaContext) -> bool {
    if synchronize_all(ctx).is_ok() {
        return true;
    }
    let mut current = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the driver answered for the caller's `bind`.
    if unsafe { sys::cuCtxGetCurrent(&mut current) } != CUresult::CUDA_SUCCESS {
        return false;
    }
    // SAFETY: `ctx` holds a retained primary context, valid while it lives.
    current == ctx.cu_ctx() || unsafe { sys::cuCtxSetCurrent(ctx.cu_ctx()) } == CUresult::CUDA_SUCCESS
}

/// Synchronises device `ordinal`'s primary context if it is active (otherwise nothing can be
/// queued in it); leaves it current (or, if it went inactive meanwhile, a released one).
fn synchronize_primary(ordinal: usize) -> Result<()> {
    let mut device = 0;
    // SAFETY: the driver is initialised; `device` is a valid out-pointer.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut device, ordinal as i32) })?;
    let (mut flags, mut active) = (0, 0);
    // SAFETY: valid out-pointers; `device` came from cuDeviceGet.
    check("cuDevicePrimaryCtxGetState", unsafe { sys::cuDevicePrimaryCtxGetState(device, &mut flags, &mut active) })?;
    if active == 0 {
        return Ok(());
    }
    let mut primary = std::ptr::null_mut();
    // SAFETY: valid out-pointer; retained here and released below, so it stays valid meanwhile.
    check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut primary, device) })?;
    // SAFETY: `primary` is retained (above).
    let synced = check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(primary) }).and_then(|()| synchronize());
    // SAFETY: retained above; the process's other holders keep their own references.
    let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(device) };
    synced
}

/// A device attribute of `ctx`'s device.
pub(crate) fn attribute(ctx: &CudaContext, attr: CUdevice_attribute) -> Result<i32> {
    driver()?;
    let mut value = 0;
    // SAFETY: valid out-pointer; `ctx` holds a valid device handle.
    check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut value, attr, ctx.cu_device()) })?;
    Ok(value)
}

/// The compute capability (major, minor) of `ctx`'s device.
pub(crate) fn compute_capability(ctx: &CudaContext) -> Result<(i32, i32)> {
    Ok((
        attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    ))
}

/// Whether `ctx`'s device can register host memory read-only for the device.
pub(crate) fn read_only_register_supported(ctx: &CudaContext) -> Result<bool> {
    Ok(attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED)? != 0)
}

/// Whether `ctx`'s device and the CPU can work on the same words of host memory with atomics at
/// the same time: its link to the host carries atomics natively (NVLink-C2C on Grace Hopper),
/// which PCIe does not. Without it a device atomic on host memory is atomic among the device's
/// threads only, not against the CPU's.
pub(crate) fn host_native_atomics(ctx: &CudaContext) -> Result<bool> {
    Ok(attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HOST_NATIVE_ATOMIC_SUPPORTED)? != 0)
}

/// Whether `ctx`'s device supports stream-ordered allocation from its default memory pool.
pub(crate) fn memory_pools_supported(ctx: &CudaContext) -> Result<bool> {
    Ok(attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)? != 0)
}

/// The UUID of device `ordinal`, which names the same GPU in every process whatever its ordinal.
pub(crate) fn device_uuid(ordinal: usize) -> Result<[u8; 16]> {
    driver()?;
    let mut device = 0;
    // SAFETY: the driver is initialised; `device` is a valid out-pointer.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut device, ordinal as i32) })?;
    // SAFETY: an all-zero CUuuid is a valid value to be overwritten.
    let mut uuid: sys::CUuuid = unsafe { std::mem::zeroed() };
    // SAFETY: `uuid` is a valid out-pointer; `device` came from cuDeviceGet.
    check("cuDeviceGetUuid_v2", unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, device) })?;
    Ok(uuid.bytes.map(|b| b as u8))
}

/// Free and total device memory of the current context's device.
pub(crate) fn mem_get_info() -> Result<(usize, usize)> {
    let (mut free, mut total) = (0, 0);
    // SAFETY: valid out-pointers; called with a context current.
    check("cuMemGetInfo_v2", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
    Ok((free, total))
}

/// Out of memory as [`Error::OutOfMemory`], other failures as they are.
fn alloc_error(call: &'static str, code: CUresult, requested: usize, available: impl FnOnce() -> u64) -> Error {
    if code == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Error::OutOfMemory { requested: requested as u64, available: available() };
    }
    cuda_error(call, code)
}

fn free_device_memory() -> u64 {
    mem_get_info().map(|(free, _)| free as u64).unwrap_or(0)
}

/// `cuMemAlloc` in the current context.
pub(crate) fn mem_alloc(size: usize) -> Result<u64> {
    let mut dptr = 0;
    // SAFETY: `dptr` is a valid out-pointer; a context is current (callers bind first).
    let code = unsafe { sys::cuMemAlloc_v2(&mut dptr, size) };
    if code != CUresult::CUDA_SUCCESS {
        return Err(alloc_error("cuMemAlloc", code, size, free_device_memory));
    }
    driver_address("cuMemAlloc", dptr)
}

/// `cuMemFree`.
///
/// # Safety
/// `dptr` came from [`mem_alloc`] and is not used again.
pub(crate) unsafe fn mem_free(dptr: u64) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemFree", unsafe { sys::cuMemFree_v2(dptr) })
}

/// `cuMemAllocAsync` on `stream` (from the device's default memory pool).
pub(crate) fn mem_alloc_async(size: usize, stream: &CudaStream) -> Result<u64> {
    let mut dptr = 0;
    // SAFETY: `dptr` is a valid out-pointer; `stream` is a live stream of the current context;
    // the async symbols were checked when the stream-ordered resource was made.
    let code = unsafe { sys::cuMemAllocAsync(&mut dptr, size, stream.cu_stream()) };
    if code != CUresult::CUDA_SUCCESS {
        return Err(alloc_error("cuMemAllocAsync", code, size, free_device_memory));
    }
    driver_address("cuMemAllocAsync", dptr)
}

/// `cuMemFreeAsync` on `stream`.
///
/// # Safety
/// `dptr` came from [`mem_alloc_async`] and no work enqueued after this uses it.
pub(crate) unsafe fn mem_free_async(dptr: u64, stream: &CudaStream) -> Result<()> {
    // SAFETY: the caller's contract; `stream` is live.
    check("cuMemFreeAsync", unsafe { sys::cuMemFreeAsync(dptr, stream.cu_stream()) })
}

/// `cuMemHostAlloc` with `flags`.
pub(crate) fn host_alloc(size: usize, flags: u32) -> Result<*mut c_void> {
    let mut ptr = std::ptr::null_mut();
    // SAFETY: `ptr` is a valid out-pointer; a context is current.
    let code = unsafe { sys::cuMemHostAlloc(&mut ptr, size, flags) };
    if code != CUresult::CUDA_SUCCESS {
        return Err(alloc_error("cuMemHostAlloc", code, size, || 0));
    }
    driver_address("cuMemHostAlloc", ptr as u64).map(|_| ptr)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// `ptr` came from [`host_alloc`] and is not used again.
pub(crate) unsafe fn free_host(ptr: *mut c_void) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(ptr) })
}

/// The flags pinned host memory at `ptr` was allocated or registered with.
pub(crate) fn host_get_flags(ptr: *mut c_void) -> Result<u32> {
    let mut flags = 0;
    // SAFETY: valid out-pointer; the driver only looks `ptr` up.
    check("cuMemHostGetFlags", unsafe { sys::cuMemHostGetFlags(&mut flags, ptr) })?;
    Ok(flags)
}

/// `cuMemHostRegister`: pins `len` bytes at `ptr` and maps them for the device.
///
/// # Safety
/// `ptr..ptr + len` is a mapping that stays valid until [`host_unregister`] is called on it.
pub(crate) unsafe fn host_register(ptr: *mut u8, len: usize, flags: u32) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemHostRegister", unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, flags) })
}

/// `cuMemHostUnregister`.
///
/// # Safety
/// `ptr` was registered by [`host_register`]; no device work that uses it is still running.
pub(crate) unsafe fn host_unregister(ptr: *mut u8) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemHostUnregister", unsafe { sys::cuMemHostUnregister(ptr.cast()) })
}

/// The device address of pinned, device-mapped host memory at `ptr`.
pub(crate) fn host_device_pointer(ptr: *mut c_void) -> Result<u64> {
    let mut dptr = 0;
    // SAFETY: valid out-pointer; the driver only looks `ptr` up (flags must be 0).
    check("cuMemHostGetDevicePointer", unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr, 0) })?;
    driver_address("cuMemHostGetDevicePointer", dptr)
}

/// The bytes of an IPC handle.
pub(crate) const IPC_HANDLE_LEN: usize = 64;

/// `cuIpcGetMemHandle` for an allocation made by [`mem_alloc`].
pub(crate) fn ipc_get_handle(dptr: u64) -> Result<[u8; IPC_HANDLE_LEN]> {
    // SAFETY: an all-zero handle is a valid value to be overwritten.
    let mut handle: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer; the driver checks `dptr`.
    check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut handle, dptr) })?;
    Ok(handle.reserved.map(|b| b as u8))
}

/// `cuIpcOpenMemHandle` (peer access enabled lazily): the exporting process's allocation, mapped
/// into this one.
pub(crate) fn ipc_open(handle: &[u8; IPC_HANDLE_LEN]) -> Result<u64> {
    let handle = sys::CUipcMemHandle { reserved: handle.map(|b| b as c_char) };
    let mut dptr = 0;
    // SAFETY: valid out-pointer; the driver validates the handle's bytes.
    check("cuIpcOpenMemHandle", unsafe {
        sys::cuIpcOpenMemHandle_v2(&mut dptr, handle, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32)
    })?;
    driver_address("cuIpcOpenMemHandle", dptr)
}

/// `cuIpcCloseMemHandle`.
///
/// # Safety
/// `dptr` came from [`ipc_open`] and is not used again.
pub(crate) unsafe fn ipc_close(dptr: u64) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuIpcCloseMemHandle", unsafe { sys::cuIpcCloseMemHandle(dptr) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fork_once::in_child;

    /// Whatever this machine has (no driver in CI, a GPU on the check machine), loading the driver
    /// answers with a value or one of the documented errors, and asking twice gives the same answer.
    #[test]
    fn loading_the_driver_answers_without_panicking() {
        let first = driver();
        match first {
            Ok(info) => assert!(info.version >= MIN_DRIVER_VERSION, "{info:?}"),
            Err(Error::Unsupported(_)) | Err(Error::NotFound { .. }) => {}
            Err(Error::Gpu { call, .. }) => assert_eq!(call, "cuInit"),
            Err(other) => panic!("undocumented error {other:?}"),
        }
        assert_eq!(driver(), first);
        match (first, context(usize::MAX)) {
            (Ok(_), Err(Error::NotFound { what, .. })) => assert_eq!(what, "CUDA device"),
            (Err(e), Err(again)) => assert_eq!(e, again, "context() reports the driver's error"),
            (_, other) => panic!("context(usize::MAX): {other:?}"),
        }
    }

    /// A forked child may look for NVRTC itself (see `nvrtc_available`), which preloads
    /// libraries: it must not wait on a lock that a thread of its parent, preloading at the fork,
    /// held (that thread does not run in the child to give it back).
    #[test]
    fn a_child_forked_while_a_thread_preloads_can_preload() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let libc_so: &std::ffi::OsStr = "libc.so.6".as_ref();
        assert!(preload(libc_so).is_some());
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    preload(libc_so);
                }
            })
        };
        let mut child = Some(true);
        for _ in 0..200 {
            child = in_child(|| preload(libc_so).is_some());
            if child != Some(true) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        assert_eq!(
            child,
            Some(true),
            "a child forked while a thread preloaded waited for ever (None) or could not load libc"
        );
    }
}
