"""The image_curation DAG: parses fast without touching the engine, has the designed shape,
and its params reject bad values before any task runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from tests.airflow.conftest import AIRFLOW_ENV, REPO

_PARSE_PROBE = """
import importlib.util, json, sys, time
import airflow.sdk  # the DAG processor has Airflow loaded already; time only the DAG file
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("image_curation", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
seconds = time.perf_counter() - t
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("winnow", "ray", "torch", "open_clip", "pyarrow"))
print(json.dumps({"seconds": seconds, "heavy": heavy, "tasks": len(module.dag.tasks)}))
"""


def test_dagbag_imports_the_dag_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "image_curation" in dagbag.dags


def test_dag_file_parses_without_engine_imports():
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE_PROBE, str(REPO / "dags" / "image_curation.py")],
        env={**AIRFLOW_ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["tasks"] == 17  # 12 stages, report, and the 4 corpus steps
    # A guard against an accidental heavy import (torch alone takes seconds), not a benchmark:
    # loaded CI machines vary, so the bound is loose.
    assert probe["seconds"] < 5, probe
    # Only the engine's stage registry (pure Python) is read at parse time: neither the engine's
    # compute nor Ray, torch or storage clients are loaded.
    assert probe["heavy"] == ["winnow", "winnow.checks", "winnow.exceptions", "winnow.filters", "winnow.registry",
                              "winnow.runkey"], probe["heavy"]


def test_dag_shape_is_index_then_mapped_partition_group_then_dedup_steps_write_report(curation_dag):
    dag = curation_dag
    assert dag.dag_id == "image_curation"
    assert dag.catchup is False
    ids = {t.task_id for t in dag.tasks}
    assert ids == {"index", "partition.embed", "partition.aesthetic", "partition.nsfw", "partition.clip_score",
                   "thresholds", "centroids", "assign", "pairwise", "dedup", "status", "write", "report",
                   "corpus_pre", "corpus_check", "corpus_near", "publish"}
    up = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert up["index"] == set()
    # The corpus steps (nothing without corpus_uri): the pre-check right after the index, the
    # ordered check after every score and before the thresholds, the near-duplicate check after
    # the run's own dedup, publish after write.
    assert up["corpus_pre"] == {"index"}
    assert "corpus_pre" in up["partition.embed"]
    assert up["corpus_check"] == {"partition.clip_score"}
    assert up["corpus_near"] == {"dedup"}
    assert up["publish"] == {"write"}
    assert "index" in up["partition.embed"]
    assert "partition.embed" in up["partition.aesthetic"]
    assert "partition.aesthetic" in up["partition.nsfw"]
    assert "partition.nsfw" in up["partition.clip_score"]
    # The thresholds every filter uses come after every score of the run.
    assert up["thresholds"] == {"corpus_check"}
    # Dedup as steps: centroids (one task) -> assign (per partition) -> pairwise (per bucket,
    # mapped over the centroids task's bucket list) -> dedup flags (per partition) -> status
    # -> write.
    assert up["centroids"] == {"thresholds"}
    assert up["assign"] == {"centroids", "index"}
    assert up["pairwise"] == {"assign", "centroids"}
    assert up["dedup"] == {"pairwise", "index"}
    assert up["status"] == {"corpus_near", "index"}
    assert up["write"] == {"status", "index"}
    assert up["report"] == {"publish"}
    # The partition group is mapped over the index task's output (one instance per partition),
    # and so are assign, dedup and write; pairwise over the bucket list.
    group = dag.task_group_dict["partition"]
    assert type(group).__name__ == "MappedTaskGroup"
    for task_id in ("assign", "dedup", "status", "write"):
        task = dag.get_task(task_id)
        assert type(task).__name__ == "MappedOperator" and "partition" in task.expand_input.value
    pairwise = dag.get_task("pairwise")
    assert type(pairwise).__name__ == "MappedOperator" and "bucket" in pairwise.expand_input.value
    assert "bucket_label" in pairwise.map_index_template
    for task_id in ("partition.embed", "partition.aesthetic", "partition.nsfw", "partition.clip_score", "assign",
                    "dedup", "status", "write"):
        assert "partition_label" in dag.get_task(task_id).map_index_template


def test_dag_task_ids_and_order_are_the_registry_s(curation_dag):
    from winnow.registry import STAGES, partition_stages, run_phases
    from winnow_airflow.stages import OPERATORS, ReportOperator

    dag = curation_dag
    from winnow_airflow.corpus import CORPUS_STEPS

    assert {t.task_id for t in dag.tasks} == {s.task_id for s in STAGES} | {"report"} | {t for t, _ in CORPUS_STEPS}
    for spec in STAGES:
        task = dag.get_task(spec.task_id)
        assert type(task).__name__ in (OPERATORS[spec.name].__name__, "MappedOperator")
        assert (spec.scope != "global") == (task.get_needs_expansion() or bool(spec.group))
    # Each phase's first task waits for the previous phase's last one.
    phases = [specs for _, specs in run_phases()]
    corpus_after = {after: task_id for task_id, after in CORPUS_STEPS}
    for before, after in zip(phases, phases[1:]):
        # (or waits for the corpus step that follows that last one)
        last = corpus_after.get(before[-1].name, before[-1].task_id)
        assert last in dag.get_task(after[0].task_id).upstream_task_ids
    assert ReportOperator(task_id="r").partition_task_ids == [s.task_id for s in partition_stages()]
    for name, op in OPERATORS.items():
        if hasattr(op, "stage"):
            assert op.stage == name


def test_operators_are_exactly_the_registry_s_stages_each_a_class_written_out():
    import inspect
    import re

    import winnow_airflow.stages as stages
    from winnow.registry import STAGES
    from winnow_airflow.base import RowGroupStageOperator

    assert list(stages.OPERATORS) == [spec.name for spec in STAGES]
    source = inspect.getsource(stages)
    for spec in STAGES:
        op = stages.OPERATORS[spec.name]
        assert op.stage == spec.name and issubclass(op, RowGroupStageOperator) == (spec.scope == "partition")
        # Found by grep and by an IDE: a class statement of its own in the module, with a docstring.
        assert re.search(rf"^class {op.__name__}\(", source, re.M), op.__name__
        assert getattr(stages, op.__name__) is op and op.__module__ == "winnow_airflow.stages" and op.__doc__


def test_param_ranges_are_those_of_the_configs_that_own_them(curation_dag):
    from winnow.filters import PARAMS
    from winnow.stages.decode import DECODE_BACKENDS
    from winnow.stages.dedup import EPS_RANGE

    params = curation_dag.params
    eps = params.get_param("dedup_eps").schema
    assert (eps["exclusiveMinimum"], eps["maximum"]) == EPS_RANGE
    for declared in PARAMS:  # every filter param is a DAG param with the declared range and default
        param = params.get_param(declared.name)
        schema = param.schema
        assert {k: schema[k] for k in declared.json_schema()} == declared.json_schema(), declared.name
        assert param.value == declared.default and schema["title"] == declared.title, declared.name
    assert tuple(params.get_param("decode_backend").schema["enum"]) == DECODE_BACKENDS


def test_dag_declares_assets_retries_and_docs(curation_dag):
    dag = curation_dag
    outlets = {t.task_id: [a.name for a in t.outlets] for t in dag.tasks if t.outlets}
    assert outlets == {"write": ["winnow_curated_images"], "report": ["winnow_curation_summary"],
                       "publish": ["winnow_corpus"]}
    embed = dag.get_task("partition.embed")
    assert embed.retries == 2 and embed.retry_exponential_backoff > 0
    for word in ("backfill create", "--reprocess-behavior failed", "only-failed", "clearTaskInstances"):
        assert word in dag.doc_md


def test_every_param_has_a_title_and_description(curation_dag):
    from winnow.filters import PARAMS

    # The run's own params, then one per declared filter param (their title and description come
    # from the declaration).
    expected = {"input_uri", "output_root", "run_key", "buffer_size", "max_partitions", "model",
                "pretrained", "model_dir", "aesthetic_weights", "nsfw_weights", "watermark_weights", "dedup_eps",
                "dedup_clusters",
                "caption_field", "allow_random_weights", "overwrite", "skip_bad_shards", "ray_conn_id",
                "decode_backend", "batch_size", "storage_conn_id", "dedup_sample_size", "dedup_buckets",
                "corpus_uri", "url_field", *(p.name for p in PARAMS)}
    params = curation_dag.params
    assert set(params.keys()) == expected
    for name in expected:
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("buffer_size", 0),
        ("buffer_size", "64"),
        ("max_partitions", 2000),
        ("nsfw_threshold", 1.5),
        ("aesthetic_threshold", -1),
        ("dedup_eps", 0),
        ("dedup_clusters", -3),
        ("dedup_buckets", 2000),
        ("overwrite", "yes"),
        ("input_uri", ""),
        ("run_key", "a/b"),
    ],
)
def test_params_schema_rejects_bad_values(curation_dag, name, bad):
    params = ParamsDict(curation_dag.params)
    with pytest.raises(ParamValidationError):
        params[name] = bad


def test_params_schema_accepts_a_test_run_conf(curation_dag):
    params = ParamsDict(curation_dag.params)
    conf = {"input_uri": "/data/x", "output_root": "/tmp/out", "run_key": "r1", "buffer_size": 4,
            "max_partitions": 2, "model": "winnow-tiny-vit", "pretrained": "random",
            "allow_random_weights": True, "aesthetic_weights": None, "nsfw_threshold": 0.9}
    params.update(conf)
    resolved = params.validate()
    assert resolved["buffer_size"] == 4 and resolved["run_key"] == "r1"


def test_every_param_is_a_run_parameter_or_one_the_operators_handle(curation_dag):
    import dataclasses

    from winnow.pipeline import CurationConfig
    from winnow_airflow.base import AIRFLOW_PARAMS

    fields = {f.name for f in dataclasses.fields(CurationConfig)}
    assert set(curation_dag.params.keys()) <= fields | AIRFLOW_PARAMS
    assert not AIRFLOW_PARAMS & fields


def test_a_misspelt_conf_key_is_named_with_the_closest_param_by_the_operator(tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from winnow_airflow.stages import OPERATORS

    op = OPERATORS["index"](task_id="index")
    params = {"input_uri": str(tmp_path), "output_root": str(tmp_path / "out"), "run_key": "r",
              "ray_conn_id": "ray_default", "storage_conn_id": None}
    assert op.curation_config({"params": params}).run_key == "r"  # Airflow's own params are accepted
    with pytest.raises(AirflowFailException, match=r"unknown parameter 'aesthetic_treshold' \(did you mean "
                                                    r"'aesthetic_threshold'\?\)"):
        op.curation_config({"params": {**params, "aesthetic_treshold": 5}})


@pytest.mark.parametrize("knob, bad", [("buffer_size", 0), ("max_partitions", 5000), ("dedup_eps", 2.0),
                                       ("nsfw_threshold", 7.0), ("batch_size", 1.5), ("overwrite", "no"),
                                       ("worker_cpus", 0), ("worker_gpus", -1), ("compute", "actor")])
def test_a_bad_knob_fails_the_task_at_once(tmp_path, knob, bad):
    """Every knob check raises ``ConfigError``; the operators turn it into Airflow's no-retry failure."""
    from airflow.sdk.exceptions import AirflowFailException

    from winnow.data.sample import TINY_MODEL_PARAMS
    from winnow.execution import Execution
    from winnow.pipeline import CurationConfig
    from winnow_airflow.base import engine_errors

    with pytest.raises(AirflowFailException, match=rf"(?s)ConfigError: .*{knob}"), engine_errors():
        if knob in ("worker_cpus", "worker_gpus", "compute"):  # an operator's Execution, built in engine_errors
            Execution(**{knob: bad})
        else:
            CurationConfig(input_uri=str(tmp_path), output_root=str(tmp_path / "out"), run_key="r",
                           **{**TINY_MODEL_PARAMS, knob: bad}).validate()


def test_a_dag_run_with_a_misspelt_conf_key_fails_its_index_task_at_once_and_writes_nothing(curation_dag, tmp_path, capfd):
    from datetime import UTC, datetime

    from tests.airflow.conftest import retries_set
    from winnow.data.sample import TINY_MODEL_PARAMS

    conf = {"input_uri": str(tmp_path / "in"), "output_root": str(tmp_path / "out"), "run_key": "typo",
            **TINY_MODEL_PARAMS, "aesthetic_treshold": 5}
    with retries_set(curation_dag, 2):
        dr = curation_dag.test(logical_date=datetime(2025, 5, 17, tzinfo=UTC), run_conf=conf)
    states = {(ti.task_id, ti.map_index): (str(getattr(ti.state, "value", ti.state)), ti.try_number)
              for ti in dr.get_task_instances()}
    assert dr.state == "failed"
    assert states[("index", -1)] == ("failed", 1), states  # AirflowFailException: no retry
    assert not (tmp_path / "out").exists()
    out = capfd.readouterr()
    assert "unknown parameter 'aesthetic_treshold' (did you mean 'aesthetic_threshold'?)" in out.out + out.err
