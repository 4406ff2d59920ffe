"""The weights a production run needs, fetched once into a model directory and locked.

``python -m winnow.models fetch`` (or :func:`fetch`) downloads the open_clip checkpoint of a model
and tag, the LAION aesthetic MLP, the LAION NSFW detector (its Keras release converted to
safetensors without TensorFlow) and the LAION watermark detector; checks each against its
published or pinned digest; and writes ``winnow-models.lock.json`` (:class:`Lock`) in the model
directory. ``--offline`` (:func:`verify`) downloads nothing and checks the files against the lock.
Every failure (a download, a digest mismatch, a missing or wrong file) is a
:class:`winnow.exceptions.ModelError` whose message names the file, its source and the digests.
Runs never download: they read the model directory (``model_dir`` / ``WINNOW_MODEL_DIR``) and the
heads' weights paths (:meth:`Lock.params`).
"""

from winnow.models.fetch import LOCK_NAME, Lock, LockEntry, fetch, verify, verify_problems
from winnow.models.registry import NAMES, SOURCES, SOURCES_ENV, Source, resolve_sources

__all__ = [
    "LOCK_NAME",
    "NAMES",
    "SOURCES",
    "SOURCES_ENV",
    "Lock",
    "LockEntry",
    "Source",
    "fetch",
    "resolve_sources",
    "verify",
    "verify_problems",
]
