"""The lean trainer: ``run_recipe(recipe)`` runs pretrain -> mine -> finetune -> soup with an MTEB check after each.

One contrastive step (:func:`grad_cache_step`) is GradCache (Gao et al. 2021): embed every query and document of the
batch without autograd in mini-batches, compute the loss on those cached embeddings (the fused focal InfoNCE; the
B x N similarity matrix is never stored), then re-run each mini-batch with autograd and backpropagate the cached
embedding gradients into the encoder. Memory is bounded by ``mini_batch_size`` activations plus O((B + N) * D) for the
loss, so the contrastive batch can be far larger than the activations allow. Dropout masks are replayed: each
mini-batch's RNG state is recorded in the first pass and restored for its second, so both passes see the same network.

Under ``torchrun`` every rank embeds its slice of the batch, documents are all-gathered with autograd
(:func:`kalm_fast.distributed.gather_with_grad`, cross-device negatives) and parameter gradients are averaged.

Layout of ``output_dir``::

    recipe.yaml  metrics.jsonl  summary.md  scores.json (all stages)  base/scores.json
    <stage>/checkpoints/step-000040/{model/ (a HF + sentence-transformers folder), state/ (optimizer, RNG, position)}
    <stage>/checkpoints/latest   <stage>/done.json (final model folder + MTEB scores)   mine/mined.jsonl   soup/model/

Checkpoints are written to a temporary folder and renamed; ``latest`` is replaced atomically after the rename, so a
crash or a full disk mid-write leaves the previous checkpoint as the one a restart resumes from. A resumed run
(same recipe, same seed, CPU) ends with the same weights as an uninterrupted one: the data order is a function of
(seed, epoch), the mixing lambdas of (seed, stage, step), and the dropout RNG is saved with the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from kalm_fast.atomic import publish, write_json, write_text
from kalm_fast.distributed import average_gradients, barrier, world
from kalm_fast.model import Embedder, query_prompt
from kalm_fast.ops import use_triton
from kalm_fast.train.checkpoint import Checkpoints, TrainingError, load_weights
from kalm_fast.train.config import STAGE_ORDER, Recipe, RecipeError, StageConfig, TaskSpec, dump_recipe
from kalm_fast.train.data import Batch, BatchPlan, check_data, load_examples
from kalm_fast.train.step import contrastive_loss, grad_cache, grad_cache_step  # noqa: F401 (grad_cache: public)

# ----------------------------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------------------------


def setup_device(recipe: Recipe) -> torch.device:
    """The device of this process; under torchrun (WORLD_SIZE > 1) also the process group (NCCL on CUDA, else
    gloo)."""
    want = recipe.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    if want == "cuda":
        want = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(want)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"device: {recipe.device!r} but CUDA is not available")
        torch.cuda.set_device(device)
    return device


def _memory_mb(device: torch.device) -> float:
    """The step's memory: on CUDA the peak allocated since the step began (``_step_started`` resets it), on CPU the
    process's resident set size now."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:  # resident set size of this process
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _step_started(device: torch.device) -> float:
    if device.type == "cuda":  # a per-step peak, and a clock that starts after the previous step's queued work
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def _step_seconds(device: torch.device, t0: float) -> float:
    if device.type == "cuda":  # the backward and optimizer step are queued, not done, when the host gets here
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def load_embedder(path: str | Path, recipe: Recipe, device: torch.device) -> Embedder:
    return Embedder.from_pretrained(path, bidirectional=recipe.model.bidirectional, dtype=recipe.model.dtype,
                                    device=device, max_length=recipe.model.max_length,
                                    include_prompt=recipe.model.include_prompt)


# ----------------------------------------------------------------------------------------------------------------
# a training stage
# ----------------------------------------------------------------------------------------------------------------


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:  # linear warmup to 1, then linear decay to 0 at `total`
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _step_generator(seed: int, stage: str, step: int, device: torch.device) -> torch.Generator:
    rank, _ = world()
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, STAGE_ORDER.index(stage), step, rank)) & 0x7FFF_FFFF_FFFF)  # ints hash stably
    return g


