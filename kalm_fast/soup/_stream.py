"""The streaming engine: element chunks of segments, read ahead on a thread with pread into reused staging
buffers, accumulated, cast and written behind on a second thread."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kalm_fast.soup._format import _FLOAT, _ITEMSIZE, SoupError, _Checkpoint, _TensorInfo
from kalm_fast.soup._kernels import _Kernels

# Elements per streamed chunk. The accumulator (+ compensation) of a chunk stays in cache while the inputs stream
# through it (1M: 4 + 4 MB on CPU, measured 1.5x faster than 4M here; 4M: 32 MB within an H100's 50 MB L2).
_CHUNK_CPU = 1 << 20
_CHUNK_CUDA = 1 << 22
_STAGE_SLOTS = 3  # host staging buffers: one being accumulated (or copied to the GPU), two being read ahead
_ALIGN_BYTES = 64  # staging offsets of segments: 16-byte vector loads on the GPU, whole cache lines on the CPU
_ALIGN_ELEMS = 16  # accumulator offsets of segments (64 bytes of fp32)
# The one-pass CPU soup (kalm_fast._C.cpu_soup) holds every input's chunk at once, double-buffered: 2 K staging
# buffers + 2 output buffers of (chunk + 16) * 4 bytes, kept within this budget by a smaller chunk for many inputs.
_FUSED_BUDGET = 28 << 20


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
        self.compensated = compensated
        # CPU with the extension: every input's chunk staged, then summed and cast in one pass on L1-sized tiles
        # (kalm_fast._C.cpu_soup). Otherwise one input at a time into a chunk-sized fp32 accumulator, then the cast.
        self.fused = self.kernels.fused
        cuda = device.type == "cuda"
        slots = _STAGE_SLOTS
        if self.fused:
            slots = 2 * max(1, len(self.active))
            fit = _FUSED_BUDGET // ((slots + 2) * 4) - _ALIGN_ELEMS
            chunk = max(_ALIGN_ELEMS * 1024, min(chunk, fit // _ALIGN_ELEMS * _ALIGN_ELEMS))
        self.chunk = chunk
        nbytes = (chunk + _ALIGN_ELEMS) * 4  # bounds a group's staging bytes in any dtype (see _stage_offsets)
        self.stage = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(slots)]
        if not self.fused:
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

    def soup_group(self, group: Sequence[_Segment], reader: _ReadAhead, slot: int) -> list[tuple[int, int]]:
        """The fused CPU step: waits for every input's chunk, sums and casts them into out_host[slot] in one pass;
        returns (offset, nbytes) of each segment there."""
        active = self.active
        slots = [reader.next() for _ in active]
        layouts = [self._stage_offsets(group, src) for src in active]
        out = self.out_host[slot]
        items, spans, off = [], [], 0
        for j, s in enumerate(group):
            dtype = self.out_dtypes[s.name]
            nbytes = s.count * dtype.itemsize
            xs = [self.stage[sl][o:o + nb].view(_FLOAT[t.dtype]) for sl, (t, o, nb) in
                  zip(slots, (layout[j] for layout in layouts))]
            items.append((out[off:off + nbytes].view(dtype), xs))
            spans.append((off, nbytes))
            off += _round_up(nbytes, _ALIGN_BYTES)
        self.kernels.soup(items, [src.weight for src in active], self.divisor, self.compensated)
        for sl in slots:
            reader.release(sl)
        return spans

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
