"""A small run in one Ray Job (``winnow.job.run_rest``, what job mode's index job runs after
indexing), here on the local backend: every later step runs in the DAG's order and leaves each
unit's summary where its task reads it; a unit that fails stops it after its phase, and an
error in a later step never fails the index step."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tests._tiny import tiny_config
from winnow.data.sample import generate_sample
from winnow.execution import LOCAL
from winnow.job import _run, chained_summary_uri
from winnow.registry import STAGES
from winnow.rowgroups import CommitStore


@pytest.fixture
def small(tmp_path):
    generate_sample(str(tmp_path / "in"), shards=1, per_shard=12, seed=3)
    return tiny_config(input_uri=str(tmp_path / "in"), output_root=str(tmp_path / "out"), run_key="one",
                       buffer_size=5, max_partitions=2)


def _index_job(cfg, bound: int = 4000):
    args = argparse.Namespace(stage="index", partition=None, bucket=None, chain=False, one_job_max_records=bound)
    return _run(args, cfg, LOCAL, "test-owner")


def _left(cfg) -> set[tuple[str, str]]:
    """(stage, unit) of every summary a run_rest left."""
    store = CommitStore(cfg.root)
    found = set()
    for spec in STAGES:
        if spec.name == "index":
            continue
        for unit in (None, 0, 1):
            kwargs = {"bucket": unit} if spec.scope == "bucket" else {}
            partition = unit if spec.scope == "partition" else None
            if spec.scope == "global" and unit is not None:
                continue
            uri = chained_summary_uri(cfg.run_root, spec.name, partition, store.fingerprint_digest(spec.name), **kwargs)
            if os.path.exists(uri):
                found.add((spec.name, "run" if unit is None else str(unit)))
    return found


def test_the_index_job_of_a_small_run_runs_every_later_step_and_leaves_each_units_summary(small):
    result, failed = _index_job(small)
    assert failed == {} and result["num_records"] <= 12 and result["partitions"] == [0, 1]
    left = _left(small)
    for spec in STAGES:
        if spec.scope == "partition":
            assert {(spec.name, "0"), (spec.name, "1")} <= left, spec.name
    assert {("thresholds", "run"), ("centroids", "run"), ("pairwise", "0")} <= left
    store = CommitStore(small.root)
    with open(chained_summary_uri(small.run_root, "write", 1, store.fingerprint_digest("write"))) as f:
        summary = json.load(f)
    assert summary["failed"] == [] and summary["computed"] == summary["row_groups"] > 0
    assert os.path.exists(os.path.join(small.run_root, "_summary.json")) is False  # the report is the DAG's task


def test_a_run_over_the_bound_leaves_every_later_step_to_its_own_job(small):
    _index_job(small, bound=5)
    assert _left(small) == set()


def test_a_failed_unit_stops_the_one_job_after_its_phase_fault_injected(small, monkeypatch, tmp_path):
    """nsfw row group 0 (partition 0) fails: partition 0 stops after nsfw, partition 1 finishes
    the phase, and nothing after the phase runs (thresholds needs every score)."""
    monkeypatch.setenv("WINNOW_TEST_FAULTS", json.dumps({"stage": "nsfw", "row_groups": [0],
                                                         "once_dir": str(tmp_path / "once")}))
    result, failed = _index_job(small)
    assert failed == {} and result["partitions"] == [0, 1]
    left = _left(small)
    assert {("embed", "0"), ("aesthetic", "0"), ("nsfw", "0"), ("clip_score", "1")} <= left
    assert ("clip_score", "0") not in left and ("thresholds", "run") not in left


def test_an_error_in_a_later_step_never_fails_the_index_step_fault_injected(small, monkeypatch, capsys):
    from winnow import pipeline

    real = pipeline.run_global

    def broken(cfg, stage, **kw):
        if stage == "thresholds":
            raise RuntimeError("injected: the thresholds step broke")
        return real(cfg, stage, **kw)

    monkeypatch.setattr(pipeline, "run_global", broken)
    result, failed = _index_job(small)
    assert failed == {} and result["partitions"] == [0, 1]
    out = capsys.readouterr().out
    assert "stopped at RuntimeError: injected: the thresholds step broke" in out
    assert ("clip_score", "1") in _left(small) and ("thresholds", "run") not in _left(small)
