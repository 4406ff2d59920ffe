"""Pure compute stages: decode+embed, aesthetic, nsfw, dedup, write. No Airflow import."""

from winnow.stages.base import RowGroupTask, Stage

__all__ = ["RowGroupTask", "Stage"]
