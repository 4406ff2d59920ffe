"""The settled-partition cache of ``row_group_map``: the same answer as a full listing, fewer
listings, never an answer from a deleted run root's cache, bounded.

Run roots are real: an index built from a generated sample (23 records, B=2: 12 row groups in 4
partitions of 3, the last row group holding one record), then row groups of a stage committed
through the commit store under a recorded fingerprint.
"""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from winnow.report import progress
from winnow.report.progress import row_group_map
from winnow.rowgroups import CommitStore
from winnow.rowgroups.failures import FAILED_SUFFIX, record_failure
from winnow.rowgroups.store import STAGE_FILE, StageFingerprint

pytestmark = pytest.mark.timeout(120)

STAGE = "embed"
BASE_NS = 1_700_000_000 * 10**9


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from winnow.data.sample import generate_sample

    out = tmp_path_factory.mktemp("sample") / "in"
    generate_sample(str(out), shards=1, per_shard=23, seed=5)
    return str(out)


@pytest.fixture(autouse=True)
def _fresh_cache():
    progress.clear_cache()
    yield
    progress.clear_cache()


def make_run(root: str, sample: str, config: dict | None = None):
    """An index for ``sample`` under ``root`` and the fingerprint of ``STAGE``; (store, plan)."""
    from winnow.data.index import IndexConfig, build_index

    plan = build_index(root, IndexConfig(sample, buffer_size=2, max_partitions=4)).plan
    assert (plan.num_row_groups, plan.num_partitions, plan.num_records) == (12, 4, 23)
    store = CommitStore(root)
    store.ensure_stage(StageFingerprint(STAGE, config=config or {"v": 1}, num_records=plan.num_records,
                                        buffer_size=plan.buffer_size))
    return store, plan


def commit(store: CommitStore, plan, *row_groups: int) -> None:
    """Commit ``row_groups`` of STAGE, each with its own mtime (row group i at BASE + 7 i s), so
    the first and last commit times of cached partitions matter to records/s."""
    for rg in row_groups:
        p = plan.partition_of(rg)
        store.commit_table(STAGE, p, rg, pa.table({"x": [rg]}))
        t = BASE_NS + rg * 7 * 10**9
        os.utime(store.row_group_path(STAGE, p, rg), ns=(t, t))


def stage_of(m: dict, name: str = STAGE) -> dict:
    return next(s for s in m["stages"] if s["stage"] == name)


def same_as_uncached(root: str) -> dict:
    cached = row_group_map(root)
    assert cached == row_group_map(root, cache=False)
    return stage_of(cached)


@pytest.mark.parametrize("threshold", [progress.MAX_PARTITION_LISTINGS, 0], ids=["per-partition", "recursive"])
def test_cached_map_equals_the_uncached_one_over_a_run(tmp_path, sample, monkeypatch, threshold):
    monkeypatch.setattr(progress, "MAX_PARTITION_LISTINGS", threshold)
    root = str(tmp_path / "run")
    store, plan = make_run(root, sample)
    assert same_as_uncached(root)["committed"] == 0

    commit(store, plan, 0, 1, 2, 3)  # partition 0 settled, partition 1 partly
    s = same_as_uncached(root)
    assert (s["committed"], s["map"], s["records"]) == (4, "4c8.", 8)
    assert s["first_commit"] == BASE_NS / 1e9 and s["last_commit"] == (BASE_NS + 21 * 10**9) / 1e9

    commit(store, plan, 4, 5, 6)  # partition 1 settled too
    s = same_as_uncached(root)
    assert (s["committed"], s["map"]) == (7, "7c5.") and s["records_per_s"] == round(14 / 42, 2)

    record_failure(store, STAGE, plan.partition_of(7), 7, "boom")
    s = same_as_uncached(root)
    assert (s["committed"], s["failed"], s["map"]) == (7, 1, "7c1f4.")
    assert s["errors"][0]["row_group"] == 7 and s["errors"][0]["error"] == "boom"

    commit(store, plan, 7)  # the commit wins over the failure record, which stays on disk
    assert os.path.exists(store.row_group_path(STAGE, plan.partition_of(7), 7, FAILED_SUFFIX))
    s = same_as_uncached(root)
    assert (s["committed"], s["failed"], s["errors"], s["map"]) == (8, 0, [], "8c4.")

    commit(store, plan, 8, 9, 10, 11)
    s = same_as_uncached(root)
    assert (s["committed"], s["pending"], s["records"], s["map"]) == (12, 0, 23, "12c")
    assert s["last_commit"] == (BASE_NS + 77 * 10**9) / 1e9 and s["records_per_s"] == round(23 / 77, 2)
    s = same_as_uncached(root)  # answered from the cache alone this time
    assert (s["committed"], s["records"], s["first_commit"]) == (12, 23, BASE_NS / 1e9)


