#!/usr/bin/env bash
# One GPU run, start to end, on a machine that reaches no package index: install the wheels
# brought in benchmarks/wheels/ (`make gpu-wheels` beforehand), run the gpu-marked tests and
# the Triton kernel tests compiled on CUDA, then benchmarks/gpu.py. Everything lands in $OUT:
#   env.txt             python, torch, triton, GPU, pip list
#   install.log         the wheel installation
#   import.log          `import ember.server.app` and `ember serve --help` on this machine
#   tests.log           pytest -m gpu and tests/test_triton_kernels.py on CUDA
#   gpu.json            the benchmark's JSON (commit it as benchmarks/results/gpu-<card>-<date>.json)
#   bench.log           its progress; serve-*.log, bench-*.log: the served runs
# Usage: OUT=/some/dir bash benchmarks/gpu_run.sh [extra benchmarks/gpu.py args]
# GPU_RUN_STEPS=tests,bench (default) picks what runs after the install; GPU_TESTS_TIMEOUT (180)
# and GPU_BENCH_TIMEOUT (400) bound the two, so the whole run fits one 600 s device command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEPS="${GPU_RUN_STEPS:-tests,bench}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" -c 'import platform; print("glibc", platform.libc_ver()[1])' || true  # manylinux tags
} > "$OUT/env.txt" 2>&1

# Each pin is a minimum: a version the image already has that satisfies it is kept.
if [ -d benchmarks/wheels ]; then
  grep -v '^#' benchmarks/gpu-wheels.txt | grep . | sed 's/==/>=/' > "$OUT/requirements-min.txt"
  if ! "$PY" -m pip install --no-deps --no-index --find-links benchmarks/wheels \
    -r "$OUT/requirements-min.txt" > "$OUT/install.log" 2>&1; then
    # One wheel the machine refuses (a manylinux tag newer than its glibc) must not keep out
    # the others: install them one by one and name what failed.
    status=1
    while read -r req; do
      "$PY" -m pip install --no-deps --no-index --find-links benchmarks/wheels "$req" \
        >> "$OUT/install.log" 2>&1 || echo "FAILED TO INSTALL: $req" | tee -a "$OUT/install.log"
    done < "$OUT/requirements-min.txt"
  fi
else
  echo "benchmarks/wheels missing: run 'make gpu-wheels' where PyPI is reachable" > "$OUT/install.log"
fi
"$PY" -m pip list > "$OUT/pip-list.txt" 2>&1 || true

{
  "$PY" -c 'import ember.server.app, ember.offline, ember.engine.attention.triton_backend; print("imports ok")' \
    && "$PY" -m ember.cli serve --help > /dev/null && echo "ember serve --help ok"
} > "$OUT/import.log" 2>&1 || status=1

if [[ ",$STEPS," == *",tests,"* ]]; then
  # The kernel tests run compiled on CUDA here (no interpreter); -m gpu adds the engine tests.
  timeout "${GPU_TESTS_TIMEOUT:-180}" "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
    tests/test_gpu.py tests/test_triton_kernels.py > "$OUT/tests.log" 2>&1 || status=1
  tail -3 "$OUT/tests.log"
fi

if [[ ",$STEPS," == *",bench,"* ]]; then
  timeout "${GPU_BENCH_TIMEOUT:-400}" "$PY" benchmarks/gpu.py --out "$OUT/gpu.json" --log-dir "$OUT" "$@" \
    > "$OUT/bench.stdout" 2> "$OUT/bench.log" || status=1
  tail -20 "$OUT/bench.log"
fi
exit $status
