"""Object-store settings from the Airflow connection a run names (``storage_conn_id``).

One value per run, handed to every process that touches the run root: the task process
(:func:`use_storage_connection`), the Ray workers it drives (the runner ships the options as a
task argument), a job-mode Ray Job (:func:`job_storage_env`: environment variables in the job's
runtime env), the triggerer's log checkpoints and the plugin's reads (:func:`storage_options`,
used in a :func:`winnow.rowgroups.fs.storage_scope`). The connection's secret key never leaves
the Airflow processes: a Ray Job gets short-lived credentials minted from it, or none at all
when the connection says the cluster uses its own identity.

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
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

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


def storage_options(conn_id: str | None):
    """The options of connection ``conn_id`` (``None`` when no connection is named)."""
    if not conn_id:
        return None
    return options_from_connection(conn_id, _get_connection(conn_id))


async def astorage_options(conn_id: str | None):
    """:func:`storage_options` without blocking the event loop (the triggerer's way)."""
    if not conn_id:
        return None
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException as exc:
        raise _missing(conn_id) from exc
    return options_from_connection(conn_id, conn)


def use_storage_connection(conn_id: str | None, log) -> None:
    """Object-store settings for this task's engine calls and its Ray workers: the Airflow
    connection ``conn_id``, or with none the AWS_* environment variables. The settings never
    enter the run's config, so no fingerprint, summary or XCom holds them."""
    from winnow.rowgroups.fs import use_storage

    options = storage_options(conn_id)
    use_storage(options)
    if options is not None:
        log.info("object storage: connection %r, endpoint %s", conn_id, options.endpoint)


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
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    duration = max(MIN_SESSION_S, int(extra.get("session_duration_s") or DEFAULT_SESSION_S))
    client = botocore.session.get_session().create_client(
        "sts", endpoint_url=extra.get("sts_endpoint_url") or options.endpoint_url,
        region_name=options.region or "us-east-1", aws_access_key_id=options.access_key_id,
        aws_secret_access_key=options.secret_access_key, aws_session_token=options.session_token,
    )
    # A session name Ray's dashboard may show; no secret, just which job it was minted for.
    name = "winnow-" + hashlib.sha256(session_name.encode()).hexdigest()[:24]
    try:
        if extra.get("role_arn"):
            answer = client.assume_role(RoleArn=str(extra["role_arn"]), RoleSessionName=name, DurationSeconds=duration)
        else:
            answer = client.get_session_token(DurationSeconds=duration)
    except (BotoCoreError, ClientError) as exc:
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
