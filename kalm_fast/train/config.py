"""The recipe: one typed block per stage, read from YAML, overridden with ``--set key=value``, checked before training.

    recipe = load_recipe("recipes/demo.yaml", overrides=["stages.finetune.lr=3e-5", "seed=1"])

Every field has a default with a one-line reason. Unknown keys, wrong types, missing data files, empty datasets and rows
without a positive are :class:`RecipeError` s that name the key (``stages.finetune.batch_size``) or the file and row,
raised by :func:`load_recipe` / :func:`kalm_fast.train.data.check_data` before any training starts. Relative data
and task paths resolve against ``data_dir`` (default: the recipe file's folder); ``output_dir`` against the working
directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key or file and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    path: str = ""  # a Hugging Face folder (BERT-like encoder or Qwen2/Qwen3/Llama/Mistral decoder)
    max_length: int = 512  # truncation of documents, in tokens
    query_max_length: int | None = None  # truncation of queries (None: max_length); queries are short
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights' dtype (bf16 autocast runs on CUDA anyway)
    bidirectional: bool = True  # decoders drop their causal mask (KaLM-Embedding-V2)
    include_prompt: bool = True  # pool the instruction prompt's tokens too (False: attended to, not pooled)


@dataclass
class DataSource:
    path: str = ""  # jsonl or parquet rows {query, pos, neg?, instruction?, dataset?}
    name: str | None = None  # dataset name for task-homogeneous batches (None: each row's "dataset", else file stem)
    instruction: str | None = None  # queries become "Instruct: {instruction} \n Query: {query}" (rows may override)
    weight: float = 1.0  # mixing ratio: this many times its batches per epoch (0.5 = half of them)
    in_batch_negatives: bool = True  # other queries' documents are negatives too (off for e.g. classification data)
    max_rows: int | None = None  # keep the first max_rows rows (quick runs)


@dataclass
class StageConfig:
    data: list[DataSource] = field(default_factory=list)
    epochs: float = 1.0  # passes over the data (fractions allowed)
    max_steps: int | None = None  # stop earlier (quick runs)
    batch_size: int = 64  # queries per contrastive batch (all ranks together); documents = batch_size * (1 + negs)
    mini_batch_size: int = 32  # GradCache: texts per encoder forward; memory is bounded by this, not batch_size
    num_negatives: int = 0  # hard negatives per query from each row's "neg" (G = 1 + num_negatives)
    lr: float = 2e-5  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the steps, then linear decay to 0
    max_grad_norm: float = 1.0  # clipping (0 = off)
    temperature: float = 0.05  # tau of InfoNCE (KaLM-V2: 0.01-0.05)
    gamma: float = 0.0  # focal exponent on (1 - p_pos); 0 = plain InfoNCE
    num_mix: int = 0  # synthetic hard negatives mixed online from the hardest real ones (M)
    mix_alpha: float = 2.0  # mixing lambda ~ Beta(alpha, alpha)
    mrl_dims: list[int] | None = None  # Matryoshka dims (each truncated vector re-normalized); None = full only
    mrl_weights: list[float] | None = None  # one weight per mrl dim (None = all 1)
    save_every: int = 0  # checkpoint every this many steps (0: only at the end); checkpoints are soup candidates
    keep_checkpoints: int = 0  # model folders of older checkpoints kept (0 = all); resume needs only the latest
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    max_nonfinite: int = 10  # non-finite losses/gradients skipped before the stage stops with an error
    log_every: int = 1  # console line every this many steps (metrics.jsonl gets every step)


@dataclass
class MineConfig:
    input: str = ""  # rows {query, pos, ...} to mine negatives for
    output: str = "mined.jsonl"  # written with "neg" lists (relative: under data_dir)
    rank_start: int = 50  # hard negatives are drawn from the previous model's ranks [rank_start, rank_end)
    rank_end: int = 100
    num_negatives: int = 7  # per query
    consistency_top_k: int = 10  # ranking-consistency filter: keep a row only if its positive ranks in the top k
    instruction: str | None = None  # query instruction while mining (rows may override)
    batch_size: int = 64  # encoding batch
    max_rows: int | None = None  # mine a seeded random subset of this many rows (quick runs; a smaller corpus)


@dataclass
class SoupConfig:
    method: Literal["uniform", "weighted", "greedy"] = "greedy"  # greedy: by the validation task's score
    stages: list[str] = field(default_factory=lambda: ["finetune"])  # every kept checkpoint of these stages
    paths: list[str] = field(default_factory=list)  # extra candidate model folders
    weights: list[float] | None = None  # method "weighted": one per candidate (stages' checkpoints, then paths)


@dataclass
class TaskSpec:
    kind: Literal["retrieval", "sts", "classification", "clustering"] = "retrieval"
    path: str = ""  # folder or file in the layout of kalm_fast.eval.load_task_from_files
    name: str = ""  # MTEB task name (unique)
    instruction: str | None = None  # query instruction (retrieval) or text instruction (others)


@dataclass
class EvalConfig:
    tasks: list[TaskSpec] = field(default_factory=list)  # local MTEB tasks run on the base model and after each stage
    named_tasks: list[str] = field(default_factory=list)  # MTEB tasks by name (their data must be reachable)
    validation: TaskSpec | None = None  # the greedy soup's selection task (never a reported task)
    batch_size: int = 64
    base: bool = True  # score the base model too (the table's first row)
    base_instructions: bool = False  # the base row without instructions: a model never trained with them is used
    # without them (all-MiniLM-L6-v2 loses 0.25 nDCG@10 on the demo with the instruction prompt)
    bm25: bool = True  # print mteb's BM25 beside retrieval tasks, for honesty


@dataclass
class Stages:
    pretrain: StageConfig | None = None  # weakly supervised pairs, in-batch negatives, large batch
    mine: MineConfig | None = None  # hard negatives from the pre-trained model
    finetune: StageConfig | None = None  # hard negatives, focal weighting, mixing, instructions, Matryoshka
    soup: SoupConfig | None = None  # average of the fine-tuning checkpoints


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: Stages = field(default_factory=Stages)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/kalm-fast"  # stages, checkpoints, metrics.jsonl, scores and summary.md go here
    data_dir: str | None = None  # base of relative data/task paths (None: the recipe file's folder)
    seed: int = 0  # data order, dropout, mixing lambdas: a seeded run (and its resume) is reproducible on CPU
    device: str = "auto"  # auto = cuda when available (with torchrun: cuda:LOCAL_RANK), else cpu
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the backbone in place (kalm_fast's ops stay whole in its graphs)
    compile_backend: str = "inductor"  # the torch.compile backend ("aot_eager": graphs without code generation)

    def resolve(self, path: str) -> Path:
        """A data or task path: absolute as given, else under data_dir."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.data_dir or ".") / p


