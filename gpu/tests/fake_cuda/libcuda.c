/*
 * A fake CUDA driver for the host-side tests (tests/cuda_fake_driver.rs): it exports every function
 * hetmem checks for, with one device (compute capability 9.0; FAKE_CUDA_DEVICES=2 at cuInit makes
 * two), each with a primary context, and keeps "device" memory in host memory. It counts every call and what is still allocated, registered or opened, and the
 * tests read those counts through the fake_* functions; fake_fail makes one call fail, and fake_null
 * makes one call that hands out an address answer success with address 0 instead. Device-to-
 * device copies are done at once but count as pending in the current context until it is
 * synchronised, and memory released while any context has one pending is counted. Streams are counted handles to nothing. Calls no test makes (other copies,
 * events, modules, launches) answer CUDA_ERROR_NOT_SUPPORTED.
 *
 * Built by the tests with the host C compiler, with the soname libcuda.so.1, and named to hetmem by
 * HETMEM_CUDA_DRIVER.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { char reserved[64]; } CUipcMemHandle;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    NOT_SUPPORTED = 801,
    UNKNOWN = 999,
};

static long calls, allocations, host_allocations, registrations, opened_handles, streams;
/* Whether a copy was queued since the last synchronisation (the fake copies at once, but a real
 * driver may still be copying), and how often memory was released while one was. */
static int pending[2];
static long unsynced_releases;
/* The one call that fails (with CUDA_ERROR_UNKNOWN) until cleared, set by fake_fail. */
static char failing[64];
static int device_count = 1;
static int primary_context[2];
static long retained[2];
static __thread CUcontext current;

#define COUNT() __atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST)
#define ADD(counter, n) __atomic_fetch_add(&(counter), (n), __ATOMIC_SEQ_CST)

/* Makes `name` (a driver function) fail from now on; NULL or "" makes every call succeed again. */
void fake_fail(const char *name) {
    memset(failing, 0, sizeof failing);
    if (name != NULL) strncpy(failing, name, sizeof failing - 1);
}
#define FAILS(name) if (strcmp(failing, name) == 0) return UNKNOWN;

/* The one call that answers success with address 0 (and hands out nothing) until cleared, set by
 * fake_null: a driver bug hetmem must not take for an address. */
static char nulled[64];
void fake_null(const char *name) {
    memset(nulled, 0, sizeof nulled);
    if (name != NULL) strncpy(nulled, name, sizeof nulled - 1);
}
#define NULLS(name, out) if (strcmp(nulled, name) == 0) { *(out) = 0; return SUCCESS; }

/* What the tests read. */
long fake_calls(void) { return __atomic_load_n(&calls, __ATOMIC_SEQ_CST); }
long fake_allocations(void) { return __atomic_load_n(&allocations, __ATOMIC_SEQ_CST); }
long fake_host_allocations(void) { return __atomic_load_n(&host_allocations, __ATOMIC_SEQ_CST); }
long fake_registrations(void) { return __atomic_load_n(&registrations, __ATOMIC_SEQ_CST); }
long fake_opened_handles(void) { return __atomic_load_n(&opened_handles, __ATOMIC_SEQ_CST); }
long fake_streams(void) { return __atomic_load_n(&streams, __ATOMIC_SEQ_CST); }
long fake_unsynced_releases(void) { return __atomic_load_n(&unsynced_releases, __ATOMIC_SEQ_CST); }

/* Memory that queued device work may still use is released. */
static void released(void) {
    if (__atomic_load_n(&pending[0], __ATOMIC_SEQ_CST) || __atomic_load_n(&pending[1], __ATOMIC_SEQ_CST))
        ADD(unsynced_releases, 1);
}

