"""Airflow plugin: the curation run view (row-group map, gallery, score histograms) inside Airflow.

An ``external_views`` tab on every DAG run (and on mapped task instances) opens
``/winnow/ui/run?dag_id=..&run_id=..``: plain HTML + JS from ``winnow_static/`` under a strict
Content-Security-Policy. Its data comes from ``/winnow/api/runs/{run_id}/...``, read from the
run's storage by ``winnow.report`` (for a run with a corpus, ``/corpus``: the corpus it builds;
``/card``: the run's dataset card).
The run root comes from the DAG run itself: the index task's XCom ``summary`` (``run_root``),
else the run's conf. Every endpoint needs read access to the
image_curation DAG (401 without a session, 403 without access).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.middleware.gzip import GZipMiddleware

from winnow.registry import STAGES
from winnow.runkey import default_run_key, run_key_of, run_key_problem
from winnow_airflow.links import DAG_ID, PARTITION_VIEW_ROUTE, RUN_VIEW_ROUTE
from winnow_airflow.storage import CachedRunStorage

if TYPE_CHECKING:
    from winnow.rowgroups.fs import RunRoot, StorageOptions

STATIC = Path(__file__).with_name("winnow_static")
#: The only files /static serves (and their types): nothing else in the folder is reachable.
ASSETS = {"winnow.js": "text/javascript", "winnow.css": "text/css"}
MAX_RUN_ID = 250
#: A run's storage connection is looked up once per this many seconds, not on every poll (the
#: run view polls every 3 s); an edited connection is seen within it.
CONN_CACHE_S = 30.0
#: Task id -> stage, for the "running" colour on the map (from the engine's stage registry).
TASK_STAGES = {spec.task_id: spec.name for spec in STAGES}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")

app = FastAPI(title="winnow", description="Row-group map, gallery and score histograms of image curation runs.")
app.add_middleware(GZipMiddleware, minimum_size=1024)


@app.middleware("http")
async def security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _authorized():
    # Imported lazily: the security module needs a configured api-server.
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", param_dag_id=DAG_ID)


READ_ACCESS = Depends(_authorized())


# ---- the DAG run -> its run root ---------------------------------------------------------------

def _dag_run(run_id: str) -> dict[str, Any]:
    """The run's state, conf and what its tasks are doing, from Airflow's metadata DB."""
    if not run_id or len(run_id) > MAX_RUN_ID:
        raise HTTPException(status_code=400, detail="run_id must be 1 to 250 characters")
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        dr = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        if dr is None:
            raise HTTPException(status_code=404, detail=f"{DAG_ID} has no run {run_id!r}")
        xcom = session.scalar(select(XComModel.value).where(
            XComModel.dag_id == DAG_ID, XComModel.run_id == run_id, XComModel.task_id == "index",
            XComModel.key == "summary", XComModel.map_index == -1))
        tis = session.execute(select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
            TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)).all()
        tasks: dict[str, dict[int, str]] = {}
        for task_id, map_index, ti_state in tis:
            stage = TASK_STAGES.get(task_id)
            if stage and ti_state:
                tasks.setdefault(stage, {})[int(map_index)] = str(getattr(ti_state, "value", ti_state))
        return {
            "run_id": dr.run_id,
            "state": str(getattr(dr.state, "value", dr.state)),
            "conf": dict(dr.conf or {}),
            "logical_date": dr.logical_date,
            "start_date": dr.start_date.isoformat() if dr.start_date else None,
            "end_date": dr.end_date.isoformat() if dr.end_date else None,
            "index_summary": XComModel.deserialize_value(_Row(xcom)) if xcom is not None else None,
            "tasks": tasks,
        }


class _Row:
    """What XComModel.deserialize_value expects: an object with ``.value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


def run_root_of(run: dict[str, Any]) -> str | None:
    """The index task's ``run_root`` when it ran; else ``<output_root>/<run_key>`` from the conf.

    None while neither says where the run writes (the index task has not run and the conf
    leaves the output root to the DAG's default).
    """
    summary = run["index_summary"]
    if isinstance(summary, str):
        try:
            summary = json.loads(summary)
        except ValueError:
            summary = None
    if isinstance(summary, dict) and isinstance(summary.get("run_root"), str):
        return _checked(summary["run_root"])
    conf = run["conf"]
    output_root = conf.get("output_root")
    if not isinstance(output_root, str) or not output_root:
        return None
    run_key = conf.get("run_key") or default_run_key(run["logical_date"], run["run_id"])
    return _checked(f"{output_root.rstrip('/')}/{run_key}")


