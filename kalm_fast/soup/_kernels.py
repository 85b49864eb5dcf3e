"""The accumulate / cast kernels: kalm_fast._C (C++ threads, CUDA multi-tensor launches) or torch ops that
round identically."""

from __future__ import annotations

import functools
import os
import struct
import warnings

import torch

# ----------------------------------------------------------------------------------------------------------------
# kernels: kalm_fast._C or torch, same bits
# ----------------------------------------------------------------------------------------------------------------

_REBUILD = "rebuild it with `python setup.py build_ext --inplace` (or `pip install -e .`) in the kalm_fast checkout"


@functools.cache
def _load_ext():
    """kalm_fast._C, or None (with a one-time warning) when it is not built; KALM_FAST_BACKEND=torch forces None."""
    if os.environ.get("KALM_FAST_BACKEND", "").lower() == "torch":
        return None
    try:
        from kalm_fast import _C
    except ImportError as e:
        warnings.warn(f"kalm_fast._C is not available ({e}); the soup runs on the slower torch fallback: {_REBUILD}",
                      RuntimeWarning, stacklevel=3)
        return None
    return _C


@functools.cache
def _warn_no_cuda_ext():
    warnings.warn(f"kalm_fast._C was built without CUDA; the CUDA soup runs on the torch fallback: {_REBUILD} on a "
                  "machine with nvcc", RuntimeWarning, stacklevel=4)


class _Kernels:
    """``acc (+)= w * x`` into fp32 and the final rounded cast, for lists of 1-D tensors on one device.

    accumulate(items, w, first): items (acc fp32, comp fp32 | None, x bf16/fp16/fp32); ``first`` overwrites acc
        (and comp) instead of adding. With comp: the compensated step of csrc/soup_math.h (exact products of bf16/fp16
        inputs through the weight split w = hi + lo, Kahan-Babuska-Neumaier sums).
    cast(items, divisor): items (acc, comp | None, dst); dst = RNE((acc + comp) / divisor) in dst's dtype, every NaN
        as the dtype's one canonical quiet NaN (fp32 0x7fc00000, bf16 0x7fc0, fp16 0x7e00).
    The torch path performs the same IEEE fp32 operations in the same order as the extension (which builds without
    FMA contraction), so both give identical bits.
    """

    def __init__(self, device: torch.device):
        self.device = device
        ext = _load_ext()
        if ext is not None and device.type == "cuda" and not ext.compiled_with_cuda:
            _warn_no_cuda_ext()
            ext = None
        self.ext = ext

    def _code(self, dtype: torch.dtype) -> int:
        return {torch.float32: self.ext.DTYPE_F32, torch.float16: self.ext.DTYPE_F16,
                torch.bfloat16: self.ext.DTYPE_BF16}[dtype]

    def _entries(self, items) -> list[tuple[int, int, int, int, int]]:
        return [(a.data_ptr(), 0 if c is None else c.data_ptr(), x.data_ptr(), x.numel(), self._code(x.dtype))
                for a, c, x in items if x.numel()]

    def accumulate(self, items, weight: float, first: bool) -> None:
        if self.ext is None:
            for acc, comp, x in items:
                _torch_accumulate(acc, comp, x, weight, first)
        elif self.device.type == "cuda":
            with torch.cuda.device(self.device):  # the extension launches on the current device
                self.ext.cuda_accumulate(self._entries(items), weight, first,
                                         torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.ext.cpu_accumulate(self._entries(items), weight, first, torch.get_num_threads())

    @property
    def fused(self) -> bool:
        """Whether ``soup`` runs: the extension's one-pass CPU soup (absent from builds older than issue 13)."""
        return self.ext is not None and self.device.type == "cpu" and hasattr(self.ext, "cpu_soup")

    def soup(self, items, weights: list[float], divisor: float, compensated: bool) -> None:
        """items (dst, [x_0, ..., x_K-1]): dst = RNE(sum_k weights[k] x_k / divisor), the same bits as accumulate
        over k then cast, in one pass over L1-sized tiles (CPU extension only, see ``fused``)."""
        outputs, sources = [], []
        for dst, xs in items:
            if dst.numel():
                outputs.append((dst.data_ptr(), dst.numel(), self._code(dst.dtype)))
                sources += [(x.data_ptr(), self._code(x.dtype)) for x in xs]
        self.ext.cpu_soup(outputs, sources, weights, divisor, compensated, torch.get_num_threads())

    def cast(self, items, divisor: float) -> None:
        if self.ext is None:
            div = torch.tensor(divisor, dtype=torch.float32, device=self.device)
            for acc, comp, dst in items:
                total = acc if comp is None else torch.where(torch.isfinite(acc), acc + comp, acc)
                # a 0-dim device tensor: torch divides by a CPU scalar as a multiplication by its reciprocal on CUDA
                total = total / div
                dst.copy_(total)
                # NaN as the one canonical NaN of dst's dtype (csrc/soup_math.h): torch's casts keep or make other
                # patterns, and differ by backend
                ints, nan = _CANONICAL_NAN[dst.dtype]
                dst.view(ints).masked_fill_(total.isnan(), nan)
        elif self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self.ext.cuda_cast(self._entries(items), divisor, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.ext.cpu_cast(self._entries(items), divisor, torch.get_num_threads())


# the NaN bit pattern of every soup output, as a signed integer of the dtype's width (csrc/soup_math.h)
_CANONICAL_NAN = {torch.float32: (torch.int32, 0x7FC00000), torch.bfloat16: (torch.int16, 0x7FC0),
                  torch.float16: (torch.int16, 0x7E00)}


def _weight_split(w: float) -> tuple[float, float]:
    """w32 = hi + lo exactly, w32 the fp32 the extension receives for the Python float ``w`` and hi its top 13
    significant bits (csrc/soup_math.h weight_hi): hi * x and lo * x are exact in fp32 for bf16/fp16 x, so the
    compensated sum sees exact products. (``w - hi`` in double would keep w's bits below fp32: lo would then differ
    from the extension's for every weight that is not an fp32, e.g. 0.3.)"""
    w32 = struct.unpack("<f", struct.pack("<f", w))[0]
    hi = struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", w32))[0] & 0xFFFFF800))[0]
    return hi, w32 - hi


def _torch_accumulate(acc, comp, x, weight: float, first: bool) -> None:
    xf = x.float()  # exact upcast
    if comp is None:
        y = xf * weight  # the product rounded once in fp32
        acc.copy_(y) if first else acc.add_(y)
        return
    hi, lo = _weight_split(weight)
    terms = [xf * hi, xf * lo] if lo else [xf * hi]
    if first:
        acc.copy_(terms.pop(0))
        comp.zero_()
    for y in terms:  # Neumaier: t = s + y, whose rounding error is recovered exactly with the larger operand first
        t = acc + y
        comp.add_(torch.where(acc.abs() >= y.abs(), (acc - t) + y, (y - t) + acc))
        acc.copy_(t)
