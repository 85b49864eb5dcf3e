#!/usr/bin/env bash
# One prepared device call for a session lent an H100/H200 (issues 6 and 11): <= 9 minutes wall on a cold machine,
# compiles included, everything under $OUT (<= 8 files).
#
#   device run:  KALM_FAST_GIT_SHA=<`git rev-parse --short HEAD` here> bash bench/gpu_session.sh
#                (timeout_s 570: the script keeps its own 530 s budget; the machine's copy of the tree has no .git,
#                so the sha every result row records is given)
#   here (CPU):  bash bench/gpu_session.sh --dry-run  (the plan, the kernels to compile, the estimated time)
#
# Peers (issue 13): run bench/peer_wheels.sh here first and pass `.whl` in the run's carry (6.5 MB of wheels).
# Before the call: `bash bench/gpu_stack_check.sh` runs every step below that needs no GPU under this machine's
# Python/torch/triton/transformers versions on the CPU (0 failed steps, or the window is spent on an import error).
# Order: the extension builds in the background; compile smoke (pinned configs for sm_90 under the machine's Triton;
# fail fast), the kernel-cache warm-up in the background, GPU tests on the pinned configs (the default,
# KALM_FAST_AUTOTUNE unset), every bench suite, then the attention suite once more with KALM_FAST_AUTOTUNE=1 (at most 4
# surviving configs per key; the chosen configs are printed). Each step gets what is left of the budget, capped.
# Then, here: unpack $OUT/results.tgz over the checkout, commit bench/results/<gpu-name>/ and fill the README's
# performance table from summary-pinned.md.
# The GPU machine has torch/triton/transformers/pytest/hypothesis but no mteb or datasets: only the op tests are
# collected there. `python3 -P`: the repository root must not be on sys.path (its kernels/ folder would look like the
# kernel hub to transformers); bench.compile runs with -m from the root on purpose (it imports the installed package).
set -uo pipefail
# one kernel cache for the warm-up, the tests and the bench (Triton's default location unless one is set)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET=530
START=$SECONDS
# step name, cap in seconds (what is left of the budget when smaller)
STEPS=("build kalm_fast._C for sm_90, in the background|240" "compile smoke (sm_90, pinned)|60"
       "warm the kernel cache, in the background|300"
       "GPU tests of the Triton ops, pinned configs|150" "GPU tests of soup, model, torch.compile|60"
       "bench, every suite, pinned, --budget-s|150" "bench attention, KALM_FAST_AUTOTUNE=1|50")

left() { local l=$((BUDGET - (SECONDS - START))); [ "$1" -lt "$l" ] && echo "$1" || echo "$((l > 5 ? l : 5))"; }

if [ "${1:-}" = "--dry-run" ]; then
    echo "plan (budget ${BUDGET} s wall, caps per step):"
    for s in "${STEPS[@]}"; do printf '  %-45s <= %4s s\n' "${s%%|*}" "${s##*|}"; done
    python3 -m bench.compile --estimate
    python3 - <<'EOF'
from bench import compile as bc
jobs = bc.make_jobs(bc.smoke_variants(), ["sm_90"], search=False)
print(f"compile smoke: {len(jobs)} kernel compiles for sm_90 (the same rows on the GPU machine's 16 cores)")
warm = {(j["kernel"], j["variant"]["dtype"], bc.variant_name(j["variant"]), j["config_str"])
        for pinned in (False, True) for j in bc.make_jobs(bc.warm_variants(), ["sm_90"], search=False,
                                                           all_pinned=pinned)}
print(f"cache warm-up (background, 10 processes): {len(warm)} launches for sm_90")
EOF
    exit 0
fi

