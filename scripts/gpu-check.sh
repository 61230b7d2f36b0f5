#!/usr/bin/env bash
# The one command a GPU session runs through the device tool (benchmarks/README.md, "GPU check"):
#   bash scripts/gpu-check.sh            with carry [".gpu-wheels"], timeout_s 540
# It uses the device image's own python3 + CUDA torch (the tool carries no venv), installs the wheels
# of .gpu-wheels/ (scripts/prepare-gpu-wheels.sh, run beforehand on the CPU machine) into /tmp, then
#   1. preflight: GPU, python, versions, `import stream_st`            (~10 s)
#   2. python3 -m pytest -m cuda (CUDA, NCCL one-rank, host-RSS bound)  (timeout 180 s)
#   3. python3 benchmarks/gpu.py                                       (timeout 300 s, rounds stop at 230 s)
# Everything it prints also goes to $OUT/gpu-check.log; $OUT also gets preflight.txt, pytest-cuda.txt,
# pytest-cuda.xml, gpu_results.md and gpu_results.json (6 files: the tool returns at most 8).
# Without $OUT (a run by hand) the files go to benchmarks/out/gpu-check/. PYTHON= picks the interpreter;
# for a short rerun: GPU_CHECK_SKIP_TESTS=1 GPU_BENCH_ARGS="--quick --repeats 2" bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/out/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

main() {
    local t0=$SECONDS status=0
    echo "== preflight ($(date -u '+%F %T') UTC)"
    {
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1
        else
            echo "nvidia-smi: not available"
        fi
        echo "cpus: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/{print $2" GiB"}'); /dev/shm free: $(df -h --output=avail /dev/shm 2>/dev/null | tail -1)"
        echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
    } | tee "$OUT/preflight.txt"

    local site=/tmp/stream-st-site
    if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
        if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .gpu-wheels/*.whl >/tmp/stream-st-pip.log 2>&1; then
            echo "installed $(ls .gpu-wheels/*.whl | wc -l) carried wheels into $site" | tee -a "$OUT/preflight.txt"
        else
            echo "WARNING: installing .gpu-wheels failed (going on with the image's packages):" | tee -a "$OUT/preflight.txt"
            tail -5 /tmp/stream-st-pip.log | tee -a "$OUT/preflight.txt"
        fi
        export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .gpu-wheels/ carried: using the image's packages only (s3fs/gcsfs may be missing)" | tee -a "$OUT/preflight.txt"
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
    timeout 120 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/preflight.txt"
import importlib, importlib.metadata as md
for name in ("torch", "safetensors", "fsspec", "aiohttp", "huggingface_hub", "s3fs", "gcsfs", "numpy",
             "pytest", "pytest-timeout", "hypothesis"):
    try:
        print(f"{name:16s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:16s} MISSING")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda,
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import stream_st
print("stream_st", stream_st.__version__, "from", stream_st.__file__)
for optional in ("s3fs", "gcsfs"):
    try:
        importlib.import_module(optional)
    except Exception as e:
        print(f"note: import {optional} fails ({type(e).__name__}: {e}); only s3:// / gs:// need it")
EOF

    local rc_tests=0 rc_bench=0
    if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
        echo; echo "== pytest -m cuda (+$((SECONDS - t0)) s)"
        timeout -k 10 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" tests 2>&1 \
            | tee "$OUT/pytest-cuda.txt"
        rc_tests=${PIPESTATUS[0]}
        echo "pytest exit: $rc_tests"
    fi

    echo; echo "== benchmarks/gpu.py ${GPU_BENCH_ARGS:-} (+$((SECONDS - t0)) s)"
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options, e.g. "--quick --repeats 2"
    timeout -k 15 300 "$PY" benchmarks/gpu.py --deadline-s 230 --out "$OUT" ${GPU_BENCH_ARGS:-}
    rc_bench=$?
    echo "gpu.py exit: $rc_bench"

    echo; echo "== done in $((SECONDS - t0)) s: pytest exit $rc_tests, gpu.py exit $rc_bench"
    [ -f "$OUT/pytest-cuda.txt" ] && grep -E "passed|failed|skipped|error" "$OUT/pytest-cuda.txt" | tail -1
    [ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] || status=1
    return $status
}

main 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
