"""Small helpers shared by the Triton kernels: interpreter switch, the arch key of the pinned-config tables, the
autotune switch and the device guard of the launchers. Nothing here touches CUDA at import time."""

from __future__ import annotations

import functools
import os

import torch

# Opt-in shared memory per block (bytes) of the archs the pinned tables are compiled for (bench/compile.py).
SHARED_MEMORY_OPTIN = {"sm_80": 166_912, "sm_90": 232_448}


def interpreting() -> bool:
    """True under the Triton CPU interpreter (TRITON_INTERPRET=1). The interpreter computes bf16 arithmetic wrongly,
    so kernels take this as a constexpr and upcast loaded tiles to fp32 when it is set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    """Key of the pinned-config tables: "interpreter", "sm_90" (Hopper and newer) or "sm_80" (Ampere, Ada)."""
    if interpreting():
        return "interpreter"
    major = _device_facts(_index(device))[0]
    return "sm_90" if major >= 9 else "sm_80"


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
    tensors on cuda:1 while cuda:0 is current would otherwise be read from the wrong GPU). Like fla's input_guard."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and x.is_cuda:
                with torch.cuda.device(x.device):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
