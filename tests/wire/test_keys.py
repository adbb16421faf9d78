"""Tests for lmkv_mp.wire.keys: chain hashing (prefix property, sensitivity), split_hashes, Namespace.id."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv_mp.wire import keys
from lmkv_mp.wire.keys import HASH_BYTES, Namespace, chain_hashes, num_full_chunks, split_hashes
from tests.conftest import need_c_extension

KEY = b"k" * 32
CHUNK = 8


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 150_000, size=n).tolist()


def make_ns(**overrides: object) -> Namespace:
    base = dict(model="meta/llama", revision="abc123", dtype="bfloat16", num_layers=32, kv_heads=8,
                head_size=128, block_size=16, layout="nhd", chunk_tokens=256, tp_size=2, tp_rank=0,
                tenant="")
    base.update(overrides)
    return Namespace(**base)  # type: ignore[arg-type]


# -- chain_hashes -----------------------------------------------------------------------------


@pytest.fixture(autouse=True, params=["c", "c-4-lanes", "c-1-lane", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on all paths of chain_hashes: the C extension (as many chunk digests
    at once as the CPU allows: 8 with AVX-512F, 4 with AVX2; then at most 4; then one at a
    time) and the pure-Python fallback. Without the extension the C runs are skipped,
    except in CI (``CI=true`` or ``LMKV_REQUIRE_C_EXT=1``, which .ci/run sets)."""
    if request.param == "python":
        monkeypatch.setattr(keys, "_chain", None)
    elif request.param.startswith("c-") and keys._chain is not None:
        real, lanes = keys._chain, int(request.param.split("-")[1])

        class Capped:
            pack_tokens = staticmethod(real.pack_tokens)

            @staticmethod
            def chain(*args: object) -> bytes:
                return real.chain(*args, lanes)

        monkeypatch.setattr(keys, "_chain", Capped)
    else:
        need_c_extension("wire._chain", keys._chain is not None)
    return request.param


def reference_chain(toks: list[int], chunk: int, key: bytes, salt: bytes = b"") -> bytes:
    """ARCHITECTURE §3 written out with hashlib, independent of keys.py."""
    prev = hashlib.blake2b(b"lmkv_mp/chain/v2" + salt, digest_size=16, key=key).digest()
    out = b""
    for i in range(len(toks) // chunk):
        body = b"".join(t.to_bytes(4, "little", signed=True) for t in toks[i * chunk:(i + 1) * chunk])
        digest = hashlib.blake2b(body, digest_size=32).digest()
        prev = hashlib.blake2b(prev + digest, digest_size=16, key=key).digest()
        out += prev
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 70), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300),
       st.binary(max_size=64), st.binary(max_size=40))
def test_chain_equals_reference(chunk: int, toks: list[int], key: bytes, salt: bytes) -> None:
    """Chunk sizes 1..70 put each chunk's digested message (4*chunk bytes) on, below and
    above BLAKE2b's 128-byte block edges; up to 300 chunks fill whole groups of four lanes
    and leave every remainder; keys 0..64 bytes; ids over the whole int32 range."""
    assert chain_hashes(toks, chunk, key, salt=salt) == reference_chain(toks, chunk, key, salt)
    assert chain_hashes(np.array(toks, dtype=np.int64), chunk, key, salt=salt) == reference_chain(toks, chunk, key, salt)


@pytest.mark.parametrize("chunks", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("chunk", [256, 100])
def test_serving_chunk_sizes_equal_reference(chunk: int, chunks: int) -> None:
    """Messages of many blocks (1 KiB, and 400 bytes with a short last block) in lanes."""
    toks = [(i * 7919) % 128_000 for i in range(chunk * chunks + 3)]
    assert chain_hashes(toks, chunk, KEY, salt=b"t") == reference_chain(toks, chunk, KEY, b"t")


def test_numpy_integers_in_a_list_are_token_ids() -> None:
    toks = tokens(2 * CHUNK)
    assert chain_hashes([np.int64(t) for t in toks], CHUNK, KEY) == reference_chain(toks, CHUNK, KEY)


def test_a_list_changed_by_an_index_method_while_packing_is_refused_or_packed_as_given(impl: str) -> None:
    """A token whose __index__ empties the list (hostile or buggy input): C re-reads the list
    after any Python code ran (no read past its end, no use after free); Python packs the
    arguments it was given. (A change that keeps the length packs a mix of old and new ids
    in C: the caller's own prompt hashed as it now reads, never another memory.)"""
    class Clearing:
        def __index__(self) -> int:
            toks.clear()
            return 5

    toks: list[object] = [*tokens(CHUNK - 1), Clearing(), *tokens(CHUNK, seed=1)]
    given = [*toks[:CHUNK - 1], 5, *toks[CHUNK:]]
    if impl.startswith("c"):
        with pytest.raises(ValueError, match="changed"):
            chain_hashes(toks, CHUNK, KEY)  # type: ignore[arg-type]
    else:
        assert chain_hashes(toks, CHUNK, KEY) == reference_chain(given, CHUNK, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1.0, "7", None, b"x"])
