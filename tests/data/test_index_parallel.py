"""The parallel index (shard groups, key partitions and row groups as Ray tasks, record ids by
prefix sums) against the serial index (the reference, ``benchmarks/_reference/index.py``): the same
rows and counts, the same bad shard named."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from benchmarks._reference.index import build_index_serial
from tests.data._shards import write_tar
from winnow.data.index import _GROUP_LAYOUT, SCAN_DIR, IndexConfig, build_index, load_index, read_skipped
from winnow.data.sample import generate_sample
from winnow.exceptions import ConfigError, ShardError
from winnow.execution import LOCAL, Execution
from winnow.rowgroups.store import CommitStore

pytestmark = pytest.mark.timeout(300)


def _rows(run_root: str) -> pa.Table:
    plan = load_index(run_root).plan
    store = CommitStore(run_root)
    return pa.concat_tables(store.read_table("index", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """The corrupt sample with its bad shards (truncated, not a tar, zero bytes) plus shards
    repeating keys inside one shard and across shards (also across shard groups)."""
    root = str(tmp_path_factory.mktemp("idx") / "in")
    generate_sample(root, shards=4, per_shard=9, seed=13, corrupt=True, bad_shards=True)
    write_tar(os.path.join(root, "x-000.tar"), [("a1.jpg", b"1"), ("a1.txt", b"t"), ("a2.jpg", b"2"), ("a1.png", b"again"),
                                                ("000100002.jpg", b"from another shard"), ("a3.jpg", b"3")])
    write_tar(os.path.join(root, "x-001.tar"), [("a2.jpg", b"dup"), ("a4.jpg", b"4"), ("a3.json", b"{}"), ("a3.jpg", b"d")])
    write_tar(os.path.join(root, "x-002.tar"), [("a4.jpg", b"dup"), ("a5.jpg", b"5"), ("a1.jpg", b"dup")])
    with open(os.path.join(root, "x-003.tar"), "wb") as f:
        f.write(b"not a tar at all\n" * 64)
    write_tar(os.path.join(root, "x-004.tar"), [("a5.jpg", b"dup"), ("a6.jpg", b"6")])
    return root


@pytest.mark.parametrize("group_size", [1, 2, None])
def test_parallel_index_equals_the_serial_index_row_for_row(shards, tmp_path, group_size):
    config = IndexConfig(input_uri=shards, buffer_size=4, max_partitions=3, skip_bad_shards=True)
    serial = build_index_serial(str(tmp_path / "serial"), config)
    parallel = build_index(str(tmp_path / "par"), config, execution=LOCAL, group_size=group_size)
    assert _rows(str(tmp_path / "par")).equals(_rows(str(tmp_path / "serial")))
    assert parallel.counts == serial.counts and parallel.plan == serial.plan
    skipped = [pa.concat_tables(read_skipped(str(tmp_path / name))) for name in ("serial", "par")]
    assert skipped[0].equals(skipped[1])
    assert skipped[0].num_rows == serial.counts["members_without_image"] + serial.counts["duplicate_keys"]
    counts = serial.counts
    assert counts["bad_shards"] >= 2 and counts["duplicate_keys_across_shards"] >= 5
    assert counts["duplicate_keys"] > counts["duplicate_keys_across_shards"]  # a1.png inside x-000
    assert parallel.fingerprint["digest"] == serial.fingerprint["digest"]


def test_parallel_index_on_ray_equals_the_serial_index(shards, tmp_path):
    from winnow.ray.cluster import connect

    connect(None)
    config = IndexConfig(input_uri=shards, buffer_size=5, max_partitions=4, skip_bad_shards=True)
    serial = build_index_serial(str(tmp_path / "serial"), config)
    parallel = build_index(str(tmp_path / "par"), config, execution=Execution(), group_size=2)
    assert _rows(str(tmp_path / "par")).equals(_rows(str(tmp_path / "serial")))
    assert parallel.counts == serial.counts


def test_a_bad_shard_fails_both_naming_the_same_first_bad_shard(shards, tmp_path):
    config = IndexConfig(input_uri=shards, buffer_size=4)
    with pytest.raises(ShardError) as serial:
        build_index_serial(str(tmp_path / "serial"), config)
    with pytest.raises(ShardError) as parallel:
        build_index(str(tmp_path / "par"), config, execution=LOCAL, group_size=3)
    assert parallel.value.shard == serial.value.shard and serial.value.shard in str(parallel.value)
    assert not (tmp_path / "par" / "index").exists()


def test_rerun_scans_nothing_and_a_lost_group_or_row_group_is_redone_alone(shards, tmp_path):
    run_root = str(tmp_path / "run")
    config = IndexConfig(input_uri=shards, buffer_size=4, max_partitions=3, skip_bad_shards=True)
    first = build_index(run_root, config, execution=LOCAL, group_size=3)
    assert first.shards_scanned == len(first.shards) and first.row_groups_committed == first.plan.num_row_groups
    rows = _rows(run_root)
    written = {name: (os.stat(path).st_mtime_ns, open(path, "rb").read())
               for name in ("_index.json", "_stage.json") for path in [os.path.join(run_root, "index", name)]}
    again = build_index(run_root, config, execution=LOCAL, group_size=3)
    assert (again.shards_scanned, again.row_groups_committed) == (0, 0)
    # Nothing changed, so nothing is rewritten: the index's committed objects stay as they were.
    assert {name: (os.stat(path).st_mtime_ns, open(path, "rb").read())
            for name in written for path in [os.path.join(run_root, "index", name)]} == written
    (digest,) = os.listdir(os.path.join(run_root, SCAN_DIR))
    os.unlink(os.path.join(run_root, SCAN_DIR, digest, f"{_GROUP_LAYOUT}-g3", "g000001.parquet"))
    os.unlink(CommitStore(run_root).row_group_path("index", first.plan.partition_of(2), 2))
    third = build_index(run_root, config, execution=LOCAL, group_size=3)
    assert (third.shards_scanned, third.row_groups_committed) == (3, 1)
    assert _rows(run_root).equals(rows) and third.counts == first.counts


def test_build_index_runs_the_parallel_algorithm_only(shards, tmp_path):
    config = IndexConfig(input_uri=shards, buffer_size=4, max_partitions=3, skip_bad_shards=True)
    with pytest.raises(ConfigError, match=r"\bray\b.*\blocal\b.*'serial'"):  # the backends there are, and the one refused
        Execution(backend="serial")  # the serial index is the tests' reference, not a backend
    build_index(str(tmp_path / "run"), config)  # the default: the parallel algorithm in this process
    (digest,) = os.listdir(tmp_path / "run" / SCAN_DIR)
    assert any(name.startswith(f"{_GROUP_LAYOUT}-g") for name in os.listdir(tmp_path / "run" / SCAN_DIR / digest))
