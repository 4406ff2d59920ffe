"""OpenLineage events of a real ``image_curation`` run (``dag.test()``, a local Ray, the tiny model),
written by the OpenLineage provider's file transport and read back: the index task reads the
shard dataset, ``write``, ``status`` and ``report`` produce the run root's ``write/`` and
``status/``, named as OpenLineage names datasets, and the ``winnow`` run facet carries the model,
the weights digests of the stage fingerprints, the thresholds and the counts of ``_summary.json``.

The run is a separate Python process configured only the way a user configures a deployment (the
``[openlineage]`` settings in the environment): the provider decides whether it is enabled, and
registers its listener, when Airflow first loads its plugins, which this test session has done
long before (without those settings). Also: without the provider the methods return None, and
an error while building lineage never fails a task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from tests.airflow.conftest import AIRFLOW_ENV, REPO

RUN_DATE = datetime(2025, 6, 1, tzinfo=UTC)
NAMESPACE = "winnow-lineage-test"

#: Runs image_curation under dag.test in a fresh process (argv: the run's conf as JSON); prints
#: the run's state on its last line.
RUN_SCRIPT = r"""
import json, sys
from datetime import datetime, UTC
from airflow.dag_processing.dagbag import DagBag

conf = json.loads(sys.argv[1])
dagbag = DagBag(dag_folder=sys.argv[2])
assert not dagbag.import_errors, dagbag.import_errors
dag = dagbag.dags["image_curation"]
for task in dag.tasks:
    task.retries = 0
