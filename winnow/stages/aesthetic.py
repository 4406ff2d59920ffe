"""Aesthetic stage: scores each record with the LAION aesthetic MLP (roughly 1-10, ~5 is average)
(the ``thresholds`` step decides which pass)."""

from __future__ import annotations

from dataclasses import dataclass

from winnow.schemas import AESTHETIC
from winnow.stages.heads import AestheticMLP, HeadConfig, HeadKind, HeadStage

AESTHETIC_HEAD = HeadKind("aesthetic", AestheticMLP, "aesthetic_weights", seed=0, target=5.0)


@dataclass(frozen=True, kw_only=True)
class AestheticConfig(HeadConfig):
    """:param weights: local .safetensors/.pt file of the LAION improved aesthetic predictor
        (``sac+logos+ava1-l14-linearMSE.pth``); None only with ``allow_random_weights``.
    :param allow_random_weights: accept ``weights=None`` (seeded random weights, tests/demos).
    :param device: ``"auto"`` (CUDA where there is one), ``"cpu"``, ``"cuda:0"``...
    :param embed_dim: width of the embedding model's embeddings (768 for ViT-L/14).
    """

    head = AESTHETIC_HEAD


class AestheticStage(HeadStage):
    """Row group of ``embed`` -> ``AESTHETIC`` table (record_id, aesthetic_score)."""

    name = AESTHETIC_HEAD.name
    schema = AESTHETIC

    def __init__(self, config: AestheticConfig | None = None) -> None:
        super().__init__(config or AestheticConfig())


def aesthetic_config(run, _name: str = AESTHETIC_HEAD.name) -> AestheticConfig:
    """The stage's config from a run's ``CurationConfig`` (the registry's ``config`` factory);
    the head's width is the embedding model's."""
    return AestheticConfig.for_run(run)


__all__ = ["AESTHETIC_HEAD", "AestheticConfig", "AestheticStage", "aesthetic_config"]
