#!/usr/bin/env bash
# One prepared device call for a session that is lent an H100/H200 (issue 6): build the extension with CUDA, run the
# GPU-marked tests, run every bench suite side by side, and leave the logs and results under $OUT (<= 8 files).
#
#   device run:  bash bench/gpu_session.sh        (timeout_s ~570; the device budget is 15 minutes a session)
#
# Then, here: unpack $OUT/results.tgz over the checkout, commit bench/results/<gpu-name>/, and fill the README's
# performance table from summary.md. The GPU machine has torch/triton/transformers/pytest/hypothesis but no mteb or
# datasets: only the op tests (attention, pooling, infonce, soup, model) are collected there. `python3 -P`: the
# repository root must not be on sys.path (its kernels/ folder would look like the kernel hub to transformers).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kalm_fast_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# ~2-3 min: CMake + nvcc for sm_90 only (the machine's arch)
if ! KALM_FAST_CUDA=1 KALM_FAST_CUDA_ARCHS=90 python3 -m pip install --no-build-isolation --no-deps -e . \
        > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
fi

timeout 200 python3 -P -m pytest -m gpu -q -p no:cacheprovider tests/test_attention.py tests/test_pooling.py \
    tests/test_infonce.py tests/test_soup.py tests/test_model.py 2>&1 | tee "$OUT/gpu_tests.log"

timeout 280 python3 -m bench --device cuda 2>&1 | tee "$OUT/bench.log"
tar czf "$OUT/results.tgz" bench/results
