"""Small helpers shared by the Triton kernels: constants, the interpreter switch, the arch key of the pinned-config
tables, the pinned/autotuned launch of a table row, input layout and dot precision, the device guard of the
launchers and a device-side binary search (``lower_bound``). Nothing here touches CUDA at import time."""

from __future__ import annotations

import functools
import math
import os
import re

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E); kernels take tl.constexpr(LOG2E) (jit globals must be constexpr)
LN2 = math.log(2.0)  # ln(x) = log2(x) * LN2
AUTOTUNE_MAX = 4  # KALM_FAST_AUTOTUNE=1 benchmarks at most this many surviving configs per key (cold-GPU budget)

def interpreting() -> bool:
    """True under the Triton CPU interpreter (TRITON_INTERPRET=1). The interpreter computes bf16 arithmetic wrongly,
    so kernels take this as a constexpr and upcast loaded tiles to fp32 when it is set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.5.0rc1" or "3.7.0+git1a2b"."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter of ``triton_version`` cannot run these kernels beside ``numpy_version``, or None.
    Triton before 3.7 turns a scalar of a kernel (a loop bound, say) into a Python int with ``int()`` of a
    1-element array, which numpy 2.4 and later refuse (triton-lang/triton#9171, fixed in 3.7); every launch then
    fails deep inside the interpreter with "only 0-dimensional arrays can be converted to Python scalars". torch 2.11
    pins triton 3.6, and numpy 2.4 is what a fresh install of Python 3.11 or later gets."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1: the Triton interpreter of triton {triton_version} cannot run with numpy "
                f"{numpy_version} (triton < 3.7 calls int() on 1-element arrays, which numpy >= 2.4 refuses: "
                "triton-lang/triton#9171). Install numpy<2.4, or triton>=3.7, or run on a CUDA device.")
    return None


@functools.cache
def _check_interpreter() -> None:
    problem = interpreter_problem(triton.__version__, np.__version__)
    if problem:
        raise RuntimeError(problem)


def autotuning() -> bool:
    """KALM_FAST_AUTOTUNE=1: autotune over the configs that compiled without spills (bench/compile.py). The default
    (0) launches the pinned config of each table: the same tiles in every process and rank, so results are
    bitwise reproducible across processes and restarts."""
    return os.environ.get("KALM_FAST_AUTOTUNE", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _device_facts(index: int) -> tuple[int, int, int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return props.major, smem, props.multi_processor_count


def device_arch(device: torch.device) -> str:
    """Key of the pinned-config tables: "interpreter", "sm_90" (Hopper: wgmma), "sm_100" (Blackwell datacenter,
    major 10: tcgen05) or "sm_80" (every other major: Ampere, Ada and consumer Blackwell sm_120, which have mma.sync
    tensor cores and ~100-164 KB of shared memory). Each table row was compiled for that arch (bench/compile.py);
    ``pick`` falls back to a smaller row where the device has less shared memory."""
    if interpreting():
        return "interpreter"
    major = _device_facts(_index(device))[0]
    return {9: "sm_90", 10: "sm_100"}.get(major, "sm_80")


def shared_memory_optin(device: torch.device) -> int:
    """Opt-in shared memory per block of the device (sm_86/sm_89 have less than the sm_80 the table was built for)."""
    return _device_facts(_index(device))[1]


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device (132 on an H100/H200 SXM), what the launch plans size their grids against; 1 elsewhere
    (the interpreter runs programs one by one, the compile capture launches nothing)."""
    return _device_facts(_index(device))[2] if device.type == "cuda" else 1


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def pick(table: dict, key: tuple, device: torch.device) -> tuple:
    """The pinned row of ``table[key]`` (its first config) when the device has the shared memory the compile table
    measured; else the first surviving config that fits the device (e.g. the sm_80 table on an sm_86)."""
    rows = table[key]
    smem = shared_memory_optin(device)
    for row in rows:
        if row[-1] <= smem:
            return row
    return min(rows, key=lambda r: r[-1])


