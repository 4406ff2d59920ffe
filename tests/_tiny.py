"""The tiny test run: open_clip's registered ``winnow-tiny-vit`` config with random weights, and the
thresholds under which dedup is the only filter that drops records.

Random-weight scores carry no meaning (aesthetic ~5 +- 1), so the score filters keep everything
and dedup, at an eps fit for this model (it puts distinct images at cosine ~0.97-0.9995), is the
filter whose output tests compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from winnow.pipeline import CurationConfig

#: The tiny model, random weights allowed (a real run refuses them unless asked).
TINY_MODEL: dict[str, Any] = {"model": "winnow-tiny-vit", "pretrained": "random", "allow_random_weights": True}
#: Score filters that keep every record; dedup's eps for the tiny model.
ONLY_DEDUP: dict[str, Any] = {"aesthetic_threshold": 0.0, "nsfw_threshold": 1.0, "dedup_eps": 0.0002}


def tiny_config(**values: Any) -> CurationConfig:
    """A run with the tiny model where only dedup drops records; ``values`` (input and output,
    run key, buffer size, partitions, thresholds...) are the other fields and win."""
    from winnow.pipeline import CurationConfig  # here: the Airflow conftest imports this module first

    return CurationConfig(**{**TINY_MODEL, **ONLY_DEDUP, **values})