OUT=${OUT:-/tmp/kalm_fast_gpu}
mkdir -p "$OUT"
[ -n "${KALM_FAST_GIT_SHA:-}" ] || export KALM_FAST_GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "kalm_fast at git ${KALM_FAST_GIT_SHA}" > "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 0. the peers shipped as wheels (bench/peer_wheels.sh here, `.whl` in the run's carry): inf-cl, mergekit
export KALM_FAST_GPU_SESSION=1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install --no-index --no-deps .whl/*.whl > "$OUT/peers.log" 2>&1
    for m in inf_cl mergekit.merge; do
        python3 -c "import $m" >> "$OUT/peers.log" 2>&1 && echo "peer $m: importable" || echo "peer $m: not importable"
    done | tee -a "$OUT/gpu.txt"
else
    echo "no .whl folder: inf-cl and mergekit rows will say they are not installed" | tee -a "$OUT/gpu.txt"
fi

# 1. the extension, sm_90 only (the machine's arch), in the background while the Triton steps run
KALM_FAST_CUDA=1 KALM_FAST_CUDA_ARCHS=90 timeout 240 python3 -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 &
BUILD=$!

# 2. compile smoke: the pinned configs compile for sm_90 with this Triton, no spills (exit 1 otherwise: stop here);
#    the facts stay in the log (--no-write: the committed tables are not rewritten by the machine's copy)
if ! timeout "$(left 60)" python3 -m bench.compile --smoke --arch sm_90 --jobs 12 --no-write \
        > "$OUT/compile_smoke.log" 2>&1; then
    tail -30 "$OUT/compile_smoke.log"
    echo "compile smoke failed: stopping (see compile_smoke.log)"
    kill "$BUILD" 2>/dev/null
    exit 1
fi
tail -3 "$OUT/compile_smoke.log"

# 2b. warm the kernel cache in the background: the launches of bench.compile.warm_variants (the GPU tests' GQA
#     shapes first, then the pinned 16-bit matrix and its alternatives) compiled on 10 of the 16 cores, bound exactly
#     as JITFunction.run binds them; a test or bench launch that finds its kernel there loads it instead of compiling
#     it, one at a time, in its own process (tests/test_compile.py: the runtime's compile of a warmed launch is a hit)
timeout "$(left 300)" python3 -m bench.compile --warm --arch sm_90 --jobs 10 >> "$OUT/compile_smoke.log" 2>&1 &
WARM=$!

# 3. GPU tests of the Triton ops on the pinned configs (pytest -P imports the installed package: they wait for the
#    build unless kalm_fast is already installed on the machine). -v names each test as it starts, so a log cut by the
#    timeout still says which test ran; --durations lists the slowest (cold compiles included), for the next plan.
BUILT=0
wait_build() {
    [ "$BUILT" = 1 ] && return
    wait "$BUILD"; local rc=$?
    echo "build exit $rc after $((SECONDS - START)) s"; tail -3 "$OUT/build.log"; BUILT=1
    if [ "$rc" != 0 ]; then  # the Triton ops need no extension: install without it (the soup rows say it is missing)
        KALM_FAST_NO_EXT=1 timeout "$(left 60)" python3 -m pip install --no-build-isolation --no-deps -e . \
            >> "$OUT/build.log" 2>&1 && echo "installed without kalm_fast._C" || echo "install without _C failed"
    fi
}
python3 -P -c "import kalm_fast.kernels" 2>/dev/null || wait_build
env -u KALM_FAST_AUTOTUNE timeout "$(left 150)" python3 -P -m pytest -m gpu -v --durations=15 -p no:cacheprovider \
    tests/test_attention.py tests/test_pooling.py tests/test_infonce.py tests/test_launch.py 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25

# 4. soup and model (the soup's CUDA path needs the build), then torch.compile over the ops (inductor; last: a cut
#    by the cap costs only it)
wait_build
env -u KALM_FAST_AUTOTUNE timeout "$(left 60)" python3 -P -m pytest -m gpu -v --durations=15 -p no:cacheprovider \
    tests/test_soup.py tests/test_model.py tests/test_torch_compile.py 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -25

# the warm-up stops before the bench: timings do not share the CPU with ten compile processes
if kill -0 "$WARM" 2>/dev/null; then kill "$WARM"; wait "$WARM" 2>/dev/null; fi
grep "^warm:" "$OUT/compile_smoke.log" | tail -2

# 5. every suite, pinned configs; --budget-s shares the step out suite by suite (each stops before its next shape,
#    best shapes first, and lists what it left out) so the timeout, 20 s later, is only a backstop: its SIGTERM stops
#    the suite it finds running, whose rows so far are written with the summary (-k: SIGKILL 10 s later if stuck)
BENCH_S=$(left 150)
env -u KALM_FAST_AUTOTUNE timeout -k 10 "$BENCH_S" python3 -m bench --device cuda --no-plots \
    --budget-s $((BENCH_S > 30 ? BENCH_S - 20 : 10)) > "$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
# this GPU's folder by name (the newest folder could be a committed CPU one when the bench wrote nothing)
GPU_DIR=$(python3 -c "import os; from bench import common; print(os.path.relpath(common.results_dir('cuda')))" \
    2>/dev/null || true)
cp "$GPU_DIR/summary.md" "$GPU_DIR/summary-pinned.md" 2>/dev/null

# 6. autotuning, inside the bench only and capped; the chosen configs are printed at the end of the log
TUNE_S=$(left 50)
KALM_FAST_AUTOTUNE=1 timeout -s INT -k 10 "$TUNE_S" python3 -m bench --device cuda --suite attention --no-plots \
    --budget-s $((TUNE_S > 15 ? TUNE_S - 10 : 5)) > "$OUT/autotune.log" 2>&1
grep "^autotuned" "$OUT/autotune.log"

# this GPU's folder only (unpacked over the checkout here)
[ -n "$GPU_DIR" ] && [ -d "$GPU_DIR" ] && tar czf "$OUT/results.tgz" "$GPU_DIR"
echo "session: $((SECONDS - START)) s of ${BUDGET} s"
