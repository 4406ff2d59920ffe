"""open_clip image towers (embed stage) and text towers (clip_score stage): model-name and weights
resolution, loading, digests.

Weights come only from local files (a path, or a tag looked up in a model directory); nothing is
downloaded. Random weights exist for tests and are refused in a real run unless asked for.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from winnow.exceptions import ModelError

logger = logging.getLogger(__name__)

#: Folder of the model configs shipped with winnow (registered with open_clip on first use).
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: The tiny test config: a 2-layer ViT on 32x32 inputs with the 768-d output the LAION heads take.
TINY_MODEL = "winnow-tiny-vit"
#: Environment variable naming the model directory when no ``model_dir`` is given.
MODEL_DIR_ENV = "WINNOW_MODEL_DIR"
#: What ``python -m winnow.models fetch`` writes in a model directory: each file it fetched, its
#: source, revision and sha256 (``winnow.models``).
MODELS_LOCK = "winnow-models.lock.json"
#: Weight file extensions, in lookup order.
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".bin", ".pth")
#: File names open_clip / the HF hub use inside a per-tag folder, in lookup order.
HUB_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_RANDOM = re.compile(r"^random(?::(\d+))?$")
_registered = False
_register_lock = threading.Lock()


def register_model_configs() -> None:
    """Add winnow's shipped configs (``winnow-tiny-vit``) to open_clip's registry; idempotent."""
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        import open_clip

        if TINY_MODEL not in open_clip.list_models():
            open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input, as open_clip's eval transform does it."""

    size: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg["size"]
        size = int(size) if isinstance(size, int) else tuple(int(s) for s in size)
        if isinstance(size, tuple) and size[0] == size[1]:
            size = size[0]
        return cls(
            size=size,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    @property
    def height_width(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else self.size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.height_width)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A model name and weights that were checked to be loadable, without building the model."""

    model_name: str
    pretrained: str
    weights_path: str | None  # None only for random weights
    random_seed: int | None
    embed_dim: int
    preprocess: PreprocessConfig

    @property
    def is_random(self) -> bool:
        return self.weights_path is None

    def weights_digest(self) -> str:
        """sha256 of the weights file (cached per path, size and mtime), or ``random-seed<k>``."""
        if self.weights_path is None:
            return f"random-seed{self.random_seed}"
        return file_sha256(self.weights_path)


class ImageTower(nn.Module):
    """The image half of a CLIP model; the text tower is dropped to save memory."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


@dataclass
class LoadedModel:
    """An image tower ready for ``encode_image``, with what produced it."""

    model: ImageTower
    preprocess: PreprocessConfig
    embed_dim: int
    weights_digest: str
    spec: ModelSpec = field(repr=False)


_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def sha256_hex(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 4 MiB blocks (no cache: :func:`file_sha256` caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 hex of a file; cached per (path, size, mtime) so a model is hashed once per process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    digest = f"sha256:{sha256_hex(path)}"
    with _digest_lock:
        _digest_cache[key] = digest
    return digest


#: What ``merge_preprocess_dict(PreprocessCfg(), {})`` gives (open_clip's eval defaults: OpenAI's
#: mean and std), for a check that runs before open_clip is imported; a test holds it equal.
OPEN_CLIP_PREPROCESS_DEFAULTS: dict[str, Any] = {
    "size": 224, "mode": "RGB", "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711), "interpolation": "bicubic", "resize_mode": "shortest",
    "fill_color": 0,
}


def _open_clip_loaded() -> bool:
    import sys

    return "open_clip" in sys.modules


def _open_clip_dirs() -> list[Path]:
    """The open_clip package's folders, found without running the package."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    return [Path(loc).absolute() for loc in (spec.submodule_search_locations or [])] if spec is not None else []


def _model_config_file(model_name: str) -> dict[str, Any] | None:
    """A plain model name's config read from the JSON files open_clip would register (winnow's
    shipped configs, then open_clip's own ``model_configs``), without importing open_clip: its
    import (torchvision, torch._dynamo) costs seconds, and a run's driver, every Airflow task and
    every resume check the model before anything else. None: not a plain name or no file (the
    caller asks open_clip, which also knows configs registered at run time)."""
    import json

    if not re.fullmatch(r"[\w.+-]+", model_name):
        return None
    for folder in (MODEL_CONFIG_DIR, *(d / "model_configs" for d in _open_clip_dirs())):
        path = folder / f"{model_name}.json"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                return cfg
    return None


def _model_config(model_name: str) -> dict[str, Any]:
    if not _open_clip_loaded():
        cfg = _model_config_file(model_name)
        if cfg is not None:
            return cfg
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name) if "/" not in model_name else None
    if cfg is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
        examples = close or ["ViT-L-14-quickgelu", "ViT-B-32", TINY_MODEL]
        raise ModelError(
            f"unknown model {model_name!r} (param 'model'): open_clip has no config by that name. "
            f"Close or common names: {', '.join(examples)}. open_clip lists {len(known)} models "
            "(open_clip.list_models())."
        )
    return cfg


def _looks_like_path(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or "/" in pretrained
        or pretrained.startswith("~")
        or pretrained.lower().endswith(WEIGHT_EXTENSIONS)
    )


def tag_candidates(model_dir: str, model_name: str, tag: str) -> list[str]:
    """Where a weights tag is looked up inside a model directory, in order."""
    base = Path(model_dir).expanduser()
    out = [str(base / model_name / f"{tag}{ext}") for ext in WEIGHT_EXTENSIONS]
    out += [str(base / model_name / tag / name) for name in HUB_FILE_NAMES]
    out += [str(base / f"{model_name}-{tag}{ext}") for ext in WEIGHT_EXTENSIONS]
    return out


def _tag_source_hint(tag_cfg: dict[str, Any]) -> str:
    sources = [s for s in (tag_cfg.get("url"), tag_cfg.get("hf_hub")) if s]
    if not sources:
        return ""
    return " The published weights for this tag are at: " + " or HF hub ".join(sources) + "."


def _resolve_weights(
    model_name: str, model_cfg: dict[str, Any], pretrained: str, model_dir: str | None
) -> tuple[str, dict[str, Any]]:
    """(weights file, open_clip pretrained cfg of the tag or {}) for a path or a tag."""
    if _looks_like_path(pretrained):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise ModelError(
                f"weights file {path!r} (param 'pretrained') does not exist. Give the path of a "
                f"local open_clip checkpoint for {model_name} ({', '.join(WEIGHT_EXTENSIONS)}), or a "
                f"tag such as 'openai' together with a model directory ({MODEL_DIR_ENV})."
            )
        return path, {}
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(model_name, pretrained)
    # open_clip only warns on this mismatch; the embeddings would be silently wrong, so refuse.
    if tag_cfg and bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        suggestion = f"{model_name}-quickgelu" if tag_cfg.get("quick_gelu") else model_name.removesuffix("-quickgelu")
        raise ModelError(
            f"weights tag {pretrained!r} was trained with quick_gelu={bool(tag_cfg.get('quick_gelu'))} "
            f"but model {model_name!r} uses quick_gelu={bool(model_cfg.get('quick_gelu', False))}: the "
            f"embeddings would be silently off. Use model {suggestion!r}."
        )
    folder = model_dir or os.environ.get(MODEL_DIR_ENV)
    if not folder:
        raise ModelError(
            f"pretrained={pretrained!r} is a weights tag for {model_name}, but no model directory "
            f"is set: pass model_dir (param 'model_dir') or set {MODEL_DIR_ENV} to a folder that "
            f"holds {model_name}/{pretrained}.pt (or .safetensors/.bin), or give a file path as "
            f"'pretrained'. Weights are never downloaded.{_tag_source_hint(tag_cfg)}"
        )
    candidates = tag_candidates(folder, model_name, pretrained)
    for path in candidates:
        if os.path.isfile(path):
            return path, tag_cfg
    import open_clip

    known = open_clip.list_pretrained_tags_by_model(model_name)
    known_note = f" Tags open_clip knows for {model_name}: {', '.join(known)}." if known else ""
    raise ModelError(
        f"no weights for model {model_name!r} tag {pretrained!r} in model directory {folder!r} "
        f"({'param model_dir' if model_dir else MODEL_DIR_ENV}). "
        f"Looked at: {', '.join(candidates)}. Put the checkpoint at {candidates[1]} (or any of "
        f"those names).{_tag_source_hint(tag_cfg)}{known_note}"
    )


def validate_model_spec(
    model_name: str,
    pretrained: str,
    model_dir: str | None = None,
    allow_random_weights: bool = False,
) -> ModelSpec:
    """Check a model name and weights without building the model (cheap; no hashing, no GPU).

    >>> validate_model_spec("winnow-tiny-vit", "random", allow_random_weights=True).embed_dim
    768
    """
    cfg = _model_config(model_name)
    embed_dim = int(cfg["embed_dim"])
    if _open_clip_loaded():
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        preprocess = merge_preprocess_dict(PreprocessCfg(), {})
    else:
        preprocess = dict(OPEN_CLIP_PREPROCESS_DEFAULTS)
    preprocess["size"] = cfg["vision_cfg"].get("image_size", preprocess["size"])

    random_match = _RANDOM.match(pretrained or "")
    if random_match:
        if not allow_random_weights:
            raise ModelError(
                f"pretrained={pretrained!r} asks for random weights for {model_name}: the embeddings "
                "would be meaningless and every filter after them arbitrary. Give a weights file or "
                "tag, or set allow_random_weights=true (param 'allow_random_weights') for a test run."
            )
        seed = int(random_match.group(1) or 0)
        return ModelSpec(model_name, pretrained, None, seed, embed_dim, PreprocessConfig.from_open_clip(preprocess))

    if not pretrained:
        raise ModelError(
            f"no weights given for {model_name} (param 'pretrained'): give a weights file path or a "
            "tag such as 'openai' found in the model directory."
        )
    weights_path, tag_cfg = _resolve_weights(model_name, cfg, pretrained, model_dir)
    if tag_cfg:
        from open_clip.transform import merge_preprocess_dict

        preprocess = merge_preprocess_dict(preprocess, tag_cfg)
    return ModelSpec(model_name, pretrained, weights_path, None, embed_dim, PreprocessConfig.from_open_clip(preprocess))


def _build_clip(spec: ModelSpec, purpose: str) -> nn.Module:
    """The whole open_clip model of a checked spec, fp32 on the CPU; random weights are seeded on a
    forked RNG, so the image and the text tower of one spec always come from the same model."""
    import open_clip

    model_name = spec.model_name
    if spec.is_random:
        logger.warning(
            "%s model %s uses RANDOM weights (seed %d, allow_random_weights=true): embeddings "
            "and every score computed from them are meaningless outside tests",
            purpose,
            model_name,
            spec.random_seed,
        )
        # Seeded on a forked RNG so loads are reproducible and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.random_seed or 0)
            return open_clip.create_model(model_name, pretrained=None, device="cpu")
    try:
        return open_clip.create_model(
            model_name,
            pretrained=spec.weights_path,
            device="cpu",
            force_preprocess_cfg=spec.preprocess.to_dict() | {"size": spec.preprocess.size},
        )
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        raise ModelError(
            f"could not load weights {spec.weights_path!r} into {model_name}: {exc}. Check that "
            "the file is an open_clip/OpenAI checkpoint of this architecture."
        ) from exc


def load_image_model(
    model_name: str,
    pretrained: str,
    *,
    device: str = "cpu",
    model_dir: str | None = None,
    allow_random_weights: bool = False,
) -> LoadedModel:
    """Build an open_clip model, load its weights from a local file, keep the image tower.

    The model is in eval mode, fp32, on ``device``; bf16 is applied by the caller as autocast.
    """
    import open_clip

    spec = validate_model_spec(model_name, pretrained, model_dir, allow_random_weights)
    clip = _build_clip(spec, "embed")
    preprocess = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(clip))
    tower = ImageTower(clip.visual)
    del clip  # drop the text tower
    tower = tower.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=tower,
        preprocess=preprocess,
        embed_dim=spec.embed_dim,
        weights_digest=spec.weights_digest(),
        spec=spec,
    )


# ---- text towers ---------------------------------------------------------------------------

#: Token ids open_clip's built-in BPE tokenizer emits: 49406 BPE tokens, then <start_of_text>
#: (49406) and <end_of_text> (49407).
BPE_VOCAB_SIZE = 49408
#: The only tokenizer the text tower is built with: open_clip's BPE tokenizer, whose vocabulary
#: ships inside the open_clip package (nothing is downloaded).
SIMPLE_TOKENIZER = "open_clip.SimpleTokenizer"


@dataclass(frozen=True)
class TokenizerSpec:
    """What turns a caption into token ids for a model, checked without building anything."""

    kind: str
    context_length: int
    vocab_digest: str  # sha256 of the BPE vocabulary file
    kwargs: dict[str, Any] = field(default_factory=dict)  # the model config's tokenizer_kwargs

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "context_length": self.context_length,
            "vocab_digest": self.vocab_digest,
            "kwargs": dict(sorted(self.kwargs.items())),
        }


#: open_clip's ``tokenizer.DEFAULT_CONTEXT_LENGTH`` and the BPE vocabulary file its
#: ``default_bpe()`` names, inside the package; a test holds them equal.
OPEN_CLIP_CONTEXT_LENGTH = 77
OPEN_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bpe_defaults() -> tuple[int, str]:
    """(default context length, BPE vocabulary path) of open_clip's tokenizer, without importing
    open_clip where it is not loaded yet (see :func:`_model_config_file`)."""
    if not _open_clip_loaded():
        for folder in _open_clip_dirs():
            if (folder / OPEN_CLIP_BPE_FILE).is_file():
                return OPEN_CLIP_CONTEXT_LENGTH, str(folder / OPEN_CLIP_BPE_FILE)
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, default_bpe

    return DEFAULT_CONTEXT_LENGTH, default_bpe()


def tokenizer_spec(model_name: str) -> TokenizerSpec:
    """The tokenizer a model's text tower takes, from its open_clip config.

    Raises :class:`ModelError` for a model whose tokenizer would have to be downloaded (Hugging
    Face and SigLIP tokenizers), and for a text tower with fewer token embeddings than the
    tokenizer has ids: such ids would index past the embedding table, and clamping them would
    give silently wrong text embeddings.
    """
    cfg = _model_config(model_name)
    text_cfg = dict(cfg.get("text_cfg") or {})
    hf_name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if hf_name or "siglip" in model_name.lower():
        source = f"the Hugging Face tokenizer {hf_name!r}" if hf_name else "a SigLIP sentencepiece vocabulary"
        raise ModelError(
            f"model {model_name!r} (param 'model') tokenizes text with {source}, which open_clip "
            "downloads; clip_score supports models with open_clip's built-in BPE tokenizer only "
            "(the OpenAI/LAION CLIP ViTs such as ViT-L-14-quickgelu or ViT-B-32)."
        )
    vocab_size = int(text_cfg.get("vocab_size", BPE_VOCAB_SIZE))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    extra = list(kwargs.get("additional_special_tokens") or [])
    needed = BPE_VOCAB_SIZE + len(extra)
    if vocab_size < needed:
        raise ModelError(
            f"model {model_name!r} has a text vocabulary of {vocab_size} token embeddings, but "
            f"open_clip's BPE tokenizer emits ids up to {needed - 1}: captions cannot be encoded "
            f"with it. Use a config with text_cfg.vocab_size >= {needed}."
        )
    context_length, vocab = _bpe_defaults()
    return TokenizerSpec(
        kind=SIMPLE_TOKENIZER,
        context_length=int(text_cfg.get("context_length", context_length)),
        vocab_digest=file_sha256(vocab),
        kwargs=kwargs,
    )


class TextTower(nn.Module):
    """The text half of a CLIP model (token embedding, positional embedding, transformer, final
    norm, projection), doing what open_clip's ``encode_text`` does; the image tower is dropped.

    Built from the same model object as :class:`ImageTower` would be, so for one spec the two
    embed into one space.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        text = getattr(clip, "text", None)
        if isinstance(text, nn.Module):  # open_clip's CustomTextCLIP: the tower is one module
            self.text: nn.Module | None = text
            self.context_length = int(getattr(text, "context_length", 0))
            self.vocab_size = int(getattr(text, "vocab_size", 0))
            return
        self.text = None
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        self.context_length = int(clip.context_length)
        self.vocab_size = int(clip.vocab_size)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.vocab_size and tokens.numel() and int(tokens.max()) >= self.vocab_size:
            raise ModelError(
                f"token id {int(tokens.max())} is outside the text tower's vocabulary of "
                f"{self.vocab_size}: the tokenizer does not belong to this model"
            )
        if self.text is not None:
            features = self.text(tokens)
        else:
            from open_clip.transformer import text_global_pool

            cast_dtype = self.transformer.get_cast_dtype()
            x = self.token_embedding(tokens).to(cast_dtype)
            x = x + self.positional_embedding.to(cast_dtype)
            x = self.transformer(x, attn_mask=self.attn_mask)
            x = self.ln_final(x)
            x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
            if self.text_projection is not None:
                x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
            features = x
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


@dataclass
class LoadedTextModel:
    """A text tower ready for ``encode_text``, its tokenizer, and what produced them."""

    model: TextTower
    tokenizer: Any  # open_clip SimpleTokenizer: list[str] -> (n, context_length) int64 tensor
    tokenizer_spec: TokenizerSpec
    embed_dim: int
    weights_digest: str
    spec: ModelSpec = field(repr=False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.tokenizer_spec.context_length)


def load_text_model(
    model_name: str,
    pretrained: str,
    *,
    device: str = "cpu",
    model_dir: str | None = None,
    allow_random_weights: bool = False,
) -> LoadedTextModel:
    """Build an open_clip model exactly as :func:`load_image_model` does (same weights
    resolution, same seeded random weights) and keep the text tower and its tokenizer.

    The model is in eval mode, fp32, on ``device``; bf16 is applied by the caller as autocast.
    """
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    spec = validate_model_spec(model_name, pretrained, model_dir, allow_random_weights)
    tok_spec = tokenizer_spec(model_name)
    clip = _build_clip(spec, "text")
    tower = TextTower(clip)
    del clip  # drop the image tower
    tokenizer = SimpleTokenizer(default_bpe(), context_length=tok_spec.context_length, **tok_spec.kwargs)
    if tower.vocab_size and tokenizer.vocab_size > tower.vocab_size:
        raise ModelError(
            f"open_clip's tokenizer has {tokenizer.vocab_size} token ids but {model_name}'s text "
            f"tower embeds only {tower.vocab_size}"
        )
    if tower.context_length and tok_spec.context_length > tower.context_length:
        raise ModelError(
            f"tokenizer context length {tok_spec.context_length} exceeds {model_name}'s text "
            f"tower context of {tower.context_length}"
        )
    tower = tower.to(device).eval().requires_grad_(False)
    return LoadedTextModel(
        model=tower,
        tokenizer=tokenizer,
        tokenizer_spec=tok_spec,
        embed_dim=spec.embed_dim,
        weights_digest=spec.weights_digest(),
        spec=spec,
    )


def locked_weights(model_dir: str | None) -> dict[str, str]:
    """The heads' weights files a fetched model directory holds, by the run param that names
    each (``aesthetic_weights``, ``nsfw_weights``, ``watermark_weights``), from its lock; empty
    without a lock (a model directory filled by hand)."""
    import json

    if not model_dir:
        return {}
    path = os.path.join(os.path.expanduser(model_dir), MODELS_LOCK)
    try:
        with open(path) as f:
            files = json.load(f).get("files") or {}
    except (OSError, ValueError):
        return {}
    out = {}
    for rel, entry in sorted(files.items()):
        param = str((entry or {}).get("param") or "")
        if param.endswith("_weights"):
            out[param] = os.path.join(os.path.expanduser(model_dir), rel)
    return out
