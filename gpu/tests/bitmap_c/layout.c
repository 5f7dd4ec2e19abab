/* Prints the sizes and field offsets of the bitmap allocator's header as C lays them out. */
#include <stddef.h>
#include <stdio.h>

#include "hetmem_bitmap.h"

#define FIELD(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))

int main(void) {
    printf("sizeof.header %zu\n", sizeof(hetmem_bitmap_header));
    printf("sizeof.class %zu\n", sizeof(hetmem_bitmap_class));
    FIELD(hetmem_bitmap_header, magic);
    FIELD(hetmem_bitmap_header, type_id);
    FIELD(hetmem_bitmap_header, class_count);
    FIELD(hetmem_bitmap_header, id_major);
    FIELD(hetmem_bitmap_header, id_minor);
    FIELD(hetmem_bitmap_header, region_offset);
    FIELD(hetmem_bitmap_header, region_len);
    FIELD(hetmem_bitmap_header, classes);
    FIELD(hetmem_bitmap_class, block_size);
    FIELD(hetmem_bitmap_class, blocks);
    FIELD(hetmem_bitmap_class, bitmap);
    FIELD(hetmem_bitmap_class, sizes);
    FIELD(hetmem_bitmap_class, data);
    FIELD(hetmem_bitmap_class, hint);
    FIELD(hetmem_bitmap_class, allocations);
    FIELD(hetmem_bitmap_class, frees);
    FIELD(hetmem_bitmap_class, peak);
    printf("magic %llu\n", HETMEM_BITMAP_MAGIC);
    printf("type_id %u\n", HETMEM_BITMAP_TYPE_ID);
    return 0;
}