CUresult cuInit(unsigned flags) {
    COUNT();
    const char *devices = getenv("FAKE_CUDA_DEVICES");
    if (devices != NULL && strcmp(devices, "2") == 0) device_count = 2;
    return flags == 0 ? SUCCESS : INVALID_VALUE;
}
CUresult cuDriverGetVersion(int *version) { COUNT(); *version = 13000; return SUCCESS; }
CUresult cuDeviceGetCount(int *count) { COUNT(); *count = device_count; return SUCCESS; }

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    COUNT();
    if (ordinal < 0 || ordinal >= device_count) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    COUNT();
    FAILS("cuDeviceGetAttribute")
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    switch (attribute) {
    case 75: *value = 9; break;  /* compute capability major */
    case 76: *value = 0; break;  /* minor */
    case 86: *value = device == 0; break; /* host-native atomics: device 0's link (C2C), not 1's (PCIe) */
    default: *value = 1; break;  /* every feature asked about: supported */
    }
    return SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice device) {
    COUNT();
    FAILS("cuDeviceGetUuid_v2")
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    memcpy(uuid->bytes, device == 0 ? "hetmem-fake-gpu0" : "hetmem-fake-gpu1", 16);
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device) {
    COUNT();
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    *ctx = &primary_context[device];
    ADD(retained[device], 1);
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    COUNT();
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    ADD(retained[device], -1);
    return SUCCESS;
}
CUresult cuDevicePrimaryCtxGetState(CUdevice device, unsigned *flags, int *active) {
    COUNT();
    if (device < 0 || device >= device_count) return INVALID_DEVICE;
    *flags = 0;
    *active = __atomic_load_n(&retained[device], __ATOMIC_SEQ_CST) > 0;
    return SUCCESS;
}
/* The index of the current context in `pending` (0 without one). */
static int current_index(void) { return current == &primary_context[1]; }
CUresult cuCtxGetCurrent(CUcontext *ctx) { COUNT(); *ctx = current; return SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext ctx) { COUNT(); current = ctx; return SUCCESS; }

CUresult cuGetErrorName(CUresult code, const char **name) {
    COUNT();
    switch (code) {
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
    case NOT_SUPPORTED: *name = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case UNKNOWN: *name = "CUDA_ERROR_UNKNOWN"; break;
    default: *name = "CUDA_ERROR_FAKE"; break;
    }
    return SUCCESS;
}
CUresult cuGetErrorString(CUresult code, const char **text) { return cuGetErrorName(code, text); }

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    COUNT();
    *free_bytes = (size_t)1 << 30;
    *total = (size_t)1 << 30;
    return SUCCESS;
}

/* "Device" memory: host memory, 256-aligned as cuMemAlloc's is. More than 1 GiB at once is out of
 * memory, here and for pinned memory. */
CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) {
    COUNT();
    FAILS("cuMemAlloc_v2")
    if (current == NULL) return 201; /* CUDA_ERROR_INVALID_CONTEXT */
    if (size == 0) return INVALID_VALUE;
    if (size > ((size_t)1 << 30)) return OUT_OF_MEMORY;
    NULLS("cuMemAlloc_v2", dptr)
    void *p = aligned_alloc(256, (size + 255) & ~(size_t)255);
    if (p == NULL) return OUT_OF_MEMORY;
    ADD(allocations, 1);
    *dptr = (CUdeviceptr)(uintptr_t)p;
    return SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr dptr) {
    COUNT();
    released();
    if (dptr == 0) return INVALID_VALUE;
    free((void *)(uintptr_t)dptr);
    ADD(allocations, -1);
    return SUCCESS;
}

CUresult cuMemHostAlloc(void **ptr, size_t size, unsigned flags) {
    COUNT();
    FAILS("cuMemHostAlloc")
    (void)flags;
    if (size == 0) return INVALID_VALUE;
    if (size > ((size_t)1 << 30)) return OUT_OF_MEMORY;
    NULLS("cuMemHostAlloc", ptr)
    void *p = aligned_alloc(4096, (size + 4095) & ~(size_t)4095);
    if (p == NULL) return OUT_OF_MEMORY;
    ADD(host_allocations, 1);
    *ptr = p;
    return SUCCESS;
}
CUresult cuMemFreeHost(void *ptr) {
    COUNT();
    free(ptr);
    ADD(host_allocations, -1);
    return SUCCESS;
}
CUresult cuMemHostGetFlags(unsigned *flags, void *ptr) { COUNT(); (void)ptr; *flags = 0; return SUCCESS; }

