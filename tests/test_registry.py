"""The stage graph is declared once: every place that needs it derives it from the registry.

Each test fails when one of the derived copies (stage classes, configs, fingerprint chain, run
order, report, operators) drifts from ``winnow.registry``; the DAG's side is pinned in
``tests/airflow/test_dag.py``.
"""

from __future__ import annotations

import pytest

from winnow import pipeline
from winnow.data.sample import TINY_MODEL_PARAMS
from winnow.exceptions import ConfigError
from winnow.registry import STAGES, partition_stages, run_phases, stage_order, stage_spec
from winnow.rowgroups import RowGroupPlan


@pytest.fixture()
def cfg(tmp_path):
    return pipeline.CurationConfig(input_uri=str(tmp_path), output_root=str(tmp_path / "out"), run_key="r",
                                   **TINY_MODEL_PARAMS)


def test_every_partition_stage_class_carries_its_registry_name(cfg):
    for spec in partition_stages():
        stage = pipeline.make_stage(cfg, spec.name)
        assert type(stage) is spec.load_compute(), spec
        assert stage.name == spec.name


def test_every_global_stage_binds_a_function_of_its_own_stage_module():
    """A global stage's compute is its stage module's (never the pipeline's): the one run-level
    wrapper, ``pipeline.run_global``, does the lease, the plan and the fingerprint for all."""
    for spec in (s for s in STAGES if s.scope == "global"):
        assert callable(spec.load_compute())
        assert spec.compute.split(":")[0].startswith(("winnow.stages.", "winnow.data.")), spec.compute


def test_run_global_refuses_a_stage_that_is_not_global(cfg):
    from winnow.execution import LOCAL

    with pytest.raises(ConfigError, match="not a global stage; global stages are index, thresholds, centroids"):
        pipeline.run_global(cfg, "embed", execution=LOCAL)


def test_fingerprint_chain_follows_the_registry_upstreams(cfg):
    plan = RowGroupPlan(10, 5, max_partitions=2)
    fps = pipeline.stage_fingerprints(cfg, plan)
    assert list(fps) == list(stage_order()[1:])
    for name, f in fps.items():
        assert f.stage == name
        assert tuple(sorted(f.upstream)) == tuple(sorted(stage_spec(name).upstream))
        for up in stage_spec(name).upstream:
            if up != "index":
                assert f.upstream[up] == fps[up].digest  # chained: a change upstream changes it


def test_run_phases_cover_every_stage_once_in_registry_order():
    names = [spec.name for _, specs in run_phases() for spec in specs]
    assert names == list(stage_order())
    for scope, specs in run_phases():
        assert all(spec.scope == scope for spec in specs)


def test_upstreams_come_before_their_readers():
    seen: set[str] = set()
    for spec in STAGES:
        assert set(spec.upstream) <= seen, spec
        seen.add(spec.name)


def test_make_stage_refuses_a_global_or_unknown_stage(cfg):
    with pytest.raises(ConfigError, match="whole run"):
        pipeline.make_stage(cfg, "centroids")
    with pytest.raises(ValueError, match="unknown stage 'output'"):
        pipeline.make_stage(cfg, "output")


def test_every_registered_stage_has_a_config_built_by_curation_config(cfg):
    for spec in STAGES:
        assert cfg.stage_config(spec.name) is not None
