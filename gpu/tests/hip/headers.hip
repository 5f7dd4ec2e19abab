// The device-side headers compiled for an AMD GPU (device code only, no GPU needed):
// `ci/gpu-ci.sh` runs `hipcc --offload-arch=gfx90a --cuda-device-only -c` on this file.
#include <hip/hip_runtime.h>

#include "hetmem_bitmap.h"
#include "hetmem_thread.h"

extern "C" __global__ void bitmap_alloc_free(unsigned char *base, unsigned long long region,
                                             unsigned long long region_len, unsigned long long *out, int *status) {
    unsigned long long i = hetmem_thread_id();
    hetmem_bitmap heap = {base, region, region_len};
    unsigned long long off = hetmem_bitmap_alloc(heap, 64 + i % 1000, 16, i);
    out[i] = off;
    status[i] = off ? hetmem_bitmap_free(heap, off) : -100;
    if (hetmem_bitmap_size_of(heap, off) != 0) status[i] = -200;
    hetmem_yield();
    hetmem_sleep_for_us(3);
    if (i == 0) out[hetmem_thread_count()] = hetmem_thread_count();
}
