"""Object-store settings from the Airflow connection a run names (``storage_conn_id``).

One value per run (:class:`~winnow.rowgroups.fs.StorageOptions`, carried by the run's
``CurationConfig`` and its :class:`~winnow.rowgroups.fs.RunRoot`), found by one lookup,
:func:`run_storage`, in every Airflow process that touches the run root: a task's try, the
triggerer's log checkpoints (:func:`arun_storage`) and the plugin's reads (a
:class:`CachedRunStorage`). The Ray workers a task drives get it inside their work; a job-mode
Ray Job gets it as environment variables in its runtime env (:func:`job_storage_env`). The
connection's secret key never leaves the Airflow processes: a Ray Job gets short-lived
credentials minted from it, or none at all when the connection says the cluster uses its own
identity.

Connection (type ``aws``): login = access key id, password = secret access key; extras
``endpoint_url``, ``region_name``, ``aws_session_token`` and, for job mode, ``cluster_credentials``:

- ``"session"`` (default): mint short-lived credentials for each Ray Job with STS
  (``AssumeRole`` when the extra ``role_arn`` is set, else ``GetSessionToken``), valid for the
  extra ``session_duration_s`` (default 3600, at least 900). The Ray dashboard shows them in
  the job's runtime env until they expire; the connection's own secret is never sent.
- ``"cluster"``: send no credentials; the Ray cluster's own identity (its environment, an
  instance role) reaches the store. Only ``endpoint_url`` and ``region_name`` are sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from winnow.rowgroups.fs import StorageOptions

#: How a job-mode Ray Job gets its object-store credentials.
CLUSTER_CREDENTIALS = ("session", "cluster")
DEFAULT_SESSION_S = 3600
MIN_SESSION_S = 900


def _missing(conn_id: str) -> AirflowFailException:
    return AirflowFailException(
        f"storage_conn_id {conn_id!r}: no such Airflow connection. Create a connection of type "
        "'aws' (login: access key id, password: secret access key, extra endpoint_url and "
        "region_name), or leave storage_conn_id empty to use the AWS_* environment variables."
    )


def options_from_connection(conn_id: str, conn: Any):
    """The connection as :class:`~winnow.rowgroups.fs.StorageOptions` (secrets hidden from repr)."""
    from winnow.rowgroups.fs import StorageOptions

    extra = conn.extra_dejson or {}
    return StorageOptions(
        endpoint_url=extra.get("endpoint_url") or None,
        region=extra.get("region_name") or None,
        access_key_id=conn.login or extra.get("aws_access_key_id") or None,
        secret_access_key=conn.password or extra.get("aws_secret_access_key") or None,
        session_token=extra.get("aws_session_token") or None,
        source=f"the Airflow connection {conn_id!r} (storage_conn_id)",
    )


def _get_connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as exc:
        raise _missing(conn_id) from exc


def run_storage(conn_id: str | None, *, get_connection: Callable[[str], Any] | None = None) -> StorageOptions:
    """How a run reaches its object store: the settings of the Airflow connection ``conn_id``,
    or with none named this process's AWS_* environment
    (:meth:`~winnow.rowgroups.fs.StorageOptions.from_env`). A value for the caller to pass along
    (``CurationConfig(storage=...)``, a ``RunRoot``): nothing is installed anywhere.

    :param get_connection: fetches a connection by id (default: the task SDK's, for a task
        process); the api-server passes its own. It raises for an unknown connection.
    """
    from winnow.rowgroups.fs import StorageOptions

    if not conn_id:
        return StorageOptions.from_env()
    return options_from_connection(conn_id, (get_connection or _get_connection)(conn_id))


async def arun_storage(conn_id: str | None) -> StorageOptions:
    """:func:`run_storage` without blocking the event loop (the triggerer's way)."""
    if not conn_id:
        return run_storage(None)
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException as exc:
        raise _missing(conn_id) from exc
    return options_from_connection(conn_id, conn)


class CachedRunStorage:
    """:func:`run_storage` for a process that serves many runs and many requests (the
    api-server): each connection is looked up at most once per ``ttl_s`` seconds (an edited
    connection is seen within it), and each call still returns a value for its caller alone.

    :param ttl_s: how long one connection's settings are reused.
    :param get_connection: as for :func:`run_storage`.
    """

    def __init__(self, ttl_s: float, *, get_connection: Callable[[str], Any] | None = None) -> None:
        self.ttl_s = ttl_s
        self.get_connection = get_connection
        self._seen: dict[str, tuple[float, StorageOptions]] = {}
        self._lock = threading.Lock()

    def __call__(self, conn_id: str | None) -> StorageOptions:
        if not conn_id:
            return run_storage(None)
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(conn_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        options = run_storage(conn_id, get_connection=self.get_connection)
        with self._lock:
            self._seen[conn_id] = (now, options)
        return options

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


def job_storage_env(conn_id: str | None, *, session_name: str, log) -> dict[str, str]:
    """Environment variables that give a Ray Job the run's storage settings (see the module
    docstring); empty when the run names no connection (the cluster's own environment then)."""
    from winnow.rowgroups.fs import ENV_VARS, SOURCE_ENV

    if not conn_id:
        return {}
    conn = _get_connection(conn_id)
    options = options_from_connection(conn_id, conn)
    extra = conn.extra_dejson or {}
    how = str(extra.get("cluster_credentials") or "session")
    if how not in CLUSTER_CREDENTIALS:
        raise AirflowFailException(
            f"storage_conn_id {conn_id!r}: extra cluster_credentials={how!r} is not one of {CLUSTER_CREDENTIALS} "
            "('session': short-lived credentials minted from this connection for each Ray Job; 'cluster': "
            "the Ray cluster's own identity)"
        )
    env = {ENV_VARS["endpoint_url"]: options.endpoint_url, ENV_VARS["region"]: options.region}
    if how == "cluster":
        env[SOURCE_ENV] = f"the Ray cluster's own AWS identity (storage_conn_id {conn_id!r} has cluster_credentials=cluster)"
        log.info("object storage for the Ray job: the cluster's own identity (connection %r)", conn_id)
    else:
        creds = _mint(conn_id, options, extra, session_name)
        env.update({ENV_VARS["access_key_id"]: creds["AccessKeyId"],
                    ENV_VARS["secret_access_key"]: creds["SecretAccessKey"],
                    ENV_VARS["session_token"]: creds.get("SessionToken")})
        env[SOURCE_ENV] = (f"short-lived credentials minted from the Airflow connection {conn_id!r} "
                           "(storage_conn_id)")
        log.info("object storage for the Ray job: short-lived credentials from connection %r, expiring %s",
                 conn_id, creds.get("Expiration"))
    return {k: str(v) for k, v in env.items() if v}


def _mint(conn_id: str, options, extra: dict[str, Any], session_name: str) -> dict[str, Any]:
    """Short-lived credentials from STS, or the connection's own when they already are (it holds a
    session token: STS refuses GetSessionToken for temporary credentials)."""
    if not (options.access_key_id and options.secret_access_key):
        raise AirflowFailException(
            f"storage_conn_id {conn_id!r} has no access key id and secret access key to mint short-lived "
            "credentials from: set the connection's login and password, or set its extra "
            "cluster_credentials to 'cluster' so the Ray cluster uses its own identity"
        )
    if options.session_token and not extra.get("role_arn"):
        return {"AccessKeyId": options.access_key_id, "SecretAccessKey": options.secret_access_key,
                "SessionToken": options.session_token, "Expiration": "as the connection's session token"}
    import botocore.config
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    duration = max(MIN_SESSION_S, int(extra.get("session_duration_s") or DEFAULT_SESSION_S))
    client = botocore.session.get_session().create_client(
        "sts", endpoint_url=extra.get("sts_endpoint_url") or options.endpoint_url,
        region_name=options.region or "us-east-1", aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key, aws_session_token=options.session_token,
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}),  # retry.call retries
    )
    # A session name Ray's dashboard may show; no secret, just which job it was minted for.
    name = "winnow-" + hashlib.sha256(session_name.encode()).hexdigest()[:24]
    from winnow.rowgroups import retry

    def mint() -> dict[str, Any]:
        if extra.get("role_arn"):
            return client.assume_role(RoleArn=str(extra["role_arn"]), RoleSessionName=name, DurationSeconds=duration)
        return client.get_session_token(DurationSeconds=duration)

    try:  # STS throttles and drops connections too: the same retries as every storage request
        answer = retry.call(mint, what=f"minting credentials from connection {conn_id!r}",
                            target=f"sts:{extra.get('sts_endpoint_url') or options.endpoint_url or 'aws'}")
    except (BotoCoreError, ClientError, OSError) as exc:
        text = str(exc)
        for secret in options.secrets():
            text = text.replace(secret, "***")
        raise AirflowFailException(
            f"storage_conn_id {conn_id!r}: could not mint short-lived credentials for the Ray job at "
            f"{extra.get('sts_endpoint_url') or options.endpoint} ({text}). Give the connection an STS "
            "endpoint (extra sts_endpoint_url) or a role (extra role_arn), or set its extra "
            "cluster_credentials to 'cluster' so the Ray cluster uses its own identity"
        ) from exc
    return answer["Credentials"]
