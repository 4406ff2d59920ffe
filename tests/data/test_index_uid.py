"""Stable 128-bit image ids, exact duplicates and the skipped members' rows of the index, on real
tar files: the serial index (the reference, ``benchmarks/_reference/index.py``) and the parallel one (``local``: in this process;
``ray``: Ray tasks) give the same rows, counts and skipped rows."""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pytest

from benchmarks._reference.index import build_index_serial
from tests.data._shards import tree_snapshot, write_tar
from winnow.data.index import _GROUP_LAYOUT, SCAN_DIR, IndexConfig, build_index, load_index, read_skipped
from winnow.data.tarscan import image_uid
from winnow.exceptions import StageConfigMismatch
from winnow.execution import Execution
from winnow.rowgroups.store import CommitStore
from winnow.schemas import INDEX

pytestmark = pytest.mark.timeout(300)

X, Y, Z, W = b"\xff\xd8 image X", b"\xff\xd8 image Y", b"\x89PNG image Z", b"RIFF image W"


def _rows(run_root: str) -> pa.Table:
    plan = load_index(run_root).plan
    store = CommitStore(run_root)
    return pa.concat_tables(store.read_table("index", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups))


def _skipped(run_root: str) -> list[dict]:
    return [row for t in read_skipped(run_root) for row in t.to_pylist()]


def _twins(rows: pa.Table) -> dict[str, str | None]:
    """key -> key of its exact twin (None for a first occurrence)."""
    keys = rows.column("key").to_pylist()
    return {k: (None if of is None else keys[of]) for k, of in zip(keys, rows.column("exact_duplicate_of").to_pylist())}


