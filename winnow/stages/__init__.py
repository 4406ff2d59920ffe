"""Pure compute stages: decode+embed, aesthetic, nsfw, dedup, write; and the stage registry.

No Airflow import. Kept import-free so that the registry (``winnow.stages.registry``) is cheap
to read from a DAG file; the stage contract is in ``winnow.stages.base``.
"""
