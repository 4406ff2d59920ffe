"""benchmarks/gpu_check.sh: its CPU dry run (so the script cannot rot) and its dedup figure on a GPU.

The dry run goes through the same code as the GPU check (embed stage through the runner's local
backend, the nvImageCodec decoder class, model-only timing, dedup) with Ray and DALI made
unimportable, as they are on the GPU check machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Installed as sitecustomize in the child: Ray and DALI are absent on the GPU check machine.
BLOCKER = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray.") or name.startswith("nvidia.dali"):
            raise ImportError(f"{name} is not installed on the GPU check machine (blocked by the test)")
sys.meta_path.insert(0, _Absent())
'''


def test_gpu_check_dry_run_measures_every_variant_without_ray_or_dali(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
    }
    env.pop("WINNOW_TEST_FAULTS", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path),
    )
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GPU_CHECK ")]
    assert lines, tail
    report = json.loads(lines[-1][len("GPU_CHECK "):])
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    assert proc.returncode == 0 and report["errors"] == {}, tail
    assert report["ray_imported"] is False and report["dali_imported"] is False
    assert report["auto_decode_backend"] == "pillow"  # no DALI, no GPU
    for variant in ("pipeline_gpu_decode", "pipeline_cpu_decode"):
        assert report[variant]["img_s"] > 0 and report[variant]["stats"]["row_groups"] == report["row_groups"]
    assert report["model_only_ceiling_img_s"] > 0 and report["pipeline_over_model_only"] > 0
    assert report["gpu_decode"]["img_s"] > 0
    assert report["dedup"]["planted_found"] == report["dedup"]["planted"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dedup_figure_finds_every_planted_duplicate_on_200k_embeddings():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import dedup_figure

    result = dedup_figure(200_000, 768, torch.device("cuda"), planted=500)
    assert result["planted_found"] == 500, result
