"""kalm_fast: fused Triton/CUDA operators and a lean trainer for bidirectional LLM text-embedding models.

``import kalm_fast`` is light: the public names below are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "flash_attn_varlen_func": "kalm_fast.ops",
    "flash_attn_func": "kalm_fast.ops",
    "unpad_input": "kalm_fast.ops",
    "pad_input": "kalm_fast.ops",
    "masked_mean_pool": "kalm_fast.ops",
    "varlen_mean_pool": "kalm_fast.ops",
    "focal_infonce": "kalm_fast.ops",
    "gather_with_grad": "kalm_fast.distributed",
    "soup": "kalm_fast.soup",
    "SoupAccumulator": "kalm_fast.soup",
    "greedy_soup": "kalm_fast.soup",
    "register": "kalm_fast.model",
    "Embedder": "kalm_fast.model",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kalm_fast' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"kalm_fast.{name}":  # kalm_fast.soup stays the (callable) module whatever the import order
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
