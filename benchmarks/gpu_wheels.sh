#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on an offline GPU box, into .whl/ (ignored
# by git, carried with the checkout). Run it where a package index is reachable:
#     benchmarks/gpu_wheels.sh            # Linux x86-64, CPython 3.12, CUDA 13 nvImageCodec
#     CUDA_MAJOR=12 benchmarks/gpu_wheels.sh   # the CUDA 12 builds instead (for a cu12 torch)
# The GPU box already has torch, torchvision, numpy, pyarrow and Pillow. open_clip's hard imports
# beyond those are ftfy (+ wcwidth), regex and tqdm; huggingface_hub, safetensors and timm are
# optional imports it skips when absent. timm builds the watermark detector (pure Python; its
# huggingface_hub, safetensors and pyyaml imports are optional when no weights are downloaded).
# pytest (+ pluggy, iniconfig, packaging, pygments) runs the gpu tests. About 37 MB in all with
# CUDA 13 (the carry limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
CUDA_MAJOR=${CUDA_MAJOR:-13}
case "$CUDA_MAJOR" in
  13) CODEC=(nvidia-nvimgcodec-cu13 nvidia-nvjpeg) ;;
  12) CODEC=(nvidia-nvimgcodec-cu12 nvidia-nvjpeg-cu12) ;;
  *) echo "CUDA_MAJOR must be 12 or 13, got $CUDA_MAJOR" >&2; exit 2 ;;
esac
PACKAGES=(open_clip_torch ftfy wcwidth regex tqdm timm "${CODEC[@]}" pytest pluggy iniconfig packaging pygments)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# One package at a time: some are tagged manylinux_2_28, others only manylinux2014.
for pkg in "${PACKAGES[@]}"; do
  "$PY" -m pip download --quiet --only-binary :all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$pkg"
done
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
