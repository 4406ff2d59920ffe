"""Airflow plugin: row-group progress of curation runs, served by the api-server at /winnow.

``GET /winnow/runs/{run_key}/progress`` returns, per stage, how many row groups are committed
(read from storage, the source of truth) and the run's summary once it exists. It needs the
same permission as reading the image_curation DAG. Run roots are looked up under
``WINNOW_OUTPUT_ROOT`` (the DAG's default output root).
"""

from __future__ import annotations

import os
import re

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException

DAG_ID = "image_curation"
RUN_KEY = re.compile(r"^[A-Za-z0-9._-]+$")

app = FastAPI(title="winnow", description="Row-group progress of image curation runs.")


def _authorized():
    # Imported lazily: the security module needs a configured api-server.
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", param_dag_id=DAG_ID)


def output_root() -> str:
    return os.environ.get("WINNOW_OUTPUT_ROOT", "/data/curated")


@app.get("/runs/{run_key}/progress", dependencies=[Depends(_authorized())])
def progress(run_key: str) -> dict:
    """Committed row groups per stage for ``<WINNOW_OUTPUT_ROOT>/<run_key>``."""
    if not RUN_KEY.match(run_key) or run_key in (".", ".."):
        raise HTTPException(status_code=400, detail="run_key must be a single folder name")
    from winnow.pipeline import run_progress
    from winnow.rowgroups.errors import WinnowError

    run_root = f"{output_root().rstrip('/')}/{run_key}"
    try:
        return run_progress(run_root)
    except WinnowError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


class WinnowPlugin(AirflowPlugin):
    name = "winnow"
    fastapi_apps = [{"app": app, "url_prefix": "/winnow", "name": "winnow row-group progress"}]
