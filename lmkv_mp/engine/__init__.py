"""Code that runs inside engine processes (a vLLM scheduler or worker): the sidecar client,
the copies between a paged KV cache and the sidecar's slots (CPU, and CUDA kernels from
``cuda/``), and the copy threads. Nothing here imports ``lmkv_mp.sidecar``."""
