/* A second process, in C, in a heap a Rust BitmapAllocator created: frees a block Rust allocated
 * (with the error cases around it), or allocates, fills and frees COUNT blocks of its own,
 * printing what it keeps for Rust to check.
 *   share NAME REGION_OFFSET REGION_LEN COUNT THEIRS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hetmem_bitmap.h"
#include "map.h"

int main(int argc, char **argv) {
    if (argc != 6) return 2;
    unsigned char *base = map_segment(argv[1]);
    if (base == 0) return 3;
    hetmem_bitmap heap = {base, strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10)};
    long count = atol(argv[4]);
    hetmem_u64 theirs = strtoull(argv[5], 0, 10);

    /* THEIRS (0: none) is a block Rust allocated; the caller makes sure no one allocates while
     * it is freed twice here (a double free after the block was handed out again would free the
     * new owner's block, in any allocator). */
    if (theirs != 0) {
        printf("size-theirs %llu\n", hetmem_bitmap_size_of(heap, theirs));
        printf("free-inside %d\n", hetmem_bitmap_free(heap, theirs + 8));
        printf("free-outside %d\n", hetmem_bitmap_free(heap, 1));
        hetmem_bitmap other = {base, heap.region_offset + 64, heap.region_len - 64};
        hetmem_bitmap longer = {base, heap.region_offset, heap.region_len + 4096};
        printf("wrong-region %llu %d\n", hetmem_bitmap_alloc(other, 8, 8, 0), hetmem_bitmap_free(other, theirs));
        printf("wrong-length %llu %d\n", hetmem_bitmap_alloc(longer, 8, 8, 0), hetmem_bitmap_free(longer, theirs));
        printf("free-theirs %d\n", hetmem_bitmap_free(heap, theirs));
        printf("free-again %d\n", hetmem_bitmap_free(heap, theirs));
        printf("size-freed %llu\n", hetmem_bitmap_size_of(heap, theirs));
        printf("bad %llu %llu %llu %llu\n", hetmem_bitmap_alloc(heap, 0, 8, 0), hetmem_bitmap_alloc(heap, 8, 3, 0),
               hetmem_bitmap_alloc(heap, 8, 8192, 0), hetmem_bitmap_alloc(heap, 1ULL << 40, 8, 0));
    }

    for (long i = 0; i < count; i++) {
        hetmem_u64 size = 1 + (hetmem_u64)(i * 7919) % 2000, align = 1ULL << (i % 13);
        hetmem_u64 off = hetmem_bitmap_alloc(heap, size, align, (hetmem_u64)i);
        if (off == 0) {
            printf("oom %ld\n", i);
            continue;
        }
        memset(base + off, (int)(i & 0xff), size);
        if (hetmem_bitmap_size_of(heap, off) != size) printf("size-mismatch %llu\n", off);
        if (i % 3 == 0) {
            printf("freed %d\n", hetmem_bitmap_free(heap, off));
        } else {
            printf("live %llu %llu %llu %ld\n", off, size, align, i & 0xff);
        }
    }
    return 0;
}
