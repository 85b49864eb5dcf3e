"""The embedded default data of ``kalm-fast demo``: real text built at run time from the Python standard library's
own documentation (docstrings and the language-reference topics of ``pydoc_data``), with no download.

Everything is deterministic for a given ``seed`` and Python installation (the docstrings change between Python
versions, so two versions build different files), independent of the hash seed and of what the caller imported.

* **Harvest** (:func:`harvest_entries`). A clean ``python -I -S`` process imports every public stdlib module
  (``sys.stdlib_module_names`` and their public submodules), each under a guard that swallows exceptions
  (``SystemExit`` included), output and warnings; modules with import side effects or no use here are skipped
  (:data:`SKIP_MODULES`). Each module's docstring and the docstrings of its public functions and classes and of those
  classes' own public methods and properties become *entries* (name, signature, docstring, first sentence, rest).
  Near-copies (same docstring, same first sentence or same rest) are kept once, so no query has two answers.
* **Split by module** (:func:`split_packages`). Top-level packages (``email.message`` belongs to ``email``), in the
  order of a seeded hash of their names, fill the held-out side up to ``heldout_fraction`` of the query-eligible
  entries, then a validation side (model selection, e.g. greedy soup) up to ``validation_fraction``; the rest trains.
  ``builtins`` always trains: the ``pydoc_data`` topics, used for training, document the builtin types. No held-out
  or validation text reaches a training row.
* **Training rows** ``{query, pos, dataset, instruction}`` (training packages and the topics only). Pre-training
  (weak pairs): ``api_name`` (qualified name + signature → docstring), ``api_sentence`` (a random docstring sentence
  → the docstring without it, inverse-cloze style), ``topic_heading`` (a language-reference section heading → its
  prose), ``topic_sentence`` (a random topic sentence → its paragraph without it). Fine-tuning: ``api_summary`` (a
  docstring's first sentence → the object's name, signature and the rest of the docstring: the query is a summary
  a user could have written, not a verbatim part of the document). Queries are unique within a dataset.
* **Evaluation** (held-out packages only): retrieval in the ``api_summary`` format (queries = first sentences, corpus =
  every held-out entry, one relevant document per query; the same task on the validation packages), classification
  and clustering of docstrings (without their object's name) by top-level package.

Files under ``out_dir``: ``pretrain.jsonl``, ``finetune.jsonl``; ``eval/retrieval/`` and ``eval/validation/``
(``corpus.jsonl`` {_id, text}, ``queries.jsonl`` {_id, text}, ``qrels.tsv`` with header ``query-id corpus-id score``);
``eval/classification/{train,test}.jsonl`` and ``eval/clustering/clustering.jsonl`` ({text, label}); ``manifest.json``
(seed, Python version, counts, packages per side, instructions). :func:`train_tokenizer` trains the byte-level BPE
tokenizer of ``--from-scratch`` on the training rows (mteb's BM25 baseline: ``kalm_fast.eval.bm25_baseline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

# Top-level modules never imported: side effects on import (antigravity opens a browser, this prints, lib2to3
# writes grammar pickles, readline/rlcompleter take over the terminal, distutils is replaced by setuptools' copy),
# GUI toolkits without a display (tkinter, turtle, idlelib, turtledemo), test suites and installers, posix/nt
# (os's implementation: their functions are collected as os.*) and pydoc_data (its topics are read separately).
SKIP_MODULES = frozenset({
    "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "test",
    "readline", "rlcompleter", "distutils", "posix", "nt", "pydoc_data",
})
# Submodule names never imported: test suites and ``python -m`` entry points (venv.__main__ would run on import).
_SKIP_SUBMODULES = frozenset({"__main__", "test", "tests", "idle_test"})
# Packages walked without their submodules: the ~120 generated codec modules of encodings repeat one boilerplate.
_NO_SUBMODULES = frozenset({"encodings"})
# Always on the training side (see the module docstring).
_ALWAYS_TRAIN = frozenset({"builtins"})

# One instruction per dataset (the trainer prepends it to queries, as for the evaluation tasks). The retrieval
# tasks (held-out and validation) are the api_summary task: they take its instruction.
INSTRUCTIONS = {
    "api_name": "Given the name and signature of a Python API, retrieve its documentation",
    "api_sentence": "Given a sentence from Python documentation, retrieve the documentation it comes from",
    "topic_heading": "Given a section heading of the Python language reference, retrieve the section's text",
    "topic_sentence": "Given a sentence from the Python language reference, retrieve the paragraph it comes from",
    "api_summary": "Given a one-sentence summary of a Python function or class, retrieve its documentation",
    "classification": "Classify the Python docstring by the standard-library package it belongs to",
}
# clustering groups the classification task's documents by the same label: one prompt for both, so an MTEB check
# embeds those documents once (kalm_fast.eval.MTEBEncoder caches by prompt and text)
INSTRUCTIONS["clustering"] = INSTRUCTIONS["classification"]
PRETRAIN_DATASETS = ("api_name", "api_sentence", "topic_heading", "topic_sentence")
FINETUNE_DATASETS = ("api_summary",)

_MIN_DOC_WORDS = 6  # shorter docstrings ("Return self.", "An enumeration.") carry no retrievable content
_MIN_SUMMARY_WORDS = 4
_MAX_SUMMARY_WORDS = 40  # a "first sentence" longer than this is a paragraph the splitter could not cut
_MIN_BODY_WORDS = 5
_MAX_SIGNATURE_CHARS = 120
_MIN_PARAGRAPH_WORDS = 20
# Sentence boundary: end punctuation, whitespace, then something that starts a sentence; or a blank line.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`*\[])|\n[ \t]*\n\s*")
# Words whose trailing period does not end a sentence ("e.g. Foo", "cf. X", "A. Name").
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|no|Mr|Dr)\.|\b[A-Za-z]\.)$", re.IGNORECASE)
# An old-style C docstring starts with its own signature line: "name(args) -> result".
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->.*)?$")
# reST heading underlines used by pydoc_data.topics.
_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One documented stdlib object."""

    package: str  # top-level package, e.g. "email"
    qualname: str  # e.g. "email.message.Message.get_payload"
    signature: str  # "(self, i=None, decode=False)" or ""
    doc: str  # cleaned docstring (leading signature line removed)
    summary: str  # first sentence, whitespace-collapsed; "" when the docstring has no usable one
    body: str  # the docstring without its first sentence; "" when not split

    @property
    def title(self) -> str:
        return self.qualname + self.signature

    @property
    def eligible(self) -> bool:
        """Usable as a query → document pair (api_summary format)."""
        return bool(self.summary) and bool(self.body)


