"""Score heads over CLIP image embeddings: the LAION aesthetic MLP and the LAION NSFW detector,
their weight loading, and the one stage base both the aesthetic and the nsfw stage are built on.

Weights come from local files only: ``.safetensors``, or a torch ``.pt``/``.pth`` state dict read
with ``weights_only=True`` (no pickled code runs). Random weights are for tests and demos and are
refused unless asked for explicitly.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from winnow.checks import check, int_problem
from winnow.exceptions import ConfigError, HeadError
from winnow.rowgroups.task import RowGroupTask
from winnow.stages.device import device_problem, resolve_device
from winnow.stages.embedding_io import embedding_matrix

log = logging.getLogger(__name__)

#: Embedding width of ViT-L/14, the model both published heads were trained on.
VIT_L14_DIM = 768



@dataclass(frozen=True)
class HeadKind:
    """One head, declared by its stage module: its name (the stage's), its architecture, the
    param naming its weights file, and its random stand-in (for tests and demos).

    :param seed: seed of the random stand-in weights (one per head, so two heads differ).
    :param target: mean pre-activation output of the random stand-in on isotropic unit vectors.
    """

    name: str
    module: type[nn.Module]
    weights_param: str
    seed: int
    target: float


# Rows scored per forward pass: bounds the activations (rows x 1024 floats) of a big row group.
_BATCH_ROWS = 65536


class AestheticMLP(nn.Module):
    """LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor).

    Input: L2-normalised ViT-L/14 image embeddings (768-d). Output: one score per image on
    roughly a 1-10 scale (the AVA mean-opinion scale it was trained on; ~5 is average, >= 6
    is the usual cut for an aesthetic image). The published model has no activations between its linear
    layers, so neither has this one; dropout acts only in training (``eval()`` turns it off).
    State-dict keys match the published ``sac+logos+ava1-l14-linearMSE.pth``:
    ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, embed_dim: int = VIT_L14_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class KerasNormalization(nn.Module):
    """Keras ``Normalization`` layer: ``(x - mean) / max(sqrt(variance), 1e-7)``, fixed stats."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.variance).clamp_min(1e-7)


class NsfwHead(nn.Module):
    """LAION CLIP-based NSFW detector (LAION-AI/CLIP-based-NSFW-Detector, the ViT-L/14 model).

    768-d L2-normalised embedding -> Keras-style normalization -> Dense 64 ReLU -> Dense 512 ReLU
    -> Dense 256 ReLU -> Dense 1 sigmoid. Output: probability in [0, 1] that the image is NSFW.

    Expected state-dict keys (torch layout, ``weight`` is ``(out, in)``)::

        norm.mean, norm.variance                    (768,)
        layers.0.weight (64, 768),   layers.0.bias (64,)
        layers.2.weight (512, 64),   layers.2.bias (512,)
        layers.4.weight (256, 512),  layers.4.bias (256,)
        layers.6.weight (1, 256),    layers.6.bias (1,)

    The published model is a Keras (autokeras) model; :func:`nsfw_state_dict_from_keras` turns
    its ``model.get_weights()`` list into this state dict (save it with
    ``safetensors.torch.save_file``).
    """

    def __init__(self, embed_dim: int = VIT_L14_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.norm = KerasNormalization(embed_dim)
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 64),
            nn.ReLU(),
            nn.Linear(64, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(self.norm(x))).squeeze(-1)


def nsfw_state_dict_from_keras(weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Convert the Keras NSFW detector's ``model.get_weights()`` to :class:`NsfwHead` keys.

    The list is, in layer order: normalization mean, variance (and, in newer Keras, a scalar
    count, which is dropped), then kernel and bias of the four Dense layers. Keras kernels are
    ``(in, out)``; torch ``Linear.weight`` is ``(out, in)``, hence the transposes.
    """
    arrays = [np.asarray(w) for w in weights]
    if len(arrays) == 11 and arrays[2].size == 1:
        arrays = arrays[:2] + arrays[3:]
    if len(arrays) != 10:
        raise HeadError(
            f"expected 10 Keras weight arrays (mean, variance, 4 x kernel+bias), got {len(arrays)}; "
            "pass the list from model.get_weights() of the ViT-L/14 NSFW detector"
        )
    state = {
        "norm.mean": torch.from_numpy(arrays[0].reshape(-1).astype(np.float32)),
        "norm.variance": torch.from_numpy(arrays[1].reshape(-1).astype(np.float32)),
    }
    for i, layer in enumerate((0, 2, 4, 6)):
        kernel, bias = arrays[2 + 2 * i], arrays[3 + 2 * i]
        state[f"layers.{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T, dtype=np.float32))
        state[f"layers.{layer}.bias"] = torch.from_numpy(bias.reshape(-1).astype(np.float32))
    return state


def weights_digest(kind: HeadKind, weights: str | None, *, allow_random_weights: bool) -> str:
    """What identifies a head's weights in a stage fingerprint: ``sha256:<hex>`` of the file,
    or ``random-seed<k>``. Raises :class:`HeadError` for a missing file or unasked-for random
    weights, so a misconfigured run fails before any row group is touched."""
    if weights is None:
        if not allow_random_weights:
            raise HeadError(
                f"no weights given for the {kind.name} head (param '{kind.weights_param}'). Point it at a "
                f"local .safetensors/.pt file of the published LAION {kind.name} head, or set "
                "allow_random_weights=true for a test or demo run (scores are then meaningless)."
            )
        return f"random-seed{kind.seed}"
    if not os.path.isfile(weights):
        raise HeadError(
            f"{kind.name} head weights not found: {weights} (param '{kind.weights_param}') is not a file. "
            "Give the path of a local .safetensors, .pt or .pth file."
        )
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _read_state_dict(kind: HeadKind, path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        elif path.endswith((".pt", ".pth", ".bin")):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise HeadError(
                f"{kind.name} head weights {path} (param '{kind.weights_param}'): unknown file type; use "
                ".safetensors, .pt or .pth"
            )
    except HeadError:
        raise
    except Exception as exc:  # a corrupt file surfaces as many different exception types
        raise HeadError(f"could not read {kind.name} head weights {path}: {exc}") from exc
    # Some checkpoints wrap the state dict, e.g. {"state_dict": {...}}.
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadError(f"{kind.name} head weights {path} hold no tensor state dict")
    return state


def _pre_activation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last linear layer's output: the score itself, or the NSFW logit before the sigmoid."""
    return module.layers(module.norm(x) if isinstance(module, NsfwHead) else x).squeeze(-1)


def _random_head(kind: HeadKind, embed_dim: int) -> nn.Module:
    # A private RNG state, so the weights depend on the seed only, not on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(kind.seed)
        module = kind.module(embed_dim)
    module.eval()
    # Put the untrained output in the head's usual range, so a demo with thresholds near the
    # targets shows both outcomes: on seeded isotropic unit vectors the pre-activation output
    # gets mean kind.target and std 1 (aesthetic ~ 5 +- 1; nsfw logit -1.5, p ~ 0.18).
    # Only the last linear layer is rescaled, so the head's layout stays the published one.
    probe = torch.randn(4096, embed_dim, generator=torch.Generator().manual_seed(kind.seed))
    probe = nn.functional.normalize(probe, dim=1)
    last = module.layers[-1]
    with torch.no_grad():
        raw = _pre_activation(module, probe)
        last.weight.div_(raw.std().clamp_min(1e-12))
        last.bias.zero_()
        last.bias.add_(kind.target - _pre_activation(module, probe).mean())
    return module


def _check_width(kind: HeadKind, weights: str, state: dict[str, torch.Tensor], *, model: str, embed_dim: int) -> None:
    first = state.get("layers.0.weight")
    if first is not None and first.ndim == 2 and first.shape[1] != embed_dim:
        raise HeadError(
            f"{kind.name} head weights {weights} expect {first.shape[1]}-d embeddings but {model} "
            f"gives {embed_dim}-d ones. Use head weights trained on this model's embeddings, or "
            f"the model they were trained on (ViT-L-14-quickgelu for the published LAION heads, "
            f"{VIT_L14_DIM}-d)."
        )


def check_head_width(kind: HeadKind, weights: str, *, model: str, embed_dim: int) -> None:
    """Raise :class:`HeadError` naming the model, its width and the head file when the head's
    weights were trained on embeddings of another width: checked before any row group runs."""
    _check_width(kind, weights, _read_state_dict(kind, weights), model=f"model {model!r}", embed_dim=embed_dim)


def load_head(
    kind: HeadKind,
    weights: str | None,
    *,
    embed_dim: int,
    allow_random_weights: bool,
    device: str | torch.device = "auto",
) -> tuple[nn.Module, str]:
    """Build a head in eval mode on ``device``; returns ``(module, weights_digest)``.

    Raises :class:`HeadError` when the file is missing or unreadable, its tensors do not match
    the head's layout, or it was trained on embeddings of another width than ``embed_dim``.
    """
    digest = weights_digest(kind, weights, allow_random_weights=allow_random_weights)
    if weights is None:
        log.warning(
            "%s head: using RANDOM weights (seed %d) because allow_random_weights is set; its "
            "scores mean nothing. Give real weights for a production run.",
            kind.name, kind.seed,
        )
        module = _random_head(kind, embed_dim)
    else:
        state = _read_state_dict(kind, weights)
        _check_width(kind, weights, state, model="the embedding model", embed_dim=embed_dim)
        module = kind.module(embed_dim)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise HeadError(
                f"{kind.name} head weights {weights} do not fit the {type(module).__name__} layout: "
                f"missing keys {missing}, unexpected keys {unexpected}, wrong shapes "
                f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong]}. "
                "See the docstring of winnow.stages.heads for the expected keys."
            )
        module.load_state_dict({k: v.float() for k, v in state.items()})
    module.eval()
    return module.to(resolve_device(device)), digest


