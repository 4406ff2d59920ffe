"""A corpus on a real S3 endpoint: two dates whose inputs, run roots and corpus are all on the S3
server, against the same two dates on local disk: the same corpus (runs, manifest), the same
status outcomes, the same curated tar bytes; a takedown there removes the record from the S3
tars. (What the corpus steps cost in requests: ``benchmarks/corpus_dedup.py --s3``.)"""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pytest

from tests._corpus_data import RUN_PARAMS, make_dates
from tests._tiny import tiny_config
from tests.storage._runs import output_files, run_local, upload_folder
from tests.storage.conftest import BUCKET
from winnow.rowgroups import StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATES = ("2025-03-01", "2025-03-02")
PREFIX = f"s3://{BUCKET}/corpus-test"


def _cfg(input_uri: str, out: str, corpus: str, date: str, storage: StorageOptions | None):
    return tiny_config(input_uri=input_uri, output_root=out, run_key=date.replace("-", ""), buffer_size=8,
                       max_partitions=2, corpus_uri=corpus, storage=storage, **RUN_PARAMS)


def _state(corpus: str, storage: StorageOptions | None) -> dict:
    from winnow.corpus import iter_records, open_corpus

    head = open_corpus(corpus, storage).head()
    rows = [r for t in iter_records(corpus, storage=storage) for r in t.drop_columns(["run_root"]).to_pylist()]
    return {"runs": [{k: r[k] for k in ("run_key", "logical_date", "generation", "records", "counts")} for r in head.runs],
            "records": sorted(rows, key=lambda r: (r["run_key"], r["key"]))}


def _status(run_root: str, storage: StorageOptions | None) -> dict[str, str]:
    from winnow.rowgroups import RunRoot
    from winnow.stages.status import iter_status

    t = pa.concat_tables(list(iter_status(RunRoot(run_root, storage))))
    return dict(zip(t.column("key").to_pylist(), t.column("outcome").to_pylist()))


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3corpus")
    data = make_dates(root / "dates", dates=DATES)
    storage = StorageOptions.from_env()
    local = {"out": str(root / "out"), "corpus": str(root / "corpus")}
    remote = {"out": f"{PREFIX}/out", "corpus": f"{PREFIX}/corpus"}
    for date in DATES:
        upload_folder(data["dates"][date]["input_uri"], f"{PREFIX}/shards/{date}")
        run_local(_cfg(data["dates"][date]["input_uri"], local["out"], local["corpus"], date, None), logical_date=date)
    summaries = {}
    for date in DATES:
        summaries[date] = run_local(_cfg(f"{PREFIX}/shards/{date}/", remote["out"], remote["corpus"], date, storage),
                                    logical_date=date)
    return {"data": data, "local": local, "remote": remote, "storage": storage, "summaries": summaries}


def test_a_corpus_on_s3_equals_the_same_dates_on_local_disk(runs):
    local, remote, storage = runs["local"], runs["remote"], runs["storage"]
    got, want = _state(remote["corpus"], storage), _state(local["corpus"], None)
    assert got == want and len(got["runs"]) == 2 and got["records"]
    second = DATES[1].replace("-", "")
    assert _status(f"{remote['out']}/{second}", storage) == _status(f"{local['out']}/{second}", None)
    assert runs["summaries"][DATES[1]]["corpus_duplicates"] > 0
    for date in DATES:
        key = date.replace("-", "")
        s3_tars = {k: v for k, v in output_files(f"{remote['out']}/{key}", "write").items() if k.endswith(".tar")}
        local_tars = {k: v for k, v in output_files(f"{local['out']}/{key}", "write").items() if k.endswith(".tar")}
        assert s3_tars == local_tars and s3_tars


def test_a_takedown_on_s3_removes_the_record_from_the_s3_tars(runs, tmp_path):
    from tests.storage._runs import env_root
    from winnow.corpus import iter_records, takedown

    remote, storage = runs["remote"], runs["storage"]
    first = DATES[0].replace("-", "")
    victim = next(r for t in iter_records(remote["corpus"], storage=storage) for r in t.to_pylist()
                  if r["run_key"] == first)
    listing = f"{PREFIX}/lists/takedown.txt"
    fs, path = env_root(listing).filesystem()
    with fs.open_output_stream(path) as f:
        f.write(f"{victim['key']}\n".encode())
    summary = takedown(remote["corpus"], listing, reason="opt-out", storage=storage)
    assert summary["removed"] == 1
    names = set()
    for name, data in output_files(f"{remote['out']}/{first}", "write").items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names |= set(tar.getnames())
    assert names and not set(victim["members"]) & names
    assert victim["uid"] not in {r["uid"] for t in iter_records(remote["corpus"], storage=storage) for r in t.to_pylist()}