@dataclasses.dataclass
class DemoData:
    """Where :func:`build_demo_data` wrote everything, and how much."""

    out_dir: Path
    pretrain: Path
    finetune: Path
    retrieval_dir: Path  # held-out retrieval: corpus.jsonl, queries.jsonl, qrels.tsv
    validation_dir: Path | None  # same format, validation packages (model selection); None when not built
    classification_dir: Path  # train.jsonl, test.jsonl
    clustering_dir: Path  # clustering.jsonl
    manifest: Path  # manifest.json: seed, Python version, counts, packages, instructions
    counts: dict[str, int]
    packages: dict[str, list[str]]  # "train" / "validation" / "heldout" → sorted top-level packages
    instructions: dict[str, str]
    build_seconds: float


# ----------------------------------------------------------------------------------------------------------- text


def _words(text: str) -> int:
    return len(text.split())


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``; a break after an abbreviation is not a break."""
    spans, start = [], 0
    for m in _SENTENCE_BREAK.finditer(text):
        if m.group().count("\n") < 2 and _ABBREVIATION.search(text[start : m.start()]):
            continue
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _is_prose(sentence: str) -> bool:
    """A sentence a person could have written as a query: starts with a letter, no code (usage lines, doctests)."""
    return sentence[:1].isalpha() and not any(mark in sentence for mark in ("=", ">>>", "::", "$ "))


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip()


def _clean_doc(doc: str) -> str:
    """cleandoc + drop a leading "name(args) -> result" paragraph (old-style C docstrings)."""
    text = inspect.cleandoc(doc).strip()
    paragraphs = text.split("\n\n")
    if len(paragraphs) > 1 and all(_SIGNATURE_LINE.match(line.strip()) for line in paragraphs[0].splitlines()):
        text = "\n\n".join(paragraphs[1:]).strip()
    return text


def _split_summary(doc: str) -> tuple[str, str]:
    """(first sentence collapsed, rest of the docstring) or ("", "") when that pair is not a usable task."""
    first_par_end = doc.find("\n\n")
    first_par = doc if first_par_end < 0 else doc[:first_par_end]
    a, b = _sentence_spans(first_par)[0]
    summary, rest = _collapse(first_par[a:b]), doc[b:].strip()
    if not (_is_prose(summary) and _MIN_SUMMARY_WORDS <= _words(summary) <= _MAX_SUMMARY_WORDS):
        return "", ""
    # A rest that repeats the first sentence ("Put an item into the queue.\n\nPut an item into the queue. If ...")
    # would make the query a verbatim part of its document.
    if _words(rest) < _MIN_BODY_WORDS or summary.lower() in _collapse(rest).lower():
        return "", ""
    return summary, rest


def _default_repr(value) -> str:
    """A default value as written in a signature; values whose repr is not stable across runs (object addresses,
    set order under hash randomization) become "..."."""
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 20):
        return repr(value)
    return "..."


class _StableDefault:
    """Renders as the given text in ``str(inspect.Signature)``."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj) -> str:
    """"(a, b=1, *args, key=...)" with stable defaults; "" when unknown or uninformative ("(*args, **kwargs)")."""
    try:
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - C text signatures can fail to evaluate in any way (curses: AttributeError)
        return ""
    # Annotations are dropped: noise for retrieval, and their reprs can be long.
    params = [p.replace(annotation=p.empty, default=p.default if p.default is p.empty
                        else _StableDefault(_default_repr(p.default))) for p in sig.parameters.values()]
    text = str(sig.replace(parameters=params, return_annotation=sig.empty))
    if text == "(*args, **kwargs)" or len(text) > _MAX_SIGNATURE_CHARS:
        return ""
    return text


