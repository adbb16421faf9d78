// gather: copy blocks `ids` of every part of a paged KV cache into one contiguous slot
// (a store), in one launch. Layout and arguments: paged_copy.cuh; host side: lmkv_mp/engine/kernels.py.
#include "paged_copy.cuh"

extern "C" __global__ void __launch_bounds__(LMKV_THREADS) lmkv_gather(const LmkvCopyArgs a) {
    lmkv::copy_tile<true>(a);
}
