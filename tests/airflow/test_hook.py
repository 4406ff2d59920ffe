"""RayHook: connection -> Ray address, embedded Ray without one, secrets kept out of logs; the
provider entry point registers the ``ray`` connection type; run keys default sensibly."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from winnow_airflow.base import default_run_key
from winnow_airflow.hooks import RayHook


def _conn_env(monkeypatch, conn_id: str, **conn) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "ray", **conn}))


def test_no_connection_means_an_embedded_local_ray(airflow_db):
    hook = RayHook("ray_missing_for_test")
    assert hook.get_address() is None
    assert hook.describe() == "embedded local Ray"


def test_driver_mode_attaches_by_gcs_address_and_secrets_stay_out_of_the_log(airflow_db, monkeypatch, caplog):
    _conn_env(monkeypatch, "ray_t1", host="ray-head.svc", password="s3cret-tok", extra={"mode": "driver"})
    hook = RayHook("ray_t1")
    with caplog.at_level(logging.DEBUG):
        assert hook.get_address() == "ray-head.svc:6379"
        text = hook.describe()
        hook.log.info(text)
        hook.log.info("%r", hook.resolve())
    assert "ray-head.svc" in text and "token auth" in text
    assert hook.resolve().token == "s3cret-tok"
    assert "s3cret-tok" not in caplog.text + text


def test_extra_address_is_used_verbatim(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t2", extra={"address": "auto"})
    assert RayHook("ray_t2").get_address() == "auto"


def test_ray_client_address_is_refused_pointing_to_job_mode(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t3", extra={"address": "ray://admin:pw123@head:10001"})
    with pytest.raises(ValueError) as err:
        RayHook("ray_t3").get_address()
    message = str(err.value)
    assert "ray_t3" in message and "streaming executor does not run over Ray Client" in message
    assert '"mode": "job"' in message and "pw123" not in message


@pytest.mark.parametrize("host, port, url", [
    ("http://ray-head:8265", None, "http://ray-head:8265"),
    ("ray-head", None, "http://ray-head:8265"),
    ("ray-head", 9000, "http://ray-head:9000"),
    ("https://ray.example.org/", None, "https://ray.example.org"),
])
def test_job_mode_resolves_the_dashboard_url(airflow_db, monkeypatch, host, port, url):
    _conn_env(monkeypatch, "ray_t5", host=host, port=port, password="tok-1",
              extra={"mode": "job", "runtime_env": {"working_dir": "s3://b/w.zip"}})
    hook = RayHook("ray_t5")
    resolved = hook.resolve()
    assert hook.mode == "job" and resolved.dashboard_url == url
    assert resolved.runtime_env == {"working_dir": "s3://b/w.zip"}
    assert hook.job_url("winnow-x-g0") == f"{url}/#/jobs/winnow-x-g0"
    assert "tok-1" not in repr(resolved) + hook.describe()
    with pytest.raises(ValueError, match="job mode"):
        hook.get_address()


@pytest.mark.parametrize("extra, expected", [({}, 4000), ({"one_job_max_records": 0}, 0),
                                             ({"one_job_max_records": "250"}, 250), ({"one_job_max_records": ""}, 4000)])
def test_job_mode_runs_a_small_run_in_one_job_up_to_the_extras_record_bound(airflow_db, monkeypatch, extra, expected):
    from winnow.job import ONE_JOB_MAX_RECORDS

    _conn_env(monkeypatch, "ray_t6", host="http://ray-head:8265", extra={"mode": "job", **extra})
    assert RayHook("ray_t6").resolve().one_job_max_records == expected
    assert ONE_JOB_MAX_RECORDS == 4000  # as the hook's docstring and the README say


@pytest.mark.parametrize("bad", [-1, "many", 2.5, True])
def test_a_bad_one_job_bound_is_an_error_naming_the_connection(airflow_db, monkeypatch, bad):
    _conn_env(monkeypatch, "ray_t7", host="http://ray-head:8265", extra={"mode": "job", "one_job_max_records": bad})
    with pytest.raises(ValueError, match=r"connection 'ray_t7': extra one_job_max_records=.* whole number of records"):
        RayHook("ray_t7").resolve()


def test_the_password_field_is_the_ray_auth_token_in_the_connection_form():
    behaviour = RayHook.get_ui_field_behaviour()
    assert "password" not in behaviour["hidden_fields"]
    assert behaviour["relabeling"]["password"] == "Ray auth token"


def test_a_connection_without_host_or_address_is_an_error_naming_it(airflow_db, monkeypatch):
    _conn_env(monkeypatch, "ray_t4", extra={"mode": "driver"})
    with pytest.raises(ValueError, match="ray_t4"):
        RayHook("ray_t4").get_address()


def test_provider_entry_point_registers_the_ray_connection_type(airflow_db):
    from airflow.providers_manager import ProvidersManager

    info = ProvidersManager().hooks.get("ray")
    assert info is not None and info.hook_class_name == "winnow_airflow.hooks.RayHook"


def test_default_run_key_is_the_logical_date_or_a_path_safe_run_id():
    scheduled = {"dag_run": SimpleNamespace(logical_date=datetime(2025, 1, 31, tzinfo=UTC),
                                            run_id="scheduled__2025-01-31T00:00:00+00:00")}
    assert default_run_key(scheduled) == "20250131"
    manual = {"dag_run": SimpleNamespace(logical_date=None, run_id="manual__2025-02-01T10:00:00+00:00")}
    key = default_run_key(manual)
    assert key == "manual__2025-02-01T10_00_00_00_00" and "/" not in key and ":" not in key