def input_guard(fn):
    """Run a launcher on the device of its first CUDA tensor argument (Triton launches on the *current* device, so
    tensors on cuda:1 while cuda:0 is current would otherwise be read from the wrong GPU). Like fla's input_guard.
    Off CUDA under the interpreter it first checks that this Triton's interpreter can run here
    (``interpreter_problem``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and x.is_cuda:
                with torch.cuda.device(x.device):
                    return fn(*args, **kwargs)
        if interpreting():
            _check_interpreter()  # a clear error instead of one from deep inside an old interpreter
        return fn(*args, **kwargs)

    return wrapper


def dtype_class(dtype: torch.dtype) -> str:
    """Dtype key of the pinned tables: "fp32" (exact FMA dots, own tiles) or "16bit" (bf16/fp16, tensor cores)."""
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs get true fp32 products ("ieee"; tf32 would add ~1e-3 relative error);
    fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (the kernels take the other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def register_budget(programs_per_sm: int, num_warps: int) -> int:
    """ptxas's register budget a thread (``maxnreg``) that keeps ``programs_per_sm`` programs of ``num_warps`` warps
    resident as far as registers go: 64K registers an SM (sm_80 to sm_100), allocated in multiples of 8 a thread, at
    most 255 a thread."""
    return min(255, 65536 // (programs_per_sm * 32 * num_warps) // 8 * 8)


def config_kwargs(names: tuple[str, ...], row: tuple, maxnreg=None) -> dict:
    """A table row (tile sizes named by ``names``, num_warps, num_stages[, shared memory bytes]) as launch kwargs,
    with ptxas's register budget ``maxnreg(num_warps)`` where one is given."""
    n = len(names)
    kw = {**dict(zip(names, row[:n])), "num_warps": row[n], "num_stages": row[n + 1]}
    return {**kw, "maxnreg": maxnreg(row[n])} if maxnreg else kw


class Pinned:
    """``kernel[grid](*args, **kw)`` with one config's compile-time arguments added: the same tiles in every process
    and rank (the default launch of a table row)."""

    def __init__(self, kernel, config: dict):
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel[grid](*args, **kw, **self.config)


_TUNERS: dict = {}  # (op, table key) -> triton Autotuner: one per key, so each keeps its own cache


def _autotuner(op: str, key: tuple, kernel, rows: list[tuple], names: tuple[str, ...], tune_key: list[str],
              heuristics: dict | None = None, maxnreg=None):
    """The autotuner of ``kernel`` over the first AUTOTUNE_MAX ``rows`` of its pinned table (KALM_FAST_AUTOTUNE=1),
    built once per (op, key); ``heuristics`` derive further compile-time arguments from the tuned config."""
    tuner = _TUNERS.get((op, key))
    if tuner is None:
        launches = [config_kwargs(names, row, maxnreg) for row in rows[:AUTOTUNE_MAX]]  # as a pinned launch has them
        configs = [triton.Config({n: kw.pop(n) for n in names}, **kw) for kw in launches]
        tuned = triton.heuristics(heuristics)(kernel) if heuristics else kernel
        tuner = _TUNERS[(op, key)] = triton.autotune(configs=configs, key=tune_key)(tuned)
    return tuner


def launchable(op: str, kernel, table: dict, key: tuple, row: tuple, names: tuple[str, ...], tune_key: list[str],
               heuristics: dict | None = None, maxnreg=None):
    """``kernel[grid](...)``-able object for ``row`` of the op's pinned ``table`` at ``key`` = (kind, arch, ...):
    that row (the pinned config or the launch plan's choice: the same tiles in every process) by default, the
    autotuner over the first AUTOTUNE_MAX rows of ``table[key]`` with KALM_FAST_AUTOTUNE=1 on a GPU. ``maxnreg``:
    num_warps -> the register budget a thread handed to ptxas with each row (None: ptxas chooses)."""
    if key[1] != "interpreter" and autotuning():
        return _autotuner(op, key, kernel, table[key], names, tune_key, heuristics, maxnreg)
    return Pinned(kernel, config_kwargs(names, row, maxnreg))


def chosen_configs() -> dict:
    """{(op, table key): {autotune key: chosen config}} of this process (KALM_FAST_AUTOTUNE=1), for the record."""
    return {k: {tk: str(c) for tk, c in tuner.cache.items()} for k, tuner in _TUNERS.items() if tuner.cache}


@triton.jit
def lower_bound(SORTED, n, value):
    """First index i in [0, n) with SORTED[i] >= value (n if none); SORTED is non-decreasing."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(SORTED + mid) < value:
            lo = mid + 1
        else:
            hi = mid
    return lo
