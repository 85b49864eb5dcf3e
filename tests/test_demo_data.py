"""kalm_fast.demo_data: the embedded stdlib-documentation data of `kalm-fast demo`.

One full build (a few seconds) is shared by the module; a rebuild in another process (another hash seed,
transformers imported first) must give identical files. The BM25 test runs mteb's BM25 baseline through a local
retrieval task of its own (kalm_fast.eval's local tasks were not there yet)."""

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_fast import demo_data
from kalm_fast.demo_data import INSTRUCTIONS, build_demo_data, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ALL_FILES = ("pretrain.jsonl", "finetune.jsonl", "manifest.json", "eval/retrieval/corpus.jsonl",
             "eval/retrieval/queries.jsonl", "eval/retrieval/qrels.tsv", "eval/validation/corpus.jsonl",
             "eval/validation/queries.jsonl", "eval/validation/qrels.tsv", "eval/classification/train.jsonl",
             "eval/classification/test.jsonl", "eval/clustering/clustering.jsonl")


SENTINEL = object()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_qrels(path):
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        assert header == "query-id\tcorpus-id\tscore\n"
        return [(q, d, int(s)) for q, d, s in csv.reader(f, delimiter="\t")]


def digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ALL_FILES}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0)


def test_text_helpers():
    doc = "Return the thing, e.g. a list.  It is new.\n\n>>> f()\n[]"
    spans = demo_data._sentence_spans(doc)
    assert [doc[a:b] for a, b in spans] == ["Return the thing, e.g. a list.", "It is new.", ">>> f()\n[]"]
    # A leading C signature paragraph is dropped; the first sentence is split from the rest.
    cleaned = demo_data._clean_doc("f(a, b) -> int\n\nAdd two numbers together.  Both must be integers here.")
    assert cleaned == "Add two numbers together.  Both must be integers here."
    assert demo_data._split_summary(cleaned) == ("Add two numbers together.", "Both must be integers here.")
    # Usage lines are not queries; a too-short rest gives no pair.
    assert demo_data._split_summary("x = f(a) is how to call it.  Then more words follow here.") == ("", "")
    assert demo_data._split_summary("Add two numbers together.  Fast.") == ("", "")

    def f(a, b=SENTINEL, *, c=None, d=frozenset({"x", "y"}), e="ok"):
        pass

    # Object addresses and set orders vary between runs: such defaults render as "...".
    assert demo_data._signature(f) == "(a, b=..., *, c=None, d=..., e='ok')"


