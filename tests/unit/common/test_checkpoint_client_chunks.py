"""How the checkpoint storage client cuts files into chunks."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh_common.checkpoints.client import _chunks


@pytest.mark.parametrize("seed", range(20))
def test_chunks_cover_the_parts_exactly_in_full_sized_pieces(seed):
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(0, 40, rng.integers(0, 12))]
    parts += [b"", bytes(rng.integers(0, 256, 7, dtype=np.uint8))]
    size = int(rng.integers(1, 16))
    pieces = list(_chunks(parts, size))
    data = b"".join(bytes(p) for p in parts)
    assert b"".join(p for _, p in pieces) == data
    assert [o for o, _ in pieces] == list(range(0, max(len(data), 1), size))
    assert all(len(p) == size for _, p in pieces[:-1]) and 0 < len(pieces[-1][1]) <= size


def test_an_empty_file_is_one_empty_chunk():
    assert list(_chunks([], 4)) == [(0, b"")]
    assert list(_chunks([b"", b""], 4)) == [(0, b"")]


def test_many_small_tensors_are_packed_into_few_messages():
    parts = [np.zeros(250, dtype=np.float32) for _ in range(1000)]  # 1000 KB in 1 KB buffers
    assert len(list(_chunks(parts, 1 << 18))) == 4
