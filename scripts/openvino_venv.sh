#!/usr/bin/env bash
# Makes VENV (default .venv-openvino/, git-ignored): the interpreter that runs the bench's openvino-* peers.
# optimum-intel 2.2 needs transformers<5.6 and huggingface-hub<1.22, while bgeserve's dev venv pins
# transformers 5.23 for FlagEmbedding, so the OpenVINO rows cannot share .venv.
#
#   scripts/openvino_venv.sh [VENV]
#
# Environment (optional): PYTHON, the interpreter the venv is made from (default python3).
# Does nothing when VENV/.installed exists; an interrupted run is finished by the next one.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$REPO/.venv-openvino}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0  # named in every step: pip must never resolve another torch (several GB)
# optimum-intel 2.2.0 lists torchvision, and torchvision 0.28.0 is the release that requires exactly
# torch==2.13.0, but registries here serve only its CUDA build: its ops need libtorch_cuda, so
# `import torchvision` fails against the CPU torch and takes transformers' AutoProcessor (which
# optimum.intel imports) down with it. Feature extraction needs no torchvision, so optimum-intel goes in
# with --no-deps and the rest of its requirements (optimum-intel[openvino] 2.2.0's METADATA) by hand,
# at the versions this was tested with.
OPTIMUM_INTEL=optimum-intel==2.2.0
OPTIMUM_INTEL_DEPS="optimum==2.3.0 transformers==5.5.4 huggingface-hub==1.21.0 nncf==3.4.0 openvino==2026.4.1
openvino-tokenizers==2026.4.1.0 requests>=2.33,<3.0 setuptools"
# What `python -m bgeserve.bench.job` imports besides the peer: bgeserve itself goes in with --no-deps.
BGESERVE_RUNTIME="numpy>=1.26 tokenizers>=0.19 safetensors>=0.4 tqdm>=4.66"

[ -f "$VENV/.installed" ] && exit 0
started=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$TORCH"  # first, alone: the CPU wheel on local disk
# shellcheck disable=SC2086  # the lists are word-split on purpose
"${pip[@]}" "$TORCH" $OPTIMUM_INTEL_DEPS $BGESERVE_RUNTIME
"${pip[@]}" --no-deps "$OPTIMUM_INTEL"
"${pip[@]}" --no-deps --no-build-isolation -e "$REPO"  # setuptools is already there
"$VENV/bin/python" - <<'EOF'
import torch
from optimum.intel import OVModelForFeatureExtraction  # noqa: F401

assert torch.__version__.startswith("2.13.0"), f"pip replaced torch 2.13.0 with {torch.__version__}"
import bgeserve.bench.job  # noqa: F401,E402
EOF
touch "$VENV/.installed"
echo "$VENV ready in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1)" >&2
