"""The Ray Job entry point: one step of a run on the cluster, run by the engine.

What a job-mode Airflow task submits: ``python -m winnow.job --stage embed --partition 3
--config <base64 JSON> --execution <base64 JSON> --summary <uri>`` for a partition stage,
``--stage index`` or ``--stage centroids`` for a global step, ``--stage pairwise --bucket 2`` for
one bucket (``--chain``: a partition job also runs the partition stages after its own in the
run's phase, e.g. embed's job runs aesthetic and nsfw too, see :func:`chained_stages`;
``--one-job-max-records N`` on the index: a run of at most N records and no corpus runs every later
step in the index's job too, see :func:`run_rest`). It runs
where ``--execution`` says (the task's :class:`~winnow.execution.Execution`, see
:func:`job_execution`), skips committed work as every run does, writes its summary as JSON to
storage and prints it as its last line (``WINNOW_JOB_SUMMARY {...}``). A step that fails prints
one line ``WINNOW_JOB_ERROR <message>`` (the task log shows it as the failure). Exit codes: 0
done, 3 some units failed (the others are committed), 2 bad config, 1 anything else.

Storage settings come from the job's environment: job mode passes the ones of the run's
``storage_conn_id`` connection as short-lived credentials in the job's runtime env, or nothing
when the cluster uses its own identity. :func:`main` reads them once
(:meth:`~winnow.rowgroups.fs.StorageOptions.from_env`) into the run's config, which carries them
to every step and Ray worker of the job.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from winnow.execution import Execution

if TYPE_CHECKING:
    from winnow.rowgroups.fs import StorageOptions
from winnow.results import MAX_ERROR_CHARS, error_text

SUMMARY_MARKER = "WINNOW_JOB_SUMMARY "
#: Epoch seconds of the job's milestones (driver start, Ray attached, done), for the overhead benchmark.
TIMES_MARKER = "WINNOW_JOB_TIMES "
ERROR_MARKER = "WINNOW_JOB_ERROR "
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_UNITS_FAILED = 0, 1, 2, 3
#: Under the run root, beside (not inside) the stage folders the plan and progress list.
JOBS_DIR = "_jobs"
#: A run of at most this many records (and no corpus) runs in one Ray Job: the index's job goes
#: on through every later step (:func:`run_rest`) and the later tasks complete from what it left.
#: Each Ray Job costs ~3 s of start (BENCHMARKS.md section 15b); a small run's steps take less.
#: The ``ray`` connection's extra ``one_job_max_records`` overrides it (0: every step its own job).
ONE_JOB_MAX_RECORDS = 4000


def unit_name(partition: int | None = None, bucket: int | None = None) -> str:
    """The folder of one unit's job summaries: ``p00003``, ``b00002`` or ``run`` (a global step)."""
    if partition is not None:
        return f"p{int(partition):05d}"
    if bucket is not None:
        return f"b{int(bucket):05d}"
    return "run"


def summary_uri(run_root: str, stage: str, unit: str, submission_id: str) -> str:
    """Where the job with ``submission_id`` leaves its summary (``unit`` from :func:`unit_name`)."""
    return f"{run_root.rstrip('/')}/{JOBS_DIR}/{stage}/{unit}/{submission_id}.json"


def encode_config(config: dict[str, Any]) -> str:
    """A config dict as one shell-safe argument."""
    return base64.urlsafe_b64encode(json.dumps(config, sort_keys=True).encode()).decode()


def job_execution(*, worker_cpus: float | None = None, worker_gpus: float | None = None) -> Execution:
    """Where a job's step runs: Ray on the cluster the job runs on (Ray sets ``RAY_ADDRESS`` for
    its driver), model workers as one Ray Data actor per partition (a Ray shared with other jobs),
    of the task's worker sizes."""
    return Execution(backend="ray", ray_address="auto", compute="actors", worker_cpus=worker_cpus,
                     worker_gpus=worker_gpus)


