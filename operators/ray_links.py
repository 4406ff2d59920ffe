"""Extra link on a job-mode task instance: its Ray Job's page in the Ray dashboard.

The operator pushes the URL to XCom when it submits or reattaches (Airflow 3 serialises a link
as its name and XCom key, so the UI reads that XCom per mapped instance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


class RayJobLink(BaseOperatorLink):
    """"Ray job": the dashboard page of the Ray Job this task instance runs (job mode only)."""

    name = "Ray job"

    @classmethod
    def persist(cls, context: Any, url: str) -> None:
        context["ti"].xcom_push(key=cls().xcom_key, value=url)

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""
