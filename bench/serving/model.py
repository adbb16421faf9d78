"""A tiny random Llama with a word-level tokenizer, so that an OpenAI server takes text.

The model is lmkv_mp.demo's (random bf16 weights, fixed seed, head size 32 for vLLM's CPU
attention); the tokenizer is built offline with ``tokenizers``: a fixed vocabulary of
made-up words split on whitespace, four special tokens, and a chat template whose every
piece is a word of the vocabulary, so a chat turn tokenizes the same wherever it is
rendered (a later round's prompt starts with the earlier round's prompt and answer, token
for token, which is what prefix caching and every connector key on).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: the model's pad, bos, eos (tiny_model.py)
ROLE_WORDS = ("system", "user", "assistant", ":")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def words(n: int) -> list[str]:
    """``n`` distinct lower-case made-up words (consonant-vowel syllables), the same every time."""
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    out: list[str] = []
    for k in itertools.count(2):
        for combo in itertools.product(syll, repeat=k):
            out.append("".join(combo))
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def vocabulary(size: int) -> list[str]:
    """Every token of the tokenizer, by id: the specials, the chat template's words, then words."""
    fixed = [*SPECIALS, *ROLE_WORDS]
    return fixed + words(size - len(fixed))


def build_tokenizer(path: Path, vocab_size: int, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json for ``vocab_size`` tokens into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": max_len, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False}))


def build_model(path: Path, hidden: int, layers: int, vocab_size: int, max_len: int, seed: int = 0) -> str:
    """The model and its tokenizer in ``path``; returns the path."""
    from lmkv_mp.demo.tiny_model import build_tiny_llama

    heads = hidden // 32
    build_tiny_llama(path, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 4),
                     head_dim=32, vocab_size=vocab_size, max_position=max_len, seed=seed)
    build_tokenizer(path, vocab_size, max_len)
    return str(path)


def text(rng: random.Random, n: int, vocab_size: int) -> str:
    """``n`` random ordinary words (never a special token or a chat-template word)."""
    first = len(SPECIALS) + len(ROLE_WORDS)
    pool = words(vocab_size - first)
    return " ".join(rng.choice(pool) for _ in range(n))
