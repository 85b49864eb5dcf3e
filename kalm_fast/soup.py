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
accumulated, and a second thread writes the previous output chunk. Peak RSS is the interpreter + torch plus seven
chunk-sized buffers (<= 28 MB on CPU), whatever the model size.

Kernels: ``kalm_fast._C`` (C++ threads on CPU; one CUDA launch for many tensors on GPU, with host reads and H2D copies
overlapped with compute through pinned buffers, a copy stream and events). Without the extension the same code runs on
torch ops that round identically (same bits), after a one-line warning saying how to rebuild.

Reliability: everything is checked before anything is written; the output is written into a temporary sibling and
renamed into place, so a failure leaves no partial output (and a replaced output intact); inputs are only read.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import queue
import re
import shutil
import socket
import struct
import sys
import threading
import types
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kalm_fast.atomic import fsync_dir, publish, remove

__all__ = ["soup", "SoupAccumulator", "greedy_soup", "GreedySoupResult", "SoupError"]

# Elements per streamed chunk. The accumulator (+ compensation) of a chunk stays in cache while the inputs stream
# through it (1M: 4 + 4 MB on CPU, measured 1.5x faster than 4M here; 4M: 32 MB within an H100's 50 MB L2).
_CHUNK_CPU = 1 << 20
_CHUNK_CUDA = 1 << 22
_STAGE_SLOTS = 3  # host staging buffers: one being accumulated (or copied to the GPU), two being read ahead
_ALIGN_BYTES = 64  # staging offsets of segments: 16-byte vector loads on the GPU, whole cache lines on the CPU
_ALIGN_ELEMS = 16  # accumulator offsets of segments (64 bytes of fp32)
_MAX_HEADER = 100 * 2**20  # the safetensors format's own header limit

_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAME = {v: k for k, v in _FLOAT.items()}
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8,
}
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# weights of other formats in a model folder: not averaged, so never copied into the soup (it would hold inputs[0]'s)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx")


