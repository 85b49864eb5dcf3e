"""soup(): checkpoints in, a checkpoint out, streamed; temporaries named by host and pid, published atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from kalm_fast.atomic import fsync_dir, publish, remove
from kalm_fast.soup._checks import _as_device, _as_dtype, _check_output, _normalized_weights
from kalm_fast.soup._format import (
    _FLOAT,
    _INDEX,
    _ST_NAME,
    _WEIGHT_SUFFIXES,
    SoupError,
    _check_compatible,
    _Checkpoint,
    _Header,
    _open_checkpoint,
)
from kalm_fast.soup._stream import (
    _CHUNK_CPU,
    _CHUNK_CUDA,
    _chunk_groups,
    _header_bytes,
    _ReadAhead,
    _Segment,
    _Source,
    _Streamer,
    _write_all,
    _WriteBehind,
)

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
        (of the weights rounded to fp32: exact for uniform ones); measured cost on a 2-core AMD EPYC (AVX2): the
        one-pass CPU kernel takes 1.3x the time of plain sums (0.32 s vs 0.25 s for 3 x 0.63 GB of bf16), ~0.1 s
        of a ~3 s soup of 3 x 1.05 GB, whose time goes to reading, writing and fsync (bench/soup_phases.py); two
        end-to-end runs there gave -12% and +17% for compensation, within the noise of a shared 2-core box.
        False: plain fp32 sums, off by up to
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
        plan = [(header, target, _chunk_groups(header.tensors, streamer.chunk))
                for header, target in zip(ref.shards, targets)]
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
            if streamer.fused:
                writer.wait(slot)
                spans = streamer.soup_group(group, reader, slot)
            else:
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
