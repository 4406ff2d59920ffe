#!/usr/bin/env bash
# The GPU check, one call: install the carried wheels, run the gpu tests, measure.
#     benchmarks/gpu_check.sh            # on a box with one NVIDIA GPU (H100/H200), < 8 minutes
#     benchmarks/gpu_check.sh --dry-run  # the same code path on CPU, tiny model, 200 images
# Needs Python 3.12 with torch, torchvision, numpy, pyarrow and Pillow; no network, no Ray, no
# DALI. Everything else comes from wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them),
# installed with pip --no-index --no-deps --target into .whl/site (or $WINNOW_GPU_DEPS).
# Prints one JSON line "GPU_CHECK {...}" and writes $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  exec "$PY" benchmarks/gpu_check.py --dry-run "$@"
fi

DEPS=${WINNOW_GPU_DEPS:-$PWD/.whl/site}
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  stamp=$(ls -l "${wheels[@]}" | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
  if [[ ! -f "$DEPS/.stamp" || "$(cat "$DEPS/.stamp")" != "$stamp" ]]; then
    rm -rf "$DEPS" && mkdir -p "$DEPS"
    echo "gpu_check: installing ${#wheels[@]} wheels into $DEPS"
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" "${wheels[@]}"
    else  # no pip: a wheel is a zip archive laid out for site-packages
      for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$DEPS"; done
    fi
    echo "$stamp" > "$DEPS/.stamp"
  fi
else
  echo "gpu_check: no wheels in .whl/ (run benchmarks/gpu_wheels.sh where an index is reachable); using what is installed"
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
# The libraries nvImageCodec dlopens (nvJPEG) sit beside it in the target folder.
for lib in "$DEPS"/nvidia/cu*/lib "$DEPS"/nvidia/nvjpeg/lib; do
  [[ -d "$lib" ]] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

# The gpu-marked tests that need neither DALI nor Ray (DALI tests carry "dali" in their names).
tests_rc=0
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -k "not dali" \
  tests/stages/test_decode.py tests/stages/test_embed.py tests/stages/test_embed_worker.py \
  tests/stages/test_dedup.py tests/stages/test_watermark.py tests/benchmarks/test_gpu_check.py || tests_rc=$?
echo "gpu_check: gpu tests exit status $tests_rc"

# Worst case: 120 s of tests + 350 s here (steps stop starting at 330 s; the JSON is saved
# after every step) + the install: under 8 minutes.
timeout 350 "$PY" benchmarks/gpu_check.py --tests-rc "$tests_rc" "$@"
