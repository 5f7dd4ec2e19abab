/*
 * hetmem_bitmap.h: allocate and free in a hetmem BitmapAllocator from CUDA or HIP kernels (and
 * from plain C on the host).
 *
 * This is the C twin of hetmem-core's `allocators::bitmap`: the same #[repr(C)] layout, the same
 * two steps. A block is one bit of its class's bitmap; an allocation claims a clear bit with one
 * atomic or, a free clears it with one atomic and, and the old value says who won. So the
 * kernels of one device allocate and free in one heap at the same time (system-scope atomics on
 * the device), as CPU threads and CPU processes do among themselves. The heap lives in memory
 * both sides reach: a segment registered with the GPU (hetmem-gpu's CudaShmBackend or
 * RocmShmBackend).
 *
 * Kernels and the CPU, or kernels of several devices, use the heap at the same time only where
 * every device involved has a link to the host that carries atomics natively (NVLink-C2C on
 * Grace Hopper; the backends' host_native_atomics()). Over PCIe a device atomic on host memory
 * is atomic among the device's threads, not against the CPU's or another device's, so there they
 * take turns: the CPU allocates and frees before a kernel that uses the heap is launched, or
 * after it has finished, never while it runs. Either side frees what the other allocated.
 *
 * A kernel is given the backend's device address (`device_ptr()`, the address of its byte 0)
 * and the allocator's region (`BitmapAllocator::region()`: its `offset()` and `len()`). Offsets
 * are from the backend's start, as on the CPU, so an offset a kernel gets can be freed by a CPU
 * process and the other way round. Every offset read from the heap's header is checked against
 * the region its caller names (the header's own idea of the region must match it) before use: a
 * broken header makes calls fail, never read or write outside the region.
 *
 * The header includes nothing, so NVRTC compiles it as is: pass its text (hetmem-gpu's
 * `device::BITMAP_HEADER`) ahead of your kernel's source, or as a named header.
 */
#ifndef HETMEM_BITMAP_H
#define HETMEM_BITMAP_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(__HIPCC__) || defined(__HIPCC_RTC__)
/* Device code (CUDA and HIP name these atomics alike); atomics are relaxed, the fences order. */
#define HETMEM_BITMAP_FN static __device__ __inline__
#define HETMEM_BITMAP_OR(p, v) atomicOr_system((p), (v))
#define HETMEM_BITMAP_AND(p, v) atomicAnd_system((p), (v))
#define HETMEM_BITMAP_ADD(p, v) atomicAdd_system((p), (v))
#define HETMEM_BITMAP_MAX(p, v) atomicMax_system((p), (v))
#define HETMEM_BITMAP_ACQUIRE() __threadfence_system()
#define HETMEM_BITMAP_RELEASE() __threadfence_system()
#define HETMEM_BITMAP_LOAD64(p) (*(volatile unsigned long long *)(p))
#define HETMEM_BITMAP_STORE64(p, v) (*(volatile unsigned long long *)(p) = (v))
#define HETMEM_BITMAP_LOAD32(p) (*(volatile unsigned int *)(p))
#define HETMEM_BITMAP_STORE32(p, v) (*(volatile unsigned int *)(p) = (v))
#define HETMEM_BITMAP_CTZ(x) ((unsigned long long)(__ffsll((long long)(x)) - 1))
#else
/* Host C (GCC or Clang): the orderings hetmem-core uses. */
#define HETMEM_BITMAP_FN static inline
#define HETMEM_BITMAP_OR(p, v) __atomic_fetch_or((p), (v), __ATOMIC_ACQ_REL)
#define HETMEM_BITMAP_AND(p, v) __atomic_fetch_and((p), (v), __ATOMIC_ACQ_REL)
#define HETMEM_BITMAP_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
#define HETMEM_BITMAP_MAX(p, v) hetmem_bitmap_host_max((p), (v))
#define HETMEM_BITMAP_ACQUIRE() ((void)0)
#define HETMEM_BITMAP_RELEASE() ((void)0)
#define HETMEM_BITMAP_LOAD64(p) __atomic_load_n((unsigned long long *)(p), __ATOMIC_RELAXED)
#define HETMEM_BITMAP_STORE64(p, v) __atomic_store_n((unsigned long long *)(p), (v), __ATOMIC_RELAXED)
#define HETMEM_BITMAP_LOAD32(p) __atomic_load_n((unsigned int *)(p), __ATOMIC_RELAXED)
#define HETMEM_BITMAP_STORE32(p, v) __atomic_store_n((unsigned int *)(p), (v), __ATOMIC_RELAXED)
#define HETMEM_BITMAP_CTZ(x) ((unsigned long long)__builtin_ctzll(x))
#endif

