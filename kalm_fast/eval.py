"""mteb glue (SPEC 5): evaluate an ``Embedder`` on local MTEB tasks read from files, or on mteb's own tasks.

- ``MTEBEncoder`` wraps an ``Embedder`` as mteb 2.x's ``EncoderProtocol``. Instructions are per task: queries get
  ``"Instruct: {instruction} \\n Query: "`` prepended, documents nothing; texts of tasks without queries and
  documents (classification, clustering, STS: ``prompt_type`` None) all get it. Similarity is cosine.
- Local tasks (``retrieval_task``, ``sts_task``, ``classification_task``, ``clustering_task``, dispatched by
  ``load_task_from_files``) are mteb task classes whose ``load_data`` reads the files below; each task gets a class
  of its own, because mteb keeps a task's metadata on its class (``unload_data`` drops an instance's copy).

  ========================  ========================================================================================
  retrieval (folder)        ``corpus.jsonl`` {_id, text[, title]}, ``queries.jsonl`` {_id, text}, ``qrels.tsv``
                            (tab-separated, header ``query-id corpus-id score``); queries without a positive qrel
                            are dropped
  STS (file)                jsonl {sentence1, sentence2, score}, scores in any range (min/max taken from the data)
  classification (folder)   ``train.jsonl`` and ``test.jsonl`` {text, label}
  clustering (file/folder)  jsonl {text, label} (a folder holds ``clustering.jsonl``)
  ========================  ========================================================================================

- ``demo_tasks`` / ``demo_instructions``: the tasks of a ``build_demo_data`` folder and their instructions.
- ``named_tasks``: mteb's registered tasks; their data must already be in the Hugging Face cache (no download).
- ``evaluate`` runs ``mteb.evaluate`` and returns ``{task name: main score}`` (and writes ``scores.json``);
  ``results_table`` formats stages x tasks as markdown; ``bm25_baseline`` scores mteb's BM25 on a retrieval task.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _set_offline() -> None:
    """No network here: fail fast instead of retrying downloads. ``datasets`` and ``huggingface_hub`` read these
    variables when they are imported, hence also called before importing mteb below."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


_set_offline()

import mteb  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from datasets.utils import logging as datasets_logging  # noqa: E402
from mteb.abstasks import AbsTaskClassification, AbsTaskClustering, AbsTaskRetrieval, AbsTaskSTS  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from sklearn.exceptions import UndefinedMetricWarning  # noqa: E402

from kalm_fast.atomic import write_json  # noqa: E402
from kalm_fast.demo_data import INSTRUCTIONS  # noqa: E402
from kalm_fast.model import query_prompt  # noqa: E402

__all__ = ["MTEBEncoder", "retrieval_task", "sts_task", "classification_task", "clustering_task",
           "load_task_from_files", "demo_tasks", "demo_instructions", "named_tasks", "evaluate", "results_table"]

TASK_KINDS = ("retrieval", "sts", "classification", "clustering")
DEMO_TASK_NAMES = {"retrieval": "StdlibDocsRetrieval", "classification": "StdlibDocsClassification",
                   "clustering": "StdlibDocsClustering", "validation": "StdlibDocsValidation"}


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------