STAGE_ORDER = ("pretrain", "mine", "finetune", "soup")


# ----------------------------------------------------------------------------------------------------------------
# building typed objects from plain dicts
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    """``value`` (from YAML) as type ``tp``, or a RecipeError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads "5e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} at {where}")  # a schema bug, not a user error


def build(cls, raw, where: str = ""):
    """A ``cls`` dataclass from a dict: unknown keys and wrong types raise RecipeError naming the key path
    (``where`` is the path of ``raw`` itself; "" for the recipe's top level)."""
    label = where or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{label}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise RecipeError(f"{label}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)}; known: {', '.join(names)}")
    return cls(**{k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()})


def _apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` into the nested dict (value parsed as YAML: numbers, booleans, lists, null)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. stages.finetune.lr=1e-5")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                raw: dict | None = None, check: bool = True) -> Recipe:
    """Read a YAML recipe (or take ``raw``), apply ``key=value`` overrides, build it (keys and types) and, with
    ``check``, check it (:func:`check_recipe`: values, files; the data rows are checked by
    :func:`kalm_fast.train.data.check_data`)."""
    if raw is None:
        if path is None:
            raise RecipeError("give a recipe path or raw")
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    raw = json.loads(json.dumps(raw))  # a private deep copy: the caller's dict is never modified
    for item in overrides or []:
        _apply_override(raw, item)
    recipe = build(Recipe, raw)
    if recipe.data_dir is None and path is not None:
        recipe.data_dir = str(Path(path).parent)
    if check:
        check_recipe(recipe)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# checks before training
# ----------------------------------------------------------------------------------------------------------------


def _positive(where: str, value, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise RecipeError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_stage(name: str, s: StageConfig, produced: set[Path], recipe: Recipe) -> None:
    where = f"stages.{name}"
    if not s.data:
        raise RecipeError(f"{where}.data: give at least one data source")
    for i, src in enumerate(s.data):
        if not src.path:
            raise RecipeError(f"{where}.data[{i}].path: missing")
        p = recipe.resolve(src.path)
        if p not in produced and not p.is_file():
            raise RecipeError(f"{where}.data[{i}].path: file {p} not found")
        if src.weight <= 0:
            raise RecipeError(f"{where}.data[{i}].weight: must be > 0, got {src.weight}")
        _positive(f"{where}.data[{i}].max_rows", src.max_rows)
    for key in ("epochs", "batch_size", "mini_batch_size", "temperature", "mix_alpha", "log_every"):
        _positive(f"{where}.{key}", getattr(s, key))
    for key in ("lr", "weight_decay", "max_grad_norm", "gamma", "num_mix", "num_negatives", "save_every",
                "keep_checkpoints", "max_nonfinite"):
        _positive(f"{where}.{key}", getattr(s, key), allow_zero=True)
    _positive(f"{where}.max_steps", s.max_steps)
    if not 0 <= s.warmup_ratio < 1:
        raise RecipeError(f"{where}.warmup_ratio: must be in [0, 1), got {s.warmup_ratio}")
    if s.batch_size < 2:
        raise RecipeError(f"{where}.batch_size: contrastive batches need >= 2 queries, got {s.batch_size}")
    if s.mrl_dims is not None:
        if not s.mrl_dims or any(d < 1 for d in s.mrl_dims) or len(set(s.mrl_dims)) != len(s.mrl_dims):
            raise RecipeError(f"{where}.mrl_dims: distinct positive dims expected, got {s.mrl_dims}")
        if s.mrl_weights is not None and len(s.mrl_weights) != len(s.mrl_dims):
            raise RecipeError(f"{where}.mrl_weights: one weight per mrl dim ({len(s.mrl_dims)}), "
                              f"got {len(s.mrl_weights)}")
    elif s.mrl_weights is not None:
        raise RecipeError(f"{where}.mrl_weights: given without mrl_dims")
    if s.mrl_weights is not None and (any(w < 0 for w in s.mrl_weights) or sum(s.mrl_weights) <= 0):
        raise RecipeError(f"{where}.mrl_weights: must be >= 0 with a positive sum, got {s.mrl_weights}")


def _check_task(where: str, t: TaskSpec, recipe: Recipe) -> None:
    if not t.name:
        raise RecipeError(f"{where}.name: missing")
    if not t.path:
        raise RecipeError(f"{where}.path: missing")
    if not recipe.resolve(t.path).exists():
        raise RecipeError(f"{where}.path: {recipe.resolve(t.path)} not found")


def check_recipe(recipe: Recipe) -> None:
    """Everything that can be checked without reading the data rows."""
    if not recipe.model.path:
        raise RecipeError("model.path: missing (a Hugging Face model folder)")
    if recipe.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if recipe.compile_backend not in backends:
            raise RecipeError(f"compile_backend: {recipe.compile_backend!r} is not a torch.compile backend here "
                              f"(one of {', '.join(backends)})")
    _positive("model.max_length", recipe.model.max_length)
    _positive("model.query_max_length", recipe.model.query_max_length)
    st = recipe.stages
    if not any(getattr(st, n) for n in STAGE_ORDER):
        raise RecipeError(f"stages: no stage given (any of {', '.join(STAGE_ORDER)})")
    produced: set[Path] = set()
    if st.pretrain:
        _check_stage("pretrain", st.pretrain, produced, recipe)
    if st.mine:
        m = st.mine
        if not m.input or not recipe.resolve(m.input).is_file():
            raise RecipeError(f"stages.mine.input: file {recipe.resolve(m.input) if m.input else '(missing)'} "
                              "not found")
        if not 0 <= m.rank_start < m.rank_end:
            raise RecipeError(f"stages.mine: need 0 <= rank_start < rank_end, got {m.rank_start}, {m.rank_end}")
        if m.num_negatives < 1 or m.num_negatives > m.rank_end - m.rank_start:
            raise RecipeError(f"stages.mine.num_negatives: must be in [1, rank_end - rank_start = "
                              f"{m.rank_end - m.rank_start}], got {m.num_negatives}")
        _positive("stages.mine.consistency_top_k", m.consistency_top_k)
        _positive("stages.mine.batch_size", m.batch_size)
        _positive("stages.mine.max_rows", m.max_rows)
        produced.add(recipe.resolve(m.output))
    if st.finetune:
        _check_stage("finetune", st.finetune, produced, recipe)
    if st.soup:
        so = st.soup
        for s in so.stages:
            if s not in ("pretrain", "finetune") or getattr(st, s) is None:
                raise RecipeError(f"stages.soup.stages: {s!r} is not a training stage of this recipe")
        for p in so.paths:
            if not Path(p).is_dir():
                raise RecipeError(f"stages.soup.paths: model folder {p} not found")
        if not so.stages and not so.paths:
            raise RecipeError("stages.soup: no candidates (give stages and/or paths)")
        if so.method == "weighted" and so.weights is None:
            raise RecipeError("stages.soup.weights: method 'weighted' needs one weight per candidate")
        if so.method == "greedy" and recipe.eval.validation is None:
            raise RecipeError("stages.soup.method: 'greedy' needs eval.validation (the selection task)")
    names = set()
    for i, t in enumerate(recipe.eval.tasks):
        _check_task(f"eval.tasks[{i}]", t, recipe)
        if t.name in names:
            raise RecipeError(f"eval.tasks[{i}].name: {t.name!r} appears twice")
        names.add(t.name)
    if recipe.eval.validation is not None:
        _check_task("eval.validation", recipe.eval.validation, recipe)
    _positive("eval.batch_size", recipe.eval.batch_size)
