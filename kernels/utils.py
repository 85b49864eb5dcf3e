"""Small helpers shared by the Triton kernels."""

import os

import torch


def interpreting() -> bool:
    """True under the Triton CPU interpreter (TRITON_INTERPRET=1). The interpreter computes bf16 arithmetic wrongly,
    so kernels take this as a constexpr and upcast loaded tiles to fp32 when it is set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_hopper(device: torch.device | None = None) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9