class MetricsLog:
    """``metrics.jsonl``: one JSON line per step (rank 0). On resume the lines of this stage after the resumed step
    are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, stage: str, resume_step: int):
        self.path = path
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            kept = [json.dumps(r) for r in rows if not (r.get("stage") == stage and r["step"] > resume_step)]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def train_stage(name: str, stage: StageConfig, recipe: Recipe, embedder: Embedder, out: Path,
                callback: Callable[[str, int], None] | None = None) -> Path:
    """Train ``embedder`` in place on one stage; resumes from ``out/<name>/checkpoints/latest`` if there is one.
    Returns the final checkpoint's model folder. ``callback(stage, step)`` runs after every step (tests)."""
    rank, size = world()
    device = embedder.device
    if stage.batch_size % size:
        raise RecipeError(f"stages.{name}.batch_size={stage.batch_size} must be divisible by the {size} ranks")
    sources = [(src, load_examples(src, recipe.resolve(src.path), stage.num_negatives, f"stages.{name}.data[{i}]"))
               for i, src in enumerate(stage.data)]
    plan = BatchPlan(sources, stage.batch_size, recipe.seed)
    total = math.ceil(stage.epochs * plan.steps_per_epoch())
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)

    embedder.train()
    if stage.gradient_checkpointing:
        embedder.gradient_checkpointing_enable()
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, int(stage.warmup_ratio * total)))
    ckpts = Checkpoints(out / name / "checkpoints", stage.keep_checkpoints)

    step, nonfinite = 0, 0
    latest = ckpts.latest()
    if latest is not None:
        state = ckpts.load(latest, embedder, optimizer, scheduler, device)
        step, nonfinite = state["step"], state["nonfinite"]
        if rank == 0:
            print(f"[{name}] resuming from {latest} (step {step}/{total})")
    log = MetricsLog(out / "metrics.jsonl", name, step) if rank == 0 else None
    autocast = recipe.bf16 and device.type == "cuda"
    G = 1 + stage.num_negatives
    per_rank = stage.batch_size // size
    q_len = recipe.model.query_max_length or recipe.model.max_length
    spe = plan.steps_per_epoch()
    bar = tqdm(total=total, initial=step, desc=name, unit="step", disable=rank != 0, dynamic_ncols=True)
    last = latest
    batches: dict[int, list[Batch]] = {}
    try:
        while step < total:
            epoch, index = divmod(step, spe)
            if epoch not in batches:
                batches = {epoch: plan.epoch(epoch)}
            batch = batches[epoch][index]
            # rows of one instruction together (one prompt per GradCache mini-batch); the loss ignores row order
            examples = sorted(batch.take(rank * per_rank, (rank + 1) * per_rank), key=lambda e: e.instruction or "")
            docs = [t for ex in examples for t in [ex.pos, *ex.negs]]
            gen = _step_generator(recipe.seed, name, step, device) if stage.num_mix else None

            def loss_fn(q, d, batch=batch, gen=gen):
                return contrastive_loss(q, d, group_size=G, in_batch_negatives=batch.in_batch_negatives,
                                        stage=stage, generator=gen)

            t0 = _step_started(device)
            loss, stats, tokens, finite = grad_cache_step(
                embedder, [ex.query for ex in examples], docs, loss_fn, mini_batch_size=stage.mini_batch_size,
                query_prompts=[query_prompt(ex.instruction) for ex in examples], query_max_length=q_len,
                doc_max_length=recipe.model.max_length, autocast=autocast)
            grad_norm = float("nan")
            if finite:
                average_gradients(params)
                if stage.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm))
                finite = stage.max_grad_norm == 0 or math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            else:
                nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            seconds = _step_seconds(device, t0)

            p_pos = stats["p_pos"].float().mean() if stats is not None else torch.tensor(float("nan"))
            if size > 1:  # the logged loss and p_pos are the global batch's: the mean over ranks
                pair = torch.stack([loss.float(), p_pos.to(loss.device)])
                dist.all_reduce(pair)
                loss, p_pos = pair / size
            if rank == 0:
                p_pos = float(p_pos)
                row = {"stage": name, "step": step, "epoch": round(step / spe, 3), "loss": float(loss),
                       "p_pos": p_pos, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": tokens * size / seconds, "mem_mb": round(_memory_mb(device), 1),
                       "seconds": round(seconds, 3), "skipped": not finite, "dataset": batch.dataset}
                log.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", p_pos=f"{p_pos:.2f}")
                if step % stage.log_every == 0 or step == total or not finite:
                    bar.write(f"[{name}] step {step}/{total} loss {row['loss']:.4f} p_pos {p_pos:.3f} "
                              f"lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f} mem {row['mem_mb']:.0f} MB"
                              f"{' (non-finite: skipped)' if not finite else ''}")
            if nonfinite > stage.max_nonfinite:
                raise TrainingError(f"[{name}] {nonfinite} non-finite losses or gradients (max_nonfinite="
                                    f"{stage.max_nonfinite}); lower the learning rate. Last good checkpoint: "
                                    f"{last or 'none'}")
            if step == total or (stage.save_every and step % stage.save_every == 0):
                if rank == 0:
                    last = ckpts.save(step, embedder, optimizer, scheduler,
                                      {"step": step, "nonfinite": nonfinite, "total": total}, device)
                barrier()
            if callback is not None:
                callback(name, step)
    finally:
        bar.close()
        if stage.gradient_checkpointing:
            embedder.gradient_checkpointing_disable()
        embedder.eval()
    return (last or ckpts.latest()) / "model"


