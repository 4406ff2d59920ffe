"""The embed stage: decode each record's image and embed it with an open_clip image tower.

Output per row group: record_id, key, an L2-normalised float16 embedding (null when the image
could not be decoded) and the decode error. An undecodable image is data, never a failure.

While the watermark filter is on (:mod:`winnow.stages.watermark`), the stage loads the LAION
watermark detector too and adds ``watermark_score`` (P(watermark), float32, null where there is no
embedding): both models get their input from the one decode of each image (the decoder's main
pixels and its watermark view). While it is off, output and fingerprint are those of the stage
without it.

An exact duplicate (index ``exact_duplicate_of`` set: the same image bytes as an earlier record)
is never read, decoded nor embedded: its row has a null embedding and a null error (its twin's
embedding is the one that counts). :func:`winnow.data.reader.read_images` is the one place this
is decided.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from winnow.data.reader import read_images
from winnow.filters import PARAMS as FILTER_PARAMS
from winnow.filters import before_decode_params
from winnow.rowgroups.task import RowGroupTask
from winnow.schemas import embed_schema, embedding_type
from winnow.stages.decode import (
    DEFAULT_MAX_PIXELS,
    BatchDecoder,
    DecodeBackend,
    DecodedBatch,
    make_batch_decoder,
    normalize_batch,
    validate_decode_backend,
)
from winnow.stages.device import resolve_device
from winnow.stages.models import LoadedModel, ModelSpec, load_image_model, validate_model_spec
from winnow.stages.watermark import SCORE_COLUMN as WATERMARK_COLUMN
from winnow.stages.watermark import (
    WATERMARK_PREPROCESS,
    load_watermark_model,
    watermark_fingerprint,
    watermark_probabilities,
    watermark_settings,
    watermark_weights_digest,
)

logger = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16")
#: What ``precision="auto"`` means, as recorded in the stage fingerprint.
AUTO_PRECISION = "auto: bf16 autocast on CUDA, fp32 on CPU"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Knobs of the embed stage.

    :param model: open_clip model name (``ViT-L-14-quickgelu``: the LAION heads expect it).
    :param pretrained: weights file path, a tag looked up in ``model_dir``, or ``random``.
    :param model_dir: folder holding ``<model>/<tag>.pt`` (else env ``WINNOW_MODEL_DIR``).
    :param allow_random_weights: permit ``pretrained="random"`` (tests only).
    :param batch_size: images per model call.
    :param decode_backend: ``auto``, ``nvimgcodec``, ``dali-gpu``, ``dali-cpu`` or ``pillow``.
    :param device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    :param precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
    :param max_pixels: images declaring more pixels are refused as decompression bombs.
    :param decode_threads: CPU threads for decoding.
    :param compile: run the model through ``torch.compile`` (fixed batch shape; pays off on a GPU
        for large models, costs a compile of tens of seconds per worker).
    :param read_ahead: row groups whose bytes are read ahead of the model (the bounded queue of
        the pipelined worker); as many reads run at once.
    :param before_decode: the params of the before-decode filters that are on (sorted pairs,
        :func:`winnow.filters.before_decode_params`): the records they drop are never read nor
        decoded (null embedding, null error).
    :param watermark: score each image with the LAION watermark detector too (the watermark
        filter is on): a ``watermark_score`` column.
    :param watermark_weights: the detector's local weights file; None: seeded random weights
        (only with ``allow_random_weights``).
    :param corpus: the run has a corpus: the records its pre-check marked (listed by a takedown,
        or bytes the corpus already holds; :mod:`winnow.stages.corpus`) are not read nor decoded.
    """

    model: str = "ViT-L-14-quickgelu"
    pretrained: str = "openai"
    model_dir: str | None = None
    allow_random_weights: bool = False
    batch_size: int = 64
    decode_backend: DecodeBackend = "auto"
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 2
    compile: bool = False
    read_ahead: int = 4
    before_decode: tuple[tuple[str, Any], ...] = ()
    watermark: bool = False
    watermark_weights: str | None = None
    corpus: bool = False

    def __post_init__(self) -> None:
        from winnow.checks import bool_problem, check, choice_problem, int_problem
        from winnow.stages.device import device_problem

        try:
            validate_decode_backend(self.decode_backend)
            backend_problem = None
        except ValueError as exc:
            backend_problem = str(exc)
        check(
            int_problem("batch_size", self.batch_size, low=1),
            backend_problem,
            device_problem(self.device),
            choice_problem("precision", self.precision, PRECISIONS),
            int_problem("max_pixels", self.max_pixels, low=1),
            int_problem("decode_threads", self.decode_threads, low=1),
            bool_problem("compile", self.compile),
            int_problem("read_ahead", self.read_ahead, low=1),
            bool_problem("watermark", self.watermark),
        )


