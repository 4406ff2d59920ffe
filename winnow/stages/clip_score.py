"""The clip_score stage: how well each record's caption describes its image.

The caption (the ``.txt`` sidecar, else a field of the ``.json`` sidecar) is encoded with the text
tower of the same CLIP model the embed stage used for the image, and the score is the cosine of
the two L2-normalised embeddings, in [-1, 1]. Records without an image embedding (undecodable,
exact duplicates) or without a caption get a null score; a missing or unreadable caption is data,
never a failure. No threshold is applied here: keeping or dropping by score is decided later.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from winnow.checks import check, choice_problem, int_problem
from winnow.data.captions import caption_field_problem, read_captions
from winnow.exceptions import ModelError, WinnowError
from winnow.rowgroups.task import RowGroupTask
from winnow.stages.device import device_problem, resolve_device
from winnow.stages.embedding_io import embedding_matrix
from winnow.stages.models import (
    LoadedTextModel,
    ModelSpec,
    TokenizerSpec,
    load_text_model,
    tokenizer_spec,
    validate_model_spec,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
#: What ``precision="auto"`` means, as recorded in the stage fingerprint (as the embed stage's).
AUTO_PRECISION = "auto: bf16 autocast on CUDA, fp32 on CPU"


CLIP_SCORE = pa.schema(
    [
        ("record_id", pa.int64()),
        # cosine of the image embedding and the caption's text embedding (same CLIP model, so
        # one space), in [-1, 1]; null when there is no image embedding or no caption
        ("clip_score", pa.float32()),
        ("has_caption", pa.bool_()),  # a caption was found (.txt sidecar, else the .json field)
    ]
)



@dataclass(frozen=True, kw_only=True)
class ClipScoreConfig:
    """Knobs of the clip_score stage.

    :param model: open_clip model name; must be the embed stage's, so image and text share a space.
    :param pretrained: weights file path, a tag looked up in ``model_dir``, or ``random``.
    :param model_dir: folder holding ``<model>/<tag>.pt`` (else env ``WINNOW_MODEL_DIR``).
    :param allow_random_weights: permit ``pretrained="random"`` (tests only).
    :param batch_size: captions per text-tower call.
    :param device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    :param precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
    :param caption_field: the ``.json`` sidecar field read when a record has no ``.txt`` caption;
        a dotted path (``meta.caption``) reaches into nested objects.
    """

    model: str = "ViT-L-14-quickgelu"
    pretrained: str = "openai"
    model_dir: str | None = None
    allow_random_weights: bool = False
    batch_size: int = 256
    device: str = "auto"
    precision: str = "auto"
    caption_field: str = "caption"

    def __post_init__(self) -> None:
        check(
            int_problem("batch_size", self.batch_size, low=1),
            device_problem(self.device),
            choice_problem("precision", self.precision, PRECISIONS),
            caption_field_problem(self.caption_field),
        )


def clip_score_config(run: Any, _name: str = "clip_score") -> ClipScoreConfig:
    """The stage's config from a run's ``CurationConfig`` (the registry's ``config`` factory): the
    run's embedding model (image and text in one space) and caption field."""
    return ClipScoreConfig(model=run.model, pretrained=run.pretrained, model_dir=run.model_dir,
                           allow_random_weights=run.allow_random_weights, caption_field=run.caption_field)


class ClipScoreStage:
    """Caption-image CLIP cosine, one row group at a time, from the index and the embed stage.

    The model name, weights and tokenizer are checked when the stage is made (cheap, no model
    built); ``setup`` loads the text tower once per worker.
    """

    name: ClassVar[str] = "clip_score"
    schema: ClassVar[pa.Schema] = CLIP_SCORE

    def __init__(self, config: ClipScoreConfig) -> None:
        self.config = config
        self.spec: ModelSpec = validate_model_spec(
            config.model, config.pretrained, config.model_dir, config.allow_random_weights
        )
        self.tokenizer: TokenizerSpec = tokenizer_spec(config.model)
        self._loaded: LoadedTextModel | None = None
        self._device: torch.device | None = None
        self._embed_checked: set[str] = set()

    # Workers receive the stage pickled; the text tower is rebuilt by setup().
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "spec": self.spec, "tokenizer": self.tokenizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded, self._device, self._embed_checked = None, None, set()

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def output_schema(self) -> pa.Schema:
        return CLIP_SCORE

    def fingerprint_config(self) -> dict[str, Any]:
        # Device and batch size do not change output (beyond float rounding); precision can.
        return {
            "model": self.spec.model_name,
            "weights_digest": self.spec.weights_digest(),
            "embed_dim": self.spec.embed_dim,
            "tokenizer": self.tokenizer.to_dict(),
            "caption_field": self.config.caption_field,
            "precision": AUTO_PRECISION if self.config.precision == "auto" else self.config.precision,
        }

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def loaded(self) -> LoadedTextModel:
        self.setup()
        assert self._loaded is not None
        return self._loaded

    def setup(self) -> None:
        """Load the text tower and its tokenizer, once."""
        if self._loaded is not None:
            return
        cfg = self.config
        self._loaded = load_text_model(
            cfg.model,
            cfg.pretrained,
            device=str(self.device),
            model_dir=cfg.model_dir,
            allow_random_weights=cfg.allow_random_weights,
        )
        logger.info(
            "clip_score: %s (%s) text tower on %s, precision %s, batch %d, caption field %r",
            cfg.model, self._loaded.weights_digest, self.device,
            self._autocast_dtype() or torch.float32, cfg.batch_size, cfg.caption_field,
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """``(n, D)`` float32 L2-normalised text embeddings, ``batch_size`` captions per call."""
        loaded = self.loaded
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        amp_dtype = self._autocast_dtype()
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(texts), self.config.batch_size):
                tokens = loaded.tokenize(texts[start : start + self.config.batch_size]).to(device)
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with autocast:
                    features = loaded.model.encode_text(tokens)
                features = torch.nn.functional.normalize(features.float(), dim=-1)
                out[start : start + len(tokens)] = features.cpu().numpy()
        return out

    def score(self, image_embeddings: np.ndarray, captions: list[str]) -> np.ndarray:
        """Cosine of each image embedding (re-normalised in float32) and its caption's text
        embedding, float32."""
        if not captions:
            return np.empty(0, dtype=np.float32)
        images = np.asarray(image_embeddings, dtype=np.float32)
        images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
        texts = self.encode_texts(captions)
        return np.einsum("ij,ij->i", images, texts).astype(np.float32)

    def _check_embed_model(self, task: RowGroupTask) -> None:
        """Refuse embeddings made by another model than this stage's text tower: their cosines
        would compare two unrelated spaces. Checked once per run root."""
        if task.run_root in self._embed_checked:
            return
        stored = (task.store().read_fingerprint("embed") or {}).get("config") or {}
        theirs = (stored.get("model"), stored.get("weights_digest"))
        if None not in theirs and theirs != (self.spec.model_name, self.spec.weights_digest()):
            raise ModelError(
                f"the embed stage of {task.run_root} was computed with model {theirs[0]} "
                f"({theirs[1]}) but clip_score uses {self.spec.model_name} "
                f"({self.spec.weights_digest()}): image and caption embeddings must come from the "
                "same CLIP model. Give clip_score the embed stage's model and weights."
            )
        self._embed_checked.add(task.run_root)

    def process(self, task: RowGroupTask) -> pa.Table:
        self._check_embed_model(task)
        store = task.store()
        index = store.read_table("index", task.partition, task.row_group)
        embed = store.read_table("embed", task.partition, task.row_group, columns=["record_id", "embedding"])
        where = f"stage 'embed' row group {task.row_group}"
        valid_embed, matrix = embedding_matrix(embed.column("embedding"), expected_dim=self.embed_dim, where=where)
        record_ids = index.column("record_id").combine_chunks()
        n = index.num_rows

        # Each index row's position in the embed table (-1: the embed table has no such row).
        embed_ids = embed.column("record_id").combine_chunks()
        if embed_ids.equals(record_ids):
            position = np.arange(n)
        else:
            position = pc.index_in(record_ids, value_set=embed_ids).fill_null(-1).to_numpy(zero_copy_only=False)
            missing = position < 0
            if "exact_duplicate_of" in index.column_names:
                missing &= index.column("exact_duplicate_of").is_null().to_numpy(zero_copy_only=False)
            if missing.any():
                raise WinnowError(
                    f"{where} has no row for record {record_ids[int(np.flatnonzero(missing)[0])].as_py()} "
                    "of the index: the embed stage is stale; recompute it (overwrite=true)"
                )
        # Row of `matrix` (the embed table's valid rows) of each index row, -1 without embedding.
        matrix_row = np.full(len(valid_embed), -1, dtype=np.int64)
        matrix_row[valid_embed] = np.arange(int(valid_embed.sum()))
        image_row = np.where(position >= 0, matrix_row[np.maximum(position, 0)], -1) if n else np.empty(0, np.int64)

        # Every record's sidecars are read (has_caption is then true or false for each): they lie
        # inside the coalesced ranged reads anyway. Only records with an embedding are encoded.
        captions = read_captions(index, self.config.caption_field, storage=task.storage)
        has_caption = np.array([c is not None for c in captions], dtype=bool)
        scored = np.flatnonzero(has_caption & (image_row >= 0))
        scores = np.full(n, np.nan, dtype=np.float32)
        if len(scored):
            scores[scored] = self.score(matrix[image_row[scored]], [captions[i] for i in scored])
        valid = np.zeros(n, dtype=bool)
        valid[scored] = True
        logger.debug(
            "clip_score row group %d: %d of %d records scored, %d without caption",
            task.row_group, len(scored), n, int((~has_caption).sum()),
        )
        return pa.Table.from_arrays(
            [record_ids, pa.array(scores, type=pa.float32(), mask=~valid), pa.array(has_caption, type=pa.bool_())],
            schema=CLIP_SCORE,
        )
