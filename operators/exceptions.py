"""Every error the operators, hook and trigger raise to Airflow: ``AirflowException`` subclasses
whose message names the failing thing (stage, partition or bucket, connection, Ray job).

Naming rule, shared with ``winnow/exceptions.py``: one idea has one name in both layers. An
idea the engine also has keeps the engine's name here (``RowGroupsFailedError``,
``BucketsFailedError``, ``RayAuthError``) and is raised ``from`` the engine's error, with its
message; ideas only the Airflow side has (the Ray Jobs API, a Ray job that ended) live only
here. Errors no retry can fix are raised as Airflow's own ``AirflowFailException``.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class RowGroupsFailedError(AirflowException):
    """Some row groups of a partition failed; the others are committed and a retry does the rest
    (the engine's :class:`winnow.exceptions.RowGroupsFailedError`, for Airflow)."""


class BucketsFailedError(AirflowException):
    """A bucket of a bucket stage failed; a retry recomputes it (the engine's
    :class:`winnow.exceptions.BucketsFailedError`, for Airflow)."""


class RayAuthError(AirflowException):
    """The cluster's Ray Jobs API refused the connection's token (or wanted one it did not
    have); the engine's :class:`winnow.exceptions.RayAuthError` is the same refusal for a driver."""


class RayJobsApiError(AirflowException):
    """The Ray Jobs API answered with an error; the message names the call and the connection."""


class RayJobError(AirflowException):
    """A step's Ray Job ended without doing its work; the message is the job's own error."""