class MTEBEncoder:
    """An ``Embedder`` (anything with its ``encode``) as mteb's ``EncoderProtocol``.

    instructions: task name -> instruction (tasks not listed get no prompt). batch_size, max_length, dim: passed to
    ``embedder.encode`` (dim: Matryoshka truncation). name: the model name in mteb's results ("org/name").
    """

    def __init__(self, embedder, *, name: str = "kalm-fast/model", instructions: dict[str, str] | None = None,
                 batch_size: int = 64, max_length: int | None = None, dim: int | None = None):
        if not callable(getattr(embedder, "encode", None)):
            raise TypeError(f"embedder must have an encode method (an Embedder), got {type(embedder).__name__}")
        if not isinstance(name, str) or "/" not in name:
            raise ValueError(f"name must look like 'org/name' (mteb files results under it), got {name!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        instructions = dict(instructions or {})
        for task, instruction in instructions.items():
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError(f"instructions[{task!r}] must be a non-empty str, got {instruction!r}")
        self.embedder = embedder
        self.instructions = instructions
        self.batch_size = batch_size
        # (prompt, text) -> embedding, for this encoder's lifetime (one evaluate call: one model state). mteb encodes
        # the same texts more than once (classification's train sample per experiment, tasks sharing documents and
        # instruction); each distinct text is embedded once.
        self._cache: dict[tuple[str | None, str], torch.Tensor] = {}
        self.max_length = max_length
        self.dim = dim
        embed_dim = dim if dim is not None else getattr(embedder, "embed_dim", None)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name, revision="local", embed_dim=embed_dim, similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=bool(instructions), framework=["PyTorch"], modalities=["text"]))

    def prompt(self, task_name: str, prompt_type: PromptType | str | None) -> str | None:
        """The prompt prepended to the texts of ``task_name``: none for documents or tasks without instruction."""
        if prompt_type == PromptType.document:
            return None
        return query_prompt(self.instructions.get(task_name))

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs) -> np.ndarray:
        """inputs: a DataLoader of dict batches with "text" -> float32 (n, dim) L2-normalized embeddings."""
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.prompt(task_metadata.name, prompt_type)
        new = list(dict.fromkeys(t for t in texts if (prompt, t) not in self._cache))
        if new:
            # one call over all new texts: the Embedder sorts them by length across the whole set
            emb = self.embedder.encode(new, prompt=prompt, batch_size=self.batch_size, max_length=self.max_length,
                                       dim=self.dim, show_progress_bar=bool(kwargs.get("show_progress_bar", False)))
            for text, row in zip(new, torch.as_tensor(emb, dtype=torch.float32)):
                self._cache[(prompt, text)] = row
        if not texts:
            return torch.as_tensor(self.embedder.encode([], prompt=prompt, dim=self.dim), dtype=torch.float32).numpy()
        return torch.stack([self._cache[(prompt, t)] for t in texts]).numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """(n1, d), (n2, d) -> (n1, n2) cosine similarities."""
        a, b = _unit_rows(embeddings1), _unit_rows(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """(n, d), (n, d) -> (n,) cosine similarity of each pair."""
        return (_unit_rows(embeddings1) * _unit_rows(embeddings2)).sum(dim=-1)


def _unit_rows(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    return F.normalize(x.reshape(-1, x.shape[-1]), dim=-1)  # a 1-D input is one row


# ----------------------------------------------------------------------------------------------------------------
# Local tasks
# ----------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in keys if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing} (each row needs {list(keys)})")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty: the task has no data")
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: the task has no data")
        if [h.strip() for h in header] != ["query-id", "corpus-id", "score"]:
            raise ValueError(f"{path}: the header must be 'query-id<TAB>corpus-id<TAB>score', got {header}")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                query_id, corpus_id, score = row
                qrels.setdefault(query_id, {})[corpus_id] = int(float(score))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score', got {row}") from None
    return qrels


def _existing(path, argument: str, *, folder: bool | None = None) -> Path:
    """path as a Path, after checking it exists (and is a folder / file when ``folder`` says so)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{argument}: {path} does not exist")
    if folder is True and not path.is_dir():
        raise NotADirectoryError(f"{argument}: {path} is not a folder")
    if folder is False and path.is_dir():
        raise IsADirectoryError(f"{argument}: {path} is a folder, expected a file")
    return path


def _metadata(name: str, *, type_: str, category: str, main_score: str, path: Path, description: str | None,
              eval_langs, extra: dict) -> TaskMetadata:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    fields = dict(
        name=name,
        description=description or f"Local {type_.lower()} task read from {path}.",
        dataset={"path": f"local/{name}", "revision": "local"},
        type=type_, category=category, modalities=["text"], eval_splits=["test"], eval_langs=list(eval_langs),
        main_score=main_score, license="not specified", dialect=[], bibtex_citation="",
    )
    fields.update(extra)  # e.g. domains, annotations_creators, sample_creation, reference, date
    return TaskMetadata(**fields)


def _make_task(base: type, metadata: TaskMetadata, path: Path):
    # mteb keeps a task's metadata on its class (unload_data pops an instance's own), so each task gets a subclass
    cls = type(f"{metadata.name}Task", (base,), {"metadata": metadata, "__module__": __name__})
    return cls(path)


class _LocalTask:
    """Mixin: the path of the files and load_data reading them (``_load`` sets ``self.dataset``)."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__()

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        self._load()
        self.data_loaded = True


class _LocalRetrieval(_LocalTask, AbsTaskRetrieval):
    def _load(self) -> None:
        corpus = _read_jsonl(self.path / "corpus.jsonl", ("_id", "text"))
        queries = _read_jsonl(self.path / "queries.jsonl", ("_id", "text"))
        qrels = _read_qrels(self.path / "qrels.tsv")
        # a query without a positive document has no defined nDCG (mteb only drops queries with no qrels at all)
        qrels = {q: docs for q, docs in qrels.items() if max(docs.values()) > 0}
        queries = [q for q in queries if str(q["_id"]) in qrels]
        if not queries:
            raise ValueError(f"{self.path}: no query of queries.jsonl has a positive qrel in qrels.tsv")
        corpus_columns = {"id": [str(d["_id"]) for d in corpus], "text": [d["text"] for d in corpus]}
        if any("title" in d for d in corpus):
            corpus_columns["title"] = [d.get("title") or "" for d in corpus]
        split = RetrievalSplitData(
            corpus=Dataset.from_dict(corpus_columns),
            queries=Dataset.from_dict({"id": [str(q["_id"]) for q in queries], "text": [q["text"] for q in queries]}),
            relevant_docs={q: qrels[q] for q in (str(q["_id"]) for q in queries)},
            top_ranked=None)
        self.dataset = {"default": {"test": split}}


class _LocalSTS(_LocalTask, AbsTaskSTS):
    def _load(self) -> None:
        rows = _read_jsonl(self.path, ("sentence1", "sentence2", "score"))
        scores = [float(r["score"]) for r in rows]
        if len(rows) < 3 or min(scores) == max(scores):
            raise ValueError(f"{self.path}: need >= 3 pairs with different scores for a correlation, got "
                             f"{len(rows)} pair(s), scores {sorted(set(scores))[:5]}")
        # AbsTaskSTS maps scores to [0, 1] with these bounds (Spearman, the main score, does not depend on them)
        self.min_score, self.max_score = min(scores), max(scores)
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
            "score": scores})})


