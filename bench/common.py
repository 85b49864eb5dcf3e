"""Shared plumbing of the bench suites: timing, peak memory, provenance and result files (SPEC 7).

A suite module ``bench/bench_<name>.py`` exposes ``run(*, smoke: bool, device: str) -> list[dict]`` (rows made with
``row(...)``) and a ``main()`` that parses ``--smoke``/``--device`` and calls ``report(...)``; ``python -m bench`` runs
every suite in one process so all providers are measured side by side on the same device.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import git_sha
from kalm_fast.demo import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = [
    "suite", "op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "peak_mem_mb", "tokens_per_s", "max_batch", "note", "device_name", "torch", "triton", "kalm_fast", "git_sha",
    "date",
]


# ----------------------------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name, or ``cpu-<model>-<cores>c`` (lscpu's model name, lower-case, dashes): figures from an Intel
    and an AMD box never share a results folder."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{cpu_model_slug()}-{os.cpu_count()}c"


def cpu_model_slug() -> str:
    words = re.sub(r"\(r\)|\(tm\)|cpu|@.*|processor", " ", cpu_model().lower())
    return "-".join(re.findall(r"[a-z0-9]+", words)) or platform.machine()


@functools.cache
def provenance(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    import kalm_fast

    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "kalm_fast": kalm_fast.__version__,
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def sync(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, rep: int = 10,
             min_time_s: float = 0.0) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``; CUDA events on GPU, perf_counter on CPU.

    Runs ``warmup`` untimed calls, then ``rep`` timed ones (more while the total is under ``min_time_s``). On CUDA
    the L2 cache is not flushed: the suites time whole operators whose working sets exceed it.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    cuda = str(device).startswith("cuda")
    t_start = time.perf_counter()
    while len(times) < rep or (time.perf_counter() - t_start) < min_time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_mb(fn: Callable[[], object]) -> float:
    """Growth of this process's RSS high-water mark during one call of ``fn`` (Linux): the mark is reset to the
    current RSS first (/proc/self/clear_refs), so earlier peaks do not hide it. Memory that the allocator reuses from
    pages already resident does not show; for a clean figure run the call in a fresh process after a warm-up."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = proc_status_mb("VmRSS")
    fn()
    return proc_status_mb("VmHWM") - base


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one call of ``fn``: allocated CUDA memory above the level before the call on GPU; on CPU the
    growth of the RSS high-water mark (``rss_peak_mb``)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return rss_peak_mb(fn)


# The rows made by the suite now running, in order, kept by ``python -m bench`` (``start_journal``): a suite that is
# interrupted (the GPU session's timeout, Ctrl-C) still has what it measured written, and with ``echo`` each row is
# printed as it is made, so a log cut short still shows the figures. Rows are the suites' own dicts: a note a suite
# adds later is in the journal too.
_JOURNAL: list = [None, False]  # [list of rows or None (off), echo]


def start_journal(*, echo: bool) -> None:
    _JOURNAL[:] = [[], echo]


def stop_journal() -> list[dict]:
    """The rows made since ``start_journal`` (empty when it was not started); the journal is off afterwards."""
    rows = _JOURNAL[0] or []
    _JOURNAL[:] = [None, False]
    return rows


def _made(r: dict) -> dict:
    if _JOURNAL[0] is not None:
        _JOURNAL[0].append(r)
        if _JOURNAL[1]:
            value = f"{r['median_ms']} ms" if r["median_ms"] != "" else r["note"]
            print(f"  [{r['suite']}] {r['op']} {r['provider']} {r['mode']} {r['shape']} {r['dtype']}: {value}",
                  flush=True)
    return r


