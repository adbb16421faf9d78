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


def build_tiny_gemma2(path: str | os.PathLike[str], hidden_size: int = 64, num_layers: int = 2,
                      sliding_window: int = 128, seed: int = 0, max_position: int = 4096) -> str:
    """A random ``Gemma2ForCausalLM``: its layers alternate sliding-window (``sliding_window``
    tokens) and full attention, as the real Gemma 2 does. Same conventions as
    :func:`build_tiny_llama` (head size 32, bfloat16, no tokenizer)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out = os.fspath(path)
    os.makedirs(out, exist_ok=True)
    config = Gemma2Config(vocab_size=512, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          max_position_embeddings=max_position, sliding_window=sliding_window,
                          query_pre_attn_scalar=32, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_lora_adapter(path: str | os.PathLike[str], base: str, rank: int = 8, seed: int = 0) -> str:
    """A random LoRA adapter (PEFT's files) on the q/k/v/o projections of a model from
    :func:`build_tiny_llama` (its defaults), with non-zero A and B so that it changes the
    KV of every layer."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (cfg.hidden_size, q_out), "k_proj": (cfg.hidden_size, kv_out),
              "v_proj": (cfg.hidden_size, kv_out), "o_proj": (q_out, cfg.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    out = os.fspath(path)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                   "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": base,
                   "target_modules": list(shapes), "modules_to_save": None}, f)
    return out


def add_word_tokenizer(path: str | os.PathLike[str], vocab_size: int = 512) -> str:
    """Give a model directory a tokenizer built offline (``tokenizers``' word-level model),
    so that vLLM's OpenAI server takes text: ids 0..2 are <pad>, <s>, </s> and id ``i`` above
    is the word ``w<i>``, so :func:`words` of token ids is a prompt of exactly those ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = os.fspath(path)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<pad>", "add_bos_token": False,
                   "model_max_length": 1 << 20}, f)
    return out


def words(token_ids: list[int]) -> str:
    """The text :func:`add_word_tokenizer`'s tokenizer encodes to exactly ``token_ids`` (ids >= 3)."""
    return " ".join(f"w{i}" for i in token_ids)


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama"))