def embed_config(run: Any, _name: str = "embed") -> EmbedConfig:
    """The embed stage's config from a run's ``CurationConfig`` (the registry's ``config`` factory).
    A :class:`~winnow.exceptions.ConfigError` naming ``watermark_weights`` when the watermark
    filter is on without usable weights (:func:`~winnow.stages.watermark.watermark_settings`)."""
    watermark, watermark_weights = watermark_settings(run)
    return EmbedConfig(model=run.model, pretrained=run.pretrained, model_dir=run.model_dir,
                       allow_random_weights=run.allow_random_weights, batch_size=run.batch_size,
                       decode_backend=run.decode_backend,
                       before_decode=before_decode_params({p.name: getattr(run, p.name) for p in FILTER_PARAMS}),
                       watermark=watermark, watermark_weights=watermark_weights,
                       corpus=getattr(run, "corpus_uri", None) is not None)


class EmbedStage:
    """Decode + open_clip image embeddings, one row group at a time.

    The model name and weights are checked when the stage is made (cheap, no model built), so a
    bad parameter fails before any worker starts; ``setup`` loads the model once per worker. With
    ``watermark`` the watermark detector's weights are checked (and hashed) here too and the
    detector is loaded by ``setup`` beside the CLIP model.
    """

    name: ClassVar[str] = "embed"

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self.spec: ModelSpec = validate_model_spec(
            config.model, config.pretrained, config.model_dir, config.allow_random_weights
        )
        #: the watermark detector's weights digest (None while the filter is off)
        self.watermark_digest: str | None = (
            watermark_weights_digest(config.watermark_weights, allow_random_weights=config.allow_random_weights)
            if config.watermark else None
        )
        self._loaded: LoadedModel | None = None
        self._watermark: torch.nn.Module | None = None
        self._decoder: BatchDecoder | None = None
        self._device: torch.device | None = None
        self._compiled: Any = None
        self._pipeline: Any = None

    # Workers receive the stage pickled; models and DALI pipelines are rebuilt by setup().
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "spec": self.spec, "watermark_digest": self.watermark_digest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded, self._decoder, self._device, self._watermark = None, None, None, None
        self._compiled, self._pipeline = None, None

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def watermark_on(self) -> bool:
        """Whether the stage scores images with the watermark detector too (the filter is on)."""
        return self.config.watermark

    def output_schema(self) -> pa.Schema:
        schema = embed_schema(self.embed_dim)
        # Only while the filter is on: off, the files are those of a stage without it.
        return schema.append(pa.field(WATERMARK_COLUMN, pa.float32())) if self.watermark_on else schema

    def fingerprint_config(self) -> dict[str, Any]:
        # Device, batch size, decode threads, compile and read-ahead do not change output
        # (beyond float rounding); precision can.
        return {
            "model": self.spec.model_name,
            "weights_digest": self.spec.weights_digest(),
            "embed_dim": self.spec.embed_dim,
            "preprocess": self.spec.preprocess.to_dict(),
            "precision": AUTO_PRECISION if self.config.precision == "auto" else self.config.precision,
            "max_pixels": self.config.max_pixels,
            # Only with a corpus: its pre-check's records are not embedded.
            **({"corpus": True} if self.config.corpus else {}),
            # Only while a before-decode filter is on: which records are embedded at all.
            **({"before_decode": dict(self.config.before_decode)} if self.config.before_decode else {}),
            # Only while the watermark filter is on: the detector that writes watermark_score.
            **({"watermark": watermark_fingerprint(self.watermark_digest)} if self.watermark_digest else {}),
        }

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def decoder(self) -> BatchDecoder:
        """The batch decoder :meth:`setup` built."""
        assert self._decoder is not None, "call setup() first"
        return self._decoder

    @property
    def decode_backend(self) -> str:
        """The backend actually in use (``auto`` resolved); loads the model if needed."""
        self.setup()
        assert self._decoder is not None
        return self._decoder.backend

    def setup(self, *, model: LoadedModel | None = None) -> None:
        """Load the model and build the decoder, once.

        :param model: an already loaded model of this stage's spec on its device, used instead
            of loading another copy (the GPU check shares one ViT-L across batch sizes).
        """
        if self._decoder is not None:
            return
        cfg = self.config
        device = self.device
        if model is not None:
            if model.spec != self.spec:
                raise ValueError(f"model {model.spec.model_name} ({model.weights_digest}) is not this stage's {self.spec}")
            self._loaded = model
        else:
            self._loaded = load_image_model(
                cfg.model,
                cfg.pretrained,
                device=str(device),
                model_dir=cfg.model_dir,
                allow_random_weights=cfg.allow_random_weights,
            )
        if self.watermark_on:
            self._watermark, _ = load_watermark_model(
                cfg.watermark_weights, allow_random_weights=cfg.allow_random_weights, device=device
            )
        self._decoder = make_batch_decoder(
            cfg.decode_backend,
            self._loaded.preprocess,
            max_batch_size=cfg.batch_size,
            num_threads=cfg.decode_threads,
            max_pixels=cfg.max_pixels,
            device_id=(device.index or 0) if device.type == "cuda" else None,
            # auto never decodes on a GPU the model is not on.
            allow_gpu_decode=device.type == "cuda",
            # The watermark detector's input: a second view of each decoded image, not a second decode.
            extra=(WATERMARK_PREPROCESS,) if self.watermark_on else (),
        )
        if cfg.compile:
            # One static shape (fixed_batches), so one graph; inference only.
            self._compiled = torch.compile(self._forward_eager, dynamic=False)
        logger.info(
            "embed: %s (%s, %d-d) on %s, precision %s, decode %s, batch %d%s%s%s",
            cfg.model, self._loaded.weights_digest, self._loaded.embed_dim, device,
            self._autocast_dtype() or torch.float32, self._decoder.backend, cfg.batch_size,
            " (fixed, last padded)" if self.fixed_batches else "", ", compiled" if cfg.compile else "",
            f", watermark detector ({self.watermark_digest})" if self.watermark_on else "",
        )

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    @property
    def fixed_batches(self) -> bool:
        """Whether the model always sees ``batch_size`` images (the last batch padded).

        On a GPU, and whenever compiled, one static shape keeps kernels and compiled graphs
        reused; on a CPU in eager mode padding would only waste compute, so batches there are
        exactly the per-row-group batches of :meth:`embed_images`.
        """
        return self.device.type == "cuda" or self.config.compile

    def forward(self, pixels: torch.Tensor, *, fixed: bool | None = None) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, D) float16 L2-normalised embeddings, on the model's device.

        Normalisation, the image tower (bf16 autocast where configured) and the L2 norm run as
        one function, compiled when ``compile`` is set. With ``fixed`` (default
        :attr:`fixed_batches`) the batch is padded to ``batch_size`` (zeros, sliced off after) so
        the shape never changes.
        """
        self.setup()
        n = int(pixels.shape[0])
        fn = self._compiled if self._compiled is not None else self._forward_eager
        return fn(self._model_batch(pixels, fixed))[:n]

    def _model_batch(self, pixels: torch.Tensor, fixed: bool | None) -> torch.Tensor:
        """``pixels`` on the model's device, padded to ``batch_size`` with ``fixed`` (default
        :attr:`fixed_batches`)."""
        device = self.device
        if pixels.device != device:
            # Pinned memory lets the copy overlap the previous batch's compute.
            if device.type == "cuda" and not pixels.is_pinned():
                pixels = pixels.pin_memory()
            pixels = pixels.to(device, non_blocking=True)
        n = int(pixels.shape[0])
        if (self.fixed_batches if fixed is None else fixed) and n != self.config.batch_size:
            if n > self.config.batch_size:
                raise ValueError(f"a batch of {n} images exceeds batch_size {self.config.batch_size}")
            pad = pixels.new_zeros((self.config.batch_size - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, pad])
        return pixels

    def watermark_scores(self, batch: DecodedBatch, *, fixed: bool | None = None) -> torch.Tensor | None:
        """P(watermark) of a decoded batch's images, ``(len(batch.index),)`` float32 on the model's
        device (no host sync), from the decoder's watermark view of the same decoded images; None
        while the filter is off. Padded like :meth:`forward`; bf16 where the CLIP tower is."""
        if not self.watermark_on:
            return None
        self.setup()
        assert self._watermark is not None
        (view,) = batch.views  # the one extra preprocessing setup() asked the decoder for
        n = int(view.shape[0])
        bf16 = self._autocast_dtype() is not None
        return watermark_probabilities(self._watermark, self._model_batch(view, fixed), bf16=bf16)[:n]

    def _forward_eager(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self._loaded is not None
        x = normalize_batch(pixels, self._loaded.preprocess)
        amp_dtype = self._autocast_dtype()
        autocast = torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            features = self._loaded.model.encode_image(x)
        return torch.nn.functional.normalize(features.float(), dim=-1).to(torch.float16)

    def embed_images(self, images: list[bytes | None]) -> tuple[np.ndarray, list[str | None]]:
        """Embeddings ``(n, D)`` float16, L2-normalised, NaN rows where ``errors[i]`` is set.

        ``errors[i]`` is ``"undecodable: <reason>"`` for an image that could not be decoded.
        """
        embeddings, errors, _ = self.embed_and_score(images)
        return embeddings, errors

    def embed_and_score(self, images: list[bytes | None]) -> tuple[np.ndarray, list[str | None], np.ndarray | None]:
        """:meth:`embed_images`, and P(watermark) per image (float32, NaN where not decoded) from
        the same decode while the watermark filter is on (else None)."""
        self.setup()
        assert self._loaded is not None and self._decoder is not None
        out = np.full((len(images), self.embed_dim), np.nan, dtype=np.float16)
        scores = np.full(len(images), np.nan, dtype=np.float32) if self.watermark_on else None
        errors: list[str | None] = [None] * len(images)
        pending: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.config.batch_size):
                chunk = images[start : start + self.config.batch_size]
                batch = self._decoder.decode(chunk)
                for j, err in enumerate(batch.errors):
                    if err is not None:
                        errors[start + j] = f"undecodable: {err}"
                if not batch.index:
                    continue
                # Kept on device until the end so the next batch decodes while this one computes.
                pending.append(([start + i for i in batch.index], self.forward(batch.pixels),
                                self.watermark_scores(batch)))
        for rows, features, watermark in pending:
            out[rows] = features.cpu().numpy()
            if scores is not None and watermark is not None:
                scores[rows] = watermark.cpu().numpy()
        return out, errors, scores

    def corpus_skip(self, store: Any, index: pa.Table) -> np.ndarray | None:
        """Rows of ``index`` the run's corpus pre-check marked (None without a corpus)."""
        if not self.config.corpus:
            return None
        from winnow.stages.corpus_matches import pre_outcomes

        out = pre_outcomes(store, index.column("record_id").to_numpy(), which="pre")
        return None if out is None else out != ""

    def build_table(
        self, record_ids: pa.Array, keys: pa.Array, embeddings: np.ndarray, errors: list[str | None],
        rows: np.ndarray | None = None, *, watermark: np.ndarray | None = None,
    ) -> pa.Table:
        """The stage's output table from embeddings (NaN rows where ``errors`` is set).

        With ``rows``, ``embeddings`` and ``errors`` are those of the records at these positions
        only (:func:`~winnow.data.reader.embedded_rows`); every other record (an exact duplicate) gets a null
        embedding and a null error. ``watermark``: P(watermark) of the same records as
        ``embeddings``, while the filter is on (null where the embedding is null, or NaN).
        """
        null = np.array([e is not None for e in errors], dtype=bool)
        if self.watermark_on and watermark is None:
            watermark = np.full(len(errors), np.nan, dtype=np.float32)
        if rows is not None:
            full = np.zeros((len(record_ids), self.embed_dim), dtype=np.float16)
            full[rows] = embeddings
            full_errors: list[str | None] = [None] * len(record_ids)
            for row, err in zip(rows.tolist(), errors):
                full_errors[row] = err
            full_null = np.ones(len(record_ids), dtype=bool)
            full_null[rows] = null
            if watermark is not None:
                full_watermark = np.full(len(record_ids), np.nan, dtype=np.float32)
                full_watermark[rows] = watermark
                watermark = full_watermark
            embeddings, errors, null = full, full_errors, full_null
        values = pa.array(embeddings.reshape(-1), type=pa.float16())
        column = pa.FixedSizeListArray.from_arrays(values, self.embed_dim, mask=pa.array(null))
        assert column.type == embedding_type(self.embed_dim)
        columns = [record_ids, keys, column, pa.array(errors, type=pa.string())]
        if self.watermark_on:
            scores = np.asarray(watermark, dtype=np.float32)
            columns.append(pa.array(scores, type=pa.float32(), mask=null | np.isnan(scores)))
        return pa.Table.from_arrays(columns, schema=self.output_schema())

    def row_group_pipeline(self) -> Any:
        """The fused, pipelined worker over many row groups (one per set-up stage)."""
        from winnow.stages.embed_worker import EmbedPipeline

        self.setup()
        if self._pipeline is None:
            self._pipeline = EmbedPipeline(self)
        return self._pipeline

    def embed_table(
        self, record_ids: pa.Array, keys: pa.Array, images: list[bytes | None], rows: np.ndarray | None = None
    ) -> pa.Table:
        """The stage's output table for these records (``images`` of the rows at ``rows`` only,
        when given: see :meth:`build_table`)."""
        embeddings, errors, watermark = self.embed_and_score(images)
        return self.build_table(record_ids, keys, embeddings, errors, rows, watermark=watermark)

    def process(self, task: RowGroupTask) -> pa.Table:
        store = task.store()
        index = store.read_table("index", task.partition, task.row_group)
        images, rows = read_images(index, self.config.before_decode, storage=task.storage,
                                   skip=self.corpus_skip(store, index))
        table = self.embed_table(index.column("record_id").combine_chunks(), index.column("key").combine_chunks(),
                                 images, rows)
        undecodable = table.num_rows - table.column("error").null_count
        if undecodable:
            logger.info("embed row group %d: %d of %d images undecodable", task.row_group, undecodable, table.num_rows)
        return table