def _build(run_root, input_dir, backend, group_size=None, **kw):
    config = IndexConfig(input_uri=str(input_dir), buffer_size=kw.pop("buffer_size", 2), max_partitions=3,
                         skip_bad_shards=True)
    if backend == "serial":
        return build_index_serial(str(run_root), config, **kw)
    return build_index(str(run_root), config, execution=Execution(backend=backend), group_size=group_size, **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """Shards with byte-identical images inside one shard and across shards, records without an
    image, keys repeated inside a shard and across shards (and across shard groups), a bad shard."""
    root = tmp_path_factory.mktemp("uid") / "in"
    write_tar(str(root / "s-000.tar"), [
        ("k1.jpg", X), ("k1.txt", b"one"),
        ("k2.jpg", Y),
        ("orphan.txt", b"no image here"), ("orphan.json", b"{}"),
        ("k3.jpg", X),  # the same bytes as k1 in this shard
        ("k1.png", Z),  # key k1 again later in this shard: dropped
        ("k5.jpg", W), ("k5.jpg", Z),  # the same member twice in one record: the second dropped
    ])
    write_tar(str(root / "s-001.tar"), [
        ("k4.jpg", Y),  # the same bytes as k2 in another shard
        ("k2.jpg", Z),  # key k2 is s-000's: dropped (Z would be new bytes, but it is not indexed)
        ("k6.webp", Z),  # Z's first indexed occurrence
    ])
    (root / "s-002.tar").write_bytes(b"not a tar\n" * 100)
    write_tar(str(root / "s-003.tar"), [("k6.jpg", X), ("k7.jpg", W), ("k8.jpg", b"new")])
    return str(root)


def test_uid_is_the_blake2b_128_of_the_image_bytes():
    uid = image_uid(X)
    assert re.fullmatch(r"[0-9a-f]{32}", uid)
    import hashlib

    assert uid == hashlib.blake2b(X, digest_size=16).hexdigest() and uid != image_uid(Y)


@pytest.mark.parametrize("backend, group_size", [("serial", None), ("local", 1), ("local", 2), ("local", None)])
def test_exact_duplicates_inside_and_across_shards_point_at_the_first_record(mixed, tmp_path, backend, group_size):
    result = _build(tmp_path / "run", mixed, backend, group_size)
    rows = _rows(str(tmp_path / "run"))
    assert rows.schema == INDEX
    keys = rows.column("key").to_pylist()
    assert keys == ["k1", "k2", "k3", "k5", "k4", "k6", "k7", "k8"]
    assert _twins(rows) == {"k1": None, "k2": None, "k3": "k1", "k5": None, "k4": "k2", "k6": None,
                            "k7": "k5", "k8": None}
    # A twin always points backwards, at a first occurrence.
    for rid, of in zip(rows.column("record_id").to_pylist(), rows.column("exact_duplicate_of").to_pylist()):
        assert of is None or (of < rid and rows.column("exact_duplicate_of")[of].as_py() is None)
    by_key = dict(zip(keys, rows.column("uid").to_pylist()))
    assert by_key["k1"] == by_key["k3"] == image_uid(X) and by_key["k6"] == image_uid(Z)
    assert result.counts["records"] == 8  # exact duplicates are indexed records
    assert result.counts["exact_duplicates"] == 3
    assert result.counts["exact_duplicate_examples"] == ["k3", "k4", "k7"]


def test_a_record_dropped_by_its_key_never_becomes_a_twin(tmp_path):
    write_tar(str(tmp_path / "in" / "s0.tar"), [("k.jpg", Y)])
    write_tar(str(tmp_path / "in" / "s1.tar"), [("k.jpg", X)])  # key k is s0's: dropped
    write_tar(str(tmp_path / "in" / "s2.tar"), [("k3.jpg", X)])  # X's first indexed record
    for backend, group_size in [("serial", None), ("local", 1), ("local", 2), ("local", 3)]:
        run_root = tmp_path / f"run-{backend}-{group_size}"
        result = _build(run_root, tmp_path / "in", backend, group_size)
        rows = _rows(str(run_root))
        assert _twins(rows) == {"k": None, "k3": None}, (backend, group_size)
        assert result.counts["exact_duplicates"] == 0 and "exact_duplicate_examples" not in result.counts


def test_parallel_equals_serial_rows_counts_and_skipped_rows(mixed, tmp_path):
    serial = _build(tmp_path / "serial", mixed, "serial")
    want_rows, want_skipped = _rows(str(tmp_path / "serial")), _skipped(str(tmp_path / "serial"))
    for group_size in (1, 2, 3, None):
        run_root = tmp_path / f"par-{group_size}"
        parallel = _build(run_root, mixed, "local", group_size)
        assert _rows(str(run_root)).equals(want_rows), group_size
        assert parallel.counts == serial.counts, group_size
        assert _skipped(str(run_root)) == want_skipped, group_size
        assert parallel.fingerprint["digest"] == serial.fingerprint["digest"]


def test_parallel_on_ray_equals_serial_with_exact_duplicates(mixed, tmp_path):
    from winnow.ray.cluster import connect

    connect(None)
    serial = _build(tmp_path / "serial", mixed, "serial", buffer_size=3)
    parallel = _build(tmp_path / "par", mixed, "ray", 2, buffer_size=3)
    assert _rows(str(tmp_path / "par")).equals(_rows(str(tmp_path / "serial")))
    assert parallel.counts == serial.counts and parallel.counts["exact_duplicates"] == 3
    assert _skipped(str(tmp_path / "par")) == _skipped(str(tmp_path / "serial"))


@pytest.mark.parametrize("backend", ["serial", "local"])
def test_skipped_members_come_out_once_each_with_outcome_and_reason(mixed, tmp_path, backend):
    result = _build(tmp_path / "run", mixed, backend, 1)
    rows = _skipped(str(tmp_path / "run"))
    shard = os.path.join(mixed, "s-{:03d}.tar").format
    got = [(r["shard"], r["key"], r["outcome"], r["duplicate_of_key"]) for r in rows]
    assert got == [
        (shard(0), "orphan", "no_image", None),
        (shard(0), "k1", "duplicate_key", "k1"),  # k1 again later in s-000
        (shard(0), "k5", "duplicate_key", "k5"),  # k5.jpg twice in one record
        (shard(1), "k2", "duplicate_key", "k2"),  # k2 is s-000's
        (shard(3), "k6", "duplicate_key", "k6"),  # k6 is s-001's
    ]
    assert all(r["reason"] for r in rows)
    assert "json" in rows[0]["reason"] and "txt" in rows[0]["reason"]
    assert shard(0) in rows[3]["reason"] and shard(1) in rows[4]["reason"]  # the shard that kept the key
    assert result.counts["members_without_image"] == 1
    assert result.counts["duplicate_keys"] == 4 and result.counts["duplicate_keys_across_shards"] == 2
    assert len(rows) == result.counts["members_without_image"] + result.counts["duplicate_keys"]


@pytest.mark.parametrize("backend", ["serial", "local"])
def test_uid_is_the_same_for_the_same_bytes_across_run_roots_and_shard_layouts(tmp_path, backend):
    images = {f"r{i}": bytes([i]) * (100 + i) for i in range(6)}
    write_tar(str(tmp_path / "a" / "one.tar"), [(f"{k}.jpg", v) for k, v in images.items()])
    for i, (k, v) in enumerate(images.items()):  # the same records, one shard each, other names
        write_tar(str(tmp_path / "b" / f"part-{i}.tar"), [(f"x/{k}.png", v)])
    _build(tmp_path / "run-a", tmp_path / "a", backend, 1)
    _build(tmp_path / "run-b", tmp_path / "b", backend, 2)
    a, b = _rows(str(tmp_path / "run-a")), _rows(str(tmp_path / "run-b"))
    uid_a = dict(zip(a.column("key").to_pylist(), a.column("uid").to_pylist()))
    uid_b = {k.removeprefix("x/"): u for k, u in zip(b.column("key").to_pylist(), b.column("uid").to_pylist())}
    assert uid_a == uid_b == {k: image_uid(v) for k, v in images.items()}
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uid_a.values())


