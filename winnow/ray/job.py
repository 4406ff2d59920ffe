"""The Ray Job entrypoint: one stage over one partition, run on the cluster by the engine.

What a job-mode Airflow task submits (``python -m winnow.ray.job --stage embed --partition 3
--config <base64 JSON> --summary <uri>``). It attaches to the cluster it runs on, skips committed
row groups as every run does, writes the partition summary as JSON to storage and prints it as
its last line (``WINNOW_PARTITION_SUMMARY {...}``). Exit codes: 0 done, 3 some row groups failed
(the others are committed), 2 bad config, 1 anything else.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from typing import Any

SUMMARY_MARKER = "WINNOW_PARTITION_SUMMARY "
EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_ROW_GROUPS_FAILED = 0, 1, 2, 3
#: Under the run root, beside (not inside) the stage folders the plan and progress list.
JOBS_DIR = "_jobs"


def summary_uri(run_root: str, stage: str, partition: int, submission_id: str) -> str:
    """Where the job with ``submission_id`` leaves its partition summary."""
    return f"{run_root.rstrip('/')}/{JOBS_DIR}/{stage}/p{partition:05d}/{submission_id}.json"


def encode_config(config: dict[str, Any]) -> str:
    """A config dict as one shell-safe argument."""
    return base64.urlsafe_b64encode(json.dumps(config, sort_keys=True).encode()).decode()


def entrypoint(*, stage: str, partition: int, config: dict[str, Any], summary: str, owner: str | None,
               python: str = "python") -> str:
    """The job's shell command."""
    cmd = (f"{python} -m winnow.ray.job --stage {stage} --partition {int(partition)} "
           f"--config {encode_config(config)} --summary {summary}")
    if owner:
        cmd += f" --owner {base64.urlsafe_b64encode(owner.encode()).decode()}"
    return cmd


def read_summary(uri: str) -> dict[str, Any] | None:
    """The summary a job left at ``uri`` (``None``: it never got that far)."""
    from winnow.rowgroups.store import read_json, resolve_filesystem

    fs, path = resolve_filesystem(uri)
    return read_json(fs, path)


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m winnow.ray.job", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True)
    ap.add_argument("--partition", type=int, required=True)
    ap.add_argument("--config", required=True, help="CurationConfig as base64 JSON")
    ap.add_argument("--summary", required=True, help="URI the partition summary JSON is written to")
    ap.add_argument("--owner", help="the run root's lease owner, base64")
    args = ap.parse_args(argv)

    from winnow import pipeline
    from winnow.ray.cluster import connect
    from winnow.rowgroups import WinnowError
    from winnow.rowgroups.errors import StageConfigMismatch
    from winnow.rowgroups.store import resolve_filesystem, write_json

    owner = base64.urlsafe_b64decode(args.owner).decode() if args.owner else None
    try:
        cfg = pipeline.CurationConfig.from_params(json.loads(base64.urlsafe_b64decode(args.config)))
        _log(f"stage {args.stage}, partition {args.partition} of run {cfg.run_root}")
        connect("auto")  # the cluster this job runs on (Ray sets RAY_ADDRESS for the driver)
        # Named, not left to the default: a Ray shared with other jobs gets a model actor per partition.
        summary = pipeline.run_partition(cfg, args.stage, args.partition, ray_address="auto", backend="ray",
                                         owner=owner, log=_log)
    except (pipeline.ConfigError, StageConfigMismatch) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except WinnowError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    result = summary.to_dict()
    # Every failed row group with its error (the XCom summary keeps only the first ones).
    result["errors"] = {str(rg): msg[:2000] for rg, msg in sorted(summary.failed.items())}
    fs, path = resolve_filesystem(args.summary)
    write_json(fs, path, result)
    print(SUMMARY_MARKER + json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    return EXIT_ROW_GROUPS_FAILED if summary.failed else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
