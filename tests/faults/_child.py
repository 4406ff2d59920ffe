"""A curation call in a process of its own, so a fault test can kill it or limit its resources.

Usage: ``python _child.py '<json spec>'``. Spec keys: ``cfg`` (CurationConfig fields), ``call``
(``run_all`` or ``run_partition``), ``owner``, ``stage``, ``partition``; fault knobs:
``fsize_limit`` (RLIMIT_FSIZE in bytes: writes past it fail with EFBIG, like a full disk) and
``hang_on`` + ``hang_marker`` (the rename that would commit a path containing ``hang_on`` stalls
after touching ``hang_marker``: the test then SIGKILLs this process inside the commit).
Prints one JSON line: ``{"ok": true, "summary": ...}`` or ``{"ok": false, "error_type", "error"}``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("fsize_limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core-dumping signal
        limit = int(spec["fsize_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if spec.get("hang_on"):
        real_replace = os.replace

        def replace_that_hangs(src, dst, *args, **kwargs):  # fault injection: stall one commit
            if spec["hang_on"] in str(dst):
                with open(spec["hang_marker"], "w") as f:
                    f.write(str(src))
                time.sleep(600)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace_that_hangs

    from winnow.exceptions import WinnowError
    from winnow.execution import LOCAL
    from winnow.pipeline import CurationConfig, run_all, run_partition

    cfg = CurationConfig(**spec["cfg"])
    try:
        if spec["call"] == "run_all":
            result = run_all(cfg, backend="local", owner=spec.get("owner"))
        else:
            result = run_partition(
                cfg, spec["stage"], int(spec["partition"]), execution=LOCAL, owner=spec.get("owner")
            ).to_dict()
    except WinnowError as exc:
        print(json.dumps({"ok": False, "error_type": type(exc).__name__, "error": str(exc)}), flush=True)
        return 3
    print(json.dumps({"ok": True, "summary": result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
