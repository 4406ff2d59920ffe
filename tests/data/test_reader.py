"""Ranged member reads return exactly the bytes tar extraction gives, in row order."""

from __future__ import annotations

import os
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tests.data._shards import write_tar
from winnow.data.index import IndexConfig, build_index
from winnow.data.reader import read_members
from winnow.data.sample import generate_sample
from winnow.exceptions import ShardError
from winnow.rowgroups.store import CommitStore


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[str, pa.Table]:
    base = tmp_path_factory.mktemp("reader")
    input_dir = str(base / "in")
    generate_sample(input_dir, shards=2, per_shard=8, seed=5, corrupt=True)
    run_root = str(base / "run")
    result = build_index(run_root, IndexConfig(input_uri=input_dir, buffer_size=6))
    store = CommitStore(run_root)
    table = pa.concat_tables(
        store.read_table("index", result.plan.partition_of(rg), rg) for rg in range(result.plan.num_row_groups)
    )
    return input_dir, table


def _extract(shard: str, name: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(tar.getmember(name)).read()


def _first_member_names(shard: str) -> dict[tuple[str, str], str]:
    """(key, ext) -> member name, first occurrence, as tarfile sees them."""
    out: dict[tuple[str, str], str] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            stem, _, ext = os.path.basename(m.name).partition(".")
            key = m.name[: len(m.name) - len(os.path.basename(m.name))] + stem
            out.setdefault((key, ext.lower()), m.name)
    return out


@pytest.mark.parametrize("member, ext_col", [("image", "image_ext"), ("txt", None), ("json", None)])
def test_read_members_returns_the_exact_member_bytes(indexed, member, ext_col):
    _, table = indexed
    got = read_members(table, member)
    assert len(got) == table.num_rows
    names = {s: _first_member_names(s) for s in set(table.column("shard").to_pylist())}
    checked = 0
    for row, data in enumerate(got):
        shard = table.column("shard")[row].as_py()
        key = table.column("key")[row].as_py()
        ext = table.column(ext_col)[row].as_py() if ext_col else member
        name = names[shard].get((key, ext))
        if name is None:
            assert data is None, key
            continue
        assert data == _extract(shard, name), key
        checked += 1
    assert checked >= 16


def test_read_members_keeps_row_order_across_shards_and_gives_none_without_member(tmp_path):
    a = write_tar(str(tmp_path / "in" / "a.tar"), [("1.jpg", b"A1"), ("1.txt", b"cap A1"), ("2.png", b"A2")])
    b = write_tar(str(tmp_path / "in" / "b.tar"), [("3.webp", b"B3"), ("3.txt", b"cap B3")])
    result = build_index(str(tmp_path / "run"), IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=10))
    table = CommitStore(str(tmp_path / "run")).read_table("index", 0, 0)
    shuffled = table.take([2, 0, 1])  # rows interleave shards: results must follow rows
    assert read_members(shuffled) == [b"B3", b"A1", b"A2"]
    assert read_members(shuffled, "txt") == [b"cap B3", b"cap A1", None]
    assert read_members(shuffled, "json") == [None, None, None]
    assert read_members(table, filesystem=pafs.LocalFileSystem()) == [b"A1", b"A2", b"B3"]
    assert result.num_records == 3 and {a, b} == set(table.column("shard").to_pylist())


def test_missing_or_shortened_shard_raises_shard_error_naming_shard_and_key(tmp_path):
    shard = write_tar(str(tmp_path / "in" / "a.tar"), [("k1.jpg", b"x" * 3000), ("k2.jpg", b"y" * 3000)])
    build_index(str(tmp_path / "run"), IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=10))
    table = CommitStore(str(tmp_path / "run")).read_table("index", 0, 0)
    with open(shard, "r+b") as f:
        f.truncate(512 * 2 + 3072 + 100)  # k2's data now stops short
    with pytest.raises(ShardError) as info:
        read_members(table)
    assert info.value.shard == shard and "'k2'" in str(info.value)
    os.unlink(shard)
    with pytest.raises(ShardError, match="k1"):
        read_members(table)


def test_unknown_member_name_is_rejected(indexed):
    with pytest.raises(ValueError, match="member must be one of"):
        read_members(indexed[1], "jpg")
