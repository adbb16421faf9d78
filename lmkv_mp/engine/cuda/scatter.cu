// scatter: copy blocks first .. first+n of a slot into blocks `ids` of every part of a paged
// KV cache (a load), in one launch. Layout and arguments: paged_copy.cuh; host side:
// lmkv_mp/engine/kernels.py. The host checks that ids are distinct, so no two CTAs write one byte.
#include "paged_copy.cuh"

extern "C" __global__ void __launch_bounds__(LMKV_THREADS) lmkv_scatter(const LmkvCopyArgs a) {
    lmkv::copy_tile<false>(a);
}
