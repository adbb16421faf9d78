// Copies between a paged KV cache and one contiguous slot, shared by gather.cu and scatter.cu.
//
// The host (lmkv_mp/engine/kernels.py) describes every tensor ("part") of the cache once, as an
// LmkvPart: a block of the part is `rows` runs of `run` contiguous bytes, row r sitting at
// base + id * block_stride + sum(idx_d(r) * stride[d]) in the cache and at
//   region * total + ((o * total + b) * inner_rows + inn) * run
// in the slot (o = r / inner_rows, inn = r % inner_rows, b = the block's index in the chunk).
// That is transfer.py's slot layout: each part's region is its shape with the block dimension
// replaced by the chunk's blocks, in row-major order; dims are in that order, outer (before
// the block dimension) first, and the innermost contiguous dims are folded into `run`.
//
// Work is split into tiles that never cross a block: a tile is up to rows_per_tile whole rows
// (short runs) or col_bytes of one row (long runs). One CTA copies one tile of one block of
// one part, so one launch moves every part of a chunk. The host checks everything (ids in
// range, alignment, sizes); the kernel trusts its arguments.
//
// No includes: NVRTC compiles this without the CUDA headers. The field offsets are asserted
// here and read by the host's numpy dtype (tests/test_kernels.py compares the two).
#pragma once

#define LMKV_MAX_DIMS 6
#define LMKV_THREADS 256
#define LMKV_MAX_TILE_ROWS 256
#define LMKV_UNROLL 4

struct LmkvPart {
    unsigned long long base;          // address of the part's element 0 (its block 0)
    long long block_stride;           // bytes from one block to the next
    unsigned long long region;        // slot bytes of the parts before this one, per block
    long long stride[LMKV_MAX_DIMS];  // bytes, dims in slot order (outer dims first)
    unsigned int size[LMKV_MAX_DIMS];
    unsigned int ndim;
    unsigned int inner_rows;          // rows per outer index: product of the inner dims
    unsigned int rows;                // rows per block: product of all dims
    unsigned int run;                 // bytes per row
    unsigned int vec;                 // widest access (16, 8, 4, 2, 1) that base, strides, run and region allow
    unsigned int rows_per_tile;
    unsigned int col_bytes;           // bytes of a row per tile (a multiple of 16, or run)
    unsigned int col_tiles;           // tiles per row
    unsigned int tiles;               // tiles per block
    unsigned int tile_start;          // tiles of the parts before this one, per block
};

static_assert(sizeof(LmkvPart) == 136, "LmkvPart size: update PART_DTYPE in lmkv_mp/engine/kernels.py");
static_assert(__builtin_offsetof(LmkvPart, base) == 0, "base");
static_assert(__builtin_offsetof(LmkvPart, block_stride) == 8, "block_stride");
static_assert(__builtin_offsetof(LmkvPart, region) == 16, "region");
static_assert(__builtin_offsetof(LmkvPart, stride) == 24, "stride");
static_assert(__builtin_offsetof(LmkvPart, size) == 72, "size");
static_assert(__builtin_offsetof(LmkvPart, ndim) == 96, "ndim");
static_assert(__builtin_offsetof(LmkvPart, inner_rows) == 100, "inner_rows");
static_assert(__builtin_offsetof(LmkvPart, rows) == 104, "rows");
static_assert(__builtin_offsetof(LmkvPart, run) == 108, "run");
static_assert(__builtin_offsetof(LmkvPart, vec) == 112, "vec");
static_assert(__builtin_offsetof(LmkvPart, rows_per_tile) == 116, "rows_per_tile");
static_assert(__builtin_offsetof(LmkvPart, col_bytes) == 120, "col_bytes");
static_assert(__builtin_offsetof(LmkvPart, col_tiles) == 124, "col_tiles");
static_assert(__builtin_offsetof(LmkvPart, tiles) == 128, "tiles");
static_assert(__builtin_offsetof(LmkvPart, tile_start) == 132, "tile_start");

