"""Training rows and task-homogeneous batches.

Rows ``{query, pos, neg?, instruction?, dataset?}`` come from jsonl or parquet files through ``datasets`` (``pos`` a
string or a non-empty list whose first entry is used; ``neg`` a list of strings). Every batch holds rows of one dataset
only (KaLM-Embedding-V2: in-batch negatives from another task are too easy and instructions differ per task); the
batches of all datasets are then shuffled together. The order is a pure function of (seed, epoch), so a resumed run
sees the same batches from the saved position on.
"""

from __future__ import annotations

import array
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


def open_rows(path: str | Path, where: str, max_rows: int | None):
    """The rows of a jsonl/parquet file as a ``datasets.Dataset``: an Arrow table memory-mapped from the datasets
    cache, so rows are read when used, not held as Python objects. Errors name the file."""
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
    if len(ds) == 0:
        raise RecipeError(f"{where}: {path} has no rows")
    return ds


def first_positive(pos):
    """The positive a row's ``pos`` gives: the string, or a list's first entry (None for an empty list)."""
    if isinstance(pos, list):
        return pos[0] if pos else None
    return pos


def checked_row(row: dict, i: int, path, where: str, num_negatives: int) -> tuple[str, list[str]]:
    """(pos, negatives) of row ``i``: a non-empty string ``query`` and ``pos`` (a string, or a non-empty list whose
    first entry is used), at least ``num_negatives`` string negatives in ``neg``."""
    pos = first_positive(row.get("pos"))
    if not isinstance(row.get("query"), str) or not row["query"].strip():
        raise RecipeError(f"{where}: {path} row {i} has no query (a non-empty string)")
    if not isinstance(pos, str) or not pos.strip():
        raise RecipeError(f"{where}: {path} row {i} has no positive 'pos' (a non-empty string or list)")
    negs = row.get("neg") or []
    if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
        raise RecipeError(f"{where}: {path} row {i}: 'neg' must be a list of strings")
    if len(negs) < num_negatives:
        raise RecipeError(f"{where}: {path} row {i} has {len(negs)} negatives, the stage needs "
                          f"num_negatives={num_negatives} (mine them with kalm-fast mine)")
    return pos, negs


def iter_rows(ds, columns: list[str] | None = None, batch_size: int = 4096):
    """(row number, row dict) over ``ds`` read a batch of rows at a time (memory O(batch))."""
    i = 0
    for batch in (ds.select_columns(columns) if columns else ds).iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield i, dict(zip(keys, values))
            i += 1


def checked_rows(ds, path, where: str, num_negatives: int, extra: tuple[str, ...] = ()):
    """(row number, row, pos, negatives) for every row of ``ds``, checked by ``checked_row``, a batch of rows at a
    time; the row dicts hold ``query``, ``pos``, ``neg`` and the ``extra`` columns the file has."""
    columns = [c for c in ("query", "pos", "neg", *extra) if c in ds.column_names]
    for i, row in iter_rows(ds, columns):
        yield i, row, *checked_row(row, i, path, where, num_negatives)


def check_rows(path: str | Path, *, max_rows: int | None = None, num_negatives: int = 0, where: str = "data") -> int:
    """Check every row of a jsonl/parquet file (non-empty file, every row with a non-empty string ``query`` and
    ``pos``, at least ``num_negatives`` string negatives in ``neg``; errors name the file and row), a batch of rows at a
    time, without keeping them; returns their count."""
    ds = open_rows(path, where, max_rows)
    for _ in checked_rows(ds, path, where, num_negatives):
        pass
    return len(ds)