def entrypoint(*, stage: str, config: dict[str, Any], execution: Execution, summary: str, owner: str | None,
               partition: int | None = None, bucket: int | None = None, python: str = "python",
               chain: bool = False, one_job_max_records: int | None = None) -> str:
    """The job's shell command (no secret: storage settings travel in the runtime env)."""
    cmd = f"{python} -m winnow.job --stage {stage}"
    if partition is not None:
        cmd += f" --partition {int(partition)}"
    if bucket is not None:
        cmd += f" --bucket {int(bucket)}"
    if chain:
        cmd += " --chain"
    if one_job_max_records:
        cmd += f" --one-job-max-records {int(one_job_max_records)}"
    cmd += f" --config {encode_config(config)} --execution {encode_config(execution.to_dict())} --summary {summary}"
    if owner:
        cmd += f" --owner {base64.urlsafe_b64encode(owner.encode()).decode()}"
    return cmd


def read_summary(uri: str, storage: StorageOptions | None) -> dict[str, Any] | None:
    """The summary a job left at ``uri`` (``None``: it never got that far), read with the run's
    ``storage`` settings."""
    from winnow.rowgroups.store import read_json, resolve_filesystem

    fs, path = resolve_filesystem(uri, storage)
    return read_json(fs, path)


def error_line(text: str | None) -> str | None:
    """The last ``WINNOW_JOB_ERROR`` message in a job's output or status message, if any."""
    found = None
    for line in (text or "").splitlines():
        at = line.find(ERROR_MARKER)
        if at >= 0:
            found = line[at + len(ERROR_MARKER):].strip()
    return found


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _fail(exc: BaseException) -> None:
    # One line, last: what the Airflow task shows as the job's error.
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    print(ERROR_MARKER + text[:MAX_ERROR_CHARS], file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, cfg: Any, execution: Execution, owner: str | None
         ) -> tuple[dict[str, Any], dict[int, str]]:
    """Run the step; its summary dict and the failed units (row groups or buckets) with errors."""
    from winnow import pipeline
    from winnow.exceptions import ConfigError
    from winnow.registry import stage_spec

    scope = stage_spec(args.stage).scope
    common = {"execution": execution, "owner": owner, "log": _log}
    if scope == "partition":
        if args.partition is None:
            raise ConfigError(f"stage {args.stage!r} runs per partition: give --partition")
        summary = pipeline.run_partition(cfg, args.stage, args.partition, **common)
        if not summary.failed and args.chain:
            _run_chain(args, cfg, common)
        return summary.to_dict(), dict(summary.failed)
    if scope == "bucket":
        if args.bucket is None:
            raise ConfigError(f"stage {args.stage!r} runs per bucket: give --bucket")
        summary = pipeline.run_buckets(cfg, args.stage, [args.bucket], **common)
        return _bucket_result(summary), dict(summary.failed)
    result = pipeline.run_global(cfg, args.stage, **common)
    if args.stage == "index" and args.one_job_max_records:
        if cfg.corpus_uri is not None:
            _log("the run has a corpus: each later step runs as its own Ray job (the corpus steps run between them)")
        elif result["num_records"] > args.one_job_max_records:
            _log(f"{result['num_records']} records, more than {args.one_job_max_records}: each later step runs as "
                 "its own Ray job")
        else:
            try:
                run_rest(cfg, result["partitions"], common)
            except Exception as exc:  # noqa: BLE001 - a later step's error is its own task's, not the index's
                _log(f"the run's later steps stopped at {' '.join(error_text(exc).split())}; each of them runs as its "
                     "own Ray job, where its task shows that error")
    return result, {}


def _bucket_result(summary: Any, *, errors: bool = False) -> dict[str, Any]:
    """A bucket step's summary for one bucket, as its task reads it (``errors``: with every failed
    unit's error, :meth:`~winnow.results.StageSummary.to_dict`)."""
    result = summary.to_dict(errors=errors)
    result.update({k: v for k, v in next(iter(summary.results), {}).items()
                   if isinstance(v, (int, float, str, bool, type(None)))})
    return result