typedef unsigned long long hetmem_u64;
typedef unsigned int hetmem_u32;

/* `BITMAP_MAGIC`: "HMBITMAP" read as a little-endian u64. */
#define HETMEM_BITMAP_MAGIC 0x50414D5449424D48ULL
/* `TYPE_ID` of BitmapAllocator: "BMP1". */
#define HETMEM_BITMAP_TYPE_ID 0x424D5031u
#define HETMEM_BITMAP_MAX_CLASSES 32
#define HETMEM_BITMAP_MIN_BLOCK 16ULL
#define HETMEM_BITMAP_MAX_BLOCK (1ULL << 31)
#define HETMEM_BITMAP_MAX_ALIGN 4096ULL

/* What `hetmem_bitmap_free` answers. */
#define HETMEM_BITMAP_OK 0
#define HETMEM_BITMAP_NOT_A_BLOCK (-1)   /* not the start of one of the allocator's blocks */
#define HETMEM_BITMAP_NOT_ALLOCATED (-2) /* a block not in use (a double free) */
#define HETMEM_BITMAP_CORRUPT (-3)       /* the header fails its checks */

/* `ClassRecord`: 128 bytes; the first line is written once, the second by every operation. */
typedef struct hetmem_bitmap_class {
    hetmem_u64 block_size;
    hetmem_u64 blocks;
    hetmem_u64 bitmap; /* blocks / 64 words, rounded up; bits past the last block are set */
    hetmem_u64 sizes;  /* one u32 per block: the size it was asked with */
    hetmem_u64 data;   /* the first block, aligned to min(block_size, 4096) */
    hetmem_u64 pad0[3];
    hetmem_u64 hint;        /* the word the class last served from */
    hetmem_u64 allocations; /* since creation; less `frees`, the blocks in use */
    hetmem_u64 frees;
    hetmem_u64 peak; /* the most blocks in use at once */
    hetmem_u64 pad1[4];
} hetmem_bitmap_class;

/* `BitmapHeader`: at the start of the allocator's region, 4160 bytes. */
typedef struct hetmem_bitmap_header {
    hetmem_u64 magic;
    hetmem_u32 type_id;
    hetmem_u32 class_count;
    hetmem_u32 id_major;
    hetmem_u32 id_minor;
    hetmem_u64 region_offset;
    hetmem_u64 region_len;
    hetmem_u64 pad[3];
    hetmem_bitmap_class classes[HETMEM_BITMAP_MAX_CLASSES];
} hetmem_bitmap_header;

/* A heap as its user holds it: the backend's base address and the allocator's region, from the
 * owner's `Region` (never from the heap, which another process may have damaged). */
typedef struct hetmem_bitmap {
    unsigned char *base;
    hetmem_u64 region_offset;
    hetmem_u64 region_len;
} hetmem_bitmap;

