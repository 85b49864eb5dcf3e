#!/usr/bin/env bash
# The GPU machine's software stack, on CPU, before a GPU window is spent (issue 11, item 5: the one device call must
# not fail on an import). The lent H100/H200 has Python 3.12, torch 2.11.0, triton 3.6.0, transformers 5.17.0,
# sentence-transformers 6.0.1, numpy 2.5.2 and no mteb, datasets or Hugging Face `kernels` (device tool, KINDS.md,
# 2026-11); CI and this machine have Python 3.11, torch 2.13, triton 3.9, transformers 5.2x. This script builds that
# stack in a venv (about 4 GB from PyPI, a minute or two; kept for the next run) and runs, on a copy of the working
# tree, every step of bench/gpu_session.sh that needs no GPU, the way that script runs it:
#   1. the extension build (pip install --no-build-isolation -e ., CUDA included when nvcc is here)
#   2. the compile smoke for sm_90 under triton 3.6 (exit status = the GPU session's fail-fast gate)
#   2b. the kernel-cache warm-up (bench.compile --warm), its InfoNCE part into a scratch cache (the whole set is
#      ~1,400 launches: minutes on 16 cores, too long for 2)
#   3. the op tests that gpu_session.sh collects (python3 -P -m pytest), on CPU in the interpreter: triton 3.6's
#      interpreter needs numpy < 2.4 (triton-lang/triton#9171), so this step alone sees numpy 2.3 through PYTHONPATH
#   4. the peers' wheels (bench/peer_wheels.sh, installed as gpu_session.sh installs them) and their imports from the
#      repository root
#   5. python3 -m bench --smoke from the repository root (every suite, CPU shapes)
#   6. bash bench/gpu_session.sh --dry-run
# Usage: bash bench/gpu_stack_check.sh   (PYTHON312=/path/to/python3.12 and GPU_STACK_VENV=dir override the defaults)
# Exit status: the number of failed steps. Logs: $GPU_STACK_WORK/*.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON312:-python3.12}
# a pyenv shim answers `command -v` but may not run: probe it, then look for an installed 3.12
"$PY" -c "" 2> /dev/null || PY=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2> /dev/null | tail -1)
VENV=${GPU_STACK_VENV:-/tmp/kalm_fast_gpu_stack}
WORK=${GPU_STACK_WORK:-/tmp/kalm_fast_gpu_stack_work}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1
START=$SECONDS

if [ ! -x "$VENV/bin/python3" ] || [ ! -d "$VENV/np23" ]; then
    [ -n "$PY" ] && "$PY" -c "" 2> /dev/null || { echo "needs Python 3.12 (set PYTHON312=...)"; exit 100; }
    "$PY" -m venv "$VENV" || exit 100
    "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 sentence-transformers==6.0.1 \
        safetensors==0.8.0 huggingface_hub==1.33.0 tokenizers==0.23.2 numpy==2.5.2 accelerate==1.15.0 \
        pytest hypothesis pybind11 cmake ninja setuptools wheel > "$VENV.install.log" 2>&1 \
        || { tail -5 "$VENV.install.log"; exit 100; }
    "$VENV/bin/pip" install -q --target "$VENV/np23" "numpy<2.4" > /dev/null 2>&1 || exit 100
fi
"$VENV/bin/python3" -c "import sys, torch, triton, transformers, numpy
print('stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'numpy', numpy.__version__)"

# the working tree as a device call sends it: tracked and untracked files that git does not ignore
rm -rf "$WORK" && mkdir -p "$WORK/repo"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2> /dev/null \
    | tar -xf - -C "$WORK/repo" || { echo "could not copy the working tree to $WORK/repo"; exit 100; }
cd "$WORK/repo"
export PATH="$VENV/bin:$PATH"
FAILED=0
step() {  # step NAME COMMAND...: run, log to $WORK/NAME.log, print one line
    local name=$1 t=$SECONDS; shift
    if "$@" > "$WORK/$name.log" 2>&1; then echo "ok    $name ($((SECONDS - t)) s)"
    else echo "FAIL  $name ($((SECONDS - t)) s): $WORK/$name.log"; tail -5 "$WORK/$name.log" | sed 's/^/      /'
        FAILED=$((FAILED + 1)); fi
}
step build env KALM_FAST_CUDA_ARCHS=90 python3 -m pip install --no-build-isolation --no-deps -e .
step compile_smoke python3 -m bench.compile --smoke --arch sm_90 --jobs "$(nproc)"
step warm env TRITON_CACHE_DIR="$WORK/triton_cache" python3 -m bench.compile --warm --arch sm_90 --op infonce \
    --jobs "$(nproc)"
step op_tests env PYTHONPATH="$VENV/np23" python3 -P -m pytest -q -p no:cacheprovider tests/test_attention.py \
    tests/test_pooling.py tests/test_infonce.py tests/test_launch.py tests/test_soup.py tests/test_model.py \
    tests/test_torch_compile.py
step peer_wheels bash bench/peer_wheels.sh
step peer_install python3 -m pip install --no-index --no-deps .whl/*.whl
step peer_imports python3 -c "import inf_cl, mergekit.merge"
step bench_smoke python3 -m bench --smoke --no-write --no-plots
step dry_run bash bench/gpu_session.sh --dry-run
echo "gpu stack check: $FAILED failed step(s) in $((SECONDS - START)) s (logs in $WORK)"
exit "$FAILED"
