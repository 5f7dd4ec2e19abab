/* A C process in a heap whose header is damaged by another process (a broken or hostile peer):
 * whatever the header says, the C side stays inside the region its caller names.
 *   hostile NAME REGION_OFFSET REGION_LEN region
 *       one allocation of 4096 bytes from a header that claims a larger region; prints
 *       "alloc OFFSET" (0: refused)
 *   hostile NAME REGION_OFFSET REGION_LEN race MILLIS
 *       allocates and frees 16-byte blocks for MILLIS ms while a timer signal flips class 0's
 *       data offset between its value and the region's end; prints "escaped E lost L calls C
 *       refused R" (E: offsets outside the region, L: blocks that could not be freed, R: calls
 *       that saw the damage and failed)
 *   hostile NAME REGION_OFFSET REGION_LEN probe SIZE OFFSET
 *       prints "alloc A size S free F": an allocation of SIZE bytes (freed again), the size of
 *       the block at OFFSET, and what a free of OFFSET answers */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "hetmem_bitmap.h"
#include "map.h"

static hetmem_u64 *flipped, good, bad;

static void flip(int sig) {
    (void)sig;
    hetmem_u64 now = __atomic_load_n(flipped, __ATOMIC_RELAXED);
    __atomic_store_n(flipped, now == good ? bad : good, __ATOMIC_RELAXED);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 5) return 2;
    unsigned char *base = map_segment(argv[1]);
    if (base == 0) return 3;
    hetmem_bitmap heap;
    memset(&heap, 0, sizeof heap);
    heap.base = base;
    heap.region_offset = strtoull(argv[2], 0, 10);
    heap.region_len = strtoull(argv[3], 0, 10);
    hetmem_u64 lo = heap.region_offset, hi = heap.region_offset + heap.region_len;

    if (strcmp(argv[4], "region") == 0) {
        printf("alloc %llu\n", hetmem_bitmap_alloc(heap, 4096, 16, 0));
        return 0;
    }
    if (strcmp(argv[4], "probe") == 0 && argc == 7) {
        hetmem_u64 off = hetmem_bitmap_alloc(heap, strtoull(argv[5], 0, 10), 16, 0);
        hetmem_u64 at = strtoull(argv[6], 0, 10);
        hetmem_u64 size = hetmem_bitmap_size_of(heap, at);
        printf("alloc %llu size %llu free %d\n", off, size, hetmem_bitmap_free(heap, at));
        if (off != 0) hetmem_bitmap_free(heap, off);
        return 0;
    }
    if (strcmp(argv[4], "race") != 0 || argc != 6) return 2;
    hetmem_bitmap_header *h = (hetmem_bitmap_header *)(base + heap.region_offset);
    flipped = &h->classes[0].data;
    good = *flipped;
    bad = hi;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = flip;
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGALRM, &sa, 0) != 0) return 6;
    struct itimerval every = {{0, 20}, {0, 20}}, never = {{0, 0}, {0, 0}};
    if (setitimer(ITIMER_REAL, &every, 0) != 0) return 7;
    double until = now_ms() + atof(argv[5]);
    long escaped = 0, calls = 0, kept = 0, lost = 0, refused = 0;
    hetmem_u64 held[64];
    while (now_ms() < until) {
        hetmem_u64 off = hetmem_bitmap_alloc(heap, 16, 16, 0);
        calls++;
        if (off == 0) {
            refused++;
            continue;
        }
        if (off < lo || off >= hi) {
            escaped++;
        } else if (kept < 64) {
            held[kept++] = off; /* freed below, once the header is whole */
        } else {
            int r;
            while ((r = hetmem_bitmap_free(heap, off)) == HETMEM_BITMAP_CORRUPT) refused++;
            lost += r != HETMEM_BITMAP_OK;
        }
    }
    setitimer(ITIMER_REAL, &never, 0);
    __atomic_store_n(flipped, good, __ATOMIC_RELAXED);
    for (long i = 0; i < kept; i++) lost += hetmem_bitmap_free(heap, held[i]) != HETMEM_BITMAP_OK;
    printf("escaped %ld lost %ld calls %ld refused %ld\n", escaped, lost, calls, refused);
    return 0;
}
