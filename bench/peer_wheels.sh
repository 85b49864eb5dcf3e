#!/usr/bin/env bash
# Wheels of the bench's peers for the GPU machine (no network there, Python 3.12): run here, then pass `.whl` in the
# device run's carry; bench/gpu_session.sh installs them with --no-index --no-deps before the bench (issue 13, item 3).
#   inf-cl    Inf-CL's Triton contrastive loss (the loss suite's peer)
#   mergekit  linear merge (the soup suite's peer) and what `import mergekit.merge` needs that the GPU machine lacks
#             as far as we know (pydantic, immutables, accelerate, peft, click, psutil, sentencepiece, protobuf).
# Left out: flash-attn-4 (nvidia-cutlass-dsl is ~96 MB, more than one transfer) and flash-attn 2 (no wheel for the
# machine's torch); scipy and boto3 (large; mergekit may then fail to import there: the bench's row says why).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d .whl \
    inf-cl mergekit immutables accelerate pydantic pydantic-core annotated-types typing-inspection click psutil \
    peft sentencepiece protobuf
du -sh .whl