// The one kernel argument, passed by value. Grid: n * tiles_per_block CTAs of LMKV_THREADS.
struct LmkvCopyArgs {
    const LmkvPart* parts;
    const unsigned int* tile_part;    // per tile of a block (tiles_per_block of them): its part
    const long long* ids;             // n cache block ids
    unsigned long long slot;          // slot address (its first byte)
    unsigned int tiles_per_block;
    unsigned int n;                   // blocks copied
    unsigned int first;               // slot index of ids[0]'s block (scatter of a chunk's tail)
    unsigned int total;               // blocks the slot holds
    unsigned int slot_align;          // largest power of two <= 16 dividing slot
    unsigned int pad;
};

static_assert(sizeof(LmkvCopyArgs) == 56, "LmkvCopyArgs size: update ARGS_DTYPE in lmkv_mp/engine/kernels.py");
static_assert(__builtin_offsetof(LmkvCopyArgs, parts) == 0, "parts");
static_assert(__builtin_offsetof(LmkvCopyArgs, tile_part) == 8, "tile_part");
static_assert(__builtin_offsetof(LmkvCopyArgs, ids) == 16, "ids");
static_assert(__builtin_offsetof(LmkvCopyArgs, slot) == 24, "slot");
static_assert(__builtin_offsetof(LmkvCopyArgs, tiles_per_block) == 32, "tiles_per_block");
static_assert(__builtin_offsetof(LmkvCopyArgs, n) == 36, "n");
static_assert(__builtin_offsetof(LmkvCopyArgs, first) == 40, "first");
static_assert(__builtin_offsetof(LmkvCopyArgs, total) == 44, "total");
static_assert(__builtin_offsetof(LmkvCopyArgs, slot_align) == 48, "slot_align");