@torch.inference_mode()
def score_embeddings(module: nn.Module, matrix: np.ndarray) -> np.ndarray:
    """Scores (float32) of an ``(n, d)`` embedding matrix, re-normalised in float32 first
    (stored embeddings are float16, so their norm is 1 only to ~1e-3)."""
    device = next(module.parameters()).device
    out = np.empty(len(matrix), dtype=np.float32)
    for start in range(0, len(matrix), _BATCH_ROWS):
        x = torch.from_numpy(np.array(matrix[start : start + _BATCH_ROWS], dtype=np.float32))
        x = nn.functional.normalize(x.to(device), dim=-1)
        out[start : start + len(x)] = module(x).float().cpu().numpy()
    return out


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Knobs shared by both head stages. A head only scores: the threshold that turns a score
    into a keep decision is the ``thresholds`` step's (:mod:`winnow.stages.thresholds`), so
    changing it never recomputes a score.

    ``embed_dim`` is the embedding model's width (the pipeline passes the model's own).
    """

    head: ClassVar[HeadKind]

    weights: str | None = None
    allow_random_weights: bool = False
    device: str = "auto"
    embed_dim: int = VIT_L14_DIM
    #: the embedding model's name, for messages
    model: str = "the embedding model"

    def __post_init__(self) -> None:
        # allow_random_weights is the run's flag, checked once by ``CurationConfig.validate``.
        check(int_problem("embed_dim", self.embed_dim, low=1), device_problem(self.device))

    @classmethod
    def for_run(cls, run: Any) -> HeadConfig:
        """The config from a run's ``CurationConfig``: its weights param, random-weights flag and
        the embedding model's width. A weights param that is unset (without
        ``allow_random_weights``) or names no file is a :class:`ConfigError` naming the param,
        raised before the model is resolved, so it is reported even when the model is wrong."""
        param = cls.head.weights_param
        path = getattr(run, param)
        if path is None and not run.allow_random_weights:
            raise ConfigError(f"{param} is not set: give the path of the head's weights file, or set "
                              "allow_random_weights=true for a test run (scores are then meaningless)")
        if path is not None and "://" not in path and not os.path.isfile(path):
            raise ConfigError(f"{param}: no such file {path!r}")
        return cls(weights=path, allow_random_weights=run.allow_random_weights, embed_dim=run.model_spec.embed_dim,
                   model=run.model)

    def file_problems(self) -> list[str]:
        """What is wrong with the weights file for this model (its embedding width), checked
        before a run starts (the pipeline's ``validate`` asks every stage config that has this
        method)."""
        param, path = self.head.weights_param, self.weights
        if path is None:
            return []
        try:
            check_head_width(self.head, path, model=self.model, embed_dim=self.embed_dim)
        except HeadError as exc:
            return [f"{param}: {exc}"]
        return []


class HeadStage:
    """A stage that scores each record's embedding with a head.

    Subclasses set ``name`` (the stage's) and ``schema``; their config class names the head
    (:class:`HeadKind`). Records without an embedding
    (undecodable, exact duplicates) get a null score.
    """

    name: ClassVar[str]
    schema: ClassVar[pa.Schema]

    def __init__(self, config: HeadConfig) -> None:
        self.config = config
        self._module: nn.Module | None = None

    def fingerprint_config(self) -> dict[str, Any]:
        c = self.config
        return {"weights_digest": weights_digest(c.head, c.weights, allow_random_weights=c.allow_random_weights)}

    def on_cpu(self) -> HeadStage:
        """This stage with its head on the CPU (a partition the runner computes in the calling
        process: no GPU context there); same weights, same fingerprint."""
        from dataclasses import replace

        return type(self)(replace(self.config, device="cpu"))

    def setup(self) -> None:
        c = self.config
        self._module, _ = load_head(
            c.head, c.weights, embed_dim=c.embed_dim,
            allow_random_weights=c.allow_random_weights, device=c.device,
        )

    def process(self, task: RowGroupTask) -> pa.Table:
        if self._module is None:
            self.setup()
        table = task.store().read_table("embed", task.partition, task.row_group, columns=["record_id", "embedding"])
        valid, matrix = embedding_matrix(
            table.column("embedding"), expected_dim=self.config.embed_dim,
            where=f"stage 'embed' row group {task.row_group}",
        )
        scores = np.full(table.num_rows, np.nan, dtype=np.float32)
        if len(matrix):
            scores[valid] = score_embeddings(self._module, matrix)
        return pa.table(
            {
                "record_id": table.column("record_id").combine_chunks(),
                self.schema.names[1]: pa.array(scores, type=pa.float32(), mask=~valid),
            },
            schema=self.schema,
        )