#if !(defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(__HIPCC__) || defined(__HIPCC_RTC__))
HETMEM_BITMAP_FN hetmem_u64 hetmem_bitmap_host_max(hetmem_u64 *p, hetmem_u64 v) {
    hetmem_u64 old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
#endif

/* One class as a call uses it: the fixed fields of its record, each read once and then checked.
 * Another process may change the record during the call, so nothing checked is read again. */
typedef struct hetmem_bitmap_view {
    hetmem_bitmap_class *record; /* for the hint and the counts (atomics) */
    hetmem_u64 block_size, blocks, words, bitmap, sizes, data;
} hetmem_bitmap_view;

/* The header, or 0 if the heap's region does not hold one for it (the region too small or
 * wrapping around, or the header's magic, type, region or class count not as expected); its
 * class count goes to `*count`. */
HETMEM_BITMAP_FN hetmem_bitmap_header *hetmem_bitmap_header_of(hetmem_bitmap heap, hetmem_u32 *count) {
    hetmem_bitmap_header *h = (hetmem_bitmap_header *)(heap.base + heap.region_offset);
    if (heap.region_offset % 8 != 0 || heap.region_len < sizeof(hetmem_bitmap_header) ||
        heap.region_offset + heap.region_len < heap.region_offset) {
        return 0;
    }
    if (HETMEM_BITMAP_LOAD64(&h->magic) != HETMEM_BITMAP_MAGIC ||
        HETMEM_BITMAP_LOAD32(&h->type_id) != HETMEM_BITMAP_TYPE_ID ||
        HETMEM_BITMAP_LOAD64(&h->region_offset) != heap.region_offset ||
        HETMEM_BITMAP_LOAD64(&h->region_len) != heap.region_len) {
        return 0;
    }
    *count = HETMEM_BITMAP_LOAD32(&h->class_count);
    return *count == 0 || *count > HETMEM_BITMAP_MAX_CLASSES ? 0 : h;
}

/* Reads class `i` of `h` into `v` and checks it as hetmem-core's attach does: its block size a
 * power of two from 16 to 2^31, above `*smaller` (the block size of the class before it that this
 * call read, 0 for none); its bitmap, sizes and blocks aligned, in that order and apart, from
 * `*floor` on (the end of that class's blocks, or of the header) and inside the heap's region (no
 * overflow on the way). 1 if it holds, and then `*floor` and `*smaller` move past this class. */
HETMEM_BITMAP_FN int hetmem_bitmap_read_class(hetmem_bitmap heap, hetmem_bitmap_header *h, hetmem_u32 i,
                                              hetmem_u64 *floor, hetmem_u64 *smaller, hetmem_bitmap_view *v) {
    hetmem_bitmap_class *r = &h->classes[i];
    /* `*floor` is at most `hi`: the region holds the header, and the class before was checked. */
    hetmem_u64 hi = heap.region_offset + heap.region_len, at = *floor, bs, n, align;
    v->record = r;
    v->block_size = bs = HETMEM_BITMAP_LOAD64(&r->block_size);
    v->blocks = n = HETMEM_BITMAP_LOAD64(&r->blocks);
    v->bitmap = HETMEM_BITMAP_LOAD64(&r->bitmap);
    v->sizes = HETMEM_BITMAP_LOAD64(&r->sizes);
    v->data = HETMEM_BITMAP_LOAD64(&r->data);
    if (bs < HETMEM_BITMAP_MIN_BLOCK || bs > HETMEM_BITMAP_MAX_BLOCK || (bs & (bs - 1)) != 0) return 0;
    if (bs <= *smaller || n > (hi - at) / bs) return 0;
    v->words = (n + 63) / 64;
    align = bs < HETMEM_BITMAP_MAX_ALIGN ? bs : HETMEM_BITMAP_MAX_ALIGN;
    if (v->bitmap < at || v->bitmap % 8 != 0 || v->bitmap > hi || v->words * 8 > hi - v->bitmap) return 0;
    at = v->bitmap + v->words * 8;
    if (v->sizes < at || v->sizes % 4 != 0 || v->sizes > hi || n * 4 > hi - v->sizes) return 0;
    at = v->sizes + n * 4;
    if (v->data < at || (n > 0 && v->data % align != 0) || v->data > hi || n * bs > hi - v->data) return 0;
    *floor = v->data + n * bs;
    *smaller = bs;
    return 1;
}

/* Claims a block of class `c` (from hetmem_bitmap_read_class) for `size` bytes, starting the
 * search `start` words after the class's hint (spread threads over the bitmap, e.g. by thread
 * id); its offset, or 0. */
HETMEM_BITMAP_FN hetmem_u64 hetmem_bitmap_claim(hetmem_bitmap heap, const hetmem_bitmap_view *c, hetmem_u64 size,
                                                hetmem_u64 start) {
    hetmem_bitmap_class *r = c->record;
    hetmem_u64 *bitmap = (hetmem_u64 *)(heap.base + c->bitmap), k, w;
    if (c->words == 0) return 0;
    w = (HETMEM_BITMAP_LOAD64(&r->hint) + start) % c->words;
    for (k = 0; k < c->words; k++) {
        hetmem_u64 bits = HETMEM_BITMAP_LOAD64(&bitmap[w]);
        while (bits != ~0ULL) {
            hetmem_u64 bit = HETMEM_BITMAP_CTZ(~bits), mask = 1ULL << bit, old, index;
            old = HETMEM_BITMAP_OR(&bitmap[w], mask);
            if (old & mask) {
                bits = old | mask; /* another claimer took it first */
                continue;
            }
            HETMEM_BITMAP_ACQUIRE();
            index = w * 64 + bit;
            if (index >= c->blocks) { /* a tail bit was clear: leave it set, never hand it out */
                bits = old | mask;
                continue;
            }
            HETMEM_BITMAP_STORE64(&r->hint, w);
            HETMEM_BITMAP_STORE32(heap.base + c->sizes + index * 4, (hetmem_u32)size);
            {
                hetmem_u64 live = HETMEM_BITMAP_ADD(&r->allocations, 1ULL) + 1 - HETMEM_BITMAP_LOAD64(&r->frees);
                if (live > HETMEM_BITMAP_LOAD64(&r->peak) && live <= c->blocks) HETMEM_BITMAP_MAX(&r->peak, live);
            }
            return c->data + index * c->block_size;
        }
        w = w + 1 == c->words ? 0 : w + 1;
    }
    return 0;
}

/* Allocates `size` bytes (1 to 2^31) aligned to `align` (a power of two up to 4096): the offset
 * of the block from the backend's start (its address is `base + offset`), or 0 when no block
 * is free, the request is bad, or the header fails its checks (those of the classes it tries:
 * smaller ones are passed over unread). `start` spreads the search (use the thread's index; 0 on
 * the host). */
HETMEM_BITMAP_FN hetmem_u64 hetmem_bitmap_alloc(hetmem_bitmap heap, hetmem_u64 size, hetmem_u64 align,
                                                hetmem_u64 start) {
    hetmem_u64 need = size > align ? size : align;
    hetmem_bitmap_header *h;
    hetmem_u64 floor = heap.region_offset + sizeof(hetmem_bitmap_header), smaller = 0;
    hetmem_bitmap_view c;
    hetmem_u32 count, i;
    if (size == 0 || size > HETMEM_BITMAP_MAX_BLOCK || align == 0 || (align & (align - 1)) != 0 ||
        align > HETMEM_BITMAP_MAX_ALIGN) {
        return 0;
    }
    h = hetmem_bitmap_header_of(heap, &count);
    if (h == 0) return 0;
    for (i = 0; i < count; i++) {
        hetmem_u64 offset;
        if (HETMEM_BITMAP_LOAD64(&h->classes[i].block_size) < need) continue;
        if (!hetmem_bitmap_read_class(heap, h, i, &floor, &smaller, &c) || c.block_size < need) return 0;
        offset = hetmem_bitmap_claim(heap, &c, size, start);
        if (offset != 0) return offset;
    }
    return 0;
}

/* The class (into `c`) and index (into `*index`) of the block at `offset`: HETMEM_BITMAP_OK,
 * HETMEM_BITMAP_NOT_A_BLOCK, or HETMEM_BITMAP_CORRUPT (a class read on the way fails its checks). */
HETMEM_BITMAP_FN int hetmem_bitmap_locate(hetmem_bitmap heap, hetmem_u64 offset, hetmem_bitmap_view *c,
                                          hetmem_u64 *index) {
    hetmem_u64 floor = heap.region_offset + sizeof(hetmem_bitmap_header), smaller = 0;
    hetmem_u32 count, i;
    hetmem_bitmap_header *h = hetmem_bitmap_header_of(heap, &count);
    if (h == 0) return HETMEM_BITMAP_CORRUPT;
    for (i = 0; i < count; i++) {
        if (!hetmem_bitmap_read_class(heap, h, i, &floor, &smaller, c)) return HETMEM_BITMAP_CORRUPT;
        if (offset < c->data || offset - c->data >= c->blocks * c->block_size) continue;
        if ((offset - c->data) % c->block_size != 0) return HETMEM_BITMAP_NOT_A_BLOCK;
        *index = (offset - c->data) / c->block_size;
        return HETMEM_BITMAP_OK;
    }
    return HETMEM_BITMAP_NOT_A_BLOCK;
}

/* Frees the block at `offset`: HETMEM_BITMAP_OK, or one of the errors above. */
HETMEM_BITMAP_FN int hetmem_bitmap_free(hetmem_bitmap heap, hetmem_u64 offset) {
    hetmem_bitmap_view c;
    hetmem_u64 index, mask, old, *word;
    int found = hetmem_bitmap_locate(heap, offset, &c, &index);
    if (found != HETMEM_BITMAP_OK) return found;
    word = (hetmem_u64 *)(heap.base + c.bitmap) + index / 64;
    mask = 1ULL << (index % 64);
    HETMEM_BITMAP_RELEASE();
    old = HETMEM_BITMAP_AND(word, ~mask);
    if ((old & mask) == 0) return HETMEM_BITMAP_NOT_ALLOCATED;
    HETMEM_BITMAP_ADD(&c.record->frees, 1ULL);
    return HETMEM_BITMAP_OK;
}

/* The size the block at `offset` was allocated with (0 if it is not a block in use, or if the
 * size it records does not fit it: damaged). */
HETMEM_BITMAP_FN hetmem_u64 hetmem_bitmap_size_of(hetmem_bitmap heap, hetmem_u64 offset) {
    hetmem_bitmap_view c;
    hetmem_u64 index, word, size;
    if (hetmem_bitmap_locate(heap, offset, &c, &index) != HETMEM_BITMAP_OK) return 0;
    word = HETMEM_BITMAP_LOAD64((hetmem_u64 *)(heap.base + c.bitmap) + index / 64);
    if (((word >> (index % 64)) & 1ULL) == 0) return 0;
    size = HETMEM_BITMAP_LOAD32(heap.base + c.sizes + index * 4);
    return size <= c.block_size ? size : 0;
}

#endif /* HETMEM_BITMAP_H */