# ----------------------------------------------------------------------------------------------------------------
# evaluation and the recipe
# ----------------------------------------------------------------------------------------------------------------


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, bytes): equal digests, equal models."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Evaluator:
    """The recipe's MTEB tasks, built once; ``scores(embedder, out)`` -> {task: main score} (written to
    ``out/scores.json`` by kalm_fast.eval). Scores are remembered by the weights' fingerprint: a model evaluated
    before (a soup that kept only the last checkpoint is that checkpoint) is not encoded again."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._seen: dict[tuple[str, bool, str], dict[str, float]] = {}
        self.kf_eval = None
        if recipe.eval.tasks or recipe.eval.named_tasks or recipe.eval.validation:
            from kalm_fast import eval as kf_eval  # mteb is heavy: only when there is something to evaluate

            self.kf_eval = kf_eval
        self.tasks = [self._task(t) for t in recipe.eval.tasks]
        if recipe.eval.named_tasks:
            self.tasks += kf_eval.named_tasks(recipe.eval.named_tasks)
        self.instructions = {t.name: t.instruction for t in recipe.eval.tasks if t.instruction}
        self.validation = recipe.eval.validation
        if self.validation is not None:
            self.validation_task = self._task(self.validation)
            if self.validation.instruction:
                self.instructions[self.validation.name] = self.validation.instruction

    def _task(self, spec: TaskSpec):
        return self.kf_eval.load_task_from_files(spec.kind, self.recipe.resolve(spec.path), name=spec.name)

    def _run(self, embedder, tasks, out, instructions=True):
        return self.kf_eval.evaluate(embedder, tasks, out, instructions=self.instructions if instructions else None,
                                     batch_size=self.recipe.eval.batch_size,
                                     max_length=self.recipe.model.max_length)

    def scores(self, embedder: Embedder, out: Path | None, *, instructions: bool = True) -> dict[str, float]:
        if not self.tasks:
            return {}
        key = ("tasks", instructions, weights_fingerprint(embedder.model))
        if key not in self._seen:
            self._seen[key] = self._run(embedder, self.tasks, out, instructions)
        elif out is not None:  # the same model was scored before: its record, written for this row too
            Path(out).mkdir(parents=True, exist_ok=True)
            write_json(Path(out) / "scores.json", {"scores": self._seen[key], "reused": "same weights scored before"})
        return dict(self._seen[key])

    def validation_score(self, embedder: Embedder) -> float:
        key = ("validation", True, weights_fingerprint(embedder.model))
        if key not in self._seen:
            self._seen[key] = self._run(embedder, [self.validation_task], None)
        return float(self._seen[key][self.validation.name])

    def bm25(self) -> dict[str, float]:
        from kalm_fast.eval import bm25_baseline

        return {t.metadata.name: bm25_baseline(t) for t in self.tasks if t.metadata.type == "Retrieval"}


def _stage_done(out: Path, name: str) -> dict | None:
    path = out / name / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish_stage(out: Path, name: str, model_dir: Path, scores: dict, seconds: float, **extra) -> dict:
    done = {"model": str(model_dir), "scores": scores, "seconds": round(seconds, 1), **extra}
    (out / name).mkdir(parents=True, exist_ok=True)
    write_json(out / name / "done.json", done)
    return done


def _soup_stage(recipe: Recipe, embedder: Embedder, out: Path, evaluator: Evaluator) -> tuple[Path, dict]:
    from kalm_fast.soup import greedy_soup, soup

    so = recipe.stages.soup
    candidates = [m for s in so.stages for m in Checkpoints(out / s / "checkpoints").models()]
    candidates += [Path(p) for p in so.paths]
    if not candidates:
        raise TrainingError("soup: no candidate checkpoints found")
    if so.weights is not None and len(so.weights) != len(candidates):
        raise RecipeError(f"stages.soup.weights: {len(so.weights)} weights for {len(candidates)} candidates "
                          f"({', '.join(map(str, candidates))})")
    target = out / "soup" / "model"
    info = {"candidates": [str(c) for c in candidates], "method": so.method}
    if so.method == "greedy":
        def score(state_dict):
            embedder.model.load_state_dict(state_dict)
            return evaluator.validation_score(embedder)

        result = greedy_soup(candidates, score)
        info.update(chosen=[str(candidates[i]) for i in result.chosen], validation_scores=result.scores,
                    soup_validation_score=result.score)
        embedder.model.load_state_dict(result.state_dict)
        tmp = target.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        embedder.save_pretrained(tmp)
        if target.exists():  # a .model.old beside a complete target is a dead run's leftover
            shutil.rmtree(target.with_name(".model.old"), ignore_errors=True)
        publish(tmp, target, target.with_name(".model.old"))  # a crash leaves the old soup or the new one
    else:
        soup(candidates, target, weights=so.weights if so.method == "weighted" else None, overwrite=True,
             progress=False)
        load_weights(embedder, target)
    return target, info


def run_recipe(recipe: Recipe, *, callback: Callable[[str, int], None] | None = None,
               on_phase: Callable[[str], None] | None = None) -> dict:
    """Run every stage of ``recipe`` (resuming finished stages and the latest checkpoint of an interrupted one),
    with the MTEB check after each; returns {"scores": {row: {task: score}}, "baselines": ..., "table": markdown}.
    ``callback(stage, step)`` runs after every training step, ``on_phase(name)`` before each phase ("base", every
    stage of STAGE_ORDER, "bm25") and once with "done" at the end (progress reports)."""
    phase = on_phase or (lambda name: None)
    t_start = time.perf_counter()
    check_data(recipe)  # every data file that exists now: errors before any training
    out = Path(recipe.output_dir)
    device = setup_device(recipe)
    rank, _ = world()
    torch.manual_seed(recipe.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    evaluator = Evaluator(recipe)
    embedder = load_embedder(recipe.model.path, recipe, device)
    if recipe.compile:  # in place: parameter names, checkpoints and loaded weights stay those of the module
        embedder.model.compile(backend=recipe.compile_backend)
        if rank == 0 and not use_triton(torch.empty(0, device=device)):
            print("compile: true, but the ops take the torch path here (no CUDA): its attention splits the graph "
                  "in every layer and recompiles for new lengths, so expect no speed-up (the Triton path compiles "
                  "whole)")
    rows: dict[str, dict[str, float]] = {}
    stage_seconds: dict[str, float] = {}

    def check(row: str, folder: Path, instructions: bool = True) -> dict:
        if rank != 0 or not evaluator.tasks:
            return {}
        t0 = time.perf_counter()
        scores = evaluator.scores(embedder, folder, instructions=instructions)
        print(f"[{row}] MTEB: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f" ({time.perf_counter() - t0:.0f} s)")
        return scores

    if recipe.eval.base and evaluator.tasks:
        phase("base")
        base = _stage_done(out, "base")
        if base is None:
            t0 = time.perf_counter()
            base = _finish_stage(out, "base", Path(recipe.model.path),
                                 check("base", out / "base", recipe.eval.base_instructions), time.perf_counter() - t0)
        rows["base"] = base["scores"]

    st = recipe.stages
    for name in STAGE_ORDER:
        cfg = getattr(st, name)
        if cfg is None:
            continue
        phase(name)
        done = _stage_done(out, name)
        if done is not None:
            if name != "mine":
                load_weights(embedder, Path(done["model"]))
                rows[name] = done["scores"]
            stage_seconds[name] = done["seconds"]
            print(f"[{name}] done earlier: {done['model']}")
            continue
        t0 = time.perf_counter()
        if name == "mine":
            from kalm_fast.train.mine import mine

            target = recipe.resolve(cfg.output)
            # every rank embeds and ranks its share; rank 0 writes the file
            stats = mine(embedder, recipe.resolve(cfg.input), target, cfg, seed=recipe.seed,
                         max_length=recipe.model.max_length)
            barrier()
            if rank == 0:
                _finish_stage(out, name, target, {}, time.perf_counter() - t0, **stats)
        elif name == "soup":
            model_dir, info = _soup_stage(recipe, embedder, out, evaluator) if rank == 0 else (None, {})
            barrier()
            if rank != 0:
                load_weights(embedder, out / "soup" / "model")
            rows[name] = check(name, out / name)
            if rank == 0:
                _finish_stage(out, name, model_dir, rows[name], time.perf_counter() - t0, **info)
        else:
            model_dir = train_stage(name, cfg, recipe, embedder, out, callback)
            rows[name] = check(name, out / name)
            if rank == 0:
                _finish_stage(out, name, model_dir, rows[name], time.perf_counter() - t0)
        stage_seconds[name] = round(time.perf_counter() - t0, 1)
        barrier()

    result = {"scores": rows, "baselines": {}, "seconds": stage_seconds}
    if rank == 0:
        if recipe.eval.bm25 and evaluator.tasks:
            phase("bm25")
            bm25_path = out / "bm25.json"
            if not bm25_path.is_file():
                write_json(bm25_path, evaluator.bm25())
            result["baselines"] = {"BM25": json.loads(bm25_path.read_text())}
        result["table"] = (evaluator.kf_eval.results_table(rows, baselines=result["baselines"] or None)
                           if evaluator.kf_eval and rows else "(no MTEB tasks in the recipe)")
        result["final_model"] = str(_final_model(out))
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(out / "scores.json", {k: v for k, v in result.items() if k != "table"})
        times = ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
        summary = (f"# kalm_fast run: {out}\n\nMTEB main scores (retrieval nDCG@10, classification accuracy, "
                   f"clustering V-measure) on the base model and after each stage.\n\n{result['table']}\n\n"
                   f"Stage times: {times}. Final model: `{result['final_model']}`.\n")
        write_text(out / "summary.md", summary)
    phase("done")
    return result


def _final_model(out: Path) -> Path | None:
    for name in reversed(STAGE_ORDER):
        done = _stage_done(out, name)
        if done is not None and name != "mine":
            return Path(done["model"])
    return None


