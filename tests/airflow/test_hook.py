"""RayHook: connection -> Ray address, embedded Ray without one, secrets kept out of logs; the
provider entry point registers the ``ray`` connection type; run keys default sensibly."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from operators.base import default_run_key
from operators.hooks import RayHook


def _conn_env(monkeypatch, conn_id: str, **conn) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "ray", **conn}))


def test_no_connection_means_an_embedded_local_ray(airflow_db):
    hook = RayHook("ray_missing_for_test")
    assert hook.get_address() is None
    assert hook.describe() == "embedded local Ray"


def test_host_and_port_give_a_ray_client_address_and_secrets_stay_out_of_the_log(airflow_db, monkeypatch, caplog):
    _conn_env(monkeypatch, "ray_t1", host="ray-head.svc", port=10001, password="s3cret-pw",
              extra={"mode": "driver", "token": "tok-123"})
    hook = RayHook("ray_t1")
    with caplog.at_level(logging.DEBUG):
        assert hook.get_address() == "ray://ray-head.svc:10001"
        text = hook.describe()
        hook.log.info(text)
    assert "ray-head.svc" in text
    assert "s3cret-pw" not in caplog.text + text and "tok-123" not in caplog.text + text


def test_extra_address_is_used_verbatim_and_userinfo_is_redacted(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t2", extra={"address": "ray://admin:pw123@head:10001"})
    hook = RayHook("ray_t2")
    assert hook.get_address() == "ray://admin:pw123@head:10001"
    assert "pw123" not in hook.describe() and "***@head:10001" in hook.describe()


def test_job_mode_is_refused_with_a_clear_error(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t3", host="head", extra={"mode": "job"})
    with pytest.raises(NotImplementedError, match="mode='job'"):
        RayHook("ray_t3").get_address()


def test_a_connection_without_host_or_address_is_an_error_naming_it(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t4", extra={"mode": "driver"})
    with pytest.raises(ValueError, match="ray_t4"):
        RayHook("ray_t4").get_address()


def test_provider_entry_point_registers_the_ray_connection_type(airflow_db):
    from airflow.providers_manager import ProvidersManager

    info = ProvidersManager().hooks.get("ray")
    assert info is not None and info.hook_class_name == "operators.hooks.RayHook"


def test_default_run_key_is_the_logical_date_or_a_path_safe_run_id():
    scheduled = {"dag_run": SimpleNamespace(logical_date=datetime(2025, 1, 31, tzinfo=timezone.utc),
                                            run_id="scheduled__2025-01-31T00:00:00+00:00")}
    assert default_run_key(scheduled) == "20250131"
    manual = {"dag_run": SimpleNamespace(logical_date=None, run_id="manual__2025-02-01T10:00:00+00:00")}
    key = default_run_key(manual)
    assert key == "manual__2025-02-01T10_00_00_00_00" and "/" not in key and ":" not in key
