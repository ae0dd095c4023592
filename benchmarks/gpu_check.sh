#!/usr/bin/env bash
# GPU check of ddtd: the tests marked `gpu` (tests/test_gpu.py: calibration, every solver, whole
# compressions and the CLI on CUDA, each against the CPU) must all pass - none skipped - and
# benchmarks/gpu_timing.py times calibration and the solvers on the GPU against the CPU.
#
#   bash benchmarks/gpu_check.sh               # on a machine with a CUDA GPU (under 8 minutes)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # no GPU: the same test code and a quick timing on the CPU
#
# Options: --out FILE (default benchmarks/results/gpu_check.txt; the smoke run writes a file only
# when given --out), --no-timing (tests only).
# Python: $PYTHON if set; else the repository's .venv if it has torch; else `python3` when it
# already has ddtd's dependencies (ddtd is then imported from this checkout through PYTHONPATH,
# so an offline GPU machine needs no install); else the environment .ci/setup-env.sh makes
# (with DDTD_SKIP_FMNIST=1: nothing here needs Fashion-MNIST).
# Exit status: 0 all passed; 1 a test or a timing section failed, or a test was skipped;
# 2 no GPU (without --cpu-smoke) or bad usage.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

smoke=0
timing=1
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) smoke=1 ;;
        --no-timing) timing=0 ;;
        --out) out="${2:?--out needs a file}"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$smoke" = 0 ] && [ -z "$out" ] && out="benchmarks/results/gpu_check.txt"

start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
if rev="$(git rev-parse --short HEAD 2>/dev/null)"; then
    git diff --quiet HEAD 2>/dev/null || rev="$rev + local changes"
else
    rev="no git checkout"
fi

has_deps() { "$1" -c "import torch, torchvision, numpy, scipy, h5py, tqdm, PIL, pytest" >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ] && has_deps .venv/bin/python; then
    py=".venv/bin/python"
elif command -v python3 >/dev/null && has_deps python3; then
    py="python3"
else
    py="$(DDTD_SKIP_FMNIST=1 bash .ci/setup-env.sh | tail -n 1)"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== gpu_check ($([ "$smoke" = 1 ] && echo 'CPU smoke run' || echo 'GPU run')), $(date '+%Y-%m-%d %H:%M'), $rev"
echo "python: $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || nvidia-smi || true
else
    echo "nvidia-smi: not found"
fi
"$py" - <<'EOF' | tee "$work/env.txt"
import os, torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
              f"compute capability {p.major}.{p.minor}")
else:
    print("torch.cuda.is_available(): False")
EOF
cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$smoke" = 0 ] && [ "$cuda" != 1 ]; then
    echo "gpu_check: FAILED: no CUDA GPU is visible to PyTorch (see above); on a machine without one," \
         "run 'bash benchmarks/gpu_check.sh --cpu-smoke'" >&2
    exit 2
fi

# Hard limits keep a GPU run inside a 10-minute slot even if something hangs (typical: 1-2 min of
# tests, 2-4 of timing); the CPU smoke run's tests take minutes on a small machine.
if [ "$smoke" = 1 ]; then
    test_env=(DDTD_TEST_DEVICE=cpu)
    timing_args=(--device cpu --quick)
    test_limit=1200
else
    test_env=(DDTD_REQUIRE_GPU=1)
    timing_args=(--device cuda)
    test_limit=240
fi

echo
echo "== tests marked gpu (tests/test_gpu.py; ${test_env[*]})"
set +e
env "${test_env[@]}" timeout "$test_limit" "$py" -m pytest -q -rs -m gpu -p no:cacheprovider --durations=5 \
    tests/test_gpu.py 2>&1 | tee "$work/tests.txt"
test_rc=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran' "$work/tests.txt" | tail -n 1 \
           | sed -E 's/^=+ //; s/ =+$//')"
status=0
if [ "$test_rc" != 0 ]; then
    echo "gpu_check: FAILED: the gpu tests exited with status $test_rc ($summary)" >&2
    status=1
elif grep -Eq '[0-9]+ skipped' <<<"$summary" || ! grep -Eq '[0-9]+ passed' <<<"$summary"; then
    echo "gpu_check: FAILED: every gpu test must run and pass, got: $summary" >&2
    status=1
fi
echo "tests: $summary (exit $test_rc, $(elapsed) s so far)"

if [ "$timing" = 1 ]; then
    echo
    echo "== timing (benchmarks/gpu_timing.py ${timing_args[*]})"
    set +e
    timeout 300 "$py" benchmarks/gpu_timing.py "${timing_args[@]}" --out "$work/timing.txt"
    timing_rc=$?
    set -e
    if [ "$timing_rc" != 0 ]; then
        echo "gpu_check: FAILED: the timing exited with status $timing_rc" >&2
        status=1
    fi
fi

total=$(elapsed)
if [ -n "$out" ]; then
    mkdir -p "$(dirname "$out")"
    {
        echo "# bash benchmarks/gpu_check.sh$([ "$smoke" = 1 ] && echo ' --cpu-smoke'): $(date '+%Y-%m-%d %H:%M'), $rev, ${total} s in all"
        cat "$work/env.txt"
        echo "tests (tests/test_gpu.py, ${test_env[*]}): $summary"
        if [ -f "$work/timing.txt" ]; then echo; cat "$work/timing.txt"; fi
    } >"$out"
    echo "wrote $out"
fi
echo "gpu_check: $([ "$status" = 0 ] && echo 'all passed' || echo 'FAILED') in ${total} s"
[ "$smoke" = 1 ] || [ "$total" -le 480 ] || echo "gpu_check: note: took ${total} s, over the 8-minute target" >&2
exit "$status"
