"""Helpers shared by the S3 run tests: sample shards uploaded to S3, the engine's run without
Airflow, and a run root's files read back from local disk or S3 for comparison."""

from __future__ import annotations

import inspect
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests._tiny import TINY_MODEL
from winnow.pipeline import CurationConfig, run_all
from winnow.registry import stage_order
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions

#: Run settings for every S3 run test: tiny model, 6 row groups in 3 partitions.
SMALL = dict(buffer_size=4, max_partitions=3, **TINY_MODEL, aesthetic_threshold=0.0)
#: The write stage's folder (the last stage of the run).
WRITE_STAGE = stage_order()[-1]
#: What a summary says about where it ran or how long it took, not what it found.
NOT_COUNTS = {"run_root", "write_dir", "config", "seconds", "row_groups_computed", "storage_retries", "storage_throttled",
              "row_groups_skipped", "row_groups_by_stage"}


def env_root(uri: str) -> RunRoot:
    """``uri`` reached with this process's AWS_* environment (the module's S3 server)."""
    return RunRoot(uri, StorageOptions.from_env())


def upload_folder(local_dir: str, uri: str) -> None:
    """Copy every file under ``local_dir`` to the prefix ``uri`` (``s3://bucket/prefix``)."""
    fs, root = env_root(uri).filesystem()
    for folder, _, names in os.walk(local_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), local_dir)
            with open(os.path.join(folder, name), "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                dst.write(src.read())


def run_local(cfg: CurationConfig, **kwargs):
    """``run_all`` in this process without Ray (the engine's ``local`` backend)."""
    params = inspect.signature(run_all).parameters
    backend = {"backend": "local"} if "backend" in params else {"executor": "local"}
    return run_all(cfg, **backend, **kwargs)


def output_files(run_root: str, stage: str) -> dict[str, bytes]:
    """{path relative to the run root: bytes} of every file of one stage's folder."""
    store = CommitStore(env_root(run_root))
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(stage), recursive=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with store.fs.open_input_stream(info.path) as f:
                out[info.path[len(store.root) + 1:]] = f.read()
    return out


def parquet_rows(data: bytes, drop: tuple[str, ...] = ()) -> list[dict]:
    import io

    table = pq.read_table(io.BytesIO(data))
    return table.drop_columns([c for c in drop if c in table.column_names]).to_pylist()


def counts_of(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in NOT_COUNTS}
