"""Where a run stores is a value (``RunRoot``: URI + ``StorageOptions``) that travels with the
run, never settings a process holds: ``winnow.rowgroups.fs`` keeps none, an object-store URI
without settings is refused by name, and the settings stay out of the run's parameters."""

from __future__ import annotations

import ast
import inspect
import pickle
import re
from pathlib import Path

import pytest

from winnow.exceptions import ConfigError, StorageError
from winnow.pipeline import CurationConfig
from winnow.rowgroups import CommitStore, RunRoot, StorageOptions, fs

REPO = Path(__file__).resolve().parents[2]
#: What the process-global storage settings were called before they became a value.
REMOVED = {"use_storage", "storage_scope", "use_context_storage", "current_storage", "_process_options",
           "_scoped_options", "use_storage_connection", "_use_run_storage", "_CONN_CACHE"}
#: Module-level mutable objects fs.py may hold: memos of filesystems per settings value (and per
#: filesystem), never settings of their own; a constant table; the lock of the memo.
ALLOWED_MUTABLE = {"ENV_VARS", "_FS_CACHE", "_FS_LOCK", "_COND_CACHE", "logger"}
SECRET = "s3cr3t-Kq9"


def _module_level_mutables(tree: ast.Module) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            immutable = isinstance(value, (ast.Constant, ast.Tuple, ast.BinOp)) or value is None
            if not immutable:
                out |= {t.id for t in targets if isinstance(t, ast.Name)}
    return out


def test_fs_holds_no_storage_settings_of_its_own():
    tree = ast.parse(inspect.getsource(fs))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not REMOVED & names, REMOVED & names
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "contextvars" not in imported
    assert _module_level_mutables(tree) <= ALLOWED_MUTABLE, _module_level_mutables(tree) - ALLOWED_MUTABLE


def test_no_module_installs_storage_settings_any_more():
    pattern = re.compile(r"\b(" + "|".join(sorted(REMOVED)) + r")\b")
    found = [f"{path.relative_to(REPO)}:{i}" for folder in ("winnow", "operators", "plugins", "dags", "benchmarks")
             for path in (REPO / folder).rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_a_run_root_is_a_picklable_value_that_hides_its_secrets():
    root = RunRoot("s3://bucket/runs/r1", StorageOptions(endpoint_url="http://127.0.0.1:9", access_key_id="AKID",
                                                         secret_access_key=SECRET))
    assert pickle.loads(pickle.dumps(root)) == root
    assert str(root) == f"{root}" == "s3://bucket/runs/r1"
    assert SECRET not in repr(root) and SECRET not in str(root)
    assert RunRoot.of(root) is root and RunRoot.of("/tmp/x") == RunRoot("/tmp/x")


def test_an_object_store_uri_without_settings_is_refused_naming_the_fix():
    with pytest.raises(StorageError, match=r"s3://bucket/run: no object-store settings.*StorageOptions\.from_env"):
        CommitStore("s3://bucket/run")
    with pytest.raises(StorageError, match="no object-store settings"):
        fs.resolve_filesystem("s3://bucket/run")


def test_a_local_run_root_needs_no_settings(tmp_path):
    import pyarrow as pa

    store = CommitStore(str(tmp_path / "run"))
    store.commit_table("embed", 0, 0, pa.table({"x": [1]}))
    assert store.completed("embed", 0) == {0} and store.run_root == RunRoot(str(tmp_path / "run"))


def test_the_configs_storage_is_no_run_parameter_and_never_in_its_dict(tmp_path):
    storage = StorageOptions(access_key_id="AKID", secret_access_key=SECRET, source="the Airflow connection 'c'")
    params = {"input_uri": str(tmp_path), "output_root": str(tmp_path / "out"), "run_key": "r"}
    cfg = CurationConfig.from_params(params, storage=storage)
    assert cfg.storage is storage and cfg.root == RunRoot(f"{tmp_path}/out/r", storage)
    assert "storage" not in cfg.to_dict() and SECRET not in repr(cfg)
    assert cfg == CurationConfig.from_params(params)  # where it stores does not make it another run
    with pytest.raises(ConfigError, match="unknown parameter 'storage'"):
        CurationConfig.from_params({**params, "storage": {"secret_access_key": SECRET}})