dr = dag.test(logical_date=datetime.fromisoformat(sys.argv[3]), run_conf=conf)
print("STATE", dr.state)
"""


@pytest.fixture(scope="module")
def lineage_run(airflow_db, tmp_path_factory):
    from tests._tiny import TINY_MODEL
    from winnow.data.sample import generate_sample

    root = tmp_path_factory.mktemp("lineage")
    generate_sample(str(root / "shards"), shards=1, per_shard=8, seed=4)
    conf = {"input_uri": str(root / "shards"), "output_root": str(root / "out"), "run_key": "lineage",
            "buffer_size": 4, "max_partitions": 2, **TINY_MODEL, "aesthetic_threshold": 0.0}
    events_file = root / "events.jsonl"
    env = {
        **os.environ, **AIRFLOW_ENV,
        # What a user sets: where the events go, and the namespace of the jobs.
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                       "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": NAMESPACE,
    }
    env.pop("OPENLINEAGE_DISABLED", None)
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, json.dumps(conf), str(REPO / "dags"),
                           RUN_DATE.isoformat()], env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and "STATE success" in proc.stdout, tail
    assert events_file.exists(), f"no OpenLineage events were written:\n{tail}"
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    run_root = root / "out" / "lineage"
    return {"events": events, "run_root": str(run_root), "shards": str(root / "shards"),
            "summary": json.loads((run_root / "_summary.json").read_text()), "log": tail}


def _complete(events, task_id: str) -> list[dict]:
    """The COMPLETE events of one task (every map index)."""
    return [e for e in events if e.get("eventType") == "COMPLETE"
            and e["job"]["name"] == f"image_curation.{task_id}"]


def _names(datasets) -> list[tuple[str, str]]:
    return [(d["namespace"], d["name"]) for d in datasets]


pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_index_task_reads_the_shard_dataset(lineage_run):
    (event,) = _complete(lineage_run["events"], "index")
    assert event["job"]["namespace"] == NAMESPACE
    assert _names(event["inputs"]) == [("file", lineage_run["shards"])]
    assert _names(event["outputs"]) == [("file", f"{lineage_run['run_root']}/index")]


def test_write_status_and_report_produce_the_run_roots_write_and_status(lineage_run):
    root, events = lineage_run["run_root"], lineage_run["events"]
    write, status = ("file", f"{root}/write"), ("file", f"{root}/status")
    writes = _complete(events, "write")
    assert len(writes) == 2  # one per partition
    for event in writes:
        assert _names(event["outputs"]) == [write]
        assert status in _names(event["inputs"]) and ("file", lineage_run["shards"]) in _names(event["inputs"])
    assert [_names(e["outputs"]) for e in _complete(events, "status")] == [[status], [status]]
    (report,) = _complete(events, "report")
    assert _names(report["inputs"]) == [("file", lineage_run["shards"])]
    assert _names(report["outputs"]) == [write, status]
    summary = lineage_run["summary"]
    rows = {d["name"]: d["outputFacets"]["outputStatistics"]["rowCount"] for d in report["outputs"]}
    assert rows == {write[1]: summary["written"], status[1]: summary["records"]}


def test_the_run_facet_has_model_weights_thresholds_and_the_summarys_counts(lineage_run):
    from winnow.filters import COUNT_NAMES
    from winnow.rowgroups import CommitStore

    summary = lineage_run["summary"]
    (report,) = _complete(lineage_run["events"], "report")
    facet = report["run"]["facets"]["winnow"]
    store = CommitStore(lineage_run["run_root"])
    digests = {stage: store.read_fingerprint(stage)["config"]["weights_digest"]
               for stage in ("embed", "aesthetic", "nsfw", "clip_score")}
    assert facet["model"] == {"name": "winnow-tiny-vit", "pretrained": "random"}
    assert facet["weights"] == digests
    assert facet["thresholds"] == summary["thresholds"]
    assert facet["counts"] == {k: summary[k] for k in ("records", *COUNT_NAMES.values(), "written")}
    assert (facet["step"], facet["runKey"], facet["runRoot"]) == ("report", "lineage", lineage_run["run_root"])
    # Every task of the run says which weights it ran with; a score stage names its own fingerprint.
    (embed0, _embed1) = _complete(lineage_run["events"], "partition.embed")
    assert embed0["run"]["facets"]["winnow"]["weights"] == digests
    assert embed0["run"]["facets"]["winnow"]["fingerprint"] == store.read_fingerprint("embed")["digest"]
    assert "thresholds" not in embed0["run"]["facets"]["winnow"]  # not fixed yet when embed ends
    (thresholds,) = _complete(lineage_run["events"], "thresholds")
    assert thresholds["run"]["facets"]["winnow"]["thresholds"] == summary["thresholds"]


def test_every_winnow_task_completed_with_datasets(lineage_run):
    """Each task of the run has a COMPLETE event with inputs and outputs, but the corpus steps
    (no corpus: they did nothing)."""
    completes = [e for e in lineage_run["events"] if e.get("eventType") == "COMPLETE" and "." in e["job"]["name"]]
    by_task: dict[str, list[dict]] = {}
    for e in completes:
        by_task.setdefault(e["job"]["name"].split(".", 1)[1], []).append(e)
    corpus = {"corpus_pre", "corpus_check", "corpus_near", "publish"}
    assert corpus <= set(by_task)
    for task_id, events in by_task.items():
        for e in events:
            if task_id in corpus:
                assert "winnow" not in e["run"]["facets"], task_id
            else:
                assert e["inputs"] and e["outputs"] and "winnow" in e["run"]["facets"], task_id


# ---- without the provider, and on errors --------------------------------------------------------

_NO_PROVIDER = ("airflow.providers.openlineage", "airflow.providers.openlineage.extractors", "openlineage",
                "openlineage.client", "openlineage.client.event_v2")


def _operators():
    from winnow_airflow.corpus import PublishOperator, TakedownOperator
    from winnow_airflow.stages import IndexOperator, ReportOperator, WriteOperator

    return [IndexOperator(task_id="index"), WriteOperator(task_id="write", partition=0),
            ReportOperator(task_id="report"), PublishOperator(task_id="publish"), TakedownOperator(task_id="takedown")]


class _NoContext:
    """A task instance whose context must not be asked for."""

    def get_template_context(self):
        raise AssertionError("the lineage methods built a context without the provider")


def test_without_the_provider_the_methods_return_none(monkeypatch):
    operators = _operators()  # Airflow itself is loaded first: it reads every provider's info
    for name in _NO_PROVIDER:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    from winnow_airflow.lineage import provider_available

    assert not provider_available()
    for op in operators:
        assert op.get_openlineage_facets_on_complete(_NoContext()) is None
        assert op.get_openlineage_facets_on_failure(_NoContext()) is None


def test_an_error_while_building_lineage_gives_none():
    def broken():
        raise RuntimeError("no context")

    for op in _operators():
        assert op.get_openlineage_facets_on_complete(SimpleNamespace(get_template_context=broken)) is None
        assert op.get_openlineage_facets_on_failure(SimpleNamespace(get_template_context=broken)) is None


def test_datasets_before_the_run_root_holds_anything(tmp_path):
    """A try that failed before the index wrote anything: the datasets, without digests."""
    from winnow_airflow.stages import IndexOperator

    params = {"input_uri": f"{tmp_path}/shards/{{a,b}}/", "output_root": f"{tmp_path}/out", "run_key": "20250601"}
    ti = SimpleNamespace(get_template_context=lambda: {"params": params})
    lineage = IndexOperator(task_id="index").get_openlineage_facets_on_failure(ti)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("file", f"{tmp_path}/shards/a"),
                                                               ("file", f"{tmp_path}/shards/b")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("file", f"{tmp_path}/out/20250601/index")]
    facet = lineage.run_facets["winnow"]
    assert (facet.weights, facet.fingerprint, facet.counts, facet.runKey) == ({}, None, None, "20250601")


def test_object_store_names_follow_the_openlineage_spec():
    from winnow.pipeline import CurationConfig
    from winnow_airflow.lineage import dataset_name, task_datasets

    cfg = CurationConfig(input_uri="s3://in/shards/2025-06-01/", output_root="gs://out/curated", run_key="r")
    inputs, outputs = task_datasets("report", cfg)
    assert [dataset_name(u) for u in inputs] == [("s3://in", "shards/2025-06-01")]
    assert [dataset_name(u) for u in outputs] == [("gs://out", "curated/r/write"), ("gs://out", "curated/r/status")]


def test_the_takedown_task_reads_the_list_and_the_corpus_and_writes_the_corpus(tmp_path):
    """The takedown operator's lineage after its try (the summary its execute kept), and for a try
    that failed before the takedown ran (the datasets alone)."""
    from winnow_airflow.corpus import TakedownOperator

    params = {"corpus_uri": "s3://bucket/corpus/", "list_uri": f"{tmp_path}/optout.txt", "reason": "opt-out"}
    ti = SimpleNamespace(get_template_context=lambda: {"params": params})
    op = TakedownOperator(task_id="takedown")
    failed = op.get_openlineage_facets_on_failure(ti)
    assert [(d.namespace, d.name) for d in failed.inputs] == [("file", f"{tmp_path}/optout.txt"), ("s3://bucket", "corpus")]
    assert [(d.namespace, d.name) for d in failed.outputs] == [("s3://bucket", "corpus")]
    facet = failed.run_facets["winnowTakedown"]
    assert (facet.reason, facet.takedown, facet.removed) == ("opt-out", None, None)
    op._summary = {"takedown": 3, "removed": [{"key": "a"}, {"key": "b"}]}
    done = op.get_openlineage_facets_on_complete(ti).run_facets["winnowTakedown"]
    assert (done.reason, done.takedown, done.removed) == ("opt-out", 3, 2)
