"""Airflow operators and the Ray hook for winnow: thin orchestration over ``winnow.pipeline``.

Also the provider entry point (``get_provider_info``) that registers the ``ray`` connection type.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AestheticOperator",
    "CurationOperator",
    "DedupOperator",
    "EmbedOperator",
    "IndexOperator",
    "NsfwOperator",
    "RayHook",
    "ReportOperator",
    "RowGroupStageOperator",
    "RowGroupsFailed",
    "WriteOperator",
    "get_provider_info",
]

_LAZY = {
    "RayHook": "operators.hooks",
    "CurationOperator": "operators.base",
    "RowGroupStageOperator": "operators.base",
    "RowGroupsFailed": "operators.base",
    **{
        name: "operators.stages"
        for name in ("IndexOperator", "EmbedOperator", "AestheticOperator", "NsfwOperator",
                     "DedupOperator", "WriteOperator", "ReportOperator")
    },
}


def __getattr__(name: str) -> Any:
    # Lazy so that the provider manager can call get_provider_info without importing Airflow's SDK.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'operators' has no attribute {name!r}")


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's providers manager (``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-winnow",
        "name": "winnow",
        "description": "Image-dataset curation over Ray Data: CLIP embed, aesthetic and NSFW "
        "filters, semantic dedup, resumable per row group.",
        "versions": ["0.1.0"],
        "connection-types": [
            {"connection-type": "ray", "hook-class-name": "operators.hooks.RayHook"},
        ],
        "operators": [
            {"integration-name": "winnow", "python-modules": ["operators.stages"]},
        ],
        "hooks": [
            {"integration-name": "winnow", "python-modules": ["operators.hooks"]},
        ],
        "integrations": [
            {"integration-name": "winnow", "external-doc-url": "https://docs.ray.io/en/latest/data/"},
        ],
    }
