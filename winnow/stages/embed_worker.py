"""The fused embed worker: inside the one worker that holds the model, shard reads, decode, the
model and Parquet commits overlap over many row groups, so the GPU does not wait between them.

Four threads, joined by bounded queues (a slow step holds the others back, memory stays bounded):

    read pool (``read_ahead`` row groups at once)  ranged reads of the next row groups' image bytes
    decode thread                                  cuts the record stream into batches and decodes
    model loop (the caller's thread)               model on batch k while batch k+1 decodes
    writer thread                                  embeddings from pinned host memory into each row
                                                   group's table; commits it when it is complete

On a GPU (or compiled) every model call sees exactly ``batch_size`` images: batches run across
row-group boundaries and only the very last one is padded. On a CPU in eager mode batches stop
at row-group boundaries and are not padded, exactly as :meth:`EmbedStage.embed_images` cuts them,
so the output is bit-identical to the per-row-group stage. Either way a row group commits as one
file, and one that fails (a read, a decode or model error on its rows, its commit) fails alone.

Exact duplicates (index ``exact_duplicate_of`` set) are not read, decoded nor embedded: the record
stream holds the other rows only (:func:`winnow.data.reader.read_images`), and each row group's
table gets a null embedding and a null error at a duplicate's row when it is committed.

While the watermark filter is on, the model loop runs the watermark detector on each batch too,
on the decoder's watermark view of the same decoded images (nothing is decoded twice); its
scores travel with the embeddings (host buffers, scatter, commit).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import torch

from winnow.data.reader import read_images
from winnow.results import RowGroupResult
from winnow.rowgroups.task import RowGroupTask
from winnow.stages.decode import BatchDecoder, DecodedBatch

logger = logging.getLogger(__name__)

#: Decoded batches waiting for the model (each is batch_size x H x W x 3 uint8).
DECODE_AHEAD = 2
#: Pinned host buffers for embeddings in flight between the model and the writer.
HOST_BUFFERS = 4


@dataclass
class PipelineStats:
    """Where the worker's time went, summed over every :meth:`EmbedPipeline.run` call.

    ``model_gpu_seconds`` is CUDA-event time of the model calls (0 on CPU); ``model_seconds`` is
    the host time of the model loop's calls (on CPU: the compute). ``model_wait_seconds`` is time
    the model loop waited for a decoded batch (the model starved); ``read_wait_seconds`` is time
    the decode thread waited for reads.
    """

    runs: int = 0
    row_groups: int = 0
    images: int = 0
    batches: int = 0
    padded_slots: int = 0
    wall_seconds: float = 0.0
    read_wait_seconds: float = 0.0
    decode_seconds: float = 0.0
    model_wait_seconds: float = 0.0
    model_seconds: float = 0.0
    model_gpu_seconds: float = 0.0
    commit_seconds: float = 0.0

    @property
    def gpu_busy(self) -> float | None:
        """Fraction of wall time the GPU spent in model calls (None on CPU)."""
        if self.model_gpu_seconds <= 0 or self.wall_seconds <= 0:
            return None
        return self.model_gpu_seconds / self.wall_seconds

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu_busy"] = self.gpu_busy
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


#: One slot of the host ring: embeddings (batch_size, D) float16 and, while the watermark filter
#: is on, P(watermark) (batch_size,) float32.
_HostBuffer = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(eq=False)
class _RowGroup:
    task: RowGroupTask
    t0: float
    record_ids: pa.Array | None = None
    keys: pa.Array | None = None
    embeddings: np.ndarray | None = None  # of the embedded rows only
    watermark: np.ndarray | None = None  # P(watermark) of the embedded rows (filter on only)
    errors: list[str | None] = field(default_factory=list)  # of the embedded rows only
    rows: np.ndarray | None = None  # positions of the embedded rows in the row group (None: all)
    failed: bool = False


@dataclass(eq=False)
class _Batch:
    segments: list[tuple[_RowGroup, int, int]]  # (row group, its first row here, rows)
    decoded: DecodedBatch


@dataclass(eq=False)
class _Features:
    batch: _Batch
    host: torch.Tensor | np.ndarray | None  # (len(decoded.index), D) float16
    scores: torch.Tensor | np.ndarray | None = None  # (len(decoded.index),) float32 P(watermark)
    buffer: _HostBuffer | None = None  # pinned buffers to hand back once read
    ready: Any = None  # CUDA event after the device-to-host copy
    span: tuple[Any, Any] | None = None  # CUDA events around the model call


_DONE = object()


class FusedStage(Protocol):
    """What the fused worker needs of its stage, :class:`~winnow.stages.embed.EmbedStage` (which
    builds the worker in ``row_group_pipeline()``: the worker names the stage's interface here
    instead of importing the stage)."""

    name: ClassVar[str]
    config: Any  # its ``read_ahead`` and ``batch_size``

    @property
    def device(self) -> torch.device: ...

    @property
    def fixed_batches(self) -> bool: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def decoder(self) -> BatchDecoder: ...

    @property
    def watermark_on(self) -> bool: ...

    def setup(self) -> None: ...

    def forward(self, pixels: torch.Tensor, *, fixed: bool | None = None) -> torch.Tensor: ...

    def watermark_scores(self, batch: DecodedBatch, *, fixed: bool | None = None) -> torch.Tensor | None: ...

    def build_table(self, record_ids: pa.Array, keys: pa.Array, embeddings: np.ndarray, errors: list[str | None],
                    rows: np.ndarray | None = None, *, watermark: np.ndarray | None = None) -> pa.Table: ...


class EmbedPipeline:
    """Runs an :class:`EmbedStage` over many row groups with reads, decode, model and commits
    overlapped. One per set-up stage (``stage.row_group_pipeline()``); not re-entrant.

    :param stage: the embed stage (set up here if it is not yet).
    :param read_ahead: row groups read ahead of the decoder, all at once (default: the stage's
        ``read_ahead``).
    :param fixed_batches: batches of exactly ``batch_size`` across row groups, the last padded
        (default: the stage's :attr:`~EmbedStage.fixed_batches`: on a GPU or compiled).
    """

    def __init__(
        self, stage: FusedStage, *, read_ahead: int | None = None, fixed_batches: bool | None = None
    ) -> None:
        stage.setup()
        self.stage = stage
        self.read_ahead = read_ahead or stage.config.read_ahead
        self.batch_size = stage.config.batch_size
        self.device = stage.device
        self.fixed_batches = stage.fixed_batches if fixed_batches is None else fixed_batches
        self.stats = PipelineStats()
        # A ring of host buffers for fixed batches: pinned on CUDA so the device-to-host copy is
        # asynchronous; plain on CPU (the same hand-back logic, which the CPU tests exercise).
        self._buffers: queue.Queue[_HostBuffer] | None = None
        if self.fixed_batches:
            self._buffers = queue.Queue()
            pin = self.device.type == "cuda"
            for _ in range(HOST_BUFFERS):
                self._buffers.put((
                    torch.empty((self.batch_size, stage.embed_dim), dtype=torch.float16, pin_memory=pin),
                    torch.empty((self.batch_size,), dtype=torch.float32, pin_memory=pin) if stage.watermark_on else None,
                ))

    # ---- public ---------------------------------------------------------------------------

    def run(
        self, tasks: Sequence[RowGroupTask], commit: Callable[[RowGroupTask, pa.Table], None]
    ) -> Iterator[RowGroupResult]:
        """Embed and commit every row group of ``tasks``; yields one :class:`~winnow.results.RowGroupResult` per row
        group in the order they finish. ``commit(task, table)`` runs on the writer thread (it may raise: that
        row group fails, the others go on). Never raises for a row group's failure."""
        if not tasks:
            return
        t0 = time.perf_counter()
        self.stats.runs += 1
        decoded_q: queue.Queue = queue.Queue(maxsize=DECODE_AHEAD)
        write_q: queue.Queue = queue.Queue(maxsize=DECODE_AHEAD + HOST_BUFFERS)
        outcomes: queue.Queue[RowGroupResult] = queue.Queue()
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(list(tasks), decoded_q, stop), name="winnow-embed-decode", daemon=True
        )
        writer = threading.Thread(
            target=self._write, args=(write_q, outcomes, commit), name="winnow-embed-writer", daemon=True
        )
        producer.start()
        writer.start()
        reported: set[int] = set()
        writer_done = False
        try:
            while True:
                t_wait = time.perf_counter()
                msg = decoded_q.get()
                self.stats.model_wait_seconds += time.perf_counter() - t_wait
                if msg is _DONE:
                    break
                if isinstance(msg, _Batch):
                    for item in self._model(msg):
                        write_q.put(item)
                else:
                    write_q.put(msg)
                yield from self._drain(outcomes, reported)
            write_q.put(_DONE)
            writer_done = True
            while writer.is_alive() or not outcomes.empty():
                try:
                    outcome = outcomes.get(timeout=0.1)
                except queue.Empty:
                    continue
                reported.add(outcome.row_group)
                yield outcome
        except Exception as exc:  # noqa: BLE001 - the loop itself broke: fail what is left, alone
            logger.exception("embed pipeline stopped")
            stop.set()
            self._stop_threads(decoded_q, write_q, producer, writer, writer_done)
            yield from self._drain(outcomes, reported)
            for task in tasks:
                if task.row_group not in reported:
                    yield RowGroupResult.from_error(self.stage.name, task.row_group, task.num_records, exc,
                                                    time.perf_counter() - t0)
            return
        finally:
            if producer.is_alive() or writer.is_alive():  # closed early (GeneratorExit) or failed
                stop.set()
                self._stop_threads(decoded_q, write_q, producer, writer, writer_done)
            self.stats.wall_seconds += time.perf_counter() - t0

    # ---- threads --------------------------------------------------------------------------

    @staticmethod
    def _drain(outcomes: queue.Queue, reported: set[int]) -> Iterator[RowGroupResult]:
        while True:
            try:
                outcome = outcomes.get_nowait()
            except queue.Empty:
                return
            reported.add(outcome.row_group)
            yield outcome

    @staticmethod
    def _stop_threads(decoded_q: queue.Queue, write_q: queue.Queue, producer, writer, writer_done: bool) -> None:
        while producer.is_alive():  # unblock a producer stuck on a full queue
            try:
                decoded_q.get(timeout=0.05)
            except queue.Empty:
                pass
        if not writer_done:
            write_q.put(_DONE)
        writer.join(timeout=60)

    def _read(self, task: RowGroupTask) -> tuple[pa.Table, list[bytes | None], np.ndarray | None]:
        store = task.store()
        index = store.read_table("index", task.partition, task.row_group)
        return index, *read_images(index, self.stage.config.before_decode, storage=task.storage,
                                   skip=self.stage.corpus_skip(store, index))

    def _produce(self, tasks: list[RowGroupTask], out: queue.Queue, stop: threading.Event) -> None:
        """Decode thread: reads run ahead on a pool; records are cut into batches and decoded."""

        def put(msg: Any) -> None:
            while not stop.is_set():
                try:
                    out.put(msg, timeout=0.1)
                    return
                except queue.Full:
                    continue

        pending: deque[tuple[RowGroupTask, float, Future]] = deque()
        todo = iter(tasks)
        segments: list[tuple[_RowGroup, int, int]] = []
        images: list[bytes | None] = []
        ending: list[_RowGroup] = []  # row groups whose last rows sit in the open batch

        def submit_next(pool: ThreadPoolExecutor) -> None:
            task = next(todo, None)
            if task is not None:
                pending.append((task, time.perf_counter(), pool.submit(self._read, task)))

        def emit() -> None:
            if images:
                for msg in self._decode(segments, images):
                    put(msg)
            for rg in ending:
                put(("end", rg))
            segments.clear()
            images.clear()
            ending.clear()

        try:
            with ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="winnow-embed-read") as pool:
                for _ in range(self.read_ahead):
                    submit_next(pool)
                while pending and not stop.is_set():
                    task, t0, future = pending.popleft()
                    t_wait = time.perf_counter()
                    try:
                        index, data, rows = future.result()
                    except Exception as exc:  # noqa: BLE001 - this row group fails, alone
                        put(("fail", _RowGroup(task, t0), exc))
                        submit_next(pool)
                        continue
                    finally:
                        self.stats.read_wait_seconds += time.perf_counter() - t_wait
                    submit_next(pool)
                    n = len(data)
                    rg = _RowGroup(
                        task, t0,
                        record_ids=index.column("record_id").combine_chunks(),
                        keys=index.column("key").combine_chunks(),
                        embeddings=np.full((n, self.stage.embed_dim), np.nan, dtype=np.float16),
                        watermark=np.full(n, np.nan, dtype=np.float32) if self.stage.watermark_on else None,
                        errors=[None] * n,
                        rows=rows,
                    )
                    pos = 0
                    while pos < n:
                        take = min(self.batch_size - len(images), n - pos)
                        segments.append((rg, pos, take))
                        images.extend(data[pos : pos + take])
                        pos += take
                        if len(images) == self.batch_size:
                            emit()
                    ending.append(rg)
                    if not self.fixed_batches or not images:
                        emit()
                emit()  # the last, partial batch (padded by the model on a GPU)
                put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - never leave the model loop waiting
            logger.exception("embed decode thread failed")
            for rg in {id(s[0]): s[0] for s in segments}.values():
                put(("fail", rg, exc))
            put(_DONE)

    def _decode(self, segments: list[tuple[_RowGroup, int, int]], images: list[bytes | None]) -> list[Any]:
        """A decoded batch; on a batch-level error, each row group's part is retried alone so
        only the row group whose rows break the decoder fails."""
        decoder = self.stage.decoder
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                return [_Batch(list(segments), decoder.decode(list(images)))]
        except Exception as exc:  # noqa: BLE001
            if len(segments) == 1:
                return [("fail", segments[0][0], exc)]
            out: list[Any] = []
            offset = 0
            for seg in segments:
                out += self._decode([seg], images[offset : offset + seg[2]])
                offset += seg[2]
            return out
        finally:
            self.stats.decode_seconds += time.perf_counter() - t0

    def _model(self, batch: _Batch) -> list[Any]:
        """Model loop: one forward per batch; results go to host memory without blocking."""
        decoded = batch.decoded
        n = len(decoded.index)
        self.stats.batches += 1
        self.stats.images += sum(s[2] for s in batch.segments)
        if n == 0:
            return [_Features(batch, None)]
        t0 = time.perf_counter()
        try:
            pixels = decoded.pixels
            for t in (pixels, *decoded.views):
                if t.is_cuda:
                    # Made on the decode thread's stream; tell the allocator this stream uses it too.
                    t.record_stream(torch.cuda.current_stream(t.device))
            span = None
            if self.device.type == "cuda":
                span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                span[0].record()
            with torch.inference_mode():
                features = self.stage.forward(pixels, fixed=self.fixed_batches)
                # The watermark detector on the same decoded images (None while its filter is off).
                scores = self.stage.watermark_scores(decoded, fixed=self.fixed_batches)
            if self.fixed_batches:
                self.stats.padded_slots += self.batch_size - n
            if self._buffers is None:
                return [_Features(batch, features.numpy(), None if scores is None else scores.numpy())]
            buffer = self._buffers.get()  # back-pressure: the writer hands buffers back
            try:
                buffer[0][:n].copy_(features, non_blocking=True)
                if scores is not None:
                    assert buffer[1] is not None
                    buffer[1][:n].copy_(scores, non_blocking=True)
            except BaseException:
                self._buffers.put(buffer)
                raise
            ready = None
            if span is not None:
                span[1].record()
                ready = torch.cuda.Event()
                ready.record()
            host_scores = buffer[1][:n] if scores is not None and buffer[1] is not None else None
            return [_Features(batch, buffer[0][:n], host_scores, buffer=buffer, ready=ready, span=span)]
        except Exception as exc:  # noqa: BLE001
            if len(batch.segments) == 1:
                return [("fail", batch.segments[0][0], exc)]
            logger.warning("embed model failed a batch of %d row groups (%s); retrying each alone", len(batch.segments), exc)
            return [item for part in _split(batch) for item in self._model(part)]
        finally:
            self.stats.model_seconds += time.perf_counter() - t0

    def _write(self, inbox: queue.Queue, outcomes: queue.Queue, commit: Callable[[RowGroupTask, pa.Table], None]) -> None:
        """Writer thread: scatter embeddings into row groups; commit each one when complete."""
        while True:
            msg = inbox.get()
            if msg is _DONE:
                return
            try:
                if isinstance(msg, _Features):
                    self._scatter(msg)
                elif msg[0] == "fail":
                    _, rg, exc = msg
                    if not rg.failed:
                        rg.failed = True
                        outcomes.put(self._failed(rg, exc))
                else:
                    self._finish(msg[1], outcomes, commit)
            except Exception as exc:  # noqa: BLE001 - fail the row groups this message was about
                logger.exception("embed writer failed on a message")
                groups = [s[0] for s in msg.batch.segments] if isinstance(msg, _Features) else [msg[1]]
                for rg in groups:
                    if not rg.failed:
                        rg.failed = True
                        outcomes.put(self._failed(rg, exc))

    def _scatter(self, item: _Features) -> None:
        decoded = item.batch.decoded
        try:
            if item.ready is not None:
                item.ready.synchronize()
                start, end = item.span
                self.stats.model_gpu_seconds += start.elapsed_time(end) / 1000.0
            # Buffers go back below, once read: copy this batch's rows out first.
            host = item.host.numpy() if isinstance(item.host, torch.Tensor) else item.host
            scores = item.scores.numpy() if isinstance(item.scores, torch.Tensor) else item.scores
            positions = np.asarray(decoded.index, dtype=np.int64)
            offset = 0
            for rg, first, count in item.batch.segments:
                for j in range(count):
                    err = decoded.errors[offset + j]
                    if err is not None:
                        rg.errors[first + j] = f"undecodable: {err}"
                if host is not None and len(positions):
                    mine = (positions >= offset) & (positions < offset + count)
                    rg.embeddings[positions[mine] - offset + first] = host[mine]
                    if scores is not None and rg.watermark is not None:
                        rg.watermark[positions[mine] - offset + first] = scores[mine]
                offset += count
        finally:
            if item.buffer is not None:
                assert self._buffers is not None
                self._buffers.put(item.buffer)

    def _finish(self, rg: _RowGroup, outcomes: queue.Queue, commit: Callable[[RowGroupTask, pa.Table], None]) -> None:
        if rg.failed:
            return
        t0 = time.perf_counter()
        try:
            table = self.stage.build_table(rg.record_ids, rg.keys, rg.embeddings, rg.errors, rg.rows,
                                           watermark=rg.watermark)
            commit(rg.task, table)
        except Exception as exc:  # noqa: BLE001 - this row group fails, alone
            rg.failed = True
            outcomes.put(self._failed(rg, exc))
            return
        finally:
            self.stats.commit_seconds += time.perf_counter() - t0
        undecodable = sum(e is not None for e in rg.errors)
        if undecodable:
            logger.info("embed row group %d: %d of %d images undecodable", rg.task.row_group, undecodable, len(rg.errors))
        self.stats.row_groups += 1
        outcomes.put(RowGroupResult(
            row_group=rg.task.row_group, records_in=rg.task.plan.row_group_size(rg.task.row_group), records_out=table.num_rows,
            seconds=time.perf_counter() - rg.t0,
        ))
        rg.embeddings = rg.watermark = None  # the table holds the data now

    def _failed(self, rg: _RowGroup, exc: BaseException) -> RowGroupResult:
        return RowGroupResult.from_error(self.stage.name, rg.task.row_group, rg.task.num_records, exc,
                                         time.perf_counter() - rg.t0)


def _split(batch: _Batch) -> list[_Batch]:
    """One batch per row group of ``batch``, with that row group's decoded rows."""
    decoded = batch.decoded
    positions = np.asarray(decoded.index, dtype=np.int64)
    parts = []
    offset = 0
    for rg, first, count in batch.segments:
        mine = np.nonzero((positions >= offset) & (positions < offset + count))[0]
        rows = torch.as_tensor(mine, device=decoded.pixels.device)
        parts.append(_Batch(
            [(rg, first, count)],
            DecodedBatch(decoded.pixels[rows], [int(p) - offset for p in positions[mine]],
                         decoded.errors[offset : offset + count], tuple(view[rows] for view in decoded.views)),
        ))
        offset += count
    return parts
