"""NSFW stage: scores each record with the LAION CLIP-based NSFW detector (a probability in
[0, 1]) (the ``thresholds`` step decides which pass)."""

from __future__ import annotations

from dataclasses import dataclass

from winnow.schemas import NSFW
from winnow.stages.heads import HeadConfig, HeadKind, HeadStage, NsfwHead

NSFW_HEAD = HeadKind("nsfw", NsfwHead, "nsfw_weights", seed=1, target=-1.5)


@dataclass(frozen=True, kw_only=True)
class NsfwConfig(HeadConfig):
    """:param weights: local .safetensors/.pt file in :class:`~winnow.stages.heads.NsfwHead`
        layout (convert the published Keras model with ``nsfw_state_dict_from_keras``); None
        only with ``allow_random_weights``.
    :param allow_random_weights: accept ``weights=None`` (seeded random weights, tests/demos).
    :param device: ``"auto"`` (CUDA where there is one), ``"cpu"``, ``"cuda:0"``...
    :param embed_dim: width of the embedding model's embeddings (768 for ViT-L/14).
    """

    head = NSFW_HEAD


class NsfwStage(HeadStage):
    """Row group of ``embed`` -> ``NSFW`` table (record_id, nsfw_score)."""

    name = NSFW_HEAD.name
    schema = NSFW

    def __init__(self, config: NsfwConfig | None = None) -> None:
        super().__init__(config or NsfwConfig())


def nsfw_config(run, _name: str = NSFW_HEAD.name) -> NsfwConfig:
    """The stage's config from a run's ``CurationConfig`` (the registry's ``config`` factory);
    the head's width is the embedding model's."""
    return NsfwConfig.for_run(run)
