"""Where the streaming soup's time goes, phase by phase, in GB/s (issue 13, item 5).

    python -m bench.soup_phases IN1 IN2 IN3          # bf16 .safetensors files or HF folders (warm page cache)
    python -m bench.soup_phases --smoke              # generated tiny checkpoints, seconds

Each phase is timed alone over the whole model, with the chunk size and buffers of kalm_fast.soup (bytes moved per
second, page cache warm: every input is read once before timing):
  read-pread      os.preadv of every input's tensor bytes into a reused chunk-sized buffer (what the soup does)
  read-mmap-copy  the same bytes copied out of an mmap of the file (what safetensors safe_open + .float() costs)
  convert         bf16 -> fp32 of a chunk by torch (x.float())
  accumulate      kalm_fast._C acc (+)= w * x over chunks, plain and compensated, K inputs (the path before the
                  one-pass kernel, and the CUDA path's shape)
  cast            kalm_fast._C RNE(acc / W) into bf16 over chunks, plain and compensated
  cpu_soup        kalm_fast._C.cpu_soup, what soup() runs on CPU: the K inputs of a chunk summed and cast in one pass
  write           os.write of the output bytes into a new file; fsync separately
  soup            end to end (kalm_fast.soup.soup), plain and compensated, which overlaps the phases on threads
GB/s counts the bytes a phase reads plus the bytes it writes (read: file bytes only).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kalm_fast.soup._format import _FLOAT, _open_checkpoint
from kalm_fast.soup._kernels import _Kernels
from kalm_fast.soup._stream import _CHUNK_CPU, _pread_into


def _best(fn, reps: int) -> float:
    """Fastest of ``reps`` runs, seconds (the least disturbed by the other jobs on a shared machine)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(inputs: list[Path], reps: int = 3, threads: int | None = None) -> list[dict]:
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cks = [_open_checkpoint(p) for p in inputs]
    spans = [[(h.path, t.begin, t.nbytes, _FLOAT[t.dtype]) for h in ck.shards for t in h.tensors] for ck in cks]
    in_bytes = sum(n for s in spans for _, _, n, _ in s)
    numel = in_bytes // 2 // len(inputs)  # bf16
    chunk = _CHUNK_CPU
    buf = torch.empty(chunk * 4, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    rows = []

    def add(phase, seconds, nbytes, note=""):
        rows.append({"phase": phase, "seconds": round(seconds, 4), "gbps": round(nbytes / seconds / 1e9, 2),
                     "threads": threads, "note": note})

    def read_pread():
        for s in spans:
            fds = {}
            try:
                for path, begin, nbytes, _ in s:
                    fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
                    for off in range(0, nbytes, chunk * 2):
                        n = min(chunk * 2, nbytes - off)
                        _pread_into(fd, view[:n], begin + off, path)
            finally:
                for fd in fds.values():
                    os.close(fd)

    read_pread()  # warm the page cache
    add("read-pread", _best(read_pread, reps), in_bytes, "file bytes into a reused 2 MB buffer")

    def read_mmap():
        for s in spans:
            maps = {}
            for path, begin, nbytes, _ in s:
                if path not in maps:
                    with open(path, "rb") as f:
                        maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                src = torch.frombuffer(maps[path], dtype=torch.uint8, offset=begin, count=nbytes)
                for off in range(0, nbytes, chunk * 2):
                    n = min(chunk * 2, nbytes - off)
                    buf[:n].copy_(src[off:off + n])
                del src
            for m in maps.values():
                m.close()

    add("read-mmap-copy", _best(read_mmap, reps), in_bytes, "fresh mmap per file (page faults included)")

    x = torch.randn(chunk).mul_(0.02).to(torch.bfloat16)
    xf = torch.empty(chunk)
    n_chunks = max(1, numel // chunk)
    add("convert", _best(lambda: [xf.copy_(x) for _ in range(n_chunks * len(inputs))], reps),
        n_chunks * len(inputs) * chunk * 6, "bf16 -> fp32, torch copy_")

    kern = _Kernels(torch.device("cpu"))
    if kern.ext is None:
        raise SystemExit("kalm_fast._C is not built")
    acc, comp = torch.empty(chunk), torch.empty(chunk)
    out = torch.empty(chunk, dtype=torch.bfloat16)
    k = len(inputs)
    w = 1.0  # uniform weights as soup() normalizes them: the largest is 1
    for compensated in (False, True):
        c = comp if compensated else None

        def accumulate(c=c):
            for _ in range(n_chunks):
                for i in range(k):
                    kern.accumulate([(acc, c, x)], w, first=i == 0)

        # bytes: x read (2) + acc read/write (8) + comp read/write (8) except on the first input
        per = chunk * (2 + 4 + (4 if compensated else 0)) + (k - 1) * chunk * (2 + 8 + (8 if compensated else 0))
        add(f"accumulate-{'compensated' if compensated else 'plain'}", _best(accumulate, reps), n_chunks * per,
            f"{k} inputs, w = {w}")

        def cast(c=c):
            for _ in range(n_chunks):
                kern.cast([(acc, c, out)], float(k))

        add(f"cast-{'compensated' if compensated else 'plain'}", _best(cast, reps),
            n_chunks * chunk * (4 + (4 if compensated else 0) + 2))

    xs = [torch.randn(n_chunks * chunk).mul_(0.02).to(torch.bfloat16) for _ in range(k)]  # k distinct inputs
    for compensated in (False, True):
        def one_pass(compensated=compensated, xs=xs):
            for j in range(n_chunks):
                kern.soup([(out, [x[j * chunk:(j + 1) * chunk] for x in xs])], [w] * k, float(k), compensated)

        add(f"cpu_soup-{'compensated' if compensated else 'plain'}", _best(one_pass, reps),
            n_chunks * chunk * (2 * k + 2), f"the soup's one-pass kernel: {k} distinct inputs summed and cast")
    del xs

    out_bytes = in_bytes // k
    tmpdir = Path(tempfile.mkdtemp(prefix="kalm-soup-phases-", dir=inputs[0].parent))
    try:
        obuf = memoryview(torch.zeros(chunk * 2, dtype=torch.uint8).numpy())
        times_w, times_s = [], []
        for r in range(reps):
            path = tmpdir / f"w{r}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            t0 = time.perf_counter()
            for off in range(0, out_bytes, len(obuf)):
                os.write(fd, obuf[:min(len(obuf), out_bytes - off)])
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
            os.close(fd)
            path.unlink()
            times_w.append(t1 - t0)
            times_s.append(t2 - t1)
        add("write", min(times_w), out_bytes, "os.write into the page cache")
        add("fsync", min(times_s), out_bytes, "the output made durable (soup fsyncs before its rename)")

        from kalm_fast.soup import soup

        for compensated in (False, True):
            def run(compensated=compensated):
                o = tmpdir / "soup"
                soup(inputs, o, compensated=compensated)
                shutil.rmtree(o) if o.is_dir() else o.unlink()

            add(f"soup-{'compensated' if compensated else 'plain'}", _best(run, reps), in_bytes + out_bytes,
                "end to end (read + accumulate + cast + write + fsync, overlapped)")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", type=Path)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    tmp = None
    inputs = args.inputs
    if args.smoke or not inputs:
        from bench.bench_soup import generate

        tmp = Path(tempfile.mkdtemp(prefix="kalm-soup-phases-in-"))
        inputs = generate(tmp, 3, smoke=True)
    try:
        rows = measure(inputs, args.reps, args.threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    print(json.dumps({"env": env, "load": os.getloadavg(), "rows": rows}))
    for r in rows:
        print(f"{r['phase']:24s} {r['seconds']:8.3f} s {r['gbps']:7.2f} GB/s  {r['note']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
