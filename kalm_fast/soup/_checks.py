"""Argument checks of the public soup API: dtypes, weights, devices, the output path."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from kalm_fast.soup._format import _DTYPE_NAMES, _ST_NAME

# ----------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------


def _as_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _ST_NAME:
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"{name} must be one of {', '.join(_DTYPE_NAMES)} (or a torch dtype), got {dtype!r}")


def _as_weight(w, name: str) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {w!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {w}")
    return w


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _normalized_weights(weights, n: int) -> tuple[list[float], float]:
    """(w_i / max w rounded to fp32, their sum rounded to fp32): the soup is sum w_i x_i / sum w_i."""
    if weights is None:
        return [1.0] * n, float(n)
    weights = [_as_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} values for {n} inputs")
    if max(weights) == 0.0:
        raise ValueError("weights must have a positive sum, got all zeros")
    top = max(weights)
    scaled = [_fp32(w / top) for w in weights]
    return scaled, _fp32(math.fsum(scaled))


def _as_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _check_output(output: Path, checkpoints_paths: Sequence[Path], input_files: Iterable[Path], overwrite: bool,
                  is_folder: bool) -> None:
    out = _real(output)
    for p in checkpoints_paths:
        rp = _real(p)
        if out == rp or rp in out.parents:
            raise ValueError(f"output {output} is inside (or is) the input {p}; inputs are never modified")
        if out in rp.parents:
            raise ValueError(f"the input {p} is inside the output {output}; writing the output would destroy it")
    for f in input_files:  # through symlinks, e.g. a Hugging Face cache snapshot pointing into blobs/
        if out in _real(f).parents or out == _real(f):
            raise ValueError(f"the input file {f} is inside the output {output}; writing the output would destroy it")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {output} exists; pass overwrite=True (--overwrite) to replace it")
        if not is_folder and output.is_dir():
            raise ValueError(f"output {output} is a folder but inputs[0] is a single file: give a .safetensors path")
    if not is_folder and output.suffix != ".safetensors":
        raise ValueError(f"inputs[0] is a single .safetensors file, so output must be a .safetensors path, got "
                         f"{output}")