class ExampleSource:
    """The rows of one data file of a stage as Examples, read from the memory-mapped Arrow table when a batch needs
    them: a process holds the row numbers of each dataset (8 bytes a row), not the texts (10M fine-tuning rows with
    7 negatives are tens of GB as Python strings, on every rank). Every row is checked when the source is made."""

    def __init__(self, src: DataSource, path: Path, num_negatives: int, where: str):
        self.num_negatives = num_negatives
        self.instruction = src.instruction
        self.ds = open_rows(path, where, src.max_rows)
        default_name = src.name or path.stem
        # row numbers per dataset name: names in order of first appearance, rows in file order
        self.groups: dict[str, array.array] = {}
        for i, row, _, _ in checked_rows(self.ds, path, where, num_negatives, extra=("dataset",)):
            name = src.name or row.get("dataset") or default_name
            if name not in self.groups:
                self.groups[name] = array.array("q")
            self.groups[name].append(i)

    def examples(self, rows: list[int], dataset: str) -> list[Example]:
        """The Examples of these row numbers (rows of ``dataset``), in this order: one Arrow take."""
        cols = self.ds[list(rows)]
        empty = [None] * len(rows)
        return [Example(query=query, pos=first_positive(pos),
                        negs=list((negs or [])[:self.num_negatives]), instruction=instruction or self.instruction,
                        dataset=dataset)
                for query, pos, negs, instruction in zip(cols["query"], cols["pos"], cols.get("neg", empty),
                                                         cols.get("instruction", empty))]


def load_examples(src: DataSource, path: Path, num_negatives: int, where: str) -> ExampleSource:
    return ExampleSource(src, path, num_negatives, where)


@dataclass
class Batch:
    dataset: str
    source: ExampleSource
    rows: list[int]  # row numbers of ``source``
    in_batch_negatives: bool

    @property
    def examples(self) -> list[Example]:
        return self.take(0, len(self.rows))

    def take(self, start: int, stop: int) -> list[Example]:
        """Examples ``start:stop`` of the batch (a rank's share), read from the file's Arrow table."""
        return self.source.examples(self.rows[start:stop], self.dataset)


class BatchPlan:
    """The batches of every epoch: per dataset, rows shuffled and cut into full batches (the remainder is dropped so
    every step has the same contrastive difficulty and DDP ranks equal shares); ``weight`` scales how many of its
    batches an epoch draws (repeating a reshuffle when > 1); then all batches are shuffled together. Batches hold
    row numbers; their texts are read when a step asks for ``Batch.examples``."""

    def __init__(self, sources: list[tuple[DataSource, ExampleSource]], batch_size: int, seed: int):
        self.batch_size = batch_size
        self.seed = seed
        self.groups: list[tuple[str, ExampleSource, array.array, float, bool]] = []
        for src, source in sources:
            for name, rows in source.groups.items():
                self.groups.append((name, source, rows, src.weight, src.in_batch_negatives))
        if self.steps_per_epoch() == 0:
            sizes = ", ".join(f"{name}: {len(rows)}" for name, _, rows, _, _ in self.groups)
            raise RecipeError(f"batch_size={batch_size} is larger than every dataset ({sizes}): no full batch")

    def _count(self, n_rows: int, weight: float) -> int:
        return round(weight * (n_rows // self.batch_size))

    def steps_per_epoch(self) -> int:
        return sum(self._count(len(rows), w) for _, _, rows, w, _ in self.groups)

    def epoch(self, epoch: int) -> list[Batch]:
        rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash deterministically (not with PYTHONHASHSEED)
        batches = []
        for name, source, rows, weight, in_batch in self.groups:
            want = self._count(len(rows), weight)
            per_pass = len(rows) // self.batch_size
            for p in range(math.ceil(want / per_pass) if per_pass else 0):
                order = list(range(len(rows)))
                rng.shuffle(order)
                for b in range(min(per_pass, want - p * per_pass)):
                    idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                    batches.append(Batch(name, source, [rows[i] for i in idx], in_batch))
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
            check_rows(p, max_rows=src.max_rows, num_negatives=stage.num_negatives,
                       where=f"stages.{name}.data[{i}]")
    if st.mine:
        check_rows(recipe.resolve(st.mine.input), where="stages.mine.input")
