"""Fixtures of the fault matrix: one generated input and ONE fault-free reference run, shared by
every case (the helpers live in ``_faultkit``).
"""

from __future__ import annotations

import os

import pytest

from tests.data._shards import write_tar
from tests.faults._faultkit import EXTRA_SHARD, Reference, RunOutput, Sample, _extra_shard_members, tree_state
from winnow.data.sample import generate_sample
from winnow.pipeline import run_all


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Sample:
    base = str(tmp_path_factory.mktemp("faults"))
    input_dir = os.path.join(base, "input")
    manifest = generate_sample(input_dir, shards=3, per_shard=16, seed=5, corrupt=True)
    write_tar(os.path.join(input_dir, EXTRA_SHARD), _extra_shard_members())
    return Sample(base=base, input=input_dir, manifest=manifest)


@pytest.fixture(scope="session")
def reference(sample) -> Reference:
    """The fault-free run every recoverable case must reproduce (local backend)."""
    cfg = sample.config("reference")
    before = tree_state(sample.base)
    summary = run_all(cfg, backend="local")
    after = tree_state(sample.base, skip=cfg.run_root)
    return Reference(cfg=cfg, summary=summary, output=RunOutput.of(cfg.run_root), tree_before=before, tree_after=after)
