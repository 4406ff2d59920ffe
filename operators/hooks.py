"""The Ray hook: turns an Airflow connection of type ``ray`` into what the engine needs, and talks
to a cluster's Ray Jobs API (job mode) with the connection's token.

It owns the connection and its HTTP calls, nothing else; attaching a driver is
``winnow.ray.cluster.connect``'s job, waiting for a job is the trigger's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from winnow_airflow.exceptions import RayAuthError, RayJobsApiError

if TYPE_CHECKING:
    import aiohttp

#: Ways a task can use a cluster: attach as a driver, or submit a Ray Job and defer.
RAY_MODES = ("driver", "job")
#: Ray job states (``ray.job_submission.JobStatus``): the ones still running, and the ended ones.
ACTIVE_STATES = ("PENDING", "RUNNING")
ENDED_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
#: Seconds for one call to the Jobs API: connect + answer (the log call reads the whole log).
HTTP_TIMEOUT_S = 30.0
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265


@dataclass(frozen=True)
class RayConnection:
    """A resolved ``ray`` connection. ``token`` never appears in ``repr`` or a log line."""

    conn_id: str
    mode: str
    address: str | None = None
    dashboard_url: str | None = None
    token: str | None = field(default=None, repr=False)
    runtime_env: dict[str, Any] | None = None
    entrypoint_python: str = "python"
    poll_interval: float = 5.0
    #: CPUs / GPUs of one model worker on this cluster (``None``: winnow's policy).
    worker_cpus: float | None = None
    worker_gpus: float | None = None
    #: Job mode: a run of at most this many records runs in one Ray Job (0: a job per step).
    one_job_max_records: int = 0


class RayHook(BaseHook):
    """A Ray cluster from an Airflow connection of type ``ray``.

    No connection under ``ray_conn_id`` means an embedded local Ray (address ``None``), so a
    laptop or CI run needs no setup. Extra ``mode`` picks how a task uses a cluster:

    - ``"driver"`` (default): the task process attaches to the cluster by its **GCS address**
      (``host:port``, port 6379 when unset, or extra ``address``: ``"auto"``, ``"10.0.0.5:6379"``)
      and drives Ray Data itself; the Airflow worker must be inside the cluster network.
      ``ray://`` (Ray Client) is refused: Ray Data's streaming executor does not run over it.
    - ``"job"``: each partition task submits a Ray Job to the cluster's **dashboard**
      (``http://head:8265``: host with or without a scheme, port 8265 when unset, or extra
      ``address``) and defers to a trigger; the way to use a remote cluster.

    The connection's **password** is the cluster's Ray auth token (Ray's token authentication):
    sent as ``Authorization: Bearer`` to the Jobs API, and given to Ray as ``RAY_AUTH_TOKEN`` in
    driver mode. Extra ``runtime_env`` (a Ray runtime env dict: ``working_dir``, ``py_modules``,
    ``pip``, ``image_uri``, ``env_vars``) is given to every job; extra ``entrypoint_python``
    names the cluster's Python (default ``python``); extra ``poll_interval`` is the most seconds
    between job status polls (default 5). Extras ``worker_cpus`` and ``worker_gpus`` size one
    model worker (default: winnow's policy, never more than the largest node has). Extra
    ``one_job_max_records`` (default 4,000; 0: never): a run of at most that many records and no
    corpus runs in one Ray Job, the index's, whose later tasks complete from what it left.

    :param ray_conn_id: the Airflow connection id; ``ray_default`` unless given.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str | None = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id or self.default_conn_name
        self._resolved: RayConnection | None = None
        self._embedded = False  # the connection was looked up and is not there

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login"],
            "relabeling": {
                "host": "Ray head (driver: GCS host; job: dashboard URL)",
                "port": "Port (driver: GCS 6379; job: dashboard 8265)",
                "password": "Ray auth token",
            },
            "placeholders": {
                "host": "http://ray-head.ray.svc:8265",
                "extra": '{"mode": "job", "runtime_env": {"working_dir": "s3://bucket/winnow.zip"}}',
            },
        }

    # ---- the connection --------------------------------------------------------------------
    def resolve(self, conn: Any | None = None) -> RayConnection | None:
        """The connection as a :class:`RayConnection`; ``None``: no connection (embedded Ray).

        ``conn`` is an already fetched Airflow connection (the trigger fetches it async).
        """
        if self._resolved is not None:
            return self._resolved
        if conn is None:
            if self._embedded:
                return None
            try:
                conn = self.get_connection(self.ray_conn_id)
            except AirflowNotFoundException:
                self.log.info("no connection %r: using an embedded local Ray", self.ray_conn_id)
                # Asked once per hook (a try's): each lookup is a request to the API server.
                self._embedded = True
                return None
        self._resolved = _parse(self.ray_conn_id, conn)
        self._embedded = False
        return self._resolved

    async def aresolve(self) -> RayConnection:
        """:meth:`resolve` without blocking the event loop (the triggerer's way)."""
        if self._resolved is None:
            try:
                conn = await self.aget_connection(self.ray_conn_id)
            except AirflowNotFoundException as exc:
                raise RayJobsApiError(
                    f"connection {self.ray_conn_id!r} is gone: the trigger cannot reach the Ray job "
                    "without it; recreate the connection and clear the task (it reattaches to the job)"
                ) from exc
            self.resolve(conn)
        assert self._resolved is not None
        return self._resolved

    @property
    def mode(self) -> str:
        """``"driver"`` or ``"job"`` (embedded Ray is driver mode)."""
        resolved = self.resolve()
        return resolved.mode if resolved else "driver"

    def get_address(self) -> str | None:
        """The GCS address to give ``winnow.ray.cluster.connect`` (``None``: embedded)."""
        resolved = self.resolve()
        if resolved is None:
            return None
        if resolved.mode == "job":
            raise ValueError(
                f"connection {self.ray_conn_id!r} is in job mode: tasks submit Ray Jobs to "
                f"{resolved.dashboard_url} and have no driver address"
            )
        return resolved.address

    def get_conn(self) -> RayConnection | None:
        return self.resolve()

    def describe(self) -> str:
        """A log-safe description: never the token, the extras or userinfo in a URI."""
        from winnow.ray.cluster import redact

        resolved = self.resolve()
        if resolved is None:
            return "embedded local Ray"
        where = resolved.dashboard_url if resolved.mode == "job" else resolved.address
        auth = ", token auth" if resolved.token else ""
        return f"Ray at {redact(where or '')} ({resolved.mode} mode{auth}, connection {self.ray_conn_id!r})"

    # ---- the Ray Jobs API (job mode) -----------------------------------------------------
    def _jobs(self) -> RayConnection:
        resolved = self.resolve()
        if resolved is None or resolved.mode != "job":
            raise ValueError(f"connection {self.ray_conn_id!r} is not a job-mode ray connection")
        return resolved

    def _headers(self, resolved: RayConnection) -> dict[str, str]:
        return {"Authorization": f"Bearer {resolved.token}"} if resolved.token else {}

    def _check(self, what: str, status: int, text: str, *, ok: tuple[int, ...] = (200,)) -> None:
        if status in (401, 403):
            raise RayAuthError(
                f"connection {self.ray_conn_id!r}: the Ray cluster refused {what} with HTTP {status} "
                f"({'no token given' if status == 401 else 'wrong token'}); set the connection's "
                "password to the cluster's Ray auth token (`ray get-auth-token` on the head)"
            )
        if status not in ok:
            raise RayJobsApiError(
                f"connection {self.ray_conn_id!r}: {what} failed with HTTP {status}: {text[:500]}"
            )

    def _request(self, method: str, path: str, what: str, **kwargs: Any):
        """One call to the cluster's Jobs API (token header, timeout); transport errors name the
        connection. The caller reads the status (``_check``)."""
        import requests

        resolved = self._jobs()
        try:
            return requests.request(method, f"{resolved.dashboard_url}{path}", headers=self._headers(resolved),
                                    timeout=HTTP_TIMEOUT_S, **kwargs)
        except requests.RequestException as exc:
            raise RayJobsApiError(f"connection {self.ray_conn_id!r}: {what}: {exc}") from exc

    def get_job(self, submission_id: str) -> dict[str, Any] | None:
        """The job's details (``status``, ``message``, ``metadata``...), ``None`` if unknown."""
        what = f"GET job {submission_id}"
        r = self._request("GET", f"/api/jobs/{submission_id}", what)
        if r.status_code == 404:
            return None
        self._check(what, r.status_code, r.text)
        return r.json()

    def submit_job(self, submission_id: str, entrypoint: str, *, metadata: dict[str, str],
                   runtime_env: dict[str, Any] | None = None, entrypoint_num_cpus: float | None = None) -> None:
        """Submit a job under a chosen id; a job already there under that id is left as it is."""
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id, "metadata": metadata}
        if runtime_env:
            body["runtime_env"] = runtime_env
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        what = f"submit job {submission_id}"
        r = self._request("POST", "/api/jobs/", what, json=body)
        if r.status_code not in (200, 201) and self.get_job(submission_id) is not None:
            return  # a job already has this id (Ray answers 500 for that): ours, by construction
        self._check(what, r.status_code, r.text, ok=(200, 201))

    def stop_job(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; True if it was running."""
        what = f"stop job {submission_id}"
        r = self._request("POST", f"/api/jobs/{submission_id}/stop", what)
        if r.status_code == 404:
            return False
        self._check(what, r.status_code, r.text)
        return bool(r.json().get("stopped"))

    def job_url(self, submission_id: str) -> str:
        """The job's page in the Ray dashboard."""
        return f"{self._jobs().dashboard_url}/#/jobs/{submission_id}"

    # async twins for the triggerer: aiohttp, a timeout on every call
    async def aget_job(self, session: aiohttp.ClientSession, submission_id: str) -> dict[str, Any] | None:
        resolved = await self.aresolve()
        async with session.get(f"{resolved.dashboard_url}/api/jobs/{submission_id}",
                               headers=self._headers(resolved)) as r:
            if r.status == 404:
                return None
            text = await r.text()
            self._check(f"GET job {submission_id}", r.status, text)
            import json

            return json.loads(text)

    async def aget_job_logs(self, session: aiohttp.ClientSession, submission_id: str) -> str:
        resolved = await self.aresolve()
        async with session.get(f"{resolved.dashboard_url}/api/jobs/{submission_id}/logs",
                               headers=self._headers(resolved)) as r:
            text = await r.text()
            self._check(f"GET logs of job {submission_id}", r.status, text)
            import json

            return json.loads(text).get("logs") or ""

    async def astop_job(self, session: aiohttp.ClientSession, submission_id: str) -> None:
        resolved = await self.aresolve()
        async with session.post(f"{resolved.dashboard_url}/api/jobs/{submission_id}/stop",
                                headers=self._headers(resolved)) as r:
            if r.status != 404:
                self._check(f"stop job {submission_id}", r.status, await r.text())


def _parse(conn_id: str, conn: Any) -> RayConnection:
    extra = conn.extra_dejson or {}
    mode = str(extra.get("mode", "driver"))
    if mode not in RAY_MODES:
        raise ValueError(f"connection {conn_id!r}: extra mode={mode!r} is not one of {RAY_MODES}")
    runtime_env = extra.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise ValueError(f"connection {conn_id!r}: extra runtime_env must be a JSON object (a Ray runtime env)")
    token = conn.password or None
    knobs = {name: _positive(conn_id, extra, name) for name in ("worker_cpus", "worker_gpus")}
    where = str(extra.get("address") or conn.host or "").strip()
    if mode == "job":
        if not where:
            raise ValueError(
                f"connection {conn_id!r} (job mode) has no host: set it to the Ray dashboard URL, "
                f"e.g. http://ray-head:{DEFAULT_DASHBOARD_PORT}"
            )
        if "://" not in where:
            where = f"http://{where}:{conn.port or DEFAULT_DASHBOARD_PORT}" if ":" not in where else f"http://{where}"
        if not where.startswith(("http://", "https://")):
            raise ValueError(
                f"connection {conn_id!r} (job mode): {where!r} is not the Ray dashboard's http(s) URL "
                f"(e.g. http://ray-head:{DEFAULT_DASHBOARD_PORT}); job mode talks to the Jobs API there"
            )
        return RayConnection(conn_id=conn_id, mode=mode, dashboard_url=where.rstrip("/"), token=token,
                             runtime_env=runtime_env,
                             entrypoint_python=str(extra.get("entrypoint_python") or "python"),
                             poll_interval=float(extra.get("poll_interval") or 5.0),
                             one_job_max_records=_records(conn_id, extra, "one_job_max_records"), **knobs)
    if not where:
        raise ValueError(
            f"connection {conn_id!r} has neither a host nor an extra 'address'; set the Ray head's "
            f"GCS host (port {DEFAULT_GCS_PORT}), or delete the connection to run on an embedded local Ray"
        )
    if where.startswith("ray://"):
        raise ValueError(
            f"connection {conn_id!r}: driver mode attaches by the cluster's GCS address (host:6379 or "
            f"'auto'), not by Ray Client ({where.split('@')[-1]!r}): Ray Data's streaming executor does "
            "not run over Ray Client. For a cluster outside this worker's network use job mode: extra "
            '{"mode": "job"} with the host set to the dashboard URL (http://head:8265)'
        )
    if "://" in where:
        raise ValueError(f"connection {conn_id!r}: driver mode wants a GCS address host:port or 'auto', got a URL")
    address = where if where == "auto" or ":" in where else f"{where}:{conn.port or DEFAULT_GCS_PORT}"
    return RayConnection(conn_id=conn_id, mode=mode, address=address, token=token, runtime_env=runtime_env, **knobs)


def _records(conn_id: str, extra: dict[str, Any], name: str) -> int:
    """A whole number of records >= 0 from the extras; absent: winnow's default."""
    from winnow.job import ONE_JOB_MAX_RECORDS

    value = extra.get(name)
    if value is None or value == "":
        return ONE_JOB_MAX_RECORDS
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"connection {conn_id!r}: extra {name}={value!r} must be a whole number of records "
                         "(0: every step its own Ray job)")
    return int(value)


def _positive(conn_id: str, extra: dict[str, Any], name: str) -> float | None:
    value = extra.get(name)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0 or (name == "worker_cpus" and number == 0):
        raise ValueError(f"connection {conn_id!r}: extra {name}={value!r} must be a positive number")
    return number