@pytest.mark.parametrize("backend", ["serial", "local"])
def test_rerun_commits_nothing_and_a_lost_file_is_redone_alone(mixed, tmp_path, backend):
    run_root = str(tmp_path / "run")
    first = _build(run_root, mixed, backend, 2)
    rows, skipped = _rows(run_root), _skipped(run_root)
    before = tree_snapshot(run_root)
    again = _build(run_root, mixed, backend, 2)
    assert (again.shards_scanned, again.row_groups_committed) == (0, 0)
    assert tree_snapshot(run_root) == before  # nothing written, not even the same bytes again
    assert again.counts == first.counts

    # Lose a skipped-rows file, the exact-duplicate file of a uid partition (parallel) and a row
    # group holding a twin: only those are written again, equal to what they were.
    skipped_dir = os.path.join(run_root, "index", "_skipped")
    lost = sorted(os.listdir(skipped_dir))
    os.unlink(os.path.join(skipped_dir, lost[0]))
    twin_rg = rows.column("key").to_pylist().index("k4") // first.plan.buffer_size
    os.unlink(CommitStore(run_root).row_group_path("index", first.plan.partition_of(twin_rg), twin_rg))
    if backend == "local":
        (digest,) = os.listdir(os.path.join(run_root, SCAN_DIR))
        scan_dir = os.path.join(run_root, SCAN_DIR, digest, f"{_GROUP_LAYOUT}-g2")
        for name in os.listdir(scan_dir):
            if name.startswith("exact-"):
                os.unlink(os.path.join(scan_dir, name))
    third = _build(run_root, mixed, backend, 2)
    assert (third.shards_scanned, third.row_groups_committed) == (0, 1)
    assert sorted(os.listdir(skipped_dir)) == lost
    assert _rows(run_root).equals(rows) and _skipped(run_root) == skipped
    assert third.counts == first.counts


def test_an_index_without_uids_is_refused_and_overwrite_moves_it_aside(mixed, tmp_path):
    run_root = str(tmp_path / "run")
    _build(run_root, mixed, "serial")
    stage_file = os.path.join(run_root, "index", "_stage.json")
    old = json.load(open(stage_file))
    del old["config"]["uid"]  # what an index from before uids recorded
    json.dump(old, open(stage_file, "w"))
    with pytest.raises(StageConfigMismatch, match="uid"):
        _build(run_root, mixed, "local")
    again = _build(run_root, mixed, "local", overwrite=True)
    assert again.counts["exact_duplicates"] == 3
    assert any(n.startswith("index.replaced-") for n in os.listdir(run_root))
    assert len(_skipped(run_root)) == 5  # written again beside the new index