class _LocalClassification(_LocalTask, AbsTaskClassification):
    # mteb fits a logistic regression on `samples_per_label` training texts per label, averaged over `n_experiments`
    # resamples (defaults 8 and 10). Here one fit on the whole (small) training split: deterministic, less noisy
    # between stages, and it saves ~3 s of sklearn scoring per evaluation on the demo's 12 labels x ~16 texts.
    n_experiments = 1

    def _load(self) -> None:
        splits = {}
        for split in ("train", "test"):
            rows = _read_jsonl(self.path / f"{split}.jsonl", ("text", "label"))
            splits[split] = Dataset.from_dict({"text": [r["text"] for r in rows],
                                               "label": [str(r["label"]) for r in rows]})
        label_counts = Counter(splits["train"]["label"])
        if len(label_counts) < 2:
            raise ValueError(f"{self.path / 'train.jsonl'}: needs at least 2 labels to train a classifier")
        self.samples_per_label = max(label_counts.values())
        self.dataset = DatasetDict(splits)


class _LocalClustering(_LocalTask, AbsTaskClustering):
    max_fraction_of_documents_to_embed = None  # small sets: embed every text (mteb's default embeds 4 %)
    input_column_name = "text"
    label_column_name = "label"

    def _load(self) -> None:
        rows = _read_jsonl(self.path, ("text", "label"))
        labels = [str(r["label"]) for r in rows]
        if len(set(labels)) < 2:
            raise ValueError(f"{self.path}: needs at least 2 labels to cluster")
        # each of the n_clusters k-means runs clusters a bootstrap sample of the whole set (mteb's default draws
        # 16384 texts with replacement, ~30x a demo-sized set)
        self.max_documents_per_cluster = len(rows)
        # the same bootstrap samples on every evaluation of this task, so stages are compared on equal terms
        self.rng_state = random.Random(self.seed)
        self.dataset = DatasetDict({"test": Dataset.from_dict({"text": [r["text"] for r in rows], "label": labels})})


