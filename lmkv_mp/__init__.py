"""lmkv_mp: a node-local KV-cache sidecar for LLM serving (see ARCHITECTURE.md).

Importing the package imports no engine: the vLLM connector lives in
``lmkv_mp.integration.vllm`` and is loaded by vLLM itself.
"""

__version__ = "0.1.0"
