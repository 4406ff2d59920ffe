"""Airflow operators and the Ray hook for winnow: thin orchestration over ``winnow.pipeline``.

Import operators from their modules (``winnow_airflow.stages``, ``winnow_airflow.hooks``). This package
module stays import-free: Airflow's providers manager imports it for ``get_provider_info``.
"""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """Provider metadata read by Airflow's providers manager (``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-winnow",
        "name": "winnow",
        "description": "Image-dataset curation over Ray Data: CLIP embed, aesthetic and NSFW "
        "filters, semantic dedup, resumable per row group.",
        "versions": ["0.1.0"],
        "connection-types": [
            {"connection-type": "ray", "hook-class-name": "winnow_airflow.hooks.RayHook"},
        ],
        "operators": [
            {"integration-name": "winnow", "python-modules": ["winnow_airflow.stages", "winnow_airflow.corpus"]},
        ],
        "hooks": [
            {"integration-name": "winnow", "python-modules": ["winnow_airflow.hooks"]},
        ],
        "triggers": [
            {"integration-name": "winnow", "python-modules": ["winnow_airflow.triggers"]},
        ],
        "extra-links": ["winnow_airflow.links.CurationViewLink", "winnow_airflow.ray_links.RayJobLink"],
        "integrations": [
            {"integration-name": "winnow", "external-doc-url": "https://docs.ray.io/en/latest/data/"},
        ],
    }
