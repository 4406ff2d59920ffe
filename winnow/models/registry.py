"""Where each weights file of a production run comes from: a small table, and the open_clip
checkpoint of a model and tag looked up in open_clip's own pretrained registry.

Every entry names its source URL, the revision it is pinned to when one is known (a git commit),
and what its content is checked against on the first fetch:

* ``sha256``: a digest published by the source (the OpenAI checkpoint URLs carry it) or pinned
  here, computed from the file at the pinned commit;
* ``git_blob``: the git blob id of the file in the pinned commit's tree, for files whose sha256
  is not published: the download is checked against it and its sha256 recorded in the lock;
* neither: trust on first fetch, recorded as such in the lock (a Hugging Face download also
  gets the hub's own LFS sha256 from its response headers and is checked against that).

Tests and mirrors replace entries with ``sources=`` (or a JSON file named by
``WINNOW_MODELS_SOURCES``), keyed by entry name (:data:`NAMES`):
``{"<name>": {"url": "http://127.0.0.1:8000/a.pth"}, ...}``. An
entry given there replaces the built-in one: fields it leaves out are unknown (no digest), except
where the file lands (``path``) and whether it is converted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from winnow.exceptions import ConfigError, ModelError

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "NAMES", "SOURCES", "SOURCES_ENV", "Source", "load_sources",
           "resolve_sources"]

#: Environment variable naming a JSON file of source overrides.
SOURCES_ENV = "WINNOW_MODELS_SOURCES"
#: The embedding model and weights tag of a production run (the pipeline's defaults).
DEFAULT_MODEL = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"
#: Hugging Face hub endpoint (``HF_ENDPOINT`` as huggingface_hub reads it).
HF_ENDPOINT_ENV = "HF_ENDPOINT"
#: Conversion of the NSFW detector's Keras zip into an ``NsfwHead`` safetensors file.
KERAS_NSFW = "keras-nsfw"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """One file a run needs: where it comes from and where it lands in the model directory."""

    name: str
    url: str
    #: where the file the run loads lands, relative to the model directory
    path: str
    #: the git commit (or hub revision) the URL is pinned to, when known
    revision: str | None = None
    #: sha256 hex of the downloaded file, when published or pinned
    sha256: str | None = None
    #: where ``sha256`` comes from ("published by ...", "pinned by winnow from ...")
    sha256_note: str = ""
    #: git blob id (SHA-1) of the downloaded file in ``revision``'s tree
    git_blob: str | None = None
    #: how the download becomes ``path``: None (as is) or ``keras-nsfw``
    convert: str | None = None
    #: the run param that takes this file
    param: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ConfigError(f"model source {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.git_blob is not None and not _SHA1.match(self.git_blob):
            raise ConfigError(f"model source {self.name!r}: git_blob must be 40 lowercase hex digits, got "
                              f"{self.git_blob!r}")
        if self.convert not in (None, KERAS_NSFW):
            raise ConfigError(f"model source {self.name!r}: unknown conversion {self.convert!r}")


# Commits: the last commit that touched each file in its repository (checked in a clone); the
# sha256 and blob ids are those of the file in that commit.
_AESTHETIC_COMMIT = "61f2f07a2b16be5ffb40a10ba5adae4a74c9d0d9"
_NSFW_COMMIT = "3f36aba0d6727c3f6b0ea1a78bc51f157a24f295"
_WATERMARK_COMMIT = "418a46bc592f2551631c807706bbc605312125d4"

def _head(param: str, **kw) -> Source:
    """A score head's (or the watermark detector's) source, named after the filter whose
    ``<filter>_weights`` param takes it."""
    return Source(name=param.removesuffix("_weights"), param=param, **kw)


#: The heads and the watermark detector (the open_clip checkpoint is looked up per model and tag).
SOURCES: dict[str, Source] = {s.name: s for s in (
    _head(
        url="https://raw.githubusercontent.com/christophschuhmann/improved-aesthetic-predictor/"
        f"{_AESTHETIC_COMMIT}/sac%2Blogos%2Bava1-l14-linearMSE.pth",
        path="aesthetic/sac+logos+ava1-l14-linearMSE.pth",
        revision=_AESTHETIC_COMMIT,
        sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
        sha256_note="pinned by winnow: sha256 of the file in christophschuhmann/improved-aesthetic-predictor "
        f"at {_AESTHETIC_COMMIT}",
        git_blob="7c0d8aa2923efd62fcdddced392cf17c237150dd",
        param="aesthetic_weights",
        description="LAION improved aesthetic predictor, MLP over ViT-L/14 embeddings",
    ),
    _head(
        url=f"https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/{_NSFW_COMMIT}/"
        "clip_autokeras_binary_nsfw.zip",
        path="nsfw/clip_autokeras_binary_nsfw-vit-l-14.safetensors",
        revision=_NSFW_COMMIT,
        sha256="905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a",
        sha256_note="pinned by winnow: sha256 of the zip in LAION-AI/CLIP-based-NSFW-Detector at "
        f"{_NSFW_COMMIT}",
        git_blob="f970ee08140edfa48f6846a8561a8376cf87b988",
        convert=KERAS_NSFW,
        param="nsfw_weights",
        description="LAION CLIP-based NSFW detector (ViT-L/14, autokeras), converted to safetensors",
    ),
    _head(
        url=f"https://raw.githubusercontent.com/LAION-AI/LAION-5B-WatermarkDetection/{_WATERMARK_COMMIT}/"
        "models/watermark_model_v1.pt",
        path="watermark/watermark_model_v1.pt",
        revision=_WATERMARK_COMMIT,
        git_blob="09db4ad1b059bccc2be67380d321b67f0e9288e9",
        param="watermark_weights",
        description="LAION-5B watermark detector (timm efficientnet_b3 + MLP classifier)",
    ),
)}
#: Every entry name, in fetch order.
NAMES = ("clip", *SOURCES)


def _hf_endpoint() -> str:
    return os.environ.get(HF_ENDPOINT_ENV, "https://huggingface.co").rstrip("/")


def clip_path(model: str, pretrained: str, url: str) -> str:
    """Where the checkpoint lands: a name :func:`winnow.stages.models.tag_candidates` looks at."""
    name = Path(urlsplit(url).path).name
    if name.endswith(".safetensors"):
        return f"{model}/{pretrained}/open_clip_model.safetensors"
    if name.endswith(".bin"):
        return f"{model}/{pretrained}/open_clip_pytorch_model.bin"
    return f"{model}/{pretrained}.pt"


def clip_source(model: str, pretrained: str, override: Mapping[str, Any] | None = None,
                revision: str | None = None) -> Source:
    """The open_clip checkpoint of ``model`` and tag ``pretrained``: from ``override`` when given,
    else from open_clip's pretrained registry (its Hugging Face hub repo, at ``revision`` or
    ``main``; or its URL when it has no hub repo)."""
    description = f"open_clip {model} weights {pretrained!r}"
    if override is not None:
        url = str(override["url"])
        return _from_mapping("clip", override, Source("clip", url, clip_path(model, pretrained, url),
                                                      param="model_dir", description=description))
    from open_clip.pretrained import get_pretrained_cfg

    from winnow.stages.models import register_model_configs

    register_model_configs()
    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        import open_clip

        known = open_clip.list_pretrained_tags_by_model(model)
        raise ModelError(
            f"open_clip has no weights tag {pretrained!r} for model {model!r} (--model/--pretrained); "
            f"tags it knows for it: {', '.join(known) or 'none'}"
        )
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        filename = filename or "open_clip_model.safetensors"
        rev = revision or "main"
        url = f"{_hf_endpoint()}/{repo}/resolve/{rev}/{filename}"
        return Source("clip", url, clip_path(model, pretrained, url), revision=rev, param="model_dir",
                      description=f"{description} (Hugging Face hub {repo})")
    url = str(cfg.get("url") or "")
    if not url:
        raise ModelError(f"open_clip's tag {pretrained!r} for {model!r} names no download location")
    digest = next((part for part in urlsplit(url).path.split("/") if _SHA256.match(part)), None)
    return Source("clip", url, clip_path(model, pretrained, url), sha256=digest,
                  sha256_note="published: the sha256 in the source URL" if digest else "", param="model_dir",
                  description=description)


def _from_mapping(name: str, values: Mapping[str, Any], base: Source) -> Source:
    allowed = {"url", "path", "revision", "sha256", "sha256_note", "git_blob", "convert", "description"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"model source {name!r}: unknown fields {unknown} (known: {sorted(allowed)})")
    if not values.get("url"):
        raise ConfigError(f"model source {name!r}: 'url' is required")
    return replace(
        base,
        url=str(values["url"]),
        path=str(values.get("path", base.path)),
        revision=values.get("revision"),
        sha256=values.get("sha256"),
        sha256_note=str(values.get("sha256_note", "given in the sources override" if values.get("sha256") else "")),
        git_blob=values.get("git_blob"),
        convert=values.get("convert", base.convert),
        description=str(values.get("description", base.description)),
    )


def load_sources(sources: Mapping[str, Any] | str | Path | None = None) -> dict[str, Mapping[str, Any]]:
    """The overrides: ``sources`` itself, the JSON file it names, or the file named by
    ``WINNOW_MODELS_SOURCES``; ``{}`` when none."""
    if sources is None:
        sources = os.environ.get(SOURCES_ENV) or None
        if sources is None:
            return {}
    if isinstance(sources, (str, Path)):
        try:
            sources = json.loads(Path(sources).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model sources file {sources}: {exc}") from exc
    if not isinstance(sources, Mapping):
        raise ConfigError("model sources must be a JSON object {name: {url: ..., ...}}")
    unknown = sorted(set(sources) - set(NAMES))
    if unknown:
        raise ConfigError(f"model sources: unknown names {unknown} (known: {list(NAMES)})")
    return {str(k): v for k, v in sources.items()}


def resolve_sources(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    *,
    only: list[str] | tuple[str, ...] | None = None,
    sources: Mapping[str, Any] | str | Path | None = None,
    clip_revision: str | None = None,
) -> list[Source]:
    """The entries to fetch, in :data:`NAMES` order: all of them, or those ``only`` names."""
    wanted = list(NAMES) if not only else list(dict.fromkeys(only))
    unknown = [n for n in wanted if n not in NAMES]
    if unknown:
        raise ConfigError(f"--only: unknown names {unknown} (known: {list(NAMES)})")
    overrides = load_sources(sources)
    out: list[Source] = []
    for name in NAMES:
        if name not in wanted:
            continue
        if name == "clip":
            out.append(clip_source(model, pretrained, overrides.get("clip"), clip_revision))
        elif name in overrides:
            out.append(_from_mapping(name, overrides[name], SOURCES[name]))
        else:
            out.append(SOURCES[name])
    return out