class CountingLocalFS(pafs.LocalFileSystem):
    """A real local filesystem that only records which folders are listed (not a fake store)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.listed: list[tuple[str, bool]] = []

    def get_file_info(self, paths_or_selector):
        if isinstance(paths_or_selector, pafs.FileSelector):
            self.listed.append((paths_or_selector.base_dir, paths_or_selector.recursive))
        return super().get_file_info(paths_or_selector)


def test_listings_counted_by_a_counting_local_fs_complete_stage_is_not_listed(tmp_path, sample, monkeypatch):
    import winnow.rowgroups.store as store_mod

    root = str(tmp_path / "run")
    store, plan = make_run(root, sample)
    fs = CountingLocalFS()
    monkeypatch.setattr(store_mod, "resolve_filesystem", lambda uri, storage=None: (fs, os.path.abspath(uri)))
    stage_dir = store.stage_dir(STAGE)

    def listings() -> list[tuple[str, bool]]:
        fs.listed.clear()
        row_group_map(root, stages=("index", STAGE))
        return [(d, r) for d, r in fs.listed if d == stage_dir or d.startswith(stage_dir + "/")]

    commit(store, plan, 0, 1, 2, 3, 4)
    assert listings() == [(stage_dir, True)]  # first load: the one recursive listing
    monkeypatch.setattr(progress, "MAX_PARTITION_LISTINGS", 2)
    assert listings() == [(stage_dir, True)]  # 3 open partitions > 2: the recursive listing again
    monkeypatch.undo()
    monkeypatch.setattr(store_mod, "resolve_filesystem", lambda uri, storage=None: (fs, os.path.abspath(uri)))
    # Partition 0 is settled: only partitions 1..3 are listed, one level each.
    assert listings() == [(store.partition_dir(STAGE, p), False) for p in (1, 2, 3)]
    commit(store, plan, *range(5, 12))
    assert listings() == [(store.partition_dir(STAGE, p), False) for p in (1, 2, 3)]
    assert listings() == []  # complete: answered from the cache
    fs.listed.clear()
    row_group_map(root, stages=("index",))
    assert fs.listed == []  # the index stage, complete since the first load, too


def test_a_run_root_deleted_and_run_again_is_not_answered_from_the_stale_cache(tmp_path, sample):
    root = str(tmp_path / "run")
    store, plan = make_run(root, sample)
    commit(store, plan, *range(12))
    assert same_as_uncached(root)["map"] == "12c"
    old_mtime = os.stat(f"{store.stage_dir(STAGE)}/{STAGE_FILE}").st_mtime_ns

    shutil.rmtree(root)  # a new config: another fingerprint
    store, plan = make_run(root, sample, config={"v": 2})
    commit(store, plan, 0)
    s = same_as_uncached(root)
    assert (s["committed"], s["map"]) == (1, "1c11.")

    commit(store, plan, *range(12))
    assert same_as_uncached(root)["map"] == "12c"
    shutil.rmtree(root)  # the same config again: the same fingerprint content, written later
    store, plan = make_run(root, sample, config={"v": 2})
    assert os.stat(f"{store.stage_dir(STAGE)}/{STAGE_FILE}").st_mtime_ns != old_mtime
    commit(store, plan, 3)
    s = same_as_uncached(root)
    assert (s["committed"], s["map"]) == (1, "3.1c8.")


def test_the_cache_is_bounded_least_recently_used_first(tmp_path, sample, monkeypatch):
    for i in range(progress.CACHE_ENTRIES + 10):
        progress._remember(("root", f"s{i}", None, None), {0: (1, 2)})
        if i >= 1:
            assert progress._cached(("root", "s0", None, None))  # s0 used again each time: kept
    assert len(progress._cache) == progress.CACHE_ENTRIES
    assert progress._cached(("root", "s1", None, None)) == {}  # the least recently used went first
    assert progress._cached(("root", f"s{progress.CACHE_ENTRIES + 9}", None, None)) == {0: (1, 2)}

    progress.clear_cache()
    monkeypatch.setattr(progress, "CACHE_ENTRIES", 1)
    root = str(tmp_path / "run")
    store, plan = make_run(root, sample)
    commit(store, plan, *range(12))
    row_group_map(root, stages=("index", STAGE))  # two settled stages, one key kept
    assert len(progress._cache) == 1 and same_as_uncached(root)["map"] == "12c"
