"""``python -m winnow.models fetch``: download, verify and lock the weights of a production run.

    python -m winnow.models fetch --model-dir /models                  # everything, default model
    python -m winnow.models fetch --model-dir /models --offline        # verify against the lock
    python -m winnow.models fetch --model ViT-B-32 --pretrained laion2b_s34b_b79k --only clip

Exit status: 0 when every file is there and verified, 1 when one is missing or wrong (each named
on stderr with its expected source), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from winnow.exceptions import ConfigError, WinnowError
from winnow.models.fetch import Lock, fetch
from winnow.models.registry import DEFAULT_MODEL, DEFAULT_PRETRAINED, NAMES, SOURCES_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m winnow.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download (or with --offline verify) the weights into a model directory")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip model name (default {DEFAULT_MODEL})")
    f.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help=f"open_clip weights tag of the model (default {DEFAULT_PRETRAINED})")
    f.add_argument("--model-dir", default=None, help="the model directory (default: $WINNOW_MODEL_DIR)")
    f.add_argument("--offline", action="store_true",
                   help="download nothing: verify the files against winnow-models.lock.json")
    f.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                   help=f"fetch only these entries ({', '.join(NAMES)})")
    f.add_argument("--sources", default=None,
                   help=f"JSON file replacing registry entries, e.g. mirrors (default: ${SOURCES_ENV})")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _report(lock: Lock, names: set[str] | None) -> None:
    for path, entry in sorted(lock.entries.items()):
        if names and entry.name not in names:
            continue
        print(f"{entry.name:<10} {path}  sha256:{entry.sha256[:16]}...  {entry.size} bytes  ({entry.digest})")
    print(f"lock: {lock.path}")
    print("run params: " + " ".join(f"{k}={v}" for k, v in lock.params().items()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        lock = fetch(args.model_dir, model=args.model, pretrained=args.pretrained, only=args.only,
                     offline=args.offline, sources=args.sources, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WinnowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _report(lock, set(args.only) if args.only else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
