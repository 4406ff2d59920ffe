"""Stage x row-group map of a run: committed, failed (with its error) or pending, from listings.

One recursive listing per stage and no file reads except the failure records (a paginated
listing per stage on an object store). The map travels run-length
encoded (``"120c3f57."``): a running stage is a few long runs, whatever the row-group count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from winnow.rowgroups import CommitStore, RowGroupPlan
from winnow.rowgroups.failures import FAILED_SUFFIX, read_failure
from winnow.rowgroups.store import TEMP_MARK, read_json

COMMITTED, FAILED, PENDING = "c", "f", "."
_FILE = re.compile(r"^rg(\d{9})(\.parquet|" + re.escape(FAILED_SUFFIX) + r")$")
#: Failure texts sent per stage; the map still marks every failed row group.
MAX_ERRORS_PER_STAGE = 200


def run_length(states: bytearray | bytes) -> str:
    """``b"ccf.."`` -> ``"2c1f2."``.

    >>> run_length(b"ccf..")
    '2c1f2.'
    """
    out: list[str] = []
    i, n = 0, len(states)
    while i < n:
        j = i
        while j < n and states[j] == states[i]:
            j += 1
        out.append(f"{j - i}{chr(states[i])}")
        i = j
    return "".join(out)


@dataclass
class _StageScan:
    states: bytearray
    first: float | None = None
    last: float | None = None
    records: int = 0
    failed: list[tuple[int, int]] | None = None  # (partition, row group)


def _scan(store: CommitStore, stage: str, plan: RowGroupPlan) -> _StageScan:
    """One recursive listing of the stage folder (one paginated listing on an object store),
    not one per partition: on a run of 10^5 row groups the per-call overhead dominated."""
    g, parts = plan.num_row_groups, plan.num_partitions
    scan = _StageScan(states=bytearray(PENDING.encode()) * g, failed=[])
    failed: dict[int, int] = {}
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(store.stage_dir(stage), recursive=True,
                                                         allow_not_found=True))
    except FileNotFoundError:
        infos = []
    first = last = None
    committed = 0
    for info in infos:
        path = info.path
        slash = path.rfind("/")
        name = path[slash + 1:]
        if not name.startswith("rg") or TEMP_MARK in name:
            continue
        m = _FILE.match(name)
        if not m:
            continue
        folder = path[path.rfind("/", 0, slash) + 1:slash]
        if not (folder.startswith("p") and folder[1:].isdigit()):
            continue  # not <stage>/p<partition>/ (e.g. a moved-aside copy inside)
        rg, p = int(m.group(1)), int(folder[1:])
        # Only row groups in the partition the plan puts them in (p*G//P <= rg < (p+1)*G//P).
        if not (p < parts and p * g // parts <= rg < (p + 1) * g // parts):
            continue
        if m.group(2) == ".parquet":
            if scan.states[rg] != ord(COMMITTED):
                scan.states[rg] = ord(COMMITTED)
                committed += 1
            t = info.mtime_ns
            if t is not None:
                first = t if first is None or t < first else first
                last = t if last is None or t > last else last
        else:
            failed[rg] = p
    for rg, p in sorted(failed.items()):
        if scan.states[rg] != ord(COMMITTED):  # a later commit wins over an old failure
            scan.states[rg] = ord(FAILED)
            scan.failed.append((p, rg))
    # Every row group holds B records except the last one.
    scan.records = committed * plan.buffer_size
    if g and scan.states[g - 1] == ord(COMMITTED):
        scan.records -= g * plan.buffer_size - plan.num_records
    scan.first = first / 1e9 if first is not None else None
    scan.last = last / 1e9 if last is not None else None
    return scan


def row_group_map(run_root: str, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per stage: the run-length encoded map, counts, records/s and the failed row groups' errors.

    ``records_per_s`` is the stage's committed records over the span between its first and
    last commit (None until two commits exist): the stage's own pace, not the run's.
    """
    from winnow.data.index import load_index
    from winnow.pipeline import SUMMARY_FILE
    from winnow.stages.registry import stage_order

    store = CommitStore(run_root)
    plan = load_index(run_root).plan
    out_stages = []
    for name in stages or stage_order():
        scan = _scan(store, name, plan)
        committed = scan.states.count(ord(COMMITTED))
        errors = []
        for p, rg in scan.failed[:MAX_ERRORS_PER_STAGE]:
            rec = read_failure(store, name, p, rg) or {}
            errors.append({"row_group": rg, "partition": p, "error": rec.get("error", ""),
                           "failed_at": rec.get("failed_at")})
        span = (scan.last - scan.first) if scan.first is not None and scan.last is not None else 0.0
        out_stages.append({
            "stage": name,
            "committed": committed,
            "failed": len(scan.failed),
            "pending": plan.num_row_groups - committed - len(scan.failed),
            "records": scan.records,
            "records_per_s": round(scan.records / span, 2) if span > 0 and committed > 1 else None,
            "first_commit": scan.first,
            "last_commit": scan.last,
            "map": run_length(scan.states),
            "errors": errors,
        })
    summary = read_json(store.fs, store.path(SUMMARY_FILE))
    return {
        "run_root": run_root,
        "records": plan.num_records,
        "buffer_size": plan.buffer_size,
        "row_groups": plan.num_row_groups,
        "partitions": plan.num_partitions,
        "stages": out_stages,
        "summary": summary,
    }
