"""Safetensors headers, checkpoint discovery (files, single-file and sharded Hugging Face folders), the
compatibility check and SoupError."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
