"""Tests for lmkv_mp.wire.hashes.HashList: the slicing written once, the bytes unchanged."""

from __future__ import annotations

import pytest

from lmkv_mp.wire.hashes import HashList
from lmkv_mp.wire.keys import HASH_BYTES, split_hashes


def h(i: int) -> bytes:
    return i.to_bytes(HASH_BYTES, "big")


def hl(*ids: int) -> HashList:
    return HashList(b"".join(h(i) for i in ids))


def test_length_indexing_and_iteration_count_hashes() -> None:
    hashes = hl(1, 2, 3)
    assert len(hashes) == 3 and bool(hashes) and not HashList()
    assert hashes[0] == h(1) and hashes[2] == h(3) and hashes[-1] == h(3) and hashes[-3] == h(1)
    assert list(hashes) == [h(1), h(2), h(3)] == list(split_hashes(hashes.bytes))
    assert hashes.split() == (h(1), h(2), h(3))
    for bad in (3, -4):
        with pytest.raises(IndexError):
            hashes[bad]


@pytest.mark.parametrize("sl", [slice(None), slice(1, None), slice(None, 2), slice(1, 2), slice(2, 1), slice(-2, None),
                                slice(None, None, 2), slice(None, None, -1), slice(5, 9)])
def test_slices_are_hash_lists_of_the_same_hashes(sl: slice) -> None:
    hashes = hl(1, 2, 3)
    got = hashes[sl]
    assert type(got) is HashList and list(got) == [h(1), h(2), h(3)][sl]


def test_bytes_are_the_wire_concatenation() -> None:
    packed = h(7) + h(8)
    hashes = HashList(packed)
    assert hashes.bytes == bytes(hashes) == packed
    assert HashList.of([h(7), h(8)]) == hashes and HashList.of([]) == HashList()
    assert hashes.keys(b"N" * HASH_BYTES) == [b"N" * HASH_BYTES + h(7), b"N" * HASH_BYTES + h(8)]


@pytest.mark.parametrize("length", [1, 15, 17, 33])
def test_ragged_length_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match=f"multiple of {HASH_BYTES}"):
        HashList(b"x" * length)


def test_of_refuses_hashes_of_another_size_and_init_refuses_non_bytes() -> None:
    with pytest.raises(ValueError):
        HashList.of([h(1), b"short"])
    with pytest.raises(TypeError):
        HashList(bytearray(HASH_BYTES))  # type: ignore[arg-type]


def test_a_hash_list_is_a_frozen_value() -> None:
    hashes = hl(1)
    assert hashes == hl(1) and hash(hashes) == hash(hl(1)) and hashes != hl(2)
    with pytest.raises(AttributeError):
        hashes.packed = b""  # type: ignore[misc]