def _checked(run_root: str) -> str:
    """A run root whose last part is a valid run key (winnow.runkey: what CurationConfig allows)."""
    if run_key_problem(run_key_of(run_root)):
        raise HTTPException(status_code=400, detail=f"run root {run_root!r} does not end in a valid run key")
    return run_root


def _resolved(run_id: str) -> tuple[dict[str, Any], RunRoot]:
    """The run and where it stores (its run root with the settings that reach it), for this
    request only: the api-server serves many runs at once."""
    from winnow.rowgroups.fs import RunRoot

    run = _dag_run(run_id)
    storage = run_storage(run)
    root = run_root_of(run)
    if root is None:
        raise HTTPException(status_code=404, detail=f"run {run_id!r} has no run root yet: its index task has not "
                                                     "reported one and its conf names no output_root")
    return run, RunRoot(root, storage)


def _api_server_connection(conn_id: str) -> Any:
    """A connection as the api-server reads it (its metadata DB and secrets backends); a name
    that is no connection answers 404."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        return Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException as exc:
        raise HTTPException(status_code=404, detail=f"the run's storage_conn_id {conn_id!r} is no Airflow connection") from exc


#: The operators' lookup (:func:`winnow_airflow.storage.run_storage`), each connection read at
#: most once per CONN_CACHE_S.
_RUN_STORAGE = CachedRunStorage(CONN_CACHE_S, get_connection=_api_server_connection)


def run_storage(run: dict[str, Any]) -> StorageOptions:
    """How the run reaches its object store: the settings of its ``storage_conn_id`` (the same
    lookup as its tasks'), else the api-server's own AWS_* environment."""
    conn_id = run["conf"].get("storage_conn_id")
    return _RUN_STORAGE(str(conn_id) if conn_id else None)


def _plan(run_root: RunRoot):
    from winnow.data.index import load_index
    from winnow.exceptions import WinnowError

    try:
        return load_index(run_root).plan
    except WinnowError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


# ---- pages and assets --------------------------------------------------------------------------

@app.get("/ui/run", dependencies=[READ_ACCESS], include_in_schema=False)
def run_page() -> FileResponse:
    """The run view; it reads dag_id, run_id and map_index from its own address."""
    return FileResponse(STATIC / "run.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@app.get("/static/{name}", dependencies=[READ_ACCESS], include_in_schema=False)
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail="no such asset")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


# ---- data ------------------------------------------------------------------------------------

@app.get("/api/filters", dependencies=[READ_ACCESS])
def filter_list() -> dict[str, Any]:
    """The filters as declared (:func:`winnow.filters.describe`), every outcome with its words
    and summary count, in the order they are decided: the view builds its menus, histograms,
    sliders and summary rows from this and names no filter itself."""
    from winnow.filters import ALL_COUNT_NAMES, describe, outcome_labels

    return {"filters": describe(),
            "outcomes": [{"name": o, "label": label, "count": ALL_COUNT_NAMES[o]} for o, label in outcome_labels().items()]}


@app.get("/api/runs/{run_id}/progress", dependencies=[READ_ACCESS])
def progress(run_id: str, request: Request) -> Response:
    """Stage x row-group map (run-length encoded), counts, records/s, errors, summary; each
    stage's status (done, running, failed, pending, not run) from storage and its task states.

    Answers 304 when nothing changed since the ``ETag`` the client sent."""
    run, root = _resolved(run_id)
    from winnow.exceptions import WinnowError
    from winnow.report.progress import row_group_map, with_task_states

    base = {"dag_run": {k: run[k] for k in ("run_id", "state", "start_date", "end_date")}, "tasks": run["tasks"]}
    try:
        body = {**row_group_map(root), **base}
        with_task_states(body["stages"], run["tasks"], run["state"])
    except WinnowError as exc:
        body = {**base, "run_root": root.uri, "waiting": f"waiting for the index: {exc}", "stages": [],
                "row_groups": 0, "partitions": 0, "records": 0, "summary": None}
        if run["state"] in ("success", "failed"):
            raise HTTPException(status_code=404, detail=str(exc)) from exc
    data = json.dumps(body, default=str, separators=(",", ":")).encode()
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(content=data, media_type="application/json", headers=headers)


@app.get("/api/runs/{run_id}/gallery", dependencies=[READ_ACCESS])
def gallery(run_id: str, outcome: str | None = Query(None, max_length=20), cursor: int = Query(0, ge=0),
            limit: int = Query(24, ge=1, le=200)) -> dict[str, Any]:
    """A page of the gallery sample (kept and dropped records, scores, reason)."""
    from winnow.exceptions import GalleryError
    from winnow.report.gallery import gallery_page

    _, root = _resolved(run_id)
    try:
        return gallery_page(root, _plan(root), outcome=outcome or None, cursor=cursor, limit=limit)
    except GalleryError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc


@app.get("/api/runs/{run_id}/thumbs/{row_group}/{offset}/{size}", dependencies=[READ_ACCESS])
def thumbnail(run_id: str, row_group: int, offset: int, size: int) -> Response:
    """JPEG bytes by offset from a committed row group's thumbnails file (never decoded here)."""
    from winnow.exceptions import GalleryError
    from winnow.report.gallery import read_thumbnail

    _, root = _resolved(run_id)
    try:
        data = read_thumbnail(root, _plan(root), row_group, offset, size)
    except GalleryError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    # Committed files never change in place: the bytes at this address are stable.
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@app.get("/api/runs/{run_id}/corpus", dependencies=[READ_ACCESS])
def corpus(run_id: str) -> dict[str, Any]:
    """The corpus the run builds (:func:`winnow.report.corpus_view.corpus_view`): its published
    runs in generation order (this run marked), its records and takedowns, and whether (and as
    which generation) this run has published. 404 for a run without a corpus."""
    from winnow.corpus import CorpusError
    from winnow.report.corpus_view import run_corpus

    run, root = _resolved(run_id)
    try:
        body = run_corpus(root, run["conf"])
    except CorpusError as exc:
        raise HTTPException(status_code=502, detail=f"the run's corpus cannot be read: {exc}") from exc
    if body is None:
        raise HTTPException(status_code=404, detail=f"run {run_id!r} has no corpus: neither its run root nor its conf "
                                                     "names a corpus_uri (it curates its input on its own)")
    return body


@app.get("/api/runs/{run_id}/card", dependencies=[READ_ACCESS])
def dataset_card(run_id: str) -> dict[str, Any]:
    """The run's dataset card (:func:`winnow.card.read_card`): ``{"card": card.json,
    "markdown": CARD.md, "stored"}``, as the report step wrote them beside ``_summary.json`` (for a
    run reported before cards existed: built now from its storage, nothing written). 404 until the
    run's report has run."""
    from winnow.card import read_card
    from winnow.exceptions import WinnowError

    _, root = _resolved(run_id)
    try:
        body = read_card(root)
    except WinnowError as exc:
        raise HTTPException(status_code=502, detail=f"the run's card cannot be built: {exc}") from exc
    if body is None:
        raise HTTPException(status_code=404, detail=f"run {run_id!r} has no card yet: its report task writes it "
                                                     "(card.json, CARD.md) once the run's stages are done")
    return body


_SCORES: dict[str, tuple[float, tuple, dict]] = {}
_SCORES_LOCK = threading.Lock()
SCORES_TTL_S = 15.0


@app.get("/api/runs/{run_id}/scores", dependencies=[READ_ACCESS])
def scores(run_id: str) -> dict[str, Any]:
    """Histograms of committed scores and what other thresholds would keep
    (:func:`winnow.report.scores.score_histograms`): one histogram per filter with the threshold
    the run used (and whether the filter is on), the what-if cells (every combination of
    thresholds), the kept count, and for each filter with a keep fraction the threshold each
    fraction 0.01..1.00 picks and how many records it keeps."""
    from winnow.report.scores import score_histograms

    run, root = _resolved(run_id)
    plan = _plan(root)
    finished = run["state"] in ("success", "failed")
    with _SCORES_LOCK:
        hit = _SCORES.get(root.uri)
    # A finished run's scores do not change; a running one's are reread at most every TTL.
    if hit and (hit[1] == (finished, plan.to_dict()) and (finished or time.monotonic() - hit[0] < SCORES_TTL_S)):
        return hit[2]
    result = score_histograms(root, plan)
    with _SCORES_LOCK:
        _SCORES[root.uri] = (time.monotonic(), (finished, plan.to_dict()), result)
        while len(_SCORES) > 16:
            _SCORES.pop(next(iter(_SCORES)))
    return result


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


VIEW_HREF = "/winnow/ui/run?dag_id={DAG_ID}&run_id={RUN_ID}"


class WinnowPlugin(AirflowPlugin):
    name = "winnow"
    fastapi_apps = [{"app": app, "url_prefix": "/winnow", "name": "winnow curation views"}]
    external_views = [
        {"name": "Curation", "href": VIEW_HREF, "destination": "dag_run", "url_route": RUN_VIEW_ROUTE},
        {"name": "Curation", "href": VIEW_HREF + "&task_id={TASK_ID}&map_index={MAP_INDEX}",
         "destination": "task_instance", "url_route": PARTITION_VIEW_ROUTE},
    ]
