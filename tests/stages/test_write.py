"""The write stage on real tars and committed stage row groups: WebDataset output with the source
bytes, safe member names, reproducible bytes; and the outcome counts of a run (from status)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from tests._tiny import all_counts, all_filters, off_threshold
from tests.stages._stage_rows import commit_embed, commit_filters, unit_rows
from winnow.data.index import IndexConfig, build_index
from winnow.filters import COUNT_NAMES
from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.task import RowGroupTask, Stage
from winnow.schemas import write_schema
from winnow.stages.dedup import DedupResult, dedup_table
from winnow.stages.status import StatusStage, count_outcomes
from winnow.stages.write import WriteConfig, WriteStage, member_key

DIM = 16
UNSAFE = {3: "../../escape/x", 4: "/abs/y", 5: "a/./b/../c"}


def _png(seed: int) -> bytes:
    pic = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 5, 3), dtype=np.uint8))
    out = io.BytesIO()
    pic.save(out, "PNG")
    return out.getvalue()


def _source_tar(path: str, n: int) -> dict[str, dict[str, bytes]]:
    """A WebDataset shard of n records; some keys unsafe, some records without .txt/.json."""
    records: dict[str, dict[str, bytes]] = {}
    for i in range(n):
        key = UNSAFE.get(i, f"{i:05d}")
        rec = {"png" if i % 3 else "jpg": _png(i)}
        if i % 4 != 1:
            # Record 2's caption is not valid UTF-8: the Parquet caption gets a replacement char.
            rec["txt"] = b"caption \xff" if i == 2 else f"caption {i}".encode()
        if i % 2 == 0:
            rec["json"] = json.dumps({"i": i}).encode()
        records[key] = rec
    with tarfile.open(path, "w") as tar:
        for key, rec in records.items():
            for ext, data in rec.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return records


def _run(tmp_path, n: int = 20, buffer_size: int = 8):
    src = str(tmp_path / "input" / "shard-000000.tar")
    os.makedirs(os.path.dirname(src))
    records = _source_tar(src, n)
    run_root = str(tmp_path / "out" / "run-1")
    # The real index stage: record order, member offsets and sizes from the tar headers.
    plan = build_index(run_root, IndexConfig(input_uri=os.path.dirname(src), buffer_size=buffer_size, max_partitions=2)).plan
    assert plan.num_records == n
    store = CommitStore(run_root)
    index = pa.concat_tables(store.read_table("index", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups))
    bad = np.zeros(n, bool)
    bad[[0, 13]] = True
    a_keep = ~bad
    a_keep[[6, 7]] = False
    n_keep = a_keep.copy()
    n_keep[[9]] = False
    commit_embed(run_root, plan, unit_rows(n, DIM, seed=1), undecodable=bad, keys=index.column("key").to_pylist())
    commit_filters(run_root, plan, a_keep, n_keep)
    dups = DedupResult(record_id=np.array([11, 12]), duplicate_of=np.array([10, 10]))
    for rg in range(plan.num_row_groups):
        a, b = plan.row_group_range(rg)
        store.commit_table("dedup", plan.partition_of(rg), rg, dedup_table(np.arange(a, b), dups))
        task = RowGroupTask(run_root, plan, plan.partition_of(rg), rg)
        store.commit_table("status", plan.partition_of(rg), rg, StatusStage().process(task))
    kept = [i for i in range(n) if not bad[i] and a_keep[i] and n_keep[i] and i not in (11, 12)]
    return run_root, plan, records, index, kept


def _write_all(stage: WriteStage, run_root: str, plan: RowGroupPlan) -> pa.Table:
    store = CommitStore(run_root)
    tables = []
    for rg in range(plan.num_row_groups):
        p = plan.partition_of(rg)
        table = stage.process(RowGroupTask(run_root, plan, p, rg))
        store.commit_table("write", p, rg, table)  # what the runner does
        tables.append(table)
    return pa.concat_tables(tables)


def test_output_tars_hold_kept_records_with_source_bytes_and_webdataset_reads_them(tmp_path):
    run_root, plan, records, index, kept = _run(tmp_path)
    stage = WriteStage(WriteConfig())
    assert isinstance(stage, Stage) and stage.name == "write"
    out = _write_all(stage, run_root, plan)
    assert out.schema == write_schema(DIM)
    assert out.column("record_id").to_pylist() == kept
    keys = index.column("key").to_pylist()
    assert out.column("key").to_pylist() == [keys[i] for i in kept]  # original keys, unsafe ones too

    store = CommitStore(run_root)
    tars = [store.row_group_path("write", plan.partition_of(rg), rg, ".tar") for rg in range(plan.num_row_groups)]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [member_key(keys[i]) for i in kept]
    for sample, i in zip(samples, kept):
        source = records[keys[i]]
        got = {ext: sample[ext] for ext in ("jpg", "png", "txt", "json") if ext in sample}
        assert got == source  # identical bytes, same members, nothing re-encoded
    by_id = {r["record_id"]: r for r in out.to_pylist()}
    assert by_id[2]["caption"] == "caption \ufffd" and by_id[2]["json"] == '{"i": 2}'
    assert by_id[5]["caption"] is None and by_id[5]["json"] is None  # record 5 has neither
    assert by_id[4]["caption"] == "caption 4"


def test_unsafe_keys_are_made_safe_and_nothing_lands_outside_the_run_root(tmp_path):
    run_root, plan, _, _, kept = _run(tmp_path)
    before = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    _write_all(WriteStage(), run_root, plan)
    after = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert all(p.startswith(run_root + os.sep) for p in after - before)
    assert {3, 4, 5} <= set(kept)

    store = CommitStore(run_root)
    names = []
    for rg in range(plan.num_row_groups):
        with tarfile.open(store.row_group_path("write", plan.partition_of(rg), rg, ".tar")) as tar:
            names += tar.getnames()
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/") and "." not in name.split("/")[:-1]
    for key in UNSAFE.values():
        safe = member_key(key)
        assert safe != key and any(n.startswith(safe + ".") for n in names)
    assert member_key("../../escape/x").startswith("escape/x_") and member_key("/abs/y").startswith("abs/y_")
    assert member_key("a/./b/../c").startswith("a/b/c_") and member_key("a/b/c") == "a/b/c"  # no collision
    assert member_key("00007") == "00007"

    extract = tmp_path / "extract"
    for rg in range(plan.num_row_groups):
        with tarfile.open(store.row_group_path("write", plan.partition_of(rg), rg, ".tar")) as tar:
            tar.extractall(extract, filter="data")  # "data" refuses members that escape: none do


def test_tar_bytes_are_reproducible_and_headers_are_neutral(tmp_path):
    run_root, plan, _, _, _ = _run(tmp_path)
    store = CommitStore(run_root)
    task = RowGroupTask(run_root, plan, 0, 0)
    WriteStage().process(task)
    tar_path = store.row_group_path("write", 0, 0, ".tar")
    first = Path(tar_path).read_bytes()
    WriteStage().process(task)
    assert Path(tar_path).read_bytes() == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
    assert infos and all(
        (i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) == (946684800, 0, 0, "", "", 0o644) for i in infos
    )
    other = WriteStage(WriteConfig(mtime=0))
    assert other.fingerprint_config() != WriteStage().fingerprint_config()


def test_count_outcomes_adds_up_and_matches_what_was_written(tmp_path):
    run_root, plan, _, _, kept = _run(tmp_path)
    before = count_outcomes(run_root, plan)
    # Every outcome's count (COUNT_NAMES): the ones named here, 0 for the rest (filters off).
    expected = all_counts({"undecodable": 2, "aesthetic_dropped": 2, "nsfw_dropped": 1, "duplicates": 2, "kept": 13})
    assert {k: before[k] for k in ("records", *expected, "written")} == {"records": 20, **expected, "written": 0}
    assert before["thresholds"] == all_filters({"aesthetic": 5.0, "nsfw": 0.5}, off_threshold)
    _write_all(WriteStage(), run_root, plan)
    counts = count_outcomes(run_root, plan)
    assert counts["records"] == sum(counts[k] for k in COUNT_NAMES.values())
    assert counts["kept"] == counts["written"] == len(kept)


def test_a_stage_with_other_records_than_the_index_is_refused(tmp_path):
    run_root, plan, _, _, _ = _run(tmp_path)
    store = CommitStore(run_root)
    store.commit_table("dedup", 0, 0, dedup_table(np.arange(1, 9), DedupResult(np.empty(0, np.int64), np.empty(0, np.int64))))
    with pytest.raises(Exception, match=r"row group 0: stage 'dedup' holds other records than the index"):
        StatusStage().process(RowGroupTask(run_root, plan, 0, 0))