# -------------------------------------------------------------------------------------------------------- harvest


def _quiet_import(name: str):
    """The module, or None when importing it fails in any way; output and warnings are swallowed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # any import failure, including a module that exits (KeyboardInterrupt passes)
            return None


def _stdlib_modules() -> dict[str, object]:
    """Every importable public stdlib module and submodule, by dotted name."""
    modules = {}
    tops = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    for top in tops:
        module = _quiet_import(top)
        if module is None:
            continue
        modules[top] = module
        stack = [(top, module)] if hasattr(module, "__path__") and top not in _NO_SUBMODULES else []
        while stack:
            parent, pkg = stack.pop()
            for info in pkgutil.iter_modules(pkg.__path__):
                if info.name.startswith("_") or info.name in _SKIP_SUBMODULES:
                    continue
                name = f"{parent}.{info.name}"
                sub = _quiet_import(name)
                if sub is not None:
                    modules[name] = sub
                    if info.ispkg:
                        stack.append((name, sub))
    return dict(sorted(modules.items()))


def _public_objects(modules: dict[str, object]):
    """(qualname, object) of every public function and class, each under one module, plus those classes' own public
    methods and properties; in module order.

    An object belongs to the module that defines it (``obj.__module__``). One defined in an implementation module
    that is not walked (``_io``, ``_thread``, ``posix``, ``concurrent.futures._base``) belongs to the public module
    that re-exports it and ranks first by: the implementation's name without its underscore (``_io`` → ``io``),
    the name listed in the module's ``__all__``, the module being the implementation's parent package, the shortest
    dotted name, the name — so ``_thread.get_ident`` is ``threading.get_ident``, not an incidental import elsewhere."""
    owned: dict[str, list[tuple[str, object]]] = defaultdict(list)
    adopted: dict[int, tuple[tuple, str, str, object]] = {}
    for module_name, module in modules.items():
        exported = set(getattr(module, "__all__", ()))
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            definer = getattr(obj, "__module__", None)
            if definer == module_name:
                owned[module_name].append((name, obj))
            elif definer not in modules:
                definer = definer or ""
                rank = (definer.lstrip("_") != module_name, name not in exported,
                        not definer.startswith(module_name + "."), module_name.count("."), module_name, name)
                if id(obj) not in adopted or rank < adopted[id(obj)][0]:
                    adopted[id(obj)] = (rank, module_name, name, obj)
    for _, module_name, name, obj in adopted.values():
        owned[module_name].append((name, obj))
    for module_name in modules:
        for name, obj in sorted(owned[module_name], key=lambda item: item[0]):
            qualname = f"{module_name}.{name}"
            yield qualname, obj
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if inspect.isroutine(member) or isinstance(member, property):
                        yield f"{qualname}.{attr}", member


def harvest_entries() -> list[Entry]:
    """All documented public stdlib objects, in a deterministic order, one per distinct docstring.

    The walk runs in a fresh ``python -I -S`` process (no site-packages, no environment variables): libraries imported
    by the caller patch the stdlib (transformers adds ``logging.Logger.warning_advice``, torch replaces
    ``inspect.getfile``), so harvesting in-process would make the data depend on what was imported before, and the
    ~350 imports with their atexit/signal side effects stay out of the caller."""
    if not sys.executable:
        raise RuntimeError("harvest_entries needs sys.executable to start a clean interpreter")
    proc = subprocess.run([sys.executable, "-I", "-S", str(Path(__file__).resolve())],
                          capture_output=True, text=True, encoding="utf-8", check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"stdlib harvest failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return [Entry(**row) for row in json.loads(proc.stdout)]


def _harvest_in_process() -> list[Entry]:
    """The work of :func:`harvest_entries`, in whatever process runs it."""
    modules = _stdlib_modules()
    seen: set[str] = set()
    entries = []

    def add(qualname: str, obj, signature: str) -> None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            return
        doc = _clean_doc(doc)
        summary, body = _split_summary(doc)
        # Near-copies (threading.Condition.notify_all and asyncio.locks.Condition.notify_all share their first
        # sentence) would put the same query on both sides of the split: an entry sharing its docstring, first
        # sentence or rest with an earlier one is dropped.
        keys = {_collapse(doc)} | ({"summary:" + summary.lower(), "body:" + _collapse(body)} if summary else set())
        if _words(doc) < _MIN_DOC_WORDS or keys & seen:
            return
        seen.update(keys)
        entries.append(Entry(qualname.split(".")[0], qualname, signature, doc, summary, body))

    # Module docstrings first, so that a module's docstring is never claimed by an object that copies it.
    for module_name, module in modules.items():
        add(module_name, module, "")
    for qualname, obj in _public_objects(modules):
        add(qualname, obj, "" if isinstance(obj, property) else _signature(obj))
    return entries


def _topic_sections() -> list[tuple[str, list[str]]]:
    """(heading, prose paragraphs) of every section of the pydoc_data language-reference topics, in topic order.

    Blocks are separated by blank lines; a block ending in a reST underline is a heading; indented blocks (grammar,
    code) and tables are not prose."""
    from pydoc_data.topics import topics

    sections = []
    for key in sorted(topics):
        heading, paragraphs = key, []
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            lines = block.strip("\n").splitlines()
            if len(lines) >= 2 and _UNDERLINE.match(lines[-1].strip()):
                sections.append((heading, paragraphs))
                heading, paragraphs = _collapse(" ".join(lines[:-1])), []
            elif lines and lines[0][:1] not in " \t+|" and _words(block) >= _MIN_PARAGRAPH_WORDS:
                paragraphs.append(_collapse(block))
        sections.append((heading, paragraphs))
    # Some sections are repeated in several topics ("Augmented assignment statements"): the first copy is kept.
    seen_headings, seen_paragraphs, unique = set(), set(), []
    for heading, paragraphs in sections:
        paragraphs = [p for p in paragraphs if p not in seen_paragraphs]
        if paragraphs and heading.lower() not in seen_headings:
            seen_headings.add(heading.lower())
            seen_paragraphs.update(paragraphs)
            unique.append((heading, paragraphs))
    return unique


# ---------------------------------------------------------------------------------------------------------- split


def _stable_hash(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big")


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(_stable_hash(seed, purpose))


def split_packages(entries: list[Entry], *, seed: int, heldout_fraction: float,
                   validation_fraction: float = 0.0) -> dict[str, list[str]]:
    """{"train", "validation", "heldout"} → sorted top-level packages.

    Packages are visited in the order of a seeded hash of their names. They join the held-out side until it holds
    ``heldout_fraction`` of the query-eligible entries, then the validation side until it holds
    ``validation_fraction``; a package that would overfill a side by more than a quarter of its share is passed over
    (one large package must not take a whole side). The rest trains."""
    eligible = Counter(e.package for e in entries if e.eligible)
    order = sorted({e.package for e in entries} - _ALWAYS_TRAIN, key=lambda p: _stable_hash(seed, p))
    total = sum(eligible.values())
    sides = {}
    for side, fraction in (("heldout", heldout_fraction), ("validation", validation_fraction)):
        budget, taken, chosen = fraction * total, 0, []
        for package in order:
            if taken >= budget:
                break
            if taken + eligible[package] <= 1.25 * budget:
                chosen.append(package)
                taken += eligible[package]
        sides[side] = sorted(chosen)
        order = [p for p in order if p not in set(chosen)]
    taken = set(sides["heldout"]) | set(sides["validation"])
    sides["train"] = sorted({e.package for e in entries} - taken)
    return sides


# ---------------------------------------------------------------------------------------------------------- pairs


def _row(query: str, pos: str, dataset: str) -> dict:
    return {"query": query, "pos": pos, "dataset": dataset, "instruction": INSTRUCTIONS[dataset]}


def _document(entry: Entry, max_chars: int) -> str:
    """The api_summary document: name and signature, then the docstring without its first sentence."""
    return _truncate(f"{entry.title}\n{entry.body if entry.eligible else entry.doc}", max_chars)


def _ict_pair(text: str, rng: random.Random) -> tuple[str, str] | None:
    """Inverse cloze: (one random prose sentence, the text without it); None for a text of fewer than 3 sentences,
    without a prose sentence of query length, or whose rest is too short."""
    spans = _sentence_spans(text)
    candidates = [(a, b) for a, b in spans
                  if _is_prose(text[a:b]) and _MIN_SUMMARY_WORDS <= _words(text[a:b]) <= _MAX_SUMMARY_WORDS]
    if len(spans) < 3 or not candidates:
        return None
    a, b = candidates[rng.randrange(len(candidates))]
    rest = (text[:a] + text[b:]).strip()
    return (_collapse(text[a:b]), rest) if _words(rest) >= _MIN_BODY_WORDS else None


def _pretrain_rows(train: list[Entry], sections, *, seed: int, max_chars: int) -> list[dict]:
    """The weakly supervised rows of the four PRETRAIN_DATASETS (see the module docstring)."""
    rng = _rng(seed, "pretrain")
    rows = []
    for e in train:
        rows.append(_row(e.title, _truncate(e.doc, max_chars), "api_name"))
        pair = _ict_pair(e.doc, rng)
        if pair is not None:
            rows.append(_row(pair[0], _truncate(f"{e.qualname}\n{pair[1]}", max_chars), "api_sentence"))
    for heading, paragraphs in sections:
        rows.append(_row(heading, _truncate("\n\n".join(paragraphs), max_chars), "topic_heading"))
        for paragraph in paragraphs:
            pair = _ict_pair(paragraph, rng)
            if pair is not None:
                rows.append(_row(pair[0], _truncate(pair[1], max_chars), "topic_sentence"))
    # A sentence shared by several docstrings ("This method is a coroutine.") has no single answer: first row kept.
    seen, unique = set(), []
    for row in rows:
        key = (row["dataset"], row["query"].lower())
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _cap(rows: list, limit: int | None, rng: random.Random) -> list:
    """At most ``limit`` rows, a seeded sample kept in the original order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# ---------------------------------------------------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_retrieval(folder: Path, entries: list[Entry], *, max_queries: int, max_corpus: int | None,
                     max_chars: int, rng: random.Random) -> tuple[int, int]:
    """queries.jsonl {_id, text} (first sentences), corpus.jsonl {_id, text} (every query's document, then other
    entries of the same packages as distractors up to max_corpus), qrels.tsv (one relevant document per query).
    Returns (queries, corpus) counts."""
    query_entries = _cap([e for e in entries if e.eligible], max_queries, rng)
    chosen = {e.qualname for e in query_entries}
    distractors = [e for e in entries if e.qualname not in chosen]
    if max_corpus is not None:
        distractors = _cap(distractors, max(0, max_corpus - len(query_entries)), rng)
    corpus = [{"_id": e.qualname, "text": _document(e, max_chars)}
              for e in sorted(query_entries + distractors, key=lambda e: e.qualname)]
    queries = [{"_id": f"q{i}", "text": e.summary} for i, e in enumerate(query_entries)]
    _write_jsonl(folder / "corpus.jsonl", corpus)
    _write_jsonl(folder / "queries.jsonl", queries)
    with open(folder / "qrels.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for query, entry in zip(queries, query_entries):
            f.write(f"{query['_id']}\t{entry.qualname}\t1\n")
    return len(queries), len(corpus)


def _write_package_labels(out: Path, entries: list[Entry], *, seed: int, min_label_count: int,
                          max_label_count: int, max_chars: int) -> dict[str, int]:
    """Classification train.jsonl/test.jsonl and clustering.jsonl, rows {text, label}: a docstring (without the
    object's name, which would give the label away) → its top-level package. A package is a label when it has at
    least min_label_count docstrings; a seeded sample of at most max_label_count of them is used, split 50/50 per
    package between classification train and test (the labels must be shared); clustering takes them all."""
    by_package = defaultdict(list)
    for e in entries:
        by_package[e.package].append(e)
    cls_train, cls_test, clustering = [], [], []
    labels = 0
    for package, group in sorted(by_package.items()):
        if len(group) < min_label_count:
            continue
        labels += 1
        group = _cap(group, max_label_count, _rng(seed, f"label:{package}"))
        order = list(range(len(group)))
        _rng(seed, f"classification:{package}").shuffle(order)
        for rank, i in enumerate(order):
            row = {"text": _truncate(group[i].doc, max_chars), "label": package}
            (cls_train if rank < (len(group) + 1) // 2 else cls_test).append(row)
            clustering.append(row)
    _write_jsonl(out / "classification" / "train.jsonl", cls_train)
    _write_jsonl(out / "classification" / "test.jsonl", cls_test)
    _write_jsonl(out / "clustering" / "clustering.jsonl", clustering)
    return {"classification_train": len(cls_train), "classification_test": len(cls_test),
            "classification_labels": labels, "clustering": len(clustering)}


def build_demo_data(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    heldout_fraction: float = 0.17,
    validation_fraction: float = 0.05,
    max_pretrain: int | None = None,
    max_finetune: int | None = None,
    max_queries: int = 400,
    max_corpus: int | None = 1200,
    min_label_count: int = 16,
    max_label_count: int = 60,
    max_chars: int = 1200,
) -> DemoData:
    """Build the demo's training pairs and evaluation tasks under ``out_dir`` (see the module docstring).

    seed: drives the package split and every sample. heldout_fraction / validation_fraction: shares of the
    query-eligible entries whose packages are held out for the final evaluation / kept apart for model selection
    (soup); neither side reaches the training rows. max_pretrain / max_finetune: caps on the training rows (seeded
    samples; None = all). max_queries: retrieval queries per task. max_corpus: retrieval corpus size (every query's
    document is kept, distractors fill the rest; None = all entries of the side). min_label_count / max_label_count:
    a held-out package is a classification/clustering label with at least min_label_count docstrings, of which at most
    max_label_count are used. max_chars: length cap of every positive and document (cut at a word boundary).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not 0.0 <= validation_fraction < 1.0 - heldout_fraction:
        raise ValueError(f"validation_fraction must be in [0, 1 - heldout_fraction), got {validation_fraction}")
    for name, value in (("max_pretrain", max_pretrain), ("max_finetune", max_finetune), ("max_corpus", max_corpus)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    if max_corpus is not None and max_corpus < max_queries:
        raise ValueError(f"max_corpus must be >= max_queries (every query's document is in the corpus), "
                         f"got {max_corpus} < {max_queries}")
    if min_label_count < 4 or max_label_count < min_label_count:
        raise ValueError(f"need 4 <= min_label_count <= max_label_count, got {min_label_count}, {max_label_count}")
    if max_chars < 100:
        raise ValueError(f"max_chars must be >= 100, got {max_chars}")
    start = time.perf_counter()
    out = Path(out_dir)

    entries = harvest_entries()
    sides = split_packages(entries, seed=seed, heldout_fraction=heldout_fraction,
                           validation_fraction=validation_fraction)
    side_of = {p: side for side, packages in sides.items() for p in packages}
    by_side = {side: [e for e in entries if side_of[e.package] == side] for side in sides}
    train = by_side["train"]
    heldout_sizes = Counter(e.package for e in by_side["heldout"])
    if not any(e.eligible for e in by_side["heldout"]) or sum(n >= min_label_count for n in heldout_sizes.values()) < 2:
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no retrieval query or fewer than 2 packages with "
                         f">= min_label_count={min_label_count} docstrings: raise heldout_fraction")

    pretrain = _cap(_pretrain_rows(train, _topic_sections(), seed=seed, max_chars=max_chars), max_pretrain,
                    _rng(seed, "max_pretrain"))
    finetune = _cap([_row(e.summary, _document(e, max_chars), "api_summary") for e in train if e.eligible],
                    max_finetune, _rng(seed, "max_finetune"))
    _write_jsonl(out / "pretrain.jsonl", pretrain)
    _write_jsonl(out / "finetune.jsonl", finetune)

    counts = {
        "entries": len(entries),
        **{f"{side}_entries": len(by_side[side]) for side in ("train", "validation", "heldout")},
        "pretrain": len(pretrain),
        **{f"pretrain.{d}": sum(r["dataset"] == d for r in pretrain) for d in PRETRAIN_DATASETS},
        "finetune": len(finetune),
    }
    counts["queries"], counts["corpus"] = _write_retrieval(
        out / "eval" / "retrieval", by_side["heldout"], max_queries=max_queries, max_corpus=max_corpus,
        max_chars=max_chars, rng=_rng(seed, "retrieval"))
    if not sides["validation"]:  # a folder left by an earlier build with validation would contradict the manifest
        shutil.rmtree(out / "eval" / "validation", ignore_errors=True)
    else:
        counts["validation_queries"], counts["validation_corpus"] = _write_retrieval(
            out / "eval" / "validation", by_side["validation"], max_queries=max_queries, max_corpus=max_corpus,
            max_chars=max_chars, rng=_rng(seed, "validation"))
    counts.update(_write_package_labels(out / "eval", by_side["heldout"], seed=seed, min_label_count=min_label_count,
                                        max_label_count=max_label_count, max_chars=max_chars))

    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({
        "seed": seed,
        "python": sys.version.split()[0],
        "heldout_fraction": heldout_fraction,
        "validation_fraction": validation_fraction,
        "counts": counts,
        "packages": sides,
        "instructions": INSTRUCTIONS,
    }, indent=1) + "\n", encoding="utf-8")
    return DemoData(
        out_dir=out, pretrain=out / "pretrain.jsonl", finetune=out / "finetune.jsonl",
        retrieval_dir=out / "eval" / "retrieval",
        validation_dir=out / "eval" / "validation" if sides["validation"] else None,
        classification_dir=out / "eval" / "classification", clustering_dir=out / "eval" / "clustering",
        manifest=manifest, counts=counts, packages=sides, instructions=dict(INSTRUCTIONS),
        build_seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------- from scratch


def train_tokenizer(data: DemoData | str | os.PathLike, out_dir: str | os.PathLike, *, vocab_size: int = 8192,
                    model_max_length: int = 512) -> Path:
    """Train a byte-level BPE tokenizer (Qwen2-style: GPT-2 byte pre-tokenizer, no normalizer, so decoding
    round-trips any text exactly) on the training rows only (pretrain.jsonl + finetune.jsonl of a built data folder)
    and save it as a folder that ``PreTrainedTokenizerFast.from_pretrained`` / ``AutoTokenizer`` load.

    ``<|endoftext|>`` is the end-of-text and padding token (id 0). Returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = data.out_dir if isinstance(data, DemoData) else Path(data)
    files = [folder / "pretrain.jsonl", folder / "finetune.jsonl"]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"data: {path} not found (build it with build_demo_data first)")
    if vocab_size < 300:  # 256 byte symbols + the special token + some merges
        raise ValueError(f"vocab_size must be >= 300, got {vocab_size}")

    def texts():
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    yield row["query"]
                    yield row["pos"]

    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=special, pad_token=special,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":  # the clean interpreter started by harvest_entries: entries as JSON on stdout
    sys.stdout.write(json.dumps([dataclasses.asdict(e) for e in _harvest_in_process()]))