def row(suite: str, op: str, provider: str, mode: str, shape: str, dtype, device: str, times, *, flops=None,
        nbytes=None, peak_mem_mb=None, tokens_per_s=None, max_batch=None, note: str = "") -> dict:
    """One result row. ``times`` = (median, p20, p80) ms; ``flops``/``nbytes`` per call give TFLOP/s / GB/s at the
    median; ``tokens_per_s`` and ``max_batch`` are the train-step suite's throughput and largest batch."""
    return _made(_row(suite, op, provider, mode, shape, dtype, device, times, flops=flops, nbytes=nbytes,
                      peak_mem_mb=peak_mem_mb, tokens_per_s=tokens_per_s, max_batch=max_batch, note=note))


def _row(suite, op, provider, mode, shape, dtype, device, times, *, flops=None, nbytes=None, peak_mem_mb=None,
         tokens_per_s=None, max_batch=None, note="") -> dict:
    median, p20, p80 = times
    return {
        "suite": suite, "op": op, "provider": provider, "mode": mode, "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": round(median, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
        "tflops": round(flops / (median * 1e-3) / 1e12, 3) if flops else "",
        "gbps": round(nbytes / (median * 1e-3) / 1e9, 2) if nbytes else "",
        "peak_mem_mb": round(peak_mem_mb, 1) if peak_mem_mb is not None else "",
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s is not None else "",
        "max_batch": max_batch if max_batch is not None else "",
        "note": note, **provenance(device),
    }


def failed_row(suite, op, provider, mode, shape, dtype, device, error: BaseException) -> dict:
    """A provider that could not run (out of memory, unsupported) is reported, not dropped."""
    msg = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return _made({**_row(suite, op, provider, mode, shape, dtype, device, (float("nan"),) * 3), "median_ms": "",
                  "p20_ms": "", "p80_ms": "", "note": msg})


# The time budget of a run (``python -m bench --budget-s``): each suite gets a deadline and checks it before every
# shape, best shapes first, so a capped run (a lent GPU for minutes) ends with rows from every suite instead of being
# killed inside one. No deadline: every shape runs.
_DEADLINE: list = [None]


def set_deadline(seconds_from_now: float | None) -> None:
    _DEADLINE[0] = None if seconds_from_now is None else time.monotonic() + seconds_from_now


def out_of_time() -> bool:
    return _DEADLINE[0] is not None and time.monotonic() >= _DEADLINE[0]


def budget_row(suite: str, op: str, skipped: list[str], dtype, device: str) -> dict:
    """The shapes a suite left out when its deadline passed, as one row (reported, not dropped)."""
    return failed_row(suite, op, "-", "-", "; ".join(skipped), dtype, device,
                      TimeoutError(f"not run: the bench's time budget ran out ({len(skipped)} left)"))


def within_budget(suite: str, op: str, items: list, name, dtype, device: str, rows: list):
    """Yield ``items`` in order while the deadline allows; the rest become one ``budget_row`` appended to rows."""
    for i, item in enumerate(items):
        if out_of_time():
            rows.append(budget_row(suite, op, [name(x) for x in items[i:]], dtype, device))
            return
        yield item


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------


def results_dir(device: str) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in device_name(device)).strip("-")
    return RESULTS / name


def write_rows(rows: list[dict], device: str, *, stem: str) -> Path:
    """Append rows to results/<device>/<stem>.csv and .jsonl (written whole to a temp file, then renamed)."""
    out = results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    existing = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            existing = list(csv.DictReader(f))
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(existing + rows)
    os.replace(tmp, csv_path)
    with open(out / f"{stem}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return csv_path


def format_table(rows: list[dict], columns=("op", "provider", "mode", "shape", "dtype", "median_ms", "tflops",
                                            "gbps", "peak_mem_mb", "tokens_per_s", "max_batch", "note")) -> str:
    """A markdown table of the rows (only the columns that have a value somewhere)."""
    cols = [c for c in columns if any(r.get(c) not in ("", None) for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def report(rows: list[dict], device: str, *, stem: str, write: bool = True) -> None:
    print(format_table(rows))
    if write and rows:
        path = write_rows(rows, device, stem=stem)
        print(f"\nrows appended to {path}")


def standard_args(description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized shapes, seconds (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p