def run_rest(cfg: Any, partitions: list[int], common: dict[str, Any]) -> bool:
    """Every step after the index, in the DAG's order (``winnow.registry.run_phases``), in this
    job: what a small run's index job does so that its later tasks need no job of their own.

    Each step commits as always, and each unit's summary is left where its task reads it
    (:func:`chained_summary_uri`). A phase with a failed unit stops it there (a partition's later
    stages are skipped, the other partitions go on to the end of the phase): those tasks, and the
    ones after them, submit their own jobs, which compute only what is missing (their retries as
    always). True: every step ran.
    """
    from winnow import pipeline
    from winnow.registry import run_phases
    from winnow.rowgroups.store import CommitStore

    store = CommitStore(cfg.root)
    buckets: list[int] = []
    for scope, specs in run_phases():
        if scope == "global":
            name = specs[0].name
            if name == "index":
                continue
            result = pipeline.run_global(cfg, name, **common)
            _leave(cfg, store, name, result)
            if name == "centroids":
                buckets = list(range(int(result["buckets"])))
            continue
        failed = False
        if scope == "bucket":
            (spec,) = specs
            for bucket in buckets:
                summary = pipeline.run_buckets(cfg, spec.name, [bucket], **common)
                _leave(cfg, store, spec.name, _bucket_result(summary, errors=True), bucket=bucket)
                failed = failed or bool(summary.failed)
        else:
            for partition in partitions:
                for spec in specs:
                    summary = pipeline.run_partition(cfg, spec.name, partition, **common)
                    _leave(cfg, store, spec.name, summary.to_dict(errors=True), partition=partition)
                    if summary.failed:
                        failed = True
                        break  # this partition's later stages read what failed
        if failed:
            _log(f"{specs[0].name}: some units failed; this step's tasks and the later ones run their own Ray jobs")
            return False
    _log("every step of the run ran in this job: the later tasks complete from its summaries")
    return True


def _leave(cfg: Any, store: Any, stage: str, result: dict[str, Any], *, partition: int | None = None,
           bucket: int | None = None) -> None:
    """Leave one unit's summary where its task looks (:func:`chained_summary_uri`, under the
    stage's fingerprint as ``store``, the run root's :class:`~winnow.rowgroups.CommitStore`, reads it)."""
    from winnow.rowgroups.store import resolve_filesystem, write_json

    uri = chained_summary_uri(cfg.run_root, stage, partition, store.fingerprint_digest(stage), bucket=bucket)
    fs, path = resolve_filesystem(uri, cfg.storage)
    write_json(fs, path, result)


def chained_stages(stage: str, *, corpus: bool = False) -> list[str]:
    """The partition stages after ``stage`` in its phase of the run (``embed`` -> ``aesthetic``,
    ``nsfw``): a job runs them too, on the driver and cluster it already has, so their tasks find
    their row groups committed and need no job of their own. With a corpus the chain stops before
    ``status``: status reads the corpus near-duplicate check, which needs every partition's dedup
    flags first (then status's own task submits a job, which chains write)."""
    from winnow.registry import run_phases

    for scope, specs in run_phases():
        names = [s.name for s in specs]
        if scope == "partition" and stage in names:
            after = names[names.index(stage) + 1:]
            if corpus and stage != "status" and "status" in after:
                after = after[:after.index("status")]
            return after
    return []


def chained_summary_uri(run_root: str, stage: str, partition: int | None, fingerprint: str, *,
                        bucket: int | None = None) -> str:
    """Where the summary of a step that another step's job ran is left (its task reports it): a
    partition's (``--chain``), or any unit's of a run that ran in one job (:func:`run_rest`)."""
    return summary_uri(run_root, stage, unit_name(partition, bucket), f"chained-{fingerprint[:16]}")