CUresult cuMemHostRegister_v2(void *ptr, size_t size, unsigned flags) {
    COUNT();
    FAILS("cuMemHostRegister_v2")
    (void)flags;
    if (ptr == NULL || size == 0) return INVALID_VALUE;
    ADD(registrations, 1);
    return SUCCESS;
}
CUresult cuMemHostUnregister(void *ptr) {
    COUNT();
    released();
    if (ptr == NULL) return INVALID_VALUE;
    ADD(registrations, -1);
    return SUCCESS;
}
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *dptr, void *ptr, unsigned flags) {
    COUNT();
    FAILS("cuMemHostGetDevicePointer_v2")
    if (flags != 0) return INVALID_VALUE;
    NULLS("cuMemHostGetDevicePointer_v2", dptr)
    *dptr = (CUdeviceptr)(uintptr_t)ptr;
    return SUCCESS;
}

/* The handle carries the exporter's address; an importer gets a different, never dereferenced one. */
CUresult cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr) {
    COUNT();
    FAILS("cuIpcGetMemHandle")
    memset(handle->reserved, 0, sizeof handle->reserved);
    memcpy(handle->reserved, &dptr, sizeof dptr);
    return SUCCESS;
}
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *dptr, CUipcMemHandle handle, unsigned flags) {
    COUNT();
    FAILS("cuIpcOpenMemHandle_v2")
    (void)flags;
    CUdeviceptr exported;
    memcpy(&exported, handle.reserved, sizeof exported);
    if (exported == 0) return INVALID_VALUE;
    NULLS("cuIpcOpenMemHandle_v2", dptr)
    ADD(opened_handles, 1);
    *dptr = exported ^ 0x7000000000000000ull;
    return SUCCESS;
}
CUresult cuIpcCloseMemHandle(CUdeviceptr dptr) {
    COUNT();
    released();
    (void)dptr;
    ADD(opened_handles, -1);
    return SUCCESS;
}

/* Copies on any stream: done at once, but pending in the current context (cudarc makes the stream's
 * context current first) until it is synchronised. */
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void *stream) {
    COUNT();
    (void)stream;
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, bytes);
    __atomic_store_n(&pending[current_index()], 1, __ATOMIC_SEQ_CST);
    return SUCCESS;
}
CUresult cuCtxSynchronize(void) {
    COUNT();
    __atomic_store_n(&pending[current_index()], 0, __ATOMIC_SEQ_CST);
    return SUCCESS;
}
CUresult cuStreamSynchronize(void *stream) {
    COUNT();
    (void)stream;
    __atomic_store_n(&pending[current_index()], 0, __ATOMIC_SEQ_CST);
    return SUCCESS;
}

/* Streams: handles to nothing, counted while they live. */
static char stream_handles;
CUresult cuStreamCreate(void **stream, unsigned flags) {
    COUNT();
    (void)flags;
    if (current == NULL) return 201; /* CUDA_ERROR_INVALID_CONTEXT */
    ADD(streams, 1);
    *stream = &stream_handles;
    return SUCCESS;
}
CUresult cuStreamDestroy_v2(void *stream) {
    COUNT();
    if (stream != &stream_handles) return INVALID_VALUE;
    ADD(streams, -1);
    return SUCCESS;
}

/* Present so that hetmem's symbol check passes; no test calls them. */
#define UNSUPPORTED(name) CUresult name(void) { COUNT(); return NOT_SUPPORTED; }
UNSUPPORTED(cuStreamWaitEvent)
UNSUPPORTED(cuEventCreate)
UNSUPPORTED(cuEventDestroy_v2)
UNSUPPORTED(cuEventRecord)
UNSUPPORTED(cuMemcpyHtoDAsync_v2)
UNSUPPORTED(cuMemcpyDtoHAsync_v2)
UNSUPPORTED(cuModuleLoadData)
UNSUPPORTED(cuModuleUnload)
UNSUPPORTED(cuModuleGetFunction)
UNSUPPORTED(cuLaunchKernel)
UNSUPPORTED(cuMemAllocAsync)
UNSUPPORTED(cuMemFreeAsync)