def test_rejects_non_integer_token(bad: object) -> None:
    toks: list[object] = list(tokens(2 * CHUNK))
    toks[3] = bad
    with pytest.raises(ValueError, match="int32"):
        chain_hashes(toks, CHUNK, KEY)  # type: ignore[arg-type]


def test_chain_hashes_is_deterministic_across_input_types() -> None:
    toks = tokens(5 * CHUNK)
    a = chain_hashes(toks, CHUNK, KEY)
    assert a == chain_hashes(list(toks), CHUNK, KEY)
    assert a == chain_hashes(tuple(toks), CHUNK, KEY)
    assert a == chain_hashes(np.array(toks, dtype=np.int32), CHUNK, KEY)
    assert a == chain_hashes(np.array(toks, dtype=np.int64), CHUNK, KEY)


@pytest.mark.parametrize("n_tokens, expected_chunks", [
    (0, 0), (1, 0), (CHUNK - 1, 0), (CHUNK, 1), (CHUNK + 1, 1), (3 * CHUNK, 3), (4 * CHUNK - 1, 3),
])
def test_chain_hashes_one_hash_per_full_chunk_tail_ignored(n_tokens: int, expected_chunks: int) -> None:
    out = chain_hashes(tokens(n_tokens), CHUNK, KEY)
    assert isinstance(out, bytes)
    assert len(out) == expected_chunks * HASH_BYTES
    assert num_full_chunks(n_tokens, CHUNK) == expected_chunks


def test_partial_tail_does_not_change_hashes() -> None:
    toks = tokens(3 * CHUNK + 5)
    assert chain_hashes(toks, CHUNK, KEY) == chain_hashes(toks[: 3 * CHUNK], CHUNK, KEY)
    other_tail = toks[: 3 * CHUNK] + [1, 2, 3]
    assert chain_hashes(other_tail, CHUNK, KEY) == chain_hashes(toks, CHUNK, KEY)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), max_size=6 * CHUNK), st.integers(0, 6 * CHUNK))
def test_prefix_property(long: list[int], cut: int) -> None:
    """The hashes of a prefix's full chunks are the leading hashes of the longer prompt."""
    short = long[:cut]
    k = num_full_chunks(len(short), CHUNK)
    assert chain_hashes(short, CHUNK, KEY) == chain_hashes(long, CHUNK, KEY)[: k * HASH_BYTES]