def test_deterministic_across_processes_and_hash_seeds(built, tmp_path):
    # Another process with another hash seed, after importing libraries that patch the stdlib (transformers adds
    # methods to logging.Logger): the files must be byte-identical.
    code = ("import transformers, sys; from kalm_fast.demo_data import build_demo_data; "
            "build_demo_data(sys.argv[1], seed=0)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env, timeout=120)
    assert digest(tmp_path / "again") == digest(built.out_dir)


def test_seed_changes_the_split(built, tmp_path):
    other = build_demo_data(tmp_path / "seed1", seed=1)
    assert other.packages["heldout"] != built.packages["heldout"]
    assert read_jsonl(other.finetune) != read_jsonl(built.finetune)


def test_split_by_package_without_leakage(built):
    sides = built.packages
    assert set(sides) == {"train", "validation", "heldout"}
    assert not set(sides["train"]) & set(sides["heldout"])
    assert not set(sides["train"]) & set(sides["validation"])
    assert not set(sides["validation"]) & set(sides["heldout"])
    assert "builtins" in sides["train"]

    rows = read_jsonl(built.pretrain) + read_jsonl(built.finetune)
    # Every API row names its object: its top-level package must be a training package.
    train = set(sides["train"])
    for row in rows:
        if row["dataset"] == "api_name":
            assert re.match(r"\w+", row["query"])[0] in train, row["query"]
        elif row["dataset"] in ("api_summary", "api_sentence"):
            assert re.match(r"\w+", row["pos"])[0] in train, row["pos"][:80]

    # No held-out or validation text occurs in any training row (queries, documents without their name line,
    # classification/clustering docstrings).
    blob = "\0".join(r["query"] + "\0" + r["pos"] for r in rows)
    texts = []
    for folder in (built.retrieval_dir, built.validation_dir):
        texts += [q["text"] for q in read_jsonl(folder / "queries.jsonl")]
        texts += [d["text"].split("\n", 1)[1] for d in read_jsonl(folder / "corpus.jsonl")]
    texts += [r["text"] for r in read_jsonl(built.clustering_dir / "clustering.jsonl")]
    assert len(texts) > 1000
    leaked = [t[:80] for t in texts if t in blob]
    assert not leaked, leaked[:5]
    # The ids name the held-out objects: all come from held-out packages.
    heldout = set(sides["heldout"])
    assert all(d["_id"].split(".")[0] in heldout for d in read_jsonl(built.retrieval_dir / "corpus.jsonl"))
    assert {r["label"] for r in read_jsonl(built.clustering_dir / "clustering.jsonl")} <= heldout


@pytest.mark.parametrize("folder", ["retrieval", "validation"])
def test_retrieval_files(built, folder):
    folder = built.out_dir / "eval" / folder
    corpus, queries = read_jsonl(folder / "corpus.jsonl"), read_jsonl(folder / "queries.jsonl")
    qrels = read_qrels(folder / "qrels.tsv")
    assert all(set(d) == {"_id", "text"} and d["text"].strip() for d in corpus)
    assert all(set(q) == {"_id", "text"} and q["text"].strip() for q in queries)
    corpus_ids, query_ids = [d["_id"] for d in corpus], [q["_id"] for q in queries]
    assert len(set(corpus_ids)) == len(corpus_ids) and len(set(query_ids)) == len(query_ids)
    assert sorted(q for q, _, _ in qrels) == sorted(query_ids)  # one relevant document per query
    assert all(d in set(corpus_ids) and s == 1 for _, d, s in qrels)
    # The query (the docstring's first sentence) was cut out of its document: no verbatim match.
    text_of, doc_of = {d["_id"]: d["text"] for d in corpus}, {q: d for q, d, _ in qrels}
    assert all(q["text"] not in text_of[doc_of[q["_id"]]] for q in queries)


def test_label_files(built):
    train = read_jsonl(built.classification_dir / "train.jsonl")
    test = read_jsonl(built.classification_dir / "test.jsonl")
    clustering = read_jsonl(built.clustering_dir / "clustering.jsonl")
    for row in train + test + clustering:
        assert set(row) == {"text", "label"} and row["text"].strip() and row["label"]
    labels = {r["label"] for r in train}
    assert labels == {r["label"] for r in test} == {r["label"] for r in clustering}
    assert len(labels) >= 8
    assert sorted(map(json.dumps, train + test)) == sorted(map(json.dumps, clustering))
    # Stratified halves: per label, train and test differ by at most one row.
    for label in labels:
        n_train, n_test = (sum(r["label"] == label for r in rows) for rows in (train, test))
        assert 0 <= n_train - n_test <= 1 and n_test >= 8


def test_training_rows(built):
    rows = {"pretrain": read_jsonl(built.pretrain), "finetune": read_jsonl(built.finetune)}
    datasets = {"pretrain": set(demo_data.PRETRAIN_DATASETS), "finetune": set(demo_data.FINETUNE_DATASETS)}
    for stage, stage_rows in rows.items():
        assert {r["dataset"] for r in stage_rows} == datasets[stage]
        for row in stage_rows:
            assert set(row) == {"query", "pos", "dataset", "instruction"}
            assert row["query"].strip() and row["pos"].strip()
            assert row["instruction"] == INSTRUCTIONS[row["dataset"]]
            assert len(row["pos"]) <= 1200
            if row["dataset"] in ("api_summary", "api_sentence", "topic_sentence"):
                assert row["query"] not in row["pos"]  # cut out of its positive: not a verbatim match
    # Every query within a dataset is unique (in-batch negatives must not hold a second copy of the answer).
    for stage_rows in rows.values():
        for dataset in {r["dataset"] for r in stage_rows}:
            queries = [r["query"].lower() for r in stage_rows if r["dataset"] == dataset]
            assert len(set(queries)) == len(queries), dataset
    assert "0x" not in " ".join(r["query"] for r in rows["pretrain"] if r["dataset"] == "api_name")


def test_counts_and_manifest(built):
    c = built.counts
    # Calibrated on CPython 3.10-3.13 (the docstrings differ between versions; seed 0).
    assert 1500 <= c["finetune"] <= 2300
    assert 4000 <= c["pretrain"] <= 7000
    assert 380 <= c["queries"] <= 400
    assert c["queries"] < c["corpus"] <= 1200
    assert 80 <= c["validation_queries"] <= 200
    assert c["pretrain"] == sum(c[f"pretrain.{d}"] for d in demo_data.PRETRAIN_DATASETS)
    assert min(c[f"pretrain.{d}"] for d in demo_data.PRETRAIN_DATASETS) >= 100
    assert built.build_seconds < 30
    manifest = json.loads(built.manifest.read_text())
    assert manifest["counts"] == c and manifest["packages"] == built.packages and manifest["seed"] == 0
    assert len(read_jsonl(built.finetune)) == c["finetune"]
    assert len(read_jsonl(built.retrieval_dir / "queries.jsonl")) == c["queries"]


def test_caps_and_argument_checks(built, tmp_path):
    # Rebuilt over a full build: every file is rewritten and the validation folder, now not built, is gone.
    shutil.copytree(built.out_dir, tmp_path / "small")
    small = build_demo_data(tmp_path / "small", max_pretrain=300, max_finetune=200, max_queries=50, max_corpus=120,
                            validation_fraction=0.0, max_chars=400)
    assert small.counts["pretrain"] == 300 and small.counts["finetune"] == 200
    assert small.counts["queries"] == 50 and small.counts["corpus"] == 120
    assert len(read_jsonl(small.retrieval_dir / "corpus.jsonl")) == 120
    assert small.validation_dir is None and small.packages["validation"] == []
    assert not (tmp_path / "small" / "eval" / "validation").exists()
    assert max(len(r["pos"]) for r in read_jsonl(small.finetune)) <= 400
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_demo_data(tmp_path / "bad", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="max_finetune"):
        build_demo_data(tmp_path / "bad", max_finetune=0)
    with pytest.raises(ValueError, match="max_corpus"):
        build_demo_data(tmp_path / "bad", max_queries=100, max_corpus=50)
    with pytest.raises(ValueError, match="raise heldout_fraction"):
        build_demo_data(tmp_path / "bad", heldout_fraction=0.001)
    with pytest.raises(ValueError, match="max_chars"):
        build_demo_data(tmp_path / "bad", max_chars=10)


def test_tokenizer_trains_and_round_trips(built, tmp_path):
    from transformers import PreTrainedTokenizerFast

    folder = train_tokenizer(built, tmp_path / "tok", vocab_size=1000)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    assert len(tok) == 1000 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    held_out = read_jsonl(built.retrieval_dir / "corpus.jsonl")[0]["text"]
    for text in (held_out, "def f(x):\n\treturn x ** 2  # ünïcødé ✓ 数据", "  two  spaces \n"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # merges were learned: fewer tokens than bytes
    batch = tok(["a b", "a longer text here"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0
    again = train_tokenizer(built.out_dir, tmp_path / "tok2", vocab_size=1000)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="pretrain.jsonl"):
        train_tokenizer(tmp_path / "empty", tmp_path / "tok3")


def _local_retrieval_task(folder: Path, name: str):
    """An mteb retrieval task on the demo's files (kalm_fast.eval is not there yet)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class Task(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=name, description="Python stdlib docstring retrieval (test).", reference=None,
            dataset={"path": str(folder), "revision": "local"}, type="Retrieval", category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=None, domains=["Programming"],
            task_subtypes=[], license="not specified", annotations_creators="derived", dialect=[],
            sample_creation="found", bibtex_citation="", modalities=["text"])

        def load_data(self, num_proc=None, **kwargs):
            relevant = {}
            for q, d, s in read_qrels(folder / "qrels.tsv"):
                relevant.setdefault(q, {})[d] = s
            split = RetrievalSplitData(
                corpus=Dataset.from_list([{"id": r["_id"], "text": r["text"]}
                                          for r in read_jsonl(folder / "corpus.jsonl")]),
                queries=Dataset.from_list([{"id": r["_id"], "text": r["text"]}
                                           for r in read_jsonl(folder / "queries.jsonl")]),
                relevant_docs=relevant, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return Task()


def test_bm25_baseline(built, tmp_path):
    from kalm_fast.eval import bm25_baseline

    # Plumbing: queries that share rare words with exactly their own document score a perfect nDCG@10.
    toy = tmp_path / "toy"
    toy.mkdir()
    words = ["zebra stripes", "volcano lava", "quantum entanglement", "medieval castle", "coral reef", "desert dunes"]
    (toy / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"All about {w} and more."}) + "\n"
                                              for i, w in enumerate(words)))
    (toy / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"{w}?"}) + "\n"
                                               for i, w in enumerate(words)))
    (toy / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    assert bm25_baseline(_local_retrieval_task(toy, "ToyRetrieval")) == pytest.approx(1.0)

    # The demo task: BM25 finds much but not all (measured 0.50 on CPython 3.11): neither trivial nor hopeless.
    score = bm25_baseline(_local_retrieval_task(built.retrieval_dir, "StdlibDocRetrieval"), cache_dir=tmp_path / "c")
    print(f"BM25 nDCG@10 on the held-out retrieval task: {score:.3f}")
    assert 0.35 <= score <= 0.65
    assert list((tmp_path / "c").rglob("*.json"))  # results written where asked

    with pytest.raises(ValueError, match="retrieval task"):
        bm25_baseline(type("T", (), {"metadata": type("M", (), {"type": "Clustering", "main_score": "v"})()})())