def retrieval_task(folder, *, name: str, description: str | None = None, eval_langs=("eng-Latn",), **metadata):
    """Retrieval task (main score nDCG@10) on ``folder``/{corpus.jsonl, queries.jsonl, qrels.tsv}. Extra keywords
    are TaskMetadata fields (domains, license, ...)."""
    folder = _existing(folder, "folder", folder=True)
    for file in ("corpus.jsonl", "queries.jsonl", "qrels.tsv"):
        _existing(folder / file, "folder")
    md = _metadata(name, type_="Retrieval", category="t2t", main_score="ndcg_at_10", path=folder,
                   description=description, eval_langs=eval_langs, extra=metadata)
    return _make_task(_LocalRetrieval, md, folder)


def sts_task(path, *, name: str, description: str | None = None, eval_langs=("eng-Latn",), **metadata):
    """STS task (main score cosine Spearman) on a jsonl file of {sentence1, sentence2, score} rows."""
    path = _existing(path, "path", folder=False)
    md = _metadata(name, type_="STS", category="t2t", main_score="cosine_spearman", path=path,
                   description=description, eval_langs=eval_langs, extra=metadata)
    return _make_task(_LocalSTS, md, path)


def classification_task(folder, *, name: str, description: str | None = None, eval_langs=("eng-Latn",),
                        **metadata):
    """Classification task (main score accuracy) on ``folder``/{train.jsonl, test.jsonl} of {text, label} rows."""
    folder = _existing(folder, "folder", folder=True)
    for file in ("train.jsonl", "test.jsonl"):
        _existing(folder / file, "folder")
    md = _metadata(name, type_="Classification", category="t2c", main_score="accuracy", path=folder,
                   description=description, eval_langs=eval_langs, extra=metadata)
    return _make_task(_LocalClassification, md, folder)


def clustering_task(path_or_folder, *, name: str, description: str | None = None, eval_langs=("eng-Latn",),
                    **metadata):
    """Clustering task (main score V-measure) on a jsonl file of {text, label} rows, or a folder's
    clustering.jsonl."""
    path = _existing(path_or_folder, "path_or_folder")
    if path.is_dir():
        path = _existing(path / "clustering.jsonl", "path_or_folder")
    md = _metadata(name, type_="Clustering", category="t2c", main_score="v_measure", path=path,
                   description=description, eval_langs=eval_langs, extra=metadata)
    return _make_task(_LocalClustering, md, path)


_TASK_FACTORIES = {"retrieval": retrieval_task, "sts": sts_task, "classification": classification_task,
                   "clustering": clustering_task}


