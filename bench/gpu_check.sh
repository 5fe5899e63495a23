#!/usr/bin/env bash
# The GPU check: on one GPU machine (an H200: Python 3.12, torch, triton, pytest; no open_clip, no registry), in one
# call of at most 6 minutes: build the extension for sm_90, measure the README's performance table
# (bench/gpu_check.py), run the `gpu` tests, and write one JSON plus a Markdown table of ratios.
#
#   bash bench/gpu_check.sh             # on the GPU machine, from the repository root of a copy of the tree
#   bash bench/gpu_check.sh --dry-run   # anywhere: tiny shapes on the CPU under the Triton interpreter (CI)
#
# Output: $OUT/gpu-<UTC time>.{json,md,png,log} and the tests' JUnit XML (-tests.xml) when OUT is set, else
# bench/results/ (a dry run: a temporary folder unless OUT is set, removed when the run passed). Then, here:
# python -m bench.fold_readme <the JSON> copies the files into bench/results/ and folds the table into the README's
# performance section.
# The end-to-end and encode phases need open_clip: `bash bench/gpu_wheels.sh` here makes bench/wheels/, which this script
# installs offline into a temporary target when it is there (carry it with the tree).
#
# Budget (expected seconds on one H200; the hard limits keep the whole run under TOTAL_LIMIT):
#   set-up and version report                    5
#   extension build, sm_90 only (nvcc, 3 files) 75   limit BUILD_LIMIT; beside it, on the idle cores, a
#                                                      warm-up compiles the measured Triton kernels
#   wheels installed offline                     5
#   measurements (bench/gpu_check.py phases)   185   training 40, inference 25, routing 20, e2e 30, encode 10,
#                                                      tuned 60;
#                                                      a phase starts only while its expected time is left
#   gpu tests (pytest -m gpu, 8 workers)        75   limit TESTS_LIMIT, each test at most 120 s
#   tables and plot                              5
#   total                                      350   limit TOTAL_LIMIT = 355 s
# Exit status: 0 all measured and passed; 1 a measurement or test failed; 2 the set-up failed (no GPU, no build:
# then nothing that would use the host-synchronising fallback is measured).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
# The project's .venv where there is one (CI, development machine); the image's python3 on the GPU machine.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
TOTAL_LIMIT=${TOTAL_LIMIT:-355}
BUILD_LIMIT=${BUILD_LIMIT:-150}
TESTS_LIMIT=${TESTS_LIMIT:-90}
RESERVE=${RESERVE:-10}           # seconds kept back for the tables at the end
START=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then RESULTS=$OUT
elif [ "$DRY_RUN" = 1 ]; then RESULTS=$(mktemp -d -t clipmoe-dry-run.XXXXXX)
else RESULTS=bench/results
fi
mkdir -p "$RESULTS"
NAME=gpu-$STAMP
[ "$DRY_RUN" = 1 ] && NAME=dry-run-$STAMP
BASE=$RESULTS/$NAME
exec > >(tee "$BASE.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "== [$(elapsed) s] $*"; }
loud() { echo; echo "!!!!!!!! $* !!!!!!!!"; echo; }
STATUS=0

# The tuned phase measures autotune from cold and saves what it chose: no choices of an earlier run on this machine.
export CLIPMOE_TUNED_CACHE=off
export CLIPMOE_GIT_SHA=${CLIPMOE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
say "clipmoe GPU check$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN: CPU, Triton interpreter)'), commit $CLIPMOE_GIT_SHA, output $BASE.*"
"$PY" -c "import sys, torch, triton, pytest; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| pytest', pytest.__version__, '| cuda', torch.version.cuda, '| device', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" \
    || { loud "FAILED: $PY needs torch, triton and pytest"; exit 2; }
unset CLIPMOE_SKIP_CUDA_BUILD CLIPMOE_SKIP_EXT_BUILD CLIPMOE_TRITON_CONFIG CLIPMOE_BACKEND
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
MEASURE_FLAGS=()
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
    MEASURE_FLAGS+=(--dry-run)
else
    unset TRITON_INTERPRET
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { loud "FAILED: no CUDA device visible to torch"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
fi

# -- build: the extension for sm_90 only, in place. Beside it, the warm-up fills Triton's cache (it imports the
#    package before the .so exists, so its routing takes the plain-torch fallback; the compiled kernels are the same).
if [ "$DRY_RUN" = 1 ]; then
    say "build: skipped in a dry run (CI builds the extension with make); checking that setup.py loads"
    "$PY" setup.py --name > /dev/null || { loud "FAILED: setup.py does not load"; exit 2; }
else
    say "build: TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace (limit $BUILD_LIMIT s), Triton warm-up beside it"
    rm -f clipmoe_kernels/_C*.so
    timeout "$BUILD_LIMIT" "$PY" -m bench.gpu_check --warmup > "$BASE.warmup.txt" 2>&1 &
    WARMUP_PID=$!
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} timeout "$BUILD_LIMIT" "$PY" setup.py -q build_ext --inplace \
        > "$BASE.build.txt" 2>&1
    BUILD_RC=$?
    wait "$WARMUP_PID" || echo "NOTE: the Triton warm-up failed (the measurements compile instead): $(tail -n 3 "$BASE.warmup.txt")"
    say "build exit status $BUILD_RC"
    tail -n 5 "$BASE.build.txt"
    if "$PY" -c "import clipmoe_kernels as k, sys; sys.exit(0 if k.available_ops()['cuda'] else 1)"; then
        CUOBJDUMP=$(command -v cuobjdump || "$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
        if [ -x "$CUOBJDUMP" ]; then
            ARCHS=$("$CUOBJDUMP" --list-elf clipmoe_kernels/_C*.so 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')
            echo "extension device code: ${ARCHS:-none found}"
            case "$ARCHS" in *sm_90*) ;; *) loud "FAILED: the extension has no sm_90 code"; STATUS=2 ;; esac
        fi
    else
        tail -n 40 "$BASE.build.txt"
        loud "FAILED: the extension has no CUDA ops (build exit $BUILD_RC, its log above): the triton and torch providers and the triton backend are NOT measured (they would fall back to host-synchronising routing)"
        MEASURE_FLAGS+=(--no-extension)
        STATUS=2
    fi
    rm -f "$BASE.build.txt" "$BASE.warmup.txt"  # their tails are in the log; $OUT holds at most 8 files
fi

# -- wheels: open_clip and friends for the end-to-end and encode phases, into a temporary target (never over the image's own).
SITE=""
if ls bench/wheels/*.whl > /dev/null 2>&1; then
    SITE=$(mktemp -d -t clipmoe-site.XXXXXX)
    say "wheels: installing bench/wheels offline into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" bench/wheels/*.whl; then
        echo "NOTE: the wheels did not install: the end-to-end and encode phases are skipped"; SITE=""
    fi
else
    say "wheels: bench/wheels is not here (bash bench/gpu_wheels.sh makes it); the end-to-end and encode phases need an installed open_clip"
fi

# -- measurements
BUDGET=$(( TOTAL_LIMIT - $(elapsed) - TESTS_LIMIT - RESERVE ))
say "measurements (budget $BUDGET s) -> $BASE.json"
PYTHONPATH="$PWD${SITE:+:$SITE}" timeout -k 5 $(( BUDGET + 15 )) "$PY" -m bench.gpu_check --json "$BASE.json" \
    --budget-s "$BUDGET" "${MEASURE_FLAGS[@]}"
RC=$?
[ "$RC" -ne 0 ] && { loud "measurements: exit status $RC (see ERROR lines above)"; [ "$STATUS" -eq 0 ] && STATUS=1; }

# -- gpu tests: what only a GPU checks (bf16, determinism, compile, graph capture, int32 bound, encode under
#    autocast), torch and triton only: the tests run without the wheels, with open_clip, ftfy and webdataset
#    blocked as on the bare machine.
LEFT=$(( TOTAL_LIMIT - $(elapsed) - RESERVE ))
[ "$LEFT" -gt "$TESTS_LIMIT" ] && LEFT=$TESTS_LIMIT
TEST_FLAGS=(-p bench.without_extras -p no:cacheprovider -q -rfEs --junitxml "$BASE-tests.xml")
if [ "$DRY_RUN" = 0 ]; then
    "$PY" -c "import xdist" 2> /dev/null && TEST_FLAGS+=(-n 8)        # compiles in parallel: 16 cores
    "$PY" -c "import pytest_timeout" 2> /dev/null && TEST_FLAGS+=(--timeout 120)
fi
if [ "$LEFT" -lt 20 ]; then
    loud "gpu tests: NOT RUN, only $LEFT s left"; STATUS=1
else
    say "gpu tests: pytest tests -m gpu (limit $LEFT s)"
    # SIGINT at the limit: pytest stops as on Ctrl-C and still writes the JUnit XML of the tests that ran.
    timeout -s INT -k 10 "$LEFT" "$PY" -m pytest tests -m gpu "${TEST_FLAGS[@]}"
    RC=$?
    case "$RC" in
        0) ;;
        124|137|130|2) loud "gpu tests: stopped at the limit ($LEFT s) or interrupted (exit $RC)"; [ "$STATUS" -eq 0 ] && STATUS=1 ;;
        *) loud "gpu tests: pytest exit status $RC"; [ "$STATUS" -eq 0 ] && STATUS=1 ;;
    esac
fi

# -- tables
say "tables"
if [ -s "$BASE.json" ]; then
    XML=(); [ -s "$BASE-tests.xml" ] && XML=(--tests-xml "$BASE-tests.xml")
    "$PY" -m bench.gpu_table "$BASE.json" "${XML[@]}" --plot || { loud "FAILED: bench.gpu_table"; STATUS=1; }
else
    loud "FAILED: no results JSON was written"; STATUS=1
fi
[ -n "$SITE" ] && rm -rf "$SITE"
say "done: exit status $STATUS, files: $(ls "$RESULTS" | grep "^$NAME" | tr '\n' ' ')"
if [ "$DRY_RUN" = 1 ] && [ -z "${OUT:-}" ]; then  # a passing dry run's temporary folder is of no further use
    if [ "$STATUS" -eq 0 ]; then rm -rf "$RESULTS"; else echo "the dry run's files are kept in $RESULTS"; fi
fi
[ "$DRY_RUN" = 0 ] && echo "next, here: python -m bench.fold_readme <fetched>/$NAME.json, then commit bench/results and README.md"
exit "$STATUS"