@pytest.mark.parametrize("chunk", [0, 2, 4])
@pytest.mark.parametrize("pos", [0, CHUNK // 2, CHUNK - 1])
def test_token_change_changes_own_and_later_hashes_only(chunk: int, pos: int) -> None:
    toks = tokens(5 * CHUNK)
    changed = list(toks)
    changed[chunk * CHUNK + pos] += 1
    a = split_hashes(chain_hashes(toks, CHUNK, KEY))
    b = split_hashes(chain_hashes(changed, CHUNK, KEY))
    for i in range(5):
        if i < chunk:
            assert a[i] == b[i], f"chunk {i} before the change must keep its hash"
        else:
            assert a[i] != b[i], f"chunk {i} at or after the change must get a new hash"


def test_all_hashes_distinct_within_a_prompt() -> None:
    toks = [7] * (6 * CHUNK)  # identical chunks still chain to distinct hashes
    hs = split_hashes(chain_hashes(toks, CHUNK, KEY))
    assert len(set(hs)) == 6


@pytest.mark.parametrize("kwargs", [
    dict(key=b"another key"), dict(salt=b"tenant-a"), dict(key=b""),
], ids=["key", "salt", "empty-key"])
def test_salt_and_key_change_every_hash(kwargs: dict[str, bytes]) -> None:
    toks = tokens(4 * CHUNK)
    base = split_hashes(chain_hashes(toks, CHUNK, KEY))
    args = dict(key=KEY, salt=b"")
    args.update(kwargs)
    other = split_hashes(chain_hashes(toks, CHUNK, args["key"], salt=args["salt"]))
    assert len(other) == len(base)
    assert all(x != y for x, y in zip(base, other))


def test_different_salts_differ_from_each_other() -> None:
    toks = tokens(2 * CHUNK)
    assert chain_hashes(toks, CHUNK, KEY, salt=b"a") != chain_hashes(toks, CHUNK, KEY, salt=b"b")


def test_chunk_size_matters() -> None:
    toks = tokens(8 * CHUNK)
    a = chain_hashes(toks, CHUNK, KEY)
    b = chain_hashes(toks, 2 * CHUNK, KEY)
    assert a[:HASH_BYTES] != b[:HASH_BYTES]


@pytest.mark.parametrize("max_chunks, expected", [(0, 0), (1, 1), (3, 3), (5, 5), (100, 5)])
def test_max_chunks_stops_early(max_chunks: int, expected: int) -> None:
    toks = tokens(5 * CHUNK + 3)
    full = chain_hashes(toks, CHUNK, KEY)
    out = chain_hashes(toks, CHUNK, KEY, max_chunks=max_chunks)
    assert out == full[: expected * HASH_BYTES]


@pytest.mark.parametrize("bad", [
    np.zeros((2, CHUNK), dtype=np.int64),
    [[1] * CHUNK, [2] * CHUNK],
], ids=["ndarray-2d", "nested-list"])
def test_rejects_2d_input(bad: object) -> None:
    with pytest.raises(ValueError, match="1-D"):
        chain_hashes(bad, CHUNK, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_token", [2**31, -(2**31) - 1, 2**40, -(2**40), 2**63, 2**64, -(2**70)])
def test_rejects_tokens_outside_int32(bad_token: int) -> None:
    toks = tokens(2 * CHUNK)
    toks[CHUNK + 1] = bad_token
    with pytest.raises(ValueError, match="int32"):
        chain_hashes(toks, CHUNK, KEY)


@pytest.mark.parametrize("edge", [2**31 - 1, -(2**31)])
def test_accepts_int32_edges(edge: int) -> None:
    assert len(chain_hashes([edge] * CHUNK, CHUNK, KEY)) == HASH_BYTES


@pytest.mark.parametrize("chunk_tokens", [0, -1])
def test_rejects_non_positive_chunk_tokens(chunk_tokens: int) -> None:
    with pytest.raises(ValueError):
        chain_hashes(tokens(16), chunk_tokens, KEY)


def test_chain_matches_documented_construction() -> None:
    """h_i = H(h_{i-1} || D(tokens_i as little-endian int32)), H keyed BLAKE2b-128, D BLAKE2b-256
    (ARCHITECTURE §3)."""
    toks = tokens(2 * CHUNK)
    hs = split_hashes(chain_hashes(toks, CHUNK, KEY, salt=b"s"))
    prev = hs[0]
    digest = hashlib.blake2b(np.asarray(toks[CHUNK:], dtype="<i4").tobytes(), digest_size=32).digest()
    expected = hashlib.blake2b(prev + digest, digest_size=HASH_BYTES, key=KEY).digest()
    assert hs[1] == expected


# -- split_hashes -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 17, 5000])
def test_split_hashes_round_trip(n: int) -> None:
    packed = bytes(np.random.default_rng(n).integers(0, 256, size=n * HASH_BYTES, dtype=np.uint8))
    parts = list(split_hashes(packed))
    assert len(parts) == n
    assert all(isinstance(p, bytes) and len(p) == HASH_BYTES for p in parts)
    assert b"".join(parts) == packed


@pytest.mark.parametrize("length", [1, 15, 17, 31, 33])
def test_split_hashes_rejects_ragged(length: int) -> None:
    with pytest.raises(ValueError, match="multiple"):
        split_hashes(b"x" * length)


# -- Namespace --------------------------------------------------------------------------------


def test_namespace_id_is_stable_16_bytes() -> None:
    a, b = make_ns(), make_ns()
    assert a.id == b.id
    assert isinstance(a.id, bytes) and len(a.id) == HASH_BYTES
    assert a.id == a.id


def test_namespace_id_golden_value_does_not_drift() -> None:
    """A change of the fingerprint makes every warm host pool cold: do it on purpose only."""
    ns = make_ns()
    import hashlib

    import msgpack

    canon = msgpack.packb(sorted(dataclasses.asdict(ns).items()), use_bin_type=True)
    assert ns.id == hashlib.blake2b(canon, digest_size=HASH_BYTES, person=b"lmkv-ns-v1").digest()


_CHANGES = {
    "model": "other/model", "revision": "def456", "dtype": "float16", "num_layers": 31,
    "kv_heads": 4, "head_size": 64, "block_size": 32, "layout": "hnd", "chunk_tokens": 512,
    "tp_size": 4, "tp_rank": 1, "tenant": "acme",
}


def test_every_namespace_field_is_covered() -> None:
    assert set(_CHANGES) == {f.name for f in dataclasses.fields(Namespace)}


@pytest.mark.parametrize("field, value", sorted(_CHANGES.items()))
def test_every_namespace_field_changes_the_id(field: str, value: object) -> None:
    assert make_ns(**{field: value}).id != make_ns().id


@pytest.mark.parametrize("a, b", [(None, 0), (0, 1), (None, 1)])
def test_tp_rank_none_differs_from_any_rank(a: int | None, b: int | None) -> None:
    assert make_ns(tp_rank=a).id != make_ns(tp_rank=b).id


@pytest.mark.parametrize("a, b", [("", "acme"), ("acme", "acme2")])
def test_tenant_separates_namespaces(a: str, b: str) -> None:
    assert make_ns(tenant=a).id != make_ns(tenant=b).id


def test_namespace_type_confusion_changes_id() -> None:
    """A number and its string spelling are different fingerprints (msgpack keeps types)."""
    assert make_ns(revision="1").id != make_ns(revision=1).id  # type: ignore[arg-type]


def test_namespace_is_hashable_value() -> None:
    assert {make_ns(), make_ns()} == {make_ns()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_ns().model = "x"  # type: ignore[misc]


@pytest.mark.parametrize("rank, expected", [(None, "tpall"), (1, "tp1/2")])
def test_display_name(rank: int | None, expected: str) -> None:
    assert expected in make_ns(tp_rank=rank).display_name
