"""How member reads are grouped into ranged reads (bytes themselves: tests/data/test_reader.py)."""

from __future__ import annotations

from winnow.data.reader import COALESCE_GAP, COALESCE_MAX, _spans


def test_nearby_members_share_one_read_and_far_ones_do_not():
    offsets = [0, 1024, 4096, 4096 + COALESCE_GAP + 10_000, None]
    sizes = [512, 512, 100, 10, None]
    assert _spans([0, 1, 2, 3], offsets, sizes) == [[0, 1, 2], [3]]


def test_a_read_never_grows_past_the_cap():
    half = COALESCE_MAX // 2 + 1
    offsets = [0, half, 2 * half]
    sizes = [half, half, 10]
    assert _spans([0, 1, 2], offsets, sizes) == [[0], [1, 2]]
