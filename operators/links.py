"""Extra links from curation task instances to the plugin's run view (plugins/winnow_plugin.py).

The link is the Airflow UI page with the view as a tab, so the user stays inside Airflow:
``/dags/<dag>/runs/<run>/plugin/winnow-run`` (DAG run tab) or, for a mapped partition task,
``.../tasks/<task>/mapped/<map index>/plugin/winnow-partition`` (its task-instance tab, with that
partition's row groups highlighted). Relative unless ``[api] base_url`` is set.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: The curation DAG's id: the DAG file, the plugin and the demo take it from here.
DAG_ID = "image_curation"
#: The ``url_route`` values of the plugin's external views.
RUN_VIEW_ROUTE = "winnow-run"
PARTITION_VIEW_ROUTE = "winnow-partition"


def _base_url() -> str:
    base = os.environ.get("AIRFLOW__API__BASE_URL", "")
    if "://" in base:
        return base.rstrip("/")
    return ""


def view_url(dag_id: str, run_id: str, task_id: str | None = None, map_index: int = -1) -> str:
    """The Airflow UI address of the curation view of a run (or of one mapped task instance).

    >>> view_url("image_curation", "manual__2025-01-01T00:00:00+00:00")
    '/dags/image_curation/runs/manual__2025-01-01T00%3A00%3A00%2B00%3A00/plugin/winnow-run'
    >>> view_url("image_curation", "r1", "partition.embed", 3)
    '/dags/image_curation/runs/r1/tasks/partition.embed/mapped/3/plugin/winnow-partition'
    """
    run = f"{_base_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    if task_id is not None and map_index >= 0:
        return f"{run}/tasks/{quote(task_id, safe='')}/mapped/{map_index}/plugin/{PARTITION_VIEW_ROUTE}"
    return f"{run}/plugin/{RUN_VIEW_ROUTE}"


class CurationViewLink(BaseOperatorLink):
    """"Curation view": the row-group map, gallery and score histograms of this task's run."""

    name = "Curation view"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        map_index = getattr(ti_key, "map_index", -1)
        if map_index is None:
            map_index = -1
        return view_url(ti_key.dag_id, ti_key.run_id, ti_key.task_id, int(map_index))
