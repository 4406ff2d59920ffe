"""What the wheel installs: the engine as ``winnow``, the project's ``operators/`` folder as
``winnow_airflow`` (never a top-level ``operators``, a name many Airflow deployments use for
their own code), and the provider entry point that Airflow's providers manager reads.

The wheel is built from a copy of the sources (so the clone gets no ``build/`` or egg-info) and
installed into a folder of its own; a child process imports it from there beside a user's own
``operators`` package, with the repo root off its path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPORT_OPERATORS = re.compile(r"^\s*(from|import)\s+operators(\.|\s|$)", re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("winnow", "operators"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_installs_operators_folder_as_winnow_airflow(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"winnow", "winnow_airflow"}, tops
    for path in sorted((REPO / "operators").glob("*.py")):
        assert f"winnow_airflow/{path.name}" in names, path
    for path in sorted((REPO / "winnow").rglob("*.py")):
        assert path.relative_to(REPO).as_posix() in names, f"{path} is not in the wheel (pyproject's packages list)"
    for path in sorted((REPO / "winnow" / "stages" / "model_configs").glob("*.json")):
        assert path.relative_to(REPO).as_posix() in names, path
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[apache_airflow_provider]" in text and "provider_info = winnow_airflow:get_provider_info" in text, text


def test_pyproject_lists_every_engine_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "winnow").rglob("__init__.py")}
    assert listed == found | {"winnow_airflow"}


def test_nothing_imports_the_folder_name_operators():
    offenders = []
    for folder in ("winnow", "operators", "dags", "plugins", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            if path != Path(__file__).resolve() and IMPORT_OPERATORS.search(path.read_text()):  # (its child imports a user's)
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


CHILD = r"""
import importlib, json, sys
from importlib.metadata import distributions
import operators  # the user's own package
import winnow_airflow
from winnow_airflow.stages import OPERATORS
(dist,) = [d for d in distributions(path=[sys.argv[1]]) if d.metadata["Name"] == "airflow-winnow"]
(ep,) = [e for e in dist.entry_points if e.group == "apache_airflow_provider"]
info = ep.load()()
paths = [c["hook-class-name"] for c in info["connection-types"]] + list(info["extra-links"])
for group in ("operators", "hooks", "triggers"):
    for item in info[group]:
        for mod in item["python-modules"]:
            importlib.import_module(mod)
for path in paths:
    mod, _, name = path.rpartition(".")
    getattr(importlib.import_module(mod), name)
from winnow_airflow.triggers import RayJobTrigger
classpath, _ = RayJobTrigger(conn_id="ray_default", submission_id="j").serialize()
print(json.dumps({"user": operators.MINE, "winnow_airflow": winnow_airflow.__file__, "stages": sorted(OPERATORS),
                  "trigger": classpath, "paths": paths}))
"""


def test_installed_wheel_imports_beside_a_users_operators_package(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    user = tmp_path / "user"
    (user / "operators").mkdir(parents=True)
    (user / "operators" / "__init__.py").write_text("MINE = 'the user operators'\n")
    # -I: the repo root (cwd, PYTHONPATH) and the editable install's finder stay out; the venv's
    # site-packages still give Airflow, Ray and torch.
    code = f"import sys; sys.path[:0] = [{str(user)!r}, {str(site)!r}]\n" + CHILD
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(site)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["user"] == "the user operators"
    assert Path(got["winnow_airflow"]).is_relative_to(site)
    assert got["trigger"] == "winnow_airflow.triggers.RayJobTrigger"
    assert all(p.startswith("winnow_airflow.") for p in got["paths"])
    assert "embed" in got["stages"]