namespace lmkv {

template <int W> struct Word;
template <> struct Word<16> { typedef uint4 T; };
template <> struct Word<8> { typedef unsigned long long T; };
template <> struct Word<4> { typedef unsigned int T; };
template <> struct Word<2> { typedef unsigned short T; };
template <> struct Word<1> { typedef unsigned char T; };

// Byte offsets of row r of a block: in the cache from the block's start, in the slot from
// the part's region. Dims are read through P (global memory): a local copy indexed by a
// runtime d would go to local memory.
__device__ __forceinline__ void row_offsets(const LmkvPart* __restrict__ P, unsigned int r,
                                            unsigned long long b, unsigned long long total,
                                            long long& cache_off, long long& slot_off) {
    const unsigned int inner = P->inner_rows;
    const unsigned int o = r / inner;
    const unsigned int inn = r - o * inner;
    slot_off = (long long)(((o * total + b) * inner + inn) * P->run);
    long long off = 0;
    unsigned int rem = r;
    for (int d = (int)P->ndim - 1; d >= 0; --d) {
        const unsigned int s = P->size[d];
        const unsigned int q = rem / s;
        off += (long long)(rem - q * s) * P->stride[d];
        rem = q;
    }
    cache_off = off;
}

// One run of n words: LMKV_UNROLL loads in flight per thread before their stores (src and
// dst never overlap, so __restrict__ lets them be issued together).
template <int W>
__device__ __forceinline__ void copy_run(const char* src, char* dst, unsigned int n) {
    typedef typename Word<W>::T T;
    const T* __restrict__ s = reinterpret_cast<const T*>(src);
    T* __restrict__ d = reinterpret_cast<T*>(dst);
    unsigned int v = threadIdx.x;
    for (; v + (LMKV_UNROLL - 1) * LMKV_THREADS < n; v += LMKV_UNROLL * LMKV_THREADS) {
        T x[LMKV_UNROLL];
#pragma unroll
        for (int k = 0; k < LMKV_UNROLL; ++k) x[k] = s[v + k * LMKV_THREADS];
#pragma unroll
        for (int k = 0; k < LMKV_UNROLL; ++k) d[v + k * LMKV_THREADS] = x[k];
    }
    for (; v < n; v += LMKV_THREADS) d[v] = s[v];
}

// `rows` runs of n words each, at the offsets the CTA put in shared memory.
template <int W>
__device__ __forceinline__ void copy_rows(const char* src, char* dst, const long long* src_off,
                                          const long long* dst_off, unsigned int rows, unsigned int n) {
    typedef typename Word<W>::T T;
    const unsigned int all = rows * n;
    unsigned int v = threadIdx.x;
    for (; v + (LMKV_UNROLL - 1) * LMKV_THREADS < all; v += LMKV_UNROLL * LMKV_THREADS) {
        T x[LMKV_UNROLL];
        long long o[LMKV_UNROLL];
#pragma unroll
        for (int k = 0; k < LMKV_UNROLL; ++k) {
            const unsigned int u = v + k * LMKV_THREADS;
            const unsigned int r = u / n;
            const unsigned int c = u - r * n;
            x[k] = *reinterpret_cast<const T*>(src + src_off[r] + (long long)c * W);
            o[k] = dst_off[r] + (long long)c * W;
        }
#pragma unroll
        for (int k = 0; k < LMKV_UNROLL; ++k) *reinterpret_cast<T*>(dst + o[k]) = x[k];
    }
    for (; v < all; v += LMKV_THREADS) {
        const unsigned int r = v / n;
        const unsigned int c = v - r * n;
        *reinterpret_cast<T*>(dst + dst_off[r] + (long long)c * W) =
            *reinterpret_cast<const T*>(src + src_off[r] + (long long)c * W);
    }
}

template <int W>
__device__ __forceinline__ void copy_tile_w(const char* src, char* dst, const long long* src_off,
                                            const long long* dst_off, unsigned int rows, unsigned int bytes) {
    if (rows == 1) {
        copy_run<W>(src + src_off[0], dst + dst_off[0], bytes / W);
    } else {
        copy_rows<W>(src, dst, src_off, dst_off, rows, bytes / W);
    }
}

// kGather: cache -> slot; else slot -> cache. Branches on rows and w are uniform per CTA.
template <bool kGather>
__device__ __forceinline__ void copy_tile(const LmkvCopyArgs& a) {
    __shared__ long long src_off[LMKV_MAX_TILE_ROWS];
    __shared__ long long dst_off[LMKV_MAX_TILE_ROWS];
    const unsigned int i = blockIdx.x / a.tiles_per_block;
    const unsigned int t = blockIdx.x - i * a.tiles_per_block;
    const LmkvPart* __restrict__ P = a.parts + a.tile_part[t];
    const unsigned int lt = t - P->tile_start;
    const unsigned int rt = lt / P->col_tiles;
    const unsigned int ct = lt - rt * P->col_tiles;
    const unsigned int r0 = rt * P->rows_per_tile;
    const unsigned int rows = min(P->rows_per_tile, P->rows - r0);
    const unsigned int c0 = ct * P->col_bytes;
    const unsigned int bytes = min(P->col_bytes, P->run - c0);
    const unsigned int w = min(P->vec, a.slot_align);
    char* cache = reinterpret_cast<char*>(P->base + (unsigned long long)(a.ids[i] * P->block_stride)) + c0;
    char* slot = reinterpret_cast<char*>(a.slot + P->region * a.total) + c0;
    const unsigned long long b = (unsigned long long)a.first + i;
    for (unsigned int r = threadIdx.x; r < rows; r += LMKV_THREADS) {
        long long co, so;
        row_offsets(P, r0 + r, b, a.total, co, so);
        src_off[r] = kGather ? co : so;
        dst_off[r] = kGather ? so : co;
    }
    __syncthreads();
    const char* src = kGather ? cache : slot;
    char* dst = kGather ? slot : cache;
    switch (w) {
        case 16: copy_tile_w<16>(src, dst, src_off, dst_off, rows, bytes); break;
        case 8: copy_tile_w<8>(src, dst, src_off, dst_off, rows, bytes); break;
        case 4: copy_tile_w<4>(src, dst, src_off, dst_off, rows, bytes); break;
        case 2: copy_tile_w<2>(src, dst, src_off, dst_off, rows, bytes); break;
        default: copy_tile_w<1>(src, dst, src_off, dst_off, rows, bytes); break;
    }
}

}  // namespace lmkv
