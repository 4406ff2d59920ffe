"""Aesthetic stage: scores each record with the LAION aesthetic MLP (roughly 1-10, ~5 is average)
and keeps records scoring at least the threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from winnow.schemas import AESTHETIC
from winnow.stages.heads import HeadConfig, HeadStage


@dataclass(frozen=True, kw_only=True)
class AestheticConfig(HeadConfig):
    """:param weights: local .safetensors/.pt file of the LAION improved aesthetic predictor
        (``sac+logos+ava1-l14-linearMSE.pth``); None only with ``allow_random_weights``.
    :param threshold: keep records with score >= threshold, on the head's ~1-10 scale; in [0, 10].
    :param allow_random_weights: accept ``weights=None`` (seeded random weights, tests/demos).
    :param device: ``"auto"`` (CUDA where there is one), ``"cpu"``, ``"cuda:0"``...
    :param embed_dim: width of the embedding model's embeddings (768 for ViT-L/14).
    """

    THRESHOLD: ClassVar[tuple[str, float, float]] = ("aesthetic_threshold", 0.0, 10.0)

    threshold: float = 5.0


class AestheticStage(HeadStage):
    """Row group of ``embed`` -> ``AESTHETIC`` table (record_id, aesthetic_score, aesthetic_keep)."""

    name = "aesthetic"
    schema = AESTHETIC

    def __init__(self, config: AestheticConfig | None = None) -> None:
        super().__init__(config or AestheticConfig())

    def keep(self, scores: np.ndarray) -> np.ndarray:
        return scores >= self.config.threshold


__all__ = ["AestheticConfig", "AestheticStage"]