def _run_chain(args: argparse.Namespace, cfg: Any, common: dict[str, Any]) -> None:
    from winnow import pipeline
    from winnow.rowgroups.store import CommitStore

    store = CommitStore(cfg.root)
    for stage in chained_stages(args.stage, corpus=cfg.corpus_uri is not None):
        summary = pipeline.run_partition(cfg, stage, args.partition, **common)
        _leave(cfg, store, stage, summary.to_dict(errors=True), partition=args.partition)
        if summary.failed:
            _log(f"{stage} partition {args.partition}: {len(summary.failed)} row groups failed; its task retries them")
            return  # the later stages read what failed: their own tasks run them


def main(argv: list[str] | None = None) -> int:
    times = {"main": time.time()}
    ap = argparse.ArgumentParser(prog="python -m winnow.job", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True)
    ap.add_argument("--partition", type=int, help="the partition (partition stages)")
    ap.add_argument("--bucket", type=int, help="the bucket (bucket stages)")
    ap.add_argument("--config", required=True, help="CurationConfig as base64 JSON")
    ap.add_argument("--execution", required=True, help="Execution (where the step runs) as base64 JSON")
    ap.add_argument("--summary", required=True, help="URI the summary JSON is written to")
    ap.add_argument("--owner", help="the run root's lease owner, base64")
    ap.add_argument("--chain", action="store_true",
                    help="also run the partition stages after --stage in its phase (see chained_stages)")
    ap.add_argument("--one-job-max-records", type=int, default=0,
                    help="index only: a run of at most this many records (and no corpus) runs every later "
                         "step in this job too (see run_rest); 0: never")
    args = ap.parse_args(argv)

    from winnow import pipeline
    from winnow.exceptions import ConfigError, StageConfigMismatch, WinnowError
    from winnow.ray.cluster import connect
    from winnow.rowgroups.store import StorageOptions, resolve_filesystem, write_json

    owner = base64.urlsafe_b64decode(args.owner).decode() if args.owner else None
    try:
        # Where the run stores: the settings job mode put in this job's environment (never in
        # its arguments, which Ray's dashboard shows), read once, here.
        cfg = pipeline.CurationConfig.from_params(json.loads(base64.urlsafe_b64decode(args.config)),
                                                  storage=StorageOptions.from_env())
        execution = Execution.from_dict(json.loads(base64.urlsafe_b64decode(args.execution)))
        unit = f", partition {args.partition}" if args.partition is not None else (
            f", bucket {args.bucket}" if args.bucket is not None else "")
        _log(f"stage {args.stage}{unit} of run {cfg.run_root}")
        if execution.backend == "ray":
            connect(execution.ray_address)  # the cluster this job runs on ("auto": Ray sets RAY_ADDRESS)
        times["attached"] = time.time()
        result, failed = _run(args, cfg, execution, owner)
        times["done"] = time.time()
        # Every failed unit with its error (the XCom summary keeps only the first ones).
        result["errors"] = {str(u): msg[:MAX_ERROR_CHARS] for u, msg in sorted(failed.items())}
        fs, path = resolve_filesystem(args.summary, cfg.storage)
        write_json(fs, path, result)
    except (ConfigError, StageConfigMismatch) as exc:
        _fail(exc)
        return EXIT_CONFIG
    except WinnowError as exc:
        _fail(exc)
        return EXIT_ERROR
    except Exception as exc:
        import traceback

        traceback.print_exc()
        _fail(exc)
        return EXIT_ERROR
    print(TIMES_MARKER + json.dumps(times), flush=True)
    print(SUMMARY_MARKER + json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    return EXIT_UNITS_FAILED if failed else EXIT_OK


def _exit(code: int) -> None:
    """End the driver now: its work is committed and its last lines are flushed. Python's and
    Ray's teardown at exit (disconnecting, ending Ray Data's executor) cost seconds per job and
    change nothing; the job ends (and its task goes on) that much sooner."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
