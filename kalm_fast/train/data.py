"""Training rows and task-homogeneous batches.

Rows ``{query, pos, neg?, instruction?, dataset?}`` come from jsonl or parquet files through ``datasets`` (``pos`` a
string or a non-empty list whose first entry is used; ``neg`` a list of strings). Every batch holds rows of one dataset
only (KaLM-Embedding-V2: in-batch negatives from another task are too easy and instructions differ per task); the
batches of all datasets are then shuffled together. The order is a pure function of (seed, epoch), so a resumed run
sees the same batches from the saved position on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from kalm_fast.train.config import DataSource, Recipe, RecipeError


@dataclass
class Example:
    query: str
    pos: str
    negs: list[str]
    instruction: str | None
    dataset: str


@dataclass
class Batch:
    dataset: str
    examples: list[Example]
    in_batch_negatives: bool


def load_rows(path: str | Path, *, max_rows: int | None = None, num_negatives: int = 0,
              where: str = "data") -> list[dict]:
    """Rows of a jsonl/parquet file as dicts, checked: non-empty file, every row with a non-empty string ``query``
    and ``pos``, and at least ``num_negatives`` string negatives in ``neg``. Errors name the file and row."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{where}: file {path} not found")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise RecipeError(f"{where}: {path} must be .jsonl, .json or .parquet")
    if path.stat().st_size == 0:
        raise RecipeError(f"{where}: {path} is empty")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise RecipeError(f"{where}: cannot read {path}: {e}") from None
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise RecipeError(f"{where}: {path} has no rows")
    for i, row in enumerate(rows):
        pos = row.get("pos")
        if isinstance(pos, list):
            pos = pos[0] if pos else None
        if not isinstance(row.get("query"), str) or not row["query"].strip():
            raise RecipeError(f"{where}: {path} row {i} has no query (a non-empty string)")
        if not isinstance(pos, str) or not pos.strip():
            raise RecipeError(f"{where}: {path} row {i} has no positive 'pos' (a non-empty string or list)")
        row["pos"] = pos
        negs = row.get("neg") or []
        if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
            raise RecipeError(f"{where}: {path} row {i}: 'neg' must be a list of strings")
        if len(negs) < num_negatives:
            raise RecipeError(f"{where}: {path} row {i} has {len(negs)} negatives, the stage needs "
                              f"num_negatives={num_negatives} (mine them with kalm-fast mine)")
        row["neg"] = negs
    return rows


def load_examples(src: DataSource, path: Path, num_negatives: int, where: str) -> list[Example]:
    rows = load_rows(path, max_rows=src.max_rows, num_negatives=num_negatives, where=where)
    default_name = src.name or path.stem
    return [Example(query=r["query"], pos=r["pos"], negs=list(r["neg"][:num_negatives]),
                    instruction=r.get("instruction") or src.instruction,
                    dataset=src.name or r.get("dataset") or default_name) for r in rows]


class BatchPlan:
    """The batches of every epoch: per dataset, rows shuffled and cut into full batches (the remainder is dropped so
    every step has the same contrastive difficulty and DDP ranks equal shares); ``weight`` scales how many of its
    batches an epoch draws (repeating a reshuffle when > 1); then all batches are shuffled together."""

    def __init__(self, sources: list[tuple[DataSource, list[Example]]], batch_size: int, seed: int):
        self.batch_size = batch_size
        self.seed = seed
        self.groups: list[tuple[str, list[Example], float, bool]] = []
        for src, examples in sources:
            by_name: dict[str, list[Example]] = {}
            for ex in examples:
                by_name.setdefault(ex.dataset, []).append(ex)
            for name, exs in by_name.items():
                self.groups.append((name, exs, src.weight, src.in_batch_negatives))
        if self.steps_per_epoch() == 0:
            sizes = ", ".join(f"{name}: {len(exs)}" for name, exs, _, _ in self.groups)
            raise RecipeError(f"batch_size={batch_size} is larger than every dataset ({sizes}): no full batch")

    def _count(self, n_rows: int, weight: float) -> int:
        return round(weight * (n_rows // self.batch_size))

    def steps_per_epoch(self) -> int:
        return sum(self._count(len(exs), w) for _, exs, w, _ in self.groups)

    def epoch(self, epoch: int) -> list[Batch]:
        rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash deterministically (not with PYTHONHASHSEED)
        batches = []
        for name, exs, weight, in_batch in self.groups:
            want = self._count(len(exs), weight)
            per_pass = len(exs) // self.batch_size
            for p in range(math.ceil(want / per_pass) if per_pass else 0):
                order = list(range(len(exs)))
                rng.shuffle(order)
                for b in range(min(per_pass, want - p * per_pass)):
                    idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                    batches.append(Batch(name, [exs[i] for i in idx], in_batch))
        rng.shuffle(batches)
        return batches


def check_data(recipe: Recipe) -> None:
    """Read every data file that exists now (a mined file is checked when it is written) and check its rows."""
    st = recipe.stages
    for name in ("pretrain", "finetune"):
        stage = getattr(st, name)
        if stage is None:
            continue
        for i, src in enumerate(stage.data):
            p = recipe.resolve(src.path)
            if st.mine and p == recipe.resolve(st.mine.output) and not p.is_file():
                continue
            load_rows(p, max_rows=src.max_rows, num_negatives=stage.num_negatives,
                      where=f"stages.{name}.data[{i}]")
    if st.mine:
        load_rows(recipe.resolve(st.mine.input), where="stages.mine.input")