def load_task_from_files(kind: str, path, *, name: str, **kwargs):
    """A local task of ``kind`` (one of TASK_KINDS) on ``path``; keywords go to that kind's function."""
    factory = _TASK_FACTORIES.get(kind)
    if factory is None:
        raise ValueError(f"kind must be one of {list(TASK_KINDS)}, got {kind!r}")
    return factory(path, name=name, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Demo and named tasks
# ----------------------------------------------------------------------------------------------------------------

# What the demo's tasks are (honest TaskMetadata): docstrings of the Python standard library, labels and relevance
# derived from where each docstring lives.
_DEMO_METADATA = dict(domains=["Programming", "Written"], annotations_creators="derived", sample_creation="found",
                      reference="https://docs.python.org/3/library/")


def demo_tasks(data_dir, *, split: str = "heldout") -> list:
    """The evaluation tasks of a ``build_demo_data`` folder (or its DemoData). split "heldout": retrieval,
    classification and clustering on the held-out packages; "validation": retrieval on the validation packages
    (model selection)."""
    data_dir = _existing(getattr(data_dir, "out_dir", data_dir), "data_dir", folder=True)
    eval_dir = data_dir / "eval"
    if split == "heldout":
        what = "on the held-out stdlib packages of the kalm-fast demo data"
        return [
            retrieval_task(eval_dir / "retrieval", name=DEMO_TASK_NAMES["retrieval"],
                           description=f"Docstring retrieval from a one-sentence summary, {what}.", **_DEMO_METADATA),
            classification_task(eval_dir / "classification", name=DEMO_TASK_NAMES["classification"],
                                description=f"Docstring -> top-level package classification, {what}.",
                                **_DEMO_METADATA),
            clustering_task(eval_dir / "clustering", name=DEMO_TASK_NAMES["clustering"],
                            description=f"Docstring clustering by top-level package, {what}.", **_DEMO_METADATA),
        ]
    if split == "validation":
        if not (eval_dir / "validation").is_dir():
            raise ValueError(f"data_dir {data_dir} has no validation task (eval/validation/): build it with "
                             "validation_fraction > 0")
        return [retrieval_task(eval_dir / "validation", name=DEMO_TASK_NAMES["validation"],
                               description="Docstring retrieval from a one-sentence summary, on the validation "
                                           "stdlib packages of the kalm-fast demo data (model selection).",
                               **_DEMO_METADATA)]
    raise ValueError(f"split must be 'heldout' or 'validation', got {split!r}")


def demo_instructions() -> dict[str, str]:
    """Task name -> instruction for the demo tasks (the instructions the demo's training rows use)."""
    return {DEMO_TASK_NAMES["retrieval"]: INSTRUCTIONS["api_summary"],
            DEMO_TASK_NAMES["validation"]: INSTRUCTIONS["api_summary"],
            DEMO_TASK_NAMES["classification"]: INSTRUCTIONS["classification"],
            DEMO_TASK_NAMES["clustering"]: INSTRUCTIONS["clustering"]}


def named_tasks(names: list[str]) -> list:
    """mteb's registered tasks by name. Their data is loaded (from the local Hugging Face cache only) when
    ``evaluate`` runs them."""
    if isinstance(names, str):
        names = [names]
    try:
        return list(mteb.get_tasks(tasks=list(names)))
    except (KeyError, ValueError) as e:
        raise ValueError(f"names: unknown mteb task(s) in {list(names)}: {e.args[0] if e.args else e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def _load_named(tasks: list, loaded: list) -> None:
    """Load the data of mteb's own tasks first, so that data that is not cached fails with a clear message (mteb
    would swallow a DatasetNotFoundError and fail later). Appends the tasks loaded here to ``loaded``."""
    for task in tasks:
        if task.data_loaded or isinstance(task, _LocalTask):
            continue
        try:
            task.load_data()
        except Exception as e:
            raise RuntimeError(
                f"task {task.metadata.name!r}: could not load its data ({task.metadata.dataset['path']}): "
                f"{type(e).__name__}: {e}. Data cannot be downloaded here (offline mode): it must already be in the "
                "local Hugging Face cache; otherwise use a local task (load_task_from_files)") from e
        loaded.append(task)


def evaluate(model, tasks, out_dir=None, *, instructions: dict[str, str] | None = None, batch_size: int = 64,
             max_length: int | None = None, dim: int | None = None, name: str = "kalm-fast/model",
             show_progress_bar: bool = False) -> dict[str, float]:
    """Run ``tasks`` (a task or a list) on ``model`` (an Embedder, wrapped with the keyword settings, or an
    MTEBEncoder, which brings its own) and return {task name: main score}, in task order.

    mteb's result files go to ``out_dir``/mteb (a temporary folder when out_dir is None); with out_dir, also
    ``out_dir``/scores.json: {"scores", "main_score_names", "seconds"}. Results are always recomputed.
    """
    start = time.perf_counter()
    _set_offline()
    if isinstance(model, MTEBEncoder):
        if instructions is not None:
            raise ValueError("instructions: give them to the MTEBEncoder (model is one already), not to evaluate")
        encoder = model
    else:
        encoder = MTEBEncoder(model, name=name, instructions=instructions, batch_size=batch_size,
                              max_length=max_length, dim=dim)
    tasks = [tasks] if not isinstance(tasks, list | tuple) else list(tasks)
    if not tasks:
        raise ValueError("tasks is empty")
    names = [t.metadata.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: task names must be unique, got {names}")

    # mteb maps datasets with progress bars of their own; quiet means quiet
    quiet = not show_progress_bar and datasets_logging.is_progress_bar_enabled()
    if quiet:
        datasets_logging.disable_progress_bar()
    loaded = []
    try:
        with tempfile.TemporaryDirectory(prefix="kalm_fast_mteb_") as tmp:
            _load_named(tasks, loaded)
            cache = mteb.ResultCache(Path(out_dir) / "mteb" if out_dir is not None else tmp)
            with warnings.catch_warnings():
                # mteb's classification also reports macro precision, which sklearn warns about whenever a label
                # is never predicted; the main score (accuracy) is unaffected
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                result = mteb.evaluate(encoder, tasks, cache=cache, overwrite_strategy="always",
                                       encode_kwargs={"batch_size": encoder.batch_size,
                                                      "show_progress_bar": show_progress_bar},
                                       show_progress_bar=show_progress_bar, co2_tracker=False)
    finally:
        for task in loaded:
            task.unload_data()
        if quiet:
            datasets_logging.enable_progress_bar()
    by_name = {r.task_name: float(r.get_score()) for r in result.task_results}
    scores = {n: by_name[n] for n in names}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"scores": scores, "main_score_names": {t.metadata.name: t.metadata.main_score for t in tasks},
                  "seconds": round(time.perf_counter() - start, 3)}
        write_json(out / "scores.json", record)  # readers never see a half-written file
    return scores


def bm25_baseline(task, *, cache_dir: str | os.PathLike | None = None) -> float:
    """nDCG@10 of mteb's BM25 baseline (``mteb/baseline-bm25s``: bm25s with the stemmer and stop words of the task's
    language) on an mteb retrieval task — the same evaluation code that scores the dense models, so the numbers are
    comparable. ``task``: e.g. the local retrieval task of ``kalm_fast.eval`` on ``DemoData.retrieval_dir`` (its
    eval_langs must say English for the English stemmer). Results are written under ``cache_dir`` when given,
    nowhere otherwise; run with HF_HUB_OFFLINE=1 on machines without network."""
    if task.metadata.type != "Retrieval" or task.metadata.main_score != "ndcg_at_10":
        raise ValueError(f"task must be a retrieval task scored by ndcg_at_10, got {task.metadata.type} "
                         f"scored by {task.metadata.main_score}")
    cache = mteb.ResultCache(cache_dir) if cache_dir is not None else None
    result = mteb.evaluate(mteb.get_model("mteb/baseline-bm25s"), task, cache=cache, overwrite_strategy="always",
                           show_progress_bar=False)
    return float(result.task_results[0].get_score())


def results_table(rows: dict[str, dict[str, float]], *,
                  baselines: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table: one row per stage (insertion order), one column per task (first seen first), scores with 3
    decimals, "–" where a stage has no score; baselines follow as rows marked "(baseline)"."""
    all_rows = [(stage, scores) for stage, scores in rows.items()]
    all_rows += [(f"{label} (baseline)", scores) for label, scores in (baselines or {}).items()]
    columns = list(dict.fromkeys(task for _, scores in all_rows for task in scores))
    lines = ["| stage | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for stage, scores in all_rows:
        cells = [f"{scores[c]:.3f}" if c in scores and scores[c] is not None else "–" for c in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
