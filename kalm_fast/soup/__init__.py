"""Streaming model soup (SPEC 4.4): weighted parameter averaging of checkpoints, tensor by tensor.

    soup(["run-a", "run-b", "run-c"], "souped", weights=[2, 1, 1])     # HF folders or .safetensors files
    acc = SoupAccumulator(compensated=True)                              # in memory, e.g. during training
    acc.add(model_a); acc.add("ckpt.safetensors", weight=0.5); acc.load_into(model)
    best = greedy_soup([sd_a, sd_b, sd_c], evaluate)                     # Wortsman et al. 2022

Numerics: the soup is ``sum_i w_i x_i / sum_i w_i`` accumulated in fp32 (the weights are scaled so the largest is 1,
and rounded to fp32 once), then cast with round-to-nearest-even to the output dtype (per tensor the first input's,
unless ``dtype`` is given). Only F32, F16 and BF16 tensors can be averaged; any other dtype is an error.
Compensated accumulation (the default of ``soup``, ``SoupAccumulator(compensated=True)``) keeps a Kahan-Babuska-
Neumaier compensation beside the fp32 sum and splits each weight so products of bf16/fp16 inputs are exact: the
error no longer grows with the number of checkpoints nor with cancellation between them (see csrc/soup_math.h).

Memory: ``soup`` streams element chunks (``_CHUNK_CPU`` elements, several small tensors per chunk, large tensors
split): each input's bytes are read with ``os.preadv`` at the offsets of the safetensors header into a few reused
staging buffers (no mmap, so no file pages stay mapped) by a background thread while the previous chunk is
computed, and a second thread writes the previous output chunk. On CPU every input's piece of a chunk is staged, then
summed and cast in one pass over L1-sized tiles (``kalm_fast._C.cpu_soup``: no chunk-sized fp32 accumulator goes
through memory). Peak RSS is the interpreter + torch plus <= 28 MB of buffers on CPU (the chunk shrinks with the
number of inputs), whatever the model size.

Kernels: ``kalm_fast._C`` (C++ threads on CPU; one CUDA launch for many tensors on GPU, with host reads and H2D copies
overlapped with compute through pinned buffers, a copy stream and events). Without the extension the same code runs on
torch ops that round identically (same bits), after a one-line warning saying how to rebuild.

Reliability: everything is checked before anything is written; the output is written into a temporary sibling and
renamed into place, so a failure leaves no partial output (and a replaced output intact); inputs are only read.
"""

from __future__ import annotations

import sys
import types

from kalm_fast.soup._accumulate import GreedySoupResult, SoupAccumulator, greedy_soup
from kalm_fast.soup._files import soup
from kalm_fast.soup._format import SoupError

# Layout: _format (headers, checkpoints, SoupError), _checks (arguments), _kernels (extension or torch), _stream
# (read-ahead / write-behind engine), _files (soup()), _accumulate (SoupAccumulator, greedy_soup).
__all__ = ["soup", "SoupAccumulator", "greedy_soup", "GreedySoupResult", "SoupError"]


class _CallableModule(types.ModuleType):
    """``kalm_fast.soup`` names both this module and its main function (SPEC 4.4); whichever of the two an import
    order leaves as the package attribute, ``kalm_fast.soup(inputs, output, ...)`` calls the function."""

    def __call__(self, *args, **kwargs):
        return soup(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
