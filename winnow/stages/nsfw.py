"""NSFW stage: scores each record with the LAION CLIP-based NSFW detector (a probability in
[0, 1]) and keeps records scoring below the threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from winnow.schemas import NSFW
from winnow.stages.heads import HeadConfig, HeadStage


@dataclass(frozen=True, kw_only=True)
class NsfwConfig(HeadConfig):
    """:param weights: local .safetensors/.pt file in :class:`~winnow.stages.heads.NsfwHead`
        layout (convert the published Keras model with ``nsfw_state_dict_from_keras``); None
        only with ``allow_random_weights``.
    :param threshold: keep records with probability < threshold; in [0, 1].
    :param allow_random_weights: accept ``weights=None`` (seeded random weights, tests/demos).
    :param device: ``"auto"`` (CUDA where there is one), ``"cpu"``, ``"cuda:0"``...
    :param embed_dim: width of the embedding model's embeddings (768 for ViT-L/14).
    """

    THRESHOLD: ClassVar[tuple[str, float, float]] = ("nsfw_threshold", 0.0, 1.0)

    threshold: float = 0.5


class NsfwStage(HeadStage):
    """Row group of ``embed`` -> ``NSFW`` table (record_id, nsfw_score, nsfw_keep)."""

    name = "nsfw"
    schema = NSFW

    def __init__(self, config: NsfwConfig | None = None) -> None:
        super().__init__(config or NsfwConfig())

    def keep(self, scores: np.ndarray) -> np.ndarray:
        return scores < self.config.threshold
