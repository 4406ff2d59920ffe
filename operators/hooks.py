"""The Ray hook: turns an Airflow connection of type ``ray`` into a Ray address for the engine.

It owns the connection and nothing else; connecting is ``winnow.ray.cluster.connect``'s job.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

#: Ways a task can use a cluster: attach as a driver, or submit a Ray Job (not built yet).
RAY_MODES = ("driver", "job")


class RayHook(BaseHook):
    """Ray cluster address from an Airflow connection.

    No connection under ``ray_conn_id`` means an embedded local Ray (address ``None``), so a
    laptop or CI run needs no setup. A connection gives ``ray://host:port`` (Ray Client; port
    10001 when unset), or its extra ``address`` verbatim (``"auto"``, ``"10.0.0.5:6379"``).
    Extra ``mode`` is ``"driver"`` (default: the task drives Ray Data itself) or ``"job"``
    (submit a Ray Job and defer; not built yet, refused with a clear error).

    :param ray_conn_id: the Airflow connection id; ``ray_default`` unless given.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str | None = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id or self.default_conn_name
        self._resolved: tuple[str | None, str] | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "password"],
            "relabeling": {"host": "Ray head host", "port": "Ray Client port (10001)"},
            "placeholders": {
                "host": "ray-head.ray.svc",
                "extra": '{"mode": "driver"} or {"address": "auto"}',
            },
        }

    def _resolve(self) -> tuple[str | None, str]:
        if self._resolved is not None:
            return self._resolved
        try:
            conn = self.get_connection(self.ray_conn_id)
        except AirflowNotFoundException:
            self.log.info("no connection %r: using an embedded local Ray", self.ray_conn_id)
            self._resolved = (None, "driver")
            return self._resolved
        extra = conn.extra_dejson or {}
        mode = str(extra.get("mode", "driver"))
        if mode not in RAY_MODES:
            raise ValueError(
                f"connection {self.ray_conn_id!r}: extra mode={mode!r} is not one of {RAY_MODES}"
            )
        if extra.get("address"):
            address: str | None = str(extra["address"])
        elif conn.host:
            host = conn.host
            address = host if "://" in host else f"ray://{host}:{conn.port or 10001}"
        else:
            raise ValueError(
                f"connection {self.ray_conn_id!r} has neither a host nor an extra 'address'; "
                "set the Ray head host (Ray Client port 10001), or delete the connection to "
                "run on an embedded local Ray"
            )
        self._resolved = (address, mode)
        return self._resolved

    @property
    def mode(self) -> str:
        """``"driver"`` or ``"job"``."""
        return self._resolve()[1]

    def get_address(self) -> str | None:
        """The Ray address to give ``winnow.ray.cluster.connect`` (``None``: embedded)."""
        address, mode = self._resolve()
        if mode == "job":
            raise NotImplementedError(
                f"connection {self.ray_conn_id!r} asks for mode='job' (submit a Ray Job and "
                "defer), which is not built yet; use mode='driver' (the default)"
            )
        return address

    def get_conn(self) -> str | None:
        return self.get_address()

    def describe(self) -> str:
        """A log-safe description: never the password, the extras or userinfo in a URI."""
        from winnow.ray.cluster import redact

        address, mode = self._resolve()
        if address is None:
            return "embedded local Ray"
        return f"Ray at {redact(address)} ({mode} mode, connection {self.ray_conn_id!r})"
