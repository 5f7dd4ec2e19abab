/*
 * hetmem_thread.h: hetmem's thread model on the device side, for CUDA and HIP kernels.
 *
 * The host thread models (hetmem-thread-models: Pthreads, StdThreads, Windows) give a thread id,
 * a yield and a sleep, and thread-local storage keys. On a GPU the first three map to the
 * hardware; thread-local storage is a kernel's own local variables, so there are no keys.
 *
 *   hetmem_thread_id()        this thread's index in the whole grid (x fastest, then y, then z)
 *   hetmem_thread_count()     threads in the grid
 *   hetmem_yield()            lets other warps run for a moment (a spin loop's pause)
 *   hetmem_sleep_for_us(us)   suspends this thread for about `us` microseconds
 *
 * CUDA's sleep needs compute capability 7.0 or later (__nanosleep); HIP uses s_sleep, whose unit
 * is 64 clock cycles, so there the time is approximate. The header includes nothing, so NVRTC
 * compiles it as it is (hetmem-gpu's `device::THREAD_HEADER`).
 */
#ifndef HETMEM_THREAD_H
#define HETMEM_THREAD_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(__HIPCC__) || defined(__HIPCC_RTC__)

static __device__ __inline__ unsigned long long hetmem_thread_id(void) {
    unsigned long long block = ((unsigned long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    unsigned long long in_block = ((unsigned long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    return block * ((unsigned long long)blockDim.x * blockDim.y * blockDim.z) + in_block;
}

static __device__ __inline__ unsigned long long hetmem_thread_count(void) {
    unsigned long long blocks = (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
    return blocks * ((unsigned long long)blockDim.x * blockDim.y * blockDim.z);
}

#if defined(__HIPCC__) || defined(__HIPCC_RTC__)
static __device__ __inline__ void hetmem_yield(void) { __builtin_amdgcn_s_sleep(1); }

static __device__ __inline__ void hetmem_sleep_for_us(unsigned int us) {
    /* s_sleep 127 waits about 127 * 64 cycles: ~4 us at 2 GHz. Counted in steps, not in
     * microseconds, so that no `us` near UINT_MAX wraps the count and never ends the loop. */
    for (unsigned int steps = us / 4 + (us % 4 != 0); steps > 0; steps--) __builtin_amdgcn_s_sleep(127);
}
#else
static __device__ __inline__ void hetmem_yield(void) { __nanosleep(32); }

static __device__ __inline__ void hetmem_sleep_for_us(unsigned int us) {
    /* __nanosleep takes at most about 1 ms at once; sleep in steps of 1 us. */
    for (unsigned int t = 0; t < us; t++) __nanosleep(1000);
}
#endif

#endif /* device code */
#endif /* HETMEM_THREAD_H */
