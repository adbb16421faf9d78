"""Build a tiny random Llama checkpoint that vLLM (CPU build) can load offline.

No model hub is needed: the config and random weights are written as
``config.json`` + ``model.safetensors`` (+ ``generation_config.json``).
There is no tokenizer, so start vLLM with ``skip_tokenizer_init=True`` and
prompt with token ids (``{"prompt_token_ids": [...]}``).

vLLM's CPU attention backend only supports head sizes in
{32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}, so ``head_dim`` is set
explicitly (default 32) rather than derived as ``hidden_size // num_heads``.
Weights are stored in bfloat16 (config ``dtype``), which vLLM CPU runs natively;
the KV cache then has dtype bfloat16 as well (``LLM(dtype="float32")`` also works).
vLLM CPU additionally needs ``block_size`` to be a multiple of 32.
"""

from __future__ import annotations

import os

import torch

_CPU_HEAD_SIZES: frozenset[int] = frozenset(
    {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
)


def build_tiny_llama(
    path: str | os.PathLike[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position: int = 4096,
    seed: int = 0,
    head_dim: int = 32,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write a random ``LlamaForCausalLM`` checkpoint into ``path``.

    Args:
        path: target directory (created if missing).
        hidden_size: model width.
        num_layers: number of decoder layers (= KV cache layers).
        num_heads: attention query heads.
        num_kv_heads: KV heads (GQA); must divide ``num_heads`` and be
            divisible by the tensor-parallel size you run with.
        vocab_size: vocabulary size; prompt token ids must be below it.
        max_position: ``max_position_embeddings`` (upper bound of max_model_len).
        seed: torch seed for the random weights (same seed => same bytes).
        head_dim: per-head size; must be a size vLLM's CPU backend supports.
        dtype: stored weight dtype (``torch.bfloat16`` or ``torch.float32``).

    Returns:
        ``str(path)``, usable as ``vllm.LLM(model=...)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if head_dim not in _CPU_HEAD_SIZES:
        raise ValueError(f"head_dim={head_dim} is not supported by vLLM CPU attention")
    if num_heads % num_kv_heads != 0:
        raise ValueError("num_heads must be a multiple of num_kv_heads")

    out = os.fspath(path)
    os.makedirs(out, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        initializer_range=0.3,  # large random weights: greedy output is not degenerate
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama"))