class SoupError(ValueError):
    """Inputs that cannot be souped; ``problems`` lists every offending file, tensor name, shape and dtype."""

    def __init__(self, problems: Sequence[str], what: str = "cannot soup these inputs"):
        self.problems = list(problems)
        super().__init__(f"{what} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


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
    cast(items, divisor): items (acc, comp | None, dst); dst = RNE((acc + comp) / divisor) in dst's dtype.
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

    def cast(self, items, divisor: float) -> None:
        if self.ext is None:
            div = torch.tensor(divisor, dtype=torch.float32, device=self.device)
            for acc, comp, dst in items:
                total = acc if comp is None else torch.where(torch.isfinite(acc), acc + comp, acc)
                # a 0-dim device tensor: torch divides by a CPU scalar as a multiplication by its reciprocal on CUDA
                dst.copy_(total / div)
        elif self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self.ext.cuda_cast(self._entries(items), divisor, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            self.ext.cpu_cast(self._entries(items), divisor, torch.get_num_threads())


def _weight_split(w: float) -> tuple[float, float]:
    """w = hi + lo exactly, hi = w's top 13 significant bits (csrc/soup_math.h weight_hi): hi * x and lo * x are exact
    in fp32 for bf16/fp16 x, so the compensated sum sees exact products."""
    hi = struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", w))[0] & 0xFFFFF800))[0]
    return hi, w - hi


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


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers and checkpoints (files or Hugging Face folders)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    path: Path  # the .safetensors file holding it
    dtype: str  # safetensors dtype name ("BF16", "I64", ...)
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Header:
    path: Path
    metadata: dict | None
    tensors: list[_TensorInfo]  # in file order


class _Corrupt(Exception):
    pass


def _read_header(path: Path) -> _Header:
    """Parses a safetensors header (8-byte little-endian length + JSON); raises SoupError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _Corrupt(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise _Corrupt(f"header length {n} exceeds the file size {size} (or the 100 MB format limit)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Corrupt(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise _Corrupt("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise _Corrupt("__metadata__ is not a JSON object")
        data_start, data_size = 8 + n, size - 8 - n
        tensors = []
        for name, entry in header.items():
            try:
                dtype, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
                ok = (isinstance(dtype, str) and isinstance(shape, list)
                      and all(isinstance(d, int) and d >= 0 for d in shape)
                      and isinstance(b, int) and isinstance(e, int) and 0 <= b <= e)
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise _Corrupt(f"malformed header entry for tensor {name!r}: {entry!r}"[:300])
            numel = math.prod(shape)
            if dtype in _ITEMSIZE and e - b != numel * _ITEMSIZE[dtype]:
                raise _Corrupt(f"tensor {name!r} has {e - b} bytes, not the {numel * _ITEMSIZE[dtype]} of {dtype} "
                               f"{tuple(shape)}")
            if e > data_size:
                raise _Corrupt(f"tensor {name!r} ends at byte {data_start + e} but the file has {size} (truncated?)")
            tensors.append(_TensorInfo(name, path, dtype, tuple(shape), data_start + b, e - b))
    except FileNotFoundError:
        raise SoupError([f"{path}: file not found"]) from None
    except _Corrupt as e:
        raise SoupError([f"{path}: not a valid safetensors file: {e}"]) from None
    except OSError as e:
        raise SoupError([f"{path}: cannot read: {e.strerror or e}"]) from None
    tensors.sort(key=lambda t: t.begin)
    return _Header(path, metadata, tensors)


@dataclass
class _Checkpoint:
    """One input: a .safetensors file, or a HF folder (model.safetensors, or shards + model.safetensors.index.json)."""

    path: Path
    shards: list[_Header]
    index: dict | None = None  # the parsed index json of a sharded folder
    tensors: dict[str, _TensorInfo] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.shards]


def _open_checkpoint(path: Path) -> _Checkpoint:
    if path.is_dir():
        if (path / _SINGLE).is_file():
            ck = _Checkpoint(path, [_read_header(path / _SINGLE)])
        elif (path / _INDEX).is_file():
            ck = _open_sharded(path)
        else:
            raise SoupError([f"{path}: a folder without {_SINGLE} or {_INDEX}"])
    elif path.exists():
        ck = _Checkpoint(path, [_read_header(path)])
    else:
        raise SoupError([f"{path}: no such file or folder"])
    if not ck.tensors:
        ck.tensors = {t.name: t for h in ck.shards for t in h.tensors}
    return ck


def _open_sharded(folder: Path) -> _Checkpoint:
    index_path = folder / _INDEX
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SoupError([f"{index_path}: not a valid safetensors index ({e})"]) from None
    problems, shards, tensors = [], [], {}
    for shard_name in dict.fromkeys(weight_map.values()):  # first-seen order
        shard_path = folder / shard_name
        if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts:
            problems.append(f"{index_path}: shard {shard_name!r} is outside the folder")
            continue
        try:
            header = _read_header(shard_path)
        except SoupError as e:
            problems.extend(e.problems)
            continue
        shards.append(header)
        listed = {n for n, s in weight_map.items() if s == shard_name}
        present = {t.name for t in header.tensors}
        problems += [f"{index_path}: lists {n!r} in {shard_name} but that shard has no such tensor"
                     for n in sorted(listed - present)]
        problems += [f"{shard_path}: tensor {n!r} is not listed in {_INDEX}" for n in sorted(present - listed)]
        tensors.update({t.name: t for t in header.tensors})
    if problems:
        raise SoupError(problems)
    shards.sort(key=lambda h: h.path.name)
    return _Checkpoint(folder, shards, index, tensors)


def _check_compatible(checkpoints: Sequence[_Checkpoint]) -> list[str]:
    """Every mismatch of names, shapes and dtypes against inputs[0], and every non-float tensor."""
    ref = checkpoints[0].tensors
    problems = []
    for i, ck in enumerate(checkpoints):
        label = f"inputs[{i}] ({ck.path})"
        if i:
            missing = [n for n in ref if n not in ck.tensors]
            extra = [n for n in ck.tensors if n not in ref]
            if missing:
                problems.append(f"{label} lacks {len(missing)} tensor(s) of inputs[0]: {', '.join(missing)}")
            if extra:
                problems.append(f"{label} has {len(extra)} tensor(s) not in inputs[0]: {', '.join(extra)}")
        for name, t in ck.tensors.items():
            if t.dtype not in _FLOAT:
                problems.append(f"{name!r} is {t.dtype} in {label}: only F32, F16 and BF16 tensors can be averaged")
            if i and name in ref and t.shape != ref[name].shape:
                problems.append(f"{name!r} has shape {list(t.shape)} in {label} but {list(ref[name].shape)} in "
                                "inputs[0]")
    return problems


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


# ----------------------------------------------------------------------------------------------------------------
# streaming engine: chunks of segments, read ahead on a thread, accumulated, cast and written
# ----------------------------------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class _Segment:
    name: str
    start: int  # first element of the tensor in this segment
    count: int
    acc_off: int  # element offset in the accumulator (multiple of _ALIGN_ELEMS)


def _chunk_groups(tensors: Sequence[_TensorInfo], chunk: int) -> list[list[_Segment]]:
    """Consecutive tensors packed into groups of at most ~chunk elements; larger tensors split across groups."""
    groups, segs, used = [], [], 0
    for t in tensors:
        start = 0
        while start < t.numel:
            if used >= chunk:
                groups.append(segs)
                segs, used = [], 0
            count = min(t.numel - start, chunk - used)
            segs.append(_Segment(t.name, start, count, used))
            used += _round_up(count, _ALIGN_ELEMS)
            start += count
    if segs:
        groups.append(segs)
    return groups


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise SoupError([f"{path}: unexpected end of file at byte {offset} (truncated while souping?)"])
        view, offset = view[n:], offset + n


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


class _ReadAhead:
    """Runs read jobs in order on a background thread into a ring of staging buffers.

    A job is a list of (fd, file offset, nbytes, staging offset, path). ``next()`` returns the slot holding the next
    finished job; ``release(slot, event)`` hands it back (a CUDA event is waited on before the slot is refilled,
    i.e. once the H2D copy out of it is done). os.preadv releases the GIL, so reads overlap the kernels.
    """

    def __init__(self, jobs: Iterator[list], buffers: Sequence[torch.Tensor]):
        self._views = [memoryview(b.numpy()) for b in buffers]
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        for slot in range(len(buffers)):
            self._free.put((slot, None))
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="kalm-soup-read", daemon=True)
        self._thread.start()

    def _run(self, jobs) -> None:
        try:
            for job in jobs:
                slot, event = self._free.get()
                if slot is None or self._stop.is_set():
                    return
                if event is not None:
                    event.synchronize()
                for fd, offset, nbytes, stage_off, path in job:
                    _pread_into(fd, self._views[slot][stage_off:stage_off + nbytes], offset, path)
                self._ready.put(slot)
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(e)

    def next(self) -> int:
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, slot: int, event=None) -> None:
        self._free.put((slot, event))

    def close(self) -> None:
        self._stop.set()
        self._free.put((None, None))
        self._thread.join()


@dataclass
class _Source:
    """One input in the plan: its tensors, open file descriptors and (normalized) weight."""

    ck: _Checkpoint
    weight: float
    fds: dict[Path, int] = field(default_factory=dict)


class _Streamer:
    """acc <- sum_i w_i x_i for each chunk group, then the cast into the output dtypes, on CPU or CUDA."""

    def __init__(self, sources: Sequence[_Source], out_dtypes: Mapping[str, torch.dtype], divisor: float,
                 device: torch.device, chunk: int, compensated: bool):
        self.sources, self.out_dtypes, self.divisor, self.device = sources, out_dtypes, divisor, device
        self.kernels = _Kernels(device)
        cuda = device.type == "cuda"
        nbytes = (chunk + _ALIGN_ELEMS) * 4  # bounds a group's staging bytes in any dtype (see _stage_offsets)
        self.stage = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(_STAGE_SLOTS)]
        self.acc = torch.empty(chunk + _ALIGN_ELEMS, dtype=torch.float32, device=device)
        self.comp = torch.empty_like(self.acc) if compensated else None
        # two host output buffers: one being written to disk while the next group is cast into the other
        self.out_host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        if cuda:
            self.out_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.stage_dev = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.dev_free = [None, None]
            self.step = 0

    def _stage_offsets(self, group: Sequence[_Segment], src: _Source) -> list[tuple[_TensorInfo, int, int]]:
        """(tensor info, byte offset in the staging buffer, nbytes) per segment, 64-byte aligned:
        round64(count * itemsize) <= round16(count) * 4, so a group fits in (chunk + 16) * 4 bytes."""
        out, off = [], 0
        for s in group:
            t = src.ck.tensors[s.name]
            nbytes = s.count * _ITEMSIZE[t.dtype]
            out.append((t, off, nbytes))
            off += _round_up(nbytes, _ALIGN_BYTES)
        return out

    def jobs(self, groups: Sequence[Sequence[_Segment]]) -> Iterator[list]:
        for group in groups:
            for src in self.active:
                yield [(src.fds[t.path], t.begin + s.start * _ITEMSIZE[t.dtype], nbytes, off, t.path)
                       for s, (t, off, nbytes) in zip(group, self._stage_offsets(group, src))]

    @property
    def active(self) -> list[_Source]:
        return [s for s in self.sources if s.weight > 0]

    def accumulate(self, group: Sequence[_Segment], reader: _ReadAhead) -> None:
        for k, src in enumerate(self.active):
            slot = reader.next()
            layout = self._stage_offsets(group, src)
            if self.device.type == "cuda":
                stage, event = self._to_device(slot, layout[-1][1] + layout[-1][2])
                reader.release(slot, event)
            else:
                stage = self.stage[slot]
            items = [(*self._acc(s), stage[off:off + nb].view(_FLOAT[t.dtype]))
                     for s, (t, off, nb) in zip(group, layout)]
            self.kernels.accumulate(items, src.weight, first=k == 0)
            if self.device.type == "cuda":
                self.dev_free[self.step % 2] = torch.cuda.current_stream(self.device).record_event()
                self.step += 1
            else:
                reader.release(slot)

    def _acc(self, s: _Segment) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The segment's accumulator and compensation (None for plain sums)."""
        acc = self.acc[s.acc_off:s.acc_off + s.count]
        return acc, None if self.comp is None else self.comp[s.acc_off:s.acc_off + s.count]

    def _to_device(self, slot: int, nbytes: int):
        """H2D copy of a pinned slot on the copy stream into the device buffer that is free; the compute stream
        waits for it. Returns the device buffer and the copy's event (the slot is reusable once it completes)."""
        d = self.step % 2
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            if self.dev_free[d] is not None:
                self.copy_stream.wait_event(self.dev_free[d])  # the kernel reading stage_dev[d] last time is done
            self.stage_dev[d][:nbytes].copy_(self.stage[slot][:nbytes], non_blocking=True)
            copied = self.copy_stream.record_event()
        compute.wait_event(copied)
        return self.stage_dev[d], copied

    def cast(self, group: Sequence[_Segment], slot: int) -> list[tuple[int, int]]:
        """Rounds the group into out_host[slot]; returns (offset, nbytes) of each segment there."""
        out = self.out_dev if self.device.type == "cuda" else self.out_host[slot]
        items, spans, off = [], [], 0
        for s in group:
            dtype = self.out_dtypes[s.name]
            nbytes = s.count * dtype.itemsize
            items.append((*self._acc(s), out[off:off + nbytes].view(dtype)))
            spans.append((off, nbytes))
            off += _round_up(nbytes, _ALIGN_BYTES)
        self.kernels.cast(items, self.divisor)
        if self.device.type == "cuda":
            self.out_host[slot][:off].copy_(out[:off], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return spans


class _WriteBehind:
    """Writes groups to their files on a background thread, in submission order, so writing one group overlaps
    computing the next. A slot's buffer may be refilled only after ``wait(slot)``, which also raises its error."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kalm-soup-write")
        self._pending: dict[int, Future] = {}

    def submit(self, slot: int, fd: int, data: memoryview, spans: Sequence[tuple[int, int]]) -> None:
        self._pending[slot] = self._pool.submit(_write_spans, fd, data, spans)

    def wait(self, slot: int) -> None:
        future = self._pending.pop(slot, None)
        if future is not None:
            future.result()

    def drain(self, raise_errors: bool = True) -> None:
        """Waits for every pending write (all of them, even after one failed), then raises the first error."""
        futures, self._pending = list(self._pending.values()), {}
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors and raise_errors:
            raise errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _write_spans(fd: int, data: memoryview, spans: Sequence[tuple[int, int]]) -> None:
    for off, nbytes in spans:
        _write_all(fd, data[off:off + nbytes])


def _header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """A safetensors header for (name, dtype, shape, nbytes) entries laid out back to back, padded to 8 bytes."""
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


# ----------------------------------------------------------------------------------------------------------------
# soup: files in, files out
# ----------------------------------------------------------------------------------------------------------------


def soup(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, weights: Sequence[float] | None = None,
         dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu", overwrite: bool = False,
         compensated: bool = True, progress: bool = False) -> Path:
    """Weighted average of checkpoints, streamed from disk to disk; returns the output path.

    inputs: ``.safetensors`` files or Hugging Face model folders (``model.safetensors``, or shards listed in
        ``model.safetensors.index.json``), with the same tensor names and shapes; layouts (sharding, dtypes per
        tensor among F32/F16/BF16) may differ between inputs.
    output: mirrors inputs[0]: a ``.safetensors`` file for a file, else a folder with the same shard files and index,
        and inputs[0]'s other files (config, tokenizer, ...) copied. Written to a temporary sibling, then renamed.
    weights: one per input, finite and >= 0 with a positive sum (default uniform); the soup is
        ``sum_i w_i x_i / sum_i w_i``, accumulated in fp32. Inputs of weight 0 are checked but not read.
    dtype: output dtype of every tensor (``"bf16"``, ``torch.float32``, ...); default: inputs[0]'s, per tensor.
    device: ``"cpu"`` or ``"cuda"`` (the GPU accumulates; reads and host-to-device copies overlap the kernels).
    overwrite: replace an existing output (atomically for a file; for a folder the old one is moved aside first and
        restored if the final rename fails).
    compensated: exact products (bf16/fp16 inputs) and compensated (Kahan-Babuska-Neumaier) sums, so cancellation
        cannot hurt: an output element is within 1/2 ulp of its dtype + 2^-22 relative of the exact weighted mean
        (of the weights rounded to fp32: exact for uniform ones). False: plain fp32 sums, half the arithmetic and
        accumulator traffic (faster only when compute, not reading, is the limit), off by up to
        (n + 4) 2^-24 sum_i w_i |x_i| / sum_i w_i more: several 16-bit ulps where the mean is much smaller than the
        terms (10 of 524M elements in the 3 x 1 GB benchmark).
    progress: show a tqdm progress bar of the bytes written.

    Raises SoupError listing every missing/corrupt file and every mismatched tensor name, shape or dtype;
    FileExistsError/ValueError for the output and the other arguments. Nothing is written before every check passed.
    """
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Iterable):
        raise TypeError("inputs must be a list of paths (.safetensors files or Hugging Face model folders)")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("inputs is empty")
    output = Path(output)
    weights_n, divisor = _normalized_weights(weights, len(paths))
    dtype = _as_dtype(dtype)
    device = _as_device(device)

    checkpoints, problems = [], []
    for p in paths:
        try:
            checkpoints.append(_open_checkpoint(p))
        except SoupError as e:
            problems += e.problems
    if not problems:
        problems = _check_compatible(checkpoints)
    if problems:
        raise SoupError(problems)
    ref = checkpoints[0]
    _check_output(output, paths, [f for ck in checkpoints for f in ck.files], overwrite, ref.is_folder)

    out_dtypes = {n: dtype or _FLOAT[t.dtype] for n, t in ref.tensors.items()}
    created = [p for p in reversed(output.absolute().parents) if not p.exists()]
    _clean_stale_temps(output)
    tmp = _temp_path(output, "new")
    try:
        output.absolute().parent.mkdir(parents=True, exist_ok=True)
        sources = [_Source(ck, w) for ck, w in zip(checkpoints, weights_n)]
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _write_soup(sources, tmp, out_dtypes, divisor, device, dtype, compensated, progress)
        _publish(tmp, output)
    except BaseException:
        remove(tmp)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return output


def _write_soup(sources: Sequence[_Source], tmp: Path, out_dtypes: Mapping[str, torch.dtype], divisor: float,
                device: torch.device, dtype: torch.dtype | None, compensated: bool, progress: bool) -> None:
    ref = sources[0].ck
    if ref.is_folder:
        tmp.mkdir()
        targets = [tmp / h.path.name for h in ref.shards]
    else:
        targets = [tmp]
    total = sum(out_dtypes[t.name].itemsize * t.numel for t in ref.tensors.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="soup")
    chunk = _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU
    try:
        for src in sources:
            if src.weight > 0:
                for f in src.ck.files:
                    src.fds[f] = os.open(f, os.O_RDONLY)
                    if hasattr(os, "posix_fadvise"):  # Linux: larger read-ahead
                        os.posix_fadvise(src.fds[f], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        streamer = _Streamer(sources, out_dtypes, divisor, device, chunk, compensated)
        plan = [(header, target, _chunk_groups(header.tensors, chunk)) for header, target in zip(ref.shards, targets)]
        reader = _ReadAhead(streamer.jobs([g for _, _, groups in plan for g in groups]), streamer.stage)
        writer = _WriteBehind()
        try:
            for header, target, groups in plan:
                _write_shard(streamer, reader, writer, header, target, groups, bar)
        finally:
            reader.close()
            writer.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        if bar is not None:
            bar.close()
        for src in sources:
            for fd in src.fds.values():
                os.close(fd)
    if ref.is_folder:
        _copy_side_files(ref, tmp, {t.name for t in targets}, dtype)
        if ref.index is not None:
            index = dict(ref.index)
            sizes = sum(out_dtypes[n].itemsize * t.numel for n, t in ref.tensors.items())
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": sizes}
            _write_text(tmp / _INDEX, json.dumps(index, indent=2) + "\n")
        fsync_dir(tmp)


def _write_shard(streamer: _Streamer, reader: _ReadAhead, writer: _WriteBehind, header: _Header, target: Path,
                 groups: Sequence[Sequence[_Segment]], bar) -> None:
    entries = [(t.name, _ST_NAME[streamer.out_dtypes[t.name]], t.shape, streamer.out_dtypes[t.name].itemsize * t.numel)
               for t in header.tensors]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(_header_bytes(entries, header.metadata)))
        for k, group in enumerate(groups):
            slot = k % 2
            streamer.accumulate(group, reader)
            writer.wait(slot)
            spans = streamer.cast(group, slot)
            writer.submit(slot, fd, memoryview(streamer.out_host[slot].numpy()), spans)
            if bar is not None:
                bar.update(sum(n for _, n in spans))
        writer.drain()
        os.fsync(fd)
    except BaseException:
        writer.drain(raise_errors=False)  # no write may still use fd when it is closed
        raise
    finally:
        os.close(fd)


def _copy_side_files(ref: _Checkpoint, tmp: Path, written: set[str], dtype: torch.dtype | None) -> None:
    """inputs[0]'s non-weight files (config, tokenizer, sentence-transformers modules ...) into the output."""
    skipped = []
    for src in sorted(ref.path.rglob("*")):
        rel = src.relative_to(ref.path)
        if any(part.startswith(".") for part in rel.parts) or src.is_dir():
            continue
        if str(rel) in written or str(rel) == _INDEX:  # the soup's own weight files and index
            continue
        if rel.name.endswith(_WEIGHT_SUFFIXES):
            skipped.append(str(rel))
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) == "config.json" and dtype is not None:
            _write_text(dst, _config_with_dtype(src, dtype))
        else:
            _copy_file(src, dst)
    if skipped:
        warnings.warn(f"not averaged and not copied into the soup (other weight files of inputs[0]): "
                      f"{', '.join(skipped)}", RuntimeWarning, stacklevel=4)


def _config_with_dtype(path: Path, dtype: torch.dtype) -> str:
    """config.json with its dtype fields ("dtype", older "torch_dtype") set to the soup's dtype."""
    text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(config, dict) or not ({"dtype", "torch_dtype"} & config.keys()):
        return text
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _copy_file(src: Path, dst: Path) -> None:
    """Streams src into a new file dst, durably (fsync before the soup's directory is renamed into place)."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def _write_text(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(text.encode()))
        os.fsync(fd)
    finally:
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"(new|old)-([A-Za-z0-9_.]+)-(\d+)-[0-9a-f]{8}")  # after ".<output name>.kalm-soup-"


def _temp_path(output: Path, kind: str) -> Path:
    """A hidden sibling of output owned by this process: ``.<name>.kalm-soup-<new|old>-<host>-<pid>-<random>``, so a
    later soup can tell the leftovers of a dead run (SIGKILL, power loss) from those of a live one."""
    return output.absolute().parent / f".{output.name}.kalm-soup-{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_stale_temps(output: Path) -> list[Path]:
    """Removes the temporaries that soups killed while writing ``output`` left beside it; returns them.

    Only those of this host whose process is gone: a live soup's, or another host's on a shared folder, are kept.
    An old output moved aside (``-old-``) by a run killed between its two renames is the only complete output then:
    it is put back when ``output`` is missing, removed otherwise."""
    parent, prefix = output.absolute().parent, f".{output.name}.kalm-soup-"
    if not parent.is_dir():
        return []
    stale = []
    for p in sorted(parent.iterdir()):
        m = _TEMP.fullmatch(p.name[len(prefix):]) if p.name.startswith(prefix) else None
        if m is None or m.group(2) != _HOST:
            continue
        if not _alive(int(m.group(3))):
            stale.append((m.group(1), p))
    removed = []
    for kind, p in sorted(stale, key=lambda kp: kp[0] != "old"):  # the old output first: it may be the only one
        if kind == "old" and not (output.exists() or output.is_symlink()):
            os.rename(p, output)
            continue
        remove(p)
        removed.append(p)
    return removed


def _publish(tmp: Path, output: Path) -> None:
    publish(tmp, output, _temp_path(output, "old"))


# ----------------------------------------------------------------------------------------------------------------
# SoupAccumulator: in-memory averaging (training), and greedy soups
# ----------------------------------------------------------------------------------------------------------------


class SoupAccumulator:
    """Weighted average of state dicts held in memory: ``sum_i w_i x_i / sum_i w_i`` accumulated in fp32.

        acc = SoupAccumulator(device="cuda", compensated=True)
        for ckpt in checkpoints:
            acc.add(ckpt, weight=1.0)            # a state dict, an nn.Module, a .safetensors file or a HF folder
        acc.load_into(model)                     # or acc.result(torch.bfloat16) -> {name: tensor}

    Holds one fp32 tensor per parameter on ``device`` (two with ``compensated=True``: a Kahan-Babuska-Neumaier
    compensation, with exact products of bf16/fp16 inputs, so the error stays at a few fp32 roundings of the result
    instead of growing with the number of checkpoints and with cancellation between them).
    The first ``add`` fixes the names, shapes and default result dtypes; later ones must match (one SoupError lists
    every mismatch, found before anything is added). Only F32/F16/BF16 tensors can be averaged.
    """

    def __init__(self, device: str | torch.device = "cpu", compensated: bool = False):
        self.device = _as_device(device)
        self.compensated = bool(compensated)
        self._kernels = _Kernels(self.device)
        self._acc: dict[str, torch.Tensor] = {}
        self._comp: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._weight_sum = 0.0  # of the fp32-rounded weights
        self.count = 0  # checkpoints added with a positive weight
        self._broken = ""  # why the accumulator is unusable (an add that failed after changing it), else ""

    @property
    def total_weight(self) -> float:
        return self._weight_sum

    def add(self, source, weight: float = 1.0) -> SoupAccumulator:
        """Adds ``weight * source``; source: a state dict (name -> tensor), an nn.Module or a checkpoint path. A
        source that cannot be read or does not match leaves the soup as it was."""
        self._usable()
        weight = _fp32(_as_weight(weight, "weight"))
        if isinstance(source, (str, os.PathLike)):
            ck = _open_checkpoint(Path(source))
            problems = self._check({n: (t.shape, t.dtype) for n, t in ck.tensors.items()}, str(source))
            if problems:
                raise SoupError(problems, "cannot add this checkpoint")
            if weight > 0:
                self._add_checkpoint(ck, weight)
            else:
                self._init({n: (t.shape, _FLOAT[t.dtype]) for n, t in ck.tensors.items()})
        else:
            state = source.state_dict() if isinstance(source, torch.nn.Module) else source
            if not isinstance(state, Mapping):
                raise TypeError(f"source must be a state dict, an nn.Module or a path, got {type(source).__name__}")
            bad = [n for n, t in state.items() if not isinstance(t, torch.Tensor)]
            if bad:
                raise TypeError(f"state dict values must be tensors; not tensors: {', '.join(map(str, bad))}")
            problems = self._check({n: (tuple(t.shape), _ST_NAME.get(t.dtype, str(t.dtype).removeprefix("torch.")))
                                    for n, t in state.items()}, "the state dict")
            if problems:
                raise SoupError(problems, "cannot add this state dict")
            self._init({n: (tuple(t.shape), t.dtype) for n, t in state.items()})
            if weight > 0:
                self._add_state(state, weight)
        if weight > 0:
            self._weight_sum += weight
            self.count += 1
        return self

    def _add_checkpoint(self, ck: _Checkpoint, weight: float) -> None:
        """All or nothing: every tensor is read once first, so a truncated or unreadable file raises with the soup
        untouched; then read again (the page cache usually serves it) into the accumulator one tensor at a time, in
        one reused buffer, so memory stays at one tensor. A read failing in that second pass (a file changed or a
        disk failed in between) leaves a partial sum that cannot be undone without a copy of the whole soup: the
        accumulator then refuses every further use, naming the failure."""
        for _ in _read_tensors(ck):
            pass
        self._init({n: (t.shape, _FLOAT[t.dtype]) for n, t in ck.tensors.items()})
        first = self.count == 0
        try:
            for name, t in _read_tensors(ck):
                self._kernels.accumulate([self._entry(name, t)], weight, first)
        except BaseException as e:
            self._broken = f"adding {ck.path} failed midway ({type(e).__name__}: {e}); the soup holds a partial sum"
            raise

    def _usable(self) -> None:
        if self._broken:
            raise RuntimeError(f"this SoupAccumulator cannot be used: {self._broken}")

    def _check(self, specs: Mapping[str, tuple[tuple[int, ...], str]], label: str) -> list[str]:
        problems = [f"{n!r} is {d} in {label}: only F32, F16 and BF16 tensors can be averaged"
                    for n, (_, d) in specs.items() if d not in _FLOAT]
        if self._shapes:
            missing = [n for n in self._shapes if n not in specs]
            extra = [n for n in specs if n not in self._shapes]
            if missing:
                problems.append(f"{label} lacks {len(missing)} tensor(s) of the soup: {', '.join(missing)}")
            if extra:
                problems.append(f"{label} has {len(extra)} tensor(s) not in the soup: {', '.join(extra)}")
            problems += [f"{n!r} has shape {list(s)} in {label} but {list(self._shapes[n])} in the soup"
                         for n, (s, _) in specs.items() if n in self._shapes and tuple(s) != self._shapes[n]]
        return problems

    def _init(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        if self._shapes:
            return
        for n, (shape, dtype) in specs.items():
            self._shapes[n], self._dtypes[n] = tuple(shape), dtype
            self._acc[n] = torch.empty(math.prod(shape), dtype=torch.float32, device=self.device)
            if self.compensated:
                self._comp[n] = torch.empty(math.prod(shape), dtype=torch.float32, device=self.device)

    def _entry(self, name: str, t: torch.Tensor):
        return self._acc[name], self._comp.get(name), t.detach().to(self.device).contiguous().reshape(-1)

    def _add_state(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """One multi-tensor kernel call per batch of <= 256 MB copied from another device (one call for all the
        tensors already on the accumulator's device)."""
        first = self.count == 0
        batch, moved = [], 0
        for name, t in state.items():
            batch.append(self._entry(name, t))
            moved += 0 if t.device == self.device else t.numel() * t.element_size()
            if moved >= 256 * 2**20:
                self._kernels.accumulate(batch, weight, first)
                batch, moved = [], 0
        self._kernels.accumulate(batch, weight, first)

    def result(self, dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
        """The soup as {name: tensor} on ``device``, in ``dtype`` (default: the first checkpoint's, per tensor)."""
        dtype = _as_dtype(dtype)
        return self._result({n: dtype or d for n, d in self._dtypes.items()})

    def _result(self, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
        self._usable()
        if self._weight_sum == 0:
            raise ValueError("the soup is empty: no checkpoint with a positive weight was added")
        out = {n: torch.empty(self._shapes[n], dtype=dtypes[n], device=self.device) for n in self._shapes}
        self._kernels.cast([(self._acc[n], self._comp.get(n), out[n].view(-1)) for n in self._shapes],
                           _fp32(self._weight_sum))
        return out

    def load_into(self, module: torch.nn.Module, strict: bool = True) -> torch.nn.Module:
        """Loads the soup into ``module``, each tensor rounded once to the dtype of the module's own tensor."""
        own = module.state_dict()
        dtypes = {n: own[n].dtype if n in own and own[n].dtype in _ST_NAME else self._dtypes[n] for n in self._shapes}
        module.load_state_dict(self._result(dtypes), strict=strict)
        return module

    def copy(self) -> SoupAccumulator:
        """An independent accumulator with the same state (e.g. to try one more checkpoint)."""
        new = SoupAccumulator(self.device, self.compensated)
        new._acc = {n: t.clone() for n, t in self._acc.items()}
        new._comp = {n: t.clone() for n, t in self._comp.items()}
        new._shapes, new._dtypes = dict(self._shapes), dict(self._dtypes)
        new._weight_sum, new.count, new._broken = self._weight_sum, self.count, self._broken
        return new


def _read_tensors(ck: _Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a checkpoint, read file by file in offset order with pread into one reused buffer; each
    tensor is valid until the next one is yielded."""
    buf = torch.empty(max((t.nbytes for t in ck.tensors.values()), default=0), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    for header in ck.shards:
        fd = os.open(header.path, os.O_RDONLY)
        try:
            for t in header.tensors:
                _pread_into(fd, view[:t.nbytes], t.begin, t.path)
                yield t.name, buf[:t.nbytes].view(_FLOAT[t.dtype]).view(t.shape)
        finally:
            os.close(fd)


def _as_state_dict(candidate) -> dict[str, torch.Tensor]:
    if isinstance(candidate, torch.nn.Module):
        return candidate.state_dict()
    if isinstance(candidate, (str, os.PathLike)):
        ck = _open_checkpoint(Path(candidate))
        problems = [f"{n!r} is {t.dtype} in {candidate}: only F32, F16 and BF16 tensors can be averaged"
                    for n, t in ck.tensors.items() if t.dtype not in _FLOAT]
        if problems:
            raise SoupError(problems)
        return {n: t.clone() for n, t in _read_tensors(ck)}
    if isinstance(candidate, Mapping):
        return dict(candidate)
    raise TypeError(f"candidates must be state dicts, nn.Modules or paths, got {type(candidate).__name__}")


@dataclass
class GreedySoupResult:
    chosen: list[int]  # indices into candidates, in the order they joined the soup
    state_dict: dict[str, torch.Tensor]  # the uniform soup of the chosen candidates
    score: float  # evaluate(state_dict)
    scores: list[float]  # each candidate's own score


def greedy_soup(candidates: Sequence, evaluate: Callable[[dict[str, torch.Tensor]], float], *,
                device: str | torch.device = "cpu", compensated: bool = False,
                dtype: torch.dtype | str | None = None) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022, "Model soups", Algorithm 1).

    Scores every candidate on its own with ``evaluate(state_dict) -> float`` (higher is better), visits them from the
    best score down, and keeps a candidate only if the uniform average of the soup plus it scores strictly higher
    than the soup so far (the paper keeps ties; here a tie does not improve, so it is left out). The soup starts
    from the best single candidate. Candidates: state dicts, nn.Modules or checkpoint paths; ``evaluate`` receives a
    {name: tensor} dict on ``device`` in ``dtype`` (default: the first candidate's dtypes).
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty")
    scores = []
    for i, c in enumerate(candidates):
        s = float(evaluate(_as_state_dict(c)))
        if not math.isfinite(s):
            raise ValueError(f"evaluate(candidates[{i}]) returned {s}; scores must be finite")
        scores.append(s)
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep the candidates' order
    soup_acc = SoupAccumulator(device, compensated).add(candidates[order[0]])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = soup_acc.copy().add(candidates[i])
        s = float(evaluate(trial.result(dtype)))
        if not math.isfinite(s):
            raise ValueError(f"evaluate(soup + candidates[{i}]) returned {s}; scores must be finite")
        if s > best:
            soup_acc, best = trial, s
            chosen.append(i)
    return GreedySoupResult(chosen, soup_acc.result(dtype), best, scores)


class _CallableModule(types.ModuleType):
    """``kalm_fast.soup`` names both this module and its main function (SPEC 4.4); whichever of the two an import
    order leaves as the package attribute, ``kalm_fast.soup(inputs, output, ...)`` calls the function."""

    def __call__(self, *args, **kwargs):
        return soup(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
