"""PNG plots of one bench run (matplotlib, headless): one figure per (suite, metric), a line per provider; the
soup suite gets bars of time and peak RSS per provider, the train step suite bars of tokens/s, peak memory and max
batch per provider (issue 13: the peers side by side)."""

from __future__ import annotations

import re
from pathlib import Path


def _regex(pattern):
    """x from the first group of ``pattern`` in the shape string."""
    return lambda shape: float(m.group(1)) if (m := re.search(pattern, shape)) else None


def _pool_mb(shape):
    """MB of hidden states read by the pooling forward: T x H x 2 bytes (bf16), T from "(T=...)" or B x S."""
    h = re.search(r"\bH=(\d+)", shape)
    t = re.search(r"\(T=(\d+)", shape)
    b, s = re.search(r"\bB=(\d+)", shape), re.search(r"\bS=(\d+)\b", shape)
    if not h or not (t or (b and s)):
        return None
    tokens = int(t.group(1)) if t else int(b.group(1)) * int(s.group(1))
    return tokens * int(h.group(1)) * 2 / 1e6


# suite -> (file stem, row filter, x from the shape string, y column, x label, y label, log x)
PLOTS = {
    "attention": [
        ("attention_tflops_vs_seqlen", lambda r: r["mode"] == "fwd+bwd" and r["shape"].startswith("equal-")
         and " D=128" in r["shape"], _regex(r"^equal-(\d+)"), "tflops", "sequence length (equal lengths, D=128)",
         "fwd+bwd TFLOP/s", True),
        ("attention_tflops_vs_seqlen_d64", lambda r: r["mode"] == "fwd+bwd" and r["shape"].startswith("equal-")
         and " D=64" in r["shape"], _regex(r"^equal-(\d+)"), "tflops", "sequence length (equal lengths, D=64)",
         "fwd+bwd TFLOP/s", True),
    ],
    "infonce": [
        ("infonce_memory_vs_batch", lambda r: r["mode"] == "fwd+bwd" and "D=1024" in r["shape"]
         and "M=2" in r["shape"], _regex(r"\bB=(\d+)"), "peak_mem_mb", "batch size B (G=8, D=1024, M=2)",
         "fwd+bwd peak memory (MB)", True),
        ("infonce_time_vs_batch", lambda r: r["mode"] == "fwd+bwd" and "D=1024" in r["shape"]
         and "M=2" in r["shape"], _regex(r"\bB=(\d+)"), "median_ms", "batch size B (G=8, D=1024, M=2)",
         "fwd+bwd time (ms)", True),
        # gamma 0, M 0: what Inf-CL computes, so kalm_fast, torch_naive and inf-cl share the axes
        ("infonce_g0_memory_vs_batch", lambda r: r["mode"] == "fwd+bwd g0", _regex(r"\bB=(\d+)"), "peak_mem_mb",
         "batch size B (G=8, D=1024, gamma=0, M=0)", "fwd+bwd peak memory (MB)", True),
        ("infonce_g0_time_vs_batch", lambda r: r["mode"] == "fwd+bwd g0", _regex(r"\bB=(\d+)"), "median_ms",
         "batch size B (G=8, D=1024, gamma=0, M=0)", "fwd+bwd time (ms)", True),
    ],
    "pooling": [
        ("pooling_gbps_vs_size", lambda r: r["mode"] == "fwd" and r["op"] != "copy", _pool_mb, "gbps",
         "hidden states read (MB, bf16)", "fwd GB/s", True),
    ],
}


def _xy(rows, x_of, ycol):
    pts = []
    for r in rows:
        x = x_of(r["shape"])
        if x is not None and r.get(ycol) not in ("", None):
            pts.append((x, float(r[ycol])))
    return sorted(pts)


def write_plots(all_rows: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Write the plots whose rows exist; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite, specs in PLOTS.items():
        rows = all_rows.get(suite, [])
        for stem, keep, x_of, ycol, xlabel, ylabel, logx in specs:
            chosen = [r for r in rows if keep(r)]
            providers = sorted({r["provider"] for r in chosen})
            series = {p: _xy([r for r in chosen if r["provider"] == p], x_of, ycol) for p in providers}
            series = {p: pts for p, pts in series.items() if len(pts) >= 2}
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for provider, pts in series.items():
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            device = chosen[0]["device_name"]
            ax.set_title(f"{suite} — {device} — {chosen[0]['dtype']}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{stem}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    written += _train_step_bars(all_rows.get("train_step", []), out_dir, plt)
    written += _soup_bars(all_rows.get("soup", []), out_dir, plt)
    return written


def _bars(rows, panels, title: str, path: Path, plt) -> list[Path]:
    """One bar panel per (row filter, column, scale, y label); a bar per provider whose row has the column."""
    panels = [(keep, col, scale, label) for keep, col, scale, label in panels
              if any(keep(r) and r.get(col) not in ("", None) for r in rows)]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 0.9 * len(rows)) * len(panels) / 1.6 + 2, 4.2),
                             squeeze=False)
    for ax, (keep, col, scale, label) in zip(axes[0], panels):
        bars = [(r["provider"], float(r[col]) * scale) for r in rows if keep(r) and r.get(col) not in ("", None)]
        ax.bar([p for p, _ in bars], [v for _, v in bars], color=[f"C{i % 10}" for i in range(len(bars))])
        for i, (_, v) in enumerate(bars):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _soup_bars(rows, out_dir: Path, plt) -> list[Path]:
    """Time to a soup on disk and peak RSS per provider (the soup_files rows)."""
    rows = [r for r in rows if r["op"] == "soup_files"]
    if not rows:
        return []
    files = lambda r: r["median_ms"] not in ("", None)
    title = f"soup from files — {rows[0]['device_name']} — {rows[0]['shape']}"
    return _bars(rows, [(files, "median_ms", 1e-3, "time until on disk (s)"),
                        (files, "peak_mem_mb", 1.0, "peak RSS (MB)")], title, out_dir / "soup.png", plt)


def _train_step_bars(rows, out_dir: Path, plt) -> list[Path]:
    """tokens/s and peak memory of the "step" rows and the "max_batch" rows' largest batch, a bar per provider."""
    if not rows:
        return []
    step = lambda r: r["mode"] == "step" and r["median_ms"] not in ("", None)
    panels = [(step, "tokens_per_s", 1.0, "tokens/s (same batch)"), (step, "peak_mem_mb", 1.0, "peak memory (MB)"),
              (lambda r: r["mode"] == "max_batch", "max_batch", 1.0, "largest batch B")]
    title = f"train step — {rows[0]['device_name']} — {rows[0]['dtype']}"
    return _bars(rows, panels, title, out_dir / "train_step.png", plt)
